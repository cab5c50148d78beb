"""The numpy, torch and TensorFlow backends agree: every backend op on the same inputs, the shared
random streams bit for bit, and every compressor's payload (same dtypes and sizes; identical bytes
where the algorithm is deterministic) and decoded values (to tolerance). Also every compressor inside
tf.function, and on a CUDA device when one is present. Missing frameworks are skipped."""
from __future__ import annotations

import numpy as np
import pytest

from gradcomp import rng
from gradcomp.backend import backend_by_name

from conftest import (all_specs, cross_backend, compress_once, f64, load, make_array, make_ctx, need_backend,
                      realistic_gradient, spec_name, to_np)

NP = backend_by_name("numpy")
FRAMEWORKS = ["torch", "tensorflow"]
# Compressors whose payload involves no floating-point reduction: bytes must match exactly. (The sign
# family's mean-|g| scales and qsgd's norms are float32 reductions, accumulated in each framework's own
# order: equal to tolerance; their sign bits are compared below as integer payloads.)
EXACT = {"none", "fp16", "bf16", "topk", "randomk", "rbgs", "threshold"}


def _put(bname, a):
    a = np.asarray(a)
    if bname == "numpy":
        return a
    if bname == "torch":
        import torch
        return torch.from_numpy(np.ascontiguousarray(a))
    import tensorflow as tf
    return tf.constant(a)


@pytest.fixture(params=FRAMEWORKS)
def fw(request):
    return need_backend(request.param)


# --------------------------------------------------------------------------- ops
def test_selection_and_scatter_ops_agree(fw):
    g = np.random.default_rng(0).permutation(np.linspace(-3, 3, 1001)).astype(np.float32)
    x = _put(fw.name, g)
    for k in (1, 10, 500, 1001, 1500):
        np.testing.assert_array_equal(np.sort(to_np(fw.topk_abs(x, k))), np.sort(NP.topk_abs(g, k)))
    for k in (1, 7, 1001):
        assert float(to_np(fw.kth_largest_abs(x, k))) == float(NP.kth_largest_abs(g, k))
    idx = np.array([5, 0, 999, 5, 17], np.int64)
    np.testing.assert_array_equal(to_np(fw.gather(x, _put(fw.name, idx))), g[idx])
    vals = np.array([1, 2, 3, 4, 5], np.float32)
    np.testing.assert_array_equal(to_np(fw.scatter_add(20, _put(fw.name, np.array([3, 3, 0, 19, 3])), _put(fw.name, vals))),
                                  NP.scatter_add(20, np.array([3, 3, 0, 19, 3]), vals))
    uniq = np.array([4, 0, 9], np.int64)
    np.testing.assert_array_equal(to_np(fw.scatter(10, _put(fw.name, uniq), _put(fw.name, vals[:3]))),
                                  NP.scatter(10, uniq, vals[:3]))
    mask = g > 2.5
    np.testing.assert_array_equal(to_np(fw.nonzero(_put(fw.name, mask))), NP.nonzero(mask))
    assert fw.dtype(fw.nonzero(_put(fw.name, mask))) == "int64"
    np.testing.assert_array_equal(to_np(fw.sort(x)), np.sort(g))


def test_elementwise_reductions_and_layout_agree(fw):
    g = np.random.default_rng(1).standard_normal(777).astype(np.float32)
    g[::50] = 0
    x = _put(fw.name, g)
    for op in ("abs", "sign", "floor"):
        np.testing.assert_array_equal(to_np(getattr(fw, op)(x)), getattr(NP, op)(g), err_msg=op)
    for op in ("sum", "amax", "norm", "mean_abs"):
        np.testing.assert_allclose(float(to_np(getattr(fw, op)(x))), float(getattr(NP, op)(g)), rtol=1e-5, err_msg=op)
    assert float(to_np(fw.amax(_put(fw.name, np.zeros(0, np.float32))))) == 0.0
    bad = g.copy()
    bad[[3, 9]] = [np.nan, -np.inf]
    assert float(to_np(fw.count_nonfinite(_put(fw.name, bad)))) == 2.0
    huge = np.full(8, 3e38, np.float32)          # finite values whose sum overflows: still 0 non-finite
    assert float(to_np(fw.count_nonfinite(_put(fw.name, huge)))) == 0.0
    assert float(to_np(fw.count_nonfinite(_put(fw.name, np.array([np.inf, -np.inf], np.float32))))) == 2.0
    pos = np.abs(g) * 50                         # float -> uint8 of negatives is platform-defined
    for dt in ("float16", "bfloat16", "float64", "int32", "uint8"):
        src = pos if dt == "uint8" else g
        np.testing.assert_array_equal(to_np(fw.cast(_put(fw.name, src), dt)).astype(np.float64),
                                      to_np(NP.cast(src, dt)).astype(np.float64), err_msg=dt)
        assert fw.dtype(fw.cast(x, dt)) == dt
    for dt in ("float16", "bfloat16", "float32", "float64", "int32", "int64", "uint8"):
        src = pos if dt == "uint8" else g
        y = fw.cast(_put(fw.name, src), dt)
        raw = to_np(fw.to_bytes(y))
        assert raw.dtype == np.uint8 and raw.tobytes() == NP.to_bytes(NP.cast(src, dt)).tobytes(), dt
        back = fw.from_bytes(fw.to_bytes(y), dt, (-1,))
        assert fw.dtype(back) == dt
        np.testing.assert_array_equal(to_np(back), to_np(y))
    np.testing.assert_array_equal(to_np(fw.pad_to(x, 800)), NP.pad_to(g, 800))
    parts = fw.split(x, [7, 0, 770])
    assert [fw.numel(p) for p in parts] == [7, 0, 770]
    np.testing.assert_array_equal(to_np(fw.cat(parts)), g)
    np.testing.assert_array_equal(to_np(fw.reshape(x, (7, 111))), g.reshape(7, 111))
    np.testing.assert_array_equal(to_np(fw.transpose(fw.reshape(x, (7, 111)))), g.reshape(7, 111).T)


def test_bit_ops_and_packing_agree(fw):
    every = np.array([[(v >> (7 - j)) & 1 for j in range(8)] for v in range(256)], np.int32).reshape(-1)
    np.testing.assert_array_equal(to_np(fw.packbits(_put(fw.name, every))), np.arange(256))
    for n in (1, 7, 8, 9, 1000):
        bits = (np.random.default_rng(n).random(n) < 0.4).astype(np.int32)
        packed = fw.packbits(_put(fw.name, bits))
        assert fw.dtype(packed) == "uint8" and fw.numel(packed) == (n + 7) // 8
        np.testing.assert_array_equal(to_np(packed), NP.packbits(bits))
        np.testing.assert_array_equal(to_np(fw.unpackbits(packed, n)), bits)
    a = np.array([0, 1, 2**31 - 1, 2**32 - 1, 12345678901], np.int64)
    x = _put(fw.name, a)
    for op, args in (("bxor", (0x5BD1E995,)), ("band", (0xFFFF,)), ("bor", (7,)), ("shr", (13,)), ("shl", (3,))):
        np.testing.assert_array_equal(to_np(getattr(fw, op)(x, *args)), getattr(NP, op)(a, *args), err_msg=op)


@pytest.mark.parametrize("lengths", [(777,), (1, 300, 5, 471)])
def test_segment_block_and_in_place_ops_agree(fw, lengths):
    """The fused-bucket kernels (per-segment and per-block reductions and scalings, in-place ops) on
    each backend against numpy's reference (the protocol's generic code)."""
    rng_ = np.random.default_rng(3)
    g = rng_.standard_normal(777).astype(np.float32)
    g[::40] = 0
    g[5] = -0.0
    x = _put(fw.name, g)
    v = (rng_.random(len(lengths)) + 0.5).astype(np.float32)
    close = dict(rtol=2e-6, atol=0)
    np.testing.assert_allclose(to_np(fw.segment_abs_sum(x, lengths)), NP.segment_abs_sum(g, lengths), **close)
    for a, r in zip(fw.segment_signed_sums(x, lengths), NP.segment_signed_sums(g, lengths)):
        np.testing.assert_allclose(to_np(a), r, **close)
    neg = g < 0
    assert to_np(fw.segment_count(_put(fw.name, neg), lengths)).tolist() == NP.segment_count(neg, lengths).tolist()
    np.testing.assert_array_equal(to_np(fw.segment_absmax(x, lengths)), NP.segment_absmax(g, lengths))
    np.testing.assert_array_equal(to_np(fw.segment_mul_(fw.copy(x), _put(fw.name, v), lengths)),
                                  NP.segment_mul_(g.copy(), v, lengths))
    for width in (777, 64, 100):
        nb = -(-777 // width)
        np.testing.assert_allclose(to_np(fw.block_norms(x, width)), NP.block_norms(g, width), **close)
        f = (rng_.random(nb) + 0.5).astype(np.float32)
        np.testing.assert_array_equal(to_np(fw.block_mul_(fw.copy(x), _put(fw.name, f), width)),
                                      NP.block_mul_(g.copy(), f, width))
    y = np.abs(g) * 3.7
    u = rng_.random(777).astype(np.float32)
    np.testing.assert_array_equal(to_np(fw.stochastic_round_(_put(fw.name, y.copy()), _put(fw.name, u))),
                                  NP.stochastic_round_(y.copy(), u))
    lv = np.floor(np.abs(g) * 2)
    np.testing.assert_array_equal(to_np(fw.signed_(_put(fw.name, lv.copy()), x)), NP.signed_(lv.copy(), g))
    np.testing.assert_array_equal(to_np(fw.minimum_(fw.copy(x), 0.5)), np.minimum(g, 0.5))
    np.testing.assert_array_equal(to_np(fw.sub_(fw.copy(x), fw.abs(x))), g - np.abs(g))
    np.testing.assert_array_equal(to_np(fw.mul_(fw.copy(x), fw.abs(x))), g * np.abs(g))
    for lo, hi in ((0, 0), (3, 90), (700, 777)):
        want = g.copy()
        want[lo:hi] = 0
        np.testing.assert_array_equal(to_np(fw.zero_range_(fw.copy(x), lo, hi)), want)
    packed = NP.packbits(neg)
    np.testing.assert_array_equal(to_np(fw.unpack_01(_put(fw.name, packed), 777, "float32")), neg.astype(np.float32))
    if0, if1 = v, -v * 2
    sel = to_np(fw.unpack_select(_put(fw.name, packed), 777, _put(fw.name, if0), _put(fw.name, if1), lengths))
    np.testing.assert_array_equal(sel, NP.unpack_select(packed, 777, if0, if1, lengths))
    np.testing.assert_array_equal(sel, np.where(neg, np.repeat(if1, lengths), np.repeat(if0, lengths)))


@pytest.mark.parametrize("n", [1, 5, 40000, 100003])
def test_chunked_counter_streams_are_the_reference_stream(fw, n):
    """uniform() and high_bits() through a backend's chunked fast path: the generic stream bit for bit."""
    key = rng.derive_key(7, 5, "bucket/3/abc", "qsgd/1")
    like_np, like = np.zeros(1, np.float32), _put(fw.name, np.zeros(1, np.float32))
    ref = NP.cast(NP.shr(rng.hash_u32(NP, key, n, like_np), 8), "float32") * np.float32(2.0 ** -24)
    np.testing.assert_array_equal(to_np(rng.uniform(fw, key, n, like)), ref)
    for drop in (1, 9, 31):
        got = to_np(rng.high_bits(fw, key, n, like, drop))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, (rng.hash_u32(NP, key, n, like_np) >> drop).astype(np.int32))


def test_linear_algebra_agrees(fw):
    m = np.random.default_rng(2).standard_normal((40, 4)).astype(np.float32)
    x = _put(fw.name, m)
    np.testing.assert_allclose(to_np(fw.matmul(fw.transpose(x), x)), m.T @ m, rtol=1e-4, atol=1e-4)
    q = to_np(fw.qr(x))
    np.testing.assert_allclose(q, NP.qr(m), atol=1e-5)
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 4097])
def test_random_streams_are_bit_identical(fw, n):
    key = rng.derive_key(7, 123, "layer.weight", "purpose")
    like_np, like = np.zeros(1, np.float32), _put(fw.name, np.zeros(1, np.float32))
    for f, args in ((rng.hash_u32, (n,)), (rng.uniform, (n,)), (rng.randint, (n, 1000003)), (rng.rademacher, (n,))):
        ref = f(NP, key, *args, like_np)
        got = to_np(f(fw, key, *args, like))
        assert got.dtype == np.asarray(ref).dtype
        np.testing.assert_array_equal(got, ref, err_msg=f.__name__)
    assert rng.hash_u32(NP, key, 1000, like_np).max() >= 2**31         # full 32-bit range


# --------------------------------------------------------------------------- compressors
@pytest.mark.parametrize("spec", all_specs())
@pytest.mark.parametrize("n", [7, 3001])
def test_every_compressor_agrees_across_backends(fw, spec, n):
    comp = load(cross_backend(spec))
    g = realistic_gradient(n, n)
    ref_ctx = make_ctx(NP, "layer", n, step=3, seed=1, size=2)
    ref_p, ref_i = compress_once(comp, g, ref_ctx)
    ref_d = f64(comp.decompress(ref_p, ref_i, ref_ctx))
    ctx = make_ctx(fw, "layer", n, step=3, seed=1, size=2)
    x = make_array(g, fw.name, "float32")
    p, info = compress_once(comp, x, ctx)
    assert len(p) == len(ref_p)
    for a, r in zip(p, ref_p):
        assert fw.dtype(a) == NP.dtype(r) and fw.numel(a) == NP.numel(r), (fw.dtype(a), NP.dtype(r))
        if spec_name(spec) in EXACT:
            assert to_np(fw.to_bytes(a)).tobytes() == NP.to_bytes(r).tobytes()
        elif "float" in NP.dtype(r):
            np.testing.assert_allclose(f64(a), f64(r), rtol=1e-4, atol=1e-5 * max(np.abs(f64(r)).max(initial=0), 1e-30))
        else:
            assert np.mean(to_np(a) != to_np(r)) <= 0.002          # rounding ties may flip a level
    d = f64(comp.decompress(p, info, ctx))
    assert d.shape == (n,) == ref_d.shape
    close = np.isclose(d, ref_d, rtol=1e-4, atol=1e-5 * max(np.abs(ref_d).max(initial=0), 1e-30))
    assert close.mean() >= (1.0 if spec_name(spec) in EXACT else 0.998)
    if not comp.summable:
        p2, _ = compress_once(comp, make_array(g[::-1].copy(), fw.name, "float32"), ctx)
        ref_p2, _ = compress_once(comp, g[::-1].copy(), ref_ctx)
        agg = f64(comp.aggregate([p, p2], info, ctx))
        ref_agg = f64(comp.aggregate([ref_p, ref_p2], ref_i, ref_ctx))
        close = np.isclose(agg, ref_agg, rtol=1e-4, atol=1e-5 * max(np.abs(ref_agg).max(initial=0), 1e-30))
        assert close.mean() >= (1.0 if spec_name(spec) in EXACT else 0.998)


@pytest.mark.parametrize("spec", all_specs())
def test_every_compressor_runs_inside_tf_function(spec):
    tf = pytest.importorskip("tensorflow")
    comp = load(spec)
    if comp.rounds > 1:
        pytest.skip("multi-round compressors are driven round by round from Python")
    tfb = backend_by_name("tensorflow")
    n = 70_001                     # large enough for topk's sampled path when eager
    g = realistic_gradient(n, 3)

    def roundtrip(x):
        ctx = make_ctx(tfb, "layer", n, step=2, seed=1)
        p, info = compress_once(comp, x, ctx)
        return comp.decompress(p, info, ctx)

    eager = to_np(roundtrip(tf.constant(g)))
    graph = to_np(tf.function(roundtrip)(tf.constant(g)))
    np.testing.assert_allclose(graph, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", all_specs())
def test_every_compressor_runs_on_cuda_without_leaving_the_device(spec):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    comp = load(spec)
    tb = backend_by_name("torch")
    n = 100_003
    g = realistic_gradient(n, 4)
    ctx = make_ctx(tb, "layer", n, step=1, seed=1)
    p, info = compress_once(comp, torch.from_numpy(g).cuda(), ctx)
    assert all(a.device.type == "cuda" for a in p)
    d = comp.decompress(p, info, ctx)
    assert d.device.type == "cuda"
    ref_ctx = make_ctx(NP, "layer", n, step=1, seed=1)
    rp, ri = compress_once(comp, g, ref_ctx)
    ref = f64(comp.decompress(rp, ri, ref_ctx))
    close = np.isclose(f64(d), ref, rtol=1e-4, atol=1e-5 * max(np.abs(ref).max(), 1e-30))
    assert close.mean() >= 0.998
