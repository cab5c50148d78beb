"""torchrun-style elastic resume (gradcomp_torch.elastic.save_elastic / load_elastic) on in-process
ranks: exact on the same world size; on another size the old ranks' residuals are merged into a
pending flush, exactly, and reach the first update of the new world."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradcomp  # noqa: E402
import gradcomp_torch as gct  # noqa: E402
import gradcomp_torch.elastic as gce  # noqa: E402
from gradcomp import elastic as core  # noqa: E402

pytestmark = pytest.mark.torch

GEN = torch.Generator().manual_seed(3)
X = torch.randn(12, 4, 10, 5, generator=GEN)           # [step, rank, batch, features]
Y = torch.randint(0, 3, (12, 4, 10), generator=GEN)


def build(comm, lr=0.1):
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=lr), named_parameters=m.named_parameters(),
                                   compressor="topk:ratio=0.2", memory="residual", comm=comm)
    return m, opt


def train(m, opt, comm, steps):
    for s in steps:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(X[s, comm.rank]), Y[s, comm.rank]).backward()
        opt.step()


def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def test_same_size_resume_is_exact(tmp_path):
    path = str(tmp_path / "el.pt")

    def fn(comm):
        m, opt = build(comm)
        train(m, opt, comm, range(6))
        m_a, opt_a = build(comm)
        train(m_a, opt_a, comm, range(3))
        gce.save_elastic(path, m_a, opt_a, {"batch": 3})
        comm.barrier()
        m_b, opt_b = build(comm)
        extra = gce.load_elastic(path, m_b, opt_b)
        train(m_b, opt_b, comm, range(extra["batch"], 6))
        return flat(m), flat(m_b)

    for full, resumed in gradcomp.LocalWorld(2, timeout=120).run(fn):
        assert torch.equal(full, resumed)


def test_resize_merges_residuals_into_the_first_update(tmp_path):
    """3 ranks save, 2 ranks resume: the pending flush is exactly the sum of the three ranks'
    residuals, residuals restart at zero, and the first update differs from one without the
    flush by exactly lr * sum / 3."""
    path, lr = str(tmp_path / "el.pt"), 0.1

    def old(comm):
        m, opt = build(comm, lr)
        train(m, opt, comm, range(3))
        held = core.held_mass(opt.gradient_sync)
        gce.save_elastic(path, m, opt, {"batch": 3})
        return held

    held = gradcomp.LocalWorld(3, timeout=120).run(old)

    def new(comm):
        m, opt = build(comm, lr)
        extra = gce.load_elastic(path, m, opt)
        gs = opt.gradient_sync
        pend = {k: v.clone() for k, v in gs._flushed.items()}
        zero = all(not torch.any(torch.as_tensor(gs.residual(n))) for n in gs._mem)
        m_ref, opt_ref = build(comm, lr)                 # same model and step, no flush
        gce.load_elastic(path, m_ref, opt_ref)
        opt_ref.gradient_sync._flushed = {}
        train(m, opt, comm, [extra["batch"]])
        train(m_ref, opt_ref, comm, [extra["batch"]])
        return pend, zero, gs.steps, {n: p.detach().clone() for n, p in m.named_parameters()}, \
            {n: p.detach().clone() for n, p in m_ref.named_parameters()}, gs._flushed

    for pend, zero, steps, after, ref, left in gradcomp.LocalWorld(2, timeout=120).run(new):
        assert zero and steps == 4 and not left
        for n, v in pend.items():
            want = held[0][n] + held[1][n] + held[2][n]
            assert np.any(want)
            np.testing.assert_array_equal(v.numpy().reshape(want.shape), want)     # exact
            np.testing.assert_allclose((ref[n] - after[n]).numpy(), lr * want / 3, rtol=1e-4, atol=1e-6)


def test_resize_refused_under_a_periodic_policy(tmp_path):
    path = str(tmp_path / "el.pt")

    def old(comm):
        m = torch.nn.Linear(3, 2)
        opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                       compressor="none", sync="localsgd:period=2", comm=comm)
        gce.save_elastic(path, m, opt)

    gradcomp.LocalWorld(2, timeout=120).run(old)
    m = torch.nn.Linear(3, 2)
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                   compressor="none", sync="localsgd:period=2", comm=gradcomp.SingleCommunicator())
    with pytest.raises(ValueError, match="same world size"):
        gce.load_elastic(path, m, opt)


def test_failure_restore_mid_step_rolls_back_with_zero_residuals():
    """What TorchState.restore does after HorovodInternalError: the step in flight (backward done,
    collectives issued) is dropped, the last commit comes back, residuals restart at zero, and
    training goes on with identical ranks."""
    def fn(comm):
        m, opt = build(comm)
        train(m, opt, comm, range(2))
        saved = gce._saved(opt)
        params = flat(m).clone()
        train(m, opt, comm, [2])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(X[3, comm.rank]), Y[3, comm.rank]).backward()   # in flight
        with torch.no_grad():                               # the model handler's restore
            off = 0
            for p in m.parameters():
                p.copy_(params[off:off + p.numel()].view_as(p))
                off += p.numel()
        gce._abandon_step(opt)
        gce._restore_saved(opt, saved)
        gs = opt.gradient_sync
        ok = gs.steps == 2 and opt._step == 2 and all(not torch.any(torch.as_tensor(gs.residual(n))) for n in gs._mem)
        train(m, opt, comm, [2, 3])
        return ok, flat(m)

    (ok0, a), (ok1, b) = gradcomp.LocalWorld(2, timeout=120).run(fn)
    assert ok0 and ok1 and torch.equal(a, b)
