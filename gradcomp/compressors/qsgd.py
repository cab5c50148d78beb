"""`qsgd`: Quantized SGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, QSGD: Communication-Efficient
SGD via Gradient Quantization and Encoding, NeurIPS 2017), stochastic quantization with s levels.

For a bucket x of d entries (the whole tensor when bucket=0) and u_i ~ U[0, 1) private to the rank:

    l_i  = |x_i| / ||x||_2 * s                              in [0, s]
    xi_i = floor(l_i) + [u_i < l_i - floor(l_i)]            stochastic rounding, E[xi_i] = l_i
    Q(x)_i = ||x||_2 * sign(x_i) * xi_i / s                 E[Q(x)] = x (unbiased)
    E||Q(x) - x||^2 <= min(d / s^2, sqrt(d) / s) * ||x||^2  (Lemma 3.1)

Payload: [bucket norms as float32, signed levels]. Levels travel as int8 when they need 8 bits
(s >= 64) and otherwise, tighter, as ceil(log2(2s+1)) packed bit planes of (level + s): s=1 is
2 bits per entry, s=7 is 4 bits. The norms are accumulated in the gradient's precision (float32:
backends may differ in a norm's last bit) and the decoder uses the same float32 norms. The
randomness is private to each rank (key "qsgd/<rank>"), reproducible per (seed, step, name);
By default (rng=native) it is drawn with the framework's own seeded generator (one kernel: torch's
generator, tf.random.stateless_uniform): reproducible per key on one backend, so a resumed run repeats
its draws, but not bit-identical across backends; rng=counter uses the counter-based stream instead
(bit-identical on numpy, torch and TF, about 2x slower on CPU: docs/benchmarks.md part 1).
The default bucket of 512 entries is the paper's setting (0.8% more bytes than one norm; on a
1M-entry Gaussian the relative error drops from 2.29 with bucket=0 to 0.073); bucket=0 (one norm)
keeps the payload minimal but its variance grows like sqrt(n)/s. Not summable (per-rank norms). No error feedback in
the paper: default memory none.
"""
from gradcomp.compressors.base import Compressor
from gradcomp.compressors.signs import RNG_PARAM, compute_dtype, pack_uint, private_uniform, unpack_uint
from gradcomp.params import Param


class QSGDCompressor(Compressor):
    name = "qsgd"
    summable = False
    default_memory = "none"
    paper = "Alistarh et al. QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding. NeurIPS 2017"
    params = {
        "levels": Param(int, 127, "quantization levels s per sign (1..127)", lo=1, hi=127),
        "bucket": Param(int, 512, "entries per norm (paper: 512; 0 = one norm for the whole tensor)", lo=0),
        "rng": RNG_PARAM,
    }

    cpu_fusion = False          # per tensor is faster on a CPU (docs part 1, wave 5)

    @property
    def fusion(self):
        """A fused bucket is quantized in `bucket`-entry chunks of the concatenation (a chunk may
        span two tensors) with the bucket's private draws; bucket=0 (one norm per tensor) is not fused."""
        return "correct" if self.bucket > 0 else None

    @property
    def bits(self) -> int:
        """Bits per entry on the wire."""
        return 8 if self.levels >= 64 else (2 * self.levels).bit_length()

    def _buckets(self, n):
        return 1 if self.bucket <= 0 or self.bucket >= n else -(-n // self.bucket)

    def _width(self, nb, n):
        return self.bucket if nb > 1 else max(n, 1)

    def compress(self, x, state, ctx):
        b, n, s, dt = ctx.backend, ctx.numel, self.levels, compute_dtype(ctx)
        nb = self._buckets(n)
        w = self._width(nb, n)
        norms = b.cast(b.block_norms(x, w), "float32")          # what goes on the wire
        nw = b.cast(norms, "float64")
        f = b.cast(s / b.where(nw > 0, nw, b.zeros_like(nw) + 1), dt)     # s / ||x||, one rounding on every backend
        y = b.block_mul_(b.abs(x), f, w)                         # |x| s / ||x||, in place on the fresh |x|
        lv = b.stochastic_round_(y, private_uniform(ctx, "qsgd", n, x, dt, self.rng == "native"))
        lv = b.signed_(b.minimum_(lv, float(s)), x)              # signed levels in -s..s (as floats)
        if self.bits == 8:
            levels = b.cast(lv, "int8")
        else:
            levels = pack_uint(b, b.cast(lv, "int32") + s, self.bits)
        return [norms, levels], None

    def decompress(self, payload, info, ctx):
        b, n, s, dt = ctx.backend, ctx.numel, self.levels, compute_dtype(ctx)
        norms, levels = payload
        if self.bits == 8:
            lv = b.cast(levels, dt)
        else:
            lv = b.cast(unpack_uint(b, levels, n, self.bits) - s, dt)
        g = b.cast(b.cast(norms, "float64") * (1.0 / s), dt)     # ||x|| / s
        return b.block_mul_(lv, g, self._width(b.numel(norms), n))

    def ratio_of(self, numel):
        return 4 * numel / (4 * self._buckets(numel) + (numel if self.bits == 8 else self.bits * ((numel + 7) // 8)))
