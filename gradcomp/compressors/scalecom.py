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
The index round is exact under summation because only the slot owner's bytes are non-zero, and its
size must be a function of (n, k) alone (every rank allreduces a buffer of the same size before it
knows the leader's choice). `indices` picks the code (see code_bytes):

  planes     (default) `ceil(log2(n) / 8)` bytes per index as uint8 planes (2 bytes for tensors
             under 65536 entries, 3 under 2**24)
  eliasfano  Elias-Fano: the l = floor(log2(n/k)) low bits of each sorted index, then the high parts
             as a unary bitvector of k + (n-1 >> l) + 1 bits; at most 2 + log2(n/k) bits per index
             (0.9 bytes at k = 2.5%, against 2), fixed by (n, k)
  bitmap     n bits (smaller than Elias-Fano only when k is a large fraction of n)
  compact    the smallest of the three for this tensor's (n, k)

`values` (OURS, not in the paper): the dtype of the summed values of round 2, `native` (the
compensated gradient's dtype, default), `fp16` or `bf16` (2 bytes per value; the allreduce sums in
that dtype; this rank's rounding error goes into its memory, since the memory subtracts the decode of
its own rounded values; the rounding of the sum itself, relative 2^-11 per addition in fp16, is not
fed back). As with the `fp16` compressor, a sum beyond fp16's range becomes inf and GradientSync raises PayloadOverflowError with no state changed (a GradScaler then lowers its scale).
`values=int8` (OURS): 1 byte per value. Round 1 also sums every rank's a_r = max |x_r| (4 bytes per
tensor), which gives all ranks the same scale s = sum_r a_r / L with L = 127 - ceil(P/2); each rank
sends q_r = round(x_r[I] / s) as int8 and the allreduce sums them exactly, never wrapping:
|sum_r q_r| <= sum_r (a_r / s + 1/2) = L + P/2 <= 127. The decode is (sum_r q_r) s. A rank's own rounding
error (at most s/2 an entry, i.e. about a_r P / (2 L) when the ranks' maxima are alike: coarse, about 15
levels of its largest entry per rank at P = 8) goes into its memory, so error feedback delivers it later
and nothing but float rounding is lost; at most 252 ranks.
Each leader encodes its own slot (leaders > 1) at a fixed byte offset. The index round is a
broadcast carried by allreduce (what the pipeline's summable path issues); a dedicated broadcast
would move about half as many index bytes per rank, and the traffic model
(benchmarks/traffic_model.py) shows both.

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


INDEX_CODES = ("planes", "eliasfano", "bitmap")


def ef_low_bits(n: int, k: int) -> int:
    """Elias-Fano's low-part width for k sorted indices below n: floor(log2(n / k)), at least 0."""
    return max(0, (n // max(k, 1)).bit_length() - 1)


def code_bytes(n: int, k: int, code: str) -> int:
    """Bytes of k distinct indices below n under `code` (a function of n and k only, so every rank
    knows the size of the index round before it starts):

      planes     k * index_bytes(n)                        (uint8 planes, pack_indices)
      eliasfano  ceil(k l / 8) + ceil((k + ((n-1) >> l) + 1) / 8),  l = floor(log2(n / k))
                 (Elias 1974, Fano 1971: the l low bits of each index, then the high parts as a
                 unary bitvector; at most 2 + log2(n / k) bits per index)
      bitmap     ceil(n / 8)                               (one bit per entry)
      compact    the smallest of the three (first in that order on ties)
    """
    if k <= 0:
        return 0
    if code == "compact":
        return min(code_bytes(n, k, c) for c in INDEX_CODES)
    if code == "planes":
        return k * index_bytes(n)
    if code == "eliasfano":
        l = ef_low_bits(n, k)
        return -(-(k * l) // 8) + -(-(k + ((n - 1) >> l) + 1) // 8)
    if code == "bitmap":
        return -(-n // 8)
    raise ValueError(f"unknown index code {code!r}; valid: compact, {', '.join(INDEX_CODES)}")


def resolve_code(n: int, k: int, code: str) -> str:
    """The code actually used: `code`, or for 'compact' the one with the fewest bytes."""
    if code != "compact":
        return code
    return min(INDEX_CODES, key=lambda c: (code_bytes(n, k, c), INDEX_CODES.index(c)))


def encode_indices(b, idx, n: int, code: str):
    """Sorted distinct int64 indices below n -> uint8 array of code_bytes(n, k, code) bytes."""
    import numpy as np
    k = b.numel(idx)
    code = resolve_code(n, k, code)
    if code == "planes":
        return pack_indices(b, idx, n)
    if code == "bitmap":
        return b.packbits(b.scatter(n, idx, b.zeros(k, "int32", idx) + 1))
    l = ef_low_bits(n, k)
    m = k + ((n - 1) >> l) + 1
    high = b.shr(idx, l) + b.arange(k, idx, "int64")          # strictly increasing positions below m
    parts = []
    if l:
        shifts = b.from_numpy(np.arange(l, dtype=np.int64).reshape(1, l), idx)
        low = b.band(b.shr_t(b.reshape(idx, (k, 1)), shifts), 1)     # (k, l) bits, least significant first
        parts.append(b.packbits(b.reshape(low, (-1,))))
    parts.append(b.packbits(b.scatter(m, high, b.zeros(k, "int32", idx) + 1)))
    return b.cat(parts) if len(parts) > 1 else parts[0]


def decode_indices(b, packed, n: int, k: int, code: str):
    """Inverse of encode_indices: k sorted int64 indices."""
    import numpy as np
    code = resolve_code(n, k, code)
    if code == "planes":
        return unpack_indices(b, packed, n, k)
    if code == "bitmap":
        return b.nonzero(b.greater_equal(b.unpackbits(packed, n), 1))
    l = ef_low_bits(n, k)
    m = k + ((n - 1) >> l) + 1
    lb = -(-(k * l) // 8)
    pos = b.nonzero(b.greater_equal(b.unpackbits(b.slice(packed, lb, b.numel(packed)), m), 1))
    idx = b.shl(pos - b.arange(k, pos, "int64"), l)
    if l:
        w = b.from_numpy((1 << np.arange(l, dtype=np.int64)).reshape(1, l), pos)
        bits = b.cast(b.reshape(b.unpackbits(b.slice(packed, 0, lb), k * l), (k, l)), "int64")
        idx = b.bor(idx, b.rowsum(bits * w))
    return idx


def leader_of(step: int, name: str, size: int) -> int:
    """The rank whose top-k indices every rank uses for tensor `name` at `step`."""
    return (int(step) + zlib.crc32(name.encode())) % max(1, int(size))


WIRE_VALUES = {"native": None, "fp16": "float16", "bf16": "bfloat16", "int8": "int8"}


def int8_levels(size: int) -> int:
    """L for values=int8 at `size` ranks: 127 - ceil(size / 2), so that the sum of the ranks' rounded
    values, |sum_r q_r| <= sum_r a_r / s + size / 2 = L + size / 2, never leaves int8."""
    return 127 - (size + 1) // 2


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
        "values": Param(str, "native", "dtype of the summed values (native: the gradient's compute dtype)",
                        choices=tuple(WIRE_VALUES)),
        "indices": Param(str, "planes", "index code of the leader round (compact: the smallest for n, k)",
                         choices=("planes", "eliasfano", "bitmap", "compact")),
    }

    def slots(self, k: int, size: int) -> list[int]:
        """Index slots of the leaders: k split into min(leaders, size) near-equal parts."""
        nl = max(1, min(self.leaders, size))
        return [k // nl + (1 if i < k % nl else 0) for i in range(nl)]

    def _slot_bytes(self, n: int, slots) -> list[int]:
        return [code_bytes(n, s, self.indices) for s in slots]

    def compress(self, x, state, ctx):
        b, n = ctx.backend, ctx.numel
        k = k_of(self.ratio, n)
        lead = leader_of(ctx.step, ctx.name, ctx.size)
        slots = self.slots(k, ctx.size)
        sizes = self._slot_bytes(n, slots)
        pos = (ctx.rank - lead) % max(1, ctx.size)         # leaders are lead, lead + 1, ... (cyclic)
        total = sum(sizes)
        if pos < len(slots) and slots[pos]:                 # our slot: our code at its byte offset
            mine = encode_indices(b, b.sort(b.topk_abs(x, slots[pos])), n, self.indices)
            off, rest = sum(sizes[:pos]), total - sum(sizes[:pos + 1])
            parts = ([b.zeros(off, "uint8", x)] if off else []) + [mine] + ([b.zeros(rest, "uint8", x)] if rest else [])
            packed = b.cat(parts) if len(parts) > 1 else mine
        else:
            packed = b.zeros(total, "uint8", x)
        if self.values == "int8":              # every rank's max |x|, summed: the shared scale of round 2
            return [packed, b.reshape(b.amax(b.abs(x)), (1,))], {"x": x, "k": k, "leader": lead}
        return [packed], {"x": x, "k": k, "leader": lead}

    def next_round(self, reduced, info, state, ctx):
        b, n = ctx.backend, ctx.numel
        slots = self.slots(info["k"], ctx.size)
        sizes, off, got = self._slot_bytes(n, slots), 0, []
        for s, nb in zip(slots, sizes):
            if s:
                got.append(decode_indices(b, b.slice(reduced[0], off, off + nb), n, s, self.indices))
            off += nb
        idx = b.cat(got) if len(got) > 1 else got[0]
        if len(slots) > 1:                                  # several leaders may pick the same index: dedup
            hits = b.scatter_add(n, idx, b.zeros(info["k"], "float32", idx) + 1.0)
            idx = b.nonzero(b.greater_equal(hits, 0.5))
        info["idx"] = idx
        x = info.pop("x")
        vals = b.gather(x, idx)
        wire = WIRE_VALUES[self.values]
        if self.values == "int8":
            if ctx.size > 2 * 126:
                raise ValueError(f"scalecom values=int8 needs at most 252 ranks (the int8 sum), not {ctx.size}")
            total = reduced[1]
            scale = b.where(b.greater_equal(total, 1e-30), total, total * 0 + 1.0) * (1.0 / int8_levels(ctx.size))
            info["scale"], info["dtype"] = scale, b.dtype(x)
            vals = b.cast(b.floor(vals * (1.0 / scale) + 0.5), "int8")
        elif wire is not None:
            info["dtype"] = b.dtype(x)
            vals = b.cast(vals, wire)
        return [vals], info

    def decompress(self, payload, info, ctx):
        b, v = ctx.backend, payload[0]
        if "dtype" in info:                                 # fp16 / bf16 / int8 on the wire: back to x's dtype
            v = b.cast(v, info["dtype"])
        if "scale" in info:
            v = v * info["scale"]
        return b.scatter(ctx.numel, info["idx"], v)

    def union(self, reduced, info, ctx):
        return ctx.backend.numel(info["idx"]), info["k"]

    def ratio_of(self, numel):
        k = k_of(self.ratio, numel)
        vb = {"native": 4, "fp16": 2, "bf16": 2, "int8": 1}[self.values]
        return 4 * numel / (k * vb + code_bytes(numel, k, self.indices) + (4 if self.values == "int8" else 0))
