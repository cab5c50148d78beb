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

The union of the selections is exactly k (U/k = 1), and both rounds are summable, so the traffic is
independent of P apart from the ring factor 2 (P-1)/P. Indices travel as `ceil(log2(n) / 8)` bytes
each (uint8 planes: 2 bytes for tensors under 65536 entries, 3 under 2**24), which an allreduce
delivers exactly because only the leader's bytes are non-zero. The index round is a broadcast carried
by allreduce (what the pipeline's summable path issues); a dedicated broadcast would move
about half as many index bytes per rank, and the traffic model (benchmarks/traffic_model.py) shows both.

Default memory: `lowpass` (ScaleCom's low-pass filtered error feedback, beta set there; beta=1 is
plain error feedback). Not traceable inside tf.function (the leader depends on the step as a Python
number): gradcomp_tf runs it on the eager island path.
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
    default_memory = "lowpass:beta=1.0"
    paper = "Chen et al. ScaleCom: Scalable Sparsified Gradient Compression. NeurIPS 2020"
    params = {"ratio": Param(float, 0.01, "fraction of entries kept (the leader's top-k)", lo=0.0, hi=1.0,
                             lo_open=True)}

    def compress(self, x, state, ctx):
        b, n = ctx.backend, ctx.numel
        k = k_of(self.ratio, n)
        lead = leader_of(ctx.step, ctx.name, ctx.size)
        if ctx.rank == lead:
            packed = pack_indices(b, b.sort(b.topk_abs(x, k)), n)
        else:
            packed = b.zeros(k * index_bytes(n), "uint8", x)
        return [packed], {"x": x, "k": k, "leader": lead}

    def next_round(self, reduced, info, state, ctx):
        b = ctx.backend
        idx = unpack_indices(b, reduced[0], ctx.numel, info["k"])
        info["idx"] = idx
        return [b.gather(info.pop("x"), idx)], info

    def decompress(self, payload, info, ctx):
        return ctx.backend.scatter(ctx.numel, info["idx"], payload[0])

    def union(self, reduced, info, ctx):
        return info["k"], info["k"]

    def ratio_of(self, numel):
        k = k_of(self.ratio, numel)
        return 4 * numel / (k * (4 + index_bytes(numel)))
