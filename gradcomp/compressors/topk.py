"""`topk`: keep the k = ratio * n largest-magnitude entries (Aji & Heafield 2017; Stich et al.,
Sparsified SGD with Memory, NeurIPS 2018; Lin et al., Deep Gradient Compression, ICLR 2018).

    C(x) = (x_I, I),  I = argtop_k |x_i|,   D(v, I) = sum_i v_i e_I(i)

mode=auto    (default) sampled on a CPU, exact on an accelerator: the faster of the two on each in the
             kernel tables of docs/benchmarks.md part 1 (CPU: sampled several times faster than
             exact; CUDA: torch.topk is faster than the extra passes of the sampled mode).
mode=exact   selects with the backend's top-k (torch.topk, tf.math.top_k, numpy argpartition).
mode=sampled DGC's sampled threshold (Lin et al. 2018, sec. 3.4), made exact in the common case:
               1. draw s = max(sample * n, 128 n / k, 2048) entries at random positions, shared
                  (seed, step, name) randomness;
               2. t = slack * (the k s/n-th largest |x| of the sample): an estimate of the k-th
                  largest |x|, lowered by `slack` so that it almost surely undershoots it;
               3. C = {i : |x_i| >= t}, one streaming pass over x (backend `abs_ge_indices`);
               4. I = the k largest |x_C| (an exact top-k over the ~k / slack^a candidates).
             I is exactly the top-k whenever |C| >= k, which the slack makes nearly certain; if the
             sample overshoots (|C| < k) or t is useless (|C| > n/4, e.g. mostly zeros) it falls back
             to the exact selection, so the payload always has exactly k entries. Cost: one read of
             x plus O(s + |C|) work, against the O(n log k) of a full top-k. Tensors too small to
             gain (n < 65536, or s > n/4) and traced TF graphs use the exact path.
scope=tensor  k = ratio * n per tensor (each tensor sends its own top ratio).
scope=bucket  the pipeline fuses a bucket (gradcomp/fusion.py) and keeps the k = ratio * (bucket
              size) largest entries of the whole bucket: a global top-k, so a layer of small
              gradients may send nothing for a while (its residual keeps it) and one with large
              gradients more; one selection per bucket instead of one per tensor.
Indices are sent sorted (ascending): the payload bytes are the same on every backend.
Not summable (each rank picks its own indices): payloads are allgathered.
"""
from gradcomp import rng
from gradcomp.compressors.sparse import SparseCompressor, k_of
from gradcomp.params import Param


class TopKCompressor(SparseCompressor):
    name = "topk"
    paper = "Stich, Cordonnier, Jaggi. Sparsified SGD with Memory. NeurIPS 2018"
    params = {
        "ratio": Param(float, 0.01, "fraction of entries kept", lo=0.0, hi=1.0, lo_open=True),
        "mode": Param(str, "auto", "selection algorithm (auto: sampled on a CPU, exact on an accelerator)",
                      choices=("auto", "exact", "sampled")),
        "sample": Param(float, 0.01, "sampled mode: fraction of entries sampled", lo=0.0, hi=1.0, lo_open=True),
        "slack": Param(float, 0.8, "sampled mode: threshold multiplier (<1 keeps more candidates)",
                       lo=0.0, hi=1.0, lo_open=True),
        "scope": Param(str, "tensor", "top-k per tensor, or over each fused bucket", choices=("tensor", "bucket")),
    }

    @property
    def fusion(self):
        return "correct" if self.scope == "bucket" else None

    def select(self, x, k, ctx):
        """Sorted int64 indices of the k largest |x| (exact, or by the sampled threshold)."""
        b, n = ctx.backend, ctx.numel
        s = max(int(self.sample * n), (128 * n) // k, 2048)
        mode = self.mode if self.mode != "auto" else ("sampled" if b.device(x) == "cpu" else "exact")
        if mode == "exact" or n < 65536 or 4 * s > n or b.traced():
            return b.sort(b.topk_abs(x, k))
        sidx = rng.randint(b, ctx.key("topk-sample"), s, n, x)
        ks = max(1, int(round(k * s / n)))
        thr = b.cast(b.kth_largest_abs(b.gather(x, sidx), ks), b.dtype(x)) * self.slack
        cand = b.abs_ge_indices(x, thr)
        m = b.numel(cand)
        if m < k or 4 * m > n:         # the estimate overshot, or selects nearly everything: exact
            return b.sort(b.topk_abs(x, k))
        if m > k:
            cand = b.gather(cand, b.topk_abs(b.gather(x, cand), k))
        return b.sort(cand)

    def compress(self, x, state, ctx):
        k = k_of(self.ratio, ctx.numel)
        return self.pack(x, self.select(x, k, ctx), ctx), None

    def ratio_of(self, numel):
        return 4 * numel / (k_of(self.ratio, numel) * 8)
