"""`none`: the dense baseline. Payload = the gradient itself (fp32), summed by allreduce."""
from gradcomp.compressors.base import Compressor


class NoneCompressor(Compressor):
    name = "none"
    summable = True
    lossless = True
    fusion = "exact"
    elementwise_cheap = True
    paper = "dense data-parallel SGD"

    def compress(self, x, state, ctx):
        return [x], None

    def decompress(self, payload, info, ctx):
        return payload[0]

    def ratio_of(self, numel):
        return 1.0
