"""`gtopk`: global top-k of the summed sparse gradients (Shi, Wang, Cai, Li, Chu, Wang, Liu, Chu: A
Distributed Synchronous SGD Algorithm with Global Top-k Sparsification for Low Bandwidth Networks,
ICDCS 2019).

Each rank r selects its local top-k (values x_r[I_r], indices I_r; k = ratio * n). A merge of two
sparse sets A, B (k entries each) is

    M(A, B) = the k entries of largest |A + B| on the union of their supports
              (exact ties to the lower index; the values summed where both have an entry)

merge=tree (default): the paper's pairwise merge. With m = 2^floor(log2 P): ranks m..P-1 first
  send their set to rank r - m, which merges it; then log2 m levels where rank r exchanges its
  current set with rank r XOR 2^j and both keep M(own, partner's); finally ranks r < P - m send the
  result to r + m. Every rank ends with the same k entries G (the sum of the ranks' values that
  survived every merge on their way), and the average is G / P (U/k = 1). The exchange at each
  level is the paper's tree (rank r merging rank r + 2^j's set) run on both partners at once
  (recursive doubling: this schedule is ours; the merged result is the paper's tree's), so no
  broadcast of the result is needed: per rank, log2 m (+2 at
  non-powers of two) messages of k (index, value) pairs instead of the (P-1) payloads of an
  allgather. Messages go by `Communicator.sendrecv`; on a transport without point-to-point
  (`native_sendrecv = False`: Horovod) each level runs as an allgather and stats() counts that.
merge=allgather: the local top-k payloads are allgathered as `topk` does and G is the exact global
  top-k of their sum (every rank's values at the selected indices): the tree re-selects a top-k at
  every level, so it approximates this.

Error feedback (the paper's put-back of gTop-k's residual): a rank's value counts as sent only if it
reached G, i.e. its index survived every merge on the rank's path (tree: tracked level by level,
for a folded rank by its partner, which sends the survival flags back with the result; allgather:
the index is in G). With `residual` memory everything else it selected stays in its residual.

Contract for drivers other than GradientSync: run `exchange` (tree) or `aggregate` of the
allgathered payloads (the exact global top-k, whatever `merge` says) before decoding this rank's own
payload (the survival recorded there restricts the local decode).

`values` and `indices` (OURS): topk's wire formats (gradcomp/compressors/sparse.py) for the local
payloads and every tree message: values cast to fp16 / bf16 for the wire and merged in x's dtype,
indices in scalecom's codes (k is fixed, so every message's size is known). A rank's own rounding
error stays in its residual (its own decode is its rounded values at the surviving indices); the
rounding of the merged sums on later levels is not fed back.
"""
from __future__ import annotations

from gradcomp.comm.base import DoneHandle, Handle
from gradcomp.compressors.sparse import WIRE_VALUES, index_dtype, index_nbytes, k_of
from gradcomp.compressors.topk import TopKCompressor
from gradcomp.params import Param
from gradcomp.traffic import ring_allgather


def merge_sets(b, n: int, k: int, a, c):
    """M(a, c) for two sparse sets (values, int64 indices) of one tensor of n entries: the k entries
    of largest |sum| on the union of the supports, indices sorted; exact ties go to the lower index
    and a union entry that sums to zero still beats an entry outside the union (the same on every
    backend, and the same on both partners: the sum of two values does not depend on their order)."""
    idx = b.cat([a[1], c[1]])
    total = b.scatter_add(n, idx, b.cat([a[0], c[0]]))
    hits = b.scatter_add(n, idx, b.zeros(b.numel(idx), "float64", idx) + 1.0)
    mag = b.abs(b.cast(total, "float64")) + b.cast(b.greater_equal(hits, 0.5), "float64") * 1e-30
    ramp = b.cast(n - b.arange(n, total, "int64"), "float64") * (1e-12 / n)
    keep = b.sort(b.topk_abs(mag + mag * ramp, min(k, n)))
    return b.gather(total, keep), keep


def _alive(b, n, keep, mine, alive):
    """alive * [each of `mine`'s indices is in `keep`]"""
    inset = b.scatter(n, keep, b.zeros(b.numel(keep), "float32", keep) + 1.0)
    return alive * b.gather(inset, mine)


class _TreeHandle(Handle):
    """Runs the merge levels on wait(); the result is one [values, indices] list per entry."""

    def __init__(self, comp, comm, items, tag):
        self.comp, self.comm, self.items, self.tag = comp, comm, items, tag
        self._value = None

    def wait(self):
        if self._value is None:
            self._value = self.comp._tree(self.comm, self.items, self.tag)
        return self._value


class GTopKCompressor(TopKCompressor):
    name = "gtopk"
    paper = ("Shi et al. A Distributed Synchronous SGD Algorithm with Global Top-k Sparsification for Low "
             "Bandwidth Networks. ICDCS 2019")
    block = 1                       # TopKCompressor's block size: gtopk merges single entries
    params = {**{k: v for k, v in TopKCompressor.params.items() if k != "block"},
              "merge": Param(str, "tree", "tree: the paper's pairwise merge (O(k log P)); allgather: exact "
                             "global top-k of the allgathered local top-k (O(k P))", choices=("tree", "allgather"))}

    @property
    def exchanges(self):
        """True: the pipeline hands the payloads to `exchange` instead of an allgather."""
        return self.merge == "tree"

    @property
    def traffic_model(self):
        return "tree" if self.merge == "tree" else "allgather"

    def compress(self, x, state, ctx):
        k = k_of(self.ratio, ctx.numel)
        return self.pack(x, self.select(x, k, ctx), ctx), {"k": k}

    # ------------------------------------------------------------------ merge=allgather
    def aggregate(self, gathered, info, ctx):
        b, n = ctx.backend, ctx.numel
        if info.get("merged"):               # after exchange(): gathered is the merged result G
            return b.scatter(n, b.cast(gathered[1], "int64"), gathered[0]) * (1.0 / ctx.size)
        vals = self.payload_values(b.cat([p[0] for p in gathered]), ctx)
        idx = b.cat([self.payload_indices(p, ctx) for p in gathered])
        total = b.scatter_add(n, idx, vals)
        # Exact ties (e.g. two ranks' entries of equal size) go to the lower index on every backend: a
        # ramp of relative size < 1e-12 (far below float32's 6e-8 spacing) orders equal magnitudes only.
        mag = b.abs(b.cast(total, "float64"))
        ramp = b.cast(n - b.arange(n, total, "int64"), "float64") * (1e-12 / n)
        keep = b.topk_abs(mag + mag * ramp, info["k"])
        mask = b.scatter(n, keep, b.zeros(info["k"], b.dtype(total), total) + 1.0)
        info["mask"] = mask
        return total * mask * (1.0 / len(gathered))

    # ------------------------------------------------------------------ merge=tree
    def exchange(self, comm, entries, tag: str) -> Handle:
        """Start the tree merge of `entries` [(payload, info, ctx), ...] (one bucket, merged in one
        message per level); wait() gives each entry's merged [values, indices]."""
        if comm.size == 1:
            for payload, info, ctx in entries:
                info.update(mask=None, wire=(0, 0), merged=True)
            return DoneHandle([list(p) for p, _, _ in entries])
        return _TreeHandle(self, comm, entries, tag)

    def _tree(self, comm, entries, tag):
        P, r = comm.size, comm.rank
        m = 1 << (P.bit_length() - 1)
        extra = P - m
        b = entries[0][2].backend
        sets, own, alive, ealive, eown = [], [], [], [None] * len(entries), [None] * len(entries)
        wire = WIRE_VALUES[self.values]
        for payload, info, ctx in entries:
            idx = self.payload_indices(payload, ctx)
            sets.append((self.payload_values(payload[0], ctx), idx))     # fp16 on the wire: merged in x's dtype
            own.append(idx)
            alive.append(b.zeros(b.numel(idx), "float32", sets[-1][0]) + 1.0)
            info["wire"] = [0, 0]
        meta = [(ctx.numel, info["k"], b.dtype(v)) for (v, _), (_, info, ctx) in zip(sets, entries)]

        def nbytes(flags=False):
            return [k * (b.nbytes(b.zeros(1, wire or dt, sets[0][0]))) + index_nbytes(n, k, self.indices) +
                    (k if flags else 0) for n, k, dt in meta]

        def pack(cur, flags=None):
            parts = []
            for j, ((v, i), (n, _, _)) in enumerate(zip(cur, meta)):
                parts += [b.to_bytes(b.cast(v, wire) if wire else v), b.to_bytes(self.encode_idx(b, i, n))]
                if flags is not None:
                    parts.append(b.to_bytes(b.cast(flags[j], "uint8")))
            return b.cat(parts)

        def unpack(buf, flags=False):
            out, fl, off = [], [], 0
            for n, k, dt in meta:
                vb = b.nbytes(b.zeros(k, wire or dt, sets[0][0]))
                ib = index_nbytes(n, k, self.indices)
                v = b.from_bytes(b.slice(buf, off, off + vb), wire or dt, (-1,))
                v = b.cast(v, dt) if wire else v
                code = b.slice(buf, off + vb, off + vb + ib)
                i = self.decode_idx(b, b.from_bytes(code, index_dtype(n), (-1,)) if self.indices == "native"
                                    else code, n, k)
                off += vb + ib
                if flags:
                    fl.append(b.cast(b.slice(buf, off, off + k), "float32"))
                    off += k
                out.append((v, i))
            return out, fl

        def step(level, dest, source, cur, flags=None, recv_flags=False):
            """One sendrecv of the whole bucket; counts each entry's bytes (sent, received)."""
            msg = pack(cur, flags) if dest is not None else b.zeros(0, "uint8", sets[0][0])
            sizes = nbytes(level == "unfold")             # every unfold message carries the flags
            total = sum(sizes)
            h = comm.sendrecv(msg, dest=dest, source=source, count=total if source is not None else None,
                              name=f"{tag}.merge{level}")
            got = h.wait()
            roles = self._roles(P, level)
            for (_, info, _), s in zip(entries, sizes):
                if comm.native_sendrecv:
                    info["wire"][0] += s if dest is not None else 0
                    info["wire"][1] += s if source is not None else 0
                else:                       # an allgather: every rank receives every message
                    sent, recv = ring_allgather([s if d is not None else 0 for d, _ in roles], r)
                    info["wire"][0] += sent
                    info["wire"][1] += recv
            return None if got is None else unpack(got, recv_flags)

        cur = list(sets)
        if extra:                                           # fold: ranks m.. into ranks 0..extra-1
            got = step("fold", r - m if r >= m else None, r + m if r < extra else None, cur)
            if got is not None:
                theirs = got[0]
                for j, (n, k, _) in enumerate(meta):
                    cur[j] = merge_sets(b, n, k, cur[j], theirs[j])
                    alive[j] = _alive(b, n, cur[j][1], own[j], alive[j])
                    eown[j] = theirs[j][1]
                    ealive[j] = _alive(b, n, cur[j][1], eown[j], b.zeros(b.numel(eown[j]), "float32", eown[j]) + 1.0)
        for lv in range(m.bit_length() - 1):
            peer = r ^ (1 << lv) if r < m else None
            got = step(lv, peer, peer, cur)
            if got is not None:
                for j, (n, k, _) in enumerate(meta):
                    cur[j] = merge_sets(b, n, k, cur[j], got[0][j])
                    alive[j] = _alive(b, n, cur[j][1], own[j], alive[j])
                    if ealive[j] is not None:
                        ealive[j] = _alive(b, n, cur[j][1], eown[j], ealive[j])
        if extra:                                           # unfold: the result and the survival flags
            flags = ealive if r < extra else None
            got = step("unfold", r + m if r < extra else None, r - m if r >= m else None, cur,
                       flags=flags, recv_flags=r >= m)
            if got is not None:
                cur, alive = got
        out = []
        for (payload, info, ctx), (v, i), a in zip(entries, cur, alive):
            n = ctx.numel
            info["mask"] = b.scatter_add(n, own[len(out)], b.cast(a, b.dtype(v)))    # 1 where own survived
            info["wire"], info["merged"] = tuple(info["wire"]), True
            out.append([v, i])
        return out

    @staticmethod
    def _roles(P, level):
        """[(dest, source)] of every rank in the sendrecv of `level` ('fold', 0.., 'unfold')."""
        m = 1 << (P.bit_length() - 1)
        extra = P - m
        if level == "fold":
            return [(q - m if q >= m else None, q + m if q < extra else None) for q in range(P)]
        if level == "unfold":
            return [(q + m if q < extra else None, q - m if q >= m else None) for q in range(P)]
        return [((q ^ (1 << level)),) * 2 if q < m else (None, None) for q in range(P)]

    def decompress(self, payload, info, ctx):
        own = super().decompress(payload, info, ctx)
        mask = info.get("mask") if isinstance(info, dict) else None
        return own if mask is None else own * mask

    def union(self, result, info, ctx):
        return info["k"], info["k"]

    def sent_indices(self, x, ctx):
        return None                   # the own decode is masked by the global selection
