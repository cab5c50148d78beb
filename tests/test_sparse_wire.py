"""topk / dgc wire formats (OURS): values=fp16|bf16 and indices=scalecom's codes, on constructed cases
whose answers are known exactly (small integers: every fp16 / bf16 rounding and partial sum exact)."""
from __future__ import annotations

import numpy as np
import pytest

import gradcomp
from gradcomp.compressors.scalecom import code_bytes

from conftest import backend_available, f64, make_array, world

SPECS = ["values=fp16", "indices=compact", "values=fp16,indices=compact", "values=bf16,indices=eliasfano",
         "indices=bitmap", "indices=planes"]


def _ints(n, rank, k, hot=32.0):
    """Small integers, k of them large at rank-dependent places (the ranks' top-k overlap partly)."""
    rng = np.random.default_rng(rank)
    x = rng.integers(-3, 4, n).astype(np.float32)
    x[rng.choice(n, k, replace=False)] = hot
    return x


def _value_bytes(spec):
    return 2 if "values=" in spec else 4


def _index_bytes(spec, n, k):
    code = dict(o.split("=") for o in spec.split(",")).get("indices", "native")
    return 4 * k if code == "native" else code_bytes(n, k, code)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("comp", ["topk", "dgc", "gtopk", "gtopk:merge=allgather"])
def test_wire_formats_aggregate_exactly_and_send_the_stated_bytes(comp, spec, backend):
    """Every rank's payload decodes to its own (index, value) pairs: the average equals the native
    format's, with and without error feedback, and bytes_sent is k * value bytes + the index code."""
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    if "bf16" in spec:
        pytest.importorskip("ml_dtypes")
    shape, k, size = (20, 15), 12, 3
    n = shape[0] * shape[1]
    base = (comp + ("," if ":" in comp else ":") + f"ratio={k / n}" +
            (",warmup_steps=0" if comp == "dgc" else ""))
    memory = "residual"

    def fn(comm):
        out = {}
        for s in (base, f"{base},{spec}"):
            sync = gradcomp.GradientSync(s, comm=comm, memory=memory)
            outs = []
            for t in range(3):
                x = _ints(n, 10 * t + comm.rank, k).reshape(shape)
                outs.append(f64(sync.step({"w": make_array(x, backend, "float32")})["w"]))
            out[s] = outs, sync.stats(), f64(sync.residual("w"))
        return out

    per_step = k * _value_bytes(spec) + _index_bytes(spec, n, k)
    for res in world(size, fn):
        (a, ast, ares), (b, bst, bres) = res.values()
        for u, v in zip(a, b):
            np.testing.assert_array_equal(v, u)
        np.testing.assert_array_equal(bres, ares)
        assert bst["union"] == ast["union"]
        if comp != "gtopk":                   # the tree's messages: compared with the native ones below
            assert bst["bytes_sent"] == 3 * per_step
        else:                                 # same messages, each k * value bytes + the index code
            native = k * 4 + 4 * k
            assert bst["bytes_sent"] * native == ast["bytes_sent"] * per_step
        c = gradcomp.create(f"{base},{spec}", "compressor")
        assert c.ratio_of(n) == pytest.approx(4 * n / per_step)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("memory", ["residual", "dgc"])
@pytest.mark.parametrize("comp", ["topk", "dgc"])
def test_fp16_values_leave_their_rounding_error_in_the_residual(comp, memory, backend):
    """Error feedback sees what was sent: the residual at a sent index is x - fp16(x) (non-zero for
    these values), x elsewhere, so sum of inputs = P * average + sum of residuals (what was sent
    plus what was kept, nothing lost); and the average is the mean of the ranks' fp16 values."""
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    if comp == "topk" and memory == "dgc":
        pytest.skip("the dgc memory is the dgc compressor's")
    shape, k, size = (10, 20), 20, 4
    n = shape[0] * shape[1]
    xs = [np.random.default_rng(r).standard_normal(n).astype(np.float32) / 3 for r in range(size)]
    spec = f"{comp}:ratio={k / n},values=fp16,indices=compact" + (",warmup_steps=0" if comp == "dgc" else "")

    def fn(comm):
        sync = gradcomp.GradientSync(spec, comm=comm, memory=memory)
        x = make_array(xs[comm.rank].reshape(shape), backend, "float32")
        return f64(sync.step({"w": x})["w"]).ravel(), f64(sync.residual("w")).ravel()

    res = world(size, fn)
    avg = res[0][0]
    total = np.zeros(n)
    for r, (_, resid) in enumerate(res):
        sent = np.sort(np.argsort(-np.abs(xs[r]))[:k])
        want = f64(xs[r]).copy()
        want[sent] -= xs[r][sent].astype(np.float16)
        np.testing.assert_allclose(resid, want, rtol=0, atol=1e-7)
        assert np.all(resid[sent] != 0)                       # the rounding error, kept
        total[sent] += xs[r][sent].astype(np.float16)
    np.testing.assert_allclose(avg, total / size, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.sum([f64(x) for x in xs], 0) - np.sum([r for _, r in res], 0), size * avg,
                               rtol=0, atol=1e-6)


def test_topk_fp16_overflow_raises_with_no_state_changed():
    def fn(comm):
        sync = gradcomp.GradientSync("topk:ratio=0.5,values=fp16", comm=comm, memory="residual")
        with pytest.raises(gradcomp.PayloadOverflowError):
            sync.step({"w": np.full(8, 70000.0, np.float32)})          # beyond fp16's 65504
        return sync.steps, sync.residual("w")

    for steps, resid in world(2, fn):
        assert steps == 0 and (resid is None or not np.any(resid))


def test_defaults_are_the_native_formats():
    c = gradcomp.create("topk:ratio=0.01", "compressor")
    assert (c.values, c.indices) == ("native", "native") and c.ratio_of(10000) == 50.0
    g = gradcomp.create("gtopk:ratio=0.01", "compressor")
    assert (g.values, g.indices) == ("native", "native")
    with pytest.raises(ValueError):
        c = gradcomp.create("topk:ratio=0.1,block=4,values=fp16", "compressor")
        gradcomp.GradientSync(c, comm=None).step({"w": np.ones(64, np.float32)})


@pytest.mark.parametrize("merge", ["tree", "allgather"])
def test_gtopk_fp16_keeps_each_ranks_rounding_error_in_its_residual(merge):
    """2 ranks: the global selection G is summed from the ranks' fp16 values; a rank's residual is x
    minus its fp16 value where its entry reached G, x elsewhere, so inputs = P * average + residuals."""
    n, k, size = 200, 20, 2
    xs = [np.random.default_rng(r).standard_normal(n).astype(np.float32) / 3 for r in range(size)]

    def fn(comm):
        sync = gradcomp.GradientSync(f"gtopk:ratio={k / n},merge={merge},values=fp16,indices=compact",
                                     comm=comm, memory="residual")
        return f64(sync.step({"w": xs[comm.rank].copy()})["w"]), f64(sync.residual("w"))

    res = world(size, fn)
    avg = res[0][0]
    g = np.flatnonzero(avg)
    assert g.size == k
    for r, (_, resid) in enumerate(res):
        mine = np.intersect1d(np.argsort(-np.abs(xs[r]))[:k], g)
        want = f64(xs[r]).copy()
        want[mine] -= xs[r][mine].astype(np.float16)
        np.testing.assert_allclose(resid, want, rtol=0, atol=1e-7)
        assert np.any(resid[mine] != 0)
    np.testing.assert_allclose(np.sum([f64(x) for x in xs], 0) - np.sum([r for _, r in res], 0), size * avg,
                               rtol=0, atol=1e-6)
