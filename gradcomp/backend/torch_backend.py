"""torch backend: every operation runs on the tensor's own device; nothing is copied to host."""
from __future__ import annotations

import sys

import numpy as np
import torch

from gradcomp.backend.base import Backend

_DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
       "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32,
       "int64": torch.int64, "bool": torch.bool}
_NAME = {v: k for k, v in _DT.items()}


_GATHER = -0x7FBFDFEFF7FBFDFF         # 0x8040201008040201 as a signed int64 (wrapping product)
_LITTLE = sys.byteorder == "little"
_HCHUNK = 1 << 15                     # int64 elements per chunk of the counter hash (256 KiB; at
                                      # torch's grain size, so each op runs on one thread, no barrier)
_HCHUNK32 = 1 << 17                  # int32 elements per chunk of the int32 counter hash (512 KiB)
_UNPACK: dict = {}                    # device -> int32 (256, 8) bits of each byte, MSB first


def x_is_cuda(x) -> bool:
    return x.device.type != "cpu"


def torch_dtype(name: str):
    return _DT[name]


def _s32(v: int) -> int:
    """v mod 2**32 as a signed int32 value (the same 32 bits)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


class TorchBackend(Backend):
    name = "torch"

    def shape(self, x): return tuple(x.shape)
    def numel(self, x): return x.numel()
    def dtype(self, x):                 # an unsupported dtype (complex) keeps torch's name
        return _NAME.get(x.dtype) or str(x.dtype).replace("torch.", "")
    def nbytes(self, x): return x.numel() * x.element_size()
    def device(self, x): return str(x.device)

    def zeros(self, n, dtype, like): return torch.zeros(n, dtype=_DT[dtype], device=like.device)
    def zeros_like(self, x): return torch.zeros_like(x)
    def arange(self, n, like, dtype="int64"): return torch.arange(n, dtype=_DT[dtype], device=like.device)
    def from_numpy(self, a, like):
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(like.device, non_blocking=True) if like is not None and like.device.type != "cpu" else t
    def to_numpy(self, x):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()

    def reshape(self, x, shape): return x.reshape(shape)
    def flatten(self, x): return x.contiguous().view(-1) if x.dim() else x.reshape(-1)
    def cat(self, xs): return torch.cat([x.reshape(-1) for x in xs])
    def split(self, x, sizes): return list(torch.split(x, list(sizes)))
    def slice(self, x, start, stop): return x[start:stop]
    def cast(self, x, dtype):
        d = _DT[dtype]
        return x if x.dtype == d else x.to(d)
    def copy(self, x): return x.clone()
    def shares_memory(self, a, b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.device == b.device and \
            a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    def scale_(self, x, factor): return x.mul_(factor)
    def sub_(self, a, b): return a.sub_(b)
    def mul_(self, a, b): return a.mul_(b)
    def minimum_(self, x, c): return x.clamp_(max=c)
    def signed_(self, a, x): return torch.copysign(a, x, out=a)
    def zero_range_(self, x, start, stop):
        if start < stop:
            x[start:stop] = 0
        return x
    def add_(self, x, y): return x.add_(y)
    def compact(self, x):
        return x.clone() if x.untyped_storage().nbytes() > x.numel() * x.element_size() else x
    def to_bytes(self, x): return x.contiguous().reshape(-1).view(torch.uint8)
    def from_bytes(self, b, dtype, shape):
        b = b.contiguous()
        if b.storage_offset() % _DT[dtype].itemsize:   # view() needs an element-aligned start
            b = b.clone()
        return b.view(_DT[dtype]).reshape(shape)
    def transpose(self, x): return x.t().contiguous()
    def pad_to(self, x, n):
        if x.shape[0] == n:
            return x
        return torch.nn.functional.pad(x, (0, n - x.shape[0]))

    def abs(self, x): return x.abs()
    def sign(self, x): return x.sign()
    def sqrt(self, x): return x.sqrt()
    def floor(self, x): return x.floor()
    def minimum(self, a, b): return torch.minimum(a, b) if torch.is_tensor(b) else a.clamp(max=b)
    def maximum(self, a, b): return torch.maximum(a, b) if torch.is_tensor(b) else a.clamp(min=b)
    def where(self, c, a, b): return torch.where(c, a, b)
    def sum(self, x): return x.sum()
    def amax(self, x): return x.max() if x.numel() else torch.zeros((), dtype=x.dtype, device=x.device)
    def norm(self, x):
        return torch.linalg.vector_norm(x, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    def mean_abs(self, x): return x.abs().mean() if x.numel() else torch.zeros((), device=x.device)
    def count_nonfinite(self, x):
        # On CPU a finite sum proves every element finite: one read pass, no mask (14x faster than
        # isfinite on 45 MB). A non-finite sum (NaN/Inf, or a finite overflow) takes the exact count.
        # On accelerators the exact count stays on the device (a branch would synchronize).
        if x.device.type == "cpu" and x.numel() and bool(torch.isfinite(x.sum())):
            return torch.zeros((), dtype=torch.float32)
        return (x.numel() - torch.isfinite(x).sum()).to(torch.float32)
    def count_nonfinite_all(self, xs):
        # On CPU: every tensor's sum, one finiteness test and one read for all of them (as above: a
        # finite sum proves its tensor finite); a non-finite sum takes the exact counts.
        xs = [x for x in xs if x.numel()]
        if not xs:
            return torch.zeros((), dtype=torch.float32)
        if xs[0].device.type != "cpu" or len(xs) == 1:
            return super().count_nonfinite_all(xs)
        if bool(torch.isfinite(torch.stack([x.sum().float() for x in xs])).all()):
            return torch.zeros((), dtype=torch.float32)
        return sum((x.numel() - torch.isfinite(x).sum()).to(torch.float32) for x in xs)
    def item(self, x): return float(x.item()) if torch.is_tensor(x) else float(x)
    def greater_equal(self, a, b): return a >= b

    def bxor(self, a, b): return torch.bitwise_xor(a, b)
    def band(self, a, b): return torch.bitwise_and(a, b)
    def bor(self, a, b): return torch.bitwise_or(a, b)
    def shr(self, a, s): return torch.bitwise_right_shift(a, s)
    def shl(self, a, s): return torch.bitwise_left_shift(a, s)
    def shr_t(self, a, s): return torch.bitwise_right_shift(a, s)
    def rowsum(self, x): return x.sum(dim=1)

    def counter_hash(self, k1, k2, n, like, offset, c1, c2):
        """gradcomp.rng.hash_u32's stream, bit for bit, computed in place chunk by chunk (the
        generic version allocates a full int64 array per operation: ~10x slower on CPU)."""
        out = torch.empty(n, dtype=torch.int64, device=like.device)
        self._counter(k1, k2, n, like, offset, c1, c2, out, None)
        return out

    def counter_bits(self, k1, k2, n, like, offset, c1, c2, drop):
        """hash_u32's stream >> drop (drop >= 1) as int32, without a full-size int64 array."""
        out = torch.empty(n, dtype=torch.int32, device=like.device)
        self._counter32(k1, k2, n, like, offset, c1, c2, drop, out)
        return out

    def counter_uniform(self, k1, k2, n, like, offset, c1, c2):
        """gradcomp.rng.uniform's float32 values, bit for bit, without a full-size int64 array."""
        out = torch.empty(n, dtype=torch.float32, device=like.device)
        self._counter32(k1, k2, n, like, offset, c1, c2, 8, out)
        return out.mul_(1.0 / 16777216.0)               # 24-bit integers times 2**-24: exact

    def _counter32(self, k1, k2, n, like, offset, c1, c2, drop, out):
        """hash_u32's stream >> drop written into out (int32 or float32), computed in int32: the
        mixer's products mod 2**32 are int32's wrapping products, and a logical shift of the
        uint32 bits is the arithmetic shift masked to its low 32 - s bits. Same bits as _counter
        (tests/test_counter32.py), half the memory traffic of its int64 chunks."""
        dev = like.device
        step = _HCHUNK32 if dev.type == "cpu" else max(n, 1)
        x32 = out.dtype == torch.int32
        tmp = torch.empty(min(step, n), dtype=torch.int32, device=dev)
        buf = None if x32 else torch.empty(min(step, n), dtype=torch.int32, device=dev)
        c1s, c2s, k2s = _s32(c1), _s32(c2), _s32(k2)

        def mix(x, t):
            x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=t).bitwise_and_(0xFFFF))
            x.mul_(c1s)
            x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=t).bitwise_and_(0x1FFFF))
            x.mul_(c2s)
            x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=t).bitwise_and_(0xFFFF))

        for s in range(0, n, step):
            e = min(n, s + step)
            x, t = (out[s:e] if x32 else buf[:e - s]), tmp[:e - s]
            torch.arange(e - s, dtype=torch.int32, out=x).add_(_s32(s + offset + k1))
            mix(x, t)
            x.bitwise_xor_(k2s)
            mix(x, t)
            x.bitwise_right_shift_(drop).bitwise_and_((1 << (32 - drop)) - 1)
            if not x32:
                out[s:e].copy_(x)

    def _counter(self, k1, k2, n, like, offset, c1, c2, out, emit):
        dev = like.device
        step = _HCHUNK if dev.type == "cpu" else max(n, 1)
        tmp = torch.empty(min(step, n), dtype=torch.int64, device=dev)
        buf = None if emit is None else torch.empty(min(step, n), dtype=torch.int64, device=dev)
        m32 = 0xFFFFFFFF

        def mix(x, t):
            x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=t))
            x.mul_(c1).bitwise_and_(m32)
            x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=t))
            x.mul_(c2).bitwise_and_(m32)
            x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=t))

        for s in range(0, n, step):
            e = min(n, s + step)
            x, t = (out[s:e] if buf is None else buf[:e - s]), tmp[:e - s]
            torch.arange(s + offset + k1, e + offset + k1, out=x).bitwise_and_(m32)
            mix(x, t)
            x.bitwise_xor_(k2).bitwise_and_(m32)
            mix(x, t)
            if emit is not None:
                emit(out[s:e], x)

    def packbits(self, bits):
        # 8 bits as the 8 bytes of one int64, gathered into the top byte by one multiplication:
        # byte j (0/1, little-endian at bit 8j) times 2**(63-9j) lands on bit 63-j, and no other
        # partial product reaches bits 56..63 or carries (all positions 63+8j-9i are distinct).
        n = bits.numel()
        u8 = bits.reshape(-1).to(torch.uint8)
        pad = (-n) % 8
        if pad:
            u8 = torch.nn.functional.pad(u8, (0, pad))
        top = (u8.view(torch.int64) * _GATHER).view(torch.uint8).view(-1, 8)
        return top[:, 7 if _LITTLE else 0].contiguous()

    def unpackbits(self, packed, n):
        # one row gather from a 256 x 8 table of the bits of every byte value
        dev = packed.device
        table = _UNPACK.get(dev)
        if table is None:
            v = torch.arange(256, dtype=torch.int32, device=dev).reshape(-1, 1)
            table = _UNPACK[dev] = torch.bitwise_and(
                torch.bitwise_right_shift(v, torch.arange(7, -1, -1, dtype=torch.int32, device=dev)), 1)
        return table.index_select(0, packed.reshape(-1).to(torch.int64)).view(-1)[:n]

    def unpack_01(self, packed, n, dtype):
        key = (packed.device, dtype, "01")
        table = _UNPACK.get(key)
        if table is None:
            bits = self.unpackbits(torch.arange(256, dtype=torch.uint8, device=packed.device), 2048)
            table = _UNPACK[key] = bits.reshape(256, 8).to(_DT[dtype])
        return table.index_select(0, packed.reshape(-1).to(torch.int64)).view(-1)[:n]

    def unpack_select(self, packed, n, if0, if1, lengths):
        bits = self.unpack_01(packed, n, "bool")
        if len(lengths) == 1:
            return torch.where(bits, if1.reshape(()), if0.reshape(()))
        if x_is_cuda(bits):
            rep = lambda v: torch.repeat_interleave(v, self._lengths(lengths, v.device), output_size=n)  # noqa: E731
            return torch.where(bits, rep(if1), rep(if0))
        out = torch.empty(n, dtype=if0.dtype)             # CPU: one select per segment into one buffer
        o = 0
        for i, m in enumerate(lengths):
            torch.where(bits[o:o + m], if1[i], if0[i], out=out[o:o + m])
            o += m
        return out

    def unpack_pm1(self, packed, n, dtype):
        # one gather from a 256 x 8 table of +-1 rows, directly in the wanted dtype
        key = (packed.device, dtype)
        table = _UNPACK.get(key)
        if table is None:
            bits = self.unpackbits(torch.arange(256, dtype=torch.uint8, device=packed.device), 2048)
            table = _UNPACK[key] = (1 - 2 * bits.reshape(256, 8)).to(_DT[dtype])
        return table.index_select(0, packed.reshape(-1).to(torch.int64)).view(-1)[:n]

    def topk_abs(self, x, k):
        n = x.numel()
        if k >= n:
            return torch.arange(n, device=x.device)
        return torch.topk(x.abs(), k, sorted=False).indices
    def kth_largest_abs(self, x, k):
        a = x.abs().float()
        if a.device.type == "cpu" and not a.requires_grad:     # see sort(): numpy's one-thread select
            n = a.numel()
            return torch.tensor(np.partition(a.numpy(), n - k)[n - k])
        return torch.kthvalue(a, x.numel() - k + 1).values
    def gather(self, x, idx): return x[idx]
    def scatter(self, n, idx, values):
        out = torch.zeros(n, dtype=values.dtype, device=values.device)
        out[idx] = values
        return out
    def scatter_add(self, n, idx, values):
        out = torch.zeros(n, dtype=values.dtype, device=values.device)
        return out.index_add_(0, idx, values)
    def nonzero(self, mask): return torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1)
    def zero_at(self, x, idx): return x.index_fill_(0, idx, 0)
    def count_distinct(self, n, idx):
        m = idx.numel()
        if m < 2:
            return torch.tensor(m, device=idx.device)
        if 8 * m <= n:              # few indices: sort them (O(m log m)), count the steps
            s = self.sort(idx)                                       # numpy on a CPU: see sort()
            return (s[1:] != s[:-1]).sum() + 1
        hit = torch.zeros(n, dtype=torch.bool, device=idx.device)     # else a bool bitmap
        hit[idx] = True
        return torch.count_nonzero(hit)
    def abs_ge_indices(self, x, thr):
        # |x| >= t as (x >= t) | (x <= -t): two bool passes, no |x| temporary as large as x. The
        # mask is then scanned 8 flags at a time as int64 words (nonzero over n/8 words), and only
        # the few non-zero words are expanded to positions. A handful of whole-array ops: no
        # per-chunk thread barriers, which stall badly when the CPU is oversubscribed.
        n = x.numel()
        if not torch.is_tensor(thr):
            thr = torch.tensor(thr, dtype=x.dtype, device=x.device)
        mask = torch.ge(x, thr)
        mask.logical_or_(torch.le(x, -thr))
        n8 = n - n % 8
        words = torch.nonzero(mask[:n8].view(torch.int64)).view(-1)
        rc = torch.nonzero(mask[:n8].view(-1, 8).index_select(0, words))
        idx = words.index_select(0, rc[:, 0]).mul_(8).add_(rc[:, 1])
        if n8 < n:
            idx = torch.cat([idx, torch.nonzero(mask[n8:]).view(-1).add_(n8)])
        return idx

    def sort(self, x):
        # CPU: numpy's single-threaded sort. torch's parallel CPU sort of a top-k's indices collapses
        # when the cores are oversubscribed (ranks x threads > cores: other jobs, several ranks per
        # node), its thread barriers waiting for descheduled threads (docs/benchmarks.md part 1).
        if x.device.type == "cpu" and not x.requires_grad:
            return torch.from_numpy(np.sort(x.numpy()))
        return torch.sort(x).values

    def _lengths(self, lengths, dev, dtype=torch.int64):
        # cached: a fused bucket's lengths are the same every step (no host-to-device copy per step)
        key = ("lengths", dev, dtype, tuple(lengths))
        t = _UNPACK.get(key)
        if t is None:
            if len(_UNPACK) > 256:
                for k in [k for k in _UNPACK if k[0] == "lengths"]:
                    del _UNPACK[k]
            t = _UNPACK[key] = torch.tensor(list(lengths), dtype=dtype, device=dev)
        return t
    def lengths_array(self, lengths, like, dtype): return self._lengths(lengths, like.device, _DT[dtype])
    def native_uniform(self, key, n, like):
        # torch's Philox/MT generator on the array's device, seeded from the key: one kernel
        g = torch.Generator(device=like.device)
        g.manual_seed((int(key[0]) << 31) | int(key[1]))
        return torch.rand(n, generator=g, dtype=torch.float32, device=like.device)
    def _per_segment(self, x, lengths, fn):
        # CPU: one reduction per segment over views of x: a single read pass, no temporary as
        # large as x (a one-kernel segmented reduction needs |x| etc. materialized first)
        out, o = [], 0
        for m in lengths:
            out.append(fn(x[o:o + m]))
            o += m
        return torch.stack(out)
    def segment_abs_sum(self, x, lengths):
        if len(lengths) == 1:
            return torch.linalg.vector_norm(x, 1).reshape(1)
        if x_is_cuda(x):
            return torch.segment_reduce(x.abs(), "sum", lengths=self._lengths(lengths, x.device))
        return self._per_segment(x, lengths, lambda v: torch.linalg.vector_norm(v, 1))
    def segment_signed_sums(self, x, lengths):
        if x_is_cuda(x) and len(lengths) > 1:
            return super().segment_signed_sums(x, lengths)
        lengths = lengths if len(lengths) > 1 else (x.numel(),)
        neg = self._per_segment(x, lengths, lambda v: v.clamp(max=0).sum())
        pos = self._per_segment(x, lengths, lambda v: v.clamp(min=0).sum())
        return neg, pos
    def segment_count(self, mask, lengths):
        if len(lengths) == 1:
            return torch.count_nonzero(mask).reshape(1).to(torch.float64)
        if x_is_cuda(mask):
            return torch.segment_reduce(mask.to(torch.float64), "sum", lengths=self._lengths(lengths, mask.device))
        return self._per_segment(mask, lengths, torch.count_nonzero).to(torch.float64)
    def segment_absmax(self, x, lengths):
        def absmax(v):
            if not v.numel():
                return torch.zeros((), dtype=v.dtype, device=v.device)
            lo, hi = torch.aminmax(v)
            return torch.maximum(hi, -lo)
        if len(lengths) == 1:
            return absmax(x).reshape(1)
        if x_is_cuda(x):
            return torch.segment_reduce(x.abs(), "max", lengths=self._lengths(lengths, x.device))
        return self._per_segment(x, lengths, absmax)
    def segment_mul_(self, x, v, lengths):
        if len(lengths) == 1:
            return x.mul_(v.reshape(()))
        if x_is_cuda(x):
            return x.mul_(torch.repeat_interleave(v, self._lengths(lengths, v.device), output_size=x.numel()))
        o = 0
        for i, m in enumerate(lengths):                   # CPU: in place, one pass over x
            x[o:o + m].mul_(v[i])
            o += m
        return x
    def block_norms(self, x, width):
        n = x.numel()
        full = n // width
        parts = []
        if full:
            parts.append(torch.linalg.vector_norm(x[:full * width].view(full, width), 2, dim=1))
        if n > full * width:
            parts.append(torch.linalg.vector_norm(x[full * width:], 2).reshape(1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    def block_mul_(self, x, f, width):
        n = x.numel()
        full = n // width
        if f.numel() == 1:
            return x.mul_(f.reshape(()))
        if full:
            x[:full * width].view(full, width).mul_(f[:full].reshape(full, 1))
        if n > full * width:
            x[full * width:].mul_(f[full])
        return x
    def stochastic_round_(self, y, u):
        fl = torch.floor(y)
        frac = y.sub_(fl)                                 # y is ours: frac(y) in place
        return fl.add_(torch.lt(u, frac))

    def segment_sum(self, x, lengths):
        if len(lengths) == 1:
            return x.sum().reshape(1)
        return torch.segment_reduce(x, "sum", lengths=self._lengths(lengths, x.device))
    def segment_amax(self, x, lengths):
        if len(lengths) == 1:
            return self.amax(x).reshape(1)
        return torch.segment_reduce(x, "max", lengths=self._lengths(lengths, x.device))
    def repeat_segments(self, v, lengths):
        n = sum(lengths)
        if x_is_cuda(v):
            return torch.repeat_interleave(v, self._lengths(lengths, v.device), output_size=n)
        out = torch.empty(n, dtype=v.dtype, device=v.device)   # CPU: one fill per segment, one pass
        o = 0
        for i, m in enumerate(lengths):
            out[o:o + m] = v[i]
            o += m
        return out

    def matmul(self, a, b): return a @ b
    def qr(self, a):
        q, r = torch.linalg.qr(a.float() if a.dtype in (torch.float16, torch.bfloat16) else a)
        d = torch.sign(torch.diagonal(r))
        d = torch.where(d == 0, torch.ones_like(d), d)
        return (q * d[None, :]).to(a.dtype)
