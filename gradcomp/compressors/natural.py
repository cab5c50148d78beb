"""`natural`: natural compression (Horvath, Ho, Horvath, Sahu, Canini, Richtarik, Natural
Compression for Distributed Deep Learning, arXiv:1905.10988, 2019).

Each entry is rounded, unbiasedly at random, to one of the two powers of two around it, so only
its sign and exponent travel:

    |x| = 2^e * (1 + f),  f in [0, 1)
    C_nat(x) = sign(x) * 2^e        with probability 1 - f
               sign(x) * 2^(e+1)    with probability f          E[C_nat(x)] = x,
    E||C_nat(x) - x||^2 <= (1/8) ||x||^2.

Implemented on the float32 bit pattern, exactly: the exponent field E and the 23-bit mantissa M
are read with integer ops, and the exponent goes up by one iff r < M for a private 23-bit random
integer r, so P(up) = M / 2^23 = f exactly. Subnormals (E = 0) round the same way to 0 or 2^-126
(unbiased as well). The code E' in 0..254 is the float32 exponent field of the result, sent as
uint8 (0 means 0); the signs are packed bits: 9 bits per entry (3.56x). Decoding rebuilds the
float32 from the bits (E' << 23). float64 gradients are first rounded to float32 (relative error
<= 2^-24); magnitudes that would round up past 2^127 are kept at 2^127 (the only biased case).
Not summable. No error feedback in the paper: default memory none.
"""
from gradcomp import rng
from gradcomp.compressors.base import Compressor
from gradcomp.compressors.signs import compute_dtype, unpack_signs


class NaturalCompressor(Compressor):
    name = "natural"
    summable = False
    default_memory = "none"
    fusion = "correct"          # elementwise; a fused bucket draws its random bits per bucket
    cpu_fusion = False          # per tensor is faster on a CPU (docs part 1, wave 5)
    paper = "Horvath et al. Natural Compression for Distributed Deep Learning. arXiv:1905.10988"
    params = {}

    def compress(self, x, state, ctx):
        b = ctx.backend
        x32 = b.cast(x, "float32")
        bits = b.from_bytes(b.to_bytes(x32), "int32", (-1,))      # the float32 bit patterns, int32 ops only
        field = b.band(b.shr(bits, 23), 0xFF)
        mant = b.band(bits, 0x7FFFFF)
        r = rng.high_bits(b, ctx.key(f"natural/{ctx.rank}"), ctx.numel, x, 9)     # 23 random bits
        code = b.minimum_(field + b.cast(r < mant, "int32"), 254)
        return [b.cast(code, "uint8"), b.packbits(bits < 0)], None

    def decompress(self, payload, info, ctx):
        b = ctx.backend
        mag = b.from_bytes(b.to_bytes(b.shl(b.cast(payload[0], "int32"), 23)), "float32", (-1,))
        out = b.mul_(mag, unpack_signs(b, payload[1], ctx.numel, "float32"))
        return b.cast(out, compute_dtype(ctx))

    def ratio_of(self, numel):
        return 4 * numel / (numel + (numel + 7) // 8)
