"""`threshold`: keep every entry whose magnitude reaches a fixed threshold (Strom, Scalable
Distributed DNN Training Using Commodity GPU Cloud Computing, Interspeech 2015; with error
feedback, what is not sent accumulates until it crosses the threshold).

    I = { i : |x_i| >= tau },   C(x) = (x_I, I),   D(v, I) = sum_{i in I} v_i e_i

The number of kept entries depends on the data and differs per rank, so `variable_size = True`:
the pipeline allgathers with a small size header. Payload: values (x's compute dtype) and int32
indices (int64 beyond 2**31 entries), i.e. 8 bytes per kept fp32 entry; a rank may send nothing.
When that would be larger than the dense tensor (more than half the entries kept in fp32), the rank
sends the dense vector instead (payload [x, no indices]; decoded as x), so a rank never sends more
than dense (not inside a traced TF graph, where payload sizes are unknown until run time).
Default memory: residual.
"""
from gradcomp.compressors.sparse import SparseCompressor
from gradcomp.params import Param


class ThresholdCompressor(SparseCompressor):
    name = "threshold"
    variable_size = True
    fusion = "correct"          # the same entries pass, but the dense fallback is decided per bucket
    paper = "Strom. Scalable Distributed DNN Training Using Commodity GPU Cloud Computing. Interspeech 2015"
    params = {"threshold": Param(float, 0.01, "keep entries with |x| >= threshold", lo=0.0, lo_open=True)}

    def compress(self, x, state, ctx):
        b = ctx.backend
        idx = b.nonzero(b.greater_equal(b.abs(x), self.threshold))
        vals, ind = self.pack(x, idx, ctx)
        if not b.traced() and b.nbytes(vals) + b.nbytes(ind) > b.nbytes(x):   # sparse would cost more
            ctx.memo.pop("sent_idx", None)
            ctx.memo.pop("own_idx", None)       # decoded dense: x itself
            return [x, b.slice(ind, 0, 0)], None
        return [vals, ind], None

    @staticmethod
    def _is_dense(b, p, n):
        return not b.traced() and b.numel(p[1]) == 0 and b.numel(p[0]) == n and n > 0

    def decompress(self, payload, info, ctx):
        if self._is_dense(ctx.backend, payload, ctx.numel):
            return payload[0]
        return super().decompress(payload, info, ctx)

    def union(self, result, info, ctx):
        if any(self._is_dense(ctx.backend, p, ctx.numel) for p in result):
            return None
        return super().union(result, info, ctx)

    def aggregate(self, gathered, info, ctx):
        b, n = ctx.backend, ctx.numel
        dense = [p for p in gathered if self._is_dense(b, p, n)]
        sparse = [p for p in gathered if not self._is_dense(b, p, n)]
        total = super().aggregate(sparse, info, ctx) * (len(sparse) / len(gathered)) if sparse else None
        for p in dense:
            total = p[0] * (1.0 / len(gathered)) if total is None else total + p[0] * (1.0 / len(gathered))
        return total
