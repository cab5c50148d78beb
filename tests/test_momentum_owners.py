"""Methods that own their momentum (dgc, gmc, gmc+, signum) under a wrapped SGD(momentum=0.9).

Impulse response: one gradient G at step 0, zeros afterwards; the total displacement of the
weights per unit of gradient, <w_0 - w_T, G> / (lr <G, G>), is 1/(1-m) = 10 for dense momentum
SGD. Before the momentum take-over DGC under SGD(momentum=0.9) gave ~91 (momentum applied twice).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradcomp  # noqa: E402
import gradcomp_torch as gct  # noqa: E402
from gradcomp.comm.single import SingleCommunicator  # noqa: E402

M = 0.9


def impulse_response(compressor, memory="auto", steps=400, shape=(40, 50), lr=0.01, momentum=M, seed=0,
                     **opt_kw):
    """Total displacement per unit gradient of a weight of `shape` after one gradient impulse."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(shape))
    g = torch.sign(torch.randn(shape)) * 0.01          # one magnitude: the sign methods' scale is exact
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum, **opt_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dopt = gct.DistributedOptimizer(opt, named_parameters=[("w", w)], compressor=compressor, memory=memory,
                                        comm=SingleCommunicator())
    for t in range(steps):
        dopt.zero_grad()
        w.grad = g.clone() if t == 0 else torch.zeros(shape)
        dopt.synchronize()
        dopt.step()
    disp = -w.detach().double()
    return float((disp * g).sum() / (lr * (g.double() ** 2).sum()))


def dgc_expected(n, k, m=M):
    """DGC with masking: a coordinate sent at step t delivers sum_{s<=t} m^s and loses the rest."""
    per_step = [sum(m ** s for s in range(t + 1)) for t in range(-(-n // k))]
    sent = [min(k, n - t * k) for t in range(len(per_step))]
    return sum(c * r for c, r in zip(sent, per_step)) / n


@pytest.mark.parametrize("compressor,memory,steps", [
    ("dgc:ratio=0.001,warmup_steps=0", "auto", 1200),
    ("topk:ratio=0.1", "gmc", 1500),              # gmc: momentum per visit, 1/ratio steps apart
    ("rbgs:ratio=0.01", "gmc:plus=true", 400),
    ("topk:ratio=0.01", "gmc:plus=true", 400),
    ("signum", "auto", 400),
    ("topk:ratio=0.01", "residual", 400),          # control: the optimizer keeps its momentum
    ("none", "auto", 400),
])
def test_impulse_response_is_one_over_one_minus_momentum(compressor, memory, steps):
    r = impulse_response(compressor, memory, steps=steps)
    assert abs(r - 1 / (1 - M)) < 0.05 / (1 - M), f"{compressor} / {memory}: displacement {r:.3f} per unit gradient"


def test_dgc_impulse_response_is_the_masking_rule_not_momentum_twice():
    n, ratio = 2000, 0.01
    r = impulse_response(f"dgc:ratio={ratio},warmup_steps=0", steps=400)
    expected = dgc_expected(n, int(round(ratio * n)))
    assert abs(r - expected) < 0.01 * expected, (r, expected)     # 9.1: masking, not 91
    assert r < 1 / (1 - M)


def test_dgc_warmup_keeps_the_momentum():
    """During the density warm-up (default: 1000 steps at 25% first) momentum factor masking would reset the
    momentum of every coordinate sent, i.e. every ~4 steps: DGC at its default warm-up trained like SGD
    without momentum. masking=final (the default) masks only at the final density: the full heavy-ball
    response 1/(1-m) during warm-up; masking=on is the reference's rule (the masking formula at k = n/4)."""
    n = 2000
    r = impulse_response("dgc:ratio=0.01", steps=300)                     # all 300 steps inside the warm-up
    assert abs(r - 1 / (1 - M)) < 0.05 / (1 - M), r
    on = impulse_response("dgc:ratio=0.01", "dgc:masking=on", steps=300)
    expected = dgc_expected(n, n // 4)
    assert abs(on - expected) < 0.01 * expected, (on, expected)          # 2.3: the momentum is gone
    off = impulse_response("dgc:ratio=0.01,warmup_steps=0", "dgc:masking=off", steps=1200)
    assert abs(off - 1 / (1 - M)) < 0.05 / (1 - M), off


def test_takeover_sets_the_optimizer_momentum_to_zero_and_warns_once():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    b = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([{"params": [w], "momentum": 0.9}, {"params": [b], "momentum": 0.5}], lr=0.1)
    with pytest.warns(UserWarning, match="took over SGD's momentum=0.5, momentum=0.9") as rec:
        dopt = gct.DistributedOptimizer(opt, named_parameters=[("w", w), ("b", b)], compressor="dgc",
                                        comm=SingleCommunicator())
    assert len([x for x in rec if "took over" in str(x.message)]) == 1
    assert [g["momentum"] for g in opt.param_groups] == [0.0, 0.0]
    assert dopt.gradient_sync.memory.adopted() == {"w": (0.9, False), "b": (0.5, False)}


def test_plain_sgd_keeps_the_methods_own_momentum():
    r = impulse_response("dgc:ratio=0.001,warmup_steps=0", momentum=0.0, steps=1200)
    assert abs(r - 1 / (1 - M)) < 0.05 / (1 - M)          # dgc's own momentum=0.9


@pytest.mark.parametrize("spec", [("dgc", "auto"), ("topk", "gmc"), ("signum", "auto")])
def test_adaptive_optimizer_with_a_momentum_owner_raises(spec):
    w = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="defined only over plain SGD"):
        gct.DistributedOptimizer(torch.optim.Adam([w]), named_parameters=[("w", w)], compressor=spec[0],
                                 memory=spec[1], comm=SingleCommunicator())


def test_nesterov_with_a_heavy_ball_only_owner_raises():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="nesterov=False"):
        gct.DistributedOptimizer(torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True),
                                 named_parameters=[("w", w)], compressor="topk", memory="gmc",
                                 comm=SingleCommunicator())


def _reference_dgc(grads, params0, lr, m, wd, nesterov, ratio, world):
    """The DGC reference (synxlin/deep-gradient-compression): DGCSGDMemory + DGCCompressor + DGCSGD,
    written out in numpy for `world` ranks with exact top-k (no sampling) on tensors with ndim > 1."""
    names = list(params0)
    p = {n: params0[n].astype(np.float64).copy() for n in names}
    mmt = [{n: np.zeros_like(p[n]) for n in names} for _ in range(world)]
    vel = [{n: np.zeros_like(p[n]) for n in names} for _ in range(world)]
    wdbuf = {}
    for step in grads:
        avg = {}
        for n in names:
            if p[n].ndim > 1:
                tot = np.zeros(p[n].size)
                for r in range(world):
                    g = step[r][n].reshape(-1).astype(np.float64)
                    u, v = mmt[r][n].reshape(-1), vel[r][n].reshape(-1)
                    if nesterov:
                        u += g; u *= m; v += u + g
                    else:
                        u *= m; u += g; v += u
                    k = max(1, int(round(ratio * v.size)))
                    idx = np.argsort(-np.abs(v), kind="stable")[:k]
                    tot[idx] += v[idx]
                    u[idx] = 0; v[idx] = 0
                avg[n] = (tot / world).reshape(p[n].shape)
            else:
                a = np.mean([step[r][n].astype(np.float64) for r in range(world)], axis=0)
                u = mmt[0][n]
                if nesterov:
                    u += a; u *= m; avg[n] = u + a
                else:
                    u *= m; u += a; avg[n] = u.copy()
        for n in names:
            d = wd * p[n]
            if n not in wdbuf:
                wdbuf[n] = d.copy()
            else:
                wdbuf[n] = wdbuf[n] * m + d
            dp = (d + m * wdbuf[n]) if nesterov else wdbuf[n]
            p[n] = p[n] - lr * (dp + avg[n])
    return p


@pytest.mark.parametrize("nesterov", [False, True])
def test_dgc_under_sgd_momentum_equals_the_reference_step(nesterov):
    world, steps, lr, m, wd, ratio = 2, 6, 0.1, 0.9, 0.01, 0.05
    rng = np.random.default_rng(1)
    shapes = {"w": (8, 10), "b": (8,)}
    params0 = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    grads = [[{n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()} for _ in range(world)]
             for _ in range(steps)]

    def fn(comm):
        ps = {n: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for n, v in params0.items()}
        opt = torch.optim.SGD(list(ps.values()), lr=lr, momentum=m, weight_decay=wd, nesterov=nesterov)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dopt = gct.DistributedOptimizer(opt, named_parameters=list(ps.items()), comm=comm,
                                            compressor=f"dgc:ratio={ratio},warmup_steps=0")
        for t in range(steps):
            dopt.zero_grad()
            for n, p in ps.items():
                p.grad = torch.tensor(grads[t][comm.rank][n], dtype=torch.float64)
            dopt.synchronize()
            dopt.step()
        return {n: p.detach().numpy().copy() for n, p in ps.items()}

    got = gradcomp.LocalWorld(world, timeout=60).run(fn)
    want = _reference_dgc(grads, params0, lr, m, wd, nesterov, ratio, world)
    for n in shapes:
        np.testing.assert_allclose(got[0][n], want[n], rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(got[0][n], got[1][n])


def test_keras_optimizer_hands_sgd_momentum_over_and_refuses_adam():
    keras = pytest.importorskip("keras")
    import gradcomp_tf as gtf
    with pytest.warns(UserWarning, match="took over SGD's momentum=0.8"):
        opt = gtf.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.8), compressor="dgc",
                                       backend=SingleCommunicator())
    assert float(opt.momentum) == 0.0
    assert opt.gradcomp_exchange.sync.memory.adopted() == {None: (0.8, False)}
    with pytest.raises(ValueError, match="defined only over plain SGD"):
        gtf.DistributedOptimizer(keras.optimizers.Adam(0.1), compressor="signum", backend=SingleCommunicator())


def test_sync_policies_use_plain_error_feedback_for_dgc_deltas():
    pol = gradcomp.create("localsgd:period=2", "sync").bind(SingleCommunicator(), compressor="dgc:ratio=0.1")
    assert pol._delta.memory.name == "residual"


def test_slowmo_reads_the_learning_rate_from_the_optimizer():
    from gradcomp_torch.sync_view import TorchParamAccess
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)
    view = TorchParamAccess([("w", w)], opt)
    pol = gradcomp.create("slowmo:period=1,beta=0.5", "sync").bind(SingleCommunicator())
    pol.before_step(0, view)
    opt.param_groups[0]["lr"] = 0.25                 # a schedule changed it during the outer iteration
    pol.after_step(0, view)
    assert pol._gamma == {"w": 0.25}


def test_double_averaging_warns_for_adam():
    from gradcomp_torch.sync_view import TorchParamAccess
    w = torch.nn.Parameter(torch.ones(3))
    view = TorchParamAccess([("w", w)], torch.optim.Adam([w]))
    pol = gradcomp.create("da:period=2", "sync").bind(SingleCommunicator())
    with pytest.warns(UserWarning, match="only its first moment"):
        pol.before_step(0, view)
