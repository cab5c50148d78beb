"""DistributedOptimizer: a Keras 3 optimizer whose gradients are averaged through GradientSync.

    opt = gradcomp_tf.DistributedOptimizer(keras.optimizers.SGD(0.1), compressor="topk:ratio=0.01")
    model.compile(optimizer=opt, loss=..., jit_compile=False)
    model.fit(..., callbacks=[gradcomp_tf.callbacks.BroadcastGlobalVariablesCallback(0)])

The returned object is an instance of a subclass of the wrapped optimizer's own class (built
from its get_config(), like Horovod's wrapper), so Keras treats it as that optimizer; a saved
.keras model reloads as the plain optimizer. Per update step, inside Keras 3's
`apply()` -> `_backend_apply_gradients()`:

    grads (after loss-scale unscaling and gradient accumulation, before clipping and weight decay)
      -> policy.sync_gradients(step)? -> GradientSync: compress, fused collective, decode, average
      -> policy.before_step -> clip -> weight decay -> the inner update_step -> policy.after_step

Without accumulation the rest of the step depends on the averaged gradients, so a step refused with
NonFiniteGradientError changes no variable (Keras' `iterations` included), eagerly or traced.

`backward_passes_per_step=N` uses Keras' own `gradient_accumulation_steps=N`: N local passes are
averaged, and only every N-th apply() communicates. With `model.compile(jit_compile=True)` Keras
XLA-compiles the whole train step including this optimizer; XLA cannot run the host transport
call, so the first step raises a RuntimeError that says to compile with jit_compile=False (Keras'
default "auto" resolves to True when a GPU is visible and all layers support XLA, to False on
CPU-only machines and under tf.distribute). A custom loop can keep XLA for the forward/backward
pass: compute the gradients in a tf.function(jit_compile=True) and average them with
`Exchange.average` from the surrounding plain tf.function. The compressor state is tracked by
tf.train.Checkpoint through the optimizer (`gradcomp_state`; per rank, see checkpoint.py).
At the end of `model.fit` Keras calls the optimizer's `finalize_variable_values` on every rank; there a
periodic sync policy (local SGD) that left the ranks apart synchronizes them (gradcomp_finalize).
"""
from __future__ import annotations

import warnings

import keras
import tensorflow as tf

from gradcomp.momentum import hand_over, owners, refuse
from gradcomp_tf.checkpoint import GradcompState
from gradcomp_tf.engine import Exchange, dense, variable_names
from gradcomp_tf.sync_view import KerasParamView


class _DistributedMixin:
    """Hooks placed in front of a Keras 3 optimizer class (see module docstring)."""

    def _gc_setup(self, exchange, bpps, mode, scale=1.0):
        self.gradcomp_exchange = exchange
        self.gradcomp_state = GradcompState(exchange)
        self._gc_bpps, self._gc_mode = bpps, mode
        self._gc_scale = float(scale)      # op=Sum / average_aggregated_gradients=False (Horovod's)

    def build(self, variables):
        super().build(variables)
        ex = self.gradcomp_exchange
        names = variable_names(variables)
        ex.view = KerasParamView(self, list(variables), names)
        ex.check(names, [tuple(v.shape) for v in variables],
                 {"api": "DistributedOptimizer", "optimizer": type(self).__name__,
                  "backward_passes_per_step": self._gc_bpps})
        saved = getattr(self, "_gc_restore", None)       # gradcomp_tf.load_model's saved values
        if saved is not None:
            self._gc_restore = None
            saved.apply(self.variables)

    def finalize_variable_values(self, var_list):
        """Keras' end-of-training hook (model.fit calls it on every rank after the last epoch): a
        periodic sync policy that left the ranks apart synchronizes here, so the model fit returns,
        and saves, is the averaged one. Eager only; a no-op for the default allreduce policy."""
        if tf.executing_eagerly() and self.gradcomp_exchange.view is not None:
            self.gradcomp_finalize()
        return super().finalize_variable_values(var_list)

    def _backend_apply_gradients(self, grads, trainable_variables):
        ex = self.gradcomp_exchange        # (a list attribute on a Keras optimizer would be tracked)
        if not self.gradient_accumulation_steps:
            # Average first, and make every later op of the step (the update, EMA, and Keras'
            # iteration counter) depend on the result: a step the exchange refuses (NaN/Inf on any
            # rank) then changes no variable, not even `iterations`, also inside tf.function.
            # (With accumulation the average runs in Keras' update branch, via _clip_gradients.)
            grads = self.gradcomp_average(grads, trainable_variables)
            if tf.executing_eagerly():
                return super()._backend_apply_gradients(grads, trainable_variables)
            with tf.control_dependencies([g for g in grads if g is not None]):
                # apply() increments `iterations` after this method returns; automatic control
                # dependencies order that after this no-op on the same variable, hence after the exchange
                self._iterations.assign_add(0)
                return super()._backend_apply_gradients(grads, trainable_variables)
        ex.active_vars = list(trainable_variables)
        try:
            return super()._backend_apply_gradients(grads, trainable_variables)
        finally:
            ex.active_vars = None

    def _clip_gradients(self, grads):
        variables = self.gradcomp_exchange.active_vars
        if variables is not None:           # once per update step, before clipping / weight decay
            grads = self.gradcomp_average(grads, variables)
        return super()._clip_gradients(grads)

    def gradcomp_average(self, grads, variables):
        """Average `grads` of `variables` across ranks now (eager or traced)."""
        ex = self.gradcomp_exchange
        names = variable_names(variables)
        if ex.view is not None:                # the build-time names, by variable identity
            by_id = {id(v): n for n, v in ex.view.items()}
            names = [by_id.get(id(v), n) for v, n in zip(variables, names)]
        grads = [dense(g) for g in grads]
        out = ex(list(grads), names, mode=self._gc_mode)
        scale = getattr(self, "_gc_scale", 1.0)
        return out if scale == 1.0 else [g if g is None else g * tf.cast(scale, g.dtype) for g in out]

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        super()._backend_update_step(grads, trainable_variables, learning_rate)
        self.gradcomp_exchange.after_step(trainable_variables)

    def gradcomp_stats(self) -> dict:
        """bytes_sent, bytes_dense, ratio and steps of this optimizer's exchange so far, `policy` (the
        sync policy's own counters and bytes) and bytes_sent_total."""
        return self.gradcomp_exchange.stats()

    def gradcomp_finalize(self) -> bool:
        """End of training, on every rank (eager): synchronize the parameters if the sync policy left
        them apart (local SGD not ending on a sync step), so a saved model is the averaged one."""
        return self.gradcomp_exchange.finalize()


def DistributedOptimizer(optimizer, compressor=None, memory=None, backend=None, backward_passes_per_step=1,
                         sync=None, *, seed=None, mode="auto", compression=None, op=None,
                         gradient_predivide_factor=1.0, average_aggregated_gradients=None, sparse_as_dense=False,
                         num_groups=0, groups=None, process_set=None, name=None, use_locking=False,
                         device_dense="", device_sparse="", scale_local_gradients=True):
    """Wrap a Keras 3 optimizer; compressor/memory/sync take spec strings, objects or None (= environment).

    backend: None (the process-wide transport, GRADCOMP_BACKEND), a name or a Communicator.
    mode: "auto" | "graph" | "island": how the exchange runs inside tf.function (engine.py).
    Horovod's arguments (gradcomp/horovod_api.py): `compression=` (Horovod's or gradcomp's Compression
    objects: no error feedback; or a spec), `op=` Average | Sum (Adasum raises),
    `gradient_predivide_factor` (validated; the result is the average either way),
    `average_aggregated_gradients`: with backward_passes_per_step > 1, True or None average the passes
    (Keras' own accumulation), False sums them (Horovod's default is False: pass it explicitly for
    Horovod's numbers). `sparse_as_dense`: IndexedSlices are always densified. `num_groups`/`groups=<int>`:
    accepted, no effect (the TF exchange fuses each step into one collective per payload dtype); lists
    of variables and process sets other than the global one raise. name/use_locking/device_*/
    scale_local_gradients are accepted and ignored.
    """
    from gradcomp import horovod_api as hvd_api
    compressor, memory = hvd_api.compressor_arg(compressor, compression, memory)
    op = hvd_api.check_op(op, gradient_predivide_factor)
    hvd_api.check_process_set(process_set)
    hvd_api.bucket_mb_for_groups(num_groups, groups, 1)
    if average_aggregated_gradients not in (None, True, False):
        raise ValueError("average_aggregated_gradients must be True, False or None, got "
                         f"{average_aggregated_gradients!r}")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"DistributedOptimizer wraps a Keras 3 optimizer (keras.optimizers.Optimizer), got "
                        f"{type(optimizer).__name__}; for a custom loop use gradcomp_tf.DistributedGradientTape")
    if isinstance(optimizer, _DistributedMixin):
        raise ValueError("this optimizer is already a gradcomp_tf.DistributedOptimizer")
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError("keras.optimizers.LossScaleOptimizer is not supported: it skips a step on each rank "
                         "whose own gradients overflow, so ranks would stop exchanging in step. Train in "
                         "float32/bfloat16 (no loss scaling needed), or scale the loss yourself: gradcomp raises "
                         "NonFiniteGradientError on every rank together when any rank overflows.")
    if getattr(optimizer, "built", False):
        raise ValueError("the optimizer was already used (its variables exist); wrap it with "
                         "gradcomp_tf.DistributedOptimizer before model.compile/the first step")
    try:
        bpps = int(backward_passes_per_step)
    except (TypeError, ValueError):
        bpps = 0
    if bpps < 1 or bpps != backward_passes_per_step:
        raise ValueError(f"backward_passes_per_step must be an integer >= 1, got {backward_passes_per_step!r}")
    if mode not in ("auto", "graph", "island"):
        raise ValueError(f"mode must be auto, graph or island, got {mode!r}")
    config = optimizer.get_config()
    if bpps > 1:
        own = config.get("gradient_accumulation_steps")
        if own not in (None, bpps):
            raise ValueError(f"the optimizer already accumulates {own} steps; pass backward_passes_per_step={own} "
                             "or leave gradient_accumulation_steps unset")
        config["gradient_accumulation_steps"] = bpps
    base = type(optimizer)
    exchange = Exchange(compressor, memory, backend, sync=sync, seed=seed)
    _take_over_momentum(config, base, exchange)
    cls = type(base.__name__, (_DistributedMixin, base),
               {"__module__": base.__module__, "__qualname__": base.__qualname__,
                "__doc__": f"gradcomp_tf.DistributedOptimizer over {base.__name__}."})
    if op == hvd_api.Sum and not exchange.policy.synchronous:
        raise ValueError(f"op=Sum needs gradients reduced every step; sync policy {exchange.policy.spec()!r} takes "
                         "local steps. Use op=Average (the default) with it")
    scale = (exchange.comm.size if op == hvd_api.Sum else 1) * (bpps if average_aggregated_gradients is False else 1)
    opt = cls.from_config(config)
    opt._gc_setup(exchange, bpps, mode, scale)
    return opt


def _take_over_momentum(config, base, exchange):
    """A method that implements momentum (dgc, gmc, signum) takes SGD's over (gradcomp/momentum.py).

    Keras' weight decay is decoupled (w -= lr * wd * w after the update, never with momentum), so
    it is left as it is."""
    if not owners(exchange.sync):
        return
    if not issubclass(base, keras.optimizers.SGD):
        refuse(exchange.sync, base.__name__)
    m = float(config.get("momentum", 0.0) or 0.0)
    msg = hand_over(exchange.sync, [(None, m, bool(config.get("nesterov", False)), 0.0)], base.__name__)
    if msg is None:
        return
    config["momentum"], config["nesterov"] = 0.0, False
    if exchange.comm.rank == 0:
        warnings.warn(msg, stacklevel=3)
