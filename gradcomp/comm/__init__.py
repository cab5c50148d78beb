"""Transports. `make_communicator(backend)` picks one:

    auto     Horovod if it is initialized, else torch.distributed if a process group exists,
             else MPI (mpi4py) when launched under mpirun with >1 rank, else a single rank
    horovod  Horovod's collectives          (gradcomp/comm/horovod.py)
    mpi      mpi4py over Open MPI           (gradcomp/comm/mpi.py)
    torch    torch.distributed, Gloo/NCCL   (gradcomp/comm/torch_dist.py)
    local    LocalWorld threads (tests)     (gradcomp/comm/local.py)
Every wait is bounded by a timeout (GRADCOMP_TIMEOUT, default 300 s) and raises CollectiveTimeout;
a transport whose world disagrees with the launcher raises LauncherMismatchError (comm/launch.py);
under MPI an uncaught exception aborts every rank (comm/abort.py).
"""
from gradcomp.comm.base import CollectiveTimeout, Communicator, ConfigMismatchError, Handle, check_consistent
from gradcomp.comm.factory import make_communicator
from gradcomp.comm.launch import LauncherMismatchError
from gradcomp.comm.local import LocalWorld
from gradcomp.comm.single import SingleCommunicator

__all__ = ["Communicator", "Handle", "ConfigMismatchError", "check_consistent", "LocalWorld",
           "SingleCommunicator", "make_communicator", "CollectiveTimeout", "LauncherMismatchError"]
