"""Horovod drop-in for torch (issue 16): Horovod's DistributedOptimizer arguments, the collective
helpers, finalize() and the refusals of what cannot run, on in-process ranks (gradcomp.LocalWorld)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradcomp  # noqa: E402
import gradcomp_torch as hvd  # noqa: E402

pytestmark = pytest.mark.torch
N = 2


def make_model(seed=0):
    """The same model on every rank thread (a private generator: the global RNG is shared by threads)."""
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def loss_of(m, step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(8, 6, generator=g)
    return (m(x) ** 2).mean() * (1 + rank)


def wrap(m, comm, **kw):
    return hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                    comm=comm, **kw)


def one_step_grads(comm, **kw):
    m = make_model()
    opt = wrap(m, comm, **kw)
    opt.zero_grad()
    loss_of(m, 0, comm.rank).backward()
    opt.synchronize()
    return [p.grad.clone() for p in m.parameters()], opt


def local_grads(rank):
    m = make_model()
    loss_of(m, 0, rank).backward()
    return [p.grad.clone() for p in m.parameters()]


def horovod_compression_fp16():
    hv = pytest.importorskip("horovod.torch")
    return hv.Compression.fp16


@pytest.mark.parametrize("which", ["horovod", "gradcomp", "spec"])
def test_compression_fp16_has_horovods_semantics(which):
    """compression= takes Horovod's class, gradcomp's object or a spec; fp16 keeps no residual
    (Horovod's fp16 has no error feedback), and the average is the mean of the fp16-rounded grads."""
    comp = {"horovod": horovod_compression_fp16 if which == "horovod" else None,
            "gradcomp": lambda: hvd.Compression.fp16, "spec": lambda: "fp16"}[which]()
    kw = {"compression": comp} if which != "spec" else {"compressor": comp}

    def fn(comm):
        grads, opt = one_step_grads(comm, **kw)
        return grads, opt.gradient_sync.memory.spec(), opt.compressor.name

    ref = [sum(g[i].half().float() for g in (local_grads(r) for r in range(N))) / N for i in range(4)]
    for grads, mem, name in gradcomp.LocalWorld(N).run(fn):
        assert name == "fp16" and mem == "none"
        for a, b in zip(grads, ref):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4)


def test_compressor_accepts_compression_object_and_explicit_residual():
    m = make_model()
    opt = wrap(m, gradcomp.comm.single.SingleCommunicator(), compressor=hvd.Compression.fp16)
    assert opt.gradient_sync.memory.spec() == "none"
    opt2 = wrap(m, gradcomp.comm.single.SingleCommunicator(), compressor="fp16", memory="residual")
    assert opt2.gradient_sync.memory.name == "residual"
    with pytest.raises(ValueError, match="not both"):
        wrap(m, None, compressor="fp16", compression=hvd.Compression.fp16)
    with pytest.raises(ValueError, match="'fp16', 'bf16'"):
        wrap(m, None, compression=object())


def test_compression_none_leaves_the_compressor_to_the_environment(monkeypatch):
    """Horovod scripts pass compression=hvd.Compression.none by default: GRADCOMP_COMPRESSOR decides."""
    monkeypatch.setenv("GRADCOMP_COMPRESSOR", "topk:ratio=0.5")
    one = gradcomp.comm.single.SingleCommunicator()
    for none in (hvd.Compression.none, type("NoneCompressor", (), {"__module__": "horovod.torch.compression"})):
        opt = wrap(make_model(), one, compression=none)
        assert opt.compressor.name == "topk" and opt.gradient_sync.memory.name == "residual"
    assert wrap(make_model(), one, compression=hvd.Compression.fp16).compressor.name == "fp16"
    monkeypatch.delenv("GRADCOMP_COMPRESSOR")
    assert wrap(make_model(), one, compression=hvd.Compression.none).compressor.name == "none"


def test_op_sum_gives_the_sum_and_average_the_mean():
    def fn(comm):
        s, _ = one_step_grads(comm, op=hvd.Sum)
        a, _ = one_step_grads(comm, op=hvd.Average, gradient_predivide_factor=2.0)
        return s, a

    ref = [sum(g[i] for g in (local_grads(r) for r in range(N))) for i in range(4)]
    for s, a in gradcomp.LocalWorld(N).run(fn):
        for x, y, r in zip(s, a, ref):
            torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(y, r / N, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    ({"op": hvd.Adasum}, "Adasum is not supported"),
    ({"op": 7}, "not a reduction"),
    ({"op": hvd.Sum, "gradient_predivide_factor": 2.0}, "only meaningful with op=Average"),
    ({"gradient_predivide_factor": 0}, "positive"),
    ({"groups": [[0]]}, "num_groups"),
    ({"num_groups": 2, "bucket_mb": 1}, "not both"),
    ({"process_set": type("PS", (), {"process_set_id": 3, "ranks": [0]})()}, "global set"),
    ({"op": hvd.Sum, "sync": "localsgd:period=2"}, "op=Average"),
])
def test_bad_horovod_arguments_are_clear_errors(kw, match):
    m = make_model()
    with pytest.raises(ValueError, match=match):
        wrap(m, gradcomp.comm.single.SingleCommunicator(), **kw)


def test_num_groups_sets_the_bucket_count():
    m = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                   comm=gradcomp.comm.single.SingleCommunicator(), num_groups=4)
    assert len(opt._buckets) == 4
    hv = pytest.importorskip("horovod.torch")
    wrap(make_model(), gradcomp.comm.single.SingleCommunicator(), process_set=hv.global_process_set)


def test_sparse_as_dense_densifies_sparse_gradients():
    def model():
        emb = torch.nn.Embedding(10, 4, sparse=True)
        with torch.no_grad():
            emb.weight.copy_(torch.arange(40.0).reshape(10, 4) / 10)
        return emb

    def fn(comm):
        emb = model()
        opt = hvd.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.5),
                                       named_parameters=emb.named_parameters(), comm=comm, sparse_as_dense=True)
        opt.zero_grad()
        emb(torch.tensor([comm.rank, 3])).sum().backward()
        opt.step()
        return emb.weight.detach().clone()

    outs = gradcomp.LocalWorld(N).run(fn)
    ref = model().weight.detach().clone()
    counts = torch.zeros(10)
    for r in range(N):
        counts[r] += 1
        counts[3] += 1
    ref -= 0.5 * (counts / N)[:, None]
    for w in outs:
        torch.testing.assert_close(w, ref)
    emb = model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.5), named_parameters=emb.named_parameters(),
                                   comm=gradcomp.comm.single.SingleCommunicator())
    with pytest.raises(TypeError, match="sparse_as_dense=True"):
        emb(torch.tensor([1])).sum().backward()
        opt.step()


def test_collective_helpers_have_horovods_semantics():
    def fn(comm):
        r = comm.rank
        t = torch.tensor([1.0 + r, 10.0 * r])
        rows = torch.full((r + 1, 2), float(r))
        return (hvd.allreduce(t, comm=comm), hvd.allreduce(t, op=hvd.Sum, comm=comm),
                hvd.allreduce(t, average=False, comm=comm), hvd.allreduce(t, op=hvd.Max, comm=comm),
                hvd.allreduce(t, op=hvd.Min, prescale_factor=2.0, postscale_factor=0.5, comm=comm),
                hvd.allreduce(torch.tensor([3, 4]) * (r + 1), comm=comm),
                hvd.allreduce(t, compression=hvd.Compression.fp16, comm=comm),
                hvd.allgather(rows, comm=comm), hvd.broadcast(t, root_rank=1, comm=comm),
                hvd.broadcast_(t.clone(), 0, comm=comm), hvd.join(comm=comm), hvd.barrier(comm=comm),
                hvd.allreduce(torch.tensor(float(r)), comm=comm), hvd.broadcast(torch.tensor(r + 5), 1, comm=comm),
                hvd.allgather_object({"rank": r, "name": "x" * (r + 1)}, comm=comm))

    for out in gradcomp.LocalWorld(N).run(fn):
        avg, s, s2, mx, mn, ints, f16, rows, b1, b0, last, _, scalar, bscalar, objs = out
        assert objs == [{"rank": 0, "name": "x"}, {"rank": 1, "name": "xx"}]
        assert scalar.shape == () and float(scalar) == 0.5           # 0-d stays 0-d (metric averaging)
        assert bscalar.shape == () and int(bscalar) == 6
        assert torch.equal(avg, torch.tensor([1.5, 5.0])) and torch.equal(s, torch.tensor([3.0, 10.0]))
        assert torch.equal(s2, s) and torch.equal(mx, torch.tensor([2.0, 10.0]))
        assert torch.equal(mn, torch.tensor([1.0, 0.0]))
        assert ints.dtype == torch.int64 and torch.equal(ints, torch.tensor([4, 6]))
        torch.testing.assert_close(f16, avg) and None
        assert rows.shape == (3, 2) and torch.equal(rows[:, 0], torch.tensor([0.0, 1.0, 1.0]))
        assert torch.equal(b1, torch.tensor([2.0, 10.0])) and torch.equal(b0, torch.tensor([1.0, 0.0]))
        assert last in range(N)
    with pytest.raises(ValueError, match="Adasum"):
        hvd.allreduce(torch.ones(1), op=hvd.Adasum, comm=gradcomp.comm.single.SingleCommunicator())


def test_topology_helpers():
    from gradcomp import horovod_api as api
    comm = type("C", (), {"rank": 3, "size": 4, "local_rank": 0})()
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert (api.local_size(comm, env), api.local_rank(comm, env), api.cross_size(comm, env),
            api.cross_rank(comm, env)) == (2, 1, 2, 1)
    assert api.local_size(comm, {}) == 4 and api.cross_size(comm, {}) == 1
    for f in (hvd.nccl_built, hvd.mpi_built, hvd.gloo_built, hvd.is_initialized):
        assert isinstance(f(), bool)


def test_finalize_averages_a_run_not_ending_on_a_sync_step_and_stats_count_policy_bytes():
    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, sync="localsgd:period=4")
        for s in range(6):                   # a sync after step 3, then 2 local steps
            opt.zero_grad()
            loss_of(m, s, comm.rank).backward()
            opt.step()
        before = [p.detach().clone() for p in m.parameters()]
        sent_before = opt.stats()["policy"]["bytes_sent"]
        did = opt.finalize()
        again = opt.finalize()
        return before, [p.detach().clone() for p in m.parameters()], sent_before, opt.stats(), did, again

    (b0, a0, s0, st0, d0, g0), (b1, a1, *_ ) = gradcomp.LocalWorld(N).run(fn)
    assert not torch.equal(b0[0], b1[0])                    # the ranks had drifted apart
    for x, y, p, q in zip(a0, a1, b0, b1):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x, (p + q) / 2)
    nbytes = sum(p.numel() * 4 for p in a0)
    assert d0 and not g0
    assert s0 == nbytes and st0["policy"]["bytes_sent"] == 2 * nbytes
    assert st0["bytes_sent_total"] == st0["bytes_sent"] + 2 * nbytes


def test_ddp_hook_refuses_a_sync_policy(monkeypatch):
    monkeypatch.setenv("GRADCOMP_SYNC", "localsgd:period=4")
    from gradcomp_torch.ddp_hook import DDPHookState
    with pytest.raises(ValueError, match="ddp_hook cannot run sync policy 'localsgd"):
        DDPHookState("none", None, None, None, gradcomp.comm.single.SingleCommunicator(), None)


def test_async_collectives_poll_and_synchronize():
    """allreduce_async / allgather_async / broadcast_async(_) / alltoall_async return handles: poll()
    is a bool, synchronize() gives Horovod's results; in-place forms write into their tensor."""
    def fn(comm):
        r = comm.rank
        h1 = hvd.allreduce_async(torch.tensor([1.0, 2.0]) * (r + 1), comm=comm)
        t = torch.tensor([float(r), 5.0])
        h2 = hvd.allreduce_async_(t, op=hvd.Sum, comm=comm)
        h3 = hvd.allgather_async(torch.full((r + 1, 2), float(r)), comm=comm)
        b = torch.tensor([10.0 * r])
        h4 = hvd.broadcast_async_(b, root_rank=1, comm=comm)
        h5 = hvd.alltoall_async(torch.arange(3.0) + 10 * r, splits=[1, 2] if r == 0 else [2, 1], comm=comm)
        hg = hvd.grouped_allreduce_async([torch.ones(2) * r, torch.ones(1)], op=hvd.Sum, comm=comm)
        polled = isinstance(hvd.poll(h1), bool)
        out = (hvd.synchronize(h1), hvd.synchronize(h2) is t, t, hvd.synchronize(h3), hvd.synchronize(h4) is b, b,
               hvd.synchronize(h5), hvd.synchronize(hg), polled, hvd.poll(h1))
        return out

    o0, o1 = gradcomp.LocalWorld(N).run(fn)
    for o in (o0, o1):
        assert o[0].tolist() == [1.5, 3.0] and o[1] and o[2].tolist() == [1.0, 10.0]
        assert o[3].tolist() == [[0, 0], [1, 1], [1, 1]] and o[4] and o[5].tolist() == [10.0]
        assert [g.tolist() for g in o[7]] == [[1.0, 1.0], [2.0]] and o[8] and o[9] is True
    assert o0[6][0].tolist() == [0.0, 10.0, 11.0] and o0[6][1].tolist() == [1, 2]
    assert o1[6][0].tolist() == [1.0, 2.0, 12.0] and o1[6][1].tolist() == [2, 1]
    with pytest.raises(TypeError, match="handle"):
        hvd.synchronize(3)


def test_alltoall_equal_split_is_differentiable_and_refuses_bad_splits():
    def fn(comm):
        x = (torch.arange(4.0) + 10 * comm.rank).requires_grad_(True)
        y = hvd.alltoall(x, comm=comm)                         # no splits: the output only, as Horovod
        (y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
        with pytest.raises(ValueError, match="splits"):
            hvd.alltoall(torch.ones(3), splits=[1, 1], comm=comm)
        with pytest.raises(ValueError, match="evenly"):
            hvd.alltoall(torch.ones(3), comm=comm)
        return y.detach(), x.grad

    (y0, g0), (y1, g1) = gradcomp.LocalWorld(N).run(fn)
    assert y0.tolist() == [0, 1, 10, 11] and y1.tolist() == [2, 3, 12, 13]
    # x_r[j-th half] went to rank j at position r: its gradient is rank j's weight there
    assert g0.tolist() == [1, 2, 1, 2] and g1.tolist() == [3, 4, 3, 4]


def test_allreduce_is_differentiable_like_horovods():
    def fn(comm):
        a = torch.tensor([1.0, 2.0], requires_grad=True)
        hvd.allreduce(a * (comm.rank + 1), op=hvd.Sum, comm=comm).sum().backward()
        b = torch.tensor([3.0], requires_grad=True)
        hvd.allreduce(b * (comm.rank + 1), comm=comm).sum().backward()      # Average
        return a.grad, b.grad

    (a0, b0), (a1, b1) = gradcomp.LocalWorld(N).run(fn)
    # total loss sum_r L_r; L_r = sum(a_0 + 2 a_1): d/da_0 = 2 * 1, d/da_1 = 2 * 2
    assert a0.tolist() == [2.0, 2.0] and a1.tolist() == [4.0, 4.0]
    assert b0.tolist() == [1.0] and b1.tolist() == [2.0]   # Average: (1/2)(r+1) summed over 2 losses


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5, 5)], ids=["1d", "2d"])
def test_sync_batchnorm_equals_batchnorm_on_the_whole_batch(shape):
    """hvd.SyncBatchNorm on 2 ranks with uneven batches (4 and 6 samples): outputs, input gradients,
    the sum of the weight gradients and the running statistics equal torch's BatchNorm on all 10."""
    g = torch.Generator().manual_seed(3)
    full = torch.randn((10,) + shape[1:], generator=g) * 2 + 1
    weights = torch.randn(full.shape, generator=g)
    cut = [(0, 4), (4, 10)]

    def fn(comm):
        bn = hvd.SyncBatchNorm(3, momentum=0.3, comm=comm)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        a, b = cut[comm.rank]
        x = full[a:b].clone().requires_grad_(True)
        y = bn(x)
        (y * weights[a:b]).sum().backward()
        bn.eval()
        e = bn(full[a:b])
        return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var, e.detach()

    (y0, dx0, w0, b0, rm0, rv0, e0), (y1, dx1, w1, b1, rm1, rv1, e1) = gradcomp.LocalWorld(N).run(fn)
    ref = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(3, momentum=0.3)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = full.clone().requires_grad_(True)
    y = ref(x)
    (y * weights).sum().backward()
    kw = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([y0, y1]), y.detach(), **kw)
    torch.testing.assert_close(torch.cat([dx0, dx1]), x.grad, **kw)
    torch.testing.assert_close(w0 + w1, ref.weight.grad, **kw)
    torch.testing.assert_close(b0 + b1, ref.bias.grad, **kw)
    for rm, rv in ((rm0, rv0), (rm1, rv1)):
        torch.testing.assert_close(rm, ref.running_mean, **kw)
        torch.testing.assert_close(rv, ref.running_var, **kw)
    ref.eval()
    torch.testing.assert_close(torch.cat([e0, e1]), ref(full).detach(), **kw)
    # a per-rank BatchNorm (what Horovod scripts get without SyncBatchNorm) differs
    local = torch.nn.functional.batch_norm(full[:4], None, None, ref.weight.detach(), ref.bias.detach(), training=True)
    assert not torch.allclose(local, y0, atol=1e-3)


def test_elastic_run_finalizes_when_training_returns(monkeypatch):
    """hvd.elastic.run's train(state) returning normally ends training on every rank: the state's
    DistributedOptimizers are finalized there (localsgd:period=4 over 6 steps leaves ranks apart)."""
    from gradcomp_torch import elastic as el
    monkeypatch.setattr(el, "_need_horovod", lambda: None)
    monkeypatch.setattr(el, "_hvd_run", lambda f: f)          # Horovod's retry loop is not under test

    class State:                                               # what TorchState._ours() gives
        def __init__(self, opt):
            self.h = type("H", (), {"value": opt})()

        def _ours(self):
            return [self.h]

    def fn(comm):
        m = make_model()
        opt = wrap(m, comm, sync="localsgd:period=4")

        @el.run
        def train(state):
            for s in range(6):
                opt.zero_grad()
                loss_of(m, s, comm.rank).backward()
                opt.step()
            return "done"
        return train(State(opt)), [p.detach().clone() for p in m.parameters()]

    (r0, a0), (r1, a1) = gradcomp.LocalWorld(N).run(fn)
    assert r0 == r1 == "done"
    for x, y in zip(a0, a1):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_hvd_elastic_namespace_after_changing_the_import():
    """`import gradcomp_torch as hvd` then `hvd.elastic.run` / `hvd.elastic.TorchState` (Horovod's
    pytorch_mnist_elastic): the attribute exists without importing gradcomp_torch.elastic by hand, and
    Horovod's ElasticSampler / ObjectState are there as well (re-exported, or raising without Horovod)."""
    import subprocess
    import sys
    code = ("import gradcomp_torch as hvd; e = hvd.elastic; "
            "print(all(callable(getattr(e, n)) for n in ('run', 'TorchState', 'ElasticSampler', 'ObjectState')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.strip().endswith("True"), r.stdout + r.stderr
    import gradcomp_torch as hvd
    with pytest.raises(AttributeError, match="no attribute 'elasticc'"):
        hvd.elasticc
