"""The backend protocol: the array operations gradcomp's algorithms are written against.

Arrays stay in their framework and on their device; dtypes are named by strings
(`DTYPES`). Index arrays are int64. Everything a compressor needs is here, and a method
that is not here is not used by the core.
"""
from __future__ import annotations

DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int32", "int64", "bool")
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1,
            "int32": 4, "int64": 8, "bool": 1}


class Backend:
    """Abstract protocol. Concrete backends: numpy, torch, tensorflow."""

    name = "abstract"

    # --- introspection -----------------------------------------------------------------
    def shape(self, x) -> tuple: raise NotImplementedError
    def numel(self, x) -> int:
        n = 1
        for d in self.shape(x):
            n *= int(d)
        return n
    def dtype(self, x) -> str: raise NotImplementedError
    def nbytes(self, x) -> int: return self.numel(x) * ITEMSIZE[self.dtype(x)]
    def is_floating(self, x) -> bool: return self.dtype(x) in ("float16", "bfloat16", "float32", "float64")

    # --- creation (on the device of `like`) -------------------------------------------
    def zeros(self, n, dtype: str, like): raise NotImplementedError
    def zeros_like(self, x): raise NotImplementedError
    def arange(self, n: int, like, dtype: str = "int64"): raise NotImplementedError
    def from_numpy(self, a, like): raise NotImplementedError
    def to_numpy(self, x): raise NotImplementedError

    # --- layout ------------------------------------------------------------------------
    def reshape(self, x, shape): raise NotImplementedError
    def flatten(self, x): return self.reshape(x, (-1,))
    def cat(self, xs): raise NotImplementedError
    def split(self, x, sizes): raise NotImplementedError
    def slice(self, x, start: int, stop: int): raise NotImplementedError
    def cast(self, x, dtype: str): raise NotImplementedError
    def copy(self, x): raise NotImplementedError
    # In-place ops, for arrays the caller owns (immutable frameworks return a new array instead).
    def shares_memory(self, a, b) -> bool: return False
    def compact(self, x):
        """x itself, or a copy if x is a view into a larger buffer (so that saving x saves only x)."""
        return x
    def scale_(self, x, factor: float): return x * factor      # x *= factor where possible
    def sub_(self, a, b): return a - b                          # a -= b where possible (a: ours)
    def mul_(self, a, b): return a * b                          # a *= b where possible (a: ours)
    def minimum_(self, x, c: float): return self.minimum(x, c)   # min(x, c) in place where possible
    def signed_(self, a, x):
        """a (>= 0, and 0 wherever x is 0) with the sign of x: -a where x < 0; may modify a in place."""
        return self.where(x < 0, -a, a)
    def zero_range_(self, x, start: int, stop: int):
        """x (1-D) with x[start:stop] = 0; may modify x in place (the caller owns x)."""
        n = self.numel(x)
        if start >= stop:
            return x
        parts = [self.slice(x, 0, start), self.zeros(stop - start, self.dtype(x), x), self.slice(x, stop, n)]
        return self.cat([p for p in parts if self.numel(p)])
    def add_(self, x, y): return x + y                         # x += y where possible (same dtype)
    def to_bytes(self, x): raise NotImplementedError           # 1-D uint8 view/copy
    def from_bytes(self, b, dtype: str, shape): raise NotImplementedError
    def transpose(self, x): raise NotImplementedError
    def pad_to(self, x, n: int): raise NotImplementedError       # 1-D zero pad to length n

    # --- elementwise / reductions --------------------------------------------------------
    def abs(self, x): raise NotImplementedError
    def sign(self, x): raise NotImplementedError
    def sqrt(self, x): raise NotImplementedError
    def floor(self, x): raise NotImplementedError
    def minimum(self, a, b): raise NotImplementedError
    def maximum(self, a, b): raise NotImplementedError
    def where(self, cond, a, b): raise NotImplementedError
    def sum(self, x): raise NotImplementedError                 # 0-d array
    def amax(self, x): raise NotImplementedError                # 0-d array
    def norm(self, x): raise NotImplementedError                # 0-d array, L2
    def mean_abs(self, x): raise NotImplementedError
    def count_nonfinite(self, x): raise NotImplementedError     # 0-d float32 array
    def count_nonfinite_all(self, xs):
        """0-d float32 array: the non-finite values of all arrays in xs (one device), summed."""
        total = self.count_nonfinite(xs[0])
        for x in xs[1:]:
            total = total + self.count_nonfinite(x)
        return total
    def item(self, x) -> float: raise NotImplementedError        # host sync
    def greater_equal(self, a, b): raise NotImplementedError

    # --- integer bit ops (for the counter-based RNG and bit packing) ---------------------
    def bxor(self, a, b): raise NotImplementedError
    def band(self, a, b): raise NotImplementedError
    def bor(self, a, b): raise NotImplementedError
    def shr(self, a, s: int): raise NotImplementedError
    def shl(self, a, s: int): raise NotImplementedError

    # --- selection -----------------------------------------------------------------------
    def topk_abs(self, x, k: int): raise NotImplementedError       # int64 indices of the k largest |x|
    def kth_largest_abs(self, x, k: int): raise NotImplementedError  # 0-d, k-th largest |x|
    def gather(self, x, idx): raise NotImplementedError
    def scatter(self, n: int, idx, values): raise NotImplementedError  # dense 1-D of n, values at idx
    def scatter_add(self, n: int, idx, values): raise NotImplementedError
    def nonzero(self, mask): raise NotImplementedError             # int64 indices where mask
    def zero_at(self, x, idx):                         # x with x[idx] = 0 (idx int64); may modify x in place
        hit = self.scatter(self.numel(x), idx, self.gather(x, idx))
        return x - hit
    def abs_ge_indices(self, x, thr):
        """int64 indices i (ascending) with |x_i| >= thr (0-d array or float): threshold selection.
        Backends may stream it in cache-sized chunks; it must equal nonzero(|x| >= thr)."""
        return self.nonzero(self.greater_equal(self.abs(x), thr))
    def sort(self, x): raise NotImplementedError
    def count_distinct(self, n: int, idx):
        """0-d array: how many distinct values the int64 array idx (all in [0, n)) holds."""
        hits = self.scatter_add(n, idx, self.zeros(self.numel(idx), "float32", idx) + 1.0)
        return self.sum(self.cast(self.greater_equal(hits, 0.5), "float32"))

    # --- segments: a fused bucket's consecutive tensors (lengths: Python ints, all > 0) -------
    def segment_sum(self, x, lengths):
        """1-D array of len(lengths): the sum of each consecutive segment of x (x's dtype)."""
        parts = self.split(x, list(lengths)) if len(lengths) > 1 else [x]
        return self.cat([self.reshape(self.sum(p), (1,)) for p in parts])

    def segment_amax(self, x, lengths):
        """1-D array of len(lengths): the maximum of each consecutive segment of x."""
        parts = self.split(x, list(lengths)) if len(lengths) > 1 else [x]
        return self.cat([self.reshape(self.amax(p), (1,)) for p in parts])

    def native_uniform(self, key, n: int, like):
        """n float32 uniforms in [0, 1) from the framework's own generator seeded by key (k1, k2):
        reproducible for a key on this backend, not bit-identical across backends (numpy: PCG64)."""
        import numpy as np
        k1, k2 = key
        return self.from_numpy(np.random.default_rng([int(k1), int(k2)]).random(n, dtype=np.float32), like)

    def lengths_array(self, lengths, like, dtype: str):
        """The segment lengths as a 1-D array of dtype on like's device (backends may cache it)."""
        import numpy as np
        return self.cast(self.from_numpy(np.asarray(list(lengths), dtype="int64"), like), dtype)

    def segment_abs_sum(self, x, lengths):
        """1-D array of len(lengths): sum |x| of each segment, accumulated in x's dtype (no wider)."""
        return self.segment_sum(self.abs(x), lengths)

    def segment_signed_sums(self, x, lengths):
        """(sum of the entries < 0, sum of the entries >= 0) of each segment, two 1-D arrays in x's dtype."""
        neg = x < 0
        zero = self.zeros_like(x)
        return self.segment_sum(self.where(neg, x, zero), lengths), self.segment_sum(self.where(neg, zero, x), lengths)

    def segment_count(self, mask, lengths):
        """1-D float64 array of len(lengths): the number of True entries of each segment of mask."""
        return self.segment_sum(self.cast(mask, "float64"), lengths)

    def segment_absmax(self, x, lengths):
        """1-D array of len(lengths): max |x| of each segment (exact: no rounding)."""
        return self.segment_amax(self.abs(x), lengths)

    def segment_mul_(self, x, v, lengths):
        """x (1-D) times v_i over its i-th segment (v: len(lengths), x's dtype); may modify x in place."""
        if len(lengths) == 1:
            return x * self.reshape(v, ())
        return x * self.repeat_segments(v, lengths)

    def block_norms(self, x, width: int):
        """1-D array of ceil(n / width): the L2 norm of each consecutive block of `width` entries
        (the last one may be shorter), accumulated in x's dtype."""
        n = self.numel(x)
        nb = -(-n // width)
        sq = self.reshape(self.pad_to(x * x, nb * width), (nb, width))
        return self.sqrt(self.rowsum(sq))

    def block_mul_(self, x, f, width: int):
        """x (1-D) times f_j over its j-th block of `width` entries; may modify x in place."""
        n = self.numel(x)
        nb = self.numel(f)
        if nb == 1:
            return x * self.reshape(f, ())
        yb = self.reshape(self.pad_to(x, nb * width), (nb, width)) * self.reshape(f, (nb, 1))
        return self.slice(self.reshape(yb, (-1,)), 0, n)

    def stochastic_round_(self, y, u):
        """floor(y) + [u < y - floor(y)] in y's dtype (u: uniforms in [0, 1)); may overwrite y."""
        fl = self.floor(y)
        return fl + self.cast(u < (y - fl), self.dtype(y))

    def repeat_segments(self, v, lengths):
        """v (len(lengths),) -> 1-D array of sum(lengths): v_i repeated lengths[i] times."""
        parts = [self.zeros(int(n), self.dtype(v), v) + self.slice(v, i, i + 1) for i, n in enumerate(lengths)]
        return parts[0] if len(parts) == 1 else self.cat(parts)

    # --- linear algebra --------------------------------------------------------------------
    def matmul(self, a, b): raise NotImplementedError
    def qr(self, a):
        """Q with orthonormal columns, signs fixed so diag(R) >= 0 (unique, backend-independent)."""
        raise NotImplementedError

    # --- bits --------------------------------------------------------------------------------
    def packbits(self, bits):
        """1-D bool/0-1 array -> uint8 array of ceil(n/8) bytes, most significant bit first."""
        n = self.numel(bits)
        pad = (-n) % 8
        b = self.cast(bits, "int32")
        if pad:
            b = self.pad_to(b, n + pad)
        b = self.reshape(b, (-1, 8))
        w = self.from_numpy(__import__("numpy").array([128, 64, 32, 16, 8, 4, 2, 1], dtype="int32"), b)
        return self.cast(self.rowsum(b * w), "uint8")

    def unpackbits(self, packed, n: int):
        """Inverse of packbits: uint8 -> int32 array of n 0/1 values."""
        import numpy as np
        p = self.reshape(self.cast(packed, "int32"), (-1, 1))
        shifts = self.from_numpy(np.array([[7, 6, 5, 4, 3, 2, 1, 0]], dtype="int32"), p)
        bits = self.band(self.shr_t(p, shifts), 1)
        return self.slice(self.reshape(bits, (-1,)), 0, n)

    def unpack_pm1(self, packed, n: int, dtype: str):
        """Bits (as packbits wrote them) -> n values in dtype: +1 for a 0 bit, -1 for a 1 bit."""
        return 1 - 2 * self.cast(self.unpackbits(packed, n), dtype)

    def unpack_01(self, packed, n: int, dtype: str):
        """Bits (as packbits wrote them) -> n values in dtype: 0 for a 0 bit, 1 for a 1 bit."""
        return self.cast(self.unpackbits(packed, n), dtype)

    def unpack_select(self, packed, n: int, if0, if1, lengths):
        """Bits -> n values: if0[i] where the bit is 0, if1[i] where it is 1, over segment i (if0, if1:
        1-D of len(lengths), the result's dtype). Exact: every output is one of the two values."""
        one = self.unpack_01(packed, n, self.dtype(if0))
        a = self.segment_mul_(1 - one, if0, lengths)
        return a + self.segment_mul_(one, if1, lengths)      # one term is exactly 0: no rounding

    def rowsum(self, x): raise NotImplementedError
    def shr_t(self, a, s): raise NotImplementedError             # shift by a tensor of shifts

    # --- device --------------------------------------------------------------------------------
    def device(self, x) -> str: return "cpu"
    def on_host(self, x) -> bool:
        """Is x in host memory (a CPU array)? Where the CPU and accelerator defaults differ."""
        return self.device(x) == "cpu"
    def traced(self) -> bool:
        """True while building a graph (tf.function): sizes that depend on data are unknown there,
        so algorithms must take a data-independent path."""
        return False

    # --- traced steps ------------------------------------------------------------------------
    def traced_key(self, seed: int, step, name: str, purpose: str):
        """rng key (k1, k2) for a step held in a graph tensor (only TF traces: gradcomp_tf)."""
        raise TypeError(f"step must be an int, got {type(step).__name__}")
