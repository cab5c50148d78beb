"""`gtopk`: global top-k of the summed sparse gradients (Shi, Wang, Cai, Li, Chu, Wang, Liu, Chu: A
Distributed Synchronous SGD Algorithm with Global Top-k Sparsification for Low Bandwidth Networks,
ICDCS 2019).

Each rank r selects its local top-k (values x_r[I_r], indices I_r; k = ratio * n). The update is the
global top-k of their sum:

    S      = sum_r D(x_r[I_r], I_r)                 (the summed sparse vectors, support = union)
    J      = argtop_k |S|                            (the same on every rank)
    avg    = S[J] e_J / P                            (exactly k non-zero entries: U/k = 1)
    local  = D(x_r[I_r], I_r) restricted to J        (what this rank's memory counts as sent)

so with `residual` memory a rank keeps in its residual both what it did not select and its selected
values that did not make the global top-k (the paper's put-back of gTop-k's residual).

What travels today: the Communicator offers allreduce / allgather / broadcast, not point-to-point,
and a tree merge cannot be built from them at O(k log P) traffic (every allgather or broadcast
delivers all P payloads to every rank). So the local top-k payloads are allgathered, exactly as
`topk` does: each rank receives (P - 1) payloads, and stats() reports that. The paper's pairwise tree
merge (log2 P levels of merging k pairs, then a broadcast of the k winners) would move
2 ceil(log2 P) k pairs on the critical path; benchmarks/traffic_model.py models gtopk with that
algorithm (`traffic_model = "tree"`) beside what runs now. The tree re-selects a top-k at every
level, so its result approximates the exact global top-k of the sum that is computed here.

Contract for drivers other than GradientSync: call `aggregate` before decoding this rank's own
payload (the global selection J recorded there restricts the local decode).
"""
from __future__ import annotations

from gradcomp.compressors.sparse import k_of
from gradcomp.compressors.topk import TopKCompressor


class GTopKCompressor(TopKCompressor):
    name = "gtopk"
    traffic_model = "tree"
    paper = ("Shi et al. A Distributed Synchronous SGD Algorithm with Global Top-k Sparsification for Low "
             "Bandwidth Networks. ICDCS 2019")
    params = {k: v for k, v in TopKCompressor.params.items()}

    def compress(self, x, state, ctx):
        k = k_of(self.ratio, ctx.numel)
        return self.pack(x, self.select(x, k, ctx), ctx), {"k": k}

    def aggregate(self, gathered, info, ctx):
        b, n = ctx.backend, ctx.numel
        vals = b.cat([p[0] for p in gathered])
        idx = b.cast(b.cat([p[1] for p in gathered]), "int64")
        total = b.scatter_add(n, idx, vals)
        # Exact ties (e.g. two ranks' entries of equal size) go to the lower index on every backend: a
        # ramp of relative size < 1e-12 (far below float32's 6e-8 spacing) orders equal magnitudes only.
        mag = b.abs(b.cast(total, "float64"))
        ramp = b.cast(n - b.arange(n, total, "int64"), "float64") * (1e-12 / n)
        keep = b.topk_abs(mag + mag * ramp, info["k"])
        mask = b.scatter(n, keep, b.zeros(info["k"], b.dtype(total), total) + 1.0)
        info["mask"] = mask
        return total * mask * (1.0 / len(gathered))

    def decompress(self, payload, info, ctx):
        own = super().decompress(payload, info, ctx)
        mask = info.get("mask") if isinstance(info, dict) else None
        return own if mask is None else own * mask

    def union(self, gathered, info, ctx):
        return info["k"], info["k"]

    def sent_indices(self, x, ctx):
        return None                   # the own decode is masked by the global selection
