"""load_model: Horovod's `hvd.load_model` for Keras 3 -- a saved model whose optimizer comes back wrapped.

    model = gradcomp_tf.load_model("ckpt-5.keras")                       # compression / compressor= too
    model = gradcomp_tf.load_model(path, compression=gradcomp_tf.Compression.fp16)

keras.models.load_model restores the model, its compile arguments and its optimizer (class, config,
variables). The optimizer is then replaced by `gradcomp_tf.DistributedOptimizer` over a fresh optimizer
of the same class and config, the model is compiled again with the saved compile arguments
(jit_compile=False: the exchange is a host call, see optimizer.py), and the saved optimizer variables
(iterations, slots) are copied into the new one when Keras builds it -- at the first step, as for a
freshly compiled model, so a script that loads on rank 0 only (Horovod's resume idiom, followed by
BroadcastGlobalVariablesCallback) issues its collectives in the same order as the other ranks.
gradcomp's own state (residuals, step counter) is not part of a .keras file: it starts afresh (restore it
with tf.train.Checkpoint and GradcompState when it matters). `custom_optimizers` (Horovod's argument:
optimizer classes the file refers to) are added to `custom_objects`. A model saved without an
optimizer comes back as keras.models.load_model gives it.
"""
from __future__ import annotations

import keras


def load_model(filepath, custom_optimizers=None, custom_objects=None, compression=None, **kwargs):
    """Load a Keras model and wrap its optimizer in gradcomp_tf.DistributedOptimizer (module docstring).

    `compression=` and any DistributedOptimizer keyword (compressor=, memory=, sync=, backend=, op=, ...)
    are passed on."""
    from gradcomp_tf.optimizer import DistributedOptimizer, _DistributedMixin
    objects = dict(custom_objects or {})
    for cls in custom_optimizers or []:
        objects[cls.__name__] = cls
    model = keras.models.load_model(filepath, custom_objects=objects or None)
    old = getattr(model, "optimizer", None)
    if old is None or not getattr(model, "compiled", False):
        return model
    if isinstance(old, _DistributedMixin):
        raise ValueError("load_model: the file's optimizer is already a gradcomp_tf.DistributedOptimizer")
    saved = [v.numpy() for v in old.variables] if getattr(old, "built", False) else None
    fresh = type(old).from_config(old.get_config())
    opt = DistributedOptimizer(fresh, compression=compression, **kwargs)
    cfg = dict(getattr(getattr(model, "_compile_config", None), "config", None) or {})
    cfg = {k: v for k, v in cfg.items() if k in ("loss", "loss_weights", "metrics", "weighted_metrics",
                                                 "run_eagerly", "steps_per_execution")}
    model.compile(optimizer=opt, jit_compile=False, **cfg)
    if saved is not None:
        opt._gc_restore = _Saved(saved, filepath)
    return model


class _Saved:
    """The loaded optimizer's variable values, applied by the DistributedOptimizer's build()."""

    def __init__(self, values, where):
        self.values, self.where = values, where

    def apply(self, variables):
        got = [tuple(v.shape) for v in variables]
        want = [tuple(a.shape) for a in self.values]
        if got != want:
            raise ValueError(f"load_model({self.where!r}): the saved optimizer has {len(want)} variables "
                             f"{want[:6]}..., the new one {len(got)} {got[:6]}... (a gradcomp compressor that "
                             "takes over SGD's momentum changes them); load with the compressor the file was "
                             "trained with, or rebuild the optimizer yourself")
        import tensorflow as tf
        with tf.init_scope():              # build() may run while Keras traces the train step: assign once, now
            for v, a in zip(variables, self.values):
                v.assign(a)
