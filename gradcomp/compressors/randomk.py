"""`randomk`: keep k = ratio * n entries at shared random positions (Stich et al., NeurIPS 2018;
Wangni et al., Gradient Sparsification, NeurIPS 2018).

Positions are drawn by stratified sampling from the shared stream (seed, step, name): the
range [0, n) is cut into k strata [floor(jn/k), floor((j+1)n/k)) and one position is drawn
uniformly in each, so every rank picks the *same* k indices with no communication. Only the
values travel, and they may be summed: allreduce, payload independent of the number of workers.

    C(x) = x_I,  D(v) = s * sum_j v_j e_{I_j},  s = n/k if unbiased else 1 (use 1 with error feedback)
"""
from gradcomp import rng
from gradcomp.compressors.base import Compressor
from gradcomp.compressors.sparse import k_of
from gradcomp.params import Param


def stratified_indices(b, key, n: int, k: int, like):
    """k int64 indices, one uniform draw in each of k equal strata of [0, n)."""
    j = b.arange(k, like, "int64")
    lo = (j * n) // k
    hi = ((j + 1) * n) // k
    u = rng.hash_u32(b, key, k, like)
    return lo + b.shr(u * (hi - lo), 32)


class RandomKCompressor(Compressor):
    name = "randomk"
    summable = True
    decodes_fresh = True        # a scatter into a new array
    fusion = "correct"          # a fused bucket: k = ratio * (bucket size) strata over the bucket
    paper = "Stich, Cordonnier, Jaggi. Sparsified SGD with Memory. NeurIPS 2018"
    params = {
        "ratio": Param(float, 0.01, "fraction of entries kept", lo=0.0, hi=1.0, lo_open=True),
        "unbiased": Param(bool, False, "scale by n/k for an unbiased estimate (without error feedback)"),
    }

    def indices(self, ctx, like):
        return stratified_indices(ctx.backend, ctx.key("randomk"), ctx.numel, k_of(self.ratio, ctx.numel), like)

    def compress(self, x, state, ctx):
        idx = self.indices(ctx, x)
        if not self.unbiased:
            ctx.memo["own_idx"] = (x, idx)    # decompress(own payload) = x at idx, 0 elsewhere
        return [ctx.backend.gather(x, idx)], idx

    def decompress(self, payload, info, ctx):
        b = ctx.backend
        out = b.scatter(ctx.numel, info, payload[0])
        return out * (ctx.numel / b.numel(info)) if self.unbiased else out

    def union(self, reduced, info, ctx):
        k = k_of(self.ratio, ctx.numel)
        return k, k                   # shared indices: the aggregate's support is the k positions

    def ratio_of(self, numel):
        return numel / k_of(self.ratio, numel)
