"""Horovod's collective helpers for torch tensors, over whichever gradcomp transport is active.

    import gradcomp_torch as hvd
    avg = hvd.allreduce(torch.tensor(loss), name="avg_loss")     # the mean over ranks (a tensor)
    total = hvd.allreduce(t, op=hvd.Sum)
    rows = hvd.allgather(t)                                       # concatenated along dim 0
    t0 = hvd.broadcast(t, root_rank=0); hvd.broadcast_(t, 0)      # new tensor / in place
    hvd.barrier(); hvd.join()

Same semantics as Horovod's: allreduce averages by default (op=Average | Sum | Min | Max | Product,
or the older average=True/False), prescale/postscale factors, an optional `compression=`
(Horovod's or gradcomp's Compression objects, or a spec such as "fp16"); they block and return
tensors on the input's device and dtype (Horovod's *_async variants are not provided). The values
cross the transport as host arrays (gradcomp/horovod_api.py), which suits metrics and small tensors;
gradients go through DistributedOptimizer. `process_set=` accepts only the global set.
"""
from __future__ import annotations

import numpy as np
import torch

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


def allreduce(tensor, average=None, name=None, compression=None, op=None, prescale_factor=1.0,
              postscale_factor=1.0, process_set=None, comm=None):
    """The reduction of `tensor` over ranks (default: the average), as a new tensor."""
    _api.check_process_set(process_set, "allreduce")
    comm = runtime.communicator(comm)
    comp = _compression(compression)
    ctx = None
    if comp is not None:
        tensor, ctx = comp.compress(tensor)
    x, like = _host(tensor)
    out = _back(_api.allreduce(comm, x, op=op, average=average, prescale_factor=prescale_factor,
                               postscale_factor=postscale_factor, name=name or "allreduce"), like)
    return comp.decompress(out, ctx) if comp is not None else out


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
               process_set=None, comm=None):
    """allreduce in place; returns `tensor`."""
    with torch.no_grad():
        tensor.copy_(allreduce(tensor, average, name, None, op, prescale_factor, postscale_factor,
                               process_set, comm))
    return tensor


def grouped_allreduce(tensors, average=None, name=None, compression=None, op=None, prescale_factor=1.0,
                      postscale_factor=1.0, process_set=None, comm=None):
    return [allreduce(t, average, f"{name or 'grouped'}.{i}", compression, op, prescale_factor,
                      postscale_factor, process_set, comm) for i, t in enumerate(tensors)]


def allgather(tensor, name=None, process_set=None, comm=None):
    """Every rank's `tensor` concatenated along dim 0 (the first dimension may differ between ranks)."""
    _api.check_process_set(process_set, "allgather")
    x, like = _host(tensor)
    return _back(_api.allgather(runtime.communicator(comm), x, name=name or "allgather"), like)


def broadcast(tensor, root_rank=0, name=None, process_set=None, comm=None):
    """root_rank's `tensor`, as a new tensor on every rank."""
    _api.check_process_set(process_set, "broadcast")
    x, like = _host(tensor)
    return _back(_api.broadcast(runtime.communicator(comm), x, root_rank, name=name or "broadcast"), like)


def broadcast_(tensor, root_rank=0, name=None, process_set=None, comm=None):
    """broadcast in place; returns `tensor`."""
    with torch.no_grad():
        tensor.copy_(broadcast(tensor, root_rank, name, process_set, comm))
    return tensor


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
