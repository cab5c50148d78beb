"""MPI transport: mpi4py over Open MPI (or any MPI), asynchronous through one worker thread.

    comm = MPICommunicator()            # a private duplicate of MPI.COMM_WORLD
    h = comm.allreduce(x, name="b0")    # returns at once; the collective runs on the worker
    ...                                 # overlap: the caller keeps computing
    total = h.wait()                    # the sum, same type/dtype/device as x

Data path (no framework copies on the host):
  * numpy arrays and CPU torch tensors go zero-copy through the buffer protocol (`Tensor.numpy()`).
  * TF eager tensors go through `.numpy()` and come back with `tf.convert_to_tensor`.
  * CUDA torch tensors go straight to MPI when Open MPI reports CUDA support
    (`MPIX_Query_cuda_support`, else `ompi_info`); otherwise they are staged once through pinned
    host memory (one device->host copy at issue, one host->device copy at `wait()`).
Asynchrony: a single worker thread per communicator runs the collectives in issue order, so they
overlap the caller's work; mpi4py releases the GIL inside MPI calls. This needs MPI initialised with
MPI_THREAD_SERIALIZED or MULTIPLE (mpi4py asks for MULTIPLE); under SERIALIZED the caller must not make
its own MPI calls while a collective is pending. With a lower thread level, collectives run
synchronously at issue time (same results, no overlap). The worker starts each collective
nonblocking and, with progress="block", waits in MPI_Wait: fastest, but Open MPI spins a
core while it waits, so give each rank spare cores (`mpirun --bind-to none`, or `--map-by
slot:PE=N`); under mpirun's default bind-to-core the spinning worker and the caller's compute
threads share one core. progress="poll" drives the collective with MPI_Test and sleeps backing off
to `poll_max` seconds: it leaves the core to the caller, but Open MPI progresses nonblocking
collectives only inside MPI calls, so large messages take several times longer. progress="auto"
(default) blocks when each local rank has at least 2 cores of its own (its CPU affinity, and the node's
cores shared by the local ranks), and polls otherwise, where a spinning worker would take the compute
threads' core (measurements: docs/benchmarks.md part 4).
The input must not be modified until `wait()` returns (as with any nonblocking MPI call).
Wire format (bytes are the payload's own, nothing is widened on the host path):
  allreduce   MPI_Iallreduce(SUM). libnbc's default for fewer than 4 ranks or in place is a
              binomial tree, which sends the data over the links one way after the other, so in a
              world of 2 ranks gradcomp switches libnbc to recursive doubling (process-wide, through
              MPI_T; `nbc_recursive_doubling`), or else sums 2 ranks by its own pairwise exchange;
              with 4+ ranks in-place sums get a separate buffer (`_sum`). allreduce_algorithm="mpi"
              leaves MPI's choice alone, "pairwise" skips the MPI_T switch. float16 and bfloat16 use user-defined sum ops (Open MPI 4.1 has
              no half-precision SUM) that add in float32 and round once to nearest-even, so 2 bytes
              per element travel. Integer sums wrap like numpy (int8/uint8 through a numpy op too:
              Open MPI 4.1's AVX SUM saturates them). On the CUDA-aware path those four dtypes are
              widened on the device (fp16/bf16 -> float32, int8/uint8 -> int32: 4 bytes per element).
  allgather   MPI_Allgather of (count, dtype) per rank, then MPI_Allgatherv of the data.
  broadcast   MPI_Bcast of (count, dtype), then of the data.
A failed collective marks the communicator broken: later ones fail at once instead of hanging.
Timeouts: every wait (a handle's `wait()`, the set-up collectives of the constructor, the drain of
pending collectives at exit) is bounded by `timeout` seconds (default GRADCOMP_TIMEOUT, 300; None
or 0: forever) and then raises CollectiveTimeout naming the collective and the rank. A process that
exits while one of its collectives is still pending after that long calls MPI_Abort (MPI_Finalize
would wait forever). `import_mpi()` installs the abort-on-uncaught-exception hook of
gradcomp/comm/abort.py, so a rank that raises ends the whole job at once.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import warnings
import weakref

import numpy as np

from gradcomp.comm.base import CODES as _CODES, Communicator, Handle, timeout_error

_HOST = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "float64": np.float64,
         "int8": np.int8, "uint8": np.uint8, "int32": np.int32, "int64": np.int64}
_MPI_TYPE = {"float16": "UINT16_T", "bfloat16": "UINT16_T", "float32": "FLOAT", "float64": "DOUBLE",
             "int8": "INT8_T", "uint8": "UINT8_T", "int32": "INT32_T", "int64": "INT64_T"}
_INSTALL = ('the "mpi" backend needs mpi4py and an MPI library: apt-get install openmpi-bin libopenmpi-dev '
            '&& pip install "gradcomp[mpi]"')


def import_mpi():
    """mpi4py.MPI (initialising MPI), with the abort hook installed when the world has > 1 rank."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    from gradcomp.comm.abort import install_mpi_abort
    install_mpi_abort(MPI)
    return MPI


def wait_request(req, timeout, what: str, poll_max: float = 5e-4):
    """Complete an MPI request within `timeout` seconds (None: MPI_Wait), polling MPI_Test with a
    backing-off sleep; `what()` gives (op, name, rank, size) for the CollectiveTimeout."""
    if timeout is None:
        req.Wait()
        return
    deadline = time.monotonic() + timeout
    delay = 0.0
    while not req.Test():
        if time.monotonic() > deadline:
            op, name, rank, size = what()
            raise timeout_error("MPI", op, name, rank, size, timeout)
        time.sleep(delay)
        delay = min(poll_max, max(2e-5, delay * 1.5))


# Open MPI's libnbc (4.1) runs MPI_Iallreduce as a binomial reduce-to-root then broadcast whenever
# there are fewer than 4 ranks or the call is in place: each rank's data crosses the links one
# after the other, twice the time of a bandwidth-optimal allreduce. So (allreduce_algorithm="auto"):
# in a world of 2 ranks the transport switches libnbc to recursive doubling (`nbc_recursive_doubling`:
# one exchange both ways at once, optimal for 2 ranks, order-preserving, any count, in place);
# where that is not possible, 2 ranks sum by the pairwise exchange of `_sum`; with 4 or more ranks
# an in-place sum gets a separate receive buffer (libnbc then picks Rabenseifner's algorithm).
_PAIR_TAG = 7301                      # our communicator is private: only its worker sends on it
_NBC_VAR, _NBC_RDBL = "coll_libnbc_iallreduce_algorithm", 4


def nbc_recursive_doubling(MPI) -> bool:
    """Make Open MPI's libnbc run every MPI_Iallreduce of this process by recursive doubling (its
    MCA variable coll_libnbc_iallreduce_algorithm=4, written through the MPI_T tool interface);
    True when that is in effect. Process-wide: call it only where every rank does (the same value
    on all ranks keeps their algorithms equal). A value the user chose (OMPI_MCA_ environment,
    `mpirun --mca`, or anything but the default 0) is left alone; other MPIs: False."""
    env = os.environ.get("OMPI_MCA_" + _NBC_VAR)
    if env is not None:
        return env.strip() in (str(_NBC_RDBL), "recursive_doubling")
    try:
        lib = ctypes.CDLL(None)
        init, get_index = lib.MPI_T_init_thread, lib.MPI_T_cvar_get_index
        alloc, read, write, free = (lib.MPI_T_cvar_handle_alloc, lib.MPI_T_cvar_read, lib.MPI_T_cvar_write,
                                    lib.MPI_T_cvar_handle_free)
    except (AttributeError, OSError):
        return False
    provided, idx, handle, count, cur = ctypes.c_int(), ctypes.c_int(), ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int(-1)
    if init(ctypes.c_int(MPI.Query_thread()), ctypes.byref(provided)) != 0:
        return False
    if get_index(_NBC_VAR.encode(), ctypes.byref(idx)) != 0:
        return False
    if alloc(idx, None, ctypes.byref(handle), ctypes.byref(count)) != 0 or count.value != 1:
        return False
    try:
        if read(handle, ctypes.byref(cur)) != 0 or cur.value not in (0, _NBC_RDBL):
            return False
        if cur.value == _NBC_RDBL:
            return True
        want = ctypes.c_int(_NBC_RDBL)
        return write(handle, ctypes.byref(want)) == 0 and read(handle, ctypes.byref(cur)) == 0 \
            and cur.value == _NBC_RDBL
    finally:
        free(ctypes.byref(handle))


# ------------------------------------------------------------------ half-precision sums
def bf16_to_f32(u16):
    return (np.asarray(u16, np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(f):
    """float32 -> bfloat16 bits, round to nearest even (NaN stays NaN)."""
    f = np.asarray(f, np.float32)
    u = f.view(np.uint32)
    out = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return out


_TORCH_SUM_MIN = 4096       # elements; below this numpy's call overhead is the smaller


def _torch_add(a, b, dtype_name) -> bool:
    """b += a through torch's vectorised half-precision add (float32 sum, one rounding to nearest
    even: the same bits as the numpy paths below, at a fraction of their time on large arrays),
    when torch is already imported; False when it is not (this module never imports torch)."""
    torch = sys.modules.get("torch")
    if torch is None or b.size < _TORCH_SUM_MIN:
        return False
    with warnings.catch_warnings():        # `a` may be a read-only MPI buffer: it is only read
        warnings.simplefilter("ignore")
        ta, tb = torch.from_numpy(a.view(np.int16)), torch.from_numpy(b.view(np.int16))
    dt = getattr(torch, dtype_name)
    tb.view(dt).add_(ta.view(dt))
    return True


def _sum_f16(inbuf, inoutbuf, datatype):
    a, b = np.frombuffer(inbuf, np.float16), np.frombuffer(inoutbuf, np.float16)
    if not _torch_add(a, b, "float16"):
        np.add(a, b, out=b)                # numpy adds halves in float32 and rounds once


def _sum_bf16(inbuf, inoutbuf, datatype):
    a, b = np.frombuffer(inbuf, np.uint16), np.frombuffer(inoutbuf, np.uint16)
    if not _torch_add(a, b, "bfloat16"):
        b[:] = f32_to_bf16(bf16_to_f32(a) + bf16_to_f32(b))


def _wrapping_sum(np_dtype):
    def fn(inbuf, inoutbuf, datatype):
        b = np.frombuffer(inoutbuf, np_dtype)
        np.add(np.frombuffer(inbuf, np_dtype), b, out=b)
    return fn


# Open MPI 4.1's AVX op component SATURATES 8-bit sums (measured: int8 -27 + -128 -> -128), so
# int8/uint8 use numpy's wrapping add like every other transport and LocalWorld.
_OWN_SUMS = {"float16": _sum_f16, "bfloat16": _sum_bf16,
             "int8": _wrapping_sum(np.int8), "uint8": _wrapping_sum(np.uint8)}
_OPS: dict = {}


def _sum_op(MPI, dtype):
    if dtype not in _OWN_SUMS:
        return MPI.SUM
    if dtype not in _OPS:
        _OPS[dtype] = MPI.Op.Create(_OWN_SUMS[dtype], commute=True)
    return _OPS[dtype]


def cuda_aware_mpi() -> bool:
    """Does the loaded MPI library move CUDA device memory itself? (Open MPI's own report.)"""
    try:
        fn = ctypes.CDLL(None).MPIX_Query_cuda_support
        fn.restype = ctypes.c_int
        return bool(fn())
    except (AttributeError, OSError):
        pass
    exe = shutil.which("ompi_info")
    if exe:
        try:
            out = subprocess.run([exe, "--parsable", "--all"], capture_output=True, text=True, timeout=30).stdout
            return "mpi_built_with_cuda_support:value:true" in out
        except (OSError, subprocess.SubprocessError):
            pass
    return False


def torch_or_numpy(x, buf):
    """What the worker copies from: the CPU torch tensor itself (torch's copy releases the GIL), else
    the numpy buffer."""
    mod = type(x).__module__
    if mod.startswith("torch") and x.dtype.is_floating_point and str(x.dtype) != "torch.bfloat16":
        return x.detach().reshape(-1)
    return buf


def fill(out, srcs, bounds):
    """Concatenate `srcs` into the host array `out` (on the worker thread)."""
    dst = None
    for s, a, b in zip(srcs, bounds[:-1], bounds[1:]):
        if isinstance(s, np.ndarray):
            out[a:b] = s
        else:
            if dst is None:
                import torch
                dst = torch.from_numpy(out)
            dst[a:b].copy_(s)


def cores_per_rank(local_size: int) -> int:
    """Cores one of `local_size` ranks on this node can use without taking them from another."""
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = os.cpu_count() or 1
    return max(1, min(mine, (os.cpu_count() or 1) // max(1, local_size)))


# ------------------------------------------------------------------ framework <-> buffer
class _View:
    """A 1-D contiguous buffer MPI can read (numpy, or a CUDA tensor) and the way back.

    `mark()` is called on the caller's thread once the buffer is final; `ready()` on the worker
    before MPI touches it (for CUDA: the copies/kernels queued on the caller's stream are done).
    """

    def __init__(self, buf, dtype, back, alloc=None):
        self.buf, self.dtype, self.back = buf, dtype, back
        self.alloc = alloc or (lambda n, dt: np.empty(n, _HOST[dt]))
        self.n = int(buf.shape[0])
        self.event = None
        self.device = None                          # set for CUDA-aware views

    def mark(self):
        if self.device is not None:
            import torch
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(self.device))

    def ready(self):
        if self.event is not None:
            self.event.synchronize()

    def copy(self):
        """A private copy (made on the caller's thread/stream)."""
        out = self.alloc(self.n, self.dtype)
        if self.device is not None:
            out.copy_(self.buf)
        else:
            self.ready()
            out[:] = self.buf
        return out

    def widen(self):
        """CUDA-aware allreduce of a dtype summed by a host (numpy) op: fp16/bf16 are summed as
        float32, int8/uint8 as int32, on the device; cast back afterwards (integers wrap)."""
        import torch
        src, back, dev = self.buf, self.back, self.device
        orig = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
                "uint8": torch.uint8}[self.dtype]
        wide = torch.int32 if self.dtype in ("int8", "uint8") else torch.float32
        self.buf = (src.view(torch.bfloat16) if self.dtype == "bfloat16" else src).to(wide)
        self.dtype, self.back = str(wide).replace("torch.", ""), lambda r: back(r.to(orig).view(src.dtype))

        def alloc(n, dt):
            with torch.cuda.device(dev):
                return torch.empty(n, dtype=wide, device=dev)
        self.alloc = alloc


def _check_1d(x, shape):
    if len(shape) != 1:
        raise ValueError(f"MPI collectives take one 1-D array, got shape {tuple(shape)}; flatten it first")


def _numpy_view(a, back=lambda r: r):
    _check_1d(a, a.shape)
    name = "bfloat16" if a.dtype.name == "bfloat16" else a.dtype.name
    if name not in _HOST:
        raise TypeError(f"MPI transport: dtype {a.dtype} is not supported; use one of {', '.join(_CODES)}")
    a = np.ascontiguousarray(a)
    if name == "bfloat16":
        bf = a.dtype
        return _View(a.view(np.uint16), name, lambda r: back(r.view(bf)))
    return _View(a, name, back)


def _torch_view(t, cuda_aware):
    import torch
    from gradcomp.backend.torch_backend import _NAME
    _check_1d(t, t.shape)
    name = _NAME.get(t.dtype)
    if name not in _HOST:
        raise TypeError(f"MPI transport: dtype {t.dtype} is not supported; use one of {', '.join(_CODES)}")
    t = t.detach().contiguous()
    if t.device.type == "cpu":
        if name == "bfloat16":
            return _View(t.view(torch.int16).numpy().view(np.uint16), name,
                         lambda r: torch.from_numpy(r.view(np.int16)).view(torch.bfloat16))
        return _View(t.numpy(), name, torch.from_numpy)
    if t.device.type != "cuda":
        raise TypeError(f"MPI transport: tensors on {t.device} are not supported (cpu or cuda)")
    dev = t.device
    if cuda_aware:                               # MPI reads/writes device memory directly
        buf = t.view(torch.int16) if name == "bfloat16" else t

        def alloc(n, dt):
            with torch.cuda.device(dev):
                return torch.empty(n, dtype=torch.int16 if dt == "bfloat16" else buf.dtype, device=dev)

        def back(r):
            r.record_stream(torch.cuda.current_stream(dev))
            return r.view(torch.bfloat16) if r.dtype == torch.int16 and name == "bfloat16" else r
        v = _View(buf, name, back, alloc)
        v.device = dev
        return v
    # staged once through pinned host memory
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(dev))
    hbuf = host.view(torch.int16).numpy().view(np.uint16) if name == "bfloat16" else host.numpy()

    def alloc(n, dt):
        p = torch.empty(n * np.dtype(_HOST[dt]).itemsize, dtype=torch.uint8, pin_memory=True)
        return p.numpy().view(_HOST[dt])

    def back(r):
        out = torch.from_numpy(r.view(np.int16) if name == "bfloat16" else r)
        out = out.view(torch.bfloat16) if name == "bfloat16" else out
        return out.to(dev, non_blocking=False)   # synchronous: the pinned block may be reused after
    v = _View(hbuf, name, back, alloc)
    v.event, v.keep = ev, host
    return v


def _tf_view(x):
    import tensorflow as tf
    if not hasattr(x, "numpy"):
        raise TypeError("MPI transport needs eager TF tensors; inside tf.function call it through "
                        "tf.py_function (gradcomp_tf does this for you)")
    device = getattr(x, "device", "") or "/cpu:0"

    def back(r):
        with tf.device(device):
            return tf.convert_to_tensor(r)
    return _numpy_view(np.asarray(x.numpy()), back)


# ------------------------------------------------------------------ async machinery
class _Failed:
    """A collective that completed alike on every rank but whose result is an error for the caller."""

    def __init__(self, error):
        self.error = error


class _Requests:
    """Several MPI requests completed as one (Test/Wait of all)."""

    def __init__(self, MPI, reqs):
        self.MPI, self.reqs = MPI, reqs

    def Test(self):
        return self.MPI.Request.Testall(self.reqs)

    def Wait(self):
        self.MPI.Request.Waitall(self.reqs)


class MPIHandle(Handle):
    """Result of one collective; `wait(timeout=None)` blocks, re-raising a worker error."""

    def __init__(self, op, name, rank, timeout, post=lambda r: r, size=0):
        self.op, self.name, self.rank, self.timeout, self._post = op, name, rank, timeout, post
        self.size = size
        self._event = threading.Event()
        self._raw = self._error = None
        self._got, self._value = False, None

    def _finish(self, raw=None, error=None):
        self._raw, self._error = raw, error
        self._event.set()

    def done(self):
        return self._event.is_set()

    def wait(self, timeout=None):
        t = self.timeout if timeout is None else timeout
        if not self._event.wait(t):
            raise timeout_error("MPI", self.op, self.name, self.rank, self.size, t)
        if self._error is not None:
            raise self._error
        if isinstance(self._raw, _Failed):
            raise self._raw.error
        if not self._got:
            self._value, self._got, self._raw = self._post(self._raw), True, None
        return self._value


class _Worker:
    """One thread executing collectives strictly in submission order."""

    def __init__(self, label):
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.broken: BaseException | None = None
        self.current = None                         # "MPI op('name')" while a collective runs
        self.thread = threading.Thread(target=self._run, name=label, daemon=True)
        self.thread.start()

    def submit(self, fn, handle):
        self.q.put((fn, handle))

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            self.current = f"MPI {item[1].op}({item[1].name!r})"
            _run_one(self, *item)
            self.current = None

    def stop(self, timeout=5.0):
        self.q.put(None)
        self.thread.join(timeout)             # None: until the pending collectives are done


def _run_one(state, fn, handle):
    """Run one collective, recording failure so later ones fail fast instead of hanging."""
    if state.broken is not None:
        handle._finish(error=RuntimeError(
            f"MPI {handle.op}({handle.name!r}) was not run: an earlier collective failed on rank "
            f"{handle.rank}: {state.broken!r}"))
        return
    try:
        handle._finish(fn())
    except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
        e.add_note(f"in MPI {handle.op}({handle.name!r}) on rank {handle.rank}")
        state.broken = e
        handle._finish(error=e)


class MPICommunicator(Communicator):
    """Communicator over mpi4py. Collective calls must be issued in the same order on every rank."""

    engine = "mpi"
    accepts_donation = True
    native_sendrecv = True

    def __init__(self, comm=None, *, threaded: bool | None = None, timeout="default",
                 cuda_aware: bool | None = None, progress: str = "auto", poll_max: float = 5e-4,
                 allreduce_algorithm: str = "auto"):
        from gradcomp.config import resolve_timeout
        self.timeout = resolve_timeout(timeout)
        MPI = self.MPI = import_mpi()
        base = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = base.Get_rank(), base.Get_size()
        what = lambda op: lambda: (op, "MPICommunicator()", self.rank, self.size)   # noqa: E731
        if hasattr(base, "Idup"):                   # set-up collectives are bounded by the timeout too
            self.comm, req = base.Idup()
            wait_request(req, self.timeout, what("dup"))
        else:
            self.comm = base.Dup()                  # our traffic never matches the user's messages
        # ranks sharing this node (by processor name): an allgather, so a missing peer times out
        me = np.frombuffer(MPI.Get_processor_name().encode()[:255].ljust(256, b"\0"), np.uint8).copy()
        names = np.empty((self.size, 256), np.uint8)
        wait_request(self.comm.Iallgather([me, MPI.UINT8_T], [names, MPI.UINT8_T]), self.timeout,
                     what("allgather"))
        same = [bool((names[r] == me).all()) for r in range(self.size)]
        self.local_rank, self.local_size = sum(same[:self.rank]), sum(same)
        self.thread_level = MPI.Query_thread()
        can = self.thread_level >= MPI.THREAD_SERIALIZED
        if threaded and not can:
            raise RuntimeError("MPICommunicator(threaded=True) needs MPI_THREAD_SERIALIZED or MULTIPLE; "
                               "set mpi4py.rc.thread_level = 'multiple' before importing mpi4py.MPI")
        self.threaded = can if threaded is None else bool(threaded)
        if progress not in ("auto", "poll", "block"):
            raise ValueError(f"progress must be 'auto', 'poll' or 'block', got {progress!r}")
        if progress == "auto":
            progress = "block" if cores_per_rank(self.local_size) >= 2 else "poll"
        if allreduce_algorithm not in ("auto", "pairwise", "mpi"):
            raise ValueError(f"allreduce_algorithm must be 'auto', 'pairwise' or 'mpi' (see the comment above "
                             f"nbc_recursive_doubling in gradcomp/comm/mpi.py), got {allreduce_algorithm!r}")
        self.allreduce_algorithm = allreduce_algorithm
        self.pairwise = allreduce_algorithm != "mpi"          # gradcomp picks how large sums travel
        self.nbc_rdbl = allreduce_algorithm == "auto" and MPI.COMM_WORLD.Get_size() == 2 and \
            nbc_recursive_doubling(MPI)
        self._cuda_aware, self.progress, self.poll_max = cuda_aware, progress, poll_max
        self.broken = None
        self._lock = threading.Lock()
        self._worker = _Worker(f"gradcomp-mpi-r{self.rank}") if self.threaded else None
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close(at_exit=True))

    # ------------------------------------------------------------------ plumbing
    @property
    def cuda_aware(self) -> bool:
        if self._cuda_aware is None:
            self._cuda_aware = cuda_aware_mpi()
        return self._cuda_aware

    def _view(self, x):
        mod = type(x).__module__
        if isinstance(x, np.ndarray):
            return _numpy_view(x)
        if mod.startswith("torch"):
            return _torch_view(x, x.device.type == "cuda" and self.cuda_aware)
        if mod.startswith("tensorflow") or mod.startswith("keras"):
            return _tf_view(x)
        raise TypeError(f"MPI transport: unsupported array type {type(x)!r}; pass numpy, torch or TF")

    def _issue(self, op, name, fn, post):
        if self.comm is None:
            raise RuntimeError("this MPICommunicator was closed; make a new one")
        h = MPIHandle(op, name, self.rank, self.timeout, post, self.size)
        with self._lock:
            if self._worker is not None:
                self._worker.submit(fn, h)
            else:
                self._sync_what = (op, name)
                _run_one(self, fn, h)
        return h

    def _complete(self, start):
        """Run the nonblocking collective `start()` returns, to completion, by the progress mode:
        "block": MPI_Wait (lowest latency; Open MPI spins while it waits, also for late peers);
        "poll": MPI_Test with sleeps backing off to `poll_max` seconds, so a waiting worker does not
        keep a core busy (the caller's compute gets it), but large messages progress only in MPI_Test.
        (Tried and dropped: an MPI_Ibarrier polled first, then MPI_Wait, so that no rank spins for a
        late peer: no faster than either mode in benchmarks/torch_vs_horovod.py on 2 cores.)
        Without a worker thread (synchronous mode) the caller is the one waiting, so the wait is
        bounded by `timeout` here."""
        req = start()
        if self._worker is None:
            op, name = getattr(self, "_sync_what", ("collective", ""))
            wait_request(req, self.timeout, lambda: (op, name, self.rank, self.size), self.poll_max)
            return
        if self.progress == "block":
            req.Wait()
            return
        delay, spins = 0.0, 0
        while not req.Test():
            spins += 1
            if spins > 50:
                time.sleep(delay)
                delay = min(self.poll_max, max(2e-5, delay * 1.5))

    def _dt(self, dtype):
        return getattr(self.MPI, _MPI_TYPE[dtype])

    def _sum(self, send, out, dt, op, host=True):
        """Sum over ranks into `out` (send is MPI.IN_PLACE: `out` holds this rank's data), run to
        completion by `_complete`. MPI_Iallreduce as it is where libnbc already runs recursive
        doubling (`nbc_rdbl`), for device buffers and 3 ranks. Otherwise with 2 ranks (host memory):
        one pairwise exchange, both directions at once, then `op` locally; the op is commutative, so
        both ranks hold the same bits (and the same as MPI_Allreduce's). With 4 or more ranks an
        in-place sum goes through a separate receive buffer, so that libnbc may pick its
        bandwidth-optimal algorithm (see the comment above nbc_recursive_doubling)."""
        MPI, comm = self.MPI, self.comm
        inplace = send is MPI.IN_PLACE
        if not host or not self.pairwise or self.size == 3 or (self.size == 2 and self.nbc_rdbl):
            self._complete(lambda: comm.Iallreduce(send if inplace else [send, dt], [out, dt], op=op))
            return
        if self.size == 2:
            peer, mine = 1 - self.rank, (out if inplace else send)
            got = np.empty_like(out) if inplace else out
            self._complete(lambda: _Requests(MPI, [comm.Irecv([got, dt], source=peer, tag=_PAIR_TAG),
                                                   comm.Isend([mine, dt], dest=peer, tag=_PAIR_TAG)]))
            if inplace:
                op.Reduce_local([got, dt], [out, dt])      # out = peer's + mine
            else:
                op.Reduce_local([send, dt], [out, dt])     # out = mine + peer's
            return
        if not inplace:
            self._complete(lambda: comm.Iallreduce([send, dt], [out, dt], op=op))
            return
        tmp = np.empty_like(out)
        self._complete(lambda: comm.Iallreduce([out, dt], [tmp, dt], op=op))
        out[:] = tmp

    # ------------------------------------------------------------------ collectives
    def allreduce(self, x, *, name="", donate=False):
        v = self._view(x)
        if v.device is not None and v.dtype in _OWN_SUMS:   # our numpy ops cannot read device memory
            v.widen()
        dt, op = self._dt(v.dtype), _sum_op(self.MPI, v.dtype)
        in_place = donate and v.device is None and isinstance(v.buf, np.ndarray) and v.buf.flags.writeable
        out = v.buf if in_place else v.alloc(v.n, v.dtype)
        v.mark()

        def work():
            v.ready()
            self._sum(self.MPI.IN_PLACE if in_place else v.buf, out, dt, op, host=v.device is None)
            return out
        return self._issue("allreduce", name, work, v.back)

    def allreduce_group(self, xs, *, name="", donate=None):
        """Host arrays are concatenated by the worker thread, off the caller's thread (as Horovod fills
        its fusion buffer from its background thread), then summed in place in one MPI_Allreduce."""
        if len(xs) < 2 or self._worker is None:
            return super().allreduce_group(xs, name=name, donate=donate)
        views = [self._view(x) for x in xs]
        if any(v.device is not None or not isinstance(v.buf, np.ndarray) for v in views):
            return super().allreduce_group(xs, name=name, donate=donate)   # device memory: on the caller
        kinds = sorted({v.dtype for v in views})
        if len(kinds) != 1:
            raise TypeError(f"allreduce_group({name!r}) needs one dtype, got {kinds}")
        dtype = kinds[0]
        dt, op = self._dt(dtype), _sum_op(self.MPI, dtype)
        bounds = np.cumsum([0] + [v.n for v in views])
        out = np.empty(int(bounds[-1]), _HOST[dtype])
        srcs = [torch_or_numpy(x, v.buf) for x, v in zip(xs, views)]

        def work():
            fill(out, srcs, bounds)
            self._sum(self.MPI.IN_PLACE, out, dt, op)
            return out

        def post(total):
            return [v.back(total[a:b]) for v, a, b in zip(views, bounds[:-1], bounds[1:])]
        return self._issue("allreduce_group", name, work, post)

    def allgather(self, x, *, name=""):
        v = self._view(x)
        comm, size, MPI = self.comm, self.size, self.MPI
        dt, code = self._dt(v.dtype), _CODES.index(v.dtype)
        v.mark()

        def work():
            v.ready()
            meta = np.empty((size, 2), np.int64)
            self._complete(lambda: comm.Iallgather([np.array([v.n, code], np.int64), MPI.INT64_T], [meta, MPI.INT64_T]))
            # every rank sees the same meta, so these errors skip the data step everywhere alike
            if (meta[:, 1] != code).any():
                return _Failed(ValueError(f"allgather({name!r}): ranks passed different dtypes "
                                          f"{[_CODES[c] for c in meta[:, 1]]}; every rank must send the same dtype"))
            counts = meta[:, 0]
            if counts.sum() >= 2 ** 31:
                return _Failed(ValueError(f"allgather({name!r}): {counts.sum()} elements exceed MPI's 2**31 "
                                          "count limit; use smaller buckets"))
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            out = v.alloc(int(counts.sum()), v.dtype)
            self._complete(lambda: comm.Iallgatherv([v.buf, dt], [out, (counts.tolist(), displs.tolist()), dt]))
            return [out[int(o):int(o + c)] for o, c in zip(displs, counts)]
        return self._issue("allgather", name, work, lambda parts: [v.back(p) for p in parts])

    def broadcast(self, x, *, root=0, name=""):
        if not isinstance(root, int) or not 0 <= root < self.size:
            raise ValueError(f"broadcast root must be a rank in [0, {self.size}), got {root!r}")
        v = self._view(x)
        comm, MPI, me = self.comm, self.MPI, self.rank
        code = _CODES.index(v.dtype)
        src = v.copy() if (me == root and v.device is not None) else None   # device copy, caller's stream
        v.mark()

        def work():
            v.ready()
            hdr = np.array([v.n, code], np.int64)
            self._complete(lambda: comm.Ibcast([hdr, MPI.INT64_T], root=root))
            rdtype, n = _CODES[int(hdr[1])], int(hdr[0])
            if me == root:
                out = src if src is not None else v.copy()   # the result never aliases the input
            else:
                out = v.alloc(n, rdtype) if rdtype == v.dtype else np.empty(n, _HOST[rdtype])
            self._complete(lambda: comm.Ibcast([out, self._dt(rdtype)], root=root))
            if rdtype != v.dtype:                  # the collective itself completed: not "broken"
                return _Failed(ValueError(f"broadcast({name!r}): root {root} sent {rdtype} but rank {me} "
                                          f"passed {v.dtype}; pass the same dtype on every rank"))
            return out
        return self._issue(f"broadcast[{root}]", name, work, v.back)

    def sendrecv(self, x, *, dest=None, source=None, count=None, name=""):
        """MPI_Isend to `dest` and MPI_Irecv from `source` (tag 7), completed together."""
        from gradcomp.comm.base import check_peers
        check_peers(self, dest, source, name)
        v = self._view(x)
        comm, MPI, dt = self.comm, self.MPI, self._dt(v.dtype)
        out = v.alloc(v.n if count is None else int(count), v.dtype) if source is not None else None
        v.mark()

        def work():
            v.ready()
            reqs = ([comm.Irecv([out, dt], source=source, tag=7)] if source is not None else []) + \
                ([comm.Isend([v.buf, dt], dest=dest, tag=7)] if dest is not None else [])
            if reqs:
                self._complete(lambda: _Requests(MPI, reqs))
            return out
        return self._issue("sendrecv", name, work, lambda r: None if r is None else v.back(r))

    # ------------------------------------------------------------------ lifetime
    def close(self, at_exit: bool = False):
        """Stop the worker (pending collectives finish first) and free the duplicated communicator.

        At interpreter exit (`at_exit`), pending collectives get up to `timeout` seconds to finish;
        if one is still stuck then (a peer never joined it), MPI_Abort ends the job, since
        MPI_Finalize would wait for that peer forever."""
        w, self._worker = getattr(self, "_worker", None), None
        if w is not None:
            w.stop(self.timeout if at_exit else 5.0)
            if w.thread.is_alive():
                if at_exit and self.size > 1 and not self.MPI.Is_finalized():
                    import sys
                    print(f"gradcomp: rank {self.rank} of {self.size} is exiting while {w.current or 'a collective'} "
                          f"has not finished after {self.timeout}s (a peer never joined it); calling MPI_Abort "
                          "so that the job ends instead of waiting forever in MPI_Finalize",
                          file=sys.stderr, flush=True)
                    self.MPI.COMM_WORLD.Abort(1)
                return                              # stuck in a collective: leave the comm alone
        comm, self.comm = getattr(self, "comm", None), None
        try:
            if comm is not None and not self.MPI.Is_finalized():
                comm.Free()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass

