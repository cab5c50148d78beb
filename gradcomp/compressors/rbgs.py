"""`rbgs`: random block gradient sparsification: one shared contiguous block per step.

RBGS is the aggressive sparsifier that GMC+ targets (Shi, Zhao, Xie, Gao, Li, Global Momentum
Compression for Sparse Communication in Distributed Learning, arXiv 1905.12948). Each step every
rank keeps the same block of k = round(ratio * n) consecutive coordinates of the flattened
gradient, starting at a shared offset o_t drawn from (seed, step, name) with no communication:

    o_t ~ U{0, ..., n-1}   (gradcomp.rng.host_randint(seed, t, name, "rbgs", n))
    I_t = {o_t, o_t+1, ..., o_t+k-1} mod n          (the block wraps around the end)
    C(x) = x_{I_t}  (k values, no indices),   D(v) = s * sum_j v_j e_{I_t(j)}
    s = n/k if unbiased else 1                       (use 1 with error feedback, the default)

The wrap-around makes every coordinate equally likely to be sent (P = k/n), so no coordinate of
the error-feedback residual is starved. Summable: all ranks share I_t, the pipeline sums the
values with one allreduce; the payload is k values for any number of workers (ratio n/k).
"""
from gradcomp import rng
from gradcomp.compressors.base import Compressor
from gradcomp.compressors.sparse import k_of
from gradcomp.params import Param


class RBGSCompressor(Compressor):
    name = "rbgs"
    summable = True
    fusion = "correct"          # a fused bucket: one block of the bucket per step
    paper = "Shi, Zhao, Xie, Gao, Li. Global Momentum Compression for Sparse Communication. arXiv 1905.12948"
    params = {
        "ratio": Param(float, 0.01, "fraction of entries kept (one contiguous block)",
                       lo=0.0, hi=1.0, lo_open=True),
        "unbiased": Param(bool, False, "scale by n/k for an unbiased estimate (without error feedback)"),
    }

    def block(self, ctx):
        """(offset, k): the block shared by every rank at this step."""
        n = ctx.numel
        k = k_of(self.ratio, n)
        o = 0 if k >= n else rng.host_randint(ctx.seed, ctx.step, ctx.name, "rbgs", n)
        return o, k

    def compress(self, x, state, ctx):
        b, n = ctx.backend, ctx.numel
        o, k = self.block(ctx)
        if o + k <= n:
            vals = b.copy(b.slice(x, o, o + k))     # a copy: collectives may work in place
        else:
            vals = b.cat([b.slice(x, o, n), b.slice(x, 0, o + k - n)])
        if not self.unbiased:                       # decompress(own payload) = x on the block, 0 elsewhere
            ar = b.arange(k, x, "int64")
            ctx.memo["own_idx"] = (x, ar + o if o + k <= n else b.cat([b.slice(ar, 0, n - o) + o,
                                                                       b.slice(ar, n - o, k) - (n - o)]))
        return [vals], (o, k)

    def decompress(self, payload, info, ctx):
        b, n = ctx.backend, ctx.numel
        o, k = info
        v = payload[0]
        dt = b.dtype(v)
        if o + k <= n:
            parts = [b.zeros(o, dt, v) if o else None, v, b.zeros(n - o - k, dt, v) if o + k < n else None]
        else:
            head = n - o                              # v[:head] -> [o, n), v[head:] -> [0, o+k-n)
            parts = [b.slice(v, head, k), b.zeros(n - k, dt, v) if k < n else None, b.slice(v, 0, head)]
        parts = [p for p in parts if p is not None]
        out = parts[0] if len(parts) == 1 else b.cat(parts)
        return out * (n / k) if self.unbiased else out

    def ratio_of(self, numel):
        return numel / k_of(self.ratio, numel)
