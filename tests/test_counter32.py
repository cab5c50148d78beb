"""The torch backend's int32 counter hash (counter_bits, counter_uniform) gives the generic
int64 hash_u32 stream's bits exactly, across chunk boundaries and key/offset wrap-around."""
import pytest
import torch

from gradcomp import rng
from gradcomp.backend import torch_backend as tb


class _Generic:
    """The torch backend without its fast paths: rng falls back to the generic int64 ops."""
    def __init__(self, b):
        self._b = b

    def __getattr__(self, name):
        if name in ("counter_bits", "counter_uniform", "counter_hash"):
            raise AttributeError(name)
        return getattr(self._b, name)


@pytest.mark.parametrize("key", [(1, 2), (0xFFFFFFF0, 0xDEADBEEF), (2**31 - 3, 2**31 + 5)])
@pytest.mark.parametrize("drop", [1, 8, 9, 31])
def test_counter_bits_match_generic(key, drop, monkeypatch):
    monkeypatch.setattr(tb, "_HCHUNK32", 1000)          # several chunks, one ragged
    b = tb.TorchBackend()
    like = torch.zeros(1)
    n = 3500
    fast = rng.high_bits(b, key, n, like, drop)
    ref = rng.high_bits(_Generic(b), key, n, like, drop)
    assert fast.dtype == torch.int32
    assert torch.equal(fast, ref.to(torch.int32))


@pytest.mark.parametrize("key", [(7, 11), (0xFFFFFFFF, 0x80000000)])
def test_counter_uniform_matches_generic(key, monkeypatch):
    monkeypatch.setattr(tb, "_HCHUNK32", 1000)
    b = tb.TorchBackend()
    like = torch.zeros(1)
    for offset in (0, 999, 2**33 + 1):
        fast = rng.uniform(b, key, 3500, like, offset)
        ref = rng.uniform(_Generic(b), key, 3500, like, offset)
        assert torch.equal(fast, ref.to(fast.dtype))
