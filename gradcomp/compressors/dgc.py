"""`dgc`: Deep Gradient Compression (Lin, Han, Mao, Wang, Dally, ICLR 2018), the compressor half.

Sparsification by a sampled threshold with a warm-up density schedule; the other three parts of
DGC (momentum correction, local gradient clipping, momentum factor masking) are the `dgc`
memory (gradcomp/memory/dgc.py), which is this compressor's default memory.

Selection: the top-k of |v| (v = the memory's accumulated velocity) found with TopKCompressor's
sampled-threshold mode: sample entries with the shared stream, take the matching quantile of the
sample as a threshold (times `slack`), keep the candidates above it and finish with an exact
top-k on them (exact top-k fallback if too few pass). The indices are sorted, so the payload
(values, int32 indices) is canonical and backend-independent. `values` and `indices` (OURS) are
topk's wire formats (gradcomp/compressors/sparse.py); the dense 1-D tensors stay in x's dtype.

Warm-up ("exponentially increase sparsity", Sec. 3.3), with d0 = max(init_ratio, ratio),
r = ratio, W = warmup_steps, S = stages:

    density(t) = d0 * (r / d0) ** (t / W)                    t < W, S = 0 (every step)
    density(t) = d0 * (r / d0) ** (floor(t * S / W) / S)      t < W, S > 0 (S plateaus)
    density(t) = r                                            t >= W
    k(t) = max(1, min(n, round(density(t) * n)))

The paper's ImageNet schedule (75%, 93.75%, 98.4375%, 99.6%, then 99.9% sparsity, one epoch
each) is init_ratio=0.25, ratio=0.001, stages=4, warmup_steps = 4 epochs of steps. t is the
pipeline's step, the same on every rank, so every rank sends the same k and payload sizes stay
fixed. Warm-up is on by default (warmup_steps=1000, stages=4): the schedule is counted in steps
because neither optimizer adapter knows the length of an epoch; for the paper's "4 epochs" set
warmup_steps to 4 x your steps per epoch (len(loader)); warmup_steps=0 turns it off. Warm-up steps
(density above `ratio`) are marked with ctx.memo "warmup", so that the `dgc` memory keeps the
momentum unmasked until the final density (its `masking=final`).

Tensors with at most one dimension (biases, norm scales and shifts) are sent dense (`dense_1d`,
as in the reference implementation, which compresses only tensors with more than one dimension):
payload = the whole vector, averaged; ctx.memo "dense" tells the `dgc` memory to keep their
momentum unmasked (heavy-ball momentum on the averaged gradient, the reference's treatment).
"""
import numbers

from gradcomp.compressors.sparse import k_of
from gradcomp.compressors.topk import TopKCompressor
from gradcomp.params import Param


class DGCCompressor(TopKCompressor):
    name = "dgc"
    mode = "sampled"                # TopKCompressor.select reads it; fixed for DGC
    default_memory = "dgc"
    fusion = None                   # per tensor: dense_1d and the warm-up are decided per tensor
    block = 1                       # TopKCompressor's block size: DGC selects single entries
    paper = "Lin et al. Deep Gradient Compression: Reducing the Communication Bandwidth for Distributed Training. ICLR 2018"
    params = {
        "ratio": Param(float, 0.001, "final density (fraction of entries sent)", lo=0.0, hi=1.0, lo_open=True),
        "init_ratio": Param(float, 0.25, "warm-up: density at step 0 (at least ratio)", lo=0.0, hi=1.0,
                            lo_open=True),
        "warmup_steps": Param(int, 1000, "warm-up length in steps (0 = no warm-up)", lo=0),
        "stages": Param(int, 4, "warm-up plateaus (0 = decay every step)", lo=0),
        "dense_1d": Param(bool, True, "send tensors with <= 1 dimension dense (biases, norm vectors)"),
        "sample": TopKCompressor.params["sample"],
        "slack": TopKCompressor.params["slack"],
        "values": TopKCompressor.params["values"],
        "indices": TopKCompressor.params["indices"],
    }

    def density(self, step: int) -> float:
        """The warm-up schedule: the fraction of entries sent at pipeline step `step`."""
        W = self.warmup_steps
        if W <= 0:
            return self.ratio
        if not isinstance(step, numbers.Integral):
            raise TypeError("dgc warm-up changes k with the step, so it needs an integer step (payload sizes "
                            "must be known when a graph is traced); run the step eagerly or set warmup_steps=0")
        if step >= W:
            return self.ratio
        d0 = max(self.init_ratio, self.ratio)
        t = step / W if self.stages <= 0 else (step * self.stages // W) / self.stages
        return d0 * (self.ratio / d0) ** t

    def k_at(self, step: int, numel: int) -> int:
        return k_of(self.density(step), numel)

    def compress(self, x, state, ctx):
        if self.dense_1d and len(ctx.shape) <= 1:
            ctx.memo["dense"] = True
            return [x], "dense"
        b = ctx.backend
        if self.density(ctx.step) > self.ratio:
            ctx.memo["warmup"] = True
        idx = b.sort(self.select(x, self.k_at(ctx.step, ctx.numel), ctx))
        return self.pack(x, idx, ctx), None

    def decompress(self, payload, info, ctx):
        return payload[0] if info == "dense" else super().decompress(payload, info, ctx)

    def union(self, result, info, ctx):
        return None if info == "dense" else super().union(result, info, ctx)

    def aggregate(self, gathered, info, ctx):
        if info != "dense":
            return super().aggregate(gathered, info, ctx)
        total = gathered[0][0]
        for p in gathered[1:]:
            total = total + p[0]
        return total * (1.0 / len(gathered))
