"""make_communicator(backend): choose and build the transport.

    auto     Horovod if horovod.torch is imported AND initialized; else torch.distributed if a
             default process group exists; else by the launcher (gradcomp/comm/launch.py, read from
             `environ`): horovodrun (MPI or Gloo mode) -> Horovod when horovod.torch imports (MPI under
             horovodrun's mpirun otherwise); torchrun -> torch.distributed (the process group is created,
             gloo on CPU, nccl on GPU); mpirun (or mpi4py already running with size > 1) -> MPI; none -> a
             single rank (SingleCommunicator).
    horovod  gradcomp.comm.horovod.HorovodCommunicator
    mpi      gradcomp.comm.mpi.MPICommunicator
    torch    gradcomp.comm.torch_dist.TorchDistCommunicator
    single   SingleCommunicator ("local" is accepted too: one rank; for an in-process multi-rank
             world use gradcomp.LocalWorld(n).run(fn), which hands each rank its communicator)

A transport whose world disagrees with the launcher (one rank under a launcher that started several:
GRADCOMP_BACKEND=mpi under torchrun, local under mpirun, ...) raises LauncherMismatchError instead of
letting every process train alone. `timeout` (seconds; None or 0: none; default GRADCOMP_TIMEOUT,
300) bounds every wait of the transport. Other keyword arguments go to the chosen class. The
backend name comes from the caller (e.g. `gradcomp.from_env().backend`); `environ` (default
os.environ) is only consulted for the launcher.
"""
from __future__ import annotations

import sys

from gradcomp.comm.base import Communicator
from gradcomp.comm.launch import Launch, check_world, launcher, mismatch_error
from gradcomp.comm.single import SingleCommunicator

BACKENDS = ("auto", "horovod", "mpi", "torch", "single", "local")
_WORLD_OPTIONS = ("comm", "group")          # a sub-communicator is not compared with the launcher


def make_communicator(backend: str | None = "auto", *, environ=None, timeout="default", **kw) -> Communicator:
    """Build the Communicator for `backend` (see the module docstring)."""
    if isinstance(backend, Communicator):
        return backend
    name = (backend or "auto").strip().lower() if isinstance(backend, str) else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown communication backend {backend!r}; valid: {', '.join(BACKENDS)}")
    from gradcomp.config import resolve_timeout
    timeout = resolve_timeout(timeout)
    launch = launcher(environ)
    asked = name
    if name == "auto":
        name = detect(environ, launch)
    if name in ("single", "local"):
        if kw:
            raise TypeError(f"the single-rank backend takes no options, got {sorted(kw)}")
        if launch.size > 1:
            raise mismatch_error(launch, asked, 1)
        return SingleCommunicator()
    if name == "horovod":
        from gradcomp.comm.horovod import HorovodCommunicator
        comm = HorovodCommunicator(timeout=timeout, **kw)
    elif name == "torch":
        from gradcomp.comm.torch_dist import TorchDistCommunicator
        if asked == "auto" and launch.engine == "torch":
            kw.setdefault("init", True)         # torchrun without a process group yet: create it
        comm = TorchDistCommunicator(timeout=timeout, **kw)
    else:
        from gradcomp.comm.mpi import MPICommunicator
        comm = MPICommunicator(timeout=timeout, **kw)
    if not any(kw.get(k) is not None for k in _WORLD_OPTIONS):
        check_world(comm, launch, asked)
    return comm


def detect(environ=None, launch: Launch | None = None) -> str:
    """The engine `auto` picks: "horovod", "torch", "mpi" or "single"."""
    hvd = sys.modules.get("horovod.torch")
    if hvd is not None:
        try:
            if hvd.is_initialized():
                return "horovod"
        except Exception:  # noqa: BLE001 - a half-imported Horovod is "not initialized"
            pass
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return "torch"
    launch = launcher(environ) if launch is None else launch
    if launch.engine == "horovod" and launch.size > 1:
        try:
            import horovod.torch  # noqa: F401
            return "horovod"
        except ImportError as e:
            if launch.name == "horovodrun-gloo":
                from gradcomp.comm.horovod import _INSTALL
                raise ImportError(f"this process was started by {launch.describe()}, but {_INSTALL} ({e})") from None
    if launch.engine == "torch" and launch.size > 1:
        return "torch"
    if launch.size > 1:                          # mpirun, or horovodrun's mpirun without Horovod
        from gradcomp.comm.mpi import import_mpi
        try:
            import_mpi()
        except ImportError as e:
            raise ImportError(f"this process was started by an MPI launcher with {launch.size} ranks, "
                              f"but {e}") from None
        return "mpi"
    mpi_mod = sys.modules.get("mpi4py.MPI")
    if mpi_mod is not None and mpi_mod.Is_initialized() and not mpi_mod.Is_finalized() \
            and mpi_mod.COMM_WORLD.Get_size() > 1:
        return "mpi"
    return "single"
