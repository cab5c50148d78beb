"""Horovod's examples/tensorflow2/tensorflow2_mnist.py (custom loop, DistributedGradientTape) and
tensorflow2_keras_mnist.py (model.fit with the callbacks), shape for shape, with only the import
changed to gradcomp_tf (plus synthetic data, tiny sizes, and Keras 3's `opt.variables` property
instead of TF 2.x's `opt.variables()`). Prints CHECK lines for tests/test_horovod_dropin.py."""
import numpy as np
import tensorflow as tf

import gradcomp_tf as hvd          # was: import horovod.tensorflow as hvd / horovod.tensorflow.keras as hvd

hvd.init()
rng = np.random.default_rng(hvd.rank())
x = rng.normal(size=(128, 12, 12, 1)).astype(np.float32)
y = rng.integers(0, 10, 128).astype(np.int64)


def make_model():
    return tf.keras.Sequential([
        tf.keras.layers.Conv2D(4, [3, 3], activation='relu'), tf.keras.layers.MaxPooling2D(pool_size=(2, 2)),
        tf.keras.layers.Flatten(), tf.keras.layers.Dense(10, activation='softmax')])


def equal_on_ranks(model):
    flat = np.concatenate([v.numpy().ravel() for v in model.variables])
    g = hvd.allgather(tf.constant(flat[None])).numpy()
    return g.shape[0] == hvd.size() and bool(np.abs(g - g[0]).max() == 0)


def report(name, ok, extra=""):
    if hvd.rank() == 0:
        print(f"CHECK {name} {'PASS' if ok else 'FAIL'} {extra}")


# ---------------------------------------------------------------- tensorflow2_mnist.py
dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().shuffle(64).batch(16)
mnist_model = make_model()
loss = tf.losses.SparseCategoricalCrossentropy()
opt = tf.optimizers.Adam(0.001 * hvd.size())


@tf.function
def training_step(images, labels, first_batch):
    with tf.GradientTape() as tape:
        probs = mnist_model(images, training=True)
        loss_value = loss(labels, probs)
    tape = hvd.DistributedGradientTape(tape, compression=hvd.Compression.fp16)
    grads = tape.gradient(loss_value, mnist_model.trainable_variables)
    opt.apply_gradients(zip(grads, mnist_model.trainable_variables))
    if first_batch:
        hvd.broadcast_variables(mnist_model.variables, root_rank=0)
        hvd.broadcast_variables(opt.variables, root_rank=0)
    return loss_value


for batch, (images, labels) in enumerate(dataset.take(8)):
    loss_value = training_step(images, labels, batch == 0)
    if batch % 4 == 0 and hvd.local_rank() == 0:
        print('Step #%d\tLoss: %.6f' % (batch, loss_value))
report("tape_params_equal", equal_on_ranks(mnist_model))
avg = float(hvd.allreduce(tf.constant(float(hvd.rank()))))
report("allreduce_scalar", avg == (hvd.size() - 1) / 2, avg)

# ---------------------------------------------------------------- tensorflow2_keras_mnist.py
model = make_model()
scaled_lr = 0.001 * hvd.size()
opt = hvd.DistributedOptimizer(tf.optimizers.Adam(scaled_lr), compression=hvd.Compression.fp16)
model.compile(loss=tf.losses.SparseCategoricalCrossentropy(), optimizer=opt, metrics=['accuracy'])
callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0), hvd.callbacks.MetricAverageCallback(),
             hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=2, verbose=1)]
hist = model.fit(dataset, steps_per_epoch=4, callbacks=callbacks, epochs=2, verbose=0)
report("keras_params_equal", equal_on_ranks(model))
lr = hist.history["lr"]
want = [scaled_lr / hvd.size() * ((1.0) * (hvd.size() - 1) / 2 + 1), scaled_lr]   # last batch of each epoch
report("keras_warmup_lr", np.allclose(lr, want, rtol=1e-5), lr)
losses = hvd.allgather(tf.constant([hist.history["loss"][-1]])).numpy()
report("keras_metric_average", bool(np.all(losses == losses[0])), losses)
