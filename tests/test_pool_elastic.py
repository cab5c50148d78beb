"""gradcomp_torch.pool across real processes (python -m gradcomp_torch.pool): expand onto prepared
standbys and a graceful leave with the keep rule's exact handoff, and a SIGKILL that a standby
covers without any rank hanging. Every launch has an outer timeout after which it is killed."""
import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from gradcomp.comm.launch import JobTimeout, load_factor, run_job  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.mpi]

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "mpi_scripts", "torch_pool_elastic.py")
ROOT = os.path.dirname(HERE)
TIMEOUT = float(os.environ.get("GRADCOMP_MPI_TEST_TIMEOUT", "600")) * load_factor()
LAUNCH = pytest.mark.timeout(TIMEOUT + 60)


def _run(np_, max_np, tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               GRADCOMP_BACKEND="", GRADCOMP_COMPRESSOR="", GRADCOMP_MEMORY="", GRADCOMP_SYNC="")
    cmd = [sys.executable, "-m", "gradcomp_torch.pool", "--np", str(np_), "--max-np", str(max_np),
           "--timeout", str(int(TIMEOUT)), SCRIPT, "--dir", str(tmp_path), *args]
    try:
        r = run_job(cmd, TIMEOUT + 30, cwd=ROOT, env=env, retries=0, scale=False, label="gradcomp_torch.pool")
    except JobTimeout as e:
        pytest.fail(f"{e} (killed: a rank hung)")
    ev = []
    for f in sorted(os.listdir(tmp_path)):
        if f.endswith(".jsonl"):
            with open(os.path.join(tmp_path, f)) as fh:
                ev += [json.loads(line) for line in fh if line.strip()]
    return r.returncode, r.output, sorted(ev, key=lambda e: e["t"])


def _identical_steps(ev):
    by = {}
    for e in ev:
        if e["event"] == "step":
            by.setdefault((e["gen"], e["batch"]), {})[e["rank"]] = e["params"]
    for k, v in by.items():
        assert len({json.dumps(p) for p in v.values()}) == 1, (k, v)
    return by


@LAUNCH
def test_pool_expand_onto_standbys_and_graceful_leave(tmp_path):
    """1 -> 3 (two prepared standbys join) -> 2 (rank 2 leaves): the leaving rank's residual is
    handed to the stayers exactly (every old rank got the same sum, equal to what rank 2 held),
    the mass sum / P is kept at each change, joiners start at zero, all ranks stay identical and
    no step is lost (12 batches, 12 optimizer steps)."""
    rc, out, ev = _run(1, 3, tmp_path, "--plan", "3:size=3,7:leave=2")
    assert rc == 0 and "DONE 0" in out and "DONE 1" in out, out[-3000:]
    done = [e for e in ev if e["event"] == "done"]
    assert sorted(e["rank"] for e in done) == [0, 1]
    assert all(e["batch"] == 12 and e["step"] == 12 for e in done), done
    assert done[0]["params"] == done[1]["params"]
    by = _identical_steps(ev)
    assert [len(by[k]) for k in sorted(by)] == [1] * 4 + [3] * 4 + [2] * 4, sorted((k, len(v)) for k, v in by.items())
    assert sorted(b for _, b in by) == list(range(12))

    # expand 1 -> 3: rank 0 keeps its residual, rescaled by 3; joiners start at zero
    begin = [e for e in ev if e["event"] == "change_begin" and e["gen"] == 0]
    end = [e for e in ev if e["event"] == "change_end" and e["gen"] == 1]
    joined = [e for e in ev if e["event"] == "joined"]
    assert len(begin) == 1 and len(end) == 1 and sorted(e["rank"] for e in joined) == [1, 2]
    assert any(np.any(v) for v in begin[0]["held"].values())
    for n, v in begin[0]["held"].items():
        np.testing.assert_allclose(end[0]["held"][n], np.asarray(v) * 3, rtol=1e-6)
        for j in joined:
            assert not np.any(j["held"].get(n, [0.0]))      # no state yet, or zero

    # leave 3 -> 2: the handoff is exactly what rank 2 held
    begin = {e["rank"]: e for e in ev if e["event"] == "change_begin" and e["gen"] == 1}
    after = {e["rank"]: e for e in ev if e["event"] in ("change_end", "left") and e["gen"] == 2}
    assert sorted(begin) == [0, 1, 2] and sorted(after) == [0, 1, 2] and after[2]["event"] == "left"
    assert any(np.any(v) for v in begin[2]["held"].values())
    for n, leaver in begin[2]["held"].items():
        for r in range(3):
            assert after[r]["handed"][n] == leaver                       # exact
        assert not np.any(after[2]["held"][n])
        mass_old = sum(np.asarray(begin[r]["held"][n], np.float64) for r in range(3)) / 3
        mass_new = sum(np.asarray(after[r]["held"][n], np.float64) for r in range(2)) / 2
        np.testing.assert_allclose(mass_new, mass_old, rtol=1e-5, atol=1e-7)


@LAUNCH
def test_pool_sigkill_is_covered_by_a_standby_and_no_rank_hangs(tmp_path):
    """--np 2 --max-np 3: rank 0 (the rank that plans changes and roots the broadcasts) SIGKILLs
    itself after batch 5. The launcher records it, rank 1's pending collective is interrupted (no
    hang: the job ends well inside the timeout, every process exits), rank 1 becomes rank 0 of the
    new world, the standby takes the dead rank's place, both resume from the last commit (batch 4)
    with zero residuals, and training ends at batch 12 with identical ranks."""
    rc, out, ev = _run(2, 3, tmp_path, "--die-at", "5", "--die-rank", "0")
    assert rc == 0 and "DONE 0" in out and "DONE 1" in out, out[-3000:]
    assert "rank 0 exited with -9" in out
    assert [(e["rank"], e["batch"]) for e in ev if e["event"] == "die"] == [(0, 5)]
    fail = [e for e in ev if e["event"] == "failure"]
    assert [e["rank"] for e in fail] == [1] and fail[0]["plan"]["members"] == [1, 2], fail
    joined = [e for e in ev if e["event"] == "joined"]
    assert [e["rank"] for e in joined] == [2] and not any(np.any(v) for v in joined[0]["held"].values())
    end1 = next(e for e in ev if e["event"] == "change_end" and e["rank"] == 1)
    assert not any(np.any(v) for v in end1["held"].values())             # the failure rule: zero
    resumed = [e for e in ev if e["event"] == "step" and e["gen"] == 1]
    assert min(e["batch"] for e in resumed) == 4                        # the last commit
    done = [e for e in ev if e["event"] == "done"]
    assert sorted(e["rank"] for e in done) == [1, 2]
    assert all(e["batch"] == 12 and e["step"] == 12 for e in done) and done[0]["params"] == done[1]["params"]
    _identical_steps([e for e in ev if e["gen"] == 1])
