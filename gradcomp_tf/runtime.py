"""The TensorFlow process runtime: which communicator this process uses, and the host boundary.

    gradcomp_tf.init()            # picks the transport (GRADCOMP_BACKEND, default auto)
    gradcomp_tf.init(timeout=600) # seconds any collective may wait (GRADCOMP_TIMEOUT, default 300)
    gradcomp_tf.rank(), size(), local_rank()

Transport choice (`backend=` argument, else GRADCOMP_BACKEND through gradcomp.config):
  a Communicator instance   used as is (e.g. a LocalWorld rank in tests)
  "horovod"                 Horovod's TensorFlow collectives (gradcomp_tf/horovod_comm.py); needs a
                            Horovod build with TensorFlow (Horovod 0.28.1 builds against TF <= 2.19 with
                            mpi/build_horovod_tf.sh, in a venv of its own; not against TF 2.21)
  "auto"                    Horovod-TF if it is initialized, or importable under horovodrun; else
                            gradcomp.comm.make_communicator("auto"): the launcher's transport (MPI
                            under mpirun, Horovod's torch collectives under horovodrun when only those
                            are built, torch.distributed under torchrun), else one rank
  "mpi" / "torch" / ...     gradcomp.comm.make_communicator(name)
A transport whose world disagrees with the launcher raises LauncherMismatchError; `timeout` bounds
every collective wait (gradcomp.comm.make_communicator).

`HostComm` is the only place TF payloads leave TensorFlow: compression runs as TF ops on the
tensors' device; the (already compressed) payload is handed to the engine as a numpy array and the
result comes back as a TF tensor on the payload's device.
"""
from __future__ import annotations

import numpy as np

from gradcomp.comm.base import Communicator, ThenHandle
from gradcomp.comm.single import SingleCommunicator

_STATE = {"comm": None}


def _horovod_tf(initialized_only: bool):
    """The horovod.tensorflow module if importable (and initialized when asked), else None."""
    try:
        import horovod.tensorflow as hvd  # noqa: F401
    except Exception:  # ImportError, or a Horovod built without TensorFlow
        return None
    if initialized_only:
        try:
            if not hvd.is_initialized():
                return None
        except Exception:
            return None
    return hvd


def make_comm(backend=None, timeout="default") -> Communicator:
    """A Communicator for `backend` (instance, name or None = GRADCOMP_BACKEND), wrapped for TF tensors."""
    from gradcomp.config import backend_from_env, resolve_timeout
    timeout = resolve_timeout(timeout)
    if isinstance(backend, Communicator):
        return backend if getattr(backend, "_tf_ready", False) else HostComm(backend)
    if backend is None:
        backend = backend_from_env()
    if not isinstance(backend, str):
        raise TypeError(f"backend must be None, a name (auto, mpi, horovod, torch) or a gradcomp "
                        f"Communicator, got {type(backend).__name__}")
    name = backend.strip().lower()
    from gradcomp.comm.launch import check_world, launcher
    launch = launcher()
    under_hvdrun = launch.engine == "horovod" and launch.size > 1
    if name == "horovod" or (name == "auto" and (_horovod_tf(True) is not None
                                                 or (under_hvdrun and _horovod_tf(False) is not None))):
        if _horovod_tf(False) is None:
            raise RuntimeError("GRADCOMP_BACKEND=horovod: horovod.tensorflow is not importable. Horovod 0.28.1 "
                               "does not build against TensorFlow 2.20+ (mpi/build_horovod_tf.sh builds it with "
                               "TF 2.19 in a venv of its own); or use GRADCOMP_BACKEND=mpi (mpi4py) "
                               "with `mpirun -np N python train.py` instead.")
        from gradcomp_tf.horovod_comm import HorovodTFCommunicator
        return check_world(HorovodTFCommunicator(), launch, name)
    try:
        from gradcomp.comm import make_communicator
    except ImportError:
        make_communicator = None
    if make_communicator is not None:
        return HostComm(make_communicator(backend=name, timeout=timeout))
    if name == "auto":
        return HostComm(SingleCommunicator())
    raise RuntimeError(f"transport {name!r} is not available in this gradcomp installation")


def init(backend=None, timeout="default") -> Communicator:
    """Create (once) the process-wide communicator; returns it. Safe to call more than once.

    `timeout`: seconds any collective may wait before raising CollectiveTimeout (None or 0: forever;
    default GRADCOMP_TIMEOUT, else 300); a bad value raises ValueError naming the valid forms."""
    from gradcomp.config import resolve_timeout
    given = not (isinstance(timeout, str) and timeout == "default")
    seconds = resolve_timeout(timeout)
    if _STATE["comm"] is None or backend is not None:
        _STATE["comm"] = make_comm(backend, timeout)
    elif given:
        inner = getattr(_STATE["comm"], "inner", _STATE["comm"])
        if hasattr(inner, "timeout"):
            inner.timeout = seconds
    return _STATE["comm"]


def comm() -> Communicator:
    return init() if _STATE["comm"] is None else _STATE["comm"]


def rank() -> int:
    return comm().rank


def size() -> int:
    return comm().size


def local_rank() -> int:
    return getattr(comm(), "local_rank", 0)


def resolve(backend) -> Communicator:
    """backend=None -> the process-wide communicator (init() on first use); else make_comm(backend)."""
    return comm() if backend is None else make_comm(backend)


# --------------------------------------------------------------------------------- host boundary
def _is_tf(x) -> bool:
    m = type(x).__module__
    return m.startswith("tensorflow") or m.startswith("keras")


def _to_host(x):
    if _is_tf(x):
        return x.numpy(), getattr(x, "device", "") or ""
    return x, None


def _to_tf(a, device):
    import tensorflow as tf
    if device is None:                         # the caller passed numpy: answer in numpy
        return a
    a = np.ascontiguousarray(a)
    if "GPU" in device.upper() or "TPU" in device.upper():
        with tf.device(device):
            return tf.identity(tf.convert_to_tensor(a))
    return tf.convert_to_tensor(a)


class HostComm(Communicator):
    """Wraps an engine that works on host arrays: TF payload -> numpy -> engine -> TF tensor.

    Only payloads (already compressed, fused 1-D arrays) cross this boundary. numpy inputs are
    passed through and answered in numpy (configuration checks, barriers).
    """

    _tf_ready = True

    def __init__(self, inner: Communicator):
        self.inner = inner
        self.rank, self.size = inner.rank, inner.size
        self.local_rank = getattr(inner, "local_rank", 0)
        self.engine = f"{getattr(inner, 'engine', '?')}"

    def allreduce(self, x, *, name=""):
        a, dev = _to_host(x)
        return ThenHandle(self.inner.allreduce(a, name=name), lambda r: _to_tf(r, dev))

    def allgather(self, x, *, name=""):
        a, dev = _to_host(x)
        return ThenHandle(self.inner.allgather(a, name=name), lambda rs: [_to_tf(r, dev) for r in rs])

    def broadcast(self, x, *, root=0, name=""):
        a, dev = _to_host(x)
        return ThenHandle(self.inner.broadcast(a, root=root, name=name), lambda r: _to_tf(r, dev))

    def barrier(self):
        return self.inner.barrier()

    def __repr__(self):
        return f"<HostComm over {self.inner!r} rank {self.rank}/{self.size}>"
