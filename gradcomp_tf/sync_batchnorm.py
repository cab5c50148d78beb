"""SyncBatchNormalization: Keras BatchNormalization whose training-mode batch statistics are those of
the union of all ranks' batches (Horovod's `hvd.SyncBatchNormalization`).

Ours: one differentiable Sum allreduce of [per-channel sum, per-channel sum of squares, count] per
forward pass (its gradient is the Sum allreduce of the upstream gradient); inference mode or one rank
is keras.layers.BatchNormalization unchanged.
The variance is E[x^2] - E[x]^2 (one collective, clamped at 0): less exact than a two-pass variance when
the mean is large against the spread. `comm=` picks a communicator (default: gradcomp_tf.init()'s).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from gradcomp import horovod_api as _api
from gradcomp_tf import runtime
from gradcomp_tf.collectives import _host_call


def _sum_allreduce(comm, t):
    @tf.custom_gradient
    def f(x):
        def grad(dy):
            return _host_call(lambda a: _api.allreduce(comm, a, op=_api.Sum, name="syncbn.grad"), dy,
                              "gradcomp_syncbn_grad")
        return _host_call(lambda a: _api.allreduce(comm, a, op=_api.Sum, name="syncbn"), x,
                          "gradcomp_syncbn"), grad
    return f(t)


class SyncBatchNormalization(keras.layers.BatchNormalization):
    def __init__(self, *args, comm=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._gradcomp_comm = comm

    def _moments(self, inputs, mask):
        comm = runtime.resolve(self._gradcomp_comm)
        if comm.size == 1 or mask is not None:
            return super()._moments(inputs, mask)
        axes = [i for i in range(len(inputs.shape)) if i != self.axis % len(inputs.shape)]
        n = tf.cast(tf.reduce_prod(tf.gather(tf.shape(inputs), axes)), inputs.dtype)
        s = tf.reduce_sum(inputs, axis=axes)
        sq = tf.reduce_sum(tf.square(inputs), axis=axes)
        tot = _sum_allreduce(comm, tf.concat([s, sq, n[None]], 0))
        c = tf.shape(s)[0]
        count = tot[2 * c]
        mean = tot[:c] / count
        var = tf.maximum(tot[c:2 * c] / count - tf.square(mean), 0.0)
        return mean, var
