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
"""
from gradcomp.compressors.base import Compressor
from gradcomp.params import Param


class CastCompressor(Compressor):
    summable = True
    fusion = "exact"
    elementwise_cheap = True
    wire_dtype = "float16"
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
