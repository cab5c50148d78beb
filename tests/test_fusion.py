"""Fused buckets (gradcomp/fusion.py): one flat buffer per bucket, state still keyed by name.

Where a compressor declares its fusion exact (or segmented: per-tensor scales), the fused path
gives the per-tensor path's averages, residuals and (up to pad bits) bytes; where it declares it
"correct", it is a consistent method of its own; checkpoints keep per-name arrays that own their
memory either way.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import gradcomp
from gradcomp import fusion, registry

from conftest import f64, load, need_backend, to_np, world

SHAPES = {"conv": (4, 3, 3, 3), "fc": (33, 17), "bias": (17,), "scale": (), "emb": (300,)}
# compressors whose fused path must reproduce the per-tensor one (bytes: same, or fewer pad bits)
EXACT = ["none", "fp16", "bf16", "signsgd", "signum", "signsgd:scale=1", "efsignsgd", "onebit"]
SAME_BYTES = {"none", "fp16", "bf16"}
CORRECT = ["threshold:threshold=0.5", "randomk:ratio=0.25", "rbgs:ratio=0.25", "randproj:ratio=4", "natural", "qsgd", "terngrad",
           "terngrad:clip=2.5", "topk:ratio=0.1,scope=bucket", "gtopk:ratio=0.1,scope=bucket"]


def _grads(rng, backend="numpy"):
    out = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    if backend == "torch":
        import torch
        out = {k: torch.from_numpy(np.asarray(v)) for k, v in out.items()}
    return out


def _run(spec, fuse, comm, steps=3, backend="numpy", memory="auto"):
    sync = gradcomp.GradientSync(spec, memory=memory, comm=comm, seed=9, fuse=fuse)
    rng = np.random.default_rng([2, comm.rank])
    outs = [{k: to_np(v).copy() for k, v in sync.step(_grads(rng, backend)).items()} for _ in range(steps)]
    sd = sync.state_dict()
    state = {k: {kk: to_np(vv).copy() for kk, vv in v.items()} for k, v in sd["memory_state"].items()}
    state.update({f"cst:{k}": {kk: to_np(vv).copy() for kk, vv in v.items()}
                  for k, v in sd["compressor_state"].items()})
    return outs, state, sync.stats()["bytes_sent"], sync.stats()["bytes_dense"]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("spec", EXACT)
def test_fused_path_gives_the_per_tensor_averages_state_and_bytes(spec, backend):
    need_backend(backend)
    name = registry.parse_spec(spec)[0]
    assert load(spec).fusion in ("exact", "segmented")
    res = world(2, lambda c: (_run(spec, False, c, backend=backend), _run(spec, True, c, backend=backend)))
    for (o1, s1, b1, d1), (o2, s2, b2, d2) in res:
        for t1, t2 in zip(o1, o2):
            assert t1.keys() == t2.keys()
            for k in t1:
                if load(spec).fusion == "exact":
                    np.testing.assert_array_equal(t1[k], t2[k], err_msg=k)
                else:   # per-tensor scales by a segmented float64 sum: the same float32 up to rounding
                    np.testing.assert_allclose(f64(t2[k]), f64(t1[k]), rtol=1e-6, atol=1e-7, err_msg=k)
        assert s1.keys() == s2.keys()
        for k in s1:
            assert s1[k].keys() == s2[k].keys()
            for kk in s1[k]:
                assert s1[k][kk].shape == s2[k][kk].shape
                np.testing.assert_allclose(f64(s2[k][kk]), f64(s1[k][kk]), rtol=1e-6, atol=1e-7)
        assert d1 == d2
        if name in SAME_BYTES:
            assert b1 == b2
        else:       # packed bits: the bucket saves at most one pad byte per tensor per step, nothing else
            assert b1 - len(SHAPES) * 3 <= b2 < b1


@pytest.mark.parametrize("spec", CORRECT)
def test_correct_fusion_is_consistent_across_ranks_and_resumes_bit_exactly(spec):
    """A fused method of its own: every rank gets the same average; a checkpoint taken mid-run and
    loaded into a fresh GradientSync continues bit for bit; names and shapes of the state are the
    per-tensor ones."""
    assert load(spec).fusion == "correct"

    def fn(comm):
        rng = np.random.default_rng([4, comm.rank])
        gs = [_grads(rng) for _ in range(4)]
        a = gradcomp.GradientSync(spec, comm=comm, seed=3, fuse=True)
        ref = [a.step(g) for g in gs]
        b = gradcomp.GradientSync(spec, comm=comm, seed=3, fuse=True)
        for g in gs[:2]:
            b.step(g)
        c = gradcomp.GradientSync(spec, comm=comm, seed=3, fuse=True)
        c.load_state_dict(pickle.loads(pickle.dumps(b.state_dict())))
        got = [c.step(g) for g in gs[2:]]
        plain = gradcomp.GradientSync(spec, comm=comm, seed=3, fuse=False)
        plain.step(gs[0])
        return ref, got, a.state_dict(), plain.state_dict()

    res = world(2, fn)
    for r in range(2):
        ref, got, sd, plain = res[r]
        for t in range(4):
            for k in SHAPES:
                np.testing.assert_array_equal(res[r][0][t][k], res[0][0][t][k])        # same on every rank
                assert res[r][0][t][k].shape == SHAPES[k]
        for x, y in zip(ref[2:], got):
            for k in SHAPES:
                np.testing.assert_array_equal(x[k], y[k])
        for key in ("memory_state", "compressor_state"):
            assert sd[key].keys() == plain[key].keys()
            for k in sd[key]:
                assert {kk: np.shape(v) for kk, v in sd[key][k].items()} == \
                    {kk: np.shape(v) for kk, v in plain[key][k].items()}


def test_bucket_scope_top_k_keeps_the_largest_entries_of_the_whole_bucket():
    rng = np.random.default_rng(0)
    g = {"small": rng.standard_normal(400).astype(np.float32) * 1e-3,
         "large": rng.standard_normal(600).astype(np.float32)}
    out = gradcomp.GradientSync("topk:ratio=0.05,scope=bucket", memory="none", seed=0).step(g)
    flat = np.concatenate([g["small"], g["large"]])
    kept = np.concatenate([out["small"], out["large"]]) != 0
    assert kept.sum() == 50
    assert set(np.flatnonzero(kept)) == set(np.argsort(-np.abs(flat))[:50])
    assert not kept[:400].any()                            # a global top-k: the small layer sends nothing
    per = gradcomp.GradientSync("topk:ratio=0.05", memory="none", seed=0).step(g)
    assert (per["small"] != 0).sum() == 20 and (per["large"] != 0).sum() == 30


def test_auto_leaves_the_casts_and_the_quantizers_per_tensor_on_cpu_and_fuses_the_rest():
    s = gradcomp.GradientSync("fp16")
    e = [s._admit(k, np.ones(5, np.float32)) for k in "ab"]
    assert [len(g) for g in fusion.groups(s, e)] == [1, 1]
    s = gradcomp.GradientSync("fp16", fuse=True)
    assert [len(g) for g in fusion.groups(s, e)] == [2]
    for spec in ("signsgd", "efsignsgd", "onebit", "natural", "qsgd", "terngrad"):   # faster per tensor on a CPU
        assert [len(g) for g in fusion.groups(gradcomp.GradientSync(spec), e)] == [1, 1], spec
        assert [len(g) for g in fusion.groups(gradcomp.GradientSync(spec, fuse=True), e)] == [2], spec
    s = gradcomp.GradientSync("randomk:ratio=0.5")
    e.append(s._admit("empty", np.ones(0, np.float32)))
    e.append(s._admit("f64", np.ones(3, np.float64)))
    assert [len(g) for g in fusion.groups(s, e)] == [2, 1, 1]     # one group per working dtype
    assert [len(g) for g in fusion.groups(gradcomp.GradientSync("powersgd"), e)] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="fuse must be"):
        gradcomp.GradientSync("fp16", fuse="yes")


def test_state_is_views_of_one_buffer_between_steps_and_owns_its_memory_in_state_dict():
    torch = pytest.importorskip("torch")
    sync = gradcomp.GradientSync("efsignsgd", memory="residual", seed=0, fuse=True)
    g = {"a": torch.randn(100), "b": torch.randn(50)}
    sync.step(g)
    ra, rb = sync.residual("a"), sync.residual("b")
    assert ra.untyped_storage().data_ptr() == rb.untyped_storage().data_ptr()       # one flat buffer
    sync.step(g)
    sd = sync.state_dict()
    for v in sd["memory_state"].values():
        t = v["residual"]
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()       # saved alone, not the bucket
    again = gradcomp.GradientSync("efsignsgd", memory="residual", seed=0, fuse=True)
    again.load_state_dict(sd)
    np.testing.assert_array_equal(again.step(g)["a"].numpy(), sync.step(g)["a"].numpy())


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("spec", ["rbgs:ratio=0.5", "efsignsgd", "onebit"])
def test_residual_is_compensated_minus_own_decode_on_the_in_place_paths(spec, fuse, backend):
    """Error feedback's residual formed in place (x = g + e on the bucket's own copy; rbgs: the block
    zeroed, no decode; the sign methods: the decode subtracted in place) is exactly x - D(C(x)): on one
    rank D(C(x)) is the output; the caller's gradients are never written."""
    need_backend(backend)
    rng = np.random.default_rng(5)
    sync = gradcomp.GradientSync(spec, memory="residual", seed=2, fuse=fuse)
    prev = {k: np.zeros(int(np.prod(s)), np.float32) for k, s in SHAPES.items()}
    for _ in range(4):                                   # ratio 0.5: the block wraps around on some steps
        g = _grads(rng, backend)
        before = {k: to_np(v).copy() for k, v in g.items()}
        out = sync.step(g)
        for k in SHAPES:
            np.testing.assert_array_equal(to_np(g[k]), before[k])     # the caller's gradients untouched
            x = to_np(g[k]).reshape(-1) + prev[k]
            got = to_np(sync.residual(k)).reshape(-1).copy()
            np.testing.assert_array_equal(got, x - to_np(out[k]).reshape(-1), err_msg=k)
            prev[k] = got


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_lossless_payload_that_is_the_compensated_gradient_survives_the_residual_update(backend):
    """`none` with error feedback: the payload (and on one rank the average) is x itself, so the
    residual must not be formed in place on x."""
    need_backend(backend)
    rng = np.random.default_rng(6)
    sync = gradcomp.GradientSync("none", memory="residual", seed=0, fuse=True)
    for _ in range(2):
        g = _grads(rng, backend)
        want = {k: to_np(v).copy() for k, v in g.items()}
        out = sync.step(g)
        for k in SHAPES:
            np.testing.assert_array_equal(to_np(out[k]), want[k], err_msg=k)
            assert not to_np(sync.residual(k)).any()
