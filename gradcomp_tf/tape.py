"""DistributedGradientTape: a tf.GradientTape whose gradient() returns compressed, rank-averaged gradients.

    with tf.GradientTape() as tape:
        loss = loss_fn(model(x), y)
    tape = gradcomp_tf.DistributedGradientTape(tape, compressor="topk:ratio=0.01")
    grads = tape.gradient(loss, model.trainable_variables)     # averaged over ranks
    opt.apply_gradients(zip(grads, model.trainable_variables))  # a plain Keras optimizer

Works eagerly and inside tf.function (see gradcomp_tf/engine.py for what runs where). The first call
compares the configuration and the variables' names and shapes across ranks.

A new tape wraps every step, so the compressor state (residuals, step counter) lives in an
Exchange that outlives the tape: by default one shared Exchange per (compressor, memory, backend,
seed, mode, source names), kept by this module; or pass your own `exchange=gradcomp_tf.Exchange(...)`
(needed to checkpoint it: add `gradcomp_tf.GradcompState(exchange)` to tf.train.Checkpoint).

Only the default `allreduce` sync policy: a periodic policy (GRADCOMP_SYNC=localsgd, ...) acts at
the optimizer step, which the tape never sees, so it raises ValueError (use DistributedOptimizer).
Horovod's arguments: compression= (Compression objects: no error feedback; or a spec), op=Average|Sum,
gradient_predivide_factor (validated), sparse_as_dense (IndexedSlices are always densified),
num_groups (no effect), process_set (global only); device_* are ignored.

`register_local_source(var)` (and `PartialDistributedGradientTape(tape, local_layers=[...])`) keeps a
variable's gradient local: it is not exchanged, and with scale_local_gradients=True (Horovod's
default) it is divided by the number of ranks, as Horovod does; `get_local_and_global_gradients`
splits the (variable, gradient) pairs the same way.
"""
from __future__ import annotations

import tensorflow as tf

from gradcomp_tf.engine import Exchange, dense, variable_names


class DistributedGradientTape:
    """Wraps `tape`; gradient(target, sources) averages the gradients through GradientSync."""

    def __init__(self, tape, compressor=None, memory=None, backend=None, *, seed=None, exchange=None,
                 mode="auto", compression=None, op=None, gradient_predivide_factor=1.0, sparse_as_dense=False,
                 num_groups=0, groups=None, process_set=None, device_dense="", device_sparse="",
                 scale_local_gradients=True):
        from gradcomp import horovod_api as hvd_api
        compressor, memory = hvd_api.compressor_arg(compressor, compression, memory)
        self.op = hvd_api.check_op(op, gradient_predivide_factor, "DistributedGradientTape")
        hvd_api.check_process_set(process_set, "DistributedGradientTape")
        hvd_api.bucket_mb_for_groups(num_groups, groups, 1, "DistributedGradientTape")
        if not isinstance(tape, tf.GradientTape):
            raise TypeError(f"DistributedGradientTape wraps a tf.GradientTape, got {type(tape).__name__}")
        if mode not in ("auto", "graph", "island"):
            raise ValueError(f"mode must be auto, graph or island, got {mode!r}")
        self._tape = tape
        self.exchange = exchange
        self.scale_local_gradients = bool(scale_local_gradients)
        self._local_sources = set()
        self._config = (compressor, memory, backend, seed)
        self.mode = mode

    def _exchange_for(self, names):
        if self.exchange is None:
            key = tuple(_key(c) for c in self._config) + (self.mode, tuple(names))
            if key not in _SHARED:
                c, m, b, s = self._config
                ex = Exchange(c, m, b, seed=s)
                _refuse_policy(ex)
                _SHARED[key] = (ex, self._config)   # keep the objects alive
            self.exchange = _SHARED[key][0]
        else:
            _refuse_policy(self.exchange)
        return self.exchange

    def register_local_source(self, source):
        """Keep `source`'s gradient local (Horovod's name): never exchanged; divided by the number of
        ranks when scale_local_gradients is True."""
        self._local_sources.add(_ref(source))

    def __getattr__(self, item):          # watch(), stop_recording(), jacobian(), ...
        return getattr(self._tape, item)

    def __enter__(self):
        self._tape.__enter__()
        return self

    def __exit__(self, *exc):
        return self._tape.__exit__(*exc)

    @tf.autograph.experimental.do_not_convert
    def gradient(self, target, sources, output_gradients=None, unconnected_gradients=None):
        kwargs = {}
        if unconnected_gradients is not None:
            kwargs["unconnected_gradients"] = unconnected_gradients
        grads = self._tape.gradient(target, sources, output_gradients=output_gradients, **kwargs)
        flat_src = tf.nest.flatten(sources)
        flat = [dense(g) for g in tf.nest.flatten(grads, expand_composites=False)]
        local = [_ref(s) in self._local_sources for s in flat_src] if self._local_sources else [False] * len(flat)
        g_src = [s for s, lo in zip(flat_src, local) if not lo]
        g_flat = [g for g, lo in zip(flat, local) if not lo]
        names = variable_names(g_src)
        ex = self._exchange_for([n for n, g in zip(names, g_flat) if g is not None])
        g_flat = ex.average(g_flat, g_src, mode=self.mode, api="DistributedGradientTape")
        if self.op == _SUM:
            g_flat = [g if g is None else g * tf.cast(ex.comm.size, g.dtype) for g in g_flat]
        it = iter(g_flat)
        size = ex.comm.size
        out = []
        for g, lo in zip(flat, local):
            if not lo:
                out.append(next(it))
            elif g is not None and self.scale_local_gradients and size > 1:
                out.append(g / tf.cast(size, g.dtype))
            else:
                out.append(g)
        return tf.nest.pack_sequence_as(sources, out)

    def get_local_and_global_gradients(self, target, sources, output_gradients=None):
        """Horovod's helper: ([(var, grad) of local sources], [(var, grad) of the exchanged ones])."""
        grads = self.gradient(target, sources, output_gradients=output_gradients)
        pairs = list(zip(tf.nest.flatten(sources), tf.nest.flatten(grads)))
        return ([(s, g) for s, g in pairs if _ref(s) in self._local_sources],
                [(s, g) for s, g in pairs if _ref(s) not in self._local_sources])

    def stats(self) -> dict:
        if self.exchange is None:
            raise RuntimeError("no gradient() call yet: the tape has not exchanged anything")
        return self.exchange.stats()


def PartialDistributedGradientTape(gradtape, device_dense="", device_sparse="", compression=None,
                                   sparse_as_dense=False, op=None, gradient_predivide_factor=1.0, num_groups=0,
                                   groups=None, process_set=None, local_layers=None, scale_local_gradients=True,
                                   **kwargs):
    """Horovod's PartialDistributedGradientTape: a DistributedGradientTape whose `local_layers`' (a
    Keras layer or a list of them) trainable weights keep their local gradients (see
    register_local_source). Other keyword arguments (compressor=, memory=, backend=, ...) go to
    DistributedGradientTape."""
    import keras
    if local_layers is None:
        local_layers = []
    elif isinstance(local_layers, keras.layers.Layer):
        local_layers = [local_layers]
    elif not all(isinstance(layer, keras.layers.Layer) for layer in local_layers):
        raise ValueError("PartialDistributedGradientTape: local_layers must be Keras layers (a layer or a list "
                         f"of them), got {[type(layer).__name__ for layer in local_layers]}")
    tape = DistributedGradientTape(gradtape, compression=compression, op=op,
                                   gradient_predivide_factor=gradient_predivide_factor,
                                   sparse_as_dense=sparse_as_dense, num_groups=num_groups, groups=groups,
                                   process_set=process_set, device_dense=device_dense, device_sparse=device_sparse,
                                   scale_local_gradients=scale_local_gradients, **kwargs)
    for layer in local_layers:
        for v in layer.trainable_weights:
            tape.register_local_source(v)
    return tape


def _ref(v):
    """A hashable identity for a variable (Keras 3 variables and tf.Variables alike)."""
    if not hasattr(v, "ref"):
        inner = getattr(v, "_value", None)
        if isinstance(inner, tf.Variable):      # keras.Variable wraps a tf.Variable on the TF backend
            v = inner
    return v.ref() if hasattr(v, "ref") else id(v)


_SHARED: dict = {}
_SUM = 1          # gradcomp.horovod_api.Sum


def _refuse_policy(ex):
    """The tape sees gradients only, never the optimizer step: a sync policy that acts around the
    step (localsgd, slowmo, da: parameter averaging in after_step) would silently never run."""
    from gradcomp.sync.base import SyncPolicy
    pol = ex.policy
    if any(getattr(type(pol), m) is not getattr(SyncPolicy, m) for m in ("sync_gradients", "before_step",
                                                                          "after_step")):
        raise ValueError(
            f"DistributedGradientTape cannot run sync policy {pol.spec()!r} (GRADCOMP_SYNC or the exchange's "
            "sync=): the tape only sees gradients, never the optimizer step, so the parameters would never be "
            "averaged. Use gradcomp_tf.DistributedOptimizer (it runs every sync policy), or unset GRADCOMP_SYNC "
            "(allreduce) for the tape")


def _key(x):
    return x if x is None or isinstance(x, (str, int)) else ("id", id(x))


def reset_shared():
    """Forget the shared Exchanges (tests; after changing the model)."""
    _SHARED.clear()
