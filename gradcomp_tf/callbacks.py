"""Keras callbacks for data-parallel model.fit with gradcomp_tf.

    callbacks = [gradcomp_tf.callbacks.BroadcastGlobalVariablesCallback(0),  # same start on every rank
                 gradcomp_tf.callbacks.MetricAverageCallback(),              # epoch logs averaged
                 gradcomp_tf.callbacks.CompressionStatsCallback(),           # bytes and ratio per epoch
                 gradcomp_tf.callbacks.LearningRateWarmupCallback(initial_lr=0.1 * size, warmup_epochs=3)]

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


def _set_lr(opt, value):
    lr = opt.learning_rate
    if callable(lr) and not hasattr(lr, "assign"):
        raise ValueError("the learning-rate callbacks set the optimizer's learning rate each batch; this optimizer "
                         "has a LearningRateSchedule. Give it a float learning rate instead")
    opt.learning_rate = float(value)


def _get_lr(opt) -> float:
    return float(np.asarray(keras.ops.convert_to_numpy(opt.learning_rate)))


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Horovod's schedule: from `start_epoch` to `end_epoch` (exclusive) the learning rate is
    `initial_lr * multiplier(epoch)` (`multiplier`: a number or a function of the epoch), set at the
    first batch of each epoch (`staircase=True`) or every batch with a fractional epoch
    (`staircase=False`; `steps_per_epoch` defaults to fit()'s). Same signature as
    horovod.tensorflow.keras.callbacks.LearningRateScheduleCallback.

    `momentum_correction` (Horovod: scale momentum by new_lr / old_lr for the batch where the rate
    changes) applies only when the optimizer's momentum is a variable; Keras 3's SGD keeps momentum
    as a Python float baked into the compiled train step, so there it has no effect.
    """

    def __init__(self, initial_lr, multiplier, start_epoch=0, end_epoch=None, staircase=True,
                 momentum_correction=True, steps_per_epoch=None, verbose=0):
        super().__init__()
        if initial_lr is None or not float(initial_lr) > 0:
            raise ValueError(f"initial_lr must be a positive learning rate, got {initial_lr!r} (Horovod's "
                             "callbacks need it given explicitly, e.g. initial_lr=0.1 * hvd.size())")
        self.initial_lr = float(initial_lr)
        self.multiplier = multiplier if callable(multiplier) else (lambda epoch, m=float(multiplier): m)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.staircase, self.momentum_correction = staircase, momentum_correction
        self.steps_per_epoch, self.verbose = steps_per_epoch, verbose
        self.current_epoch = None
        self._restore_momentum = None

    def _in_range(self, epoch):
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def _adjust(self, epoch):
        opt = self.model.optimizer
        old = _get_lr(opt)
        new = self.initial_lr * float(self.multiplier(epoch))
        _set_lr(opt, new)
        mom = getattr(opt, "momentum", None)
        if self.momentum_correction and hasattr(mom, "assign") and old > 0:
            self._restore_momentum = float(np.asarray(keras.ops.convert_to_numpy(mom)))
            mom.assign(self._restore_momentum * new / old)

    def on_train_begin(self, logs=None):
        if self.steps_per_epoch is None:
            self.steps_per_epoch = (self.params or {}).get("steps")
        if not self.staircase and not self.steps_per_epoch:
            raise ValueError("LearningRateScheduleCallback(staircase=False) needs steps_per_epoch (fit() did not "
                             "say how many steps an epoch has)")

    def on_epoch_begin(self, epoch, logs=None):
        self.current_epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.current_epoch is None or not self._in_range(self.current_epoch):
            return
        if self.staircase:
            if batch == 0:
                self._adjust(self.current_epoch)
        else:
            self._adjust(self.current_epoch + float(batch) / self.steps_per_epoch)

    def on_train_batch_end(self, batch, logs=None):
        if self._restore_momentum is not None:
            self.model.optimizer.momentum.assign(self._restore_momentum)
            self._restore_momentum = None

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = _get_lr(self.model.optimizer)


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Horovod's gradual warm-up (Goyal et al. 2017): over `warmup_epochs` the learning rate rises
    from initial_lr / size to initial_lr, per batch: lr = initial_lr / size * (e * (size - 1) /
    warmup_epochs + 1) at fractional epoch e (+ 1 / steps_per_epoch, as Horovod computes it). Same
    signature as horovod.tensorflow.keras.callbacks.LearningRateWarmupCallback."""

    def __init__(self, initial_lr, warmup_epochs=5, momentum_correction=True, steps_per_epoch=None, verbose=0,
                 backend=None):
        self.warmup_epochs, self.backend = warmup_epochs, backend

        def multiplier(epoch):
            size = _comm_of(self.model, self.backend).size
            epoch += 1.0 / self.steps_per_epoch
            return 1.0 / size * (epoch * (size - 1) / warmup_epochs + 1)
        super().__init__(initial_lr, multiplier, start_epoch=0, end_epoch=warmup_epochs, staircase=False,
                         momentum_correction=momentum_correction, steps_per_epoch=steps_per_epoch, verbose=verbose)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0 and _comm_of(self.model, self.backend).rank == 0:
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {_get_lr(self.model.optimizer):g}.")
