"""Horovod's examples/tensorflow2/tensorflow2_mnist.py, shape for shape, with only its import changed
to gradcomp_tf. Offline CPU changes: synthetic MNIST-shaped data, 8 steps, no GPU pinning; Keras 3's
`opt.variables` property instead of TF 2.x's `opt.variables()`."""
import numpy as np
import tensorflow as tf

import gradcomp_tf as hvd          # was: import horovod.tensorflow as hvd

# Initialize Horovod
hvd.init()

rng = np.random.default_rng(hvd.rank())
mnist_images = rng.integers(0, 255, size=(128, 28, 28)).astype(np.uint8)
mnist_labels = rng.integers(0, 10, 128).astype(np.int64)

dataset = tf.data.Dataset.from_tensor_slices(
    (tf.cast(mnist_images[..., tf.newaxis] / 255.0, tf.float32),
     tf.cast(mnist_labels, tf.int64))
)
dataset = dataset.repeat().shuffle(64).batch(16)

mnist_model = tf.keras.Sequential([
    tf.keras.layers.Conv2D(8, [3, 3], activation='relu'),
    tf.keras.layers.MaxPooling2D(pool_size=(4, 4)),
    tf.keras.layers.Dropout(0.25),
    tf.keras.layers.Flatten(),
    tf.keras.layers.Dense(16, activation='relu'),
    tf.keras.layers.Dense(10, activation='softmax')
])
loss = tf.losses.SparseCategoricalCrossentropy()

# Horovod: adjust learning rate based on number of GPUs.
opt = tf.optimizers.Adam(0.001 * hvd.size())

checkpoint_dir = './checkpoints'


@tf.function
def training_step(images, labels, first_batch):
    with tf.GradientTape() as tape:
        probs = mnist_model(images, training=True)
        loss_value = loss(labels, probs)

    # Horovod: add Horovod Distributed GradientTape.
    tape = hvd.DistributedGradientTape(tape)

    grads = tape.gradient(loss_value, mnist_model.trainable_variables)
    opt.apply_gradients(zip(grads, mnist_model.trainable_variables))

    # Horovod: broadcast initial variable states from rank 0 to all other processes.
    if first_batch:
        hvd.broadcast_variables(mnist_model.variables, root_rank=0)
        hvd.broadcast_variables(opt.variables, root_rank=0)

    return loss_value


# Horovod: adjust number of steps based on number of GPUs.
for batch, (images, labels) in enumerate(dataset.take(16 // hvd.size())):
    loss_value = training_step(images, labels, batch == 0)

    if batch % 4 == 0 and hvd.rank() == 0:
        print('Step #%d\tLoss: %.6f' % (batch, loss_value))
