"""`efsignsgd`: scaled sign compression with error feedback (Karimireddy, Rebjock, Stich, Jaggi,
Error Feedback Fixes SignSGD and other Gradient Compression Schemes, ICML 2019, Alg. 1).

    p   = g + e                          (memory `residual` compensates)
    C(p) = (||p||_1 / d) * sign(p)       (payload: the scale as float32 and the packed sign bits)
    e  <- p - C(p)                       (memory `residual` updates)

Zero entries are sent as +scale. Not summable (each rank has its own scale): the decoded
payloads are averaged. Default memory: residual. Wire: 4 + ceil(n/8) bytes (~32x). A fused
bucket of T tensors sends the T per-tensor scales and the bucket's sign bits (4T + ceil(n/8)).
"""
from gradcomp.compressors.base import Compressor
from gradcomp.compressors.signs import compute_dtype, pack_signs, scalar_to_wire, segmented, spread, unpack_signs


class EFSignSGDCompressor(Compressor):
    name = "efsignsgd"
    summable = False
    default_memory = "residual"
    paper = "Karimireddy et al. Error Feedback Fixes SignSGD and other Gradient Compression Schemes. ICML 2019"
    fusion = "segmented"
    params = {}

    def compress(self, x, state, ctx):
        b = ctx.backend
        if segmented(ctx):                           # fused bucket: one scale per tensor
            seg = ctx.segments
            sums = b.segment_sum(b.abs(b.cast(x, "float64")), seg)
            scale = b.cast(sums / b.lengths_array(seg, x, "float64"), "float32")
            return [scale, pack_signs(b, x)], None
        scale = b.mean_abs(b.cast(x, "float64"))    # float64 so every backend rounds to the same float32
        return [scalar_to_wire(b, scale), pack_signs(b, x)], None

    def decompress(self, payload, info, ctx):
        b, dt = ctx.backend, compute_dtype(ctx)
        return unpack_signs(b, payload[1], ctx.numel, dt) * spread(b, b.cast(payload[0], dt), ctx)

    def ratio_of(self, numel):
        return 4 * numel / (4 + (numel + 7) // 8)
