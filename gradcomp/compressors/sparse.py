"""Shared code of sparsifying compressors: payload = [values, indices], decoded by scatter.

Indices travel as int32 when the tensor has fewer than 2**31 elements (int64 otherwise).
Aggregation scatters every rank's (index, value) pairs into one dense buffer in a single
pass (`scatter_add`), never one dense decode per rank, and scales that buffer in place.
`pack` records (x, indices) in ctx.memo["own_idx"]: this rank's own decoded payload is x at
those indices and zero elsewhere, which lets error feedback compute x - D(C(x)) by zeroing
them in x (Compressor.sent_indices) instead of decoding and subtracting.
"""
from gradcomp.compressors.base import Compressor


def index_dtype(n: int) -> str:
    return "int32" if n < 2**31 else "int64"


def k_of(ratio: float, n: int) -> int:
    """Number of elements kept: round(ratio * n), at least 1 and at most n."""
    return max(1, min(n, int(round(ratio * n))))


class SparseCompressor(Compressor):
    summable = False

    def pack(self, x, idx, ctx):
        b = ctx.backend
        ctx.memo["sent_idx"] = idx            # int64: lets a memory mask what was sent in O(k) (dgc)
        ctx.memo["own_idx"] = (x, idx)        # decompress(own payload) = x at idx, 0 elsewhere
        return [b.gather(x, idx), b.cast(idx, index_dtype(ctx.numel))]

    def decompress(self, payload, info, ctx):
        b = ctx.backend
        vals, idx = payload
        return b.scatter(ctx.numel, b.cast(idx, "int64"), vals)

    def aggregate(self, gathered, info, ctx):
        b = ctx.backend
        vals = b.cat([p[0] for p in gathered])
        idx = b.cast(b.cat([p[1] for p in gathered]), "int64")
        return b.scale_(b.scatter_add(ctx.numel, idx, vals), 1.0 / len(gathered))   # a fresh buffer

    def union(self, gathered, info, ctx):
        """(distinct indices over all ranks' payloads, mean entries per rank); a tensor sent dense
        counts all its n entries."""
        b = ctx.backend
        if any(len(p) < 2 for p in gathered):        # sent dense (dgc's 1-D tensors): all n entries
            return ctx.numel, ctx.numel
        idx = [p[1] for p in gathered]
        kept = sum(b.numel(i) for i in idx) / len(idx)
        idx = b.cast(b.cat(idx), "int64")
        if not b.numel(idx):
            return 0, kept
        return b.count_distinct(ctx.numel, idx), kept
