"""gradcomp_tf in one process: ranks are LocalWorld threads (multi-process runs: test_tf_multiproc.py).

Covers: `none` through DistributedOptimizer equals averaged SGD (eager and tf.function, and with
backward_passes_per_step); DistributedGradientTape inside tf.function (traced "graph" path and
py_function "island" path) equals the eager exchange step for step; checkpoint-resume continues
bit-exactly; configuration mismatch raises on every rank; jit_compile=True gives the clear error;
Horovod Compression objects; TF and PyTorch gradients through the same compressor and seed give the
same payload bytes; broadcast, callbacks, sync-policy hooks and the checkpoint encoding.
Models are tiny: TF is slow to start and the machine is shared.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import gradcomp  # noqa: E402
from gradcomp import ConfigMismatchError  # noqa: E402
from gradcomp.backend import get_backend  # noqa: E402
from gradcomp.comm.base import Communicator  # noqa: E402
from gradcomp.sync.base import SyncPolicy  # noqa: E402

import gradcomp_tf as gct  # noqa: E402
from gradcomp_tf.checkpoint import decode, encode  # noqa: E402

pytestmark = pytest.mark.tf
LR = 0.1


def world(n, fn, timeout=120.0):
    return gradcomp.LocalWorld(n, timeout=timeout).run(fn)


def catching(fn):
    def body(comm):
        try:
            return fn(comm)
        except BaseException as e:  # noqa: BLE001 - the test inspects each rank's error
            return e
    return body


def tiny_model(n_in=6, hidden=5, n_out=3):
    """A 2-layer MLP with fixed weights from a numpy generator (identical on every rank/thread)."""
    m = keras.Sequential([keras.Input((n_in,)), keras.layers.Dense(hidden, activation="tanh"),
                          keras.layers.Dense(n_out)])
    rng = np.random.default_rng(0)
    m.set_weights([rng.normal(size=w.shape).astype(np.float32) * 0.5 for w in m.weights])
    return m


def batch(rank, step=0, n=8, n_in=6, n_out=3):
    rng = np.random.default_rng(100 * rank + step)
    return rng.normal(size=(n, n_in)).astype(np.float32), rng.integers(0, n_out, size=n).astype(np.int32)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def local_grads(model, x, y):
    with tf.GradientTape() as t:
        loss = LOSS(y, model(x, training=True))
    return [g.numpy() for g in t.gradient(loss, model.trainable_variables)]


# ------------------------------------------------------------------ DistributedOptimizer == averaged SGD
@pytest.mark.parametrize("eager", [True, False], ids=["run_eagerly", "tf.function"])
def test_none_one_step_equals_plain_averaged_sgd(eager):
    def fn(comm):
        m = tiny_model()
        w0 = [w.numpy() for w in m.trainable_variables]
        x, y = batch(comm.rank)
        g = local_grads(m, x, y)
        opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="none", backend=comm, seed=0)
        m.compile(optimizer=opt, loss=LOSS, run_eagerly=eager)
        m.train_on_batch(x, y)
        return w0, g, [w.numpy() for w in m.trainable_variables], opt.gradcomp_stats()

    res = world(2, fn)
    w0 = res[0][0]
    avg = [(a + b) / 2 for a, b in zip(res[0][1], res[1][1])]
    assert not all(np.allclose(a, b) for a, b in zip(res[0][1], res[1][1])), "ranks must see different data"
    for r in range(2):
        for w_init, g, w_new in zip(w0, avg, res[r][2]):
            np.testing.assert_allclose(w_new, w_init - LR * g, rtol=1e-5, atol=1e-6)
        assert res[r][3]["steps"] == 1 and res[r][3]["ratio"] == 1.0


def test_backward_passes_per_step_averages_locally_then_exchanges_once():
    def fn(comm):
        m = tiny_model()
        w0 = [w.numpy() for w in m.trainable_variables]
        b0, b1 = batch(comm.rank, 0), batch(comm.rank, 1)
        gs = [local_grads(m, *b0), local_grads(m, *b1)]
        opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="none", backend=comm,
                                       backward_passes_per_step=2)
        m.compile(optimizer=opt, loss=LOSS)
        m.train_on_batch(*b0)
        mid = [w.numpy() for w in m.trainable_variables]
        m.train_on_batch(*b1)
        return w0, gs, mid, [w.numpy() for w in m.trainable_variables], opt.gradcomp_stats()["steps"]

    res = world(2, fn)
    avg = [sum(res[r][1][p][i] for r in range(2) for p in range(2)) / 4 for i in range(len(res[0][0]))]
    for r in range(2):
        assert all(np.array_equal(a, b) for a, b in zip(res[r][0], res[r][2])), "no update after pass 1"
        for w_init, g, w_new in zip(res[0][0], avg, res[r][3]):
            np.testing.assert_allclose(w_new, w_init - LR * g, rtol=1e-5, atol=1e-6)
        assert res[r][4] == 1, "two passes must make exactly one exchange"


def test_bad_arguments_are_rejected_clearly():
    with pytest.raises(TypeError, match="Keras 3 optimizer"):
        gct.DistributedOptimizer(object())
    with pytest.raises(ValueError, match="backward_passes_per_step"):
        gct.DistributedOptimizer(keras.optimizers.SGD(0.1), backward_passes_per_step=0)
    with pytest.raises(ValueError, match="unknown compressor"):
        gct.DistributedOptimizer(keras.optimizers.SGD(0.1), compressor="nope",
                                 backend=gradcomp.SingleCommunicator())
    built = keras.optimizers.SGD(0.1)
    built.build([keras.Variable(np.zeros(2, np.float32))])
    with pytest.raises(ValueError, match="before model.compile"):
        gct.DistributedOptimizer(built)


# ------------------------------------------------------------------ DistributedGradientTape in tf.function
def _tape_run(comm, spec, mode, eager, steps=3):
    w = tf.Variable(np.random.default_rng(1).normal(size=(24, 16)).astype(np.float32), name="w")
    b = tf.Variable(np.zeros(16, np.float32), name="b")
    ex = gct.Exchange(spec, None, comm, sync="allreduce", seed=5)

    def step(x):
        with tf.GradientTape() as t:
            loss = tf.reduce_sum(tf.tanh(tf.matmul(x, w) + b) ** 2)
        return gct.DistributedGradientTape(t, exchange=ex, mode=mode).gradient(loss, [w, b])

    f = step if eager else tf.function(step)
    rng = np.random.default_rng(comm.rank)
    out = [[g.numpy() for g in f(tf.constant(rng.normal(size=(4, 24)).astype(np.float32)))] for _ in range(steps)]
    return out, ex.stats(), ex.path


@pytest.mark.parametrize("spec", ["topk:ratio=0.2", "randomk:ratio=0.25", "powersgd", "threshold"])
def test_tape_in_tf_function_matches_eager_step_for_step(spec):
    name = gradcomp.registry.parse_spec(spec)[0]
    if name not in gradcomp.available():
        pytest.skip(f"{name} not registered")
    eager = world(2, lambda c: _tape_run(c, spec, "auto", True))
    traced = world(2, lambda c: _tape_run(c, spec, "auto", False))
    island = world(2, lambda c: _tape_run(c, spec, "island", False))
    # threshold's payload size varies per step: it cannot be traced and must take the island path
    assert traced[0][2][0] == ("island" if name == "threshold" else "graph"), traced[0][2]
    assert island[0][2][0] == "island"
    for res in (traced, island):
        for r in range(2):
            for s in range(3):
                # A traced step may run other fp32 kernels than eager (oneDNN/Grappler fusions on AVX-512
                # CPUs), and error feedback carries those last-bit differences into later steps: compare
                # at a few fp32 ulps of the step's scale, far below what a wrong average would give.
                for a, b in zip(eager[r][0][s], res[r][0][s]):
                    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5 * (1 + np.abs(a).max()))
            assert res[r][1]["bytes_sent"] == eager[r][1]["bytes_sent"] and res[r][1]["steps"] == 3
    for s in range(3):   # every rank got the same average
        for a, b in zip(traced[0][0][s], traced[1][0][s]):
            np.testing.assert_array_equal(a, b)


def test_traced_randomized_compressor_draws_new_indices_each_step():
    """The step is a graph input: randomk must not reuse step 0's coordinates forever."""
    def fn(comm):
        w = tf.Variable(tf.zeros([200]))
        ex = gct.Exchange("randomk:ratio=0.05", "none", comm, sync="allreduce", seed=0)

        @tf.function
        def step():
            with tf.GradientTape() as t:
                loss = tf.reduce_sum(w * tf.range(200, dtype=tf.float32))
            return gct.DistributedGradientTape(t, exchange=ex).gradient(loss, [w])[0]
        return [np.flatnonzero(step().numpy()) for _ in range(3)], ex.path

    (supports, path), _ = world(2, fn)
    assert path[0] == "graph"
    assert len(supports[0]) == 10 and not np.array_equal(supports[0], supports[1])


def test_nonfinite_gradient_raises_on_every_rank_and_keeps_state():
    def fn(comm):
        w = tf.Variable(tf.ones([8]))
        ex = gct.Exchange("topk:ratio=0.5", None, comm, sync="allreduce")

        @tf.function
        def step(scale):
            with tf.GradientTape() as t:
                loss = tf.reduce_sum(w * scale)
            return gct.DistributedGradientTape(t, exchange=ex).gradient(loss, [w])[0]
        step(tf.ones([8]))
        before = ex.state_dict()
        bad = np.ones(8, np.float32)
        if comm.rank == 1:
            bad[3] = np.nan
        try:
            step(tf.constant(bad))
            err = None
        except Exception as e:  # noqa: BLE001
            err = e
        return err, before, ex.state_dict()

    res = world(2, fn)
    for err, before, after in res:
        assert err is not None and "non-finite" in str(err)
        assert after["sync"]["step"] == before["sync"]["step"] == 1
        for name, st in before["sync"]["memory_state"].items():
            np.testing.assert_array_equal(st["residual"], after["sync"]["memory_state"][name]["residual"])


# ------------------------------------------------------------------ jit_compile
def test_jit_compile_true_gives_a_clear_error():
    m = tiny_model()
    opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="none",
                                   backend=gradcomp.SingleCommunicator())
    m.compile(optimizer=opt, loss=LOSS, jit_compile=True)
    assert m.jit_compile is True
    with pytest.raises(RuntimeError, match="jit_compile=False"):
        m.train_on_batch(*batch(0))
    m2 = tiny_model()   # the documented fix works
    m2.compile(optimizer=gct.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="none",
                                                  backend=gradcomp.SingleCommunicator()),
               loss=LOSS, jit_compile=False)
    assert np.isfinite(m2.train_on_batch(*batch(0)))


def test_xla_forward_backward_with_the_exchange_outside_the_compiled_part():
    """The documented way to keep XLA: jit-compile the gradient computation, average outside it."""
    def fn(comm):
        m = tiny_model()
        ex = gct.Exchange("topk:ratio=0.3", None, comm, sync="allreduce")
        opt = keras.optimizers.SGD(LR)

        @tf.function(jit_compile=True)
        def grads_fn(x, y):
            with tf.GradientTape() as t:
                loss = LOSS(y, m(x, training=True))
            return t.gradient(loss, m.trainable_variables)

        @tf.function
        def step(x, y):
            grads = ex.average(grads_fn(x, y), m.trainable_variables)
            opt.apply_gradients(zip(grads, m.trainable_variables))

        @tf.function(jit_compile=True)
        def bad_step(x, y):
            with tf.GradientTape() as t:
                loss = LOSS(y, m(x, training=True))
            return ex.average(t.gradient(loss, m.trainable_variables), m.trainable_variables)

        for s in range(2):
            step(*batch(comm.rank, s))
        with pytest.raises(RuntimeError, match="jit_compile=False"):
            bad_step(*batch(comm.rank))
        return [w.numpy() for w in m.trainable_variables], ex.stats()["steps"], ex.path

    res = world(2, fn)
    assert res[0][1] == 2 and res[0][2][0] == "graph"
    for a, b in zip(res[0][0], res[1][0]):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ start-up fingerprint check
def test_config_mismatch_raises_on_both_ranks_optimizer():
    def fn(comm):
        m = tiny_model()
        opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="none" if comm.rank == 0 else "fp16",
                                       backend=comm)
        m.compile(optimizer=opt, loss=LOSS)
        m.train_on_batch(*batch(comm.rank))

    errs = world(2, catching(fn))
    for e in errs:
        assert isinstance(e, ConfigMismatchError), repr(e)
        assert "compressor" in str(e) and "fp16" in str(e)


def test_config_mismatch_raises_on_both_ranks_tape_shapes():
    def fn(comm):
        w = tf.Variable(tf.ones([4 + comm.rank]))

        @tf.function
        def step():
            with tf.GradientTape() as t:
                loss = tf.reduce_sum(w * w)
            return gct.DistributedGradientTape(t, compressor="none", backend=comm).gradient(loss, [w])
        step()

    errs = world(2, catching(fn))
    for e in errs:   # AutoGraph re-raises errors from a user's tf.function as StagingError with the text
        assert isinstance(e, ConfigMismatchError) or "ConfigMismatchError" in str(e), repr(e)
        assert 'rank 0: {"0:Variable": [4]}; rank 1: {"0:Variable": [5]}' in str(e)


# ------------------------------------------------------------------ checkpoint-resume
def _ckpt_run(comm, ckdir, steps, save_at=None, restore=False):
    m = tiny_model()
    opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR, momentum=0.9), compressor="topk:ratio=0.2",
                                   backend=comm, seed=3)
    m.compile(optimizer=opt, loss=LOSS)
    opt.build(m.trainable_variables)
    ck = tf.train.Checkpoint(model=m, optimizer=opt)
    prefix = gct.rank_path(os.path.join(ckdir, "ck"), comm)
    start = 0
    if restore:
        ck.read(prefix).assert_consumed()
        start = save_at
    for s in range(start, steps):
        m.train_on_batch(*batch(comm.rank, s))
        if save_at is not None and not restore and s + 1 == save_at:
            ck.write(prefix)
    return [w.numpy() for w in m.weights + opt.variables], opt.gradcomp_exchange.state_dict()


def test_checkpoint_resume_continues_exactly(tmp_path):
    full = world(2, lambda c: _ckpt_run(c, str(tmp_path), 6, save_at=3))
    assert sorted(os.listdir(tmp_path)) == ["ck-rank0.data-00000-of-00001", "ck-rank0.index",
                                            "ck-rank1.data-00000-of-00001", "ck-rank1.index"]
    resumed = world(2, lambda c: _ckpt_run(c, str(tmp_path), 6, save_at=3, restore=True))
    for r in range(2):
        for a, b in zip(full[r][0], resumed[r][0]):
            np.testing.assert_array_equal(a, b)
        fs, rs = full[r][1]["sync"], resumed[r][1]["sync"]
        assert fs["step"] == rs["step"] == 6 and fs["stats"] == rs["stats"]
        for name in fs["memory_state"]:
            np.testing.assert_array_equal(fs["memory_state"][name]["residual"], rs["memory_state"][name]["residual"])
    res0 = full[0][1]["sync"]["memory_state"]
    res1 = full[1][1]["sync"]["memory_state"]
    assert any(not np.array_equal(res0[n]["residual"], res1[n]["residual"]) for n in res0), \
        "residuals differ per rank: that is why each rank saves its own file"
    # a fresh run without the restore ends elsewhere (the test can fail)
    fresh = world(2, lambda c: _ckpt_run(c, str(tmp_path), 3))
    assert not all(np.array_equal(a, b) for a, b in zip(full[0][0], fresh[0][0]))


def test_failed_restore_changes_nothing_and_flipped_bytes_are_refused(tmp_path):
    """A localsgd exchange's state loaded into an allreduce run is refused, with the state unchanged
    (issue 15 item 9); a flipped byte in a rank's checkpoint file is caught by TF's own crc32c."""
    def run(comm, sync):
        m = tiny_model()
        opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="topk:ratio=0.2", backend=comm,
                                       seed=3, sync=sync)
        m.compile(optimizer=opt, loss=LOSS)
        for s in range(3):
            m.train_on_batch(*batch(comm.rank, s))
        return m, opt

    def fn(comm):
        _, other = run(comm, "localsgd:period=2")
        m, opt = run(comm, None)
        ex = opt.gradcomp_exchange
        before = ex.state_dict()
        with pytest.raises(ValueError, match="sync policy"):
            ex.load_state_dict(other.gradcomp_exchange.state_dict())
        after = ex.state_dict()
        assert after["step"] == before["step"] and after["sync"]["step"] == before["sync"]["step"]
        for n, st in before["sync"]["memory_state"].items():
            np.testing.assert_array_equal(st["residual"], after["sync"]["memory_state"][n]["residual"])
        prefix = gct.rank_path(os.path.join(str(tmp_path), "ck"), comm)
        tf.train.Checkpoint(model=m, optimizer=opt).write(prefix)
        return prefix

    for prefix in world(2, fn):
        data = prefix + ".data-00000-of-00001"
        raw = bytearray(open(data, "rb").read())
        raw[len(raw) // 2] ^= 0x01
        open(data, "wb").write(bytes(raw))
        m = tiny_model()
        opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="topk:ratio=0.2",
                                       backend=gradcomp.SingleCommunicator(), seed=3)
        m.compile(optimizer=opt, loss=LOSS)
        opt.build(m.trainable_variables)
        with pytest.raises(Exception, match="(?i)checksum|corrupt|data ?loss"):
            tf.train.Checkpoint(model=m, optimizer=opt).read(prefix).assert_consumed()


def test_horovod_resume_idiom_restores_on_rank0_and_broadcasts_replicated_state(tmp_path):
    """Rank 0 restores its checkpoint alone; broadcast_variables + broadcast_exchange_state put every
    rank at the same gradcomp step (randomk's shared choices), so the ranks stay identical (issue 16)."""
    def build(comm):
        m = tiny_model()
        opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="randomk:ratio=0.3", backend=comm,
                                       seed=3)
        m.compile(optimizer=opt, loss=LOSS)
        opt.build(m.trainable_variables)
        return m, opt

    def fn(comm):
        m, opt = build(comm)
        for s in range(4):
            m.train_on_batch(*batch(comm.rank, s))
        prefix = gct.rank_path(os.path.join(str(tmp_path), "ck"), comm)
        tf.train.Checkpoint(model=m, optimizer=opt).write(prefix)
        m2, opt2 = build(comm)
        m2.train_on_batch(*batch(comm.rank, 0))              # a process with one step of its own
        if comm.rank == 0:
            tf.train.Checkpoint(model=m2, optimizer=opt2).read(prefix).assert_consumed()
        gct.broadcast_variables(m2.variables, 0, backend=comm)
        gct.broadcast_variables(opt2.variables, 0, backend=comm)
        gct.broadcast_exchange_state(opt2.gradcomp_exchange, 0)
        ex = opt2.gradcomp_exchange
        steps = (ex.step, ex.sync.steps)
        for s in range(4, 7):
            m2.train_on_batch(*batch(comm.rank, s))
        return steps, [w.numpy() for w in m2.weights]

    (s0, w0), (s1, w1) = world(2, fn)
    assert s0 == s1 == (4, 4)
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_encoding_round_trip_without_pickle():
    import ml_dtypes
    obj = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [1, 2.5, "x", None, True],
           "c": {"bf": np.array([1.5, -2], dtype=ml_dtypes.bfloat16), "e": np.zeros(0, np.int64)},
           "d": np.int64(7), "t": tf.constant([1.0, 2.0])}
    out = decode(encode(obj))
    np.testing.assert_array_equal(out["a"], obj["a"])
    assert out["b"] == [1, 2.5, "x", None, True] and out["d"] == 7
    assert out["c"]["bf"].dtype == obj["c"]["bf"].dtype and np.array_equal(out["c"]["bf"], obj["c"]["bf"])
    assert out["c"]["e"].shape == (0,) and out["c"]["e"].dtype == np.int64
    np.testing.assert_array_equal(out["t"], [1.0, 2.0])


# ------------------------------------------------------------------ broadcast and callbacks
def test_broadcast_variables_copies_root_values():
    def fn(comm):
        v = tf.Variable(np.full((3, 2), comm.rank + 1.0, np.float32))
        i = tf.Variable(np.array([comm.rank * 10, 5], np.int64))
        gct.broadcast_variables([v, i], root_rank=1, backend=comm)
        return v.numpy(), i.numpy()

    for v, i in world(2, fn):
        np.testing.assert_array_equal(v, np.full((3, 2), 2.0))
        np.testing.assert_array_equal(i, [10, 5])
    with pytest.raises(ValueError, match="root_rank"):
        gct.broadcast_variables([tf.Variable(1.0)], root_rank=3, backend=gradcomp.SingleCommunicator())


def test_fit_with_callbacks_broadcasts_averages_and_reports_bytes():
    def fn(comm):
        m = tiny_model()
        if comm.rank == 1:       # different start: the broadcast callback must fix it
            m.set_weights([w * 0 + 1 for w in m.get_weights()])
        opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="topk:ratio=0.25", backend=comm)
        m.compile(optimizer=opt, loss=LOSS)
        stats = gct.callbacks.CompressionStatsCallback(verbose=0)
        x, y = batch(comm.rank, n=32)
        h = m.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
                  callbacks=[gct.callbacks.BroadcastGlobalVariablesCallback(0, backend=comm),
                             gct.callbacks.MetricAverageCallback(backend=comm), stats])
        return [w.numpy() for w in m.weights], h.history, stats.history

    res = world(2, fn)
    for a, b in zip(res[0][0], res[1][0]):
        np.testing.assert_array_equal(a, b)
    assert res[0][1]["loss"] == res[1][1]["loss"], "epoch losses are averaged over ranks"
    for rec in res[0][2]:
        assert rec["steps"] == 4 and rec["bytes_sent"] > 0
        assert 1.5 < rec["ratio"] < 2.5   # topk 25% sends (value, int32 index) pairs: ~2x
    assert res[0][1]["gradcomp_ratio"] == [r["ratio"] for r in res[0][2]]


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf.function"])
def test_fp16_overflow_of_finite_gradients_raises_on_every_rank_and_keeps_state(traced):
    """4e4 on each of 2 ranks is finite, but its fp16 sum is not: every rank raises, nothing commits."""
    def fn(comm):
        w = tf.Variable(tf.ones([8]))
        ex = gct.Exchange("fp16", "residual", comm, sync="allreduce")

        def step(scale):
            with tf.GradientTape() as t:
                loss = tf.reduce_sum(w * scale)
            return gct.DistributedGradientTape(t, exchange=ex).gradient(loss, [w])[0]
        step = tf.function(step) if traced else step
        step(tf.ones([8]))
        before = ex.state_dict()
        big = np.ones(8, np.float32)
        big[3] = 4e4
        try:
            step(tf.constant(big))
            err = None
        except Exception as e:  # noqa: BLE001 - inside tf.function it arrives wrapped
            err = str(e)
        after = ex.state_dict()
        return err, before, after, ex.path[0], step(tf.ones([8])).numpy()

    for err, before, after, path, nxt in world(2, fn):
        assert err is not None and "overflowed" in err, err
        assert path == ("graph" if traced else "eager")
        assert after["sync"]["step"] == before["sync"]["step"] == 1
        for name, st in before["sync"]["memory_state"].items():
            np.testing.assert_array_equal(st["residual"], after["sync"]["memory_state"][name]["residual"])
        np.testing.assert_array_equal(nxt, np.ones(8, np.float32))


def test_bool_seed_and_complex_gradients_raise_clear_errors():
    with pytest.raises(ValueError, match=r"seed=True is not valid; expected an int"):
        gct.Exchange("none", None, gradcomp.SingleCommunicator(), sync="allreduce", seed=True)
    ex = gct.Exchange("none", None, gradcomp.SingleCommunicator(), sync="allreduce")
    z = tf.Variable(tf.complex(tf.ones([3]), tf.zeros([3])))
    with pytest.raises(TypeError, match="has dtype complex64.*complex gradients are not supported"):
        ex.average([tf.ones([3], tf.complex64)], [z])


def test_nan_on_a_local_step_raises_on_every_rank_and_changes_nothing():
    """da averages no gradients on local steps, but NaN on one rank still stops every rank there:
    weights and optimizer variables (momentum) stay as they were, and training goes on in step."""
    def fn(comm):
        m = tiny_model()
        opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR, momentum=0.9), compressor="none", backend=comm,
                                       sync="da:period=3")
        m.compile(optimizer=opt, loss=LOSS)
        err = None
        for s in range(4):
            x, y = batch(comm.rank, s)
            if s == 1 and comm.rank == 1:
                x[2, 3] = np.nan
            if s != 1:
                m.train_on_batch(x, y)
                continue
            before = [v.numpy().copy() for v in m.trainable_variables + list(opt.variables)]
            try:
                m.train_on_batch(x, y)
            except Exception as e:  # noqa: BLE001 - inside tf.function it arrives wrapped
                err = str(e)
            after = [v.numpy() for v in m.trainable_variables + list(opt.variables)]
            names = [v.path for v in m.trainable_variables + list(opt.variables)]
            changed = [n for n, a, b in zip(names, before, after) if not np.array_equal(a, b)]
            assert not changed, (err, changed)
        return err, [w.numpy() for w in m.trainable_variables]

    (e0, w0), (e1, w1) = world(2, fn)
    for e in (e0, e1):
        assert e is not None and "non-finite" in e and "local step" in e, e
    for a, b in zip(w0, w1):                 # steps 0, 2, 3 taken; step 3 (the third) synchronized
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-6)


class RecordingPolicy(SyncPolicy):
    name = "recording"

    def __init__(self):
        super().__init__()
        self.calls = []

    def before_step(self, step, view):
        self.calls.append(("before", step, view.names(), view.momentum(view.names()[0]) is not None))

    def after_step(self, step, view):
        self.calls.append(("after", step))
        if step == 1:   # overwrite a parameter through the view: visible after the step
            n = view.names()[0]
            view.set(n, tf.zeros_like(view.get(n)))


def test_sync_policy_hooks_see_parameters_and_momentum():
    pol = RecordingPolicy()
    m = tiny_model()
    opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR, momentum=0.9), compressor="none",
                                   backend=gradcomp.SingleCommunicator(), sync=pol)
    m.compile(optimizer=opt, loss=LOSS)
    for s in range(2):
        m.train_on_batch(*batch(0, s))
    assert [c[:2] for c in pol.calls] == [("before", 0), ("after", 0), ("before", 1), ("after", 1)]
    assert pol.calls[0][2] == ["0:kernel", "1:bias", "2:kernel", "3:bias"] and pol.calls[0][3]
    assert not np.any(m.trainable_variables[0].numpy())
    assert opt.gradcomp_exchange.path[0] == "island"   # per-step host decisions cannot be traced


@pytest.mark.parametrize("policy", [p for p in gradcomp.available("sync") if p != "allreduce"])
def test_registered_sync_policies_average_parameters_every_period(policy):
    def fn(comm):
        m = tiny_model()
        opt = gct.DistributedOptimizer(keras.optimizers.SGD(LR, momentum=0.9), compressor="none", backend=comm,
                                       sync=f"{policy}:period=2")
        m.compile(optimizer=opt, loss=LOSS)
        out = []
        for s in range(4):
            m.train_on_batch(*batch(comm.rank, s))
            out.append([w.numpy() for w in m.trainable_variables])
        return out

    try:
        res = world(2, fn)
    except ImportError as e:
        pytest.skip(f"{policy}: {e}")
    equal = [all(np.array_equal(a, b) for a, b in zip(res[0][s], res[1][s])) for s in range(4)]
    assert equal == [False, True, False, True], f"{policy}: ranks equal after steps {equal}"


# ------------------------------------------------------------------ Horovod Compression objects
def test_horovod_compression_objects():
    x = tf.constant(np.linspace(-3, 3, 12).reshape(3, 4), tf.float32)
    for c, dt in ((gct.Compression.fp16, tf.float16), (gct.Compression.bf16, tf.bfloat16),
                  (gct.Compression.none, tf.float32)):
        wire, ctx = c.compress(x)
        assert wire.dtype == dt
        back = c.decompress(wire, ctx)
        assert back.shape == x.shape and back.dtype == tf.float32
        np.testing.assert_allclose(back.numpy(), x.numpy(), atol=0.02)
    scaled = gct.Compression.get("fp16:prescale=0.5")
    np.testing.assert_allclose(scaled.compress(x)[0].numpy(), x.numpy().ravel() * 0.5, atol=1e-3)
    for name in ("topk", "randomk"):
        with pytest.raises(AttributeError, match="gradcomp_tf.DistributedOptimizer"):
            getattr(gct.Compression, name)
    assert {"none", "fp16", "bf16"} <= set(gct.Compression.available())
    with pytest.raises(AttributeError, match="no compressor"):
        gct.Compression.nonexistent   # noqa: B018


def test_horovod_transport_skips_cleanly_without_horovod_tf():
    try:
        import horovod.tensorflow  # noqa: F401
        pytest.skip("horovod.tensorflow is importable here")
    except Exception:  # noqa: BLE001
        pass
    with pytest.raises(RuntimeError, match="GRADCOMP_BACKEND=mpi"):
        gct.Exchange("none", None, "horovod")


# ------------------------------------------------------------------ TF and PyTorch agree
class _Capture(Communicator):
    """One rank; keeps the bytes of every payload collective."""

    def __init__(self):
        self.rank, self.size, self.local_rank, self.payloads = 0, 1, 0, []
        self.inner = gradcomp.SingleCommunicator()

    def _keep(self, x, name):
        if name.startswith("step"):
            b = get_backend(x)
            self.payloads.append((name, np.asarray(b.to_numpy(b.to_bytes(x))).tobytes()))

    def allreduce(self, x, *, name=""):
        self._keep(x, name)
        return self.inner.allreduce(x, name=name)

    def allgather(self, x, *, name=""):
        self._keep(x, name)
        return self.inner.allgather(x, name=name)

    def broadcast(self, x, *, root=0, name=""):
        return self.inner.broadcast(x, root=root, name=name)


MATMUL_COMPRESSORS = {"powersgd", "randproj", "aggtopk"}   # payloads are matrix products or row sums
# per-tensor float32 scales summed in each framework's own order: the signs / levels are identical bytes,
# the 4-byte scales may differ in the last bits
SCALE_SUM_COMPRESSORS = {"efsignsgd", "signsgd", "signum", "onebit", "qsgd", "terngrad", "scaled_sign"}


def _spec(name):
    from conftest import cross_backend          # same payload bytes on TF and torch: the counter stream
    return cross_backend({"topk": "topk:ratio=0.1", "randomk": "randomk:ratio=0.25", "dgc": "dgc:ratio=0.1"}.get(name, name))


def _sync_steps(spec, make, grads_np, steps=2):
    comm = _Capture()
    sync = gradcomp.GradientSync(spec, comm=comm, seed=7)
    outs = [{k: np.asarray(get_backend(v).to_numpy(v), np.float32) for k, v in
             sync.step({k: make(g) for k, g in grads_np[s].items()}).items()} for s in range(steps)]
    return comm.payloads, outs, sync.stats()


@pytest.mark.parametrize("name", gradcomp.available())
def test_tf_and_torch_same_payload_bytes_and_results(name):
    torch = pytest.importorskip("torch")
    try:
        gradcomp.create(_spec(name))
    except ImportError as e:
        pytest.skip(f"{name}: {e}")
    rng = np.random.default_rng(11)
    w1, w2 = rng.normal(size=(12, 20)).astype(np.float32), rng.normal(size=(20, 6)).astype(np.float32)
    x = rng.normal(size=(16, 12)).astype(np.float32)

    def tf_grads(x):
        a, b = tf.Variable(w1), tf.Variable(w2)
        with tf.GradientTape() as t:
            loss = tf.reduce_mean(tf.matmul(tf.tanh(tf.matmul(x, a)), b) ** 2)
        return dict(zip(["w1", "w2"], [g.numpy() for g in t.gradient(loss, [a, b])]))

    def torch_grads(x):
        a = torch.tensor(w1, requires_grad=True)
        b = torch.tensor(w2, requires_grad=True)
        loss = ((torch.tanh(torch.from_numpy(x) @ a) @ b) ** 2).mean()
        loss.backward()
        return {"w1": a.grad.numpy(), "w2": b.grad.numpy()}

    g_tf = [tf_grads(x), tf_grads(x * 0.5)]
    g_th = [torch_grads(x), torch_grads(x * 0.5)]
    for s in range(2):   # the frameworks' own gradients of the same function agree
        for k in g_tf[s]:
            np.testing.assert_allclose(g_tf[s][k], g_th[s][k], rtol=1e-4, atol=1e-6)
    spec = _spec(name)
    # 1. the same gradient arrays through both backends: identical payload bytes, same averages
    p_tf, o_tf, s_tf = _sync_steps(spec, tf.constant, g_tf)
    p_th, o_th, s_th = _sync_steps(spec, torch.from_numpy, g_tf)
    assert [n for n, _ in p_tf] == [n for n, _ in p_th]
    assert [len(b) for _, b in p_tf] == [len(b) for _, b in p_th] and s_tf["bytes_sent"] == s_th["bytes_sent"]
    if name in MATMUL_COMPRESSORS:   # BLAS sums in its own order: equal to float32 rounding, not bitwise
        for (n, a), (_, b) in zip(p_tf, p_th):
            dt = np.dtype(n.rsplit(".", 1)[1])
            np.testing.assert_allclose(np.frombuffer(a, dt), np.frombuffer(b, dt), rtol=1e-4, atol=1e-6)
    elif name in SCALE_SUM_COMPRESSORS:   # at most the scales' bytes differ: 4 per tensor and payload
        for (_, a), (_, b) in zip(p_tf, p_th):
            diff = sum(x != y for x, y in zip(a, b))
            assert diff <= 4 * len(g_tf[0]), f"{name}: {diff} of {len(a)} payload bytes differ"
    else:
        same = sum(a == b for (_, a), (_, b) in zip(p_tf, p_th))
        assert same == len(p_tf), f"{name}: {len(p_tf) - same} of {len(p_tf)} payloads differ in bytes"
    for a, b in zip(o_tf, o_th):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    # 2. each framework's own gradients: same payload sizes, numerically close averages
    p_th2, o_th2, s_th2 = _sync_steps(spec, torch.from_numpy, g_th)
    assert s_th2["bytes_sent"] == s_tf["bytes_sent"]
    for a, b in zip(o_tf, o_th2):
        for k in a:
            scale = max(1e-6, float(np.abs(a[k]).max()))
            assert np.abs(a[k] - b[k]).max() <= 0.05 * scale + 1e-5, f"{name}/{k}"


def test_make_comm_refuses_a_world_that_disagrees_with_the_launcher(monkeypatch):
    """GRADCOMP_BACKEND=local under mpirun (2 processes) is an error, not two 1-rank jobs; a bad
    timeout is refused before anything is built."""
    from gradcomp.comm.launch import LauncherMismatchError
    from gradcomp_tf import runtime
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(LauncherMismatchError, match="world of 1 rank"):
        runtime.make_comm("local")
    with pytest.raises(ValueError, match="timeout='soon' is not a number of seconds"):
        runtime.make_comm("local", timeout="soon")
