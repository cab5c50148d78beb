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
from gradcomp.compressors.signs import compute_dtype, mean_abs_scales, pack_signs, segs, unpack_signs


class EFSignSGDCompressor(Compressor):
    name = "efsignsgd"
    summable = False
    default_memory = "residual"
    paper = "Karimireddy et al. Error Feedback Fixes SignSGD and other Gradient Compression Schemes. ICML 2019"
    fusion = "segmented"
    cpu_fusion = False          # per tensor is faster on a CPU (docs part 1, wave 5)
    params = {}

    def compress(self, x, state, ctx):
        b = ctx.backend                              # fused bucket: one scale per tensor
        return [mean_abs_scales(b, x, ctx), pack_signs(b, x)], None

    def decompress(self, payload, info, ctx):
        b, dt = ctx.backend, compute_dtype(ctx)
        return b.segment_mul_(unpack_signs(b, payload[1], ctx.numel, dt), b.cast(payload[0], dt), segs(ctx))

    def ratio_of(self, numel):
        return 4 * numel / (4 + (numel + 7) // 8)
