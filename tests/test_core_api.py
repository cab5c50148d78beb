"""The public core API and its errors: registry names, spec strings, parameter checks, GRADCOMP_*
environment, LocalWorld semantics (rank order, fail-fast, timeouts), configuration mismatch
across ranks, non-finite gradients and shape changes."""
from __future__ import annotations

import re
import sys
import time

import numpy as np
import pytest

import gradcomp
from gradcomp import registry
from gradcomp.params import Param

from conftest import COMPRESSORS, MEMORIES, catching, load, require, world


# --------------------------------------------------------------------------- registry
def test_available_lists_compressors_and_memories():
    names = gradcomp.available()
    assert names == sorted(names) and len(set(names)) == len(names)
    for must in ("none", "fp16", "bf16", "topk", "randomk", "threshold", "dgc", "qsgd", "terngrad",
                 "signsgd", "signum", "efsignsgd", "onebit", "natural", "powersgd", "randproj", "rbgs"):
        assert must in names
    assert {"none", "residual", "dgc", "gmc"} <= set(gradcomp.available("memory"))
    with pytest.raises(ValueError, match="compressor.*memory.*sync"):
        gradcomp.available("widget")


@pytest.mark.parametrize("name", COMPRESSORS)
def test_every_compressor_builds_from_its_name_and_declares_itself(name):
    comp = load(name)
    assert isinstance(comp, gradcomp.Compressor)
    assert comp.name == name and isinstance(comp.summable, bool) and comp.rounds >= 1
    assert comp.paper, f"{name} should cite its paper"
    assert sys.modules[type(comp).__module__].__doc__, f"{name}: its module needs a docstring"
    again = gradcomp.create(comp.spec())               # the canonical spec round-trips
    assert again.spec() == comp.spec() and type(again) is type(comp)
    assert gradcomp.create(comp) is comp                # instances pass through


@pytest.mark.parametrize("name", MEMORIES)
def test_every_memory_builds_from_its_name(name):
    mem = load(name, "memory")
    assert isinstance(mem, gradcomp.Memory) and mem.name == name
    assert gradcomp.create(mem.spec(), "memory").spec() == mem.spec()


def test_spec_overrides_and_case():
    c = gradcomp.create("TopK:ratio=0.25 , mode=sampled")
    assert (c.ratio, c.mode) == (0.25, "sampled")
    assert gradcomp.create("topk", ratio=0.5).ratio == 0.5


# --------------------------------------------------------------------------- bad configs
def test_unknown_compressor_name_lists_valid_names():
    with pytest.raises(ValueError) as ei:
        gradcomp.create("topkk:ratio=0.1")
    msg = str(ei.value)
    assert "topkk" in msg and all(n in msg for n in COMPRESSORS)


def test_unknown_memory_name_lists_valid_names():
    with pytest.raises(ValueError) as ei:
        gradcomp.create("residuals", "memory")
    assert all(n in str(ei.value) for n in MEMORIES)


def test_unknown_parameter_names_the_valid_ones():
    with pytest.raises(ValueError) as ei:
        gradcomp.create("topk:ratoi=0.1")
    msg = str(ei.value)
    assert "ratoi" in msg and "ratio" in msg and "mode" in msg


@pytest.mark.parametrize("spec", ["topk:ratio=0", "topk:ratio=1.5", "topk:ratio=-0.1", "randomk:ratio=0",
                                  "randomk:ratio=1.5", "topk:ratio=abc", "topk:mode=fast",
                                  "randomk:unbiased=maybe", "fp16:prescale=0", "topk:ratio=nan"])
def test_out_of_range_values_raise_naming_the_valid_range(spec):
    with pytest.raises(ValueError) as ei:
        gradcomp.create(spec)
    name, kwargs = registry.parse_spec(spec)
    (key,) = kwargs
    msg = str(ei.value)
    assert key in msg and "expected" in msg
    assert re.search(r"\(0|\[0|one of|true or false", msg), msg


# Values that must be rejected for any compressor declaring the parameter (the issue's list).
BAD_VALUES = {"ratio": [0, -1], "bits": [0, -3], "levels": [0, -1], "rank": [-1], "s": [0]}
FRACTION_RATIO_BAD = [1.5, 2]


@pytest.mark.parametrize("name", COMPRESSORS)
def test_issue_listed_bad_values_raise_for_every_compressor_that_has_the_parameter(name):
    cls = registry.lookup("compressor", name) if _written(name) else pytest.skip(f"{name}: module not written yet")
    checked = 0
    for key, bads in BAD_VALUES.items():
        if key not in cls.params:
            continue
        p = cls.params[key]
        if key == "ratio" and p.hi is not None and p.hi <= 1:
            bads = bads + FRACTION_RATIO_BAD          # ratio is a fraction kept: > 1 is meaningless
        for v in bads:
            with pytest.raises(ValueError, match=key):
                cls(**{key: v})
            checked += 1
    # and every declared numeric range is enforced just outside its bounds
    for key, p in cls.params.items():
        for v in _outside(p):
            with pytest.raises(ValueError, match=re.escape(key)):
                cls(**{key: v})
            checked += 1
    if not cls.params:
        pytest.skip(f"{name} has no parameters")
    assert checked > 0 or all(p.type is str or p.type is bool for p in cls.params.values())


def _written(name):
    try:
        require("compressor", name)
        return True
    except pytest.skip.Exception:
        return False


def _outside(p: Param):
    if p.type not in (int, float) or p.choices:
        return []
    out = []
    if p.lo is not None:
        out.append(p.lo if p.lo_open else (p.lo - 1 if p.type is int else p.lo - abs(p.lo) * 0.5 - 0.5))
    if p.hi is not None:
        out.append(p.hi if p.hi_open else (p.hi + 1 if p.type is int else p.hi + abs(p.hi) * 0.5 + 0.5))
    return out


@pytest.mark.parametrize("spec", ["", "   ", ":", "topk:ratio", "topk:=0.1", "topk:ratio=0.1,,=", "topk:ratio 0.1", 42])
def test_malformed_spec_strings_raise(spec):
    with pytest.raises(ValueError) as ei:
        gradcomp.create(spec)
    assert "expected" in str(ei.value) or "valid" in str(ei.value)


@pytest.mark.parametrize("env, key, hint", [
    ({"GRADCOMP_COMPRESSOR": "zip"}, "GRADCOMP_COMPRESSOR", "topk"),
    ({"GRADCOMP_COMPRESSOR": "topk:ratio=0"}, "GRADCOMP_COMPRESSOR", "ratio"),
    ({"GRADCOMP_COMPRESSOR": "topk:ratio=2"}, "GRADCOMP_COMPRESSOR", "ratio"),
    ({"GRADCOMP_COMPRESSOR": "topk:rate=0.1"}, "GRADCOMP_COMPRESSOR", "ratio"),
    ({"GRADCOMP_COMPRESSOR": "topk:ratio"}, "GRADCOMP_COMPRESSOR", "key=value"),
    ({"GRADCOMP_MEMORY": "memo"}, "GRADCOMP_MEMORY", "residual"),
    ({"GRADCOMP_MEMORY": "residual:beta=2"}, "GRADCOMP_MEMORY", "beta"),
    ({"GRADCOMP_SEED": "abc"}, "GRADCOMP_SEED", "GRADCOMP_SEED="),
    ({"GRADCOMP_SEED": "1.5"}, "GRADCOMP_SEED", "integer"),
    ({"GRADCOMP_BACKEND": "carrier-pigeon"}, "GRADCOMP_BACKEND", "mpi"),
    ({"GRADCOMP_BUCKET_MB": "-1"}, "GRADCOMP_BUCKET_MB", "MiB"),
    ({"GRADCOMP_BUCKET_MB": "lots"}, "GRADCOMP_BUCKET_MB", "MiB"),
    ({"GRADCOMP_SYNC": "sometimes"}, "GRADCOMP_SYNC", "allreduce"),
])
def test_bad_environment_raises_naming_the_variable_and_valid_values(env, key, hint):
    with pytest.raises(ValueError) as ei:
        gradcomp.from_env(environ=env)
    assert key in str(ei.value) and hint in str(ei.value)


def test_from_env_reads_every_variable_and_defaults():
    cfg = gradcomp.from_env(environ={})
    assert (cfg.compressor.name, cfg.memory.name, cfg.seed, cfg.backend) == ("none", "none", 0, "auto")
    cfg = gradcomp.from_env(environ={"GRADCOMP_COMPRESSOR": " topk:ratio=0.01,mode=sampled ",
                                     "GRADCOMP_MEMORY": "residual:beta=0.5", "GRADCOMP_SEED": "17",
                                     "GRADCOMP_BACKEND": "MPI", "GRADCOMP_BUCKET_MB": "4"})
    assert (cfg.compressor.ratio, cfg.compressor.mode) == (0.01, "sampled")
    assert (cfg.memory.name, cfg.memory.beta, cfg.seed, cfg.backend, cfg.bucket_mb) == ("residual", 0.5, 17, "mpi", 4.0)
    # lossy compressors default to error feedback, lossless ones to none
    assert gradcomp.from_env(environ={"GRADCOMP_COMPRESSOR": "randomk"}).memory.name == "residual"
    assert gradcomp.from_env(environ={"GRADCOMP_COMPRESSOR": "none"}).memory.name == "none"


def test_from_env_does_not_read_os_environ_when_given_a_mapping(monkeypatch):
    monkeypatch.setenv("GRADCOMP_COMPRESSOR", "zip")
    assert gradcomp.from_env(environ={"GRADCOMP_COMPRESSOR": "fp16"}).compressor.name == "fp16"
    with pytest.raises(ValueError, match="GRADCOMP_COMPRESSOR"):
        gradcomp.from_env()


def test_gradient_sync_rejects_bad_arguments():
    with pytest.raises(ValueError, match="valid compressor names"):
        gradcomp.GradientSync("nope")
    with pytest.raises(ValueError, match="valid memory names"):
        gradcomp.GradientSync("topk", memory="nope")
    sync = gradcomp.GradientSync("fp16")
    with pytest.raises(TypeError, match="dict"):
        sync.step([np.zeros(3, np.float32)])
    with pytest.raises(TypeError, match="floating"):
        sync.step({"w": np.zeros(3, np.int32)})
    with pytest.raises(TypeError, match="unsupported array type"):
        sync.step({"w": _NotAnArray()})


class _NotAnArray:
    shape = (3,)


# The validation gaps of issue 15 item 9: each a clear error saying what to do.
def test_a_key_given_twice_in_a_spec_raises():
    for spec in ("topk:ratio=0.01,ratio=0.02", "topk:ratio=0.01, ratio = 0.01"):
        with pytest.raises(ValueError, match="'ratio' is given twice.*once"):
            gradcomp.create(spec)
    with pytest.raises(ValueError, match="GRADCOMP_COMPRESSOR.*given twice"):
        gradcomp.from_env({"GRADCOMP_COMPRESSOR": "fp16:prescale=1,prescale=2"})


@pytest.mark.parametrize("spec", ["fp16:prescale=inf", "bf16:prescale=-inf", "fp16:prescale=nan",
                                  "slowmo:alpha=inf", "residual:beta=inf"])
def test_non_finite_float_parameters_raise(spec):
    kind = "sync" if spec.startswith("slowmo") else "memory" if spec.startswith("residual") else "compressor"
    with pytest.raises(ValueError, match="is not valid; expected a finite float"):
        gradcomp.create(spec, kind)
    assert gradcomp.create("fp16:prescale=0.5").prescale == 0.5


@pytest.mark.parametrize("seed", [True, False, 1.5, "one", None, [0]])
def test_seed_must_be_an_int(seed):
    with pytest.raises(ValueError, match=r"seed=.* is not valid; expected an int, e\.g\. seed=0"):
        gradcomp.GradientSync(seed=seed)
    with pytest.raises(ValueError, match="expected an int"):
        gradcomp.create("localsgd", "sync").bind(None, seed=seed)
    assert gradcomp.GradientSync(seed=np.int64(3)).seed == 3 and gradcomp.GradientSync(seed="4").seed == 4


def test_complex_gradients_raise_a_type_error_naming_the_tensor():
    with pytest.raises(TypeError, match="gradient 'z' has dtype complex64.*complex gradients are not supported"):
        gradcomp.GradientSync().step({"w": np.ones(2, np.float32), "z": np.ones(3, np.complex64)})


def test_bool_and_float_parameters_reject_other_types():
    with pytest.raises(ValueError, match="compress=2 is not valid"):
        gradcomp.create("localsgd", "sync", compress=2)
    with pytest.raises(ValueError, match="prescale=True is not valid"):
        gradcomp.create("fp16", prescale=True)


# --------------------------------------------------------------------------- overflow (issue 15 item 4)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("case", ["one rank 7e4", "sum of 4e4 + 4e4", "float16 gradient"])
def test_finite_gradients_that_overflow_raise_on_every_rank_and_change_nothing(case):
    """No finite input gives a non-finite update: an fp16 payload beyond 65504 on one rank, a sum
    over ranks beyond it, or an average beyond a float16 gradient's range (error feedback adds a
    kept 6e4 to a new 6e4) raises PayloadOverflowError (a NonFiniteGradientError) on every rank,
    commits nothing, and the next step works."""
    f16 = case == "float16 gradient"
    spec, dtype = ("topk:ratio=0.125", np.float16) if f16 else ("fp16", np.float32)

    def spike(i, v):
        return np.where(np.arange(8) == i, v, 0).astype(dtype)

    def fn(comm):
        sync = gradcomp.GradientSync(spec, memory="residual", comm=comm, seed=1)
        ok = np.linspace(-1, 1, 8).astype(dtype)
        sync.step({"w": ok})
        if f16:                                # topk sends index 3; the residual keeps 6e4 at index 2
            sync.step({"w": spike(2, 6e4) + spike(3, 6.1e4)})
            g = spike(2, 6e4)
        else:
            g = ok.copy()
            g[2] = (7e4 if comm.rank == 0 else 1.0) if case == "one rank 7e4" else 4e4
        before = (sync.steps, sync.stats(), np.array(sync.residual("w"), copy=True))
        try:
            sync.step({"w": g})
            return "no error"
        except gradcomp.PayloadOverflowError as e:
            assert isinstance(e, gradcomp.NonFiniteGradientError) and "overflowed" in str(e) and "prescale" in str(e)
        assert (sync.steps, sync.stats()) == before[:2]
        np.testing.assert_array_equal(sync.residual("w"), before[2])
        return bool(np.all(np.isfinite(sync.step({"w": ok})["w"])))

    res = gradcomp.LocalWorld(2, timeout=30).run(fn)
    assert res == [True, True], res


def test_fp16_prescale_one_over_n_keeps_the_sum_of_n_ranks_in_range():
    def fn(comm):
        g = np.full(4, 6e4, np.float32)
        return gradcomp.GradientSync("fp16:prescale=0.5", comm=comm).step({"w": g})["w"]
    for out in gradcomp.LocalWorld(2, timeout=30).run(fn):
        np.testing.assert_allclose(out, 6e4, rtol=1e-3)


# --------------------------------------------------------------------------- LocalWorld
def test_localworld_returns_results_in_rank_order():
    def fn(comm):
        time.sleep(0.02 * (comm.size - comm.rank))      # later ranks finish first
        return comm.rank, comm.size
    assert world(4, fn) == [(r, 4) for r in range(4)]
    with pytest.raises(ValueError, match="positive int"):
        gradcomp.LocalWorld(0)


def test_localworld_collectives():
    def fn(comm):
        x = np.full(3, comm.rank + 1.0, np.float32)
        s = comm.allreduce(x, name="s").wait()
        g = comm.allgather(np.arange(comm.rank + 1, dtype=np.int32), name="g").wait()
        b = comm.broadcast(x * 10, root=2, name="b").wait()
        x[:] = -1                                       # the collectives copied their inputs
        return s, g, b
    for s, g, b in world(3, fn):
        np.testing.assert_array_equal(s, np.full(3, 6.0))
        assert [list(a) for a in g] == [[0], [0, 1], [0, 1, 2]]
        np.testing.assert_array_equal(b, np.full(3, 30.0))


def test_localworld_collectives_overlap_asynchronously():
    def fn(comm):
        h1 = comm.allreduce(np.ones(2), name="first")
        h2 = comm.allreduce(np.ones(2) * 2, name="second")
        return h2.wait()[0], h1.wait()[0]                # waiting out of order must work
    assert world(3, fn) == [(6.0, 3.0)] * 3


@pytest.mark.parametrize("late", [False, True])
def test_a_failing_rank_makes_the_others_fail_fast_with_its_error(late):
    seen = {}

    def fn(comm):
        if comm.rank == 1:
            if late:
                time.sleep(0.2)                          # the others are already waiting
            raise KeyError("rank one exploded")
        try:
            comm.allreduce(np.ones(1), name="never-complete").wait()
        except BaseException as e:  # noqa: BLE001
            seen[comm.rank] = e

    t0 = time.monotonic()
    with pytest.raises(KeyError, match="rank one exploded"):  # run() re-raises the failing rank's error
        gradcomp.LocalWorld(3, timeout=60).run(fn)
    assert time.monotonic() - t0 < 10                    # not the 60 s timeout
    assert sorted(seen) == [0, 2]
    for e in seen.values():
        assert isinstance(e, RuntimeError) and "rank 1" in str(e) and "rank one exploded" in str(e)


def test_a_missing_collective_times_out_with_a_clear_error():
    def fn(comm):
        if comm.rank != 2:
            comm.allreduce(np.ones(1), name="grad-bucket-0").wait()

    t0 = time.monotonic()
    errs = gradcomp.LocalWorld(3, timeout=0.5).run(catching(fn))
    assert time.monotonic() - t0 < 10
    assert errs[2] is None
    timeouts = [e for e in errs[:2] if isinstance(e, TimeoutError)]
    assert timeouts, errs
    msg = str(timeouts[0])
    assert "grad-bucket-0" in msg and "[2]" in msg and "never arrived" in msg


def test_mismatched_collectives_raise_instead_of_hanging():
    def fn(comm):
        if comm.rank == 0:
            return comm.allreduce(np.ones(1), name="a").wait()
        return comm.allgather(np.ones(1), name="b").wait()
    errs = gradcomp.LocalWorld(2, timeout=10).run(catching(fn))
    assert all(isinstance(e, RuntimeError) for e in errs)
    assert any("mismatch" in str(e) for e in errs)


# --------------------------------------------------------------------------- cross-rank config
@pytest.mark.parametrize("what", ["compressor", "memory", "seed", "shapes", "names", "order"])
def test_mismatched_configuration_raises_on_every_rank(what):
    def fn(comm):
        odd = comm.rank == 1
        kw = dict(compressor="topk:ratio=0.1", memory="residual", seed=0)
        grads = {"w": np.ones(10, np.float32), "b": np.ones(3, np.float32)}
        if odd and what == "compressor":
            kw["compressor"] = "topk:ratio=0.2"
        if odd and what == "memory":
            kw["memory"] = "none"
        if odd and what == "seed":
            kw["seed"] = 1
        if odd and what == "shapes":
            grads["w"] = np.ones(11, np.float32)
        if odd and what == "names":
            grads["c"] = grads.pop("b")
        if odd and what == "order":               # same names and shapes, registered in another order
            grads = dict(reversed(grads.items()))
        return gradcomp.GradientSync(comm=comm, **kw).step(grads)

    t0 = time.monotonic()
    errs = gradcomp.LocalWorld(3, timeout=20).run(catching(fn))
    assert time.monotonic() - t0 < 10
    for e in errs:
        assert isinstance(e, gradcomp.ConfigMismatchError), e
        assert "rank 1" in str(e) and "GRADCOMP_" in str(e)
    key = {"shapes": "tensors", "names": "tensors"}.get(what, what)
    assert key in str(errs[0])
    if what == "order":                           # names the first differing position and entries
        assert all('order: first difference at position 0: rank 0: "w"; rank 1: "b"' in str(e) for e in errs), errs


def test_non_finite_gradient_on_one_rank_raises_everywhere_and_loses_nothing():
    def fn(comm, poison):
        sync = gradcomp.GradientSync("topk:ratio=0.2", memory="residual", comm=comm, seed=3)
        rng = np.random.default_rng(comm.rank)
        outs = [sync.step({"w": rng.standard_normal(20).astype(np.float32)})["w"]]
        before = (sync.steps, sync.residual("w").copy(), sync.stats())
        if poison:
            bad = rng.standard_normal(20).astype(np.float32)
            if comm.rank == 1:
                bad[3] = np.nan
            try:
                sync.step({"w": bad})
                return "no error"
            except gradcomp.NonFiniteGradientError as e:
                assert "non-finite" in str(e)
            assert sync.steps == before[0] and sync.stats() == before[2]
            np.testing.assert_array_equal(sync.residual("w"), before[1])
        else:
            rng.standard_normal(20)                         # keep the streams aligned
        outs.append(sync.step({"w": rng.standard_normal(20).astype(np.float32)})["w"])
        return outs, sync.state_dict()["memory_state"]["w"]["residual"]

    clean = world(3, lambda c: fn(c, False))
    hit = world(3, lambda c: fn(c, True))
    for (co, cres), (ho, hres) in zip(clean, hit):
        for a, b in zip(co, ho):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(cres, hres)


def test_gradient_changing_shape_raises_a_clear_error():
    sync = gradcomp.GradientSync("topk:ratio=0.5")
    sync.step({"w": np.ones((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'w' changed shape from \(2, 3\) to \(3, 2\)"):
        sync.step({"w": np.ones((3, 2), np.float32)})
    assert sync.steps == 1
    sync.step({"w": np.ones((2, 3), np.float32)})        # the original shape still works
    sync.reset()
    sync.step({"w": np.ones((3, 2), np.float32)})        # after reset() the new shape is accepted
