"""gradcomp_torch.VirtualWorkers: on one process it is plain large-batch SGD; under mpirun -np 2 the same V
gives the same model as on one rank (bit for bit with V=2, float64), also while the load balancer moves
virtual workers away from a slowed rank (tests/mpi_scripts/virtual_checks.py)."""
import pytest

torch = pytest.importorskip("torch")

import gradcomp  # noqa: E402
import gradcomp_torch as gct  # noqa: E402

from test_torch_multiproc import LAUNCH, _checks, _mpirun  # noqa: E402


def _model():
    g = torch.Generator().manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.4)
    return m


def _data(n=100):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=g, dtype=torch.float64)
    return x, (x @ torch.randn(10, 3, generator=g, dtype=torch.float64)).argmax(-1)


def test_virtual_workers_on_one_rank_equal_large_batch_sgd():
    """V=4 virtual workers accumulated on one rank (with a short last step) = SGD on each step's whole batch."""
    x, y = _data()
    m = _model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=m.named_parameters(), comm=gradcomp.SingleCommunicator())
    vw = gct.VirtualWorkers(opt, len(x), micro_batch=8, virtual_workers=4)
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(2):
        for step in vw.epoch(epoch):
            assert len(step) == 4 and step.weight == 1.0
            for mb in step:
                (torch.nn.functional.cross_entropy(m(x[mb.indices]), y[mb.indices]) * mb.loss_scale).backward()
            opt.step()
            opt.zero_grad()
            idx = torch.from_numpy(vw.sampler.step_samples(epoch, step.index))
            torch.nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
            ref_opt.step()
            ref_opt.zero_grad()
    assert len(vw) == 4 and vw.global_batch == 32
    err = max(float((a - b).detach().abs().max()) for a, b in zip(m.parameters(), ref.parameters()))
    assert err < 1e-12
    st = vw.stats(skip=0)
    assert st["summary"]["steps"] == 8 and st["shares"] == [4] and st["last"]["samples"] == [4]


def test_virtual_workers_arguments(monkeypatch):
    m = _model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                   comm=gradcomp.SingleCommunicator())
    with pytest.raises(ValueError, match="exactly one of global_batch"):
        gct.VirtualWorkers(opt, 100)
    with pytest.raises(ValueError, match="smaller than virtual_workers"):
        gct.VirtualWorkers(opt, 100, global_batch=4, virtual_workers=8)
    with pytest.raises(TypeError, match="DistributedOptimizer"):
        gct.VirtualWorkers(torch.optim.SGD(m.parameters(), lr=0.1), 100, global_batch=8)
    monkeypatch.setenv("GRADCOMP_VIRTUAL_WORKERS", "6")
    assert gct.VirtualWorkers(opt, 100, micro_batch=2).global_batch == 12
    monkeypatch.setenv("GRADCOMP_VIRTUAL_WORKERS", "-1")
    with pytest.raises(ValueError, match="GRADCOMP_VIRTUAL_WORKERS"):
        gct.VirtualWorkers(opt, 100, micro_batch=2)
    with pytest.raises(ValueError, match="weight"):
        opt.set_step_share(1, -0.5)
    x, y = _data(8)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    with pytest.raises(RuntimeError, match="during a step"):
        opt.set_step_share(2)
    opt.step()
    opt.set_step_share(2, 0.5)                      # between steps: fine


CHECKS = ["v2_bit_exact", "v4_fp64", "balanced_same", "report", "example_v2", "benchmark_run"]


@LAUNCH
def test_virtual_workers_under_mpirun():
    """1 vs 2 ranks, same V: bit-exact (V=2) / float64 rounding (V=4, and with the balancer active under an
    injected delay on rank 1); the balancer's shares agree on both ranks every step; the report too; the
    example's --virtual-workers 2 gives the same model on 1 and 2 ranks."""
    _checks(*_mpirun("virtual_checks.py", "--backend", "mpi"), CHECKS)


def test_virtual_workers_state_dict_and_resize():
    m = _model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                   comm=gradcomp.SingleCommunicator())
    vw = gct.VirtualWorkers(opt, 64, global_batch=16, virtual_workers=4)
    x, y = _data(64)
    for step in vw.epoch(0):
        for mb in step:
            (torch.nn.functional.cross_entropy(m(x[mb.indices]), y[mb.indices]) * mb.loss_scale).backward()
        opt.step()
        opt.zero_grad()
    sd = vw.state_dict()
    again = gct.VirtualWorkers(opt, 64, global_batch=16, virtual_workers=4)
    again.load_state_dict(sd)
    assert again.global_step == 4 and again.shares == (4,)
    with pytest.raises(ValueError, match="virtual_workers=4 but this job declares 8"):
        gct.VirtualWorkers(opt, 64, global_batch=16, virtual_workers=8).load_state_dict(sd)
    again.resize()
    assert again.shares == (4,) and again.virtual_workers == 4 and again.global_batch == 16
    assert [len(s) for s in again.epoch(1, start_step=2)] == [4, 4]
