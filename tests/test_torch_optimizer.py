"""gradcomp_torch.DistributedOptimizer on in-process ranks (gradcomp.LocalWorld threads).

Each rank builds its own model (same seed) and optimizer; references are computed in plain torch.
"""
import io
import warnings

import pytest

torch = pytest.importorskip("torch")

import gradcomp  # noqa: E402
import gradcomp_torch as gct  # noqa: E402
from gradcomp.sync.base import SyncPolicy  # noqa: E402

pytestmark = pytest.mark.torch

N = 2
GEN = torch.Generator().manual_seed(123)
X = torch.randn(8, N, 12, 5, generator=GEN)          # [step, rank, batch, features]
Y = torch.randint(0, 3, (8, N, 12), generator=GEN)


def make_model(seed=0, width=8):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def loss_of(m, step, rank):
    return torch.nn.functional.cross_entropy(m(X[step, rank]), Y[step, rank])


def wrap(m, comm, opt=None, **kw):
    opt = opt or torch.optim.SGD(m.parameters(), lr=0.1)
    kw.setdefault("compressor", "none")
    return gct.DistributedOptimizer(opt, named_parameters=m.named_parameters(), comm=comm, **kw)


def reference_sgd(steps, lr=0.1, momentum=0.0):
    """Plain SGD on the average of every rank's gradient."""
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)
    for s in range(steps):
        grads = []
        for r in range(N):
            m.zero_grad()
            loss_of(m, s, r).backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        for p, *gs in zip(m.parameters(), *grads):
            p.grad = sum(gs) / N
        opt.step()
    return [p.detach() for p in m.parameters()]


def params(m):
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("bucket_mb", [0, 25])
def test_none_steps_equal_averaged_sgd(bucket_mb):
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), bucket_mb=bucket_mb)
        for s in range(3):
            opt.zero_grad()
            loss_of(m, s, comm.rank).backward()
            opt.step()
        return params(m), opt.stats()

    ref = reference_sgd(3, momentum=0.9)
    for got, stats in gradcomp.LocalWorld(N).run(fn):
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert stats["steps"] == 3 and stats["bytes_sent"] == stats["bytes_dense"] > 0


class CountingComm(gradcomp.Communicator):
    """Delegates to a LocalWorld rank and counts the gradient payload collectives issued so far."""

    def __init__(self, inner):
        self.inner, self.rank, self.size, self.local_rank = inner, inner.rank, inner.size, inner.local_rank
        self.payloads = 0

    def allreduce(self, x, *, name=""):
        self.payloads += name.startswith("step")
        return self.inner.allreduce(x, name=name)

    def allgather(self, x, *, name=""):
        self.payloads += name.startswith("step")
        return self.inner.allgather(x, name=name)

    def broadcast(self, x, *, root=0, name=""):
        return self.inner.broadcast(x, root=root, name=name)


def test_buckets_go_out_during_backward():
    """With one bucket per tensor, buckets go out from the gradient hooks while backward still runs
    (a hook on the first layer, which fires before backward returns, already sees them)."""
    def fn(comm):
        comm = CountingComm(comm)
        m = make_model()
        opt = wrap(m, comm, bucket_mb=0)
        seen = []
        m[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(comm.payloads))  # among the last
        loss_of(m, 0, comm.rank).backward()
        at_end = comm.payloads
        opt.step()
        return seen, at_end

    for seen, at_end in gradcomp.LocalWorld(N).run(fn):
        assert seen and seen[0] >= 2 and at_end == 4, (seen, at_end)   # launched by hooks, not at the end


def test_parameters_without_grad_consistent():
    """Rank 0 uses only branch a, rank 1 only branch b: each branch gets (its grad + 0) / 2 on both."""
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)

    def build():                     # no global RNG: the ranks are threads building at the same time
        m, g = Two(), torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return m

    def fn(comm):
        m = build()
        opt = wrap(m, comm, bucket_mb=0)
        branch = m.a if comm.rank == 0 else m.b
        branch(X[0, comm.rank]).pow(2).mean().backward()
        opt.step()
        return params(m)

    res = gradcomp.LocalWorld(N).run(fn)
    m = build()
    m.a(X[0, 0]).pow(2).mean().backward()
    m.b(X[0, 1]).pow(2).mean().backward()
    with torch.no_grad():
        ref = [p - 0.1 * p.grad / N for p in m.parameters()]
    for got in res:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)
    assert all(torch.equal(a, b) for a, b in zip(res[0], res[1]))


def roundtrip(obj):
    """Through bytes, as a checkpoint file (torch's state_dicts alias live tensors)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("compressor", ["topk:ratio=0.2", "randomk:ratio=0.3"])
def test_checkpoint_resume_is_exact(compressor):
    total, cut = 6, 3

    def run(comm, resume_from=None, steps=range(total)):
        m = make_model()
        opt = wrap(m, comm, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), compressor=compressor)
        if resume_from is not None:
            m.load_state_dict(resume_from["model"])
            opt.load_state_dict(resume_from["opt"])
        for s in steps:
            opt.zero_grad()
            loss_of(m, s, comm.rank).backward()
            opt.step()
        return m, opt

    def fn(comm):
        m_full, _ = run(comm)
        m_a, opt_a = run(comm, steps=range(cut))
        own = roundtrip({"model": m_a.state_dict(), "opt": opt_a.state_dict()})
        gathered = roundtrip({"model": m_a.state_dict(), "opt": opt_a.gathered_state_dict()})
        residual = opt_a.gradient_sync.residual("0.weight")
        m_b, _ = run(comm, own, range(cut, total))
        m_c, _ = run(comm, gathered, range(cut, total))
        return params(m_full), params(m_b), params(m_c), residual, gathered

    res = gradcomp.LocalWorld(N).run(fn)
    for full, own, gathered, residual, _ in res:
        assert residual is not None and float(residual.abs().sum()) > 0   # there was something to restore
        assert all(torch.equal(a, b) for a, b in zip(full, own))
        assert all(torch.equal(a, b) for a, b in zip(full, gathered))
    assert not torch.equal(res[0][3], res[1][3])                        # residuals really are per rank

    # a file holding only rank 0's part cannot silently restore rank 1
    only0 = res[0][4]["opt"]
    only0["gradcomp"]["ranks"] = {0: only0["gradcomp"]["ranks"][0]}

    def load(comm):
        m = make_model()
        opt = wrap(m, comm, compressor=compressor)
        try:
            opt.load_state_dict(only0)
        except ValueError as e:
            return str(e)
        return None

    msgs = gradcomp.LocalWorld(N).run(load)
    assert msgs[0] is None and "gathered_state_dict" in msgs[1]


def test_backward_passes_per_step():
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, backward_passes_per_step=2)
        opt.zero_grad()
        for s in range(2):
            loss_of(m, s, comm.rank).backward()
            assert opt.stats()["steps"] == 0
        opt.step()
        sent = opt.stats()
        # a third pass before step() is an error
        opt.zero_grad()
        for s in range(2):
            loss_of(m, s, comm.rank).backward()
        with pytest.raises(RuntimeError, match="backward_passes_per_step"):
            loss_of(m, 2, comm.rank).backward()
        return params(m), sent

    res = gradcomp.LocalWorld(N).run(fn)
    m = make_model()
    for s in range(2):
        for r in range(N):
            loss_of(m, s, r).backward()              # sum over passes, then average over ranks
    with torch.no_grad():
        ref = [p - 0.1 * p.grad / N for p in m.parameters()]
    for got, stats in res:
        assert stats["steps"] == 1                   # one communication for two passes
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_synchronize_and_skip_synchronize():
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm)
        loss_of(m, 0, comm.rank).backward()
        opt.synchronize()
        avg = [p.grad.clone() for p in m.parameters()]
        for p in m.parameters():
            p.grad.mul_(0.5)                         # e.g. clipping, after synchronize()
        with opt.skip_synchronize():
            opt.step()
        after = params(m)
        opt.zero_grad()
        loss_of(m, 1, comm.rank).backward()
        with pytest.raises(RuntimeError, match="synchronize"):
            with opt.skip_synchronize():
                opt.step()                           # gradients still in flight
        opt.step()
        return avg, after

    m = make_model()
    start = params(m)
    for avg, after in gradcomp.LocalWorld(N).run(fn):
        for p0, g, p1 in zip(start, avg, after):
            torch.testing.assert_close(p1, p0 - 0.1 * 0.5 * g)


def test_grad_scaler_skips_consistently():
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, compressor="fp16")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        out = []
        for s in range(3):
            opt.zero_grad()
            loss = loss_of(m, s, comm.rank)
            if s == 1 and comm.rank == 1:
                loss = loss * float("inf")           # only rank 1 overflows
            scaler.scale(loss).backward()
            scaler.step(opt)                         # reads param_groups: sees averaged gradients
            scaler.update()
            out.append((scaler.get_scale(), params(m)))
        return out, opt.stats()

    (r0, st0), (r1, st1) = gradcomp.LocalWorld(N).run(fn)
    for (s0, p0), (s1, p1) in zip(r0, r1):
        assert s0 == s1
        assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert r0[1][0] == r0[0][0] / 2                              # the scale backed off on both
    assert all(torch.equal(a, b) for a, b in zip(r0[0][1], r0[1][1]))   # step 1 skipped
    assert not all(torch.equal(a, b) for a, b in zip(r0[1][1], r0[2][1]))
    assert st0["steps"] == 2                                     # the bad step committed nothing


def test_nonfinite_without_scaler_raises_on_every_rank():
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, compressor="topk:ratio=0.5")
        before = params(m)
        loss = loss_of(m, 0, comm.rank) * (float("nan") if comm.rank == 0 else 1.0)
        loss.backward()
        with pytest.raises(gct.NonFiniteGradientError):
            opt.step()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, params(m)))
        opt.zero_grad()
        loss_of(m, 1, comm.rank).backward()
        opt.step()                                   # training goes on
        return unchanged

    assert gradcomp.LocalWorld(N).run(fn) == [True, True]


def test_config_mismatch_raises_on_all_ranks():
    def fn(comm, kind):
        m = make_model(width=8 if kind == "comp" or comm.rank == 0 else 9)
        comp = "topk:ratio=0.1" if kind == "comp" and comm.rank == 1 else "none"
        try:
            wrap(m, comm, compressor=comp)
        except gradcomp.ConfigMismatchError as e:
            return str(e)
        return None

    for kind, word in (("comp", "topk"), ("shape", "tensors")):
        msgs = gradcomp.LocalWorld(N, timeout=30).run(fn, kind)
        assert all(msg is not None and word in msg for msg in msgs), msgs


def test_parameters_in_another_order_raise_config_mismatch_on_all_ranks():
    """Same names and shapes, but rank 1's optimizer holds them in reverse order: the buckets would
    fuse different layers together, so every rank stops and names the first differing position."""
    def fn(comm):
        m = make_model()
        ps = list(m.parameters())
        opt = torch.optim.SGD(ps[::-1] if comm.rank == 1 else ps, lr=0.1)
        try:
            wrap(m, comm, opt=opt)
        except gradcomp.ConfigMismatchError as e:
            return str(e)
        return None

    msgs = gradcomp.LocalWorld(N, timeout=30).run(fn)
    assert all(msg is not None and 'order: first difference at position 0: rank 0: "0.weight"; '
               'rank 1: "2.bias"' in msg for msg in msgs), msgs


def test_bad_specs_raise_value_error():
    m = make_model()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    comm = gradcomp.SingleCommunicator()
    for kw in ({"compressor": "nosuch"}, {"compressor": "topk:ratio=2"}, {"memory": "nosuch"},
               {"sync": "nosuch"}, {"compressor": "topk:bogus=1"}):
        with pytest.raises(ValueError):
            gct.DistributedOptimizer(sgd, named_parameters=m.named_parameters(), comm=comm, **kw)
    with pytest.raises(ValueError, match="named_parameters"):
        gct.DistributedOptimizer(sgd, named_parameters=list(m.named_parameters())[:1], comm=comm)
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        gct.DistributedOptimizer(sgd, backward_passes_per_step=0, comm=comm)


def test_issue_listed_bad_arguments_raise_saying_what_to_do():
    m = make_model()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    comm = gradcomp.SingleCommunicator()
    for kw, msg in (({"bucket_mb": "abc"}, r"bucket_mb='abc' is not valid; expected a non-negative number of MiB, "
                                           r"e\.g\. bucket_mb=25"),
                    ({"bucket_mb": True}, "bucket_mb=True is not valid"),
                    ({"seed": True}, r"seed=True is not valid; expected an int, e\.g\. seed=0"),
                    ({"compressor": "topk:ratio=0.01,ratio=0.02"}, "'ratio' is given twice"),
                    ({"compressor": "fp16:prescale=inf"}, "expected a finite float")):
        with pytest.raises(ValueError, match=msg):
            gct.DistributedOptimizer(sgd, named_parameters=m.named_parameters(), comm=comm, **kw)
    z = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="parameter 'z' has dtype complex64.*complex gradients are not supported"):
        gct.DistributedOptimizer(torch.optim.SGD([*m.parameters(), z], lr=0.1),
                                 named_parameters=[*m.named_parameters(), ("z", z)], comm=comm)


def test_fp16_overflow_of_a_finite_gradient_raises_on_every_rank_and_keeps_parameters():
    """A finite 7e4 on one rank overflows fp16's wire: every rank raises instead of stepping to -inf."""
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, compressor="fp16")
        loss = loss_of(m, 0, comm.rank)
        if comm.rank == 1:                 # d/dw of this term: a finite 7e4 > fp16's 65504
            loss = loss + 7e4 * m[0].weight[0, 0]
        loss.backward()
        before = params(m)
        with pytest.raises(gct.NonFiniteGradientError, match="overflowed"):
            opt.step()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, params(m)))
        opt.zero_grad()
        loss_of(m, 1, comm.rank).backward()
        opt.step()
        return unchanged and all(torch.isfinite(p).all() for p in m.parameters())

    assert gradcomp.LocalWorld(N, timeout=30).run(fn) == [True, True]


def test_env_configures_compressor(monkeypatch):
    monkeypatch.setenv("GRADCOMP_COMPRESSOR", "topk:ratio=0.05")
    monkeypatch.delenv("GRADCOMP_MEMORY", raising=False)
    m = make_model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                   comm=gradcomp.SingleCommunicator())
    assert opt.compressor.name == "topk" and opt.compressor.ratio == 0.05
    assert opt.gradient_sync.memory.name == "residual"
    monkeypatch.setenv("GRADCOMP_COMPRESSOR", "bogus")
    with pytest.raises(ValueError, match="GRADCOMP_COMPRESSOR"):
        gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), comm=gradcomp.SingleCommunicator())


class RecordingPolicy(SyncPolicy):
    """Averages gradients on even steps only; checks the view in before/after_step."""
    name = "recording"

    def __init__(self):
        super().__init__()
        self.calls = []

    def sync_gradients(self, step):
        return step % 2 == 0

    def before_step(self, step, view):
        self.calls.append(("before", step))

    def after_step(self, step, view):
        self.calls.append(("after", step))
        name = view.names()[0]
        mom = view.momentum(name)
        assert mom is not None and tuple(mom.shape) == tuple(view.get(name).shape)
        view.set_momentum(name, mom * 1.0)
        view.set(name, view.get(name) + 0.0)


def test_sync_policy_protocol():
    def fn(comm):
        m = make_model()
        pol = RecordingPolicy()
        opt = wrap(m, comm, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), sync=pol)
        same = []
        for s in range(4):
            opt.zero_grad()
            loss_of(m, s, comm.rank).backward()
            opt.step()
            same.append(params(m))
        return pol.calls, same, opt.stats()["steps"]

    res = gradcomp.LocalWorld(N).run(fn)
    assert res[0][0] == [(k, s) for s in range(4) for k in ("before", "after")]
    assert res[0][2] == 2                                   # gradients averaged on steps 0 and 2 only
    p0, p1 = res[0][1], res[1][1]
    assert all(torch.equal(a, b) for a, b in zip(p0[0], p1[0]))       # after an averaged step: equal
    assert not all(torch.equal(a, b) for a, b in zip(p0[1], p1[1]))   # after a local step: differ


def test_localsgd_policy_averages_parameters():
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), sync="localsgd:period=2")
        out = []
        for s in range(4):
            opt.zero_grad()
            loss_of(m, s, comm.rank).backward()
            opt.step()
            out.append(params(m))
        return out, opt.stats()["steps"]

    (a, sa), (b, sb) = gradcomp.LocalWorld(N).run(fn)
    assert sa == sb == 0
    assert not all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y)


def test_sync_view_momentum_keys():
    m = make_model()
    for opt, key in ((torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), "momentum_buffer"),
                     (torch.optim.Adam(m.parameters(), lr=0.1), "exp_avg")):
        view = gct.TorchParamAccess(list(m.named_parameters()), opt)
        assert view.momentum("0.weight") is None
        loss_of(m, 0, 0).backward()
        opt.step()
        buf = view.momentum("0.weight")
        assert buf is opt.state[m[0].weight][key]
        view.set_momentum("0.weight", torch.zeros(buf.numel()))
        assert float(opt.state[m[0].weight][key].abs().sum()) == 0
        view.set("0.bias", torch.ones(8))
        assert torch.equal(m[0].bias.detach(), torch.ones(8))
        with pytest.raises(ValueError):
            view.set("0.bias", torch.ones(3))
        m.zero_grad()


def test_broadcast_parameters_and_optimizer_state():
    def fn(comm):
        m = make_model(seed=comm.rank)
        opt = torch.optim.Adam(m.parameters(), lr=0.01 * (comm.rank + 1))
        loss_of(m, comm.rank, comm.rank).backward()
        opt.step()
        gct.broadcast_parameters(m.state_dict(), root_rank=1, comm=comm)
        gct.broadcast_optimizer_state(opt, root_rank=1, comm=comm)
        return params(m), opt.state_dict()

    (p0, s0), (p1, s1) = gradcomp.LocalWorld(N).run(fn)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert s0["param_groups"][0]["lr"] == s1["param_groups"][0]["lr"] == 0.02
    for k in s1["state"]:
        assert torch.equal(s0["state"][k]["exp_avg"], s1["state"][k]["exp_avg"])


def test_zero_grad_while_in_flight_keeps_ranks_in_step():
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, compressor="topk:ratio=0.5")
        loss_of(m, 0, comm.rank).backward()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.zero_grad()
        loss_of(m, 1, comm.rank).backward()
        opt.step()
        return params(m), [str(x.message) for x in w]

    (p0, w0), (p1, w1) = gradcomp.LocalWorld(N).run(fn)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert any("zero_grad" in s for s in w0)


def test_lr_scheduler_and_closure():
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

        def closure():
            opt.zero_grad()
            loss = loss_of(m, 0, comm.rank)
            loss.backward()
            return loss

        loss = opt.step(closure)
        sched.step()
        return loss.item(), opt.param_groups[0]["lr"], params(m)

    res = gradcomp.LocalWorld(N).run(fn)
    ref = reference_sgd(1)
    for loss, lr, got in res:
        assert lr == pytest.approx(0.05) and loss > 0
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)


def test_horovod_compression_objects():
    C = gct.Compression
    assert {"none", "fp16", "bf16"} <= set(C.available())
    for bad in ("topk", "randomk"):
        assert bad not in C.available()
        with pytest.raises(AttributeError, match="DistributedOptimizer"):
            getattr(C, bad)
        with pytest.raises(ValueError, match="DistributedOptimizer"):
            C.get(bad)
    with pytest.raises(AttributeError):
        C.nosuch
    # Horovod's protocol by hand: compress on every rank, average the payloads, decompress
    grads = [torch.randn(4, 6, generator=GEN) for _ in range(N)]
    for comp, tol in ((C.none, 0.0), (C.fp16, 1e-3), (C.bf16, 1e-2), (C.get("fp16:prescale=0.5"), 1e-3)):
        packed = [comp.compress(g) for g in grads]
        wire = sum(t for t, _ in packed) / N
        out = comp.decompress(wire, packed[0][1])
        assert out.dtype == torch.float32 and out.shape == (4, 6)
        torch.testing.assert_close(out, sum(grads) / N, rtol=tol, atol=tol)
    t, ctx = C.fp16.compress(torch.arange(3))                 # integers pass through untouched
    assert t.dtype == torch.int64 and C.fp16.decompress(t, ctx) is t
    assert C.fp16.compress(torch.ones(3))[0].dtype == torch.float16


def test_local_steps_with_grad_scaler_agree_on_overflow():
    """localsgd averages no gradients: synchronize() still makes every rank skip an overflow together."""
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, sync="localsgd:period=2")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        scales = []
        for s in range(5):
            opt.zero_grad()
            loss = loss_of(m, s, comm.rank)
            if s == 1 and comm.rank == 0:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            opt.synchronize()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        return scales, params(m)

    (s0, p0), (s1, p1) = gradcomp.LocalWorld(N).run(fn)
    assert s0 == s1 and s0[1] == s0[0] / 2
    for a, b in zip(p0, p1):                  # 4 optimizer steps taken (one skipped); the 4th syncs
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sync", ["localsgd:period=3", "da:period=3", "da-pipelined:period=3",
                                  "slowmo:period=3,buffers=average"])
def test_nan_on_a_local_step_raises_on_every_rank_and_changes_nothing(sync):
    """A periodic policy's local step averages no gradients, but plain step() still agrees on NaN:
    every rank raises, no parameter or momentum buffer moves, and training goes on in step."""
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), sync=sync)
        for s in range(4):
            opt.zero_grad()
            loss = loss_of(m, s, comm.rank)
            if s == 1 and comm.rank == 1:
                loss = loss * float("nan")
            loss.backward()
            if s != 1:
                opt.step()
                continue
            before = params(m), {k: v["momentum_buffer"].clone() for k, v in opt.state.items()}
            try:
                opt.step()
                return "no error"
            except gct.NonFiniteGradientError as e:
                assert "local step" in str(e) and "no parameter or optimizer state was changed" in str(e), e
            assert all(torch.equal(a, b) for a, b in zip(before[0], params(m)))
            assert all(torch.equal(before[1][k], v["momentum_buffer"]) for k, v in opt.state.items())
        opt.policy.flush()
        return params(m)

    p0, p1 = gradcomp.LocalWorld(N, timeout=60).run(fn)
    assert p0 != "no error" and p1 != "no error"
    for a, b in zip(p0, p1):                  # steps 0, 2, 3 taken; the third (step 3) synchronized
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_local_steps_with_grad_scaler_need_no_synchronize_call():
    """GradScaler.unscale_ reads param_groups, which runs the local step's agreement: both ranks
    skip rank 0's overflow together without an explicit opt.synchronize()."""
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, sync="localsgd:period=2")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        scales = []
        for s in range(5):
            opt.zero_grad()
            loss = loss_of(m, s, comm.rank)
            if s == 1 and comm.rank == 0:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        return scales, params(m)

    (s0, p0), (s1, p1) = gradcomp.LocalWorld(N, timeout=30).run(fn)
    assert s0 == s1 and s0[1] == s0[0] / 2
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b)


def test_reading_param_groups_on_one_rank_only():
    """A rank that reads param_groups between backward and step finishes its averaging early; harmless."""
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), compressor="powersgd")
        for s in range(3):
            opt.zero_grad()
            loss_of(m, s, comm.rank).backward()
            if comm.rank == 0:
                assert opt.param_groups[0]["lr"] == 0.1
            opt.step()
        return params(m)

    p0, p1 = gradcomp.LocalWorld(N, timeout=60).run(fn)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
