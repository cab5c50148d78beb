"""Keras callbacks for data-parallel model.fit with gradcomp_tf.

    callbacks = [gradcomp_tf.callbacks.BroadcastGlobalVariablesCallback(0),  # same start on every rank
                 gradcomp_tf.callbacks.MetricAverageCallback(),              # epoch logs averaged
                 gradcomp_tf.callbacks.CompressionStatsCallback()]           # bytes and ratio per epoch

Put MetricAverageCallback before callbacks that read the logs (ModelCheckpoint, CSVLogger,
EarlyStopping) so they see the averaged values. All ranks must use the same callbacks: each one
issues collectives.
"""
from __future__ import annotations

import numpy as np
import keras

from gradcomp_tf import runtime
from gradcomp_tf.broadcast import broadcast_exchange_state, broadcast_variables


def _comm_of(model, backend):
    opt = getattr(model, "optimizer", None)
    ex = getattr(opt, "gradcomp_exchange", None)
    if backend is None and ex is not None:
        return ex.comm
    return runtime.resolve(backend)


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Broadcast the model's variables, the optimizer's state and gradcomp's replicated state (step
    counters, shared compressor state; residuals stay per rank) from `root_rank` before training.

    If the model is built when fit() starts, the optimizer is built too and both are broadcast before
    the first step; otherwise (a subclassed model built by its first call) right after the first
    batch, as Horovod does.
    """

    def __init__(self, root_rank: int = 0, backend=None):
        super().__init__()
        self.root_rank, self.backend, self.done = int(root_rank), backend, False

    def _broadcast(self):
        comm = _comm_of(self.model, self.backend)
        broadcast_variables(self.model.variables, self.root_rank, backend=comm)
        opt = getattr(self.model, "optimizer", None)
        if opt is not None and getattr(opt, "built", False):
            broadcast_variables(opt.variables, self.root_rank, backend=comm)
        ex = getattr(opt, "gradcomp_exchange", None)
        if ex is not None:                  # gradcomp's replicated state too (step, shared state)
            broadcast_exchange_state(ex, self.root_rank)
        self.done = True

    def on_train_begin(self, logs=None):
        if self.done or not self.model.built:
            return
        opt = getattr(self.model, "optimizer", None)
        if opt is not None and not opt.built:
            opt.build(self.model.trainable_variables)
        self._broadcast()

    def on_train_batch_end(self, batch, logs=None):
        if not self.done:
            self._broadcast()


class MetricAverageCallback(keras.callbacks.Callback):
    """Replace every numeric epoch log (loss, accuracy, val_*) by its mean over ranks (one allreduce)."""

    def __init__(self, backend=None):
        super().__init__()
        self.backend = backend

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        comm = _comm_of(self.model, self.backend)
        if comm.size == 1:
            return
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float, np.floating, np.integer))
                      or (hasattr(v, "shape") and tuple(getattr(v, "shape", (1,))) == ()))
        vals = np.array([float(logs[k]) for k in keys] + [float(len(keys))], np.float64)
        tot = np.asarray(comm.allreduce(vals, name="metric-average").wait(), np.float64)
        if tot[-1] != len(keys) * comm.size:
            raise RuntimeError(f"MetricAverageCallback: ranks report different metrics (this rank: {keys}); "
                               "compile every rank's model with the same metrics")
        for k, v in zip(keys, tot[:-1] / comm.size):
            logs[k] = float(v)


class CompressionStatsCallback(keras.callbacks.Callback):
    """Per epoch: this rank's bytes sent, the dense fp32 equivalent and the compression ratio.

    Adds `gradcomp_bytes_sent`, `gradcomp_bytes_dense` and `gradcomp_ratio` to the epoch logs (so
    History keeps them) and prints one line on rank 0 when verbose.
    """

    def __init__(self, optimizer=None, verbose: int = 1, print_fn=print):
        super().__init__()
        self.optimizer, self.verbose, self.print_fn = optimizer, verbose, print_fn
        self._start = None
        self.history = []

    def _stats(self):
        opt = self.optimizer if self.optimizer is not None else getattr(self.model, "optimizer", None)
        ex = getattr(opt, "gradcomp_exchange", None)
        if ex is None:
            raise ValueError("CompressionStatsCallback needs a gradcomp_tf.DistributedOptimizer "
                             "(model.compile(optimizer=gradcomp_tf.DistributedOptimizer(...)))")
        return ex, ex.stats()

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._stats()[1]

    def on_epoch_end(self, epoch, logs=None):
        ex, now = self._stats()
        start = self._start or {"bytes_sent": 0, "bytes_dense": 0, "steps": 0}
        sent = now["bytes_sent"] - start["bytes_sent"]
        dense = now["bytes_dense"] - start["bytes_dense"]
        ratio = dense / sent if sent else float("nan")
        rec = {"epoch": epoch, "bytes_sent": sent, "bytes_dense": dense, "ratio": ratio,
               "steps": now["steps"] - start["steps"]}
        self.history.append(rec)
        if logs is not None:
            logs.update(gradcomp_bytes_sent=float(sent), gradcomp_bytes_dense=float(dense),
                        gradcomp_ratio=float(ratio))
        if self.verbose and ex.comm.rank == 0:
            self.print_fn(f"[gradcomp] epoch {epoch + 1}: {ex.sync.compressor.spec()} sent "
                          f"{sent / 2**20:.3f} MiB vs dense {dense / 2**20:.3f} MiB per rank "
                          f"(ratio {ratio:.1f}x, {rec['steps']} exchanges)")
