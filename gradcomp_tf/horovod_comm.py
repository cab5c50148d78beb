"""HorovodTFCommunicator: gradcomp's Communicator over horovod.tensorflow's collectives.

Only for a Horovod build with TensorFlow support (Horovod 0.28.1 builds against TF <= 2.19:
mpi/build_horovod_tf.sh, in a venv of its own; not against TF 2.20+). TF payloads stay TF tensors on their device and go straight to Horovod:
  allreduce  hvd.allreduce(x, op=hvd.Sum)
  allgather  hvd.allgather of the per-rank lengths, then of the payloads; split by the lengths
  broadcast  hvd.broadcast(x, root_rank)
numpy inputs (configuration checks) are answered in numpy. Horovod's TF ops are synchronous when
called eagerly, so every Handle is already done.
"""
from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from gradcomp.comm.base import Communicator, DoneHandle


class HorovodTFCommunicator(Communicator):
    engine = "horovod-tf"
    _tf_ready = True

    def __init__(self):
        try:
            import horovod.tensorflow as hvd
        except Exception as e:
            raise RuntimeError("horovod.tensorflow is not importable; install Horovod with TensorFlow "
                               "support or use GRADCOMP_BACKEND=mpi") from e
        if not hvd.is_initialized():
            hvd.init()
        self.hvd = hvd
        self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        self._n = 0

    def _name(self, name):
        self._n += 1
        return f"gradcomp.{name or 'op'}.{self._n}"

    @staticmethod
    def _scope(x):
        """numpy inputs (configuration checks, which Keras may reach while tracing the train step in
        the optimizer's build) are answered eagerly, outside any graph being built."""
        return tf.init_scope() if isinstance(x, np.ndarray) else contextlib.nullcontext()

    @staticmethod
    def _in(x):
        if isinstance(x, np.ndarray):
            return tf.convert_to_tensor(x), True
        return tf.convert_to_tensor(x), False

    @staticmethod
    def _out(t, was_np):
        return t.numpy() if was_np else t

    def allreduce(self, x, *, name=""):
        with self._scope(x):
            t, was_np = self._in(x)
            return DoneHandle(self._out(self.hvd.allreduce(t, op=self.hvd.Sum, name=self._name(name)), was_np))

    def allgather(self, x, *, name=""):
        with self._scope(x):
            t, was_np = self._in(x)
            t = tf.reshape(t, [-1])
            n = tf.reshape(tf.cast(tf.size(t), tf.int64), [1])
            sizes = self.hvd.allgather(n, name=self._name(name + ".sizes"))
            allx = self.hvd.allgather(t, name=self._name(name))
            parts = tf.split(allx, sizes, num=self.size) if self.size > 1 else [allx]
            return DoneHandle([self._out(p, was_np) for p in parts])

    def broadcast(self, x, *, root=0, name=""):
        with self._scope(x):
            t, was_np = self._in(x)
            return DoneHandle(self._out(self.hvd.broadcast(t, root_rank=root, name=self._name(name)), was_np))
