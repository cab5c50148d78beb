"""Horovod drop-in for TensorFlow (issue 16): Horovod's DistributedOptimizer / DistributedGradientTape
arguments, the collective helpers, the learning-rate callbacks, and the tape's refusal of sync
policies it cannot run. Ranks are LocalWorld threads; models are tiny (TF is slow to start)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import gradcomp  # noqa: E402
from gradcomp.comm.single import SingleCommunicator  # noqa: E402

import gradcomp_tf as hvd  # noqa: E402
from gradcomp_tf.tape import reset_shared  # noqa: E402

pytestmark = pytest.mark.tf
LR = 0.1
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# Horovod's own TF Compression class, as horovod.tensorflow defines it (not built for the main environment's TF 2.21)
HorovodFP16 = type("FP16Compressor", (), {"__module__": "horovod.tensorflow.compression"})


def tiny_model():
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
    rng = np.random.default_rng(0)
    m.set_weights([rng.normal(size=w.shape).astype(np.float32) * 0.5 for w in m.weights])
    return m


def batch(rank, step=0, n=8):
    rng = np.random.default_rng(100 * rank + step)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, size=n).astype(np.int32)


def local_grads(m, x, y):
    with tf.GradientTape() as t:
        loss = LOSS(y, m(x, training=True))
    return [g.numpy() for g in t.gradient(loss, m.trainable_variables)]


@pytest.mark.parametrize("eager", [True, False], ids=["run_eagerly", "tf.function"])
def test_optimizer_compression_object_and_op_sum(eager):
    """compression=Compression.fp16 means no error feedback; op=Sum steps with the sum of the grads."""
    def fn(comm):
        m = tiny_model()
        w0 = [w.numpy() for w in m.trainable_variables]
        x, y = batch(comm.rank)
        opt = hvd.DistributedOptimizer(keras.optimizers.SGD(LR), compression=hvd.Compression.fp16, op=hvd.Sum,
                                       backend=comm)
        m.compile(optimizer=opt, loss=LOSS, run_eagerly=eager, jit_compile=False)
        m.train_on_batch(x, y)
        return w0, [w.numpy() for w in m.trainable_variables], opt.gradcomp_exchange.describe()["memory"]

    out = gradcomp.LocalWorld(2, timeout=120).run(fn)
    m = tiny_model()
    total = [a + b for a, b in zip(*(local_grads(m, *batch(r)) for r in range(2)))]
    for w0, w1, mem in out:
        assert mem == "none"
        for a, b, g in zip(w0, w1, total):
            np.testing.assert_allclose(b, a - LR * g, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("comp", [HorovodFP16, hvd.Compression.fp16], ids=["horovod", "gradcomp"])
def test_tape_takes_compression_objects(comp):
    reset_shared()
    v = tf.Variable([1.0, 2.0])
    with tf.GradientTape() as t:
        loss = tf.reduce_sum(v * v)
    tape = hvd.DistributedGradientTape(t, compression=comp, backend=SingleCommunicator())
    (g,) = tape.gradient(loss, [v])
    np.testing.assert_allclose(g.numpy(), [2.0, 4.0])
    assert tape.exchange.describe()["compressor"].startswith("fp16") and tape.exchange.describe()["memory"] == "none"
    with pytest.raises(ValueError, match="Adasum"):
        hvd.DistributedGradientTape(t, op=hvd.Adasum)


def test_tape_refuses_a_periodic_sync_policy(monkeypatch):
    """GRADCOMP_SYNC=localsgd with the tape used to run and never average the parameters."""
    reset_shared()
    monkeypatch.setenv("GRADCOMP_SYNC", "localsgd:period=2")
    v = tf.Variable([1.0, 2.0])
    with tf.GradientTape() as t:
        loss = tf.reduce_sum(v * v)
    tape = hvd.DistributedGradientTape(t, compressor="none", backend=SingleCommunicator())
    with pytest.raises(ValueError, match="cannot run sync policy 'localsgd"):
        tape.gradient(loss, [v])
    reset_shared()


@pytest.mark.parametrize("average,factor", [(None, 1.0), (True, 1.0), (False, 2.0)])
def test_average_aggregated_gradients(average, factor):
    m = tiny_model()
    w0 = [w.numpy() for w in m.trainable_variables]
    x, y = batch(0)
    g = local_grads(m, x, y)
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="none", backend=SingleCommunicator(),
                                   backward_passes_per_step=2, average_aggregated_gradients=average)
    m.compile(optimizer=opt, loss=LOSS, run_eagerly=True)
    m.train_on_batch(x, y)
    m.train_on_batch(x, y)          # the same batch twice: the average is g, the sum 2 g
    for a, b, gg in zip(w0, [w.numpy() for w in m.trainable_variables], g):
        np.testing.assert_allclose(b, a - LR * factor * gg, rtol=1e-4, atol=1e-6)


def test_collectives_single_process_and_callable_broadcast():
    hvd.init()
    t = tf.constant([1.0, 3.0])
    assert np.array_equal(hvd.allreduce(t).numpy(), [1.0, 3.0])
    assert hvd.allreduce(tf.constant(2.5)).shape == () and float(hvd.allreduce(tf.constant(2.5))) == 2.5
    assert np.array_equal(hvd.allreduce(t, op=hvd.Sum, postscale_factor=2.0).numpy(), [2.0, 6.0])
    assert hvd.allgather(tf.ones((2, 3))).shape == (2, 3)
    assert np.array_equal(hvd.broadcast(t, root_rank=0).numpy(), [1.0, 3.0])     # the module is callable
    from gradcomp_tf.broadcast import broadcast_variables  # noqa: F401 - the old import still works
    traced = tf.function(lambda a: hvd.allreduce(a, op=hvd.Max) + hvd.broadcast(a, 0))
    assert np.array_equal(traced(t).numpy(), [2.0, 6.0])
    assert hvd.broadcast_object({"epoch": 3, "names": ["a"]}) == {"epoch": 3, "names": ["a"]}
    assert hvd.allgather_object({"a": [1, 2]}) == [{"a": [1, 2]}]
    with pytest.raises(TypeError, match="cannot send"):
        hvd.broadcast_object(object())
    assert hvd.join() == 0 and hvd.local_size() >= 1 and hvd.is_initialized()
    assert isinstance(hvd.mpi_built(), bool) and hvd.nccl_built() is False


def test_learning_rate_callbacks_follow_horovods_formulas():
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, b, logs=None):
            seen.append(float(self.model.optimizer.learning_rate.numpy()))

    def fn(comm):
        m = tiny_model()
        opt = hvd.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="none", backend=comm)
        m.compile(optimizer=opt, loss=LOSS, run_eagerly=True)
        x, y = batch(comm.rank, n=16)
        cbs = [hvd.callbacks.LearningRateWarmupCallback(initial_lr=0.4, warmup_epochs=2)]
        if comm.rank == 0:
            cbs.append(Record())
        hist = m.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=cbs)
        return hist.history["lr"]

    lrs = gradcomp.LocalWorld(2, timeout=300).run(fn)
    # Horovod: lr = initial / size * ((epoch + 1/steps) * (size - 1) / warmup + 1), epoch = batch / steps
    want = [0.4 / 2 * (((b + 1) / 4) * 1 / 2 + 1) for b in range(4)]
    np.testing.assert_allclose(seen, want, rtol=1e-6)
    assert lrs[0] == lrs[1] and abs(lrs[0][0] - want[-1]) < 1e-6

    m = tiny_model()
    m.compile(optimizer=keras.optimizers.SGD(0.2), loss=LOSS)
    x, y = batch(0, n=8)
    cb = hvd.callbacks.LearningRateScheduleCallback(initial_lr=0.2, multiplier=0.5, start_epoch=1)
    hist = m.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[cb])
    np.testing.assert_allclose(hist.history["lr"], [0.2, 0.1], rtol=1e-6)


def test_finalize_and_policy_bytes_in_tf():
    """localsgd:period=2 over 3 steps ends on a local step: gradcomp_finalize() makes the ranks equal."""
    def fn(comm):
        m = tiny_model()
        opt = hvd.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="none", sync="localsgd:period=2",
                                       backend=comm)
        m.compile(optimizer=opt, loss=LOSS, run_eagerly=True)
        for s in range(3):
            m.train_on_batch(*batch(comm.rank, s))
        before = [w.numpy().copy() for w in m.trainable_variables]
        did = opt.gradcomp_finalize()
        return before, [w.numpy() for w in m.trainable_variables], did, opt.gradcomp_stats()

    (b0, a0, d0, s0), (b1, a1, d1, _) = gradcomp.LocalWorld(2, timeout=120).run(fn)
    assert d0 and d1 and not np.array_equal(b0[0], b1[0])
    for x, y, p, q in zip(a0, a1, b0, b1):
        np.testing.assert_allclose(x, y, rtol=0, atol=0)
        np.testing.assert_allclose(x, (p + q) / 2, rtol=1e-6, atol=1e-7)
    nbytes = sum(w.size * 4 for w in a0)
    assert s0["policy"]["bytes_sent"] == 2 * nbytes and s0["bytes_sent_total"] == s0["bytes_sent"] + 2 * nbytes


def test_fit_synchronizes_a_periodic_policy_at_its_end():
    """model.fit ends with Keras' finalize_variable_values: localsgd:period=2 over 3 steps (not ending on
    a sync step) leaves the ranks equal after fit, without an explicit gradcomp_finalize()."""
    def fn(comm):
        m = tiny_model()
        opt = hvd.DistributedOptimizer(keras.optimizers.SGD(LR), compressor="none", sync="localsgd:period=2",
                                       backend=comm)
        m.compile(optimizer=opt, loss=LOSS, jit_compile=False)
        x, y = batch(comm.rank, n=12)
        m.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
        return [w.numpy() for w in m.trainable_variables], opt.gradcomp_stats()["policy"]["syncs"]

    (w0, s0), (w1, s1) = gradcomp.LocalWorld(2, timeout=300).run(fn)
    assert s0 == s1 == 2          # the step-2 sync and the final one
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)


def test_partial_tape_keeps_local_layer_gradients_local():
    """PartialDistributedGradientTape(local_layers=[...]): those gradients are this rank's own divided by
    the number of ranks (Horovod's scale_local_gradients), the others are averaged."""
    def fn(comm):
        reset_shared()
        m = tiny_model()
        x, y = batch(comm.rank)
        with tf.GradientTape() as t:
            loss = LOSS(y, m(x, training=True))
        tape = hvd.PartialDistributedGradientTape(t, local_layers=m.layers[1], compressor="none", backend=comm)
        grads = tape.gradient(loss, m.trainable_variables)
        return [g.numpy() for g in grads]

    out = gradcomp.LocalWorld(2, timeout=120).run(fn)
    m = tiny_model()
    own = [local_grads(m, *batch(r)) for r in range(2)]
    for r in range(2):
        for i, g in enumerate(out[r]):
            want = own[r][i] / 2 if i >= 2 else (own[0][i] + own[1][i]) / 2     # layers[1]: variables 2, 3
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(out[0][2], out[1][2])
    with pytest.raises(ValueError, match="Keras layers"):
        with tf.GradientTape() as t:
            pass
        hvd.PartialDistributedGradientTape(t, local_layers=["dense"])


def test_load_model_wraps_the_optimizer_and_restores_its_state(tmp_path):
    """hvd.load_model: the optimizer comes back as a gradcomp DistributedOptimizer with the saved
    iterations and momentum, so one more step equals one more step of the original model."""
    hvd.init()
    m = tiny_model()
    m.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9), loss=LOSS)
    for s in range(2):
        m.train_on_batch(*batch(0, s))
    path = str(tmp_path / "m.keras")
    m.save(path)
    loaded = hvd.load_model(path, compression=hvd.Compression.fp16)
    from gradcomp_tf.optimizer import _DistributedMixin
    assert isinstance(loaded.optimizer, _DistributedMixin)
    assert loaded.optimizer.gradcomp_exchange.describe()["compressor"].startswith("fp16")
    m.train_on_batch(*batch(0, 2))
    loaded.train_on_batch(*batch(0, 2))
    assert int(loaded.optimizer.iterations.numpy()) == 3
    for a, b in zip(m.trainable_variables, loaded.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)   # fp16 on the wire


def test_alltoall_single_process_eager_and_traced():
    hvd.init()
    t = tf.reshape(tf.range(6.0), (3, 2))
    assert np.array_equal(hvd.alltoall(t).numpy(), t.numpy())
    out, recv = hvd.alltoall(t, splits=[3])
    assert np.array_equal(out.numpy(), t.numpy()) and recv.numpy().tolist() == [3]
    traced = tf.function(lambda a: hvd.alltoall(a, splits=tf.constant([3]))[0] * 2)
    assert np.array_equal(traced(t).numpy(), t.numpy() * 2)
    with pytest.raises(ValueError, match="splits"):
        hvd.alltoall(t, splits=[2])


def test_sync_batchnorm_equals_batchnorm_on_concatenated_batch():
    """2 ranks, uneven batches: outputs, input gradients of the summed loss and moving stats equal BN's."""
    xs = [np.random.default_rng(r).normal(size=(3 + r, 4)).astype(np.float32) for r in range(2)]
    w = tf.range(1.0, 5.0) ** 2

    def fn(comm):
        layer = hvd.SyncBatchNormalization(comm=comm)
        x = tf.constant(xs[comm.rank])
        with tf.GradientTape() as t:
            t.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * w)
        return y.numpy(), t.gradient(loss, x).numpy(), layer.moving_mean.numpy(), layer.moving_variance.numpy()

    out = gradcomp.LocalWorld(2, timeout=120).run(fn)
    bn = keras.layers.BatchNormalization()
    x = tf.constant(np.concatenate(xs))
    with tf.GradientTape() as t:
        t.watch(x)
        y = bn(x, training=True)
        loss = tf.reduce_sum(y * w)
    np.testing.assert_allclose(np.concatenate([o[0] for o in out]), y.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.concatenate([o[1] for o in out]), t.gradient(loss, x).numpy(), atol=1e-5)
    for o in out:
        np.testing.assert_allclose(o[2], bn.moving_mean.numpy(), atol=1e-5)
        np.testing.assert_allclose(o[3], bn.moving_variance.numpy(), atol=1e-5)


def test_hvd_elastic_names_fail_with_a_clear_error():
    """Horovod's TF elastic API is not supported: each name raises on use, saying what to do instead,
    rather than a Horovod elastic script running with residuals of the old world."""
    for name in ("run", "TensorFlowKerasState", "CommitStateCallback", "UpdateEpochStateCallback"):
        with pytest.raises(NotImplementedError, match=r"does not support Horovod Elastic .*gradcomp_torch.elastic"):
            getattr(hvd.elastic, name)
    with pytest.raises(AttributeError):
        hvd.elastic.no_such_name
