"""gradcomp_tf.Compression objects inside Horovod's own TensorFlow DistributedGradientTape and
DistributedOptimizer (a tf.compat.v1 optimizer, and horovod.tensorflow.keras's wrapper around a Keras 3
optimizer in model.fit) (Horovod 0.28.1 built against TF 2.19 by mpi/build_horovod_tf.sh), under
horovodrun -np 2. Each run with gradcomp's Compression.<name> must be bit-identical to the same run
with Horovod's own compression (fp16 vs hvd.Compression.fp16, none vs hvd.Compression.none), and
bf16 is refused by Horovod 0.28.1's TF allreduce itself (no bfloat16 kernel: a TypeError).
Prints CHECK lines for tests/test_horovod_tf_native.py."""
import numpy as np
import tensorflow as tf

import horovod.tensorflow as hvd

import gradcomp_tf

hvd.init()
R = hvd.rank()


def report(name, ok, extra=""):
    if R == 0:
        print(f"CHECK {name} {'PASS' if ok else 'FAIL'} {extra}", flush=True)


def data(step):
    rng = np.random.default_rng(100 * R + step)
    return rng.normal(size=(16, 6)).astype(np.float32), rng.normal(size=(16, 3)).astype(np.float32)


def fresh():
    rng = np.random.default_rng(0)
    return [tf.Variable(rng.normal(size=(6, 5)).astype(np.float32)), tf.Variable(np.zeros(5, np.float32)),
            tf.Variable(rng.normal(size=(5, 3)).astype(np.float32))]


def loss_fn(v, x, y):
    return tf.reduce_mean((tf.tanh(x @ v[0] + v[1]) @ v[2] - y) ** 2)


def tape_run(compression, steps=4):
    v = fresh()
    for s in range(steps):
        x, y = data(s)
        with tf.GradientTape() as t:
            loss = loss_fn(v, x, y)
        t = hvd.DistributedGradientTape(t, compression=compression)
        for var, g in zip(v, t.gradient(loss, v)):
            var.assign_sub(0.1 * g)
    return [w.numpy() for w in v]


def tape_grads(compression):
    v = fresh()
    x, y = data(0)
    with tf.GradientTape() as t:
        loss = loss_fn(v, x, y)
    t = hvd.DistributedGradientTape(t, compression=compression)
    return [g.numpy() for g in t.gradient(loss, v)]


def v1_optimizer_run(compression, steps=4):
    v = fresh()
    opt = hvd.DistributedOptimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1), compression=compression)
    for s in range(steps):
        x, y = data(s)
        opt.minimize(lambda: loss_fn(v, x, y), var_list=v)
    return [w.numpy() for w in v]


def same(a, b):
    return all(np.array_equal(p, q) for p, q in zip(a, b))


def equal_on_ranks(ws):
    flat = np.concatenate([w.ravel() for w in ws])
    g = hvd.allgather(tf.constant(flat[None])).numpy()
    return bool(np.abs(g - g[0]).max() == 0)


ours, theirs = tape_run(gradcomp_tf.Compression.fp16), tape_run(hvd.Compression.fp16)
report("tape_fp16_bit_identical", same(ours, theirs) and equal_on_ranks(ours))
report("tape_fp16_differs_from_fp32", not same(ours, tape_run(hvd.Compression.none)))
report("tape_none_bit_identical", same(tape_run(gradcomp_tf.Compression.none), tape_run(hvd.Compression.none)))
try:                      # Horovod 0.28.1's TF allreduce has no bfloat16 kernel: its own TypeError
    tape_grads(gradcomp_tf.Compression.bf16)
    report("tape_bf16_refused_by_horovod", False, "bf16 ran: Horovod's TF ops now reduce bfloat16")
except TypeError as e:
    report("tape_bf16_refused_by_horovod", "bfloat16" in str(e), str(e).strip().splitlines()[-1][:100])
ours, theirs = v1_optimizer_run(gradcomp_tf.Compression.fp16), v1_optimizer_run(hvd.Compression.fp16)
report("optimizer_fp16_bit_identical", same(ours, theirs) and equal_on_ranks(ours))


def keras_run(compression):
    import keras
    import horovod.tensorflow.keras as hvdk
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
    opt = hvdk.DistributedOptimizer(keras.optimizers.SGD(0.1), compression=compression)
    m.compile(optimizer=opt, loss="mse")
    x, y = data(0)
    m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    return [w.numpy() for w in m.trainable_variables]


ours, theirs = keras_run(gradcomp_tf.Compression.fp16), keras_run(hvd.Compression.fp16)
report("keras_fp16_same_as_horovods", same(ours, theirs))
eq = equal_on_ranks(ours)
if R == 0:     # Horovod's own Keras wrapper under Keras 3: does it average at all? (a fact about Horovod)
    print(f"INFO keras_wrapper_ranks_equal={eq}", flush=True)
try:
    gradcomp_tf.Compression.get("topk:ratio=0.1")
    report("topk_refused", False, "topk was accepted as a Horovod Compression")
except ValueError as e:
    report("topk_refused", "DistributedGradientTape" in str(e), str(e).splitlines()[0][:100])
print(f"RANK {R} done", flush=True)
