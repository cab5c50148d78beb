"""`scalecom`: cyclic local top-k, one leader's indices used by every rank (Chen, Ni, Venkataramani,
Zhang, Srinivasan, Gopalakrishnan, Wang, Kailkhura, Sun, Schlesinger, ScaleCom: Scalable Sparsified
Gradient Compression for Communication-Efficient Distributed Training, NeurIPS 2020).

For one tensor at step t, with P ranks and k = ratio * n:

    leader    l = (t + crc32(name)) mod P        the same on every rank, cycles through the ranks
                                                  (the name offset spreads leaders over tensors)
    round 1:  the leader sends its sorted top-k indices I of |x_l| (x = memory-compensated gradient),
              every other rank sends zeros of the same size; allreduce = the leader's indices on all
    round 2:  every rank sends x_r[I] (k values); allreduce sums them
    decode:   D(v) = sum_j v_j e_{I_j}            linear: the average is D(sum_r x_r[I]) / P

With L = 1 (the paper) the union is exactly k (U/k = 1). With `leaders` = L > 1 (OURS, not in the
paper) the leaders are l, l+1, ..., l+L-1 (mod P); k is split into L near-equal slots, leader i sends
its top-k_i indices in slot i, and round 2 sends the values at the union of the slots (duplicates
removed, so U <= k): several ranks' largest entries get through every step instead of one rank's.
Both rounds are summable, so the traffic is independent of P apart from the ring factor 2 (P-1)/P.
Indices travel as `ceil(log2(n) / 8)` bytes each (uint8 planes: 2 bytes for tensors under 65536
entries, 3 under 2**24), which an allreduce delivers exactly because only the slot owner's bytes
are non-zero. The index round is a broadcast carried by allreduce (what the pipeline's summable path
issues); a dedicated broadcast would move about half as many index bytes per rank, and the traffic
model (benchmarks/traffic_model.py) shows both.

Default memory: `lowpass` with beta = 1, i.e. plain error feedback; ScaleCom's filter is
`memory="lowpass:beta=B"` with B in (0, 1) (docs/benchmarks.md compares them). Not traceable inside tf.function (the leader depends on the step as a Python number): gradcomp_tf runs
it on the eager island path.
"""
from __future__ import annotations

import zlib

from gradcomp.compressors.base import Compressor
from gradcomp.compressors.sparse import k_of
from gradcomp.params import Param


def index_bytes(n: int) -> int:
    """Bytes per index for a tensor of n entries: enough for n - 1, at least 1."""
    return max(1, (max(n - 1, 1).bit_length() + 7) // 8)


def pack_indices(b, idx, n: int):
    """int64 indices -> uint8 array of index_bytes(n) planes (least significant plane first)."""
    planes = [b.cast(b.band(b.shr(idx, 8 * j), 255), "uint8") for j in range(index_bytes(n))]
    return b.cat(planes) if len(planes) > 1 else planes[0]


def unpack_indices(b, packed, n: int, k: int):
    """Inverse of pack_indices for k indices."""
    out = None
    for j in range(index_bytes(n)):
        plane = b.cast(b.slice(packed, j * k, (j + 1) * k), "int64")
        plane = b.shl(plane, 8 * j) if j else plane
        out = plane if out is None else b.bor(out, plane)
    return out


def leader_of(step: int, name: str, size: int) -> int:
    """The rank whose top-k indices every rank uses for tensor `name` at `step`."""
    return (int(step) + zlib.crc32(name.encode())) % max(1, int(size))


class ScaleComCompressor(Compressor):
    name = "scalecom"
    summable = True
    rounds = 2
    graph_safe = False
    default_memory = "lowpass"
    paper = "Chen et al. ScaleCom: Scalable Sparsified Gradient Compression. NeurIPS 2020"
    params = {
        "ratio": Param(float, 0.01, "fraction of entries kept (the leaders' top-k)", lo=0.0, hi=1.0, lo_open=True),
        "leaders": Param(int, 1, "ranks whose top indices are used (1: ScaleCom; more: ours, k split over them)",
                         lo=1),
    }

    def slots(self, k: int, size: int) -> list[int]:
        """Index slots of the leaders: k split into min(leaders, size) near-equal parts."""
        nl = max(1, min(self.leaders, size))
        return [k // nl + (1 if i < k % nl else 0) for i in range(nl)]

    def compress(self, x, state, ctx):
        b, n = ctx.backend, ctx.numel
        k = k_of(self.ratio, n)
        lead = leader_of(ctx.step, ctx.name, ctx.size)
        slots = self.slots(k, ctx.size)
        pos = (ctx.rank - lead) % max(1, ctx.size)         # leaders are lead, lead + 1, ... (cyclic)
        if pos < len(slots) and slots[pos]:
            mine = b.sort(b.topk_abs(x, slots[pos]))
            off = sum(slots[:pos])
            parts = ([b.zeros(off, "int64", x)] if off else []) + [mine] + \
                ([b.zeros(k - off - slots[pos], "int64", x)] if k - off - slots[pos] else [])
            packed = pack_indices(b, b.cat(parts) if len(parts) > 1 else mine, n)
        else:
            packed = b.zeros(k * index_bytes(n), "uint8", x)
        return [packed], {"x": x, "k": k, "leader": lead}

    def next_round(self, reduced, info, state, ctx):
        b, n = ctx.backend, ctx.numel
        idx = unpack_indices(b, reduced[0], n, info["k"])
        if len(self.slots(info["k"], ctx.size)) > 1:      # several leaders may pick the same index: dedup
            hits = b.scatter_add(n, idx, b.zeros(info["k"], "float32", idx) + 1.0)
            idx = b.nonzero(b.greater_equal(hits, 0.5))
        info["idx"] = idx
        return [b.gather(info.pop("x"), idx)], info

    def decompress(self, payload, info, ctx):
        return ctx.backend.scatter(ctx.numel, info["idx"], payload[0])

    def union(self, reduced, info, ctx):
        return ctx.backend.numel(info["idx"]), info["k"]

    def ratio_of(self, numel):
        k = k_of(self.ratio, numel)
        return 4 * numel / (k * (4 + index_bytes(numel)))
