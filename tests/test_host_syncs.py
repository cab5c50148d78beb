"""Host synchronisations of a step do not grow with the number of buckets or tensors.

On CPU a counting backend wraps the two calls that move a device value to the host (`item`,
`to_numpy`); a step of many buckets must make as many of them as a step of one. With CUDA,
torch.cuda.set_sync_debug_mode("warn") counts real synchronisations the same way (skipped where
there is no GPU, as in CI).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import gradcomp
from gradcomp.backend import backend_by_name

SPECS = ["fp16", "signsgd", "efsignsgd", "onebit", "qsgd", "randomk:ratio=0.1", "randproj:ratio=4",
         "topk:ratio=0.1", "topk:ratio=0.1,scope=bucket"]


def _grads(torch, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(50 + 7 * i, generator=g).to(device) for i in range(12)}


def _step(sync, grads, nbuckets):
    names = list(grads)
    per = -(-len(names) // nbuckets)
    for i in range(0, len(names), per):
        sync.start({k: grads[k] for k in names[i:i + per]})
    return sync.finish()


@pytest.mark.parametrize("spec", SPECS)
def test_host_reads_per_step_do_not_grow_with_buckets(spec, monkeypatch):
    torch = pytest.importorskip("torch")
    b = backend_by_name("torch")
    count = {"n": 0}
    for meth in ("item", "to_numpy"):
        orig = getattr(b, meth)

        def counted(*a, _orig=orig, **k):
            count["n"] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(b, meth, counted)
    grads = _grads(torch)
    reads = {}
    for nb in (1, 4, 12):
        sync = gradcomp.GradientSync(spec, seed=0, check_config=False)
        _step(sync, grads, nb)                       # first step: state creation
        count["n"] = 0
        _step(sync, grads, nb)
        reads[nb] = count["n"]
    assert reads[4] == reads[1] == reads[12], reads
    assert reads[1] <= 2, reads                    # the flags of the step, the outputs' finiteness


@pytest.mark.skipif("not __import__('importlib').util.find_spec('torch')")
@pytest.mark.parametrize("spec", ["fp16", "signsgd", "randomk:ratio=0.1", "efsignsgd"])
def test_cuda_synchronisations_per_step_do_not_grow_with_buckets(spec):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    grads = _grads(torch, "cuda")
    syncs = {}
    for nb in (1, 12):
        sync = gradcomp.GradientSync(spec, seed=0, check_config=False)
        _step(sync, grads, nb)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _step(sync, grads, nb)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs[nb] = sum("synchroniz" in str(x.message) for x in w)
    assert syncs[12] == syncs[1], syncs


@pytest.mark.parametrize("spec", ["none", "randomk:ratio=0.1", "topk:ratio=0.1", "powersgd:rank=2"])
def test_cpu_finiteness_checks_read_the_host_once_per_bucket_not_per_tensor(spec):
    """Every tensor-to-host read torch makes (aten _local_scalar_dense: item(), bool(), float())
    during a one-bucket step: as many for 12 tensors as for 3. The CPU finiteness checks test all of a
    bucket's sums at once (Backend.count_nonfinite_all), not one bool() per tensor."""
    torch = pytest.importorskip("torch")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.n += func.overloadpacket.__name__ == "_local_scalar_dense"
            return func(*args, **(kwargs or {}))

    def reads(count):
        g = torch.Generator().manual_seed(1)
        grads = {f"t{i}": torch.randn(8, 40 + i, generator=g) for i in range(count)}
        sync = gradcomp.GradientSync(spec, seed=0)
        sync.step(grads)                      # first sight: state created
        Reads.n = 0
        with Reads():
            sync.step(grads)
        return Reads.n

    assert reads(12) == reads(3)
