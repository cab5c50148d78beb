"""Checkpoints, state classes, safe loading, loss-scaled residuals and missing gradients (issue 15 items
5-9, issue 16's resume idiom, issue 13's state classes), on in-process ranks (gradcomp.LocalWorld)."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradcomp  # noqa: E402
import gradcomp_torch as gct  # noqa: E402
from gradcomp.state import REPLICATED, state_class  # noqa: E402

pytestmark = pytest.mark.torch

N = 2
GEN = torch.Generator().manual_seed(7)
X = torch.randn(10, N, 12, 5, generator=GEN)          # [step, rank, batch, features]
Y = torch.randint(0, 3, (10, N, 12), generator=GEN)
RAN = []                                              # the payload of the crafted objects appends here


def make_model(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def loss_of(m, step, rank):
    return torch.nn.functional.cross_entropy(m(X[step, rank]), Y[step, rank])


def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def build(comm, compressor="topk:ratio=0.3", sync=None, momentum=0.9, memory=None):
    m = make_model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=momentum),
                                   named_parameters=m.named_parameters(), compressor=compressor, sync=sync,
                                   memory=memory, comm=comm)
    return m, opt


def train(m, opt, comm, steps):
    for s in steps:
        opt.zero_grad()
        loss_of(m, s, comm.rank).backward()
        opt.step()


def _payload(tag):
    RAN.append(tag)


class Evil:
    def __reduce__(self):
        return (_payload, ("ran",))


# ------------------------------------------------------------------ item 5: one exact way for every policy
POLICIES = [None, "localsgd:period=3", "da:period=3", "da-pipelined:period=3", "slowmo:period=3,beta=0.5"]


@pytest.mark.parametrize("sync", POLICIES, ids=lambda s: (s or "allreduce").split(":")[0])
def test_gathered_checkpoint_resumes_every_policy_exactly(sync, tmp_path):
    """Cut after 4 steps (a local step after the sync at step 2): per-rank parameters, momentum and
    delta residuals must all come back on their own rank."""
    total, cut, path = 8, 4, str(tmp_path / "ck.pt")

    def fn(comm):
        m, opt = build(comm, sync=sync)
        train(m, opt, comm, range(total))
        m_a, opt_a = build(comm, sync=sync)
        train(m_a, opt_a, comm, range(cut))
        differ = comm.allgather(flat(m_a), name="t").wait()
        sd = opt_a.gathered_state_dict()
        if comm.rank == 0:                       # a plain torch file works too (the in-dict checksums)
            torch.save({"model": m_a.state_dict(), "optimizer": sd}, path)
        comm.barrier()
        ck = torch.load(path, weights_only=True)
        m_b, opt_b = build(comm, sync=sync)
        m_b.load_state_dict(ck["model"])
        opt_b.load_state_dict(ck["optimizer"])
        train(m_b, opt_b, comm, range(cut, total))
        return flat(m), flat(m_b), not torch.equal(torch.as_tensor(differ[0]), torch.as_tensor(differ[1]))

    for full, resumed, differed in gradcomp.LocalWorld(N, timeout=60).run(fn):
        assert torch.equal(full, resumed), float((full - resumed).abs().max())
        if sync is not None:
            assert differed                  # the cut really was between syncs


# ------------------------------------------------------------------ issue 16: Horovod's resume idiom
@pytest.mark.parametrize("sync", [None, "localsgd:period=3"], ids=["allreduce", "localsgd"])
def test_horovod_resume_idiom_is_exact_from_a_gathered_checkpoint(sync):
    total, cut = 8, 4

    def fn(comm):
        m, opt = build(comm, "randomk:ratio=0.3", sync=sync)
        train(m, opt, comm, range(total))
        m_a, opt_a = build(comm, "randomk:ratio=0.3", sync=sync)
        train(m_a, opt_a, comm, range(cut))
        ck = {"model": m_a.state_dict(), "optimizer": opt_a.gathered_state_dict()}
        ck = gct.checkpoint.safe_loads(gct.checkpoint.dumps(ck), "test")
        m_b, opt_b = build(comm, "randomk:ratio=0.3", sync=sync)
        if comm.rank == 0:                           # load on rank 0 only, then broadcast
            m_b.load_state_dict(ck["model"])
            opt_b.load_state_dict(ck["optimizer"])
        gct.broadcast_parameters(m_b.state_dict(), root_rank=0, comm=comm)
        gct.broadcast_optimizer_state(opt_b, root_rank=0, comm=comm)
        train(m_b, opt_b, comm, range(cut, total))
        return flat(m), flat(m_b)

    for full, resumed in gradcomp.LocalWorld(N, timeout=60).run(fn):
        assert torch.equal(full, resumed)


def test_horovod_resume_idiom_from_rank0_state_keeps_ranks_together():
    """Rank 0 loads only its own part: every rank continues at rank 0's step (shared random-k choices),
    the other ranks' residuals restart at zero, and the ranks stay identical."""
    def fn(comm):
        m_a, opt_a = build(comm, "randomk:ratio=0.3")
        train(m_a, opt_a, comm, range(3))
        ck = gct.checkpoint.safe_loads(gct.checkpoint.dumps(
            {"model": m_a.state_dict(), "optimizer": opt_a.state_dict()}), "test")
        m, opt = build(comm, "randomk:ratio=0.3")
        train(m, opt, comm, [0])                 # a live process with history of its own
        if comm.rank == 0:
            m.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
        gct.broadcast_parameters(m.state_dict(), root_rank=0, comm=comm)
        gct.broadcast_optimizer_state(opt, root_rank=0, comm=comm)
        steps = (opt._step, opt.gradient_sync.steps)
        res = opt.gradient_sync.residual("0.weight")
        zero = res is None or float(res.abs().sum()) == 0
        train(m, opt, comm, range(3, 7))
        return steps, zero, flat(m)

    (s0, z0, p0), (s1, z1, p1) = gradcomp.LocalWorld(N, timeout=60).run(fn)
    assert s0 == s1 == (3, 3)
    assert not z0 and z1                         # rank 0 kept its loaded residual, rank 1 restarted at zero
    assert torch.equal(p0, p1)


# ------------------------------------------------------------------ item 9: validate before changing anything
def _state_of(opt):
    sd = opt.inner.state_dict()
    return ({k: {kk: vv.clone() for kk, vv in v.items()} for k, v in sd["state"].items()},
            opt._step, opt.gradient_sync.steps, opt.gradient_sync.residual("0.weight").clone())


def _same_state(a, b):
    assert a[1:3] == b[1:3] and torch.equal(a[3], b[3])
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        for kk in a[0][k]:
            assert torch.equal(a[0][k][kk], b[0][k][kk]), (k, kk)


def test_failed_load_changes_nothing_and_names_the_problem():
    def fn(comm):
        m_o, opt_o = build(comm, "randomk:ratio=0.3")
        train(m_o, opt_o, comm, range(5))
        other = gct.checkpoint.safe_loads(gct.checkpoint.dumps(opt_o.gathered_state_dict()), "t")
        m_l, opt_l = build(comm, sync="localsgd:period=2")
        train(m_l, opt_l, comm, range(3))
        local = gct.checkpoint.safe_loads(gct.checkpoint.dumps(opt_l.gathered_state_dict()), "t")
        m, opt = build(comm)
        train(m, opt, comm, range(2))
        good = gct.checkpoint.safe_loads(gct.checkpoint.dumps(opt.gathered_state_dict()), "t")
        train(m, opt, comm, range(2, 4))
        before, params = _state_of(opt), flat(m)
        msgs = []
        flipped = gct.checkpoint.safe_loads(gct.checkpoint.dumps(good), "t")
        flipped["gradcomp"]["ranks"][comm.rank]["sync"]["memory_state"]["0.weight"]["residual"].view(torch.uint8)[5] ^= 1
        lost = gct.checkpoint.safe_loads(gct.checkpoint.dumps(good), "t")
        lost["state"][0]["momentum_buffer"].view(torch.uint8)[2] ^= 4
        for bad in (other, local, flipped, lost):
            with pytest.raises(ValueError) as e:
                opt.load_state_dict(bad)
            msgs.append(str(e.value))
            _same_state(before, _state_of(opt))
            assert torch.equal(params, flat(m))
        # a restore that fails half-way (after validation) is rolled back too
        real = opt._policy.load_state_dict
        opt._policy.load_state_dict = lambda sd: (_ for _ in ()).throw(RuntimeError("disk on fire"))
        with pytest.raises(RuntimeError, match="disk on fire"):
            opt.load_state_dict(good)
        opt._policy.load_state_dict = real
        _same_state(before, _state_of(opt))
        opt.load_state_dict(good)                   # and the good one still loads
        assert opt._step == 2
        return msgs

    for msgs in gradcomp.LocalWorld(N, timeout=60).run(fn):
        assert "compressor" in msgs[0] and "randomk" in msgs[0]
        assert "sync" in msgs[1] and "localsgd" in msgs[1]
        assert "checksum" in msgs[2] and "rank" in msgs[2]
        assert "checksum" in msgs[3] and "wrapped optimizer" in msgs[3]


def test_flipped_byte_in_checkpoint_file_is_refused(tmp_path):
    m, opt = build(gradcomp.SingleCommunicator())
    train(m, opt, gradcomp.SingleCommunicator(), range(2))
    path = str(tmp_path / "ck.pt")
    gct.save_checkpoint({"model": m.state_dict(), "optimizer": opt.state_dict()}, path)
    ck = gct.load_checkpoint(path)
    assert torch.equal(ck["model"]["0.weight"], m[0].weight.detach())
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0x10
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch") as e:
        gct.load_checkpoint(path)
    assert path in str(e.value)
    torch.save({"x": 1}, path)
    with pytest.raises(ValueError, match="not a gradcomp checkpoint"):
        gct.load_checkpoint(path)


# ------------------------------------------------------------------ item 6: nothing unpickled with plain pickle
def test_crafted_file_and_bytes_do_not_run(tmp_path):
    RAN.clear()
    path = str(tmp_path / "evil.pt")
    gct.save_checkpoint({"model": {}, "optimizer": Evil()}, path)     # a valid checksum does not help
    with pytest.raises(ValueError, match="refused to load"):
        gct.load_checkpoint(path)

    def fn(comm):
        out = []
        with pytest.raises(ValueError, match="broadcast_object"):
            gct.broadcast_object({"x": Evil()} if comm.rank == 0 else None, root_rank=0, comm=comm)
        out.append(gct.broadcast_object({"a": [1, 2.5, "s", None, torch.ones(2)]}, root_rank=0, comm=comm))
        m, opt = build(comm)
        train(m, opt, comm, [0])
        if comm.rank == 1:                         # a peer whose part holds a crafted object
            opt.gradient_sync._stats["evil"] = Evil()
        with pytest.raises(ValueError, match="rank 1's part"):
            opt.gathered_state_dict()
        return out

    for out in gradcomp.LocalWorld(N, timeout=60).run(fn):
        assert out[0]["a"][:4] == [1, 2.5, "s", None] and torch.equal(out[0]["a"][4], torch.ones(2))
    assert RAN == []


def test_no_plain_unpickling_in_the_sources():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bad = []
    for top in ("gradcomp", "gradcomp_torch", "gradcomp_tf", "examples", "tests", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            for f in files:
                if f.endswith(".py") and f != os.path.basename(__file__):
                    text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                    if "weights_only=False" in text or "pickle.loads(" in text and top != "tests":
                        bad.append(os.path.join(dirpath, f))
    assert not bad, bad


# ------------------------------------------------------------------ issue 13 item 1: state classes
def _state_class_cases():
    from conftest import all_specs
    cases = [(spec, "auto") for spec in all_specs()]
    cases += [("topk:ratio=0.3", mem) for mem in gradcomp.available("memory")]
    cases += [("randproj:ratio=4,ref=0.5", "residual"), ("aggtopk:ratio=0.3,metric=prev", "auto"),
              ("topk:ratio=0.3,warmup=1", "auto"), ("randproj:ratio=4,ref=0.5,warmup=1", "residual")]
    return cases


@pytest.mark.parametrize("comp, mem", _state_class_cases())
def test_state_classes_declared_replicated_state_is_identical_across_ranks(comp, mem):
    """Every compressor and memory: the keys declared replicated are identical on every rank after a few
    steps with different gradients per rank, the others (per rank) differ (an undeclared shared key
    would be zeroed on Horovod's resume idiom and split the ranks); load_replicated_state_dict then
    continues with one average on every rank."""
    def fn(comm):
        sync = gradcomp.GradientSync(comp, memory=mem, comm=comm, seed=3)
        rng = np.random.default_rng([1, comm.rank])
        for _ in range(3):
            sync.step({"w": rng.standard_normal((16, 12)).astype(np.float32)})
        rep, full = sync.replicated_state_dict(), sync.state_dict()
        fresh = gradcomp.GradientSync(comp, memory=mem, comm=comm, seed=3)
        fresh.load_replicated_state_dict(rep)
        out = fresh.step({"w": rng.standard_normal((16, 12)).astype(np.float32)})["w"]
        return rep, full, fresh.steps, out, sync

    (r0, f0, s0, o0, sync), (r1, f1, s1, o1, _) = gradcomp.LocalWorld(N, timeout=60).run(fn)
    assert s0 == s1 == 4
    np.testing.assert_array_equal(o0, o1)
    for part, owner in (("memory_state", sync.memory), ("compressor_state", sync.compressor)):
        for k, v0 in f0[part].get("w", {}).items():
            v1 = f1[part]["w"][k]
            if state_class(owner, k) == REPLICATED:
                np.testing.assert_array_equal(r0[part]["w"][k], r1[part]["w"][k], err_msg=(comp, mem, k))
            else:
                assert k not in r0[part]["w"]
                if not np.any(v0) and not np.any(v1):
                    continue                        # nothing dropped here (everything was sent)
                assert not np.array_equal(v0, v1), f"{comp} / {mem}: {part}[{k!r}] is the same on every rank: " \
                                                   "declare it in replicated_state"


# ------------------------------------------------------------------ item 7: loss-scaled residuals
@pytest.mark.parametrize("memory, attach", [("residual", True), ("dgc", True), ("gmc", True), ("residual", False)])
def test_grad_scaler_scale_changes_keep_residual_meaning(memory, attach):
    """The scale doubles every step (growth_interval=1): with the scaler attached (explicitly, or
    detected on its first unscale_) the trajectory is the unscaled run's (powers of two: exactly)."""
    def fn(comm, scaled):
        m, opt = build(comm, "topk:ratio=0.2", momentum=0.0, memory=memory)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1, enabled=scaled)
        if attach:
            opt.attach_grad_scaler(scaler)
        out = []
        for s in range(6):
            opt.zero_grad()
            scaler.scale(loss_of(m, s, comm.rank)).backward()
            scaler.step(opt)
            scaler.update()
            out.append(flat(m))
        assert not scaled or opt._grad_scaler is scaler
        return out, scaler.get_scale() if scaled else 1.0

    plain = gradcomp.LocalWorld(N, timeout=60).run(fn, False)
    amp = gradcomp.LocalWorld(N, timeout=60).run(fn, True)
    for (p, _), (a, scale) in zip(plain, amp):
        assert scale == 4.0 * 2 ** 6
        for x, y in zip(p, a):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ item 8: None gradients stay None
@pytest.mark.parametrize("compressor", ["none", "topk:ratio=0.3"])
def test_frozen_parameter_does_not_move(compressor):
    def fn(comm):
        m, opt = build(comm, compressor)
        train(m, opt, comm, range(2))
        m[0].weight.requires_grad_(False)           # frozen mid-training, momentum buffer still there
        w = m[0].weight.detach().clone()
        res = opt.gradient_sync.residual("0.weight")
        res = None if res is None else res.clone()
        train(m, opt, comm, range(2, 5))
        after = opt.gradient_sync.residual("0.weight")
        same_res = res is None or torch.equal(res, after)
        return torch.equal(w, m[0].weight.detach()), m[0].weight.grad is None, same_res, flat(m)

    (moved0, none0, r0, p0), (moved1, none1, r1, p1) = gradcomp.LocalWorld(N, timeout=60).run(fn)
    assert moved0 and moved1 and none0 and none1 and r0 and r1
    assert torch.equal(p0, p1)


def test_gradient_on_one_rank_only_is_averaged_with_zeros_and_none_on_no_rank_is_skipped():
    def fn(comm):
        sync = gradcomp.GradientSync("topk:ratio=0.5", memory="residual", comm=comm)
        g = {"a": np.full(4, 2.0, np.float32), "b": np.ones(4, np.float32), "c": np.zeros(4, np.float32)}
        absent = ["c"] + (["b"] if comm.rank == 1 else [])
        if comm.rank == 1:
            g["b"] = np.zeros(4, np.float32)
        sync.start(g, absent=absent)
        return sync.finish(), sync.residual("c")

    for out, res_c in gradcomp.LocalWorld(N).run(fn):
        assert out["c"] is None and not np.any(res_c)       # nobody had it: skipped, state untouched
        assert float(np.sum(out["a"])) == pytest.approx(4.0)  # top half of 2.0s, same on both
        assert float(np.sum(out["b"])) == pytest.approx(1.0)  # (top half of ones + zeros) / 2


def test_example_resume_is_exact_under_local_sgd(tmp_path, monkeypatch):
    """examples/torch_train.py --checkpoint/--resume with a periodic policy, the cut between syncs."""
    pytest.importorskip("sklearn")
    import threading
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import torch_train
    lock, init = threading.Lock(), torch_train.DigitsTask.__init__

    def seeded_init(self, a, comm):          # the rank threads share torch's global RNG: one at a time
        with lock:
            torch.manual_seed(a.seed)
            init(self, a, comm)
    monkeypatch.setattr(torch_train.DigitsTask, "__init__", seeded_init)
    ck = str(tmp_path / "example.pt")
    common = ["--epochs", "2", "--no-progress", "--threads", "1", "--compressor", "topk:ratio=0.05",
              "--sync", "localsgd:period=5", "--schedule", "constant"]

    def fn(comm, extra):
        return torch_train.train(torch_train.parse_args(common + extra), comm)

    full = gradcomp.LocalWorld(N, timeout=120).run(fn, [])
    gradcomp.LocalWorld(N, timeout=120).run(fn, ["--checkpoint", ck, "--stop-after", "1"])
    resumed = gradcomp.LocalWorld(N, timeout=120).run(fn, ["--checkpoint", ck, "--resume"])
    assert full[0]["checksum"] != full[1]["checksum"]        # the run ends between syncs: ranks differ
    for f, r in zip(full, resumed):
        assert r["epoch"] == 2 and f["checksum"] == r["checksum"]


class _FakeBucket:
    """What DDP hands a comm hook: one bucket holding every gradient, flattened into one buffer."""

    def __init__(self, params):
        self.params = list(params)
        self.buf = torch.cat([p.grad.reshape(-1) for p in self.params])
        self.views, off = [], 0
        for p in self.params:
            self.views.append(self.buf[off:off + p.numel()].view_as(p))
            off += p.numel()

    def buffer(self):
        return self.buf

    def gradients(self):
        return self.views

    def parameters(self):
        return self.params

    def is_last(self):
        return True


def test_ddp_hook_grad_scaler_keeps_residual_meaning():
    def fn(comm, scaled):
        m = make_model()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        hook = gct.ddp_hook("topk:ratio=0.2", memory="residual", comm=comm, named_parameters=m.named_parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1, enabled=scaled)
        hook.attach_grad_scaler(scaler)
        for s in range(5):
            opt.zero_grad()
            scaler.scale(loss_of(m, s, comm.rank)).backward()
            bucket = _FakeBucket(m.parameters())
            avg = hook(None, bucket).wait()
            off = 0
            for p in m.parameters():                 # what DDP does with the future's buffer
                p.grad.copy_(avg[off:off + p.numel()].view_as(p))
                off += p.numel()
            scaler.step(opt)
            scaler.update()
        return flat(m)

    plain = gradcomp.LocalWorld(N, timeout=60).run(fn, False)
    amp = gradcomp.LocalWorld(N, timeout=60).run(fn, True)
    for x, y in zip(plain, amp):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


def test_loaded_checkpoint_is_not_kept_after_the_next_step():
    def fn(comm):
        m, opt = build(comm)
        train(m, opt, comm, range(2))
        sd = opt.gathered_state_dict()
        opt.load_state_dict(sd)
        kept = opt._loaded_checkpoint is not None
        train(m, opt, comm, [2])
        return kept, opt._loaded_checkpoint is None

    assert gradcomp.LocalWorld(N, timeout=60).run(fn) == [(True, True)] * N
