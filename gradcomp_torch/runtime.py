"""Process-level runtime for PyTorch users: init / rank / size / local_rank and start-up broadcasts.

    import gradcomp_torch as gct
    gct.init()                                  # GRADCOMP_BACKEND (auto|horovod|mpi|torch) or backend=
    gct.init(timeout=600)                       # seconds any collective may wait (GRADCOMP_TIMEOUT, 300)
    gct.broadcast_parameters(model.state_dict(), root_rank=0)
    gct.broadcast_optimizer_state(optimizer, root_rank=0)

`init()` makes one Communicator (gradcomp.comm.make_communicator) and keeps it as the default of
every other call in this package. Under `torchrun` it first creates the torch.distributed process
group when none exists (gloo on CPU, nccl on GPU, its own timeout set to ours); with backend
"horovod", or "auto" under horovodrun, it calls `hvd.init()`. A backend whose world disagrees with
the launcher raises gradcomp.comm.launch.LauncherMismatchError. Under mpirun, an uncaught exception
on any rank calls MPI_Abort (gradcomp/comm/abort.py), so the job ends instead of hanging.
Every function also takes `comm=` (any gradcomp Communicator, e.g. a LocalWorld rank in tests).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from gradcomp.comm.launch import launcher

_STATE = {"comm": None}


def _init_torch_distributed(timeout):
    import torch.distributed as dist
    if dist.is_available() and not dist.is_initialized() and launcher().engine == "torch":
        use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
        if use_nccl and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        from gradcomp.comm.torch_dist import destroy_at_exit, pg_timeout
        dist.init_process_group("nccl" if use_nccl else "gloo", **pg_timeout(timeout))
        destroy_at_exit(dist)


def _init_horovod():
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise ImportError("backend 'horovod' needs Horovod: run `bash mpi/build_horovod.sh` "
                          f"(Horovod 0.28.1 built for this torch), or use backend 'mpi' or 'torch' ({e})") from e
    hvd.init()


def init(backend: str | None = None, comm=None, timeout="default"):
    """Create (or set) the default communicator; returns it. Safe to call more than once.

    `backend`: auto | horovod | mpi | torch | local (default GRADCOMP_BACKEND, else auto).
    `timeout`: seconds any collective may wait before raising CollectiveTimeout (None or 0: forever;
    default GRADCOMP_TIMEOUT, else 300). A bad value raises ValueError naming the valid forms."""
    from gradcomp.config import backend_from_env, resolve_timeout
    given = not (isinstance(timeout, str) and timeout == "default")
    timeout = resolve_timeout(timeout)              # validated first, also when a communicator exists
    if comm is not None:
        _STATE["comm"] = comm
        return comm
    current = _STATE["comm"]
    if current is not None and (backend is None or backend.lower() in ("auto", getattr(current, "engine", ""))):
        if given and hasattr(current, "timeout"):
            current.timeout = timeout
        return current
    if backend is None:
        backend = backend_from_env()
    backend = backend.lower()
    launch = launcher()
    if backend == "horovod" or (backend == "auto" and launch.engine == "horovod" and launch.size > 1):
        try:
            _init_horovod()
        except ImportError:
            if backend == "horovod" or launch.name == "horovodrun-gloo":
                raise                               # horovodrun's mpirun without Horovod: MPI below
    if backend in ("auto", "torch"):
        _init_torch_distributed(timeout)
    from gradcomp.comm import make_communicator
    _STATE["comm"] = make_communicator(backend, timeout=timeout)
    return _STATE["comm"]


def communicator(comm=None):
    """`comm` if given, else the default one (calling init() on first use)."""
    if comm is not None:
        return comm
    return _STATE["comm"] if _STATE["comm"] is not None else init()


def shutdown():
    """Forget the default communicator (the engine itself is left to its owner)."""
    _STATE["comm"] = None


def rank(comm=None) -> int:
    return communicator(comm).rank


def size(comm=None) -> int:
    return communicator(comm).size


def local_rank(comm=None) -> int:
    return getattr(communicator(comm), "local_rank", 0)


# ---------------------------------------------------------------------------------- broadcasts
def _named_tensors(params):
    if isinstance(params, dict):
        items = list(params.items())
    else:
        items = list(params)
        if items and not (isinstance(items[0], tuple) and len(items[0]) == 2):
            items = [(str(i), t) for i, t in enumerate(items)]
    for name, t in items:
        if not torch.is_tensor(t):
            raise TypeError(f"broadcast_parameters: {name!r} is a {type(t).__name__}, not a tensor; pass "
                            "model.state_dict() or model.named_parameters()")
    return items


@torch.no_grad()
def broadcast_parameters(params, root_rank: int = 0, comm=None):
    """Overwrite, in place, every tensor of `params` with root_rank's values.

    `params`: a state_dict, or an iterable of (name, tensor) (model.named_parameters()) or tensors.
    Tensors are fused per dtype and device into one broadcast each.
    """
    comm = communicator(comm)
    if not 0 <= root_rank < comm.size:
        raise ValueError(f"root_rank={root_rank} is out of range for {comm.size} rank(s)")
    if comm.size == 1:
        return
    groups: dict = {}
    for name, t in _named_tensors(params):
        if t.numel():
            groups.setdefault((t.dtype, str(t.device)), []).append((name, t))
    for (dtype, dev), items in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        flat = torch.cat([t.detach().reshape(-1) for _, t in items])
        if dtype == torch.bool:
            flat = flat.to(torch.uint8)
        out = comm.broadcast(flat, root=root_rank, name=f"broadcast_parameters.{dtype}").wait()
        out = torch.as_tensor(out).to(device=flat.device)
        off = 0
        for _, t in items:
            n = t.numel()
            t.copy_(out[off:off + n].reshape(t.shape).to(t.dtype))
            off += n


def broadcast_object(obj, root_rank: int = 0, comm=None, name: str = "object"):
    """Return root_rank's `obj` on every rank.

    `obj` may hold tensors, numbers, strings, None and lists/tuples/dicts of them (a state_dict). It
    travels in torch.save format and is decoded with torch.load(weights_only=True), so a peer's bytes
    never run code here. Anything else (a class instance, a function) raises ValueError on every rank.
    """
    from gradcomp_torch.checkpoint import dumps, safe_loads
    comm = communicator(comm)
    if not 0 <= root_rank < comm.size:
        raise ValueError(f"root_rank={root_rank} is out of range for {comm.size} rank(s)")
    what = f"broadcast_object({name!r})"
    err, raw = None, np.zeros(0, dtype=np.uint8)
    if comm.rank == root_rank:
        try:
            data = dumps(obj)
            safe_loads(data, what)                  # refuse here, and tell the peers, what they would refuse
            raw = np.frombuffer(data, dtype=np.uint8).copy()
        except Exception as e:                      # noqa: BLE001 - every rank must learn of it
            err = e
    if comm.size == 1:
        if err is not None:
            raise err
        return obj
    n = comm.broadcast(np.array([-1 if err is not None else raw.size], dtype=np.int64), root=root_rank,
                       name=f"{name}.len").wait()
    n = int(np.asarray(n).reshape(-1)[0])
    if n < 0:
        if err is not None:
            raise err
        raise ValueError(f"{what}: rank {root_rank} could not send its object (its error says why); only "
                         "tensors, numbers, strings and containers of them can be broadcast")
    if comm.rank != root_rank:
        raw = np.zeros(n, dtype=np.uint8)
    data = np.asarray(comm.broadcast(raw, root=root_rank, name=f"{name}.data").wait(), dtype=np.uint8)
    if comm.rank == root_rank:
        return obj
    return safe_loads(data.tobytes(), f"{what} from rank {root_rank}")


def broadcast_optimizer_state(optimizer, root_rank: int = 0, comm=None):
    """Make every rank's optimizer state (momenta, step counts, hyper-parameters) equal root_rank's.

    Works for any torch.optim optimizer. For gradcomp_torch.DistributedOptimizer it also carries
    gradcomp's replicated state (step counter, PowerSGD's Q, GMC's global momentum, the sync
    policy's counters and anchor), so every rank continues at the same step; per-rank state
    (residuals) is never broadcast: right after root_rank loaded a gathered checkpoint each rank
    gets its own part of it, otherwise the other ranks' residuals restart at zero
    (gradcomp_torch/checkpoint.py explains the choice).
    """
    inner = getattr(optimizer, "inner", optimizer)
    comm = communicator(comm if comm is not None else getattr(optimizer, "comm", None))
    if comm.size == 1:
        return
    if hasattr(optimizer, "_broadcast_state"):
        optimizer._broadcast_state(root_rank, comm, broadcast_object)
        return
    sd = broadcast_object(inner.state_dict(), root_rank, comm, name="broadcast_optimizer_state")
    if comm.rank != root_rank:
        inner.load_state_dict(sd)       # torch moves state tensors to each parameter's device
