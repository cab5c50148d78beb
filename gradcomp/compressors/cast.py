"""Shared code of the cast compressors (`fp16`, `bf16`): x -> cast(x * prescale), summable.

The sum of casts decodes to the cast of the sum up to rounding: decode is the (linear) cast
back to fp32 times 1/prescale. A prescale factor guards fp16 against overflow of the summed
payload on many ranks (Horovod's prescale_factor); the default 1 matches Horovod's fp16.

Overflow is not saturated: a value beyond the wire dtype's range (fp16: |prescale * x| > 65504,
or the sum over ranks beyond it) becomes inf, and GradientSync then raises PayloadOverflowError
(a NonFiniteGradientError) on every rank with no state changed, so a torch GradScaler skips the
step and lowers its scale, as it does for its own overflows (gradcomp/pipeline.py says why we
check rather than clamp). prescale <= 1/N keeps the sum of N ranks in range for inputs within
+-65504; bf16 has float32's exponent range.

No error feedback by default (`default_memory = "none"`), as in Horovod's Compression.fp16: the
per-step rounding error is relative 2^-11 (fp16) / 2^-8 (bf16) and unbiased in sign, so a residual
would only add per-rank state (and checkpoint bytes) for a negligible correction, and
`compressor="fp16"` behaves exactly like `compression=Compression.fp16`. Ask for it explicitly with
`memory="residual"`.
"""
from gradcomp.compressors.base import Compressor
from gradcomp.params import Param


class CastCompressor(Compressor):
    summable = True
    fusion = "exact"
    elementwise_cheap = True
    wire_dtype = "float16"
    default_memory = "none"
    params = {"prescale": Param(float, 1.0, "multiply before the cast, divide after", lo=0.0, lo_open=True)}

    def compress(self, x, state, ctx):
        b = ctx.backend
        y = x * self.prescale if self.prescale != 1.0 else x
        return [b.cast(y, self.wire_dtype)], None

    def decompress(self, payload, info, ctx):
        b = ctx.backend
        y = b.cast(payload[0], "float64" if ctx.dtype == "float64" else "float32")
        return y * (1.0 / self.prescale) if self.prescale != 1.0 else y

    def ratio_of(self, numel):
        return 2.0
