"""Elastic resize semantics of the core (gradcomp/elastic.py), in LocalWorld."""
import numpy as np
import pytest

from gradcomp import ConfigMismatchError, GradientSync, LocalWorld
from gradcomp import elastic

SHAPES = {"w": (6, 4), "b": (5,)}


def grads(rank, step, shapes=SHAPES):
    rng = np.random.default_rng(1000 * step + rank)
    # small integers: every residual, sum and flush below is exact in float64
    return {n: rng.integers(-8, 9, size=s).astype(np.float64) for n, s in shapes.items()}


def test_graceful_shrink_flushes_exactly_what_the_ranks_held():
    """3 ranks -> 2 (rank 2 leaves gracefully): the flush is the exact sum of all three ranks'
    residuals (the leaving rank's included), residuals are zero after it, and over the whole run
    sum(updates) == sum(gradients / P) - (the final residuals / P): no gradient mass is lost."""
    steps_a, steps_b = 3, 2

    def old_world(comm):
        gs = GradientSync("topk:ratio=0.25", memory="residual", comm=comm)
        outs = [gs.step(grads(comm.rank, t)) for t in range(steps_a)]
        held = elastic.held_mass(gs)
        el = elastic.Elastic(gs)
        summed = el.flush()
        assert all(not np.any(gs.residual(n)) for n in SHAPES)
        return outs, held, summed, gs.replicated_state_dict()

    res = LocalWorld(3).run(old_world)
    for n in SHAPES:
        want = res[0][1][n] + res[1][1][n] + res[2][1][n]
        assert np.any(want)                                   # there was something to flush
        for r in range(3):
            np.testing.assert_array_equal(res[r][2][n].reshape(want.shape), want)   # exact
    rep = res[0][3]                                           # what rank 0 broadcasts

    def new_world(comm):
        gs = GradientSync("topk:ratio=0.25", memory="residual", comm=comm)
        gs.load_replicated_state_dict(rep)
        el = elastic.Elastic(gs, shapes=SHAPES)
        el.resize(comm)
        assert gs.steps == steps_a
        outs = [gs.step(grads(comm.rank, steps_a + t)) for t in range(steps_b)]
        return outs, elastic.held_mass(gs)

    res_b = LocalWorld(2).run(new_world)
    for n in SHAPES:
        upd = sum(o[n] for o in res[0][0]) + sum(o[n] for o in res_b[0][0])
        g_a = sum(grads(r, t)[n] for r in range(3) for t in range(steps_a)) / 3
        g_b = sum(grads(r, steps_a + t)[n] for r in range(2) for t in range(steps_b)) / 2
        left = (res_b[0][1][n] + res_b[1][1][n]) / 2
        np.testing.assert_allclose(upd + left, g_a + g_b, rtol=0, atol=1e-12)



def test_flush_is_one_allreduce_and_applied_once():
    """The flush is one dense allreduce; the next update carries sum / P_old and the one after does not."""
    calls = []

    def fn(comm):
        real = comm.allreduce

        def spy(x, *, name=""):
            if name.startswith("elastic.flush"):
                calls.append((comm.rank, name))
            return real(x, name=name)
        gs = GradientSync("topk:ratio=0.25", memory="residual", comm=comm)
        gs.step(grads(comm.rank, 0))
        comm.allreduce = spy
        summed = elastic.flush(gs)
        comm.allreduce = real
        ref = GradientSync("topk:ratio=0.25", memory="residual", comm=comm)   # zero residuals, same step
        ref.load_replicated_state_dict(gs.replicated_state_dict())
        ref._flushed = {}
        g = grads(comm.rank, 1)
        a, b = gs.step(dict(g)), ref.step(dict(g))
        g2 = grads(comm.rank, 2)
        a2, b2 = gs.step(dict(g2)), ref.step(dict(g2))
        return summed, a, b, a2, b2

    res = LocalWorld(2).run(fn)
    assert sorted(calls) == [(0, "elastic.flush.float64"), (1, "elastic.flush.float64")]
    for summed, a, b, a2, b2 in res:
        for n in SHAPES:
            np.testing.assert_allclose(a[n], b[n] + summed[n].reshape(SHAPES[n]) / 2, atol=1e-12)
            np.testing.assert_array_equal(a2[n], b2[n])


def test_failure_rolls_back_to_the_commit_and_zeroes_residuals():
    def fn(comm):
        gs = GradientSync("powersgd:rank=1", memory="residual", comm=comm)
        gs.step(grads(comm.rank, 0))
        el = elastic.Elastic(gs)
        q_commit = np.array(gs._cst["w"]["q"], copy=True)
        gs.step(grads(comm.rank, 1))
        gs.step(grads(comm.rank, 2))
        assert gs.steps == 3 and not np.array_equal(gs._cst["w"]["q"], q_commit)
        el.restore()
        assert gs.steps == el.committed_step == 1
        np.testing.assert_array_equal(gs._cst["w"]["q"], q_commit)        # replicated: back to the commit
        assert not np.any(gs.residual("w")) and not np.any(gs.residual("b"))   # per rank: zero
        out = gs.step(grads(comm.rank, 1))                                 # and the run goes on
        return out

    a, b = LocalWorld(2).run(fn)
    for n in SHAPES:
        np.testing.assert_array_equal(a[n], b[n])


def test_fingerprint_checked_again_on_the_new_world():
    def fn(comm):
        spec = "topk:ratio=0.25" if comm.rank < 2 else "topk:ratio=0.5"   # the joining rank differs
        gs = GradientSync(spec, memory="residual", comm=comm, check_config=False)
        el = elastic.Elastic(gs, shapes=SHAPES)
        try:
            el.resize(comm)
        except ConfigMismatchError as e:
            return str(e)
        return None

    msgs = LocalWorld(3).run(fn)
    assert all(m is not None and "compressor" in m for m in msgs)       # on every rank


def test_resize_runs_callbacks_with_the_new_size_and_rebinds():
    seen = []

    def fn(comm):
        gs = GradientSync("topk:ratio=0.25", memory="residual", comm=comm)
        el = elastic.Elastic(gs, shapes=SHAPES, on_resize=[lambda p: seen.append((comm.rank, p))])
        el.resize(comm)
        return gs.comm is comm

    assert all(LocalWorld(2).run(fn))
    assert sorted(seen) == [(0, 2), (1, 2)]


def test_flush_refused_mid_step():
    gs = GradientSync("topk:ratio=0.25", memory="residual")
    gs.start(grads(0, 0))
    with pytest.raises(RuntimeError, match="in flight"):
        elastic.flush(gs)
    gs.finish()


def test_handoff_gives_the_leaving_ranks_mass_to_the_stayers_exactly():
    """The keep rule, 3 ranks -> 2 (rank 2 leaves): one allreduce in which only rank 2 contributes
    returns exactly what rank 2 held; the stayers keep their own residuals plus half of it, all
    rescaled by 2/3, so the mass the new world will send (sum / 2) equals what the old world held
    (sum / 3); and on the new world nothing is lost from there on."""
    calls = []

    def fn(comm):
        gs = GradientSync("topk:ratio=0.25", memory="residual", comm=comm)
        for t in range(3):
            gs.step(grads(comm.rank, t))
        held = elastic.held_mass(gs)
        real = comm.allreduce

        def spy(x, *, name=""):
            calls.append((comm.rank, name))
            return real(x, name=name)
        comm.allreduce = spy
        got = elastic.handoff(gs, leaving=comm.rank == 2, n_stay=2, new_size=2)
        comm.allreduce = real
        return held, got, elastic.held_mass(gs)

    res = LocalWorld(3).run(fn)
    assert sorted(calls) == [(r, "elastic.handoff.float64.residual") for r in range(3)]
    for n in SHAPES:
        leaver = res[2][0][n]
        assert np.any(leaver)
        for r in range(3):
            np.testing.assert_array_equal(res[r][1][n].reshape(leaver.shape), leaver)     # exact
        assert not np.any(res[2][2][n])                                                 # the leaver: zero
        before = sum(res[r][0][n] for r in range(3)) / 3
        after = (res[0][2][n] + res[1][2][n]) / 2
        np.testing.assert_allclose(after, before, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res[0][2][n], (res[0][0][n] + leaver / 2) * 2 / 3, rtol=0, atol=1e-12)


def test_handoff_on_expand_only_rescales():
    """2 -> 4 with nobody leaving: no collective; each residual doubles (its mass / P is kept)."""
    def fn(comm):
        gs = GradientSync("topk:ratio=0.25", memory="residual", comm=comm)
        gs.step(grads(comm.rank, 0))
        held = elastic.held_mass(gs)
        comm.allreduce = None                         # any collective would fail
        got = elastic.handoff(gs, leaving=False, n_stay=2, new_size=4)
        return held, got, elastic.held_mass(gs)

    for held, got, after in LocalWorld(2).run(fn):
        assert got == {}
        for n in SHAPES:
            np.testing.assert_array_equal(after[n], 2 * held[n])
    with pytest.raises(ValueError, match="staying rank"):
        elastic.handoff(GradientSync("topk:ratio=0.25", memory="residual"), leaving=True, n_stay=0, new_size=1)
