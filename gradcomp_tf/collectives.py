"""Horovod's collective helpers for TensorFlow tensors, over whichever gradcomp transport is active.

    import gradcomp_tf as hvd
    avg = hvd.allreduce(tf.constant(loss))            # the mean over ranks (a tensor)
    total = hvd.allreduce(t, op=hvd.Sum)
    rows = hvd.allgather(t)                           # concatenated along axis 0 (may differ per rank)
    t0 = hvd.broadcast(t, root_rank=0)
    cfg = hvd.broadcast_object(cfg, root_rank=0)      # numbers, strings, arrays, lists/dicts (no pickle)
    hvd.barrier(); hvd.join()
    out, recv_splits = hvd.alltoall(t, splits=[1, 3])

Same semantics as Horovod's: allreduce averages by default (op=Average | Sum | Min | Max | Product,
or average=True/False), prescale/postscale factors, optional `compression=` (Horovod's or gradcomp's
Compression objects, or a spec like "fp16"). They work eagerly and inside tf.function (there as one
tf.py_function each) and return tensors; the values cross the transport as host arrays
(gradcomp/horovod_api.py). IndexedSlices are densified first. `process_set=` accepts only the global set.
Horovod's device_dense/device_sparse/ignore_name_scope arguments are accepted and have no effect.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradcomp import horovod_api as _api
from gradcomp.horovod_api import Adasum, Average, Max, Min, Product, Sum  # noqa: F401
from gradcomp_tf import runtime


def _host_call(fn, tensor, name, same_shape=True):
    """Run fn(numpy) -> numpy on `tensor` eagerly, or inside one tf.py_function when traced."""
    if isinstance(tensor, tf.IndexedSlices):
        tensor = tf.convert_to_tensor(tensor)
    tensor = tf.convert_to_tensor(tensor)
    if tf.executing_eagerly():
        return tf.convert_to_tensor(fn(tensor.numpy()), dtype=tensor.dtype)

    def host(t):
        return fn(t.numpy())
    out = tf.py_function(host, [tensor], Tout=tensor.dtype, name=name)
    if same_shape:
        out.set_shape(tensor.shape)
    else:
        out.set_shape(tf.TensorShape([None]).concatenate(tensor.shape[1:]) if tensor.shape.rank else [None])
    return out


def _compression(compression):
    if compression is None:
        return None
    spec, _ = _api.compression_spec(compression)
    if not isinstance(spec, str):
        return compression
    from gradcomp_tf.compression import Compression
    return None if spec == "none" else Compression.get(spec)


def _comm():
    return runtime.comm()


def allreduce(tensor, average=None, device_dense="", device_sparse="", compression=None, op=None,
              prescale_factor=1.0, postscale_factor=1.0, name=None, process_set=None, ignore_name_scope=False):
    """The reduction of `tensor` over ranks (default: the average), as a tensor."""
    _api.check_process_set(process_set, "allreduce")
    comp = _compression(compression)
    ctx = None
    if comp is not None:
        tensor, ctx = comp.compress(tensor)
    comm = _comm()
    out = _host_call(lambda a: _api.allreduce(comm, a, op=op, average=average, prescale_factor=prescale_factor,
                                              postscale_factor=postscale_factor, name=name or "allreduce"),
                     tensor, "gradcomp_allreduce")
    return comp.decompress(out, ctx) if comp is not None else out


def grouped_allreduce(tensors, average=None, device_dense="", device_sparse="", compression=None, op=None,
                      prescale_factor=1.0, postscale_factor=1.0, process_set=None):
    return [allreduce(t, average, compression=compression, op=op, prescale_factor=prescale_factor,
                      postscale_factor=postscale_factor, name=f"grouped.{i}", process_set=process_set)
            for i, t in enumerate(tensors)]


def allgather(tensor, name=None, process_set=None, ignore_name_scope=False):
    """Every rank's `tensor` concatenated along axis 0 (the first dimension may differ between ranks)."""
    _api.check_process_set(process_set, "allgather")
    comm = _comm()
    return _host_call(lambda a: _api.allgather(comm, a, name=name or "allgather"), tensor,
                      "gradcomp_allgather", same_shape=False)


def broadcast(tensor, root_rank=0, name=None, process_set=None, ignore_name_scope=False):
    """root_rank's `tensor` on every rank (a tensor); variables: gradcomp_tf.broadcast_variables."""
    _api.check_process_set(process_set, "broadcast")
    comm = _comm()
    return _host_call(lambda a: _api.broadcast(comm, a, root_rank, name=name or "broadcast"), tensor,
                      "gradcomp_broadcast_tensor")


def broadcast_object(obj, root_rank=0, session=None, name=None, process_set=None):
    """root_rank's `obj` on every rank. `obj`: numbers, strings, None, numpy arrays and lists/dicts of
    them, serialized without pickle (gradcomp_tf.checkpoint.encode), so a peer's bytes never run code;
    anything else raises TypeError on root_rank and a ValueError on the other ranks. Eager only."""
    from gradcomp_tf.checkpoint import decode, encode
    _api.check_process_set(process_set, "broadcast_object")
    comm = _comm()
    if not 0 <= int(root_rank) < comm.size:
        raise ValueError(f"broadcast_object: root_rank={root_rank} is not a rank of this {comm.size}-rank job")
    err, raw = None, np.zeros(0, np.uint8)
    if comm.rank == root_rank:
        try:
            raw = np.frombuffer(encode(obj), np.uint8).copy()
            decode(raw.tobytes())
        except Exception as e:  # noqa: BLE001 - every rank must learn of it
            err = TypeError(f"broadcast_object: cannot send {type(obj).__name__} ({e}); only numbers, strings, "
                            "None, numpy arrays and lists/dicts of them can be broadcast")
    if comm.size == 1:
        if err is not None:
            raise err
        return obj
    tag = name or "broadcast_object"
    n = int(np.asarray(comm.broadcast(np.array([-1 if err else raw.size], np.int64), root=int(root_rank),
                                      name=f"{tag}.len").wait()).reshape(-1)[0])
    if n < 0:
        raise err if err is not None else ValueError(
            f"broadcast_object: rank {root_rank} could not send its object (its error says why)")
    if comm.rank != root_rank:
        raw = np.zeros(n, np.uint8)
    data = np.asarray(comm.broadcast(raw, root=int(root_rank), name=f"{tag}.data").wait(), np.uint8)
    return obj if comm.rank == root_rank else decode(data.tobytes())


def alltoall(tensor, splits=None, name=None, ignore_name_scope=False, process_set=None):
    """Horovod's alltoall: `splits[j]` rows of `tensor` (axis 0) go to rank j (None: equal parts);
    returns the rows every rank sent here, concatenated in rank order, and -- when `splits` was
    given, as Horovod does -- the received splits (int32). Eager and inside tf.function; not
    differentiable. Every rank receives every rank's whole tensor on the wire
    (gradcomp.horovod_api.alltoall_async says why)."""
    _api.check_process_set(process_set, "alltoall")
    comm = _comm()
    tensor = tf.convert_to_tensor(tensor)
    sp = None if splits is None else tf.cast(tf.convert_to_tensor(splits), tf.int64)
    tag = name or "alltoall"

    def host(t, s=None):
        out, recv = _api.alltoall(comm, t.numpy(), None if s is None else s.numpy(), name=tag)
        return out, recv

    if tf.executing_eagerly():
        out, recv = host(tensor, sp)
        out, recv = tf.convert_to_tensor(out, dtype=tensor.dtype), tf.convert_to_tensor(recv, tf.int32)
    else:
        args = [tensor] if sp is None else [tensor, sp]
        out, recv = tf.py_function(host, args, Tout=[tensor.dtype, tf.int32], name="gradcomp_alltoall")
        out.set_shape(tf.TensorShape([None]).concatenate(tensor.shape[1:]))
        recv.set_shape([comm.size])
    return out if splits is None else (out, recv)


def barrier(process_set=None):
    _api.check_process_set(process_set, "barrier")
    _comm().barrier()


def join() -> int:
    """Wait for every rank; returns the rank that arrived last (gradcomp.horovod_api.join)."""
    return _api.join(_comm())


def is_initialized() -> bool:
    return runtime._STATE["comm"] is not None


def local_size() -> int:
    return _api.local_size(_comm())


def cross_rank() -> int:
    return _api.cross_rank(_comm())


def cross_size() -> int:
    return _api.cross_size(_comm())


def mpi_built() -> bool:
    return _api.mpi_built()


def gloo_built() -> bool:
    """gradcomp_tf's transports are MPI, Horovod and a single process; it has no Gloo of its own."""
    return False


def nccl_built() -> bool:
    """gradcomp_tf moves payloads through the host (MPI or Horovod); it has no NCCL path of its own."""
    return False


def mpi_enabled() -> bool:
    return "mpi" in str(getattr(_comm(), "engine", ""))


def cuda_built() -> bool:
    return bool(tf.test.is_built_with_cuda())


def rocm_built() -> bool:
    return bool(tf.test.is_built_with_rocm())


def allgather_object(obj, session=None, name=None, process_set=None) -> list:
    """Every rank's `obj` as a list indexed by rank (numbers, strings, None, numpy arrays and
    lists/dicts of them; no pickle). Eager only."""
    from gradcomp_tf.checkpoint import decode, encode
    _api.check_process_set(process_set, "allgather_object")
    comm = _comm()
    raw = np.frombuffer(encode(obj), np.uint8).copy()
    decode(raw.tobytes())
    if comm.size == 1:
        return [obj]
    tag = name or "allgather_object"
    sizes = _api.allgather(comm, np.array([raw.size], np.int64), name=f"{tag}.len")
    flat = _api.allgather(comm, raw, name=tag)
    out, off = [], 0
    for r, n in enumerate(int(v) for v in sizes):
        out.append(obj if r == comm.rank else decode(flat[off:off + n].tobytes()))
        off += n
    return out


def shutdown():
    """Forget the process-wide communicator (the engine itself is left to its owner)."""
    runtime._STATE["comm"] = None
