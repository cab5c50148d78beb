"""Transports: make_communicator selection, launcher detection, timeouts and errors (in-process), every
collective of the mpi, torch (Gloo) and horovod communicators across 2 real processes
(tests/mpi_scripts/comm_check.py), and the abort path: a rank that raises in an ordinary training loop
(tests/mpi_scripts/fail_probe.py, no error handling of its own) ends the job under mpirun, torchrun and
horovodrun within 30 s.

Each multi-process run has an outer timeout scaled by the machine's load (gradcomp.comm.launch.run_job);
a failing rank aborts the whole job.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gradcomp.comm import SingleCommunicator, make_communicator
from gradcomp.comm.factory import detect
from gradcomp.comm.launch import JobTimeout, LauncherMismatchError, launcher, run_job, scaled_timeout

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "mpi_scripts" / "comm_check.py"
PROBE = ROOT / "tests" / "mpi_scripts" / "fail_probe.py"
TIMEOUT = 120                     # seconds a launch needs on an idle machine, with margin (scaled by load)
OUTER = scaled_timeout(TIMEOUT) + 60   # pytest-timeout: above the launch's own (scaled at collection)


_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "WORLD_SIZE",
                  "RANK", "MASTER_ADDR", "HOROVOD_RANK", "HOROVOD_SIZE", "GRADCOMP_BACKEND", "GRADCOMP_TIMEOUT")


def _env(**extra):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for var in _LAUNCHER_VARS:
        env.pop(var, None)
    env.update(extra)
    return env


def _launch(cmd, timeout=TIMEOUT, retries=1, **env):
    """(returncode, output, seconds, time.time() at the end); a launch that outlives its load-scaled
    timeout is retried once (retries=0: a timeout fails the test, for the hang tests)."""
    try:
        r = run_job(cmd, timeout, cwd=ROOT, env=_env(**env), retries=retries)
    except JobTimeout as e:
        pytest.fail(f"{' '.join(map(str, cmd))} hung: {e}")
    return r.returncode, r.output, r.elapsed, r.ended_at


def _assert_ok(rc, out, engine, n=2):
    assert rc == 0, f"exit code {rc}:\n{out[-6000:]}"
    oks = re.findall(r"COMM_CHECK OK rank=(\d+) size=(\d+) engine=(\w+) checks=(\d+)", out)
    assert len(oks) == n, f"expected {n} ranks to report OK:\n{out[-6000:]}"
    assert sorted(int(r) for r, *_ in oks) == list(range(n)), oks
    assert all(int(size) == n and eng == engine and int(checks) > 200 for _, size, eng, checks in oks), oks


def _need_mpi():
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found (apt-get install openmpi-bin libopenmpi-dev)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip('mpi4py not installed (pip install "gradcomp[mpi]")')
    pytest.importorskip("torch")


MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]


# ------------------------------------------------------------------ factory, in-process
def test_auto_without_launcher_is_single_rank():
    comm = make_communicator("auto", environ={})
    assert isinstance(comm, SingleCommunicator) and comm.size == 1
    assert detect({}) == "single"
    x = np.arange(3.0)
    assert np.array_equal(comm.allreduce(x).wait(), x)


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: auto, horovod, mpi, torch"):
        make_communicator("nccl-magic")


def test_passing_a_communicator_returns_it():
    comm = SingleCommunicator()
    assert make_communicator(comm) is comm


def test_missing_horovod_says_how_to_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod", None)
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    with pytest.raises(ImportError, match="bash mpi/build_horovod.sh"):
        make_communicator("horovod")


def test_missing_mpi4py_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r'pip install "gradcomp\[mpi\]"'):
        make_communicator("mpi")
    # auto under an MPI launcher must not silently fall back to one rank
    with pytest.raises(ImportError, match="MPI launcher with 2 ranks"):
        make_communicator("auto", environ={"OMPI_COMM_WORLD_SIZE": "2"})


def test_missing_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "torch.distributed", None)
    with pytest.raises(ImportError, match=r'pip install "gradcomp\[torch\]"'):
        make_communicator("torch")


def test_torch_without_process_group_says_what_to_do():
    dist = pytest.importorskip("torch.distributed")
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_communicator("torch")


def test_half_precision_sum_ops_round_correctly():
    """The MPI fp16/bf16 sum callbacks equal one correctly rounded addition."""
    torch = pytest.importorskip("torch")
    from gradcomp.comm import mpi as m
    rng = np.random.default_rng(0)
    a32, b32 = (rng.standard_normal(5000).astype(np.float32) * 100 for _ in range(2))
    a, b = a32.astype(np.float16), b32.astype(np.float16)
    out = b.copy()
    m._sum_f16(a, out, None)
    assert np.array_equal(out, (a.astype(np.float64) + b.astype(np.float64)).astype(np.float16))
    ta, tb = torch.from_numpy(a32).bfloat16(), torch.from_numpy(b32).bfloat16()
    ua, ub = ta.view(torch.int16).numpy().view(np.uint16), tb.view(torch.int16).numpy().view(np.uint16).copy()
    m._sum_bf16(ua, ub, None)
    expect = (ta.float() + tb.float()).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ub, expect)
    for dt in (np.int8, np.uint8):                  # 8-bit sums wrap (Open MPI's own SUM saturates)
        x, y = np.array([100, -27, 5], np.int64).astype(dt), np.array([100, -128, 7], np.int64).astype(dt)
        acc = y.copy()
        m._OWN_SUMS[np.dtype(dt).name](x, acc, None)
        assert np.array_equal(acc, x + y), (dt, acc)
    # large arrays go through torch's add when torch is imported: the same bits as the numpy paths,
    # on every finite or infinite input (random bit patterns: subnormals, overflow, signed zeros)
    bits = [rng.integers(0, 1 << 16, 3 * m._TORCH_SUM_MIN, dtype=np.uint16) for _ in range(2)]
    for name, fn in (("float16", m._sum_f16), ("bfloat16", m._sum_bf16)):
        x, y = bits[0].copy(), bits[1].copy()
        if name == "float16":
            keep = ~(np.isnan(x.view(np.float16)) | np.isnan(y.view(np.float16)))
            with np.errstate(all="ignore"):
                ref = np.add(x.view(np.float16), y.view(np.float16)).view(np.uint16)
        else:
            keep = ~(np.isnan(m.bf16_to_f32(x)) | np.isnan(m.bf16_to_f32(y)))
            with np.errstate(all="ignore"):
                ref = m.f32_to_bf16(m.bf16_to_f32(x) + m.bf16_to_f32(y))
        x, y, ref = x[keep], y[keep], ref[keep]
        assert x.size >= m._TORCH_SUM_MIN and m._torch_add(np.zeros(x.size, np.uint16), np.zeros(x.size, np.uint16), name)
        fn(x, y, None)
        assert np.array_equal(y, ref), name
    special = np.array([np.nan, np.inf, -np.inf, 3.0e38, -0.0], np.float32)
    back = m.bf16_to_f32(m.f32_to_bf16(special))
    assert np.isnan(back[0]) and np.array_equal(back[1:], torch.from_numpy(special[1:]).bfloat16().float().numpy())


# ------------------------------------------------------------------ real processes
@pytest.mark.mpi
@pytest.mark.timeout(2 * OUTER)
def test_mpi_two_ranks():
    _need_mpi()
    rc, out, *_ = _launch(MPIRUN + [sys.executable, str(SCRIPT), "mpi"])
    _assert_ok(rc, out, "mpi")


@pytest.mark.mpi
@pytest.mark.timeout(2 * OUTER)
def test_mpi_sum_paths_four_ranks():
    """4 ranks: the in-place sums go through a separate buffer (libnbc's bandwidth-optimal algorithm);
    every sum path agrees with MPI_Allreduce on every dtype (2 ranks: bit for bit, in test_mpi_two_ranks)."""
    _need_mpi()
    rc, out, *_ = _launch(MPIRUN[:-1] + ["4", sys.executable, str(SCRIPT), "mpi", "--only", "mpi_sum_paths"])
    _assert_ok(rc, out, "mpi", n=4)


@pytest.mark.mpi
@pytest.mark.tf
@pytest.mark.timeout(4 * OUTER)
def test_mpi_auto_two_ranks_with_tf_tensors():
    """`auto` under mpirun picks MPI; TF eager tensors go through it too (TF import is slow: longer limit)."""
    _need_mpi()
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow not installed")
    rc, out, *_ = _launch(MPIRUN + [sys.executable, str(SCRIPT), "auto", "--tf"], timeout=2 * TIMEOUT)
    _assert_ok(rc, out, "mpi")


@pytest.mark.torch
@pytest.mark.timeout(2 * OUTER)
def test_torch_gloo_two_ranks():
    pytest.importorskip("torch.distributed")
    rc, out, *_ = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(SCRIPT), "torch"])
    _assert_ok(rc, out, "torch")


def _horovodrun(script=SCRIPT, *args):
    pytest.importorskip("torch")
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        pytest.skip("Horovod is not installed (bash mpi/build_horovod.sh)")
    hvdrun = shutil.which("horovodrun") or str(Path(sys.executable).parent / "horovodrun")
    if not Path(hvdrun).exists():
        pytest.skip("horovodrun not found")
    return [hvdrun, "-np", "2", "-H", "localhost:2", sys.executable, str(script), *(args or ("horovod",))]


@pytest.mark.horovod
@pytest.mark.timeout(2 * OUTER)
def test_horovod_two_ranks():
    rc, out, *_ = _launch(_horovodrun())
    _assert_ok(rc, out, "horovod")


@pytest.mark.mpi
@pytest.mark.timeout(4 * OUTER)
def test_cuda_tensors_through_transports():
    """CUDA tensors: MPI (staged through pinned memory, and CUDA-aware when Open MPI has it),
    torch.distributed Gloo (staged) with 2 ranks, NCCL with 1 rank. Needs a GPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    script = str(ROOT / "tests" / "mpi_scripts" / "comm_cuda_check.py")
    runs = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", script, "nccl"],
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, "torch"]]
    if shutil.which("mpirun") and importlib.util.find_spec("mpi4py"):
        runs.append(MPIRUN + [sys.executable, script, "mpi"])
    for cmd in runs:
        rc, out, *_ = _launch(cmd)
        n = 1 if "nccl" in cmd else 2
        assert rc == 0 and out.count("COMM_CUDA_CHECK OK") == n, f"{' '.join(cmd)}: rc {rc}\n{out[-4000:]}"


# ------------------------------------------------------------------ abort path: one rank raises
def _torchrun(*args):
    pytest.importorskip("torch.distributed")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]


def _probe_cmd(launch, *args):
    if launch == "mpirun":
        _need_mpi()
        return MPIRUN + [sys.executable, str(PROBE), *args]
    if launch == "torchrun":
        return _torchrun(PROBE, *args)
    return _horovodrun(PROBE, *args)


@pytest.mark.mpi
@pytest.mark.timeout(2 * OUTER)
@pytest.mark.parametrize("launch, engine", [("mpirun", "mpi"), ("torchrun", "torch"), ("horovodrun", "horovod")])
def test_uncaught_exception_on_one_rank_ends_the_job(launch, engine):
    """A plain training loop (no error handling) in which rank 1 raises at step 3: the job exits
    non-zero within 30 s of the failure, the error printed once, the peer never finishing. Under
    mpirun this hung forever before the abort hook (the peer waited in its next allreduce, the
    failing rank in MPI_Finalize): no retry here, a timeout is the failure. Also pins what `auto`
    picks under each launcher (horovodrun's MPI mode sets no HOROVOD_* variable)."""
    rc, out, _, ended = _launch(_probe_cmd(launch, "--fail-rank", "1"), timeout=90, retries=0)
    ready = re.findall(r"PROBE READY rank=(\d) engine=(\w+) size=(\d)", out)
    assert sorted(ready) == [("0", engine, "2"), ("1", engine, "2")], out[-4000:]
    assert rc != 0, out[-4000:]
    printed = out.count("RuntimeError: probe: injected failure on rank 1 at step 3")
    # mpirun: our hook flushes before MPI_Abort, so the error is there exactly once. horovodrun's
    # mpirun sometimes drops the failing rank's last output when the peer's own error ends the job
    # first: at most once there, never repeated.
    assert printed == 1 if launch == "mpirun" else printed <= 1, out[-4000:]
    assert "PROBE FAIL rank=1" in out, out[-4000:]
    assert "PROBE DONE" not in out, out[-4000:]
    failed_at = float(re.search(r"PROBE FAIL rank=1 t=([\d.]+)", out).group(1))
    assert ended - failed_at < 30, f"the job took {ended - failed_at:.1f}s to end after rank 1 failed"


@pytest.mark.mpi
@pytest.mark.timeout(2 * OUTER)
def test_sys_exit_on_one_rank_ends_the_job_under_mpirun():
    """rank 1 calls sys.exit(3) at step 3 (no exception reaches the excepthook): the job ends within
    30 s, not at the peer's collective timeout (set to 120 s here so the two cannot be confused)."""
    rc, out, _, ended = _launch(_probe_cmd("mpirun", "--fail-rank", "1", "--mode", "exit"), timeout=150,
                                retries=0, GRADCOMP_TIMEOUT="120")
    assert rc != 0, out[-4000:]
    assert "PROBE FAIL rank=1" in out and "PROBE DONE" not in out, out[-4000:]
    assert "sys.exit(3) on rank 1 of 2" in out, out[-4000:]
    failed_at = float(re.search(r"PROBE FAIL rank=1 t=([\d.]+)", out).group(1))
    assert ended - failed_at < 30, f"the job took {ended - failed_at:.1f}s to end after rank 1 exited"


# ------------------------------------------------------------------ launcher detection and mismatch
HOROVODRUN_MPI_ENV = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_MCA_orte_tag_output": "1",
                      "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "^openib"}   # what horovodrun -np 2 leaves (measured)


@pytest.mark.parametrize("env, name, size", [
    ({}, "none", 1),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}, "mpirun", 4),
    ({"PMI_SIZE": "3", "PMI_RANK": "0"}, "mpirun", 3),
    (HOROVODRUN_MPI_ENV, "horovodrun", 2),
    (dict(HOROVODRUN_MPI_ENV, OMPI_MCA_orte_tag_output="0"), "mpirun", 2),
    ({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2", "HOROVOD_CONTROLLER": "gloo"}, "horovodrun-gloo", 2),
    ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_WORLD_SIZE": "2"}, "torchrun", 2),
    ({"MASTER_ADDR": "10.0.0.1", "WORLD_SIZE": "2", "RANK": "0"}, "torch-env", 2),
])
def test_launcher_is_read_from_the_environment(env, name, size):
    got = launcher(env)
    assert (got.name, got.size) == (name, size), got


class _FakeWorld(SingleCommunicator):
    """A transport class stand-in that reports a world of `size` (no engine started)."""
    made = []

    def __init__(self, size=1, **kw):
        self.size, self.kw = size, kw
        _FakeWorld.made.append(kw)


@pytest.mark.parametrize("backend, env", [
    ("mpi", {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "0"}),       # torchrun + GRADCOMP_BACKEND=mpi
    ("local", {"OMPI_COMM_WORLD_SIZE": "2"}),                                     # mpirun + GRADCOMP_BACKEND=local
    ("single", {"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"}),
    ("horovod", {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "3", "RANK": "0"}),
])
def test_transport_that_disagrees_with_the_launcher_is_refused(monkeypatch, backend, env):
    """One rank under a launcher that started several: a clear error, not N independent jobs."""
    from gradcomp.comm import horovod, mpi
    monkeypatch.setattr(mpi, "MPICommunicator", _FakeWorld)
    monkeypatch.setattr(horovod, "HorovodCommunicator", _FakeWorld)
    with pytest.raises(LauncherMismatchError) as ei:
        make_communicator(backend, environ=env)
    msg = str(ei.value)
    assert repr(backend) in msg and "world of 1 rank" in msg and "train alone" in msg and "GRADCOMP_BACKEND=auto" in msg
    assert launcher(env).name in msg


def test_matching_world_and_sub_communicators_pass_the_launcher_check(monkeypatch):
    from gradcomp.comm import mpi
    monkeypatch.setattr(mpi, "MPICommunicator", lambda **kw: _FakeWorld(2, **kw))
    assert make_communicator("mpi", environ={"OMPI_COMM_WORLD_SIZE": "2"}).size == 2
    monkeypatch.setattr(mpi, "MPICommunicator", lambda **kw: _FakeWorld(1, **kw))
    assert make_communicator("mpi", environ={"OMPI_COMM_WORLD_SIZE": "2"}, comm=object()).size == 1


@pytest.mark.torch
@pytest.mark.timeout(2 * OUTER)
def test_torchrun_with_mpi_backend_stops_every_rank():
    """GRADCOMP_BACKEND=mpi under torchrun used to run two independent 1-rank jobs."""
    pytest.importorskip("mpi4py")
    rc, out, *_ = _launch(_torchrun(PROBE, "--mode", "none", "--steps", "2"), GRADCOMP_BACKEND="mpi")
    assert rc != 0 and "PROBE READY" not in out and "PROBE DONE" not in out, out[-4000:]
    assert out.count("LauncherMismatchError") >= 2 and "world of 1 rank" in out, out[-4000:]


# ------------------------------------------------------------------ timeouts: configuration and errors
@pytest.mark.parametrize("raw, want", [("", 300.0), ("300", 300.0), (" 2.5 ", 2.5), ("0", None), ("none", None),
                                       ("OFF", None), ("inf", None)])
def test_gradcomp_timeout_is_read_and_on_by_default(raw, want):
    from gradcomp.config import from_env, timeout_from_env
    env = {"GRADCOMP_TIMEOUT": raw} if raw else {}
    assert timeout_from_env(env) == want and from_env(env).timeout == want


@pytest.mark.parametrize("raw", ["abc", "-1", "nan", "5s", "True"])
def test_bad_gradcomp_timeout_names_the_variable_and_the_valid_forms(raw):
    from gradcomp.config import from_env
    with pytest.raises(ValueError) as ei:
        from_env({"GRADCOMP_TIMEOUT": raw})
    assert "GRADCOMP_TIMEOUT" in str(ei.value) and "seconds" in str(ei.value) and "none" in str(ei.value)


def test_every_transport_times_out_by_default(monkeypatch):
    """LocalWorld, the make_communicator default and init(timeout=) all use GRADCOMP_TIMEOUT (300)."""
    import gradcomp
    from gradcomp.config import resolve_timeout
    monkeypatch.delenv("GRADCOMP_TIMEOUT", raising=False)
    assert gradcomp.LocalWorld(2).timeout == 300.0 and resolve_timeout() == 300.0
    monkeypatch.setenv("GRADCOMP_TIMEOUT", "7")
    assert gradcomp.LocalWorld(2).timeout == 7.0 and gradcomp.LocalWorld(2, timeout=None).timeout is None
    assert resolve_timeout(12) == 12.0 and resolve_timeout(0) is None
    for bad in (-3, "soon", True, float("nan")):
        with pytest.raises(ValueError, match="timeout=.*seconds"):
            resolve_timeout(bad)


@pytest.mark.torch
def test_init_timeout_argument_is_validated_and_applied(monkeypatch):
    pytest.importorskip("torch")
    import gradcomp_torch as gct
    monkeypatch.delenv("GRADCOMP_BACKEND", raising=False)
    with pytest.raises(ValueError, match="timeout=-1 is not a number of seconds"):
        gct.init(timeout=-1)
    fake = _FakeWorld(1)
    fake.timeout = 300.0
    try:
        assert gct.init(comm=fake) is fake
        gct.init(timeout=42)
        assert fake.timeout == 42.0
        gct.init()                                   # a later plain init() keeps the chosen timeout
        assert fake.timeout == 42.0
    finally:
        gct.shutdown()


def test_a_timed_out_wait_names_the_collective_the_rank_and_the_remedy():
    import gradcomp
    from gradcomp.comm.base import CollectiveTimeout

    def fn(comm):
        if comm.rank == 0:
            return comm.allreduce(np.ones(2), name="step3.bucket0").wait()
    errs = gradcomp.LocalWorld(2, timeout=0.3).run(lambda c: _catch(fn, c))
    e = errs[0]
    assert isinstance(e, CollectiveTimeout) and isinstance(e, TimeoutError), errs
    msg = str(e)
    for part in ("allreduce('step3.bucket0')", "rank 0 of 2", "ranks [1] never arrived", "GRADCOMP_TIMEOUT",
                 "init(timeout="):
        assert part in msg, msg


def _catch(fn, comm):
    try:
        return fn(comm)
    except BaseException as e:  # noqa: BLE001 - inspected by the test
        return e


def test_run_job_retries_a_timed_out_launch_once_with_a_message(tmp_path):
    import io
    flag = tmp_path / "first"
    code = ("import os, sys, time\n"
            f"p = {str(flag)!r}\n"
            "if not os.path.exists(p):\n    open(p, 'w').close(); time.sleep(30)\n"
            "print('second attempt ok')\n")
    log = io.StringIO()
    r = run_job([sys.executable, "-c", code], 1.0, retries=1, scale=False, log=log)
    assert r.returncode == 0 and "second attempt ok" in r.output and r.attempts == 2
    assert "timed out after 1s" in log.getvalue() and "retrying once" in log.getvalue()
    with pytest.raises(JobTimeout, match="timed out after 1s"):
        run_job([sys.executable, "-c", "import time; time.sleep(30)"], 1.0, retries=0, scale=False)
