"""`terngrad`: ternary gradients (Wen, Xu, Yan, Wu, Wang, Chen, Li, TernGrad: Ternary Gradients to
Reduce Communication in Distributed Deep Learning, NeurIPS 2017), per tensor ("layer-wise").

    s     = max_i |x_i|                                       (float32 on the wire)
    b_i   ~ Bernoulli(|x_i| / s)                              (private randomness per rank)
    T(x)_i = s * sign(x_i) * b_i                              E[T(x)] = x (unbiased)

Optional gradient clipping (Sec. 3.3, `clip` = c, 0 = off): before ternarizing,
x_i <- clip(x_i, -c * sigma, c * sigma) with sigma the standard deviation of x (the paper uses
c = 2.5); this shrinks s and the variance, and T is then unbiased for the clipped gradient.
Wire: [s as float32, packbits(b), packbits(x < 0)]: 2 bits per entry plus 4 bytes (~16x).
Not summable (per-rank scale). No error feedback in the paper: default memory none. A fused
bucket keeps s (and sigma) per tensor by segmented reductions and sends the T scales; its
Bernoulli draws come from the bucket's private stream: by default (rng=native) the framework's own
seeded generator (one kernel), reproducible per (seed, step, name, rank) on one backend, not
bit-identical across backends; rng=counter: the counter-based stream (bit-identical on every backend,
slower).
"""
from gradcomp.compressors.base import Compressor
from gradcomp.compressors.signs import (RNG_PARAM, compute_dtype, neg_bits, private_uniform, segmented, segs,
                                        spread, unpack_signs)
from gradcomp.params import Param


class TernGradCompressor(Compressor):
    name = "terngrad"
    summable = False
    default_memory = "none"
    paper = "Wen et al. TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep Learning. NeurIPS 2017"
    fusion = "correct"          # per-tensor scales (segmented), but the bucket's own random draws
    cpu_fusion = False          # per tensor is faster on a CPU (docs part 1, wave 5)
    params = {"clip": Param(float, 0.0, "clip to +-clip*std(x) first (paper: 2.5; 0 = off)", lo=0.0),
              "rng": RNG_PARAM}

    def compress(self, x, state, ctx):
        b, dt = ctx.backend, compute_dtype(ctx)
        seg = segmented(ctx)
        if self.clip > 0:
            x64 = b.cast(x, "float64")
            if seg:                                   # fused bucket: per-tensor mean and deviation
                inv_n = 1.0 / b.lengths_array(ctx.segments, x, "float64")
                mean = spread(b, b.segment_sum(x64, ctx.segments) * inv_n, ctx)
                var = b.segment_sum((x64 - mean) * (x64 - mean), ctx.segments) * inv_n
                c = spread(b, b.cast(b.sqrt(var) * self.clip, dt), ctx)
            else:
                mean = b.sum(x64) * (1.0 / ctx.numel)
                var = b.sum((x64 - mean) * (x64 - mean)) * (1.0 / ctx.numel)
                c = b.cast(b.sqrt(var) * self.clip, dt)
            x = b.minimum(b.maximum(x, -c), c)
        s32 = b.cast(b.segment_absmax(x, segs(ctx)), "float32")     # exact: max |x| of each tensor
        s64 = b.cast(s32, "float64")
        inv = b.cast(1.0 / b.where(s64 > 0, s64, b.zeros_like(s64) + 1), dt)   # one rounding on every backend
        p = b.segment_mul_(b.abs(x), inv, segs(ctx))               # |x| / s, in place on the fresh |x|
        keep = private_uniform(ctx, "terngrad", ctx.numel, x, dt, self.rng == "native") < p
        return [s32, b.packbits(keep), b.packbits(neg_bits(x))], None

    def decompress(self, payload, info, ctx):
        b, dt, n = ctx.backend, compute_dtype(ctx), ctx.numel
        out = b.mul_(b.unpack_01(payload[1], n, dt), unpack_signs(b, payload[2], n, dt))
        return b.segment_mul_(out, b.cast(payload[0], dt), segs(ctx))

    def ratio_of(self, numel):
        return 4 * numel / (4 + 2 * ((numel + 7) // 8))
