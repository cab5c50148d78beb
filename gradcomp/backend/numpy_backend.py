"""numpy reference backend (bfloat16 through ml_dtypes when it is installed)."""
from __future__ import annotations

import numpy as np

from gradcomp.backend.base import Backend

try:  # bfloat16 for numpy
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover - optional
    _BF16 = None


def np_dtype(name: str):
    if name == "bfloat16":
        if _BF16 is None:
            raise TypeError("numpy bfloat16 needs the ml_dtypes package: pip install ml_dtypes")
        return _BF16
    return np.dtype(name)


class NumpyBackend(Backend):
    name = "numpy"

    def shape(self, x): return tuple(np.shape(x))
    def numel(self, x): return int(np.size(x))
    def dtype(self, x):
        d = np.asarray(x).dtype
        return "bfloat16" if (_BF16 is not None and d == _BF16) else d.name
    def nbytes(self, x): return int(np.asarray(x).nbytes)

    def zeros(self, n, dtype, like=None): return np.zeros(n, dtype=np_dtype(dtype))
    def zeros_like(self, x): return np.zeros_like(x)
    def arange(self, n, like=None, dtype="int64"): return np.arange(n, dtype=np_dtype(dtype))
    def from_numpy(self, a, like=None): return np.asarray(a)
    def to_numpy(self, x): return np.asarray(x)

    def reshape(self, x, shape): return np.reshape(x, shape)
    def flatten(self, x): return np.ascontiguousarray(x).reshape(-1)
    def cat(self, xs): return np.concatenate([np.reshape(x, -1) for x in xs]) if xs else np.zeros(0, np.float32)
    def split(self, x, sizes):
        out, o = [], 0
        for s in sizes:
            out.append(x[o:o + s]); o += s
        return out
    def slice(self, x, start, stop): return x[start:stop]
    def cast(self, x, dtype):
        d = np_dtype(dtype)
        x = np.asarray(x)
        return x if x.dtype == d else x.astype(d)
    def copy(self, x): return np.array(x, copy=True)
    def shares_memory(self, a, b): return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and \
        np.shares_memory(a, b)
    def scale_(self, x, factor):
        if isinstance(x, np.ndarray) and x.flags.writeable:
            np.multiply(x, x.dtype.type(factor), out=x)
            return x
        return x * factor
    def sub_(self, a, b):
        if isinstance(a, np.ndarray) and a.flags.writeable and np.result_type(a, b) == a.dtype:
            np.subtract(a, b, out=a)
            return a
        return a - b
    def mul_(self, a, b):
        if isinstance(a, np.ndarray) and a.flags.writeable and np.result_type(a, b) == a.dtype:
            np.multiply(a, b, out=a)
            return a
        return a * b
    def minimum_(self, x, c):
        if isinstance(x, np.ndarray) and x.flags.writeable:
            return np.minimum(x, x.dtype.type(c), out=x)
        return np.minimum(x, c)
    def zero_range_(self, x, start, stop):
        if isinstance(x, np.ndarray) and x.flags.writeable:
            x[start:stop] = 0
            return x
        return super().zero_range_(x, start, stop)
    def add_(self, x, y):
        if isinstance(x, np.ndarray) and x.flags.writeable and np.result_type(x, y) == x.dtype:
            np.add(x, y, out=x)
            return x
        return x + y
    def compact(self, x): return x.copy() if isinstance(x, np.ndarray) and x.base is not None else x
    def to_bytes(self, x): return np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    def from_bytes(self, b, dtype, shape): return np.ascontiguousarray(b).view(np_dtype(dtype)).reshape(shape)
    def transpose(self, x): return np.ascontiguousarray(np.transpose(x))
    def pad_to(self, x, n):
        if x.shape[0] == n:
            return x
        out = np.zeros(n, dtype=x.dtype); out[:x.shape[0]] = x
        return out

    def abs(self, x): return np.abs(x)
    def sign(self, x): return np.sign(x)
    def sqrt(self, x): return np.sqrt(x)
    def floor(self, x): return np.floor(x)
    def minimum(self, a, b): return np.minimum(a, b)
    def maximum(self, a, b): return np.maximum(a, b)
    def where(self, c, a, b): return np.where(c, a, b)
    def sum(self, x): return np.sum(x)
    def amax(self, x): return np.max(x) if np.size(x) else np.zeros((), np.asarray(x).dtype)
    def norm(self, x):
        x = np.asarray(x)
        return np.sqrt(np.sum(np.square(x.astype(np.float64) if x.dtype == np.float64 else x.astype(np.float32))))
    def mean_abs(self, x): return np.mean(np.abs(x)) if np.size(x) else np.float32(0)
    def count_nonfinite(self, x):
        with np.errstate(over="ignore", invalid="ignore"):
            if np.size(x) and np.isfinite(np.sum(x)):  # a finite sum proves every element finite
                return np.float32(0)
        return np.float32(np.size(x) - np.count_nonzero(np.isfinite(x)))
    def item(self, x): return float(np.asarray(x, dtype=np.float64))
    def greater_equal(self, a, b): return np.greater_equal(a, b)

    def bxor(self, a, b): return np.bitwise_xor(a, b)
    def band(self, a, b): return np.bitwise_and(a, b)
    def bor(self, a, b): return np.bitwise_or(a, b)
    def shr(self, a, s): return np.right_shift(a, s)
    def shl(self, a, s): return np.left_shift(a, s)
    def shr_t(self, a, s): return np.right_shift(a, s)
    def rowsum(self, x): return np.sum(x, axis=1)

    def topk_abs(self, x, k):
        n = x.shape[0]
        if k >= n:
            return np.arange(n, dtype=np.int64)
        idx = np.argpartition(np.abs(x), n - k)[n - k:]
        return idx.astype(np.int64)
    def kth_largest_abs(self, x, k):
        n = x.shape[0]
        a = np.abs(x)
        return np.partition(a, n - k)[n - k]
    def gather(self, x, idx): return x[idx]
    def scatter(self, n, idx, values):
        out = np.zeros(n, dtype=values.dtype); out[idx] = values
        return out
    def scatter_add(self, n, idx, values):
        out = np.zeros(n, dtype=values.dtype); np.add.at(out, idx, values)
        return out
    def nonzero(self, mask): return np.flatnonzero(mask).astype(np.int64)
    def zero_at(self, x, idx):
        x[idx] = 0
        return x
    def sort(self, x): return np.sort(x)
    def count_distinct(self, n, idx):
        hit = np.zeros(n, dtype=bool)
        hit[idx] = True
        return np.int64(np.count_nonzero(hit))

    def matmul(self, a, b): return np.matmul(a, b)
    def qr(self, a):
        q, r = np.linalg.qr(a)
        d = np.sign(np.diag(r)); d[d == 0] = 1
        return (q * d[None, :]).astype(a.dtype, copy=False)

    def packbits(self, bits): return np.packbits(np.asarray(bits).astype(bool))
    def unpackbits(self, packed, n): return np.unpackbits(packed)[:n].astype(np.int32)
