"""TensorFlow backend: TF ops on the tensor's own device, usable eagerly and inside tf.function."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradcomp.backend.base import Backend

_DT = {"float16": tf.float16, "bfloat16": tf.bfloat16, "float32": tf.float32, "float64": tf.float64,
       "int8": tf.int8, "uint8": tf.uint8, "int32": tf.int32, "int64": tf.int64, "bool": tf.bool}
_NAME = {v: k for k, v in _DT.items()}


class TFBackend(Backend):
    name = "tensorflow"

    def shape(self, x): return tuple(int(d) for d in x.shape)
    def numel(self, x):
        n = 1
        for d in x.shape:
            n *= int(d)
        return n
    def dtype(self, x):                 # an unsupported dtype (complex) keeps TF's name
        d = tf.as_dtype(x.dtype)
        return _NAME.get(d) or d.name
    def device(self, x): return getattr(x, "device", "") or "cpu"
    def on_host(self, x):                  # TF names it ".../device:CPU:0"
        d = self.device(x).upper()
        return d == "CPU" or ":CPU:" in d or d.endswith("CPU:0")
    def traced(self): return not tf.executing_eagerly()

    def zeros(self, n, dtype, like=None): return tf.zeros(n, dtype=_DT[dtype])
    def zeros_like(self, x): return tf.zeros_like(x)
    def arange(self, n, like=None, dtype="int64"): return tf.range(n, dtype=_DT[dtype])
    def from_numpy(self, a, like=None): return tf.convert_to_tensor(a)
    def to_numpy(self, x):
        x = tf.convert_to_tensor(x)
        if x.dtype == tf.bfloat16:
            x = tf.cast(x, tf.float32)
        return x.numpy()

    def reshape(self, x, shape): return tf.reshape(x, shape)
    def cat(self, xs): return tf.concat([tf.reshape(x, [-1]) for x in xs], 0)
    def split(self, x, sizes): return list(tf.split(x, list(sizes))) if sizes else []
    def slice(self, x, start, stop): return x[start:stop]
    def cast(self, x, dtype):
        d = _DT[dtype]
        return x if x.dtype == d else tf.cast(x, d)
    def copy(self, x): return tf.identity(x)
    def to_bytes(self, x):
        x = tf.reshape(x, [-1])
        if x.dtype in (tf.uint8,):
            return x
        if x.dtype in (tf.int8, tf.bool):
            return tf.bitcast(tf.cast(x, tf.int8), tf.uint8) if x.dtype == tf.bool else tf.bitcast(x, tf.uint8)
        return tf.reshape(tf.bitcast(x, tf.uint8), [-1])
    def from_bytes(self, b, dtype, shape):
        d = _DT[dtype]
        if d in (tf.uint8,):
            return tf.reshape(b, shape)
        size = d.size
        return tf.reshape(tf.bitcast(tf.reshape(b, [-1, size]) if size > 1 else b, d), shape)
    def transpose(self, x): return tf.transpose(x)
    def pad_to(self, x, n):
        k = int(x.shape[0])
        return x if k == n else tf.pad(x, [[0, n - k]])

    def abs(self, x): return tf.abs(x)
    def sign(self, x): return tf.sign(x)
    def sqrt(self, x): return tf.sqrt(x)
    def floor(self, x): return tf.floor(x)
    def minimum(self, a, b): return tf.minimum(a, b)
    def maximum(self, a, b): return tf.maximum(a, b)
    def where(self, c, a, b): return tf.where(c, a, b)
    def sum(self, x): return tf.reduce_sum(x)
    def amax(self, x): return tf.reduce_max(x) if self.numel(x) else tf.zeros((), x.dtype)
    def norm(self, x):
        x = tf.cast(x, tf.float64 if x.dtype == tf.float64 else tf.float32)
        return tf.sqrt(tf.reduce_sum(tf.square(x)))
    def mean_abs(self, x): return tf.reduce_mean(tf.abs(x)) if self.numel(x) else tf.zeros(())
    def count_nonfinite(self, x):
        if not x.dtype.is_floating:
            return tf.zeros((), tf.float32)
        return tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(x)), tf.float32))
    def item(self, x): return float(x.numpy()) if hasattr(x, "numpy") else float(x)
    def greater_equal(self, a, b): return tf.greater_equal(a, b)

    def bxor(self, a, b): return tf.bitwise.bitwise_xor(a, tf.cast(b, a.dtype) if not isinstance(b, int) else tf.constant(b, a.dtype))
    def band(self, a, b): return tf.bitwise.bitwise_and(a, tf.cast(b, a.dtype) if not isinstance(b, int) else tf.constant(b, a.dtype))
    def bor(self, a, b): return tf.bitwise.bitwise_or(a, tf.cast(b, a.dtype) if not isinstance(b, int) else tf.constant(b, a.dtype))
    def shr(self, a, s): return tf.bitwise.right_shift(a, tf.constant(s, a.dtype))
    def shl(self, a, s): return tf.bitwise.left_shift(a, tf.constant(s, a.dtype))
    def shr_t(self, a, s): return tf.bitwise.right_shift(a, tf.cast(s, a.dtype))
    def rowsum(self, x): return tf.reduce_sum(x, axis=1)

    def topk_abs(self, x, k):
        n = self.numel(x)
        if k >= n:
            return tf.range(n, dtype=tf.int64)
        a = tf.abs(x)
        if a.dtype in (tf.float16, tf.bfloat16):
            a = tf.cast(a, tf.float32)
        return tf.cast(tf.math.top_k(a, k, sorted=False).indices, tf.int64)
    def kth_largest_abs(self, x, k):
        a = tf.abs(tf.cast(x, tf.float32))
        return tf.math.top_k(a, k, sorted=True).values[k - 1]
    def gather(self, x, idx): return tf.gather(x, idx)
    def scatter(self, n, idx, values):
        return tf.scatter_nd(tf.reshape(idx, [-1, 1]), values, [n])  # duplicates are summed
    def scatter_add(self, n, idx, values):
        return tf.scatter_nd(tf.reshape(idx, [-1, 1]), values, [n])
    def nonzero(self, mask): return tf.reshape(tf.where(tf.reshape(mask, [-1])), [-1])
    def zero_at(self, x, idx):
        return tf.tensor_scatter_nd_update(x, tf.reshape(idx, [-1, 1]), tf.zeros(tf.shape(idx)[:1], x.dtype))
    def sort(self, x): return tf.sort(x)

    def native_uniform(self, key, n, like):
        seed = tf.cast(tf.stack([key[0], key[1]]), tf.int64)      # ints or traced key tensors
        return tf.random.stateless_uniform([n], seed=seed, dtype=tf.float32)

    def traced_key(self, seed, step, name, purpose):
        """The (seed, step, name, purpose) key with `step` a tensor: derived on the host per execution."""
        from gradcomp.rng import derive_key
        if not isinstance(step, tf.Tensor) or hasattr(step, "numpy"):
            return derive_key(seed, int(step), name, purpose)

        def host(s):
            return np.asarray(derive_key(seed, int(s), name, purpose), dtype=np.int64)
        k = tf.numpy_function(host, [step], tf.int64, stateful=False, name="gradcomp_rng_key")
        k.set_shape([2])
        return k[0], k[1]

    def matmul(self, a, b): return tf.matmul(a, b)
    def qr(self, a):
        src = tf.cast(a, tf.float32) if a.dtype in (tf.float16, tf.bfloat16) else a
        q, r = tf.linalg.qr(src)
        d = tf.sign(tf.linalg.diag_part(r))
        d = tf.where(tf.equal(d, 0), tf.ones_like(d), d)
        return tf.cast(q * d[None, :], a.dtype)
