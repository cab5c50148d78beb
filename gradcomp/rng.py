"""Counter-based randomness from `(seed, step, name)`: the same draws on every rank and backend.

No framework's global generator is touched. A key is derived from `(seed, step, name, purpose)`
with BLAKE2b; the stream is a 32-bit integer hash of `index + key`, computed with the backend's
own int64 operations on the array's device, so numpy, torch and TensorFlow produce bit-identical
values and every rank that shares `(seed, step, name)` draws the same indices or projections.
"""
from __future__ import annotations

import hashlib

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D   # multipliers < 2**31 keep (x < 2**32) * c inside int64
_C2 = 0x5BD1E995


def derive_key(seed: int, step: int, name: str, purpose: str = "") -> tuple[int, int]:
    h = hashlib.blake2b(f"{int(seed)}|{int(step)}|{name}|{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF, int.from_bytes(h[4:], "little") & 0x7FFFFFFF


def _mix(b, x):
    x = b.bxor(x, b.shr(x, 16))
    x = b.band(x * _C1, _M32)
    x = b.bxor(x, b.shr(x, 15))
    x = b.band(x * _C2, _M32)
    return b.bxor(x, b.shr(x, 16))


def hash_u32(b, key, n: int, like, offset: int = 0):
    """n pseudo-random 32-bit values (as int64) on the device of `like`.

    value_i = mix(bxor(mix((i + offset + k1) mod 2**32), k2)),  mix = the murmur3-style finalizer
    below. A backend may provide `counter_hash(k1, k2, n, like, offset)` computing exactly this
    (torch does: in place, in cache-sized chunks); the generic code is the reference.
    """
    k1, k2 = key
    fast = getattr(b, "counter_hash", None)
    if fast is not None and isinstance(k1, int) and isinstance(k2, int):
        return fast(k1, k2, n, like, offset, _C1, _C2)
    x = b.arange(n, like, "int64")
    if offset:
        x = x + offset
    x = b.band(x + k1, _M32)
    x = _mix(b, x)
    x = b.band(b.bxor(x, k2), _M32)
    return _mix(b, x)


def uniform(b, key, n: int, like, offset: int = 0):
    """n float32 uniforms in [0, 1) with 24 random bits each: (hash_u32 >> 8) * 2**-24. A backend may
    provide `counter_uniform(k1, k2, n, like, offset)` computing exactly this without the int64 array."""
    k1, k2 = key
    fast = getattr(b, "counter_uniform", None)
    if fast is not None and isinstance(k1, int) and isinstance(k2, int):
        return fast(k1, k2, n, like, offset, _C1, _C2)
    u = b.cast(b.shr(hash_u32(b, key, n, like, offset), 8), "float32")
    return u * (1.0 / 16777216.0)


def high_bits(b, key, n: int, like, drop: int):
    """n int32 values hash_u32 >> drop (1 <= drop < 32): the stream's top 32 - drop bits. A backend may
    provide `counter_bits(k1, k2, n, like, offset, drop)` computing exactly this without the int64 array."""
    if not 1 <= drop < 32:
        raise ValueError(f"drop must be in 1..31, got {drop}")
    k1, k2 = key
    fast = getattr(b, "counter_bits", None)
    if fast is not None and isinstance(k1, int) and isinstance(k2, int):
        return fast(k1, k2, n, like, 0, _C1, _C2, drop)
    return b.cast(b.shr(hash_u32(b, key, n, like), drop), "int32")


def rademacher(b, key, n: int, like, dtype: str = "float32"):
    """n values in {-1, +1}."""
    bit = b.band(b.shr(hash_u32(b, key, n, like), 13), 1)
    return b.cast(bit * 2 - 1, dtype)


def randint(b, key, n: int, high: int, like):
    """n int64 integers uniform in [0, high) (high < 2**31)."""
    return b.shr(hash_u32(b, key, n, like) * int(high), 32)


def host_randint(seed: int, step: int, name: str, purpose: str, high: int) -> int:
    """One shared integer in [0, high), computed on the host (for block offsets and schedules)."""
    k1, k2 = derive_key(seed, step, name, purpose)
    return ((k1 << 31) | k2) % max(1, int(high))
