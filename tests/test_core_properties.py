"""Property tests (hypothesis) of every registered compressor on LocalWorld with several ranks.

Properties: summable payloads decode linearly (compressor level and through the real allreduce);
error feedback loses nothing (sum of what was sent + residual == sum of gradients); exact top-k
keeps the k largest and sampled top-k keeps >= 95% of their magnitude; shared randomness is the
same on every rank and never touches a global RNG; the reported bytes are the bytes put on the
wire; every shape (0-d, empty, odd, non-contiguous) and float dtype averages to an array of the
same shape/dtype that is identical on every rank; unbiased compressors are unbiased.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import gradcomp
from gradcomp.backend import backend_by_name
from gradcomp.compressors.sparse import k_of

from conftest import (FLOAT_DTYPES, LAYOUTS, SHAPES, RecordingComm, all_specs, compress_once, f64,
                      grad_array, load, make_ctx, realistic_gradient, record_locals, spec_for, to_np,
                      world, COMPRESSORS)

NP = backend_by_name("numpy")
SIZES = st.integers(2, 4)
SEEDS = st.integers(0, 2**31 - 1)
LENGTHS = st.sampled_from([1, 2, 7, 64, 257, 1000, 4099])
SCALES = st.sampled_from([1e-3, 1.0, 100.0])


def _eps(dtype_name: str) -> float:
    if dtype_name == "bfloat16":
        return 2.0 ** -7
    if dtype_name in ("float16", "float32", "float64"):
        return float(np.finfo(dtype_name).eps)
    return float(np.finfo(np.float32).eps)      # integer payloads: exact sums, fp32 decode


def _wire_eps(payloads) -> float:
    return max(_eps(NP.dtype(p)) for pl in payloads for p in pl) if any(payloads) else 1e-7


def _summable(spec):
    comp = load(spec)
    if not comp.summable:
        pytest.skip(f"{spec} is not summable")
    return comp


# --------------------------------------------------------------------------- linearity
@pytest.mark.parametrize("spec", all_specs())
@given(size=SIZES, n=LENGTHS, seed=SEEDS, step=st.integers(0, 50), scale=SCALES)
def test_summable_decode_of_sum_is_sum_of_decodes(spec, size, n, seed, step, scale):
    """decompress(sum_r payload_r) == sum_r decompress(payload_r), each rank with its own data."""
    comp = _summable(spec)
    if comp.rounds > 1:
        pytest.skip("multi-round: linearity is checked through the pipeline")
    rng = np.random.default_rng(seed)
    payloads, infos, ctxs = [], [], []
    for r in range(size):
        x = (rng.standard_normal(n) * scale).astype(np.float32)
        ctx = make_ctx(NP, "w", n, step=step, seed=7, rank=r, size=size)
        p, info = compress_once(comp, x, ctx)
        payloads.append(p), infos.append(info), ctxs.append(ctx)
    summed = [np.array(a, copy=True) for a in payloads[0]]
    for pl in payloads[1:]:                       # element-wise, in the payload's dtype, as allreduce
        summed = [s + a for s, a in zip(summed, pl)]
    dec_sum = f64(comp.decompress(summed, infos[0], ctxs[0]))
    decs = [f64(comp.decompress(payloads[r], infos[r], ctxs[r])) for r in range(size)]
    sum_dec = np.sum(decs, axis=0)
    scale_dec = max([np.abs(d).max(initial=0) for d in decs] + [np.abs(dec_sum).max(initial=0), 1e-30])
    tol = _wire_eps(payloads) * size * size * scale_dec + 1e-5 * scale_dec
    assert dec_sum.shape == (n,)
    np.testing.assert_allclose(dec_sum, sum_dec, rtol=0, atol=tol)


@pytest.mark.parametrize("spec", all_specs())
@given(size=SIZES, n=LENGTHS, seed=SEEDS, dtype=st.sampled_from(FLOAT_DTYPES))
def test_summable_allreduce_average_is_mean_of_local_decodes(spec, size, n, seed, dtype):
    """Through the real fused allreduce (and every round of multi-round compressors):
    size * average == sum over ranks of each rank's own decoded payload."""
    comp = _summable(spec)

    def fn(comm):
        sync = gradcomp.GradientSync(comp, memory="residual", comm=comm, seed=seed)
        log = record_locals(sync)
        rng = np.random.default_rng([seed, comm.rank])
        for _ in range(2):
            sync.step({"a": grad_array(rng, (n,), "contiguous", dtype), "b": grad_array(rng, (3, 5), "strided", dtype)})
        return {k: [(f64(loc), f64(agg)) for _, _, loc, agg in v] for k, v in log.items()}

    res = world(size, fn)
    for name in ("a", "b"):
        for t in range(2):
            locals_ = [res[r][name][t][0] for r in range(size)]
            avg = res[0][name][t][1]
            scale = max(np.abs(np.stack(locals_)).max(), 1e-30)
            tol = (2.0 ** -7 if dtype == "bfloat16" or spec.startswith("bf16") else 1e-3) * size * scale
            np.testing.assert_allclose(size * avg, np.sum(locals_, axis=0), rtol=0, atol=tol)


# --------------------------------------------------------------------------- error feedback
@pytest.mark.parametrize("spec", all_specs())
@given(size=SIZES, n=LENGTHS, seed=SEEDS, steps=st.integers(1, 4), scale=SCALES)
def test_error_feedback_loses_nothing(spec, size, n, seed, steps, scale):
    """With residual memory: sum_t decode(sent_t) + residual_T == sum_t g_t on every rank."""
    comp = load(spec)
    if comp.lossless:
        pytest.skip("lossless compressor: nothing to feed back")

    def fn(comm):
        sync = gradcomp.GradientSync(comp, memory="residual", comm=comm, seed=seed)
        log = record_locals(sync)
        rng = np.random.default_rng([seed, comm.rank])
        for _ in range(steps):
            sync.step({"w": (rng.standard_normal(n) * scale).astype(np.float32)})
        g_sum = np.sum([f64(g) for g, *_ in log["w"]], axis=0)
        sent = np.sum([f64(loc) for _, _, loc, _ in log["w"]], axis=0)
        peak = max(max(np.abs(f64(a)).max() for _, x, loc, _ in log["w"] for a in (x, loc)), 1e-30)
        return g_sum, sent, f64(sync.residual("w")), peak

    for g_sum, sent, resid, peak in world(size, fn):
        assert resid.shape == (n,)
        np.testing.assert_allclose(sent + resid, g_sum, rtol=0, atol=4 * steps * peak * 2.0 ** -23)


# --------------------------------------------------------------------------- top-k
@given(n=st.integers(1, 3000), ratio=st.floats(0.001, 1.0), seed=SEEDS, levels=st.sampled_from([0, 3, 50]))
def test_exact_topk_keeps_the_k_largest(n, ratio, seed, levels):
    comp = load(f"topk:ratio={ratio!r},mode=exact")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    if levels:                                   # many ties
        x = np.round(x * levels) / levels
    (vals, idx), _ = compress_once(comp, x, make_ctx(NP, "w", n))
    k = k_of(ratio, n)
    idx = idx.astype(np.int64)
    assert len(idx) == k == len(vals) and len(np.unique(idx)) == k
    np.testing.assert_array_equal(vals, x[idx])
    dropped = np.ones(n, bool)
    dropped[idx] = False
    if dropped.any():
        assert np.abs(vals).min() >= np.abs(x[dropped]).max()


@given(n=st.integers(1, 3000), block=st.integers(2, 70), ratio=st.floats(0.001, 1.0), seed=SEEDS)
def test_block_topk_keeps_the_blocks_of_largest_energy(n, block, ratio, seed):
    """topk:block=B keeps whole blocks of B contiguous entries (the last one partial), those of the
    largest energy, sends one index per block, and its decode / 2-rank aggregate are exact there."""
    comp = load(f"topk:ratio={ratio!r},block={block}")
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * rng.choice([0.01, 1.0, 30.0], n)).astype(np.float32)
    ctx = make_ctx(NP, "w", n)
    (vals, blk), _ = compress_once(comp, x, ctx)
    nb = -(-n // block)
    keep = max(1, min(nb, int(round(ratio * n / block))))
    blk = blk.astype(np.int64)
    assert blk.dtype == np.int64 and len(blk) == keep == len(np.unique(blk)) and len(vals) == keep * block
    assert np.all(np.diff(blk) > 0) and blk.min() >= 0 and blk.max() < nb
    xp = np.zeros(nb * block, np.float32)
    xp[:n] = x
    energy = (xp.astype(np.float64).reshape(nb, block) ** 2).sum(1)
    np.testing.assert_array_equal(vals, xp.reshape(nb, block)[blk].reshape(-1))
    others = np.setdiff1d(np.arange(nb), blk)
    if len(others):                       # float32 sums in the backend: a relative margin for near-ties
        assert energy[blk].min() >= energy[others].max() * (1 - 1e-5)
    want = np.zeros(n)
    for j in blk:
        want[j * block:(j + 1) * block] = x[j * block:(j + 1) * block]
    np.testing.assert_array_equal(f64(comp.decompress([vals, blk.astype(np.int32)], None, ctx)), want)
    y = (rng.standard_normal(n)).astype(np.float32)
    (vy, by), _ = compress_once(comp, y, ctx)
    agg = f64(comp.aggregate([[vals, blk.astype(np.int32)], [vy, by]], None, ctx))
    np.testing.assert_allclose(agg, (want + f64(comp.decompress([vy, by], None, ctx))) / 2, rtol=1e-6, atol=1e-6)
    assert comp.ratio_of(n) == pytest.approx(4 * n / (4 * keep * (block + 1)))


def test_block_topk_sends_an_embedding_row_per_index():
    """An embedding-like gradient (a few non-zero rows of 64): block=64 recovers exactly those rows,
    with 4 (64 + 1) bytes per row on the wire, on 2 LocalWorld ranks through GradientSync."""
    rows, width, hot = 500, 64, [3, 77, 78, 401]
    n = rows * width

    def fn(comm):
        g = np.zeros((rows, width), np.float32)
        g[hot[comm.rank::2]] = 1.0 + comm.rank
        g += np.random.default_rng(comm.rank).standard_normal(g.shape).astype(np.float32) * 1e-3
        rec = RecordingComm(comm)
        sync = gradcomp.GradientSync(f"topk:ratio={2 * width / n!r},block={width}", memory="none", comm=rec)
        return g.reshape(-1), f64(sync.step({"emb": g.reshape(-1)})["emb"]), rec.payload_bytes()

    res = world(2, fn)
    want = np.zeros((rows, width))
    for r in (0, 1):                      # each hot row is sent by its one rank: the average is half of it
        want[hot[r::2]] = f64(res[r][0]).reshape(rows, width)[hot[r::2]] / 2
    for _, out, nbytes in res:
        assert np.flatnonzero(np.abs(out.reshape(rows, width)).sum(1)).tolist() == hot
        np.testing.assert_allclose(out.reshape(rows, width), want, rtol=1e-6, atol=0)
        assert nbytes == 2 * 4 * (width + 1)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("ratio", [0.001, 0.01])
@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_topk_keeps_95_percent_of_exact_magnitude(backend, ratio, seed, monkeypatch):
    from conftest import make_array, need_backend
    b = need_backend(backend)
    passes = []
    monkeypatch.setattr(b, "abs_ge_indices", lambda x, t, f=b.abs_ge_indices: passes.append(1) or f(x, t))
    n = 1_000_000                      # large enough that ratio 0.001 takes the sampled path
    g = realistic_gradient(n, seed)
    x = make_array(g, backend, "float32")
    k = k_of(ratio, n)
    exact = load(f"topk:ratio={ratio},mode=exact")
    sampled = load(f"topk:ratio={ratio},mode=sampled")
    ctx = make_ctx(b, "layer", n, step=seed)
    (ev, ei), _ = compress_once(exact, x, ctx)
    (sv, si), _ = compress_once(sampled, x, ctx)
    si = to_np(si).astype(np.int64)
    assert len(si) == k and len(np.unique(si)) == k
    np.testing.assert_array_equal(to_np(sv), g[si])
    kept = np.abs(g[si]).astype(np.float64).sum() / np.abs(to_np(ev)).astype(np.float64).sum()
    assert kept >= 0.95, f"sampled top-k kept {kept:.3f} of the exact top-k magnitude"
    assert passes == [1], "the sampled threshold path was not taken"



@pytest.mark.parametrize("ratio,nnz", [(0.01, 3000), (0.001, 300), (0.001, 2500)])
def test_sampled_topk_of_a_mostly_zero_tensor_is_exact_without_a_full_topk(ratio, nnz, monkeypatch):
    """An embedding's gradient is zero outside the batch's rows: the sample's threshold is 0, and the
    sampled path used to fall back to a full top-k over the whole tensor. It now takes the non-zero
    entries (and, when there are fewer than k, the lowest-indexed zeros): the exact top-k's magnitude,
    the same bytes on numpy and torch, and no full top-k."""
    from conftest import make_array, need_backend
    n = 1_000_000                      # large enough that ratio 0.001 takes the sampled path
    rng = np.random.default_rng(nnz)
    g = np.zeros(n, np.float32)
    hot = np.sort(rng.choice(n, nnz, replace=False))
    g[hot] = rng.standard_normal(nnz).astype(np.float32)
    k = k_of(ratio, n)
    payloads = []
    for backend in ("numpy", "torch"):
        b = need_backend(backend) if backend == "torch" else NP
        full = []
        monkeypatch.setattr(b, "topk_abs", lambda x, kk, f=b.topk_abs: full.append(b.numel(x)) or f(x, kk))
        (v, i), _ = compress_once(load(f"topk:ratio={ratio},mode=sampled"), make_array(g, backend, "float32"),
                                  make_ctx(b, "emb", n, step=3))
        i = to_np(i).astype(np.int64)
        assert len(i) == k and np.all(np.diff(i) > 0)
        np.testing.assert_array_equal(to_np(v), g[i])
        top = np.sort(np.abs(g))[::-1][:k].astype(np.float64).sum()
        assert np.abs(g[i]).astype(np.float64).sum() == pytest.approx(top, rel=1e-6)
        if nnz <= k:                               # every non-zero entry, then the first zeros
            assert set(hot) <= set(i.tolist())
            zeros = np.flatnonzero(g == 0)[:k - nnz].tolist()
            assert sorted(set(i.tolist()) - set(hot.tolist())) == zeros
        assert all(m < n for m in full), "a full top-k over the tensor ran"
        payloads.append((to_np(v).tobytes(), i.astype(np.int32).tobytes()))
    assert payloads[0] == payloads[1]

# --------------------------------------------------------------------------- shared randomness
@given(n=st.integers(1, 5000), seed=SEEDS, step=st.integers(0, 10**6), size=SIZES)
def test_randomk_indices_are_shared_by_every_rank(n, seed, step, size):
    comp = load("randomk:ratio=0.1")
    rng = np.random.default_rng(seed)
    infos = []
    for r in range(size):
        x = rng.standard_normal(n).astype(np.float32)
        p, idx = compress_once(comp, x, make_ctx(NP, "w", n, step=step, seed=seed, rank=r, size=size))
        idx = np.asarray(idx)
        np.testing.assert_array_equal(p[0], x[idx])
        infos.append(idx)
    for idx in infos[1:]:
        np.testing.assert_array_equal(idx, infos[0])
    k = k_of(0.1, n)
    assert len(np.unique(infos[0])) == k and infos[0].min() >= 0 and infos[0].max() < n


def test_randomk_indices_change_with_step_seed_and_name():
    comp = load("randomk:ratio=0.01")
    n = 10_000
    x = np.zeros(n, np.float32)

    def idx(**kw):
        args = dict(step=3, seed=1, name="w") | kw
        return np.asarray(compress_once(comp, x, make_ctx(NP, args.pop("name"), n, **args))[1])
    base = idx()
    np.testing.assert_array_equal(base, idx())
    for other in (idx(step=4), idx(seed=2), idx(name="v")):
        assert not np.array_equal(base, other)


@pytest.mark.parametrize("spec", all_specs())
@given(n=LENGTHS, seed=SEEDS, step=st.integers(0, 1000), size=SIZES)
def test_summable_payload_is_the_same_on_every_rank_for_the_same_input(spec, n, seed, step, size):
    """Shared random choices (indices, projections, blocks) depend on (seed, step, name) only."""
    comp = _summable(spec)
    if comp.rounds > 1:
        pytest.skip("multi-round: shared randomness is checked through the pipeline (average == mean of local decodes)")
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    ref = None
    for r in range(size):
        p, _ = compress_once(comp, x, make_ctx(NP, "w", n, step=step, seed=seed, rank=r, size=size))
        got = [np.asarray(a).tobytes() for a in p]
        ref = got if ref is None else ref
        assert got == ref, f"rank {r} produced a different payload from rank 0 for the same input"


@pytest.mark.parametrize("spec", all_specs())
def test_compression_is_deterministic_and_ignores_global_rngs(spec):
    comp = load(spec)
    n = 3000
    x = realistic_gradient(n, 5)
    outs = []
    for global_seed in (0, 12345):
        np.random.seed(global_seed)
        try:
            import torch
            torch.manual_seed(global_seed)
        except ImportError:
            pass
        p, _ = compress_once(comp, x, make_ctx(NP, "w", n, step=9, seed=3))
        outs.append([np.asarray(a).tobytes() for a in p])
    assert outs[0] == outs[1]


UNBIASED = ["qsgd", "terngrad", "natural", "randomk:ratio=0.25,unbiased=true"]


@pytest.mark.parametrize("spec", UNBIASED)
def test_unbiased_compressors_are_unbiased_over_many_draws(spec):
    comp = load(spec)
    n, draws = 40, 600
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    dec = np.empty((draws, n))
    for t in range(draws):
        ctx = make_ctx(NP, "w", n, step=t, seed=1)
        p, info = compress_once(comp, x, ctx)
        dec[t] = f64(comp.decompress(p, info, ctx))
    mean, sem = dec.mean(0), dec.std(0, ddof=1) / np.sqrt(draws)
    z = np.abs(mean - x) / np.maximum(sem, 1e-6 * np.abs(x).max())
    assert np.all(z < 5.5), f"biased: worst |mean - x| is {z.max():.1f} standard errors"


# --------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("spec", all_specs())
@given(size=SIZES, seed=SEEDS, dtype=st.sampled_from(FLOAT_DTYPES), steps=st.integers(1, 3),
       shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4))
def test_reported_bytes_are_the_bytes_on_the_wire(spec, size, seed, dtype, steps, shapes):
    comp = load(spec)

    def fn(comm):
        rec = RecordingComm(comm)
        sync = gradcomp.GradientSync(comp, comm=rec, seed=seed)
        rng = np.random.default_rng([seed, comm.rank])
        for _ in range(steps):
            sync.step({f"t{i}": grad_array(rng, s, "contiguous", dtype) for i, s in enumerate(shapes)})
        return rec.payload_bytes(), rec.step_traffic(), sync.stats()

    numel = sum(int(np.prod(s)) for s in shapes)
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype]
    for wire, seen, stats in world(size, fn):
        assert stats["steps"] == steps
        if not (getattr(comp, "exchanges", False) and size == 1):     # gtopk's tree at P = 1: nothing sent
            assert stats["bytes_sent"] + stats["bytes_meta"] == wire
        assert stats["bytes_dense"] == itemsize * numel * steps        # the gradient's own dtype
        assert stats["bytes_recv"] == seen["recv"]                      # counted at the transport
        assert stats["wire_sent"] == pytest.approx(seen["wire_sent"], rel=1e-12, abs=1e-9)
        assert stats["wire_recv"] == pytest.approx(seen["wire_recv"], rel=1e-12, abs=1e-9)
        assert stats["wire_dense"] == pytest.approx(2 * (size - 1) / size * stats["bytes_dense"])
        if numel and not comp.lossless:
            assert stats["bytes_sent"] > 0


@pytest.mark.parametrize("spec", all_specs())
def test_nominal_ratio_matches_the_payload(spec):
    """ratio_of(n) (used in tables and docs) is the measured dense/payload ratio for a big fp32 tensor."""
    comp = load(spec)
    if getattr(comp, "warmup_steps", 0) or getattr(comp, "dense_1d", False):
        # dgc's nominal ratio is its steady state: after the warm-up, on a tensor it sparsifies
        comp = load(spec, warmup_steps=0, dense_1d=False)
    n = 1 << 18
    nominal = comp.ratio_of(n)
    if comp.variable_size or nominal != nominal:
        pytest.skip("payload size depends on the data / no nominal ratio")
    sync = gradcomp.GradientSync(comp, seed=0)
    sync.step({"w": realistic_gradient(n, 1)})
    s = sync.stats()
    assert s["ratio"] == pytest.approx(nominal, rel=0.05)


# --------------------------------------------------------------------------- shapes and dtypes
@pytest.mark.parametrize("spec", all_specs())
@given(size=SIZES, seed=SEEDS, dtype=st.sampled_from(FLOAT_DTYPES),
       shapes=st.lists(st.tuples(st.sampled_from(SHAPES), st.sampled_from(LAYOUTS)), min_size=1, max_size=3))
def test_any_shape_and_dtype_averages_identically_on_every_rank(spec, size, seed, dtype, shapes):
    comp = load(spec)

    def fn(comm):
        sync = gradcomp.GradientSync(comp, comm=comm, seed=seed)
        rng = np.random.default_rng([seed, comm.rank])
        outs = []
        for _ in range(2):
            grads = {f"t{i}": grad_array(rng, s, lay, dtype) for i, (s, lay) in enumerate(shapes)}
            out = sync.step(grads)
            outs.append((grads, out))
        return outs

    res = world(size, fn)
    for t in range(2):
        for name, g in res[0][t][0].items():
            outs = [res[r][t][1][name] for r in range(size)]
            for o in outs:
                assert isinstance(o, np.ndarray) and o.shape == g.shape and o.dtype == g.dtype
                assert np.all(np.isfinite(to_np(o)))
            for o in outs[1:]:
                np.testing.assert_array_equal(to_np(o), to_np(outs[0]))
            if comp.lossless:
                mean = np.mean([f64(res[r][t][0][name]) for r in range(size)], axis=0)
                np.testing.assert_allclose(f64(outs[0]), mean, rtol=_eps(dtype) * 2, atol=_eps(dtype) * 4)


def test_every_registered_compressor_is_covered():
    """The generic tests above run over gradcomp.available(); keep TEST_SPECS in step with it."""
    assert set(COMPRESSORS) >= {"none", "fp16", "bf16", "topk", "randomk"}
    assert all(spec_for(n).split(":")[0] == n for n in COMPRESSORS)
