"""Elastic training across real processes: Horovod Elastic (horovodrun --min-np/--max-np with a host
discovery script, localhost) and torchrun elastic (--nnodes=MIN:MAX, --max-restarts, a rank that
dies once). Every launch has an outer timeout after which its process group is killed."""
import importlib.util
import json
import os
import shutil
import socket
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from gradcomp.comm.launch import JobTimeout, load_factor, run_job  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.mpi]

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "mpi_scripts")
ROOT = os.path.dirname(HERE)
TIMEOUT = float(os.environ.get("GRADCOMP_MPI_TEST_TIMEOUT", "600")) * load_factor()
LAUNCH = pytest.mark.timeout(TIMEOUT + 60)


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, SCRIPTS, os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", GRADCOMP_BACKEND="", GRADCOMP_COMPRESSOR="", GRADCOMP_MEMORY="",
                GRADCOMP_SYNC="")


def _run(cmd, what):
    try:
        r = run_job(cmd, TIMEOUT, cwd=ROOT, env=_env(), retries=0, scale=False, label=what)
    except JobTimeout as e:
        pytest.fail(f"{e} (killed)")
    return r.returncode, r.output


def _events(out_dir):
    ev = []
    for f in sorted(os.listdir(out_dir)):
        if f.endswith(".jsonl"):
            with open(os.path.join(out_dir, f)) as fh:
                ev += [json.loads(line) for line in fh if line.strip()]
    return sorted(ev, key=lambda e: e["t"])


def _horovod():
    if importlib.util.find_spec("horovod") is None:
        pytest.skip("Horovod is not installed (bash mpi/build_horovod.sh)")
    try:
        import horovod.torch  # noqa: F401
        import horovod.torch.elastic  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"horovod.torch.elastic does not import: {e}")
    exe = shutil.which("horovodrun")
    if exe is None:
        pytest.skip("horovodrun not found")
    return exe


@LAUNCH
def test_horovod_elastic_expand_and_graceful_shrink(tmp_path):
    """1 rank -> 2 -> 1 under horovodrun elastic: at each change the residuals are flushed (the sum
    over the old world's ranks, on every rank), every rank starts the new world with zero residuals
    and the same pending flush and parameters as rank 0, the ranks stay identical, and no step is
    lost (14 batches, 14 optimizer steps)."""
    exe = _horovod()
    hosts, disc = tmp_path / "hosts", tmp_path / "discover.sh"
    hosts.write_text("localhost:1\n")
    disc.write_text(f"#!/bin/sh\ncat {hosts}\n")
    disc.chmod(0o755)
    rc, out = _run([exe, "-np", "1", "--min-np", "1", "--max-np", "2", "--network-interface", "lo",
                    "--host-discovery-script", str(disc), sys.executable,
                    os.path.join(SCRIPTS, "torch_hvd_elastic.py"), "--hosts", str(hosts), "--out", str(tmp_path)],
                   "horovodrun elastic")
    ev = _events(tmp_path)
    assert rc == 0 and "DONE 0" in out, out[-3000:]
    done = [e for e in ev if e["event"] == "done"]
    assert done and done[-1]["batch"] == 14 and done[-1]["step"] == 14, ev[-5:]
    flushes = [e for e in ev if e["event"] == "flush"]
    two = [e for e in flushes if e["size"] == 2]
    assert len([e for e in flushes if e["size"] == 1]) >= 1 and len(two) == 2, [(e["rank"], e["size"]) for e in flushes]
    for n in two[0]["held"]:
        want = np.add(two[0]["held"][n], two[1]["held"][n])
        for e in two:
            np.testing.assert_allclose(e["summed"][n], want, rtol=1e-6, atol=1e-6)
    synced = [e for e in ev if e["event"] == "synced" and e["size"] == 2]
    assert {e["rank"] for e in synced} == {0, 1}
    assert all(e["residual"] == 0.0 for e in ev if e["event"] in ("synced", "reset"))
    s0 = next(e for e in synced if e["rank"] == 0)
    s1 = next(e for e in synced if e["rank"] == 1)
    assert s0["pending"] and s0["pending"] == s1["pending"] and s0["params"] == s1["params"]
    steps2 = {}
    for e in ev:
        if e["event"] == "step" and e["size"] == 2:
            steps2.setdefault(e["batch"], {})[e["rank"]] = e["params"]
    assert steps2 and all(len(v) == 2 and v[0] == v[1] for v in steps2.values()), steps2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@LAUNCH
def test_torchrun_elastic_resumes_after_a_sigkill(tmp_path):
    """torchrun --nnodes=1:2 --max-restarts=1: rank 1 SIGKILLs itself at batch 5; no rank hangs (the
    job ends within the timeout), every rank resumes from the last commit (batch 4) with its own
    residuals (keyed by rank and world size), and training ends at batch 12 with identical ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", "--rdzv-conf=last_call_timeout=1", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
           os.path.join(SCRIPTS, "torch_torchrun_elastic.py"), "--dir", str(tmp_path)]
    rc, out = _run(cmd, "torchrun elastic")
    ev = _events(tmp_path)
    assert rc == 0 and "DONE 0" in out and "DONE 1" in out, out[-3000:]
    assert [e["batch"] for e in ev if e["event"] == "die"] == [5]
    for r in (0, 1):
        back = [e for e in ev if e["event"] == "resumed" and e["rank"] == r and e["restart"] == 1]
        commit4 = [e for e in ev if e["event"] == "commit" and e["rank"] == r and e["restart"] == 0 and e["batch"] == 4]
        assert back and commit4 and back[0]["batch"] == 4 and back[0]["step"] == 4
        assert back[0]["residual"] == commit4[0]["residual"] > 0          # its own residuals, not zero
    done = [e for e in ev if e["event"] == "done"]
    assert len(done) == 2 and all(e["batch"] == 12 and e["step"] == 12 for e in done)
    assert done[0]["params"] == done[1]["params"]
