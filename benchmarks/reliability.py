"""Reliability probes: one failing rank under mpirun, torchrun and horovodrun. Does the job end, how fast?

    python benchmarks/reliability.py                     # every probe under every launcher found
    python benchmarks/reliability.py --launchers mpirun --probes raise,kill
    python benchmarks/reliability.py --tree /path/to/other/checkout   # the same probes on other code

Probes (2 ranks, rank 1 fails, nobody's code handles the error):
  raise        tests/mpi_scripts/fail_probe.py: RuntimeError in the training loop at step 3
  compressor   examples/torch_train.py with --compressor bogus on rank 1 only (the others valid)
  kill         fail_probe.py: rank 1 SIGKILLs itself at step 3
  exit         fail_probe.py: rank 1 calls sys.exit(3) at step 3 (GRADCOMP_TIMEOUT=--exit-timeout)
Each row: the launcher's exit code, whether the job ended or had to be killed at --limit seconds
(counted from the failure), how often the failing rank's error line was printed and how many
tracebacks the output holds in all (a peer's own error, the launcher's), whether a peer finished anyway
(it must not), and the seconds from the failure to the job's end. The moment of failure is the
"PROBE FAIL t=..." line the failing rank prints (for `compressor`, a sys.excepthook installed by the
shim below prints it when the error escapes). Prints a Markdown table (docs/benchmarks.md,
"Reliability") and writes --out/reliability.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROBES = ("raise", "compressor", "kill", "exit")
LAUNCHERS = ("mpirun", "torchrun", "horovodrun")
COLUMNS = ["probe", "launcher", "transport", "exit code", "outcome", "error printed", "tracebacks", "peer finished",
           "time to exit s"]
# the failing rank's own error line (its count is "error printed"; "tracebacks" counts every one)
ERROR_LINE = {"raise": r"RuntimeError: probe: injected failure on rank 1", "compressor": r"\w+Error: [^\n]*bogus"}


def _shim(argv):
    """Run as one rank: `reliability.py --shim RANK ARGS... -- SCRIPT ARGV...`: rank RANK gets ARGS
    appended, and prints PROBE FAIL t=... when an exception escapes the script."""
    import runpy
    cut = argv.index("--")
    fail_rank, extra, script, args = int(argv[0]), argv[1:cut], argv[cut + 1], argv[cut + 2:]
    # the rank from the launchers' variables (not gradcomp's reader: --tree may be code without it)
    rank = next((int(os.environ[v]) for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK", "HOROVOD_RANK")
                 if os.environ.get(v, "").isdigit()), 0)
    if rank == fail_rank:
        args += extra
        previous = sys.excepthook

        def hook(etype, value, tb):
            print(f"PROBE FAIL rank={rank} t={time.time():.3f}", flush=True)
            previous(etype, value, tb)
        sys.excepthook = hook
    sys.argv = [script] + args
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


def _launch_cmd(launcher, tree):
    py = sys.executable
    if launcher == "mpirun":
        return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", py]
    if launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    hvdrun = shutil.which("horovodrun") or os.path.join(os.path.dirname(py), "horovodrun")
    return [hvdrun, "-np", "2", "-H", "localhost:2", py]


def _probe_args(probe, tree):
    fail = os.path.join(tree, "tests", "mpi_scripts", "fail_probe.py")
    if probe == "compressor":
        return [os.path.abspath(__file__), "--shim", "1", "--compressor", "bogus", "--",
                os.path.join(tree, "examples", "torch_train.py"), "--epochs", "1", "--no-progress"]
    return [fail, "--fail-rank", "1", "--mode", probe]


def available(launcher) -> str:
    """'' when `launcher` can run here, else why not."""
    import importlib.util
    if launcher == "mpirun" and (shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None):
        return "mpirun or mpi4py missing"
    if launcher == "horovodrun":
        try:
            import horovod.torch  # noqa: F401
        except ImportError:
            return "Horovod not built (bash mpi/build_horovod.sh)"
    return ""


def run_probe(probe, launcher, tree, limit, exit_timeout):
    from gradcomp.comm.launch import JobTimeout, run_job
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2")
    for var in ("GRADCOMP_BACKEND", "GRADCOMP_COMPRESSOR", "GRADCOMP_TIMEOUT"):
        env.pop(var, None)
    if probe == "exit":
        env["GRADCOMP_TIMEOUT"] = str(exit_timeout)
    cmd = _launch_cmd(launcher, tree) + _probe_args(probe, tree)
    t0 = time.time()
    try:
        r = run_job(cmd, limit + 120, cwd=tree, env=env, retries=0, scale=False, label=f"{probe} under {launcher}")
        out, rc, ended, hung = r.output, r.returncode, r.ended_at, False
    except JobTimeout as e:
        out, rc, ended, hung = e.output, None, time.time(), True
    m = re.search(r"PROBE FAIL rank=\d+ t=([\d.]+)", out)
    failed_at = float(m.group(1)) if m else None
    engine = re.search(r"PROBE READY rank=\d+ engine=(\w+)", out)
    after = (ended - failed_at) if failed_at else None
    if not hung and after is not None and after > limit:
        hung = True
    row = {"probe": probe, "launcher": launcher, "transport": engine.group(1) if engine else "auto",
           "exit code": "-" if rc is None else rc,
           "outcome": f"HUNG (killed after {ended - t0:.0f}s)" if hung else ("ended" if rc else "exit 0 (!)"),
           "error printed": len(re.findall(ERROR_LINE[probe], out)) if probe in ERROR_LINE else "-",
           "tracebacks": out.count("Traceback (most recent call last)"),
           "peer finished": "yes (!)" if "PROBE DONE" in out else "no",
           "time to exit s": "-" if after is None or hung else f"{after:.1f}"}
    return row, out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--shim":
        return _shim(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--launchers", default=",".join(LAUNCHERS))
    ap.add_argument("--probes", default=",".join(PROBES))
    ap.add_argument("--tree", default=REPO, help="the gradcomp checkout whose code the ranks run (default: this one)")
    ap.add_argument("--limit", type=float, default=60.0,
                    help="seconds after the failure before a job counts as hung and is killed (default 60)")
    ap.add_argument("--exit-timeout", type=float, default=20.0, help="GRADCOMP_TIMEOUT of the exit probe (default 20)")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--verbose", action="store_true", help="print each job's output tail")
    a = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    from benchmarks import plotting
    tree = os.path.abspath(a.tree)
    rows = []
    load0 = os.getloadavg()[0]
    for launcher in a.launchers.split(","):
        why = available(launcher)
        for probe in a.probes.split(","):
            if why:
                rows.append({"probe": probe, "launcher": launcher, "outcome": f"skipped: {why}"})
                continue
            row, out = run_probe(probe, launcher, tree, a.limit, a.exit_timeout)
            rows.append(row)
            plotting.note(f"reliability: {probe} under {launcher}: {row['outcome']}, {row['time to exit s']} s")
            if a.verbose:
                plotting.note(out[-3000:])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "reliability.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows({c: r.get(c, "") for c in COLUMNS} for r in rows)
    print(f"code: {tree}; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end "
          f"({os.cpu_count()} cores)")
    print(plotting.table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
