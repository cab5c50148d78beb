"""The step's CPU shortcuts give the numbers of the plain path they replace.

- Error feedback for sparsifiers (Memory.masks_sent / Compressor.sent_indices): the residual is x
  with the sent indices zeroed in place instead of x - decompress(own payload); the averages, the
  residuals and the bytes are bit-identical to the decode-and-subtract path.
- Union statistics (Backend.count_distinct): a bitmap count, equal to the dense scatter count.
"""
from __future__ import annotations

import numpy as np
import pytest

import gradcomp
from gradcomp.backend import backend_by_name
from gradcomp.backend.base import Backend

from conftest import need_backend, to_np, world

SHAPES = {"conv": (8, 4, 3, 3), "fc": (33, 17), "bias": (17,), "emb": (300,)}
SPECS = ["topk:ratio=0.1", "topk:ratio=0.1,mode=sampled", "topk:ratio=0.1,scope=bucket", "randomk:ratio=0.25",
         "threshold:threshold=2.0", "threshold:threshold=0.01", "dgc:ratio=0.1,warmup_steps=0",
         "dgc:ratio=0.1,warmup_steps=2", "gtopk:ratio=0.1", "topk:ratio=0.1,warmup=1"]


def _run(spec, masked, comm, backend, steps=3):
    sync = gradcomp.GradientSync(spec, memory="auto", comm=comm, seed=3)
    if not masked:
        sync.memory.masks_sent = False          # the decode-and-subtract path
    seen = {"skipped": 0}
    orig = sync.memory.update

    def update(g, x, local, aggregated, state, ctx):
        seen["skipped"] += local is None
        return orig(g, x, local, aggregated, state, ctx)
    sync.memory.update = update
    rng = np.random.default_rng([5, comm.rank])
    outs = []
    for _ in range(steps):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        if backend == "torch":
            import torch
            grads = {k: torch.from_numpy(v) for k, v in grads.items()}
        outs.append({k: to_np(v).copy() for k, v in sync.step(grads).items()})
    sd = sync.state_dict()
    state = {f"{k}/{kk}": to_np(vv).copy() for k, v in sd["memory_state"].items() for kk, vv in v.items()}
    return outs, state, sync.stats()["bytes_sent"], seen["skipped"]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("spec", SPECS)
def test_masked_error_feedback_is_bit_identical_to_decode_and_subtract(spec, backend):
    need_backend(backend)
    res = world(2, lambda c: (_run(spec, True, c, backend), _run(spec, False, c, backend)))
    for (o1, s1, b1, skipped), (o2, s2, b2, plain) in res:
        assert plain == 0
        for t1, t2 in zip(o1, o2):
            assert t1.keys() == t2.keys()
            for k in t1:
                np.testing.assert_array_equal(t1[k], t2[k], err_msg=k)
        assert s1.keys() == s2.keys()
        for k in s1:
            np.testing.assert_array_equal(s1[k], s2[k], err_msg=k)
        assert b1 == b2
        if spec.startswith("gtopk"):        # its own decode is masked by the global selection: decoded
            assert skipped == 0
        elif spec.startswith("threshold:threshold=0.01"):   # sent dense (sparse would cost more)
            assert skipped == 0
        else:
            assert skipped > 0, "the shortcut was never taken"


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_count_distinct_equals_the_dense_count(backend):
    need_backend(backend)
    b = backend_by_name(backend)
    rng = np.random.default_rng(0)
    like = b.from_numpy(np.zeros(1, np.float32), None) if backend == "numpy" else __import__("torch").zeros(1)
    for n, m in ((1, 1), (5, 0), (10, 30), (1000, 50), (1000, 700), (100000, 4000)):
        idx = rng.integers(0, n, m).astype(np.int64)
        got = b.count_distinct(n, b.from_numpy(idx, like))
        ref = Backend.count_distinct(b, n, b.from_numpy(idx, like))
        assert int(b.item(got)) == int(b.item(ref)) == len(np.unique(idx))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_count_nonfinite_all_equals_the_per_array_counts(backend):
    need_backend(backend)
    b = backend_by_name(backend)
    rng = np.random.default_rng(1)
    cases = [np.ones(0, np.float32), rng.standard_normal(50).astype(np.float32),
             np.array([1.0, np.nan, -np.inf, np.inf], np.float32), np.array([3e38, 3e38], np.float32),
             np.array([6e4, 6e4, np.nan], np.float16), np.array([1e308, 1e308, 1.0], np.float64)]
    like = None if backend == "numpy" else __import__("torch").zeros(1)
    arrays = [b.from_numpy(a, like) for a in cases]
    for pick in ([1], [0, 1], [1, 3], [1, 2, 3], [4, 5], [3, 5], list(range(len(cases)))):
        xs = [arrays[i] for i in pick]
        want = sum(int(np.size(a) - np.isfinite(a).sum()) for a in (cases[i] for i in pick))
        got = b.count_nonfinite_all(xs)
        assert b.dtype(got) == "float32" and int(b.item(got)) == want, pick


@pytest.mark.parametrize("spec", ["randomk:ratio=0.25", "randomk:ratio=0.25,unbiased=true", "powersgd:rank=2",
                                  "powersgd:rank=2,warmup=1"])
def test_average_scaled_in_place_is_bit_identical(spec):
    """decodes_fresh: the decoded sum is scaled by 1/P in place; the same numbers as a new array, and
    no state aliases the returned average."""
    need_backend("torch")

    def run(comm, fresh):
        sync = gradcomp.GradientSync(spec, memory="auto", comm=comm, seed=4)
        sync.compressor.decodes_fresh = fresh
        rng = np.random.default_rng([6, comm.rank])
        import torch
        outs = []
        for _ in range(3):
            out = sync.step({k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()})
            outs.append({k: to_np(v).copy() for k, v in out.items()})
            for v in out.values():
                v.mul_(0.0)           # the caller owns the averages: state must not change with them
        return outs

    res = world(2, lambda c: (run(c, True), run(c, False)))
    for a, b in res:
        for t1, t2 in zip(a, b):
            for k in t1:
                np.testing.assert_array_equal(t1[k], t2[k], err_msg=k)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("spec", ["randomk:ratio=0.25", "topk:ratio=0.1,scope=bucket", "fp16", "qsgd"])
def test_error_feedback_added_into_a_private_copy_gives_the_same_step(spec, backend):
    """Residual memory adds the residual into the pipeline's own copy of the gradients (a fused
    bucket's concatenation) instead of a new array: same averages and state, the caller's arrays
    (donated or not) are not the state."""
    need_backend(backend)

    def run(comm, in_place):
        sync = gradcomp.GradientSync(spec, memory="residual", comm=comm, seed=8, fuse=True)
        orig, seen = sync.memory.compensate, {"n": 0}

        def compensate(g, state, ctx):
            seen["n"] += bool(ctx.memo.get("g_writable"))
            if not in_place:
                ctx.memo.pop("g_writable", None)
            return orig(g, state, ctx)
        sync.memory.compensate = compensate
        rng = np.random.default_rng([9, comm.rank])
        outs, kept = [], []
        for step in range(3):
            grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
            if backend == "torch":
                import torch
                grads = {k: torch.from_numpy(v) for k, v in grads.items()}
            before = {k: to_np(v).copy() for k, v in grads.items()}
            out = sync.step(grads) if step != 1 else (sync.start(grads, donate=True), sync.finish())[1]
            outs.append({k: to_np(v).copy() for k, v in out.items()})
            if step != 1:
                kept.append(all(np.array_equal(to_np(grads[k]), before[k]) for k in grads))
            for v in list(out.values()) + list(grads.values()):
                v[...] = 0.0 if backend == "numpy" else v.zero_()     # the caller reuses its buffers
        sd = sync.state_dict()
        state = {f"{k}/{kk}": to_np(vv).copy() for k, v in sd["memory_state"].items() for kk, vv in v.items()}
        return outs, state, kept, seen["n"]

    res = world(2, lambda c: (run(c, True), run(c, False)))
    for (o1, s1, k1, n1), (o2, s2, k2, _) in res:
        assert n1 > 0 and all(k1) and all(k2)
        for t1, t2 in zip(o1, o2):
            for k in t1:
                np.testing.assert_array_equal(t1[k], t2[k], err_msg=k)
        assert s1.keys() == s2.keys()
        for k in s1:
            np.testing.assert_array_equal(s1[k], s2[k], err_msg=k)
