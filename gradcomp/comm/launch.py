"""Which launcher started this process, and how many processes it started (from its environment).

    launcher()            -> Launch(name, size, rank, evidence)
    check_world(comm, l)  -> raises LauncherMismatchError when a transport's world disagrees with it

What each launcher leaves in the environment of the processes it starts (checked in this order):
  torchrun             TORCHELASTIC_RUN_ID, WORLD_SIZE, RANK, LOCAL_WORLD_SIZE
  horovodrun --gloo    HOROVOD_RANK, HOROVOD_SIZE, HOROVOD_CONTROLLER=gloo
  horovodrun (MPI)     no HOROVOD_* variable: it runs Open MPI's mpirun with its fixed flags
                       `--tag-output -mca pml ob1 -mca btl ^openib`, which reach the ranks as
                       OMPI_MCA_orte_tag_output=1, OMPI_MCA_pml=ob1, OMPI_MCA_btl=^openib beside
                       OMPI_COMM_WORLD_SIZE; that combination is what we recognise (a hand-written
                       mpirun with exactly these flags reads as horovodrun too)
  mpirun / mpiexec     OMPI_COMM_WORLD_SIZE (Open MPI), PMI_SIZE (MPICH, Intel MPI, Slurm PMI),
                       MV2_COMM_WORLD_SIZE (MVAPICH2)
  torch env:// by hand MASTER_ADDR, WORLD_SIZE, RANK (e.g. mpi/netlab/run.sh)
The transport `auto` picks for each is in gradcomp/comm/factory.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
_HOROVODRUN_MPI_FLAGS = {"OMPI_MCA_orte_tag_output": "1", "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "^openib"}
ENGINE_OF = {"torchrun": "torch", "torch-env": "torch", "horovodrun": "horovod", "horovodrun-gloo": "horovod",
             "mpirun": "mpi", "none": "single"}


class LauncherMismatchError(RuntimeError):
    """The chosen transport's world does not match the processes the launcher started."""


@dataclass(frozen=True)
class Launch:
    name: str                # torchrun | torch-env | horovodrun | horovodrun-gloo | mpirun | none
    size: int                # processes the launcher started (1 when none)
    rank: int | None = None
    evidence: str = ""       # the variable(s) that told us, e.g. "OMPI_COMM_WORLD_SIZE=2"

    @property
    def engine(self) -> str:
        """The transport that matches this launcher (what `auto` prefers)."""
        return ENGINE_OF[self.name]

    def describe(self) -> str:
        label = {"horovodrun-gloo": "horovodrun --gloo", "torch-env": "a torch env:// launch",
                 "none": "no launcher"}.get(self.name, self.name)
        return f"{label} ({self.evidence})" if self.evidence else label


def _int(env, key):
    raw = str(env.get(key, "")).strip()
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def launcher(environ=None) -> Launch:
    """What launched this process, read from `environ` (default os.environ)."""
    env = os.environ if environ is None else environ
    ws, rk = _int(env, "WORLD_SIZE"), _int(env, "RANK")
    if "TORCHELASTIC_RUN_ID" in env and ws:
        return Launch("torchrun", ws, rk, f"WORLD_SIZE={ws}")
    hs = _int(env, "HOROVOD_SIZE")
    if hs and "HOROVOD_RANK" in env:
        return Launch("horovodrun-gloo", hs, _int(env, "HOROVOD_RANK"), f"HOROVOD_SIZE={hs}")
    for var, rvar in zip(_MPI_SIZE_VARS, _MPI_RANK_VARS):
        n = _int(env, var)
        if n:
            if var == "OMPI_COMM_WORLD_SIZE" and all(env.get(k) == v for k, v in _HOROVODRUN_MPI_FLAGS.items()):
                return Launch("horovodrun", n, _int(env, rvar), f"{var}={n} with horovodrun's mpirun flags")
            return Launch("mpirun", n, _int(env, rvar), f"{var}={n}")
    if ws and rk is not None and "MASTER_ADDR" in env:
        return Launch("torch-env", ws, rk, f"WORLD_SIZE={ws}")
    return Launch("none", 1)


def check_world(comm, launch: Launch | None = None, backend: str = "", environ=None):
    """Raise LauncherMismatchError when `comm` (a world communicator) has a different number of ranks
    than the launcher started, e.g. GRADCOMP_BACKEND=mpi under torchrun (every process a world of
    one, training alone). Returns `comm`."""
    launch = launcher(environ) if launch is None else launch
    size = int(getattr(comm, "size", 1))
    if launch.size > 1 and size != launch.size:
        raise mismatch_error(launch, backend or getattr(comm, "engine", "?"), size)
    return comm


def mismatch_error(launch: Launch, backend: str, size: int) -> LauncherMismatchError:
    alone = " (every process would train alone on its own data)" if size == 1 else ""
    return LauncherMismatchError(
        f"this process was started by {launch.describe()}, {launch.size} processes, but the {backend!r} "
        f"transport sees a world of {size} rank(s){alone}. Use GRADCOMP_BACKEND=auto (or unset it) to take "
        f"the launcher's own transport ({launch.engine} for {launch.name}), or start the job with the launcher "
        "that matches the backend: mpirun for mpi, torchrun for torch, horovodrun for horovod.")


# ------------------------------------------------------------------ launching jobs on a loaded machine
LOAD_CAP = 6.0


def load_factor(cap: float = LOAD_CAP) -> float:
    """How many times slower than idle this machine is likely to run a job now: the 1-minute load
    average per usable core, at least 1, at most `cap` (1 where the load average is unavailable)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 1.0
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return float(min(cap, max(1.0, load / max(1, cores))))


def scaled_timeout(seconds: float, cap: float = LOAD_CAP) -> float:
    """`seconds` (what a job needs on an idle machine, with margin) scaled by load_factor()."""
    return float(seconds) * load_factor(cap)


class JobTimeout(RuntimeError):
    """A job launched by run_job outlived its (load-scaled) timeout on every attempt."""

    def __init__(self, message, output=""):
        super().__init__(message)
        self.output = output


@dataclass
class JobResult:
    returncode: int
    output: str              # stdout and stderr together
    elapsed: float           # seconds of the last attempt
    attempts: int
    ended_at: float          # time.time() when the last attempt ended


def run_job(cmd, timeout: float, *, env=None, cwd=None, retries: int = 1, scale: bool = True,
            label: str = "", log=None) -> JobResult:
    """Run `cmd` (a launcher command line) in its own session, stdout+stderr captured.

    The timeout is `timeout` scaled by the machine's load (scale=True) at each attempt. A job that
    outlives it has its whole process group SIGKILLed; it is then retried up to `retries` times, each
    time with twice the timeout, after printing (to `log`, default stderr) which job timed out, after
    how long, and at what load. When every attempt timed out, JobTimeout (with the output) is raised.
    Use retries=0 where a timeout is itself the failure being tested (a hang)."""
    import signal
    import subprocess
    import sys
    import time
    log = sys.stderr if log is None else log
    what = label or " ".join(map(str, cmd[:6])) + (" ..." if len(cmd) > 6 else "")
    base = float(timeout)
    for attempt in range(retries + 1):
        limit = scaled_timeout(base) if scale else base
        t0 = time.monotonic()
        # stdin from /dev/null: mpirun forwards its stdin to rank 0, and an inherited stdin (a caller's
        # pipe or terminal) left the netlab launches of tests/test_benchmarks_smoke.py hanging until killed
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=limit)
            return JobResult(proc.returncode, out, time.monotonic() - t0, attempt + 1, time.time())
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal)
            out, _ = proc.communicate()
            note = (f"{what}: timed out after {limit:.0f}s (attempt {attempt + 1} of {retries + 1}; load average "
                    f"{_load():.1f}, load factor {load_factor():.1f})")
            if attempt < retries:
                print(f"{note}; the machine may be loaded: retrying once with twice the timeout", file=log,
                      flush=True)
                base *= 2
                continue
            raise JobTimeout(f"{note}; output tail:\n{(out or '')[-4000:]}", out or "") from None
        except BaseException:               # Ctrl-C, pytest-timeout: leave nothing running
            _kill_group(proc, signal)
            proc.wait()
            raise


def _kill_group(proc, signal):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")
