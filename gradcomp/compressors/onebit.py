"""`onebit`: 1-bit SGD with error feedback (Seide, Fu, Droppo, Li, Yu, 1-Bit Stochastic Gradient
Descent and its Application to Data-Parallel Distributed Training of Speech DNNs, Interspeech 2014).

Each entry is quantized to one bit, its sign; the two reconstruction values are the means of
the entries on each side (the paper does this per matrix column; here per tensor), and the
quantization error is fed back into the next step:

    p    = g + e                                  (memory `residual`)
    a+   = mean{ p_i : p_i >= 0 },   a- = mean{ p_i : p_i < 0 }
    C(p)_i = a+ if p_i >= 0 else a-              (payload: [a+, a-] as float32, packed sign bits)
    e   <- p - C(p)                               (memory `residual`)

An empty side has mean 0. Not summable: decoded payloads are averaged. Wire: 8 + ceil(n/8) bytes.
A fused bucket of T tensors keeps the per-tensor means (segmented sums): [a+ of each tensor,
a- of each tensor] and the bucket's sign bits, 8T + ceil(n/8) bytes.
"""
from gradcomp.compressors.base import Compressor
from gradcomp.compressors.signs import compute_dtype, neg_bits, segmented, segs


class OneBitCompressor(Compressor):
    name = "onebit"
    summable = False
    default_memory = "residual"
    paper = ("Seide et al. 1-Bit Stochastic Gradient Descent and its Application to Data-Parallel "
             "Distributed Training of Speech DNNs. Interspeech 2014")
    fusion = "segmented"
    cpu_fusion = False          # per tensor is faster on a CPU (docs part 1, wave 5)
    params = {}

    def compress(self, x, state, ctx):
        b, seg = ctx.backend, segs(ctx)
        neg = neg_bits(x)
        n_neg = b.segment_count(neg, seg)                       # float64
        count = b.lengths_array(seg, x, "float64") if segmented(ctx) else float(ctx.numel)
        s_neg, s_pos = (b.cast(v, "float64") for v in b.segment_signed_sums(x, seg))
        a_pos = s_pos / b.maximum(count - n_neg, 1.0)
        a_neg = s_neg / b.maximum(n_neg, 1.0)
        scales = b.cast(b.cat([b.reshape(a_pos, (-1,)), b.reshape(a_neg, (-1,))]), "float32")
        return [scales, b.packbits(neg)], None

    def decompress(self, payload, info, ctx):
        b, dt = ctx.backend, compute_dtype(ctx)
        sc = b.cast(payload[0], dt)
        t = b.numel(sc) // 2
        return b.unpack_select(payload[1], ctx.numel, b.slice(sc, 0, t), b.slice(sc, t, 2 * t), segs(ctx))

    def ratio_of(self, numel):
        return 4 * numel / (8 + (numel + 7) // 8)
