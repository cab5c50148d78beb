"""Virtual workers and load balancing (gradcomp.balance, GradientSync(weight=), gradcomp_torch.VirtualWorkers)
on one process and LocalWorld ranks: the sampler covers every sample once per epoch, the balancer's
decision is optimal, deterministic and identical on every rank, the sample-weighted mean is exact for
`none`, a weight is the same as a caller-scaled gradient for every compressor, and error feedback keeps
the weighted sum when weights change between steps. Across real processes: test_virtual_multiproc.py."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import gradcomp
from gradcomp import balance as gb
from gradcomp.config import virtual_workers_from_env

from conftest import all_specs, load, to_np, world


# --------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("n, batch, v, drop_last", [(100, 32, 4, False), (90, 32, 8, False), (37, 16, 16, False),
                                                    (64, 16, 4, False), (100, 32, 4, True), (7, 5, 5, False)])
def test_sampler_covers_each_sample_once_per_epoch(n, batch, v, drop_last):
    """Every rank's micro-batches, over all steps and any shares, visit each sample exactly once per epoch
    (drop_last: the remainder is left out); the virtual workers do not depend on the shares."""
    s = gb.VirtualSampler(n, batch, v, seed=3, drop_last=drop_last)
    rng = np.random.default_rng(0)
    for epoch in range(3):
        seen = []
        for step in range(s.steps_per_epoch):
            vws = s.virtual_batches(epoch, step)
            assert len(vws) == v and max(map(len, vws)) - min(map(len, vws)) <= 1
            for size in (1, 2, 3):
                if v < size:
                    continue
                cut = sorted(rng.choice(np.arange(1, v), size - 1, replace=False)) if size > 1 else []
                shares = np.diff([0, *cut, v]).tolist()
                parts = [s.rank_batches(epoch, step, shares, r) for r in range(size)]
                got = np.concatenate([b for mine, _, _ in parts for b in mine])
                np.testing.assert_array_equal(got, np.concatenate(vws))
                assert sum(nr for _, nr, _ in parts) == parts[0][2] == len(got)
            seen.append(np.concatenate(vws))
        seen = np.concatenate(seen)
        want = n - n % batch if drop_last else n
        assert len(seen) == want and len(np.unique(seen)) == want
        if not drop_last:
            np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    assert s.epoch_order(1).tolist() == gb.VirtualSampler(n, batch, v, seed=3).epoch_order(1).tolist()
    assert s.epoch_order(1).tolist() != s.epoch_order(2).tolist()


def test_sampler_rejects_bad_configuration():
    with pytest.raises(ValueError, match="smaller than virtual_workers"):
        gb.VirtualSampler(100, 4, 8)
    with pytest.raises(ValueError, match="global_batch must be an int"):
        gb.VirtualSampler(100, 0, 1)
    with pytest.raises(ValueError, match="add up to virtual_workers"):
        gb.VirtualSampler(100, 8, 4).rank_batches(0, 0, (1, 1), 0)
    with pytest.raises(ValueError, match="at least 2 virtual workers"):
        gb.equal_shares(1, 2)
    with pytest.raises(ValueError, match="GRADCOMP_VIRTUAL_WORKERS"):
        virtual_workers_from_env({"GRADCOMP_VIRTUAL_WORKERS": "zero"})
    assert virtual_workers_from_env({"GRADCOMP_VIRTUAL_WORKERS": " 12 "}) == 12
    assert virtual_workers_from_env({}) is None


# --------------------------------------------------------------------------- balancer
def _brute_min_max(units, t, min_units):
    best = None
    for s in itertools.product(range(min_units, units + 1), repeat=len(t)):
        if sum(s) == units:
            best = min(best if best is not None else float("inf"), gb.predicted_step(s, t))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_balanced_shares_minimise_the_predicted_step(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 4))
    units = int(rng.integers(size, 12))
    t = (rng.random(size) * 3 + 0.1).tolist()
    s = gb.balanced_shares(units, t)
    assert sum(s) == units and min(s) >= 1
    assert gb.predicted_step(s, t) == pytest.approx(_brute_min_max(units, t, 1), rel=1e-12)
    assert gb.balanced_shares(units, t) == s                       # deterministic
    assert gb.balanced_shares(24, [1.0, 2.0]) == (16, 8)           # half speed: two thirds / one third
    assert gb.balanced_shares(6, [1.0, 1.0, 1.0]) == gb.equal_shares(6, 3) == (2, 2, 2)


def test_balancer_decision_identical_on_every_rank_and_deterministic():
    """Each rank measures its own (noisy) compute time; after the allreduce every rank's balancer sees the
    same numbers and reaches the same shares at every step; a rerun gives the same history."""
    speed = [1.0, 0.5, 0.8]          # rank 1 at half speed

    def fn(comm):
        bal = gb.LoadBalancer(20, comm.size, every=3, smoothing=0.5, warmup=1)
        rng = np.random.default_rng([9, comm.rank])
        history = []
        for step in range(15):
            mine = bal.shares[comm.rank] * 0.01 / speed[comm.rank] * (1 + 0.05 * rng.standard_normal())
            h = gb.exchange_start(comm, [mine, 0.0, bal.shares[comm.rank], 0])
            comp = gb.exchange_finish(h, comm.size)[0]
            bal.observe(comp)
            history.append(bal.shares)
        return history

    runs = [world(3, fn), world(3, fn)]
    for hist in runs:
        assert hist[0] == hist[1] == hist[2]
    assert runs[0][0] == runs[1][0]
    final = runs[0][0][-1]
    assert final[1] < final[2] < final[0] and sum(final) == 20
    assert runs[0][0][0] == (7, 7, 6)                 # nothing changes before the first evaluation


def test_balancer_every_threshold_warmup_resize_state():
    bal = gb.LoadBalancer(12, 2, every=4, warmup=2, threshold=0.05)
    times = lambda: [bal.shares[0] * 1.0, bal.shares[1] * 2.0]    # noqa: E731 - rank 1 twice as slow
    changed = [bal.observe(times()) for _ in range(6)]
    assert changed == [False, False, False, False, False, True] and bal.shares == (8, 4)
    assert not any(bal.observe(times()) for _ in range(8))        # already optimal: stays
    bal2 = gb.LoadBalancer(12, 2, every=1, threshold=0.5, warmup=0)
    bal2.observe([6 * 1.0, 6 * 1.3])                           # 8/7 faster predicted: below the threshold
    assert bal2.shares == (6, 6)
    sd = bal.state_dict()
    other = gb.LoadBalancer(12, 2)
    other.load_state_dict(sd)
    assert other.shares == (8, 4) and other.estimate == bal.estimate
    three = gb.LoadBalancer(12, 3)
    three.load_state_dict(sd)                                  # another world size: equal shares
    assert three.shares == (4, 4, 4) and three.estimate is None
    bal.resize(3)
    assert bal.shares == (4, 4, 4)
    with pytest.raises(ValueError, match="at least 4 virtual workers"):
        gb.LoadBalancer(3, 4)
    with pytest.raises(ValueError, match="every"):
        gb.LoadBalancer(4, 2, every=0)


def test_balancer_follows_a_rank_that_slows_down_later():
    """A noisy neighbour appears on rank 0 after 20 steps (3x slower): the split moves back towards rank 1."""
    bal = gb.LoadBalancer(30, 2, every=5, smoothing=0.5, warmup=1)
    speed = [1.0, 0.5]
    history = []
    for step in range(60):
        if step == 20:
            speed = [1.0 / 3.0, 0.5]
        bal.observe([bal.shares[r] * 0.01 / speed[r] for r in range(2)])
        history.append(bal.shares)
    assert history[19] == (20, 10)                     # 2:1 while rank 1 is the slow one
    assert history[-1] == (12, 18)                     # then 2:3, after rank 0 slowed to a third
    assert bal.changes >= 2


# --------------------------------------------------------------------------- weighted averaging
SAMPLES = (1, 3, 4)         # per rank; N = 8, P = 3: weights 3/8, 9/8, 12/8 are exact binary fractions


@pytest.mark.parametrize("donate", [False, True])
def test_weighted_mean_is_exact_for_none(donate):
    """none: the average of P*n_r/N-weighted local means equals sum_r n_r g_r / N bit for bit (values
    chosen so every product and sum is exact), and within 1 ulp-scale rounding on random data."""
    total = sum(SAMPLES)

    def fn(comm):
        rng = np.random.default_rng([1, comm.rank])
        exact = {"w": (rng.integers(-64, 64, size=(5, 7)) / 16.0)}
        rand = {"w": rng.standard_normal((5, 7))}
        w = gb.gradient_weight(SAMPLES[comm.rank], total, comm.size)
        sync = gradcomp.GradientSync("none", comm=comm)
        outs = []
        for g in (exact, rand):
            sent = {k: v.copy() for k, v in g.items()}
            sync.start(sent, donate=donate, weight=w)
            outs.append(to_np(sync.finish()["w"]).copy())
            if not donate:
                np.testing.assert_array_equal(sent["w"], g["w"])          # the caller's array is untouched
        return exact["w"], rand["w"], outs

    res = world(3, fn)
    for which in (0, 1):
        want = sum(SAMPLES[r] * res[r][which] for r in range(3)) / total
        for r in range(3):
            if which == 0:
                np.testing.assert_array_equal(res[r][2][0], want)
            else:
                np.testing.assert_allclose(res[r][2][1], want, rtol=1e-14, atol=1e-15)
    # without the weight the plain mean is different: the test can fail
    plain = sum(res[r][0] for r in range(3)) / 3
    assert not np.array_equal(plain, sum(SAMPLES[r] * res[r][0] for r in range(3)) / total)


def _weights(step, rank):
    return [(0.5, 1.5), (1.25, 0.75), (0.0, 2.0)][step % 3][rank]


@pytest.mark.parametrize("spec", all_specs())
def test_weight_equals_a_caller_scaled_gradient_for_every_compressor(spec):
    """GradientSync(weight=w) on g is exactly GradientSync on w * g: same outputs, residuals, traffic, for
    weights that change per step and rank (the weight enters before error feedback and compression)."""
    load(spec)

    def fn(comm, weighted):
        sync = gradcomp.GradientSync(spec, comm=comm, seed=4)
        rng = np.random.default_rng([2, comm.rank])
        outs = []
        for step in range(4):
            g = {"a": rng.standard_normal((12, 9)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
            w = _weights(step, comm.rank)
            if weighted:
                sync.start(g, weight=w)
            else:
                sync.start({k: (v * w).astype(np.float32) for k, v in g.items()})
            outs.append({k: to_np(v).copy() for k, v in sync.finish().items()})
        res = {k: None if sync.residual(k) is None else to_np(sync.residual(k)).copy() for k in ("a", "b")}
        return outs, res, sync.stats()

    a = world(2, lambda c: fn(c, True))
    b = world(2, lambda c: fn(c, False))
    for (oa, ra, sa), (ob, rb, sb) in zip(a, b):
        for x, y in zip(oa, ob):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{spec} output {k}")
        for k in ra:
            assert (ra[k] is None) == (rb[k] is None)
            if ra[k] is not None:
                np.testing.assert_array_equal(ra[k], rb[k], err_msg=f"{spec} residual {k}")
        assert sa == sb


# Compressors whose average is the mean of what each rank sent (so error feedback's per-rank invariant
# carries over to the average). Left out: signsgd/signum vote, so magnitudes (and weights) do not enter;
# fp16/bf16 sum on the wire in half precision, so their average is not exactly the mean of what was sent.
EF_SPECS = ["topk:ratio=0.1", "randomk:ratio=0.25", "threshold", "efsignsgd", "onebit", "qsgd", "terngrad",
            "natural", "powersgd", "rbgs", "dgc", "randproj"]


@pytest.mark.parametrize("spec", EF_SPECS)
def test_error_feedback_keeps_the_weighted_sum(spec):
    """With per-step weights w_{r,t}: sum_t average_t + mean_r residual_r = sum_t (1/P) sum_r w_{r,t} g_{r,t},
    i.e. nothing of the sample-weighted gradients is lost, only delayed (residual memory)."""
    load(spec)
    steps = 5

    def fn(comm):
        sync = gradcomp.GradientSync(spec, memory="residual", comm=comm, seed=7)
        rng = np.random.default_rng([3, comm.rank])
        sent, meant = np.zeros(40), np.zeros(40)
        for step in range(steps):
            g = rng.standard_normal(40)
            w = _weights(step, comm.rank)
            sync.start({"g": g.astype(np.float64)}, weight=w)
            sent += to_np(sync.finish()["g"])
            meant += w * g
        return sent, meant, to_np(sync.residual("g"))

    res = world(2, fn)
    sent = res[0][0]
    np.testing.assert_allclose(res[1][0], sent, rtol=0, atol=1e-12)        # every rank got the same average
    want = sum(m for _, m, _ in res) / 2
    got = sent + sum(e for _, _, e in res) / 2
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_weight_keeps_the_gradient_dtype_and_works_in_the_working_precision(dtype):
    """A float16 gradient is weighted after widening to float32 (no half-precision rounding of w * g) and
    its average comes back as float16; float32/float64 keep theirs."""
    def fn(comm):
        rng = np.random.default_rng([4, comm.rank])
        g = rng.standard_normal(50).astype(dtype)
        w = (0.3, 1.7)[comm.rank]
        sync = gradcomp.GradientSync("none", comm=comm)
        sync.start({"g": g}, weight=w)
        out = sync.finish()["g"]
        return g, w, out

    res = world(2, fn)
    work = np.float64 if dtype == "float64" else np.float32
    want = sum(g.astype(work) * work(w) for g, w, _ in res) / 2
    for _, _, out in res:
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out, want.astype(dtype))


def test_bad_weight_is_refused():
    sync = gradcomp.GradientSync("none")
    for w in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            sync.start({"g": np.ones(3)}, weight=w)


# --------------------------------------------------------------------------- rank-time report
def test_rank_time_report():
    rep = gb.RankTimeReport()
    rep.add(0, [1.0, 2.0], [1.0, 0.0], [4, 4], [32, 32])
    rec = rep.add(1, [1.5, 1.5], [0.1, 0.1], [5, 3], [40, 24])
    assert rec["spread"] == 0.0 and rec["wait_frac"] == pytest.approx([0.1 / 1.6] * 2)
    s = rep.summary()
    assert s["steps"] == 2 and s["compute"] == [1.25, 1.75] and s["wait"] == pytest.approx([0.55, 0.05])
    assert s["spread"] == 0.5 and s["step_time"] == pytest.approx((2.0 + 1.6) / 2)
    assert s["samples_per_s"] == pytest.approx(128 / 3.6) and s["units"] == [5, 3]
    assert "wait_%" in rep.table() and rep.summary(skip=5) == {"steps": 0}
