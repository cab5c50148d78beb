"""broadcast_variables: make every rank's variables equal to root's (one fused broadcast per dtype).

    gradcomp_tf.broadcast_variables(model.variables, root_rank=0)
    gradcomp_tf.broadcast_variables(optimizer.variables, root_rank=0)   # after optimizer.build(...)
    gradcomp_tf.broadcast_exchange_state(optimizer.gradcomp_exchange, root_rank=0)   # gradcomp's own

Eagerly the values travel as host arrays through the transport and are assigned in place; inside a
tf.function the same runs in one tf.py_function (ordered after the variables' earlier updates).

The module itself is callable: `gradcomp_tf.broadcast(tensor, root_rank=0)` is Horovod's tensor
broadcast (gradcomp_tf.collectives.broadcast).
"""
from __future__ import annotations

import sys
import types

import numpy as np
import tensorflow as tf

from gradcomp_tf import runtime


def _bcast_eager(variables, root_rank, comm):
    groups: dict[str, list] = {}
    for v in variables:
        groups.setdefault(tf.as_dtype(v.dtype).name, []).append(v)
    for dt, vs in sorted(groups.items()):
        flat = np.concatenate([np.asarray(tf.convert_to_tensor(v).numpy()).reshape(-1) for v in vs])
        if tf.as_dtype(dt) == tf.bool:
            flat = flat.astype(np.uint8)
        out = np.asarray(comm.broadcast(flat, root=root_rank, name=f"broadcast.{dt}").wait())
        off = 0
        for v in vs:
            n = int(np.prod(v.shape)) if len(v.shape) else 1
            v.assign(tf.cast(tf.reshape(tf.convert_to_tensor(out[off:off + n]), v.shape), v.dtype))
            off += n


@tf.autograph.experimental.do_not_convert
def broadcast_variables(variables, root_rank: int = 0, backend=None):
    """Assign root_rank's values to `variables` (tf.Variables or Keras Variables) on every rank."""
    comm = runtime.resolve(backend)
    if not 0 <= int(root_rank) < comm.size:
        raise ValueError(f"root_rank={root_rank} is not a rank of this {comm.size}-rank job")
    variables = list(variables)
    if comm.size == 1 or not variables:
        return None
    if tf.executing_eagerly():
        return _bcast_eager(variables, int(root_rank), comm)

    def host(*_):
        _bcast_eager(variables, int(root_rank), comm)
        return tf.constant(0, tf.int32)
    reads = [tf.identity(tf.convert_to_tensor(v)) for v in variables]
    return tf.py_function(host, reads, Tout=tf.int32, name="gradcomp_broadcast")


def broadcast_exchange_state(exchange, root_rank: int = 0):
    """Give every rank root_rank's *replicated* gradcomp state (step counters, PowerSGD's Q, GMC's
    global momentum, the sync policy's anchor; gradcomp/state.py); each other rank's residuals
    restart at zero (per-rank state is never broadcast). Encoded without pickle
    (gradcomp_tf.checkpoint.encode). Eager only; call it on every rank, e.g. after restoring a
    checkpoint on root_rank alone. BroadcastGlobalVariablesCallback does this for a
    DistributedOptimizer."""
    from gradcomp_tf.checkpoint import decode, encode
    comm = exchange.comm
    if not 0 <= int(root_rank) < comm.size:
        raise ValueError(f"root_rank={root_rank} is not a rank of this {comm.size}-rank job")
    if comm.size == 1:
        return
    raw = np.frombuffer(encode(exchange.replicated_state_dict()), np.uint8).copy() \
        if comm.rank == root_rank else np.zeros(0, np.uint8)
    n = int(np.asarray(comm.broadcast(np.array([raw.size], np.int64), root=root_rank,
                                      name="exchange_state.len").wait()).reshape(-1)[0])
    if comm.rank != root_rank:
        raw = np.zeros(n, np.uint8)
    data = np.asarray(comm.broadcast(raw, root=root_rank, name="exchange_state.data").wait(), np.uint8)
    if comm.rank != root_rank:
        exchange.load_replicated_state_dict(decode(data.tobytes()))


class _CallableModule(types.ModuleType):
    """`gradcomp_tf.broadcast` is this module (so `from gradcomp_tf.broadcast import ...` keeps
    working) and also Horovod's `hvd.broadcast(tensor, root_rank)`: calling it broadcasts a tensor
    (gradcomp_tf.collectives.broadcast)."""

    def __call__(self, tensor, root_rank=0, name=None, process_set=None, ignore_name_scope=False):
        from gradcomp_tf.collectives import broadcast
        return broadcast(tensor, root_rank, name=name, process_set=process_set)


sys.modules[__name__].__class__ = _CallableModule
