"""Sync policies (localsgd, da, da-pipelined, slowmo) on LocalWorld with a numpy model and optimizer.

Each rank fits its own least-squares problem (different data per rank) with a tiny numpy
SGD-with-momentum optimizer, driven through the SyncPolicy protocol exactly as the framework
adapters drive it: sync_gradients -> GradientSync, before_step, optimizer step, after_step.
"""
import numpy as np
import pytest

import gradcomp
from gradcomp.comm.base import ConfigMismatchError
from gradcomp.pipeline import GradientSync

D_IN, D_OUT, ROWS, BATCH = 6, 3, 64, 8


class NumpyParams:
    """ParamAccess over a dict of numpy parameters and a NumpySGD's momentum buffers."""

    def __init__(self, params, opt):
        self.params, self.opt = params, opt

    def names(self):
        return list(self.params)

    def get(self, name):
        return self.params[name]

    def set(self, name, value):
        self.params[name][...] = value

    def momentum(self, name):
        return self.opt.buf.get(name)

    def set_momentum(self, name, value):
        self.opt.buf[name][...] = value


class NumpySGD:
    """torch.optim.SGD semantics (dampening 0): buf = mu*buf + g (buf = g at first), x -= lr*buf."""

    def __init__(self, params, lr, momentum=0.0):
        self.params, self.lr, self.mu, self.buf = params, lr, momentum, {}

    def step(self, grads):
        for n, g in grads.items():
            if self.mu:
                if n in self.buf:
                    self.buf[n][...] = self.mu * self.buf[n] + g
                else:
                    self.buf[n] = np.array(g, copy=True)
                d = self.buf[n]
            else:
                d = g
            self.params[n][...] = self.params[n] - self.lr * d


def data(rank, dtype):
    rs = np.random.default_rng(100 + rank)          # a different regression problem on every rank
    a = rs.normal(size=(ROWS, D_IN)).astype(dtype)
    w = rs.normal(size=(D_IN, D_OUT)) + rank
    y = (a @ w + 0.1 * rs.normal(size=(ROWS, D_OUT))).astype(dtype)
    return a, y


def init_params(dtype):
    rs = np.random.default_rng(7)                    # identical start on every rank
    return {"W": rs.normal(size=(D_IN, D_OUT)).astype(dtype), "b": np.zeros(D_OUT, dtype)}


def grads(p, a, y, step):
    i = (step * BATCH) % ROWS
    xa, ya = a[i:i + BATCH], y[i:i + BATCH]
    r = xa @ p["W"] + p["b"] - ya
    return {"W": xa.T @ r / BATCH, "b": r.mean(0)}


class FrameworkParams(NumpyParams):
    """The same view handing the policy torch or TF tensors (the optimizer stays numpy)."""

    backend = "torch"

    def _to(self, a):
        if self.backend == "torch":
            import torch
            return torch.from_numpy(np.array(a))
        import tensorflow as tf
        return tf.constant(a)

    def get(self, name):
        return self._to(self.params[name])

    def set(self, name, value):
        self.params[name][...] = np.asarray(value)

    def momentum(self, name):
        m = self.opt.buf.get(name)
        return None if m is None else self._to(m)

    def set_momentum(self, name, value):
        self.opt.buf[name][...] = np.asarray(value)


def run(spec, steps, *, momentum=0.9, lr=0.05, world=2, dtype=np.float64, compressor=None,
        resume_at=None, trace=False, stop_at=None, view_cls=NumpyParams):
    """Train on `world` ranks; returns per rank the final params (and per-step traces if asked).

    resume_at=k: after step k-1 every rank checkpoints (params, optimizer, policy), builds a fresh
    policy/optimizer/GradientSync and continues from the checkpoint.
    """
    def body(comm):
        a, y = data(comm.rank, dtype)
        p = init_params(dtype)
        opt = NumpySGD(p, lr, momentum)
        policy = gradcomp.create(spec, "sync").bind(comm, compressor, seed=3)
        gs = GradientSync("none", comm=comm)
        view = view_cls(p, opt)
        hist = []
        for step in range(steps if stop_at is None else stop_at):
            if step == resume_at:
                pol_sd = policy.state_dict()     # first: drains da-pipelined's pending momentum average
                sd = {"params": {k: v.copy() for k, v in p.items()},
                      "buf": {k: v.copy() for k, v in opt.buf.items()},
                      "policy": pol_sd, "gs": gs.state_dict()}
                p = {k: v.copy() for k, v in sd["params"].items()}
                opt = NumpySGD(p, lr, momentum)
                opt.buf = {k: v.copy() for k, v in sd["buf"].items()}
                policy = gradcomp.create(spec, "sync").bind(comm, compressor, seed=3)
                policy.load_state_dict(sd["policy"])
                gs = GradientSync("none", comm=comm)
                gs.load_state_dict(sd["gs"])
                view = view_cls(p, opt)
            g = grads(p, a, y, step)
            if policy.sync_gradients(step):
                g = gs.step(g)
            policy.before_step(step, view)
            opt.step(g)
            policy.after_step(step, view)
            if trace:
                hist.append({k: v.copy() for k, v in p.items()})
        policy.flush()
        return {"params": {k: v.copy() for k, v in p.items()}, "hist": hist, "policy": policy,
                "buf": {k: v.copy() for k, v in opt.buf.items()}}
    return gradcomp.LocalWorld(world, timeout=60).run(body)


def close(r1, r2, key="params", rtol=1e-10, atol=1e-12):
    for x, y in zip(r1, r2):
        for n in x[key]:
            np.testing.assert_allclose(x[key][n], y[key][n], rtol=rtol, atol=atol, err_msg=n)


def maxdiff(r1, r2, key="params"):
    return max(float(np.max(np.abs(x[key][n] - y[key][n]))) for x, y in zip(r1, r2) for n in x[key])


# ---------------------------------------------------------------------------------- equivalences
def test_localsgd_period1_equals_synchronous_sgd():
    ref = run("allreduce", 20, momentum=0.0)
    got = run("localsgd:period=1", 20, momentum=0.0)
    close(ref, got)
    assert maxdiff(ref, run("localsgd:period=4", 20, momentum=0.0)) > 1e-6   # the comparison can fail


def test_post_local_sgd_warmup_is_synchronous_then_local():
    ref = run("allreduce", 12, trace=True)
    got = run("localsgd:period=3,warmup=5", 12, trace=True)
    for s in range(5):                       # warmup: identical to synchronous SGD
        for r in range(2):
            np.testing.assert_allclose(got[r]["hist"][s]["W"], ref[r]["hist"][s]["W"], rtol=1e-12)
    local = got[0]["hist"][5]["W"] - got[1]["hist"][5]["W"]
    assert np.abs(local).max() > 1e-6        # step 5 is local: the ranks diverge
    for s in (7, 10):                        # (s - 5 + 1) % 3 == 0: averaged, ranks agree
        np.testing.assert_allclose(got[0]["hist"][s]["W"], got[1]["hist"][s]["W"], rtol=1e-12)


def test_slowmo_alpha1_beta0_equals_localsgd():
    ref = run("localsgd:period=4", 24)
    got = run("slowmo:period=4,alpha=1,beta=0,lr=0.05", 24)
    close(ref, got, rtol=1e-9, atol=1e-11)
    assert maxdiff(ref, run("slowmo:period=4,alpha=1,beta=0.5", 24)) > 1e-6


def test_slowmo_matches_reference_equations():
    lr, alpha, beta, H, T = 0.05, 0.7, 0.6, 3, 15
    got = run(f"slowmo:period={H},alpha={alpha},beta={beta},lr={lr}", T, momentum=0.0, lr=lr)
    # single-process reference of Algorithm 1 with local SGD as base optimizer
    probs = [data(r, np.float64) for r in range(2)]
    x0, u = init_params(np.float64), {k: 0.0 for k in ("W", "b")}
    xs = [{k: v.copy() for k, v in x0.items()} for _ in range(2)]
    for step in range(T):
        for r in range(2):
            g = grads(xs[r], *probs[r], step)
            for k in xs[r]:
                xs[r][k] = xs[r][k] - lr * g[k]
        if (step + 1) % H == 0:
            for k in x0:
                avg = (xs[0][k] + xs[1][k]) / 2
                u[k] = beta * u[k] + (x0[k] - avg) / lr
                x0[k] = x0[k] - alpha * lr * u[k]
            xs = [{k: v.copy() for k, v in x0.items()} for _ in range(2)]
    for r in range(2):
        for k in xs[r]:
            np.testing.assert_allclose(got[r]["params"][k], xs[r][k], rtol=1e-9, atol=1e-11)


def test_slowmo_lr_cancels_while_constant():
    close(run("slowmo:period=4,beta=0.5,lr=1.0", 16), run("slowmo:period=4,beta=0.5,lr=0.05", 16),
          rtol=1e-8, atol=1e-10)


def test_da_pipelined_equals_da_step_for_step():
    ref = run("da:period=3", 20, trace=True)
    got = run("da-pipelined:period=3", 20, trace=True)
    for s in range(20):
        for r in range(2):
            for k in ("W", "b"):
                np.testing.assert_allclose(got[r]["hist"][s][k], ref[r]["hist"][s][k], rtol=1e-10, atol=1e-12)
    close(ref, got, key="buf")
    assert got[0]["policy"].stats()["syncs"] == 6


def test_da_averages_momentum_buffers():
    da = run("da:period=4", 16)             # 16 steps: the last step is a sync step
    for k in ("W", "b"):
        np.testing.assert_allclose(da[0]["buf"][k], da[1]["buf"][k], rtol=1e-12)
    loc = run("localsgd:period=4", 16)
    assert np.abs(loc[0]["buf"]["W"] - loc[1]["buf"]["W"]).max() > 1e-6   # local SGD keeps them local
    assert maxdiff(da, loc) > 1e-6


def test_da_without_momentum_equals_localsgd():
    close(run("localsgd:period=3", 18, momentum=0.0), run("da:period=3", 18, momentum=0.0), rtol=0, atol=0)
    close(run("localsgd:period=3", 18, momentum=0.0), run("da-pipelined:period=3", 18, momentum=0.0),
          rtol=0, atol=0)


def test_slowmo_buffer_modes():
    avg = run("slowmo:period=4,buffers=average", 16)
    np.testing.assert_allclose(avg[0]["buf"]["W"], avg[1]["buf"]["W"], rtol=1e-12)
    reset = run("slowmo:period=4,buffers=reset", 16)
    assert not np.any(reset[0]["buf"]["W"]) and not np.any(reset[1]["buf"]["b"])


def test_four_ranks_and_float32():
    ref = run("allreduce", 10, momentum=0.0, world=4, dtype=np.float32)
    got = run("localsgd:period=1", 10, momentum=0.0, world=4, dtype=np.float32)
    close(ref, got, rtol=1e-5, atol=1e-6)
    assert got[0]["params"]["W"].dtype == np.float32


@pytest.mark.parametrize("fw", ["torch", "tensorflow"])
@pytest.mark.parametrize("spec,comp", [("da-pipelined:period=3", None), ("slowmo:period=3,beta=0.5", None),
                                       ("localsgd:period=3", "randomk:ratio=0.5")])
def test_policies_on_framework_tensors_match_numpy(fw, spec, comp):
    pytest.importorskip(fw)
    view_cls = type(f"{fw}View", (FrameworkParams,), {"backend": fw})
    ref, got = run(spec, 9, compressor=comp), run(spec, 9, compressor=comp, view_cls=view_cls)
    close(ref, got, rtol=1e-12, atol=1e-12)
    close(ref, got, key="buf", rtol=1e-12, atol=1e-12)
    assert maxdiff(ref, run(spec, 9, momentum=0.5)) > 1e-6


# ---------------------------------------------------------------------------------- compressed deltas
def test_lossless_compressor_gives_exact_average():
    close(run("localsgd:period=4", 12), run("localsgd:period=4", 12, compressor="none"), rtol=0, atol=0)


@pytest.mark.parametrize("comp", ["randomk:ratio=0.5", "topk:ratio=0.5", "fp16"])
def test_compressed_deltas_agree_and_track_exact_average(comp):
    got = run("localsgd:period=3", 96, momentum=0.0, compressor=comp)
    exact = run("localsgd:period=3", 96, momentum=0.0)
    for k in ("W", "b"):                     # after the last sync (step 95) all ranks agree
        np.testing.assert_allclose(got[0]["params"][k], got[1]["params"][k], rtol=1e-12)
    stats = got[0]["policy"]._delta.stats()
    assert stats["steps"] == 32 and stats["bytes_sent"] > 0      # one delta exchange per sync
    moved = float(np.abs(exact[0]["params"]["W"] - init_params(np.float64)["W"]).max())
    if comp != "fp16":
        assert maxdiff(got, exact) > 1e-6    # really compressed
    assert maxdiff(got, exact) < 0.1 * moved  # but it converges near the exact-average run


@pytest.mark.parametrize("comp", ["randomk:ratio=0.3", "topk:ratio=0.3"])
def test_compressed_deltas_lose_nothing(comp):
    """Error feedback: x_new + mean_r e_r == mean_r x_r + mean_r e_r(previous), at every sync."""
    def body(comm):
        rs = np.random.default_rng(comm.rank)
        p = init_params(np.float64)
        opt = NumpySGD(p, 0.1)
        view = NumpyParams(p, opt)
        pol = gradcomp.create("localsgd:period=1", "sync").bind(comm, comp)
        ok = []
        for step in range(6):
            pol.before_step(step, view)
            for v in p.values():
                v += rs.normal(size=v.shape)
            e_prev = {k: (pol._delta.residual(k) if pol._delta.residual(k) is not None else np.zeros(v.size))
                      for k, v in p.items()}
            want = {k: comm.allreduce((p[k].ravel() + e_prev[k]) / 2).wait() for k in p}
            pol.after_step(step, view)
            for k in p:
                have = comm.allreduce((p[k].ravel() + pol._delta.residual(k)) / 2).wait()
                ok.append(np.allclose(have, want[k], rtol=1e-12, atol=1e-12))
        return all(ok) and len(ok) == 12
    assert gradcomp.LocalWorld(2, timeout=30).run(body) == [True, True]


def test_compress_false_ignores_compressor():
    close(run("localsgd:period=3,compress=false", 12, compressor="randomk:ratio=0.5"),
          run("localsgd:period=3", 12), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("spec,comp,at", [
    ("localsgd:period=4", None, 6),
    ("da:period=3", None, 6),
    ("da-pipelined:period=3", None, 6),           # checkpoint right after a sync: pending momentum drained
    ("da-pipelined:period=3", None, 7),
    ("slowmo:period=3,beta=0.7", None, 9),
    ("slowmo:period=3,beta=0.7,buffers=average", "randomk:ratio=0.3", 7),
    ("localsgd:period=2,warmup=5", "topk:ratio=0.3", 4),
])
def test_checkpoint_resume_continues_exactly(spec, comp, at):
    ref = run(spec, 16, compressor=comp)
    got = run(spec, 16, compressor=comp, resume_at=at)
    close(ref, got, rtol=0, atol=0)
    close(ref, got, key="buf", rtol=0, atol=0)


def test_state_dict_contents_and_mismatch():
    res = run("slowmo:period=2", 5)
    sd = res[0]["policy"].state_dict()
    assert sd["steps"] == 5 and sd["syncs"] == 2 and set(sd["anchor"]) == {"W", "b"}
    assert set(sd["slow_momentum"]) == {"W", "b"}
    with pytest.raises(ValueError, match="same GRADCOMP_SYNC"):
        gradcomp.create("slowmo:period=3", "sync").load_state_dict(sd)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec", ["localsgd:period=0", "localsgd:period=-2", "localsgd:warmup=-1",
                                  "da:period=x", "slowmo:beta=1", "slowmo:beta=-0.1", "slowmo:alpha=0",
                                  "slowmo:lr=0", "slowmo:buffers=zero", "localsgd:alpha=1", "da-pipelined:H=2",
                                  "localsgdd:period=2"])
def test_bad_params_raise_value_error(spec):
    with pytest.raises(ValueError):
        gradcomp.create(spec, "sync")


def test_from_env_and_spec():
    cfg = gradcomp.from_env({"GRADCOMP_SYNC": "da-pipelined:period=8"})
    assert cfg.sync.name == "da-pipelined" and cfg.sync.period == 8 and not cfg.sync.synchronous
    with pytest.raises(ValueError, match="GRADCOMP_SYNC"):
        gradcomp.from_env({"GRADCOMP_SYNC": "slowmo:beta=2"})
    assert set(gradcomp.available("sync")) >= {"allreduce", "localsgd", "da", "da-pipelined", "slowmo"}


def test_unbound_policy_raises():
    pol = gradcomp.create("localsgd", "sync")
    opt = NumpySGD(init_params(np.float64), 0.1)
    with pytest.raises(RuntimeError, match="bind"):
        pol.before_step(0, NumpyParams(opt.params, opt))


def test_nonfinite_average_raises_on_every_rank_and_keeps_params():
    def body(comm):
        p = init_params(np.float64)
        if comm.rank == 1:
            p["W"][0, 0] = np.nan
        opt = NumpySGD(p, 0.1)
        pol = gradcomp.create("localsgd:period=1", "sync").bind(comm)
        view = NumpyParams(p, opt)
        pol.before_step(0, view)
        before = p["b"].copy()
        p["b"] += comm.rank + 1.0
        try:
            pol.after_step(0, view)
        except FloatingPointError as e:
            whose = "own parameters hold 1 non-finite" if comm.rank == 1 else "another rank's diverged"
            return "non-finite" in str(e) and whose in str(e) and "wrote nothing" in str(e) and \
                np.array_equal(p["b"], before + comm.rank + 1.0)
        return False
    assert gradcomp.LocalWorld(2, timeout=30).run(body) == [True, True]


@pytest.mark.parametrize("policy", ["localsgd:period=1", "da:period=1"])
def test_float16_parameters_near_the_top_of_their_range_average_to_a_finite_value(policy):
    """Two ranks' float16 4e4 sum to 8e4 (beyond 65504): the mean must be taken before the cast back,
    for the parameters and for the momentum buffers."""
    def body(comm):
        p = {"w": np.full(4, 4e4 + 8 * comm.rank, np.float16)}
        opt = NumpySGD(p, 0.1, momentum=0.9)
        view = NumpyParams(p, opt)
        pol = gradcomp.create(policy, "sync").bind(comm)
        pol.before_step(0, view)
        opt.step({"w": np.full(4, -4e4, np.float16)})      # x = 4.4e4 (+8 on rank 1), momentum -4e4
        pol.after_step(0, view)
        pol.flush()
        return p["w"], opt.buf["w"]
    for w, buf in gradcomp.LocalWorld(2, timeout=30).run(body):
        assert np.all(np.isfinite(w)) and np.all(np.abs(w - 4.4e4) < 40), w
        if policy.startswith("da"):                          # the momentum buffers were averaged too
            assert np.all(buf == np.float16(-4e4)), buf


def test_parameters_in_another_order_raise_config_mismatch_on_every_rank():
    """The parameter exchange fuses tensors by position: a permuted model must not be averaged."""
    def body(comm):
        p = init_params(np.float64)
        if comm.rank == 1:
            p = dict(reversed(p.items()))
        pol = gradcomp.create("localsgd:period=1", "sync").bind(comm)
        try:
            pol.before_step(0, NumpyParams(p, NumpySGD(p, 0.1)))
        except ConfigMismatchError as e:
            return 'order: first difference at position 0: rank 0: "W"; rank 1: "b"' in str(e)
        return False
    assert gradcomp.LocalWorld(2, timeout=30).run(body) == [True, True]


def test_mismatched_models_raise_config_mismatch_on_every_rank():
    def body(comm):
        p = init_params(np.float64)
        if comm.rank == 1:
            p["extra"] = np.zeros(2)
        opt = NumpySGD(p, 0.1)
        pol = gradcomp.create("localsgd:period=1", "sync").bind(comm)
        try:
            pol.before_step(0, NumpyParams(p, opt))
        except ConfigMismatchError as e:
            return "extra" in str(e) or "tensors" in str(e)
        return False
    assert gradcomp.LocalWorld(2, timeout=30).run(body) == [True, True]
