"""GradientSync end to end on LocalWorld, for every registered compressor and memory:
state_dict round-trips, non-finite gradients lose nothing, buckets (start/finish) equal one step,
torch / TF tensors keep their type, dtype, shape and device, restored state moves backends."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import gradcomp
from gradcomp.compressors.topk import TopKCompressor

from conftest import (MEMORIES, all_specs, cross_backend, catching, f64, grad_array, load, make_array, need_backend, to_np,
                      world)

SHAPES = {"conv": (4, 3, 3, 3), "fc": (33, 17), "bias": (17,), "scale": ()}
RUNS = [(spec, "auto") for spec in all_specs()] + [("topk:ratio=0.1", m) for m in MEMORIES]
IDS = [f"{s}|{m}" for s, m in RUNS]


def _grads(rng, dtype="float32", backend="numpy"):
    return {k: grad_array(rng, s, "contiguous", dtype, backend) for k, s in SHAPES.items()}


def _sync(spec, memory, comm, seed=11, fuse="auto"):
    load(spec)
    if memory != "auto":
        load(memory, "memory")
    return gradcomp.GradientSync(spec, memory=memory, comm=comm, seed=seed, fuse=fuse)


def _np_out(out):
    return {k: to_np(v).copy() for k, v in out.items()}


def _assert_same(a: dict, b: dict, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(f64(a[k]), f64(b[k]), rtol=1e-5, atol=1e-6, err_msg=k)


# --------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("spec, memory", RUNS, ids=IDS)
def test_state_dict_round_trips_mid_run(spec, memory):
    """Save after 3 steps, load into a fresh GradientSync, continue: same outputs and state as
    the uninterrupted run (checkpoint pickled, as a framework checkpoint would be)."""
    total, cut = 6, 3

    def uninterrupted(comm):
        sync = _sync(spec, memory, comm)
        rng = np.random.default_rng([5, comm.rank])
        outs = [_np_out(sync.step(_grads(rng))) for _ in range(total)]
        return outs, sync.stats(), pickle.dumps(sync.state_dict())

    def resumed(comm):
        sync = _sync(spec, memory, comm)
        rng = np.random.default_rng([5, comm.rank])
        outs = [_np_out(sync.step(_grads(rng))) for _ in range(cut)]
        blob = pickle.dumps(sync.state_dict())
        del sync
        fresh = _sync(spec, memory, comm)
        fresh.load_state_dict(pickle.loads(blob))
        assert fresh.steps == cut
        outs += [_np_out(fresh.step(_grads(rng))) for _ in range(total - cut)]
        return outs, fresh.stats(), pickle.dumps(fresh.state_dict())

    for (ua, us, usd), (ra, rs, rsd) in zip(world(2, uninterrupted), world(2, resumed)):
        for a, b in zip(ua, ra):
            _assert_same(a, b)
        assert us == rs
        _assert_same_state(pickle.loads(usd), pickle.loads(rsd))


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_state(a[key], b[key])
        elif hasattr(a[key], "shape"):
            np.testing.assert_array_equal(to_np(a[key]), to_np(b[key]), err_msg=key)
        else:
            assert a[key] == b[key], key


def test_load_state_dict_refuses_another_configuration():
    sync = gradcomp.GradientSync("topk:ratio=0.1", memory="residual", seed=1)
    sync.step({"w": np.ones(10, np.float32)})
    sd = sync.state_dict()
    for other in (gradcomp.GradientSync("topk:ratio=0.2", memory="residual", seed=1),
                  gradcomp.GradientSync("topk:ratio=0.1", memory="none", seed=1),
                  gradcomp.GradientSync("topk:ratio=0.1", memory="residual", seed=2)):
        with pytest.raises(ValueError, match="same configuration|seed"):
            other.load_state_dict(sd)
        assert other.steps == 0


# --------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("spec, memory", RUNS, ids=IDS)
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_non_finite_gradient_raises_on_every_rank_and_changes_nothing(spec, memory, poison):
    def run(comm, bad_rank):
        sync = _sync(spec, memory, comm)
        rng = np.random.default_rng([9, comm.rank])
        outs = [_np_out(sync.step(_grads(rng))) for _ in range(2)]
        grads = _grads(rng)
        if bad_rank is not None:
            before = pickle.dumps(sync.state_dict())
            if comm.rank == bad_rank:
                grads["fc"][3, 4] = poison
            try:
                sync.step(grads)
                return "no error"
            except gradcomp.NonFiniteGradientError:
                pass
            _assert_same_state(pickle.loads(before), sync.state_dict())
        outs.append(_np_out(sync.step(_grads(rng))))
        return outs, pickle.dumps(sync.state_dict())

    clean = world(3, lambda c: run(c, None))
    hit = world(3, lambda c: run(c, 1))
    for (co, csd), h in zip(clean, hit):
        assert h != "no error", "NonFiniteGradientError was not raised on every rank"
        ho, hsd = h
        for a, b in zip(co, ho):
            _assert_same(a, b)
        _assert_same_state(pickle.loads(csd), pickle.loads(hsd))


class _ChokesOnNaN(TopKCompressor):
    """A compressor that raises on non-finite input, as a QR or a log would."""

    def compress(self, x, state, ctx):
        if not np.all(np.isfinite(x)):
            raise np.linalg.LinAlgError("SVD did not converge")
        return super().compress(x, state, ctx)


def test_a_compressor_that_raises_on_nan_still_gives_non_finite_error_on_every_rank():
    def fn(comm):
        sync = gradcomp.GradientSync(_ChokesOnNaN(ratio=0.5), comm=comm)
        g = np.ones(8, np.float32)
        if comm.rank == 0:
            g[0] = np.nan
        sync.step({"w": g})

    errs = gradcomp.LocalWorld(3, timeout=20).run(catching(fn))
    assert all(isinstance(e, gradcomp.NonFiniteGradientError) for e in errs), errs


# --------------------------------------------------------------------------- buckets
@pytest.mark.parametrize("spec", all_specs())
def test_buckets_started_separately_equal_one_step(spec):
    """Per-tensor compression (and fusion where it is exact) does not depend on the bucketing;
    a fused bucket of a "correct" compressor is a method of its own (tests/test_fusion.py)."""
    fuse = "auto" if load(spec).fusion in (None, "exact", "segmented") else False

    def fn(comm):
        rng = np.random.default_rng([3, comm.rank])
        grads = _grads(rng)
        one = _sync(spec, "auto", comm, fuse=fuse)
        ref = _np_out(one.step(grads))
        split = _sync(spec, "auto", comm, fuse=fuse)
        split.start({k: grads[k] for k in ("conv", "bias")})
        split.start({k: grads[k] for k in ("fc", "scale")})
        got = _np_out(split.finish())
        return ref, got, one.stats(), split.stats()

    for ref, got, s1, s2 in world(2, fn):
        _assert_same(ref, got, exact=False)
        assert s1["bytes_dense"] == s2["bytes_dense"]


def test_empty_step_and_empty_tensors():
    sync = gradcomp.GradientSync("topk:ratio=0.5", seed=0)
    assert sync.step({}) == {}
    out = sync.step({"e": np.zeros((0, 4), np.float16), "w": np.ones(3, np.float32)})
    assert out["e"].shape == (0, 4) and out["e"].dtype == np.float16
    assert sync.stats()["bytes_dense"] == 12


# --------------------------------------------------------------------------- frameworks
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("spec", all_specs())
def test_framework_tensors_keep_type_dtype_and_shape_and_match_numpy(backend, spec):
    need_backend(backend)
    spec = cross_backend(spec)
    load(spec)
    def fn(comm, be):
        sync = gradcomp.GradientSync(spec, comm=comm, seed=4)
        rng = np.random.default_rng([4, comm.rank])
        outs = []
        for _ in range(2):
            grads = {k: grad_array(rng, s, "transposed" if len(s) > 1 else "contiguous", "float32", be)
                     for k, s in SHAPES.items()}
            for dt in ("float16", "bfloat16", "float64"):     # mixed dtypes in one bucket
                grads[dt] = grad_array(rng, (5, 7), "strided", dt, be)
            out = sync.step(grads)
            for k, g in grads.items():
                assert type(out[k]) is type(g) or (be == "tensorflow" and "Tensor" in type(out[k]).__name__)
                assert tuple(out[k].shape) == tuple(g.shape) and out[k].dtype == g.dtype
            outs.append(_np_out(out))
        return outs

    ref, got = world(2, lambda c: fn(c, "numpy")), world(2, lambda c: fn(c, backend))
    for r in range(2):
        for a, b in zip(ref[r], got[r]):
            for k in a:
                tol = {"float16": 2e-3, "bfloat16": 2e-2}.get(k, 1e-4)
                scale = max(np.abs(f64(a[k])).max(initial=0), 1.0)
                np.testing.assert_allclose(f64(b[k]), f64(a[k]), rtol=0, atol=tol * scale, err_msg=k)


def test_state_saved_with_numpy_continues_on_torch():
    torch = pytest.importorskip("torch")
    sync = gradcomp.GradientSync("topk:ratio=0.1", memory="residual", seed=2)
    rng = np.random.default_rng(0)
    g1, g2 = rng.standard_normal(50).astype(np.float32), rng.standard_normal(50).astype(np.float32)
    sync.step({"w": g1})
    sd = sync.state_dict()
    ref = sync.step({"w": g2})
    moved = gradcomp.GradientSync("topk:ratio=0.1", memory="residual", seed=2)
    moved.load_state_dict(sd)
    out = moved.step({"w": torch.from_numpy(g2)})
    assert isinstance(out["w"], torch.Tensor)
    np.testing.assert_allclose(out["w"].numpy(), ref["w"], rtol=1e-6, atol=1e-7)
    assert isinstance(moved.residual("w"), torch.Tensor)


def test_memory_none_keeps_no_residual_and_residual_memory_does():
    g = np.arange(10, dtype=np.float32)
    lossy = gradcomp.GradientSync("topk:ratio=0.2", memory="none")
    fed = gradcomp.GradientSync("topk:ratio=0.2", memory="residual")
    a, b = lossy.step({"w": g})["w"], fed.step({"w": g})["w"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.where(g >= 8, g, 0))
    assert lossy.residual("w") is None
    np.testing.assert_array_equal(fed.residual("w"), np.where(g >= 8, 0, g))
    np.testing.assert_array_equal(fed.step({"w": np.zeros(10, np.float32)})["w"], np.where((g >= 6) & (g < 8), g, 0))


def test_gradient_changing_between_float32_and_float64_raises_a_clear_error():
    sync = gradcomp.GradientSync("topk:ratio=0.5", memory="residual")
    sync.step({"w": np.ones(4, np.float32)})
    sync.step({"w": np.ones(4, np.float16)})             # fp16/bf16/fp32 all work in fp32: fine
    with pytest.raises(ValueError, match="'w' changed dtype to float64"):
        sync.step({"w": np.ones(4, np.float64)})
    restored = gradcomp.GradientSync("topk:ratio=0.5", memory="residual")
    restored.load_state_dict(sync.state_dict())
    with pytest.raises(ValueError, match="changed dtype"):
        restored.step({"w": np.ones(4, np.float64)})


# --------------------------------------------------------------------------- donation (no copies)
class _Donating(gradcomp.Communicator):
    """A LocalWorld rank that keeps the transport contract of comm/base.py (private results, sums
    donated arrays in place) and records what it was donated."""

    accepts_donation = True

    def __init__(self, inner):
        self.inner, self.rank, self.size, self.local_rank = inner, inner.rank, inner.size, inner.local_rank
        self.donated = []

    def allreduce(self, x, *, name="", donate=False):
        h = self.inner.allreduce(x, name=name)
        if not donate:
            return h
        self.donated.append(x)

        def into_x(total):                  # an in-place transport: the sum lands in the donated array
            x[...] = total
            return x
        return gradcomp.comm.base.ThenHandle(h, into_x)

    def allgather(self, x, *, name=""):
        return self.inner.allgather(x, name=name)

    def broadcast(self, x, *, root=0, name=""):
        return self.inner.broadcast(x, root=root, name=name)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("spec", ["none", "fp16", "topk:ratio=0.3", "randproj:ratio=4"])
def test_donating_transport_gives_the_same_averages_and_leaves_gradients_alone(backend, spec):
    """Only the pipeline's own concatenations are donated; a `none` average is scaled in place in the
    transport's private result; results equal those of a plain transport, inputs stay untouched."""
    need_backend(backend)

    def fn(comm):
        rng = np.random.default_rng([5, comm.rank])
        grads = _grads(rng, backend=backend)
        kept = _np_out(grads)
        outs = []
        for c in (comm, _Donating(comm)):
            s = _sync(spec, "auto", c)
            s.start({k: grads[k] for k in ("conv", "bias", "scale")})     # fused: donated
            s.start({"fc": grads["fc"]})                                 # one tensor: never donated
            outs.append(_np_out(s.finish()))
            assert _np_out(grads).keys() == kept.keys()
            for k in kept:                                               # the caller's gradients
                np.testing.assert_array_equal(to_np(grads[k]), kept[k], err_msg=k)
        return outs, len(c.donated)

    comp = gradcomp.registry.create(spec, "compressor")
    fused = comp.fusion is not None and not comp.elementwise_cheap     # one payload: nothing concatenated
    for (plain, donating), n in world(2, fn):
        _assert_same(plain, donating)
        assert n == (1 if comp.summable and not fused else 0)


def test_none_average_is_scaled_in_place_in_the_transports_result():
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch not installed")
    import torch

    def fn(comm):
        c = _Donating(comm)
        s = gradcomp.GradientSync("none", comm=c, seed=0)
        g = {"a": torch.full((5,), float(comm.rank + 1)), "b": torch.full((3,), 2.0 * (comm.rank + 1))}
        out = s.step(g)
        return (len(c.donated), out["a"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr(),
                out["a"].tolist(), out["b"].tolist())

    for n, shared, a, b in world(2, fn):
        assert n == 1 and shared, "the averages of a `none` bucket were copied out of the reduced buffer"
        assert a == [1.5] * 5 and b == [3.0] * 3


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("spec, memory", [("none", "auto"), ("none", "residual"), ("topk:ratio=0.3", "auto"),
                                          ("fp16", "auto")])
def test_donated_gradients_hold_the_average_only_where_nothing_reads_them(backend, spec, memory):
    """start(donate=True) over a donating transport: `none` without memory averages in the caller's
    arrays themselves (zero copies); with error feedback or lossy payloads the gradients stay intact."""
    need_backend(backend)

    def fn(comm):
        rng = np.random.default_rng([7, comm.rank])
        grads = _grads(rng, backend=backend)
        kept = _np_out(grads)
        ref = _np_out(_sync(spec, memory, comm).step(_grads(np.random.default_rng([7, comm.rank]), backend=backend)))
        s = _sync(spec, memory, _Donating(comm))
        s.start({k: grads[k] for k in ("conv", "bias")}, donate=True)     # concatenated: a fresh buffer
        s.start({"fc": grads["fc"]}, donate=True)                         # alone: the gradient itself
        s.start({"scale": grads["scale"]}, donate=True)
        out = s.finish()
        return ref, _np_out(out), _np_out(grads), kept

    for ref, got, after, before in world(2, fn):
        _assert_same(ref, got)
        in_place = spec == "none" and memory in ("auto", "none")
        for k in before:
            want = got[k] if in_place and k in ("fc", "scale") else before[k]
            np.testing.assert_array_equal(after[k], want, err_msg=k)
