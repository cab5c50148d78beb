"""Shared code of sparsifying compressors: payload = [values, indices], decoded by scatter.

Indices travel as int32 when the tensor has fewer than 2**31 elements (int64 otherwise).
Aggregation scatters every rank's (index, value) pairs into one dense buffer in a single
pass (`scatter_add`), never one dense decode per rank, and scales that buffer in place.
`pack` records (x, indices) in ctx.memo["own_idx"]: this rank's own decoded payload is x at
those indices and zero elsewhere, which lets error feedback compute x - D(C(x)) by zeroing
them in x (Compressor.sent_indices) instead of decoding and subtracting.

Wire formats (OURS; the `values` and `indices` params of topk and dgc, defaults unchanged):

  values=native  the values in x's dtype (default)
  values=fp16    2 bytes per value (float16; bf16: bfloat16); decoded back to x's dtype. The own decode
                 is then the rounded values, not x's, so `pack` records no sent indices and error
                 feedback subtracts the decode: the residual keeps this rank's rounding error. A value
                 beyond fp16's range becomes inf and GradientSync's finiteness check raises.
  indices=native int32 (int64 at 2**31 entries or more) per index (default)
  indices=planes|eliasfano|bitmap|compact  scalecom's index codes (gradcomp/compressors/scalecom.py,
                 code_bytes): a uint8 array whose size depends on (n, k) only, decoded to the k
                 sorted indices. Every rank's payload is decoded on its own before the scatter, so the
                 aggregate is the same as with native indices.
"""
from gradcomp.compressors.base import Compressor


def index_dtype(n: int) -> str:
    return "int32" if n < 2**31 else "int64"


def k_of(ratio: float, n: int) -> int:
    """Number of elements kept: round(ratio * n), at least 1 and at most n."""
    return max(1, min(n, int(round(ratio * n))))


WIRE_VALUES = {"native": None, "fp16": "float16", "bf16": "bfloat16"}
INDEX_FORMATS = ("native", "planes", "eliasfano", "bitmap", "compact")


def value_bytes(values: str) -> int:
    """Bytes per value on the wire for `values` (native: float32's 4)."""
    return 2 if WIRE_VALUES.get(values) else 4


def index_nbytes(n: int, k: int, indices: str) -> int:
    """Bytes of k sorted indices below n in format `indices` (native: 4 per index, 8 from 2**31)."""
    if indices == "native":
        return k * (4 if n < 2**31 else 8)
    from gradcomp.compressors.scalecom import code_bytes
    return code_bytes(n, k, indices)


class SparseCompressor(Compressor):
    summable = False
    values = "native"                 # wire formats (see the module docstring); topk and dgc expose them
    indices = "native"

    def pack(self, x, idx, ctx):
        b = ctx.backend
        ctx.memo["sent_idx"] = idx            # int64: lets a memory mask what was sent in O(k) (dgc)
        vals = b.gather(x, idx)
        wire = WIRE_VALUES[self.values]
        if wire is None:
            ctx.memo["own_idx"] = (x, idx)    # decompress(own payload) = x at idx, 0 elsewhere
        else:                                 # the own decode is the rounded values: no masking shortcut
            ctx.memo.pop("sent_idx", None)
            ctx.memo.pop("own_idx", None)
            vals = b.cast(vals, wire)
        return [vals, self.encode_idx(b, idx, ctx.numel)]

    def encode_idx(self, b, idx, n: int):
        """Sorted int64 indices below n -> their wire array in this compressor's `indices` format."""
        if self.indices == "native":
            return b.cast(idx, index_dtype(n))
        from gradcomp.compressors.scalecom import encode_indices
        return encode_indices(b, idx, n, self.indices)

    def decode_idx(self, b, wire, n: int, k: int):
        """Inverse of encode_idx for k indices: int64."""
        if self.indices == "native":
            return b.cast(wire, "int64")
        from gradcomp.compressors.scalecom import decode_indices
        return decode_indices(b, wire, n, k, self.indices)

    def payload_indices(self, p, ctx):
        """int64 indices of one rank's payload [values, indices]."""
        b = ctx.backend       # k is the values' count; native indices need none (variable-size payloads traced in TF)
        return self.decode_idx(b, p[1], ctx.numel, None if self.indices == "native" else b.numel(p[0]))

    def payload_values(self, v, ctx):
        """One payload's values in the working dtype (fp16 / bf16 on the wire: cast back)."""
        if WIRE_VALUES[self.values] is None:
            return v
        return ctx.backend.cast(v, "float64" if ctx.dtype == "float64" else "float32")

    def decompress(self, payload, info, ctx):
        b = ctx.backend
        return b.scatter(ctx.numel, self.payload_indices(payload, ctx), self.payload_values(payload[0], ctx))

    def aggregate(self, gathered, info, ctx):
        b = ctx.backend
        vals = self.payload_values(b.cat([p[0] for p in gathered]), ctx)
        if self.indices == "native":
            idx = b.cast(b.cat([p[1] for p in gathered]), "int64")
        else:
            idx = b.cat([self.payload_indices(p, ctx) for p in gathered])
        return b.scale_(b.scatter_add(ctx.numel, idx, vals), 1.0 / len(gathered))   # a fresh buffer

    def union(self, gathered, info, ctx):
        """(distinct indices over all ranks' payloads, mean entries per rank); a tensor sent dense
        counts all its n entries."""
        b = ctx.backend
        if any(len(p) < 2 for p in gathered):        # sent dense (dgc's 1-D tensors): all n entries
            return ctx.numel, ctx.numel
        idx = [self.payload_indices(p, ctx) for p in gathered]
        kept = sum(b.numel(i) for i in idx) / len(idx)
        idx = b.cat(idx)
        if not b.numel(idx):
            return 0, kept
        return b.count_distinct(ctx.numel, idx), kept
