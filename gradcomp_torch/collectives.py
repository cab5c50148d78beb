"""Horovod's collective helpers for torch tensors, over whichever gradcomp transport is active.

    import gradcomp_torch as hvd
    avg = hvd.allreduce(torch.tensor(loss), name="avg_loss")     # the mean over ranks (a tensor)
    total = hvd.allreduce(t, op=hvd.Sum)
    rows = hvd.allgather(t)                                       # concatenated along dim 0
    t0 = hvd.broadcast(t, root_rank=0); hvd.broadcast_(t, 0)      # new tensor / in place
    hvd.barrier(); hvd.join()

    h = hvd.allreduce_async(t, name="m"); ...; avg = hvd.synchronize(h)   # hvd.poll(h): done yet?
    out, recv_splits = hvd.alltoall(t, splits=torch.tensor([1, 3]))

Same semantics as Horovod's: allreduce averages by default (op=Average | Sum | Min | Max | Product,
or the older average=True/False), prescale/postscale factors, an optional `compression=`
(Horovod's or gradcomp's Compression objects, or a spec such as "fp16"); they return tensors on the
input's device and dtype. The `*_async` forms issue the collective on the transport and return a
handle for `poll` / `synchronize` (ranks must issue them in the same order: gradcomp's transports
match collectives by order, Horovod by name). `allreduce` (Average, Sum) and `alltoall` are
differentiable, as in Horovod (the backward pass is the same collective on the gradient). The values
cross the transport as host arrays (gradcomp/horovod_api.py), which suits metrics and small tensors;
gradients go through DistributedOptimizer. `process_set=` accepts only the global set.
"""
from __future__ import annotations

import numpy as np
import torch

from gradcomp.comm.base import ThenHandle
from gradcomp import horovod_api as _api
from gradcomp.horovod_api import Adasum, Average, Max, Min, Product, Sum  # noqa: F401
from gradcomp_torch import runtime


def _host(t):
    if not torch.is_tensor(t):
        t = torch.as_tensor(t)
    x = t.detach().cpu()
    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.contiguous().numpy(), t


def _back(a, like):
    a = np.asarray(a)
    a = a if a.flags.c_contiguous else a.copy(order="C")          # 0-d stays 0-d
    return torch.from_numpy(a).to(device=like.device, dtype=like.dtype)


def _compression(compression):
    if compression is None:
        return None
    spec, _ = _api.compression_spec(compression)
    if not isinstance(spec, str):                  # gradcomp or Horovod objects: their own compress/decompress
        return compression
    from gradcomp_torch.compression import Compression
    return None if spec == "none" else Compression.get(spec)


# Horovod's handle: a transport Handle plus how to turn its result into tensors (computed once).
_Async = ThenHandle


def poll(handle) -> bool:
    """True once the async collective behind `handle` has completed (synchronize will not block)."""
    return _api.poll(handle)


def synchronize(handle):
    """Wait for an async collective; its output tensor (alltoall: (output, received_splits)).
    An in-place form (allreduce_async_, broadcast_async_) writes into its tensor and returns it."""
    return _api.synchronize(handle)


def _reduce_async(tensor, average, name, op, prescale_factor, postscale_factor, comm, compression=None):
    comp = _compression(compression)
    ctx = None
    if comp is not None:
        tensor, ctx = comp.compress(tensor)
    x, like = _host(tensor)
    h = _api.allreduce_async(comm, x, op=op, average=average, prescale_factor=prescale_factor,
                             postscale_factor=postscale_factor, name=name or "allreduce")

    def finish(a):
        out = _back(a, like)
        return comp.decompress(out, ctx) if comp is not None else out
    return _Async(h, finish)


class _AllreduceFn(torch.autograd.Function):
    """Differentiable allreduce (Average / Sum): the gradient of rank r's input is the same
    reduction of every rank's output gradient, as in Horovod's HorovodAllreduce."""

    @staticmethod
    def forward(ctx, tensor, average, name, op, prescale_factor, postscale_factor, comm, compression):
        ctx.args = (average, name, op, prescale_factor, postscale_factor, comm)
        return _reduce_async(tensor, average, name, op, prescale_factor, postscale_factor, comm,
                             compression).wait()

    @staticmethod
    def backward(ctx, grad):
        average, name, op, pre, post, comm = ctx.args
        g = _reduce_async(grad.contiguous(), average, f"{name or 'allreduce'}.grad", op, pre, post, comm).wait()
        return g, None, None, None, None, None, None, None


def _differentiable(tensor, op, average):
    if not (torch.is_tensor(tensor) and tensor.requires_grad and torch.is_grad_enabled()):
        return False
    op = (_api.Average if average is None or average else _api.Sum) if op is None else op
    return op in (_api.Average, _api.Sum)


def allreduce(tensor, average=None, name=None, compression=None, op=None, prescale_factor=1.0,
              postscale_factor=1.0, process_set=None, comm=None):
    """The reduction of `tensor` over ranks (default: the average), as a new tensor (differentiable
    for Average and Sum when `tensor` requires grad)."""
    _api.check_process_set(process_set, "allreduce")
    comm = runtime.communicator(comm)
    if _differentiable(tensor, op, average):
        return _AllreduceFn.apply(tensor, average, name, op, prescale_factor, postscale_factor, comm, compression)
    return _reduce_async(tensor, average, name, op, prescale_factor, postscale_factor, comm, compression).wait()


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                    process_set=None, comm=None):
    """Start an allreduce; a handle for poll() / synchronize() (which returns a new tensor)."""
    _api.check_process_set(process_set, "allreduce_async")
    return _reduce_async(tensor, average, name, op, prescale_factor, postscale_factor,
                         runtime.communicator(comm))


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                     process_set=None, comm=None):
    """Start an in-place allreduce; synchronize() writes the result into `tensor` and returns it."""
    h = allreduce_async(tensor, average, name, op, prescale_factor, postscale_factor, process_set, comm)
    return _Async(h, lambda out: _copy_into(tensor, out))


def _copy_into(tensor, out):
    with torch.no_grad():
        tensor.copy_(out)
    return tensor


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
               process_set=None, comm=None):
    """allreduce in place; returns `tensor`."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor,
                                        process_set, comm))


def grouped_allreduce(tensors, average=None, name=None, compression=None, op=None, prescale_factor=1.0,
                      postscale_factor=1.0, process_set=None, comm=None):
    return [allreduce(t, average, f"{name or 'grouped'}.{i}", compression, op, prescale_factor,
                      postscale_factor, process_set, comm) for i, t in enumerate(tensors)]


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                            postscale_factor=1.0, process_set=None, comm=None):
    """Start one allreduce per tensor; synchronize() gives the list of results."""
    hs = [allreduce_async(t, average, f"{name or 'grouped'}.{i}", op, prescale_factor, postscale_factor,
                          process_set, comm) for i, t in enumerate(tensors)]
    return _Async(_All(hs), lambda outs: outs)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                             postscale_factor=1.0, process_set=None, comm=None):
    hs = [allreduce_async_(t, average, f"{name or 'grouped'}.{i}", op, prescale_factor, postscale_factor,
                           process_set, comm) for i, t in enumerate(tensors)]
    return _Async(_All(hs), lambda outs: outs)


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=None, comm=None):
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor,
                                                process_set, comm))


class _All:
    def __init__(self, hs):
        self.hs = hs

    def done(self):
        return all(h.done() for h in self.hs)

    def wait(self):
        return [h.wait() for h in self.hs]


def allgather_async(tensor, name=None, process_set=None, comm=None):
    """Start an allgather (the shapes are exchanged first, blocking; the data without waiting)."""
    _api.check_process_set(process_set, "allgather_async")
    x, like = _host(tensor)
    h = _api.allgather_async(runtime.communicator(comm), x, name=name or "allgather")
    return _Async(h, lambda a: _back(a, like))


def allgather(tensor, name=None, process_set=None, comm=None):
    """Every rank's `tensor` concatenated along dim 0 (the first dimension may differ between ranks)."""
    return synchronize(allgather_async(tensor, name, process_set, comm))


def broadcast_async(tensor, root_rank=0, name=None, process_set=None, comm=None):
    """Start a broadcast; synchronize() returns root_rank's tensor as a new tensor."""
    _api.check_process_set(process_set, "broadcast_async")
    x, like = _host(tensor)
    h = _api.broadcast_async(runtime.communicator(comm), x, root_rank, name=name or "broadcast")
    return _Async(h, lambda a: _back(a, like))


def broadcast_async_(tensor, root_rank=0, name=None, process_set=None, comm=None):
    """Start an in-place broadcast; synchronize() writes into `tensor` and returns it."""
    h = broadcast_async(tensor, root_rank, name, process_set, comm)
    return _Async(h, lambda out: _copy_into(tensor, out))


def broadcast(tensor, root_rank=0, name=None, process_set=None, comm=None):
    """root_rank's `tensor`, as a new tensor on every rank."""
    return synchronize(broadcast_async(tensor, root_rank, name, process_set, comm))


def broadcast_(tensor, root_rank=0, name=None, process_set=None, comm=None):
    """broadcast in place; returns `tensor`."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set, comm))


def _splits_np(splits):
    if splits is None:
        return None
    return splits.detach().cpu().numpy() if torch.is_tensor(splits) else np.asarray(splits)


def alltoall_async(tensor, splits=None, name=None, process_set=None, comm=None):
    """Start an alltoall; synchronize() gives (output, received_splits) -- see alltoall."""
    _api.check_process_set(process_set, "alltoall_async")
    x, like = _host(tensor)
    h = _api.alltoall_async(runtime.communicator(comm), x, _splits_np(splits), name=name or "alltoall")
    return _Async(h, lambda r: (_back(r[0], like), torch.from_numpy(np.ascontiguousarray(r[1]))))


class _AlltoallFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, comm):
        out, recv = synchronize(alltoall_async(tensor, splits, name, None, comm))
        ctx.recv, ctx.name, ctx.comm = recv, name, comm
        ctx.mark_non_differentiable(recv)
        return out, recv

    @staticmethod
    def backward(ctx, grad, _dead):
        g, _ = synchronize(alltoall_async(grad.contiguous(), ctx.recv, f"{ctx.name or 'alltoall'}.grad", None,
                                          ctx.comm))
        return g, None, None, None


def alltoall(tensor, splits=None, name=None, process_set=None, comm=None):
    """Horovod's alltoall: slices of `tensor` along dim 0 go to the ranks (`splits[j]` rows to rank j;
    None: equal parts), and the slices every rank sent here come back concatenated in rank order.
    Returns the output, and (as Horovod does) also received_splits when `splits` was given.
    Differentiable (the backward pass sends the gradient slices back). Every rank receives every
    rank's whole tensor on the wire (gradcomp.horovod_api.alltoall_async says why)."""
    _api.check_process_set(process_set, "alltoall")
    comm = runtime.communicator(comm)
    if torch.is_tensor(tensor) and tensor.requires_grad and torch.is_grad_enabled():
        out, recv = _AlltoallFn.apply(tensor, splits, name, comm)
    else:
        out, recv = synchronize(alltoall_async(tensor, splits, name, None, comm))
    return out if splits is None else (out, recv)


def barrier(process_set=None, comm=None):
    _api.check_process_set(process_set, "barrier")
    runtime.communicator(comm).barrier()


def join(device=-1, comm=None) -> int:
    """Wait for every rank; returns the rank that arrived last (see gradcomp.horovod_api.join: ranks
    must have run the same number of steps, a joined rank does not answer other ranks' allreduces)."""
    return _api.join(runtime.communicator(comm))


def is_initialized() -> bool:
    return runtime._STATE["comm"] is not None


def local_size(comm=None) -> int:
    return _api.local_size(runtime.communicator(comm))


def cross_rank(comm=None) -> int:
    return _api.cross_rank(runtime.communicator(comm))


def cross_size(comm=None) -> int:
    return _api.cross_size(runtime.communicator(comm))


def mpi_built() -> bool:
    return _api.mpi_built()


def gloo_built() -> bool:
    """Whether torch.distributed's Gloo backend is available (gradcomp's `torch` transport on CPU)."""
    import torch.distributed as dist
    return bool(dist.is_available() and dist.is_gloo_available())


def nccl_built() -> bool:
    """Whether NCCL is usable (torch.distributed with NCCL and a CUDA device)."""
    import torch.distributed as dist
    return bool(dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available())


def mpi_enabled() -> bool:
    return getattr(runtime.communicator(), "engine", "") == "mpi"


def mpi_threads_supported() -> bool:
    return mpi_built()


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    return bool(torch.cuda.is_available())


def rocm_built() -> bool:
    return bool(getattr(torch.version, "hip", None))


def allgather_object(obj, name=None, process_set=None, comm=None) -> list:
    """Every rank's `obj`, as a list indexed by rank. Same contents as broadcast_object allows
    (tensors, numbers, strings, containers; torch.save format, loaded with weights_only=True, so a
    peer's bytes never run code); anything else raises on the rank that holds it."""
    from gradcomp_torch.checkpoint import dumps, safe_loads
    _api.check_process_set(process_set, "allgather_object")
    comm = runtime.communicator(comm)
    what = f"allgather_object({name or 'object'!r})"
    data = dumps(obj)
    safe_loads(data, what)                      # refuse here what the peers would refuse
    if comm.size == 1:
        return [obj]
    raw = np.frombuffer(data, np.uint8).copy()
    sizes = _api.allgather(comm, np.array([raw.size], np.int64), name=f"{what}.len")
    flat = _api.allgather(comm, raw, name=what)
    out, off = [], 0
    for r, n in enumerate(int(v) for v in sizes):
        out.append(obj if r == comm.rank else safe_loads(flat[off:off + n].tobytes(), f"{what} from rank {r}"))
        off += n
    return out


def start_timeline(file_path, mark_cycles=False):
    """Horovod's timeline has no gradcomp counterpart: use opt.stats() and gradcomp.timing instead."""
    raise NotImplementedError("gradcomp has no Horovod timeline; per-step bytes are in optimizer.stats()")


def stop_timeline():
    raise NotImplementedError("gradcomp has no Horovod timeline; per-step bytes are in optimizer.stats()")
