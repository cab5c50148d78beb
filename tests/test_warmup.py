"""`warmup=N`: N dense steps before any lossy compressor starts (gradcomp/compressors/warmup.py)."""
from __future__ import annotations

import numpy as np
import pytest

import gradcomp

N, W = 300, 3


def world(size, fn):
    return gradcomp.LocalWorld(size, timeout=60).run(fn)


def grads(rank, steps, shape=(N,)):
    rng = np.random.default_rng([7, rank])
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("spec", ["topk:ratio=0.05", "powersgd:rank=1", "efsignsgd", "threshold:threshold=1.5",
                                  "qsgd"])
def test_warmup_steps_are_dense_then_the_compressor_starts_with_clean_residuals(spec):
    shape = (20, 15)

    def fn(comm):
        sync = gradcomp.GradientSync(f"{spec},warmup={W}" if ":" in spec else f"{spec}:warmup={W}", comm=comm,
                                     seed=1)
        plain = gradcomp.GradientSync(spec, comm=comm, seed=1)
        gs = grads(comm.rank, W + 2, shape)
        outs, res, sent, last = [], [], [], 0
        for g in gs:
            outs.append(sync.step({"w": g})["w"])
            r = sync.residual("w")
            res.append(None if r is None else np.array(r))
            sent.append(sync.stats()["bytes_sent"] - last)
            last = sync.stats()["bytes_sent"]
        first = plain.step({"w": gs[W]})["w"]        # a fresh run's first compressed step
        return gs, outs, res, sent, first

    out = world(2, fn)
    for t in range(W):
        mean = (out[0][0][t] + out[1][0][t]) / 2
        for r in range(2):
            np.testing.assert_allclose(out[r][1][t], mean, rtol=1e-6, atol=1e-7)
            assert out[r][3][t] == 4 * N
            if out[r][2][t] is not None:
                assert not np.any(out[r][2][t])           # residual stays clean during warm-up
    for r in range(2):
        if not spec.startswith("qsgd"):        # (qsgd draws its rounding from the step number)
            np.testing.assert_array_equal(out[r][1][W], out[r][4])   # step W == a fresh compressor's first step
        assert out[r][3][W] < 4 * N or spec.startswith("threshold")


def test_warmup_spec_round_trips_and_bad_values_raise():
    c = gradcomp.create("topk:ratio=0.1,warmup=5")
    assert c.spec().endswith(",warmup=5") and c.ratio == 0.1
    assert gradcomp.create(c.spec()).spec() == c.spec()
    assert gradcomp.create("topk:warmup=0").spec() == gradcomp.create("topk").spec()
    for bad in ("topk:warmup=-1", "topk:warmup=x"):
        with pytest.raises(ValueError, match="warmup"):
            gradcomp.create(bad)
    with pytest.raises(ValueError, match="momentum"):
        gradcomp.create("signum:warmup=3")
    with pytest.raises(ValueError, match="lossless"):
        gradcomp.create("none:warmup=3")


def test_dgc_memory_keeps_heavy_ball_momentum_during_warmup():
    m = 0.9

    def fn(comm):
        sync = gradcomp.GradientSync("dgc:ratio=0.01,warmup=3", comm=comm)
        return [sync.step({"w": g})["w"] for g in grads(comm.rank, 3, (30, 10))], grads(comm.rank, 3, (30, 10))

    out = world(2, fn)
    v = np.zeros((30, 10))
    for t in range(3):
        v = m * v + (out[0][1][t] + out[1][1][t]) / 2
        np.testing.assert_allclose(out[0][0][t], v, rtol=1e-5, atol=1e-6)


def test_threshold_falls_back_to_dense_when_sparse_would_be_larger():
    n = 100
    g = [np.full(n, 2.0, np.float32), np.where(np.arange(n) < 5, 3.0, 0.1).astype(np.float32)]

    def fn(comm):
        sync = gradcomp.GradientSync("threshold:threshold=1", comm=comm)
        out = sync.step({"w": g[comm.rank]})["w"]
        return out, sync.stats()["bytes_sent"], np.array(sync.residual("w"))

    res = world(2, fn)
    want = (g[0] + np.where(g[1] >= 1, g[1], 0)) / 2
    for out, _, _ in res:
        np.testing.assert_allclose(out, want, rtol=1e-6)
    assert res[0][1] == 4 * n                 # dense (8 bytes x 100 kept would be 800)
    assert res[1][1] == 5 * 8
    assert not np.any(res[0][2])
