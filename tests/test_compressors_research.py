"""The research compressors (randproj, rbgs, powersgd) and the GMC memory, on LocalWorld ranks.

Linearity (decode of the summed payloads == sum of decodes), shared random choices on every rank,
exact payload sizes that do not grow with the ranks, error feedback that loses nothing, the
Sequential Update Method's schedule, PowerSGD's exact low-rank reconstruction / warm start /
checkpointing, GMC's convergence and its reduction to plain error feedback and to heavy-ball
momentum, and numpy/torch/TF agreement of randproj payloads.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import gradcomp
from gradcomp.backend import backend_by_name

from conftest import RecordingComm, f64, load, make_array, make_ctx, need_backend, record_locals, world

NP = backend_by_name("numpy")
RANDPROJ = ["randproj:ratio=8,rows=2", "randproj:ratio=8,rows=3,kind=countsketch",
            "randproj:ratio=5,rows=1,sum_units=3", "randproj:ratio=1", "randproj:ratio=8,rows=2,ref=0.3",
            "randproj:ratio=6,ref=0.5,unbiased=true", "randproj:ratio=4,layout=channel,ref=0.1"]
SUMMABLE = RANDPROJ + ["rbgs:ratio=0.1", "rbgs:ratio=0.3,unbiased=true"]


def _compress_all_rounds(comp, x, state, ctx):
    """One rank's payload after every round (its own payload standing in for each round's sum)."""
    payload, info = comp.compress(x, state, ctx)
    for _ in range(1, comp.rounds):
        payload, info = comp.next_round(list(payload), info, state, ctx)
    return list(payload), info


def _grads(rng, n, size):
    return [rng.standard_normal(n).astype(np.float32) for _ in range(size)]


# ------------------------------------------------------------------------------ linearity
@pytest.mark.parametrize("spec", SUMMABLE)
@pytest.mark.parametrize("n", [1, 7, 100, 1031])
def test_decode_of_summed_payloads_is_sum_of_decodes(spec, n):
    comp = load(spec)
    assert comp.summable
    rng = np.random.default_rng(n)
    size, step = 3, 5
    pays, infos = [], []
    for r, x in enumerate(_grads(rng, n, size)):
        ctx = make_ctx(NP, "w", n, step=step, seed=11, rank=r, size=size)
        p, info = comp.compress(x, comp.init_state(x, ctx), ctx)
        pays.append(p), infos.append(info)
    ctx = make_ctx(NP, "w", n, step=step, seed=11, size=size)
    summed = [sum(p[i] for p in pays) for i in range(len(pays[0]))]
    dec_sum = f64(comp.decompress(summed, infos[0], ctx))
    sum_dec = np.sum([f64(comp.decompress(p, i, ctx)) for p, i in zip(pays, infos)], axis=0)
    assert dec_sum.shape == (n,)
    np.testing.assert_allclose(dec_sum, sum_dec, rtol=0, atol=1e-5 * max(1.0, np.abs(sum_dec).max()))


@pytest.mark.parametrize("spec", ["powersgd:rank=2", "powersgd:rank=1,min_compression=1", "sketch:ratio=4",
                                  "sketch:ratio=3,rows=1,share=0.3"] + SUMMABLE[:3] + SUMMABLE[4:7])
def test_pipeline_average_is_mean_of_local_decodes(spec):
    """Through the real allreduce (both PowerSGD rounds): size * average == sum of local decodes."""
    comp = load(spec)
    size = 3

    def fn(comm):
        sync = gradcomp.GradientSync(comp, memory="residual", comm=comm, seed=4)
        log = record_locals(sync)
        rng = np.random.default_rng([4, comm.rank])
        for _ in range(3):
            sync.step({"m": rng.standard_normal((12, 9)).astype(np.float32),
                       "b": rng.standard_normal(5).astype(np.float32)})
        return {k: [(f64(loc), f64(agg)) for _, _, loc, agg in v] for k, v in log.items()}

    res = world(size, fn)
    for name in ("m", "b"):
        for t in range(3):
            locs = [res[r][name][t][0] for r in range(size)]
            for r in range(1, size):
                np.testing.assert_array_equal(res[r][name][t][1], res[0][name][t][1])
            np.testing.assert_allclose(size * res[0][name][t][1], np.sum(locs, axis=0), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------ shared choices
@pytest.mark.parametrize("spec", SUMMABLE)
def test_every_rank_draws_the_same_projection_or_block(spec):
    comp = load(spec)
    n = 777

    def fn(comm):
        x = np.random.default_rng(comm.rank).standard_normal(n).astype(np.float32)
        ctx = make_ctx(NP, "layer", n, step=9, seed=3, rank=comm.rank, size=comm.size)
        _, info = comp.compress(x, {}, ctx)
        if hasattr(comp, "basis"):   # an uncached draw: the shared cache cannot hide a rank dependence
            info = dict(info, fresh=comp.basis(ctx, comp.chunk, comp.rows, "chunk", x))
        return info

    def flat(v):
        if isinstance(v, dict):
            return [y for k in sorted(v) for y in flat(v[k])]
        if isinstance(v, (tuple, list)):
            return [y for e in v for y in flat(e)]
        return [np.asarray(v) if v is not None else None]

    infos = [flat(i) for i in world(4, fn)]
    for info in infos[1:]:
        assert len(info) == len(infos[0])
        for a, b0 in zip(info, infos[0]):
            if a is None or b0 is None:
                assert a is b0
            else:
                np.testing.assert_array_equal(a, b0)


@pytest.mark.parametrize("rows", [1, 2])
def test_projection_changes_with_step_and_seed_block_also_with_name(rows):
    rp, rb = load(f"randproj:ratio=8,rows={rows}"), load("rbgs:ratio=0.05")
    x = np.ones(1000, np.float32)

    def draw(step=1, seed=0, name="w"):
        ctx = make_ctx(NP, name, 1000, step=step, seed=seed)
        return rp.compress(x, {}, ctx)[1]["B"][0], rb.compress(x, {}, ctx)[1]

    base = draw()
    for other in (draw(step=2), draw(seed=1)):
        assert not np.array_equal(base[0], other[0])
        assert base[1] != other[1]
    other = draw(name="v")                      # one projection per step, shared by all tensors
    np.testing.assert_array_equal(base[0], other[0])
    assert base[1] != other[1]


@pytest.mark.parametrize("kind", ["orth", "countsketch"])
def test_randproj_basis_is_orthonormal_and_decode_is_a_projection(kind):
    comp = load(f"randproj:ratio=16,rows=4,kind={kind}")
    n = 64 * 10 + 37
    x = np.random.default_rng(0).standard_normal(n).astype(np.float64)
    ctx = make_ctx(NP, "w", n, dtype="float64", step=3)
    p, info = comp.compress(x, {}, ctx)
    for key in ("B", "T"):
        q = info[key][0]
        np.testing.assert_array_equal(info[key][1], q.T)
        gram = q.T @ q
        nonzero = np.diag(gram) > 0.5                   # count sketch may leave a tail bucket empty
        np.testing.assert_allclose(gram[np.ix_(nonzero, nonzero)], np.eye(nonzero.sum()), atol=1e-12)
    d = comp.decompress(p, info, ctx)
    assert np.linalg.norm(x - d) <= np.linalg.norm(x)
    p2, _ = comp.compress(d, {}, ctx)                  # P(P x) == P x
    np.testing.assert_allclose(comp.decompress(p2, info, ctx), d, atol=1e-12)
    np.testing.assert_allclose(x @ d, d @ d, rtol=1e-10)   # x - Px is orthogonal to Px


def test_rbgs_sends_one_contiguous_wrapping_block_with_uniform_coverage():
    comp = load("rbgs:ratio=0.1")
    n, k = 50, 5
    x = np.arange(1, n + 1, dtype=np.float32)
    hits = np.zeros(n)
    for step in range(400):
        ctx = make_ctx(NP, "w", n, step=step, seed=2)
        p, (o, kk) = comp.compress(x, {}, ctx)
        assert kk == k and p[0].shape == (k,)
        np.testing.assert_array_equal(p[0], x[(o + np.arange(k)) % n])
        d = comp.decompress(p, (o, kk), ctx)
        sel = np.zeros(n, bool)
        sel[(o + np.arange(k)) % n] = True
        np.testing.assert_array_equal(d[sel], x[sel])
        assert not d[~sel].any()
        hits += sel
    assert hits.min() > 0.4 * hits.mean()               # edges are not starved


# ------------------------------------------------------------------------------ bytes
@pytest.mark.parametrize("ratio,rows", [(64, 4), (256, 1), (10, 3)])
def test_randproj_payload_is_numel_over_ratio_and_independent_of_ranks(ratio, rows):
    n = 64 * 1000 + 123                                 # a tail that does not fill a chunk
    comp = load(f"randproj:ratio={ratio},rows={rows}")
    expect = 4 * math.ceil(n / ratio)                   # ratio * rows is an integer here

    def fn(comm):
        sync = gradcomp.GradientSync(comp, comm=comm, seed=0)
        rng = np.random.default_rng(comm.rank)
        for _ in range(2):
            sync.step({"w": rng.standard_normal(n).astype(np.float32)})
        return sync.stats()

    for size in (1, 2, 4):
        for s in world(size, fn):
            assert s["bytes_sent"] == 2 * expect
            assert s["bytes_dense"] == 2 * 4 * n
    assert comp.ratio_of(64 * 1000) == pytest.approx(ratio)


def test_randproj_non_integer_chunk_rounding_is_as_documented():
    comp = load("randproj:ratio=2.6,rows=2")            # chunk = round(5.2) = 5: 2 values per 5
    assert comp.chunk == 5
    n = 23
    p, _ = comp.compress(np.ones(n, np.float32), {}, make_ctx(NP, "w", n))
    assert p[0].shape == (math.ceil(n * 2 / 5),)


def test_rbgs_payload_is_the_block_values_only():
    comp = load("rbgs:ratio=0.01")

    def fn(comm):
        sync = gradcomp.GradientSync(comp, comm=comm, seed=0)
        sync.step({"w": np.ones(10000, np.float32)})
        return sync.stats()["bytes_sent"]

    assert world(3, fn) == [4 * 100] * 3


# ------------------------------------------------------------------------------ error feedback
@pytest.mark.parametrize("spec", ["randproj:ratio=8,rows=2", "randproj:ratio=6,rows=2,sum_units=4",
                                  "randproj:ratio=8,ref=0.2", "randproj:ratio=5,layout=channel,ref=0.1",
                                  "rbgs:ratio=0.2", "powersgd:rank=1", "sketch:ratio=5"])
def test_error_feedback_sum_of_sent_plus_residual_is_sum_of_gradients(spec):
    comp = load(spec)
    steps, size = 5, 3

    def fn(comm):
        sync = gradcomp.GradientSync(comp, memory="residual", comm=comm, seed=8)
        rng = np.random.default_rng([8, comm.rank])
        g_sum, out_sum = np.zeros((10, 13)), np.zeros((10, 13))
        for _ in range(steps):
            g = rng.standard_normal((10, 13)).astype(np.float32)
            g_sum += g
            out_sum += f64(sync.step({"w": g})["w"])
        return g_sum, out_sum, f64(sync.residual("w")).reshape(10, 13)

    res = world(size, fn)
    total_g = sum(r[0] for r in res)
    total_resid = sum(r[2] for r in res)
    sent = size * res[0][1]                       # size * sum_t average == sum over ranks of sent
    assert np.abs(total_resid).max() > 1e-3       # lossy: something really was held back
    np.testing.assert_allclose(sent + total_resid, total_g, rtol=0, atol=1e-4)


def test_sequential_update_method_sends_each_unit_in_turn():
    units, n = 4, 4003
    comp = load(f"randproj:ratio=4,rows=2,sum_units={units}")
    sync = gradcomp.GradientSync(comp, memory="residual", seed=5)
    log = record_locals(sync)
    bounds = [((u * n) // units, ((u + 1) * n) // units) for u in range(units)]
    seen = []
    for _ in range(2 * units):
        sync.step({"w": np.random.default_rng(len(seen)).standard_normal(n).astype(np.float32)})
        local = f64(log["w"][-1][2])
        active = [u for u, (a, b) in enumerate(bounds) if np.any(local[a:b] != 0)]
        assert len(active) == 1, f"expected one unit sent per step, got {active}"
        seen.append(active[0])
    assert sorted(seen[:units]) == list(range(units))        # every unit once per cycle
    assert seen[units:] == seen[:units]                       # then the same order again
    assert all((b - a) % units == 1 for a, b in zip(seen, seen[1:]))   # u_t = (t + offset) mod U
    s = sync.stats()
    assert s["ratio"] == pytest.approx(4 * units, rel=0.01)   # effective ratio = ratio * units
    assert comp.ratio_of(n) == pytest.approx(4 * units, rel=0.01)


def test_sequential_update_offsets_differ_between_tensors():
    comp = load("randproj:ratio=4,rows=1,sum_units=8")
    units = {comp.unit(make_ctx(NP, f"layer{i}", 800, step=0)) for i in range(12)}
    assert len(units) > 1


# ------------------------------------------------------------------------------ PowerSGD
def test_powersgd_reconstructs_an_exactly_low_rank_average():
    r, n, m, size = 2, 20, 15, 3
    a = np.random.default_rng(0).standard_normal((n, r))      # shared column space: the sum is rank r

    def fn(comm):
        sync = gradcomp.GradientSync(f"powersgd:rank={r}", memory="none", comm=comm, seed=1)
        rng = np.random.default_rng([1, comm.rank])
        outs = []
        for _ in range(3):
            mat = (a @ rng.standard_normal((r, m))).astype(np.float32)
            outs.append((mat, f64(sync.step({"w": mat})["w"])))
        return outs

    res = world(size, fn)
    for t in range(3):
        mean = np.mean([f64(res[k][t][0]) for k in range(size)], axis=0)
        np.testing.assert_allclose(res[0][t][1], mean, atol=1e-4 * np.abs(mean).max())


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation():
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((40, 6)))
    v, _ = np.linalg.qr(rng.standard_normal((30, 6)))
    s = np.array([10.0, 6.0, 3.0, 1.0, 0.5, 0.2])
    mat = (u * s) @ v.T
    best = np.sqrt(np.sum(s[2:] ** 2))                         # Eckart-Young, rank 2

    def err(spec, steps):
        sync = gradcomp.GradientSync(spec, memory="none", seed=0)
        for _ in range(steps):
            out = sync.step({"w": mat.copy()})["w"]
        return np.linalg.norm(out - mat)

    warm = err("powersgd:rank=2", 40)
    cold = err("powersgd:rank=2,warm_start=false", 40)
    assert warm == pytest.approx(best, rel=1e-3)
    assert cold > best * 1.05                                   # a fresh random Q stays worse


def test_powersgd_sends_small_tensors_dense_and_counts_both_rounds():
    comp = load("powersgd:rank=3")

    def fn(comm):
        sync = gradcomp.GradientSync(comp, memory="residual", comm=comm, seed=0)
        rng = np.random.default_rng(comm.rank)
        bias = rng.standard_normal(7).astype(np.float32)
        out = sync.step({"w": rng.standard_normal((50, 40)).astype(np.float32), "b": bias})
        return bias, f64(out["b"]), sync.stats()["bytes_sent"]

    res = world(2, fn)
    np.testing.assert_allclose(res[0][1], (f64(res[0][0]) + f64(res[1][0])) / 2, atol=1e-6)
    assert res[0][2] == 4 * (50 * 3 + 40 * 3) + 4 * 7


def test_powersgd_state_round_trips_through_state_dict():
    def fn(comm):
        rng = np.random.default_rng([9, comm.rank])
        grads = [{"w": rng.standard_normal((16, 12)).astype(np.float32),
                  "b": rng.standard_normal(4).astype(np.float32)} for _ in range(6)]
        a = gradcomp.GradientSync("powersgd:rank=2", comm=comm, seed=2)
        for g in grads[:3]:
            a.step(g)
        sd = copy.deepcopy(a.state_dict())
        assert "q" in sd["compressor_state"]["w"]
        b = gradcomp.GradientSync("powersgd:rank=2", comm=comm, seed=2)
        b.load_state_dict(sd)
        outs_a = [f64(a.step(g)["w"]) for g in grads[3:]]
        outs_b = [f64(b.step(g)["w"]) for g in grads[3:]]
        fresh = gradcomp.GradientSync("powersgd:rank=2", comm=comm, seed=2)
        outs_c = [f64(fresh.step(g)["w"]) for g in grads[3:]]
        return outs_a, outs_b, outs_c

    for outs_a, outs_b, outs_c in world(2, fn):
        for x, y in zip(outs_a, outs_b):
            np.testing.assert_array_equal(x, y)
        assert not np.allclose(outs_a[0], outs_c[0])           # the restored Q/residual mattered


# ------------------------------------------------------------------------------ randproj reference gradient
@pytest.mark.parametrize("spec", ["randproj:ratio=8,rows=2,ref=0.3", "randproj:ratio=6,ref=0.5,unbiased=true",
                                  "randproj:ratio=4,layout=channel,ref=0.1"])
def test_randproj_reference_decode_is_affine_and_summable_with_a_nonzero_reference(spec):
    """Each rank decodes a + P(x - a); the decode of the summed payloads is size * a + P(sum d)."""
    comp = load(spec)
    n, size, shape = 12 * 11, 3, (12, 11)
    rng = np.random.default_rng(3)
    a = rng.standard_normal(n).astype(np.float32)                  # shared by every rank
    pays, infos, locs = [], [], []
    for r, x in enumerate(_grads(rng, n, size)):
        ctx = make_ctx(NP, "w", n, step=4, seed=2, rank=r, size=size, shape=shape)
        p, info = comp.compress(x, {"ref": a}, ctx)
        pays.append(p), infos.append(info)
        locs.append(f64(comp.decompress(p, info, ctx)))
        zero_ref, _ = comp.compress(x - a, {"ref": np.zeros(n, np.float32)}, ctx)
        np.testing.assert_allclose(f64(p[0]), f64(zero_ref[0]), rtol=1e-5, atol=1e-5)   # compresses x - a
    ctx = make_ctx(NP, "w", n, step=4, seed=2, size=size, shape=shape)
    summed = [sum(p[0] for p in pays)]
    np.testing.assert_allclose(f64(comp.decompress(summed, infos[0], ctx)), np.sum(locs, axis=0),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("fuse", [False, True])
def test_randproj_reference_is_the_same_on_every_rank_and_averages_the_aggregate(fuse):
    """ratio=1 makes P the identity: a_{t+1} = a_t + alpha (mean_r g_r - a_t) exactly, bit-identical
    on every rank although each rank compresses different data (per tensor and in a fused bucket)."""
    alpha, steps, size = 0.25, 4, 3

    def fn(comm):
        sync = gradcomp.GradientSync(f"randproj:ratio=1,ref={alpha}", memory="none", comm=comm, seed=1, fuse=fuse)
        rng = np.random.default_rng([1, comm.rank])
        refs, gs = [], []
        for _ in range(steps):
            g = {"w": rng.standard_normal((6, 5)).astype(np.float32), "v": rng.standard_normal(7).astype(np.float32)}
            gs.append(np.concatenate([f64(g["w"]).ravel(), f64(g["v"])]))
            sync.step(g)
            refs.append(np.concatenate([np.array(sync._cst[k]["ref"], copy=True).ravel() for k in ("w", "v")]))
        return refs, gs

    res = world(size, fn)
    for r in range(1, size):
        for t in range(steps):
            np.testing.assert_array_equal(res[r][0][t], res[0][0][t])
    a = np.zeros(37)
    for t in range(steps):
        mean = np.mean([res[r][1][t] for r in range(size)], axis=0)
        a = a + alpha * (mean - a)
        np.testing.assert_allclose(f64(res[0][0][t]), a, rtol=0, atol=1e-5)


def test_randproj_reference_follows_a_constant_gradient_so_the_error_vanishes():
    """With a fixed gradient the reference converges to it, so what is projected (g - a) goes to
    zero and the decoded average becomes exact: plain randproj's one-step error stays ~sqrt(1 - 1/ratio)."""
    n, size = 512, 2
    g0 = np.random.default_rng(5).standard_normal((size, n)).astype(np.float32)

    def fn(comm, spec):
        sync = gradcomp.GradientSync(spec, memory="none", comm=comm, seed=3)
        return [f64(sync.step({"w": g0[comm.rank]})["w"]) for _ in range(300)]

    mean = f64(g0).mean(0)
    for spec, final in (("randproj:ratio=8,ref=0.1", 0.02), ("randproj:ratio=8", None)):
        outs = world(size, lambda comm: fn(comm, spec))[0]
        err = np.linalg.norm(outs[-1] - mean) / np.linalg.norm(mean)
        if final is None:
            assert err > 0.9
        else:
            assert err < final


def test_randproj_unbiased_decode_is_unbiased_around_the_reference():
    comp = load("randproj:ratio=4,ref=0.5,unbiased=true")
    assert comp.default_memory == "none" and load("randproj:ratio=4").default_memory == "residual"
    n, draws = 24, 800
    rng = np.random.default_rng(0)
    x, a = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    dec = np.empty((draws, n))
    for t in range(draws):
        ctx = make_ctx(NP, "w", n, step=t, seed=1)
        p, info = comp.compress(x, {"ref": a}, ctx)
        dec[t] = f64(comp.decompress(p, info, ctx))
    sem = dec.std(0, ddof=1) / np.sqrt(draws)
    assert np.all(np.abs(dec.mean(0) - x) < 5.5 * sem + 1e-6)
    assert dec.std(0).mean() > 0.1                          # it really is a random estimate


def test_randproj_channel_layout_sends_rows_per_output_channel_and_1d_exactly():
    comp = load("randproj:ratio=10,layout=channel")
    sync = gradcomp.GradientSync(comp, seed=0)
    rng = np.random.default_rng(0)
    w, bias = rng.standard_normal((8, 3, 3, 5)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    out = sync.step({"w": w, "b": bias})
    st = sync.stats()
    assert st["bytes_sent"] == 4 * (8 * round(45 / 10) + 8)          # 4 values per 45-entry channel; bias exact
    np.testing.assert_allclose(out["b"], bias, rtol=1e-6)
    ctx = make_ctx(NP, "w", w.size, shape=w.shape)
    p, info = comp.compress(w.ravel(), {}, ctx)
    assert info["kc"] == (4, 45) and p[0].size == 32
    with pytest.raises(ValueError, match="unbiased"):
        gradcomp.create("randproj:unbiased=true,sum_units=2")


def test_randproj_reference_round_trips_through_state_dict():
    spec = "randproj:ratio=8,ref=0.2"

    def fn(comm):
        rng = np.random.default_rng([9, comm.rank])
        grads = [{"w": rng.standard_normal((16, 12)).astype(np.float32)} for _ in range(6)]
        a = gradcomp.GradientSync(spec, comm=comm, seed=2)
        for g in grads[:3]:
            a.step(g)
        sd = copy.deepcopy(a.state_dict())
        assert np.abs(sd["compressor_state"]["w"]["ref"]).max() > 0
        b = gradcomp.GradientSync(spec, comm=comm, seed=2)
        b.load_state_dict(sd)
        outs_a = [f64(a.step(g)["w"]) for g in grads[3:]]
        outs_b = [f64(b.step(g)["w"]) for g in grads[3:]]
        c = gradcomp.GradientSync(spec, comm=comm, seed=2)
        c.load_state_dict(dict(sd, compressor_state={"w": {"ref": np.zeros(192, np.float32)}}))
        outs_c = [f64(c.step(g)["w"]) for g in grads[3:]]
        return outs_a, outs_b, outs_c

    for outs_a, outs_b, outs_c in world(2, fn):
        for x, y in zip(outs_a, outs_b):
            np.testing.assert_array_equal(x, y)
        assert not np.allclose(outs_a[0], outs_c[0])           # the restored reference mattered


# ------------------------------------------------------------------------------ sketch
def test_sketch_recovers_the_heavy_hitters_of_the_sum_exactly():
    """20 spikes (plus small noise) spread over 3 ranks: the unsketched top-k of the *summed* sketch
    finds all of them and the second round returns their exact averages; the payload is r*w + k."""
    n, size, spikes = 20000, 3, np.random.default_rng(0).choice(20000, 20, replace=False)
    spec = "sketch:ratio=10,rows=5,share=0.05"

    def fn(comm):
        rng = np.random.default_rng([1, comm.rank])
        x = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        x[spikes[comm.rank::size]] += 5.0 + np.arange(len(spikes[comm.rank::size]))   # each rank its own
        rec = RecordingComm(comm)
        sync = gradcomp.GradientSync(spec, memory="none", comm=rec, seed=7)
        return x, sync.step({"w": x})["w"], rec.payload_bytes()

    res = world(size, fn)
    mean = np.mean([f64(r[0]) for r in res], axis=0)
    out = f64(res[0][1])
    kept = np.flatnonzero(out)
    comp = load(spec)
    r, w, k = comp.plan(n)
    assert (r, w, k) == (5, 380, 100) and len(kept) == k
    assert set(spikes) <= set(kept)
    np.testing.assert_allclose(out[kept], mean[kept], rtol=1e-5, atol=1e-7)     # exact values, not estimates
    assert all(r_[2] == 4 * (r * w + k) for r_ in res)
    assert comp.ratio_of(n) == n / (r * w + k) == 10.0


def test_sketch_median_and_plan():
    from gradcomp.compressors.sketch import _median
    rng = np.random.default_rng(0)
    for rows in (1, 2, 3, 4, 5):
        v = [rng.standard_normal(50) for _ in range(rows)]
        np.testing.assert_allclose(_median(NP, v), np.median(np.stack(v), axis=0))
    comp = load("sketch:ratio=100")
    assert comp.plan(2) is None and comp.ratio_of(2) == 1.0      # too small to sketch: sent exactly
    assert comp.plan(150) == (1, 1, 1) and comp.plan(30000) == (3, 50, 150)
    sync = gradcomp.GradientSync(comp, seed=0)
    g = np.arange(2, dtype=np.float32)
    np.testing.assert_array_equal(sync.step({"b": g})["b"], g)


# ------------------------------------------------------------------------------ GMC
D, ROWS, SIZE = 40, 60, 4


def _problem():
    rng = np.random.default_rng(0)
    w_star = rng.standard_normal(D)
    mats = [rng.standard_normal((ROWS, D)) * (1 + r) / 2 for r in range(SIZE)]
    h = sum(a.T @ a / ROWS for a in mats) / SIZE
    return mats, [a @ w_star for a in mats], float(np.linalg.eigvalsh(h).max())


def _train(comp, memory, steps, lr_scale):
    mats, ys, lip = _problem()
    lr = lr_scale / lip

    def loss(w):
        return np.mean([0.5 * np.mean((a @ w - y) ** 2) for a, y in zip(mats, ys)])

    def fn(comm):
        sync = gradcomp.GradientSync(comp, memory=memory, comm=comm, seed=1)
        a, y = mats[comm.rank], ys[comm.rank]
        w, hist = np.zeros(D), []
        for _ in range(steps):
            g = (a.T @ (a @ w - y) / ROWS).astype(np.float32)
            w = w - lr * f64(sync.step({"w": g})["w"])
            hist.append(loss(w))
        return hist, w

    res = world(SIZE, fn)
    for r in range(1, SIZE):
        np.testing.assert_array_equal(res[r][1], res[0][1])     # every replica stays identical
    return np.array(res[0][0]), loss(np.zeros(D))


@pytest.mark.parametrize("comp,memory,lr", [("topk:ratio=0.1", "gmc:momentum=0.9", 0.1),
                                            ("rbgs:ratio=0.1", "gmc:momentum=0.5", 0.05),
                                            ("rbgs:ratio=0.1", "gmc:momentum=0.9,plus=true", 0.01),
                                            ("randomk:ratio=0.1", "gmc:momentum=0.9,plus=true", 0.005)])
def test_gmc_trains_least_squares_with_sparse_communication(comp, memory, lr):
    hist, loss0 = _train(comp, memory, 400, lr)
    assert np.all(np.isfinite(hist))
    assert hist[-1] < loss0 * 1e-3, f"loss only went from {loss0:.3g} to {hist[-1]:.3g}"


def test_gmc_plus_reaches_a_lower_loss_than_gmc_and_error_feedback_under_rbgs():
    """GMC+ (this project's rule: error feedback detached from a global heavy ball) against GMC and
    plain error feedback, rbgs:ratio=0.1, beta=0.9, the same small step size."""
    final = {m: _train("rbgs:ratio=0.1", m, 400, 0.01)[0][-1]
             for m in ("residual", "gmc:momentum=0.9", "gmc:momentum=0.9,plus=true")}
    assert final["gmc:momentum=0.9,plus=true"] < 1e-2 * min(final["gmc:momentum=0.9"], final["residual"]), final


@pytest.mark.parametrize("comp", ["topk:ratio=0.1", "rbgs:ratio=0.2", "randproj:ratio=4,rows=2"])
def test_gmc_with_zero_momentum_is_plain_error_feedback(comp):
    def fn(comm):
        outs = {}
        for mem in ("gmc:momentum=0", "gmc:momentum=0,plus=true", "residual"):
            sync = gradcomp.GradientSync(comp, memory=mem, comm=comm, seed=3)
            rng = np.random.default_rng([3, comm.rank])
            outs[mem] = [f64(sync.step({"w": rng.standard_normal(200).astype(np.float32)})["w"])
                         for _ in range(5)] + [f64(sync.residual("w"))]
        return outs

    for outs in world(3, fn):
        for mem in ("gmc:momentum=0", "gmc:momentum=0,plus=true"):
            for a, b in zip(outs[mem], outs["residual"]):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("plus", [False, True])
def test_gmc_without_compression_is_heavy_ball_momentum(plus):
    beta = 0.8

    def fn(comm):
        sync = gradcomp.GradientSync("none", memory=f"gmc:momentum={beta},plus={plus}", comm=comm, seed=0)
        rng = np.random.default_rng([0, comm.rank])
        grads = [rng.standard_normal(30) for _ in range(6)]
        outs = [f64(sync.step({"w": g.astype(np.float64)})["w"]) for g in grads]
        return grads, outs

    res = world(2, fn)
    v = np.zeros(30)
    for t in range(6):
        v = np.mean([res[r][0][t] for r in range(2)], axis=0) + beta * v    # torch.optim.SGD buffer
        np.testing.assert_allclose(res[0][1][t], v, rtol=1e-12, atol=1e-12)


def test_gmc_plus_keeps_momentum_out_of_the_residual_for_unsent_coordinates():
    """A coordinate sent at step t and not at t+1: GMC parks beta*a_t in the residual, GMC+ does not."""
    comp = "rbgs:ratio=0.1"
    g = np.arange(1.0, 101.0)

    def run(mem):
        sync = gradcomp.GradientSync(comp, memory=mem, seed=0)
        log = record_locals(sync)
        for _ in range(2):
            sync.step({"w": g.copy()})
        (_, _, loc0, agg0), (_, x1, loc1, _) = log["w"]
        return f64(agg0), f64(loc1), f64(sync.residual("w"))

    agg0, loc1, res_gmc = run("gmc:momentum=0.5")
    _, _, res_plus = run("gmc:momentum=0.5,plus=true")
    moved, sent1 = agg0 != 0, loc1 != 0
    only0 = moved & ~sent1
    assert only0.any()
    np.testing.assert_allclose(res_gmc[only0] - res_plus[only0], 0.5 * agg0[only0])
    np.testing.assert_allclose(res_plus[~sent1], (2 * g - agg0)[~sent1])   # gradient part only


# ------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("spec", ["randproj:ratio=8,rows=2", "randproj:ratio=8,rows=3,kind=countsketch",
                                  "randproj:ratio=5,rows=2,sum_units=3", "rbgs:ratio=0.1",
                                  "randproj:ratio=8,ref=0.5,unbiased=true", "randproj:ratio=9,layout=channel,ref=0.5",
                                  "sketch:ratio=10"])
@pytest.mark.parametrize("other", ["torch", "tensorflow"])
def test_numpy_torch_tf_agree_on_payloads(spec, other):
    be = need_backend(other)
    comp = load(spec)
    n = 8 * 37 + 5
    data = np.random.default_rng(1).standard_normal(n)
    ref0 = np.random.default_rng(2).standard_normal(n)           # a nonzero shared reference
    for step in (0, 7):
        ref_ctx = make_ctx(NP, "w", n, step=step, seed=4, shape=(7, 43))
        state = {"ref": ref0.astype(np.float32)} if getattr(comp, "ref", 0) > 0 else {}
        ref_p, ref_info = _compress_all_rounds(comp, data.astype(np.float32), state, ref_ctx)
        x = make_array(data, other, "float32")
        ctx = make_ctx(be, "w", n, step=step, seed=4, shape=(7, 43))
        state = {"ref": make_array(ref0, other, "float32")} if getattr(comp, "ref", 0) > 0 else {}
        p, info = _compress_all_rounds(comp, x, state, ctx)
        assert len(p) == len(ref_p)
        for a, b in zip(p, ref_p):
            np.testing.assert_allclose(f64(a), f64(b), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(f64(comp.decompress(p, info, ctx)),
                                   f64(comp.decompress(ref_p, ref_info, ref_ctx)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("other", ["torch", "tensorflow"])
def test_powersgd_and_gmc_run_on_framework_tensors(other):
    need_backend(other)
    data = np.random.default_rng(2).standard_normal((3, 12, 10))
    outs = {}
    for be in ("numpy", other):
        sync = gradcomp.GradientSync("powersgd:rank=2", memory="gmc:momentum=0.5,plus=true", seed=0)
        outs[be] = [f64(sync.step({"w": make_array(d, be, "float32")})["w"]) for d in data]
    for a, b in zip(outs["numpy"], outs[other]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("spec", ["randproj:ratio=0.5", "randproj:ratio=0", "randproj:rows=0",
                                  "randproj:kind=hadamard", "randproj:sum_units=0", "rbgs:ratio=0",
                                  "rbgs:ratio=1.5", "powersgd:rank=-1", "powersgd:rank=0",
                                  "powersgd:min_compression=0.5", "powersgd:rnk=2"])
def test_bad_compressor_params_raise_value_error_naming_valid_values(spec):
    with pytest.raises(ValueError, match="expected|valid"):
        gradcomp.create(spec)


@pytest.mark.parametrize("spec", ["gmc:momentum=1", "gmc:momentum=-0.1", "gmc:plus=maybe", "gmc:beta=0.9"])
def test_bad_gmc_params_raise_value_error(spec):
    with pytest.raises(ValueError, match="expected|valid"):
        gradcomp.create(spec, "memory")
