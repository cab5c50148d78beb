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
               A zero threshold (most of x exactly zero, e.g. an embedding's rows not in the batch)
               takes the non-zero entries instead (at most 4k of them; fewer than k: the lowest-indexed
               zeros fill up to k), still the exact top-k, without the full top-k fallback.
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
block=B > 1  block top-k (ours, after the row sparsity of embedding and softmax gradients): the
              flattened tensor is cut into nb = ceil(n / B) blocks of B contiguous entries (the last one
              zero-padded), and the K = round(ratio * n / B) blocks (at least 1, at most nb) of largest
              energy ||x_block||^2 are kept, exactly (a top-K over the nb block energies):

                  C(x) = (x at the K blocks, J),  J = argtop_K ||x_j||^2,  payload 4 K (B + 1) bytes (fp32)

              One int32 index per block instead of one per entry: at the same bytes about 2 B / (B + 1)
              times as many entries as entry top-k (B = 64: 1.97x), chosen in blocks. `ratio` stays the
              fraction of entries kept, so 100x fewer bytes is ratio = 1 / (100 (1 + 1/B)). With B equal
              to an embedding's row length a block is one word's row. block=1 is entry top-k.
values=fp16|bf16, indices=planes|eliasfano|bitmap|compact (OURS, entry top-k only): the wire formats
              of gradcomp/compressors/sparse.py (2-byte values; scalecom's index codes), defaults
              native (x's dtype, int32 indices). At 2-byte values and compact indices (about 1 byte
              per index at k/n ~ 1%) an entry costs about 3 bytes instead of 8, so the same bytes
              carry about 2.6x as many entries; with fp16/bf16 values the residual keeps the rounding
              error (error feedback subtracts the decode of the rounded values).
Indices are sent sorted (ascending): the payload bytes are the same on every backend.
Not summable (each rank picks its own indices): payloads are allgathered.
"""
from gradcomp import rng
from gradcomp.compressors.sparse import (INDEX_FORMATS, WIRE_VALUES, SparseCompressor, index_dtype,
                                         index_nbytes, k_of, value_bytes)
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
        "block": Param(int, 1, "entries per selected block (1: entries; B > 1: blocks of B contiguous entries "
                       "by energy, one index per block)", lo=1),
        "values": Param(str, "native", "dtype of the sent values (native: the gradient's; OURS)",
                        choices=tuple(WIRE_VALUES)),
        "indices": Param(str, "native", "index format (native: int32; else scalecom's codes, compact: the "
                         "smallest for n, k; OURS)", choices=INDEX_FORMATS),
    }

    @property
    def fusion(self):
        return "correct" if self.scope == "bucket" else None

    def select(self, x, k, ctx):
        """Sorted int64 indices of the k largest |x| (exact, or by the sampled threshold)."""
        b, n = ctx.backend, ctx.numel
        s = max(int(self.sample * n), (128 * n) // k, 2048)
        mode = self.mode if self.mode != "auto" else ("sampled" if b.on_host(x) else "exact")
        if mode == "exact" or n < 65536 or 4 * s > n or b.traced():
            return b.sort(b.topk_abs(x, k))
        sidx = rng.randint(b, ctx.key("topk-sample"), s, n, x)
        ks = max(1, int(round(k * s / n)))
        thr = b.cast(b.kth_largest_abs(b.gather(x, sidx), ks), b.dtype(x)) * self.slack
        if float(b.item(thr)) == 0.0:  # most of x is zero (an embedding's rows): |x| >= 0 is all of x
            idx = self._mostly_zero(b, x, k, n)       # (this path reads the candidates' count anyway)
            if idx is not None:
                return idx
            return b.sort(b.topk_abs(x, k))
        cand = b.abs_ge_indices(x, thr)
        m = b.numel(cand)
        if m < k or 4 * m > n:         # the estimate overshot, or selects nearly everything: exact
            return b.sort(b.topk_abs(x, k))
        if m > k:
            cand = b.gather(cand, b.topk_abs(b.gather(x, cand), k))
        return b.sort(cand)

    @staticmethod
    def _mostly_zero(b, x, k, n):
        """The top-k of an x with at most 4k non-zero entries (row-sparse gradients: an embedding's
        rows not in the batch are exactly zero, so the sample's threshold is 0 and the general path
        would fall back to a full top-k): every non-zero entry, and when there are fewer than k, the
        lowest-indexed zeros to fill k (the same choice on every backend). None if x is not that sparse."""
        tiny = 5e-324 if b.dtype(x) == "float64" else 1e-45        # |x| >= tiny  <=>  x != 0
        nz = b.abs_ge_indices(x, tiny)
        z = b.numel(nz)
        if z > 4 * k:
            return None
        if z >= k:
            return b.sort(b.gather(nz, b.topk_abs(b.gather(x, nz), k)) if z > k else nz)
        head = b.slice(x, 0, min(n, k + z))                 # holds at least k zeros
        zeros = b.slice(b.nonzero(b.abs(head) < tiny), 0, k - z)
        return b.sort(b.cat([nz, zeros]))

    def blocks(self, n: int) -> tuple[int, int]:
        """(nb, K): blocks of `block` entries covering n entries, and blocks kept."""
        nb = -(-n // self.block)
        return nb, max(1, min(nb, int(round(self.ratio * n / self.block))))

    def compress(self, x, state, ctx):
        if self.block > 1:
            if self.values != "native" or self.indices != "native":
                raise ValueError("topk: values= and indices= apply to entry top-k (block=1) only")
            return self.compress_blocks(x, ctx), None
        k = k_of(self.ratio, ctx.numel)
        return self.pack(x, self.select(x, k, ctx), ctx), None

    # ------------------------------------------------------------------ block top-k
    def _flat(self, b, blk, like):
        """Entry indices (int64, block-major) of the blocks `blk`."""
        width = self.block
        starts = b.reshape(b.cast(blk, "int64") * width, (-1, 1))
        return b.reshape(starts + b.reshape(b.arange(width, like), (1, width)), (-1,))

    def compress_blocks(self, x, ctx):
        b, n, width = ctx.backend, ctx.numel, self.block
        nb, keep = self.blocks(n)
        xp = b.pad_to(x, nb * width)
        energy = b.rowsum(b.reshape(xp * xp, (nb, width)))
        blk = b.sort(b.topk_abs(energy, keep))
        flat = self._flat(b, blk, x)
        if nb * width == n:
            ctx.memo["sent_idx"] = flat        # lets dgc's memory mask in O(k); else it uses the decode
        else:
            ctx.memo.pop("sent_idx", None)
        return [b.gather(xp, flat), b.cast(blk, index_dtype(nb))]

    def _scatter_blocks(self, b, vals, blk, n, add: bool):
        nb = -(-n // self.block)
        flat = self._flat(b, blk, vals)
        out = (b.scatter_add if add else b.scatter)(nb * self.block, flat, vals)
        return out if nb * self.block == n else b.slice(out, 0, n)

    def decompress(self, payload, info, ctx):
        if self.block == 1:
            return super().decompress(payload, info, ctx)
        vals, blk = payload
        return self._scatter_blocks(ctx.backend, vals, blk, ctx.numel, add=False)

    def aggregate(self, gathered, info, ctx):
        if self.block == 1:
            return super().aggregate(gathered, info, ctx)
        b = ctx.backend
        vals = b.cat([p[0] for p in gathered])
        blk = b.cat([b.cast(p[1], "int64") for p in gathered])
        return self._scatter_blocks(b, vals, blk, ctx.numel, add=True) * (1.0 / len(gathered))

    def union(self, gathered, info, ctx):
        """Distinct entries over all ranks' blocks (the zero padding of a last partial block excluded),
        and the mean entries kept per rank."""
        if self.block == 1:
            return super().union(gathered, info, ctx)
        b, n = ctx.backend, ctx.numel
        ones = [b.zeros(b.numel(p[0]), "float32", p[0]) + 1.0 for p in gathered]
        hits = self._scatter_blocks(b, b.cat(ones), b.cat([b.cast(p[1], "int64") for p in gathered]), n, add=True)
        kept = sum(b.numel(p[0]) for p in gathered) / len(gathered)
        kept = min(float(n), kept)
        return b.sum(b.cast(b.greater_equal(hits, 0.5), "float32")), kept

    def ratio_of(self, numel):
        if self.block > 1:
            _, keep = self.blocks(numel)
            return 4 * numel / (4 * keep * (self.block + 1))
        k = k_of(self.ratio, numel)
        return 4 * numel / (k * value_bytes(self.values) + index_nbytes(numel, k, self.indices))
