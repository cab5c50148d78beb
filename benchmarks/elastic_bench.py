"""Elastic resize latency on digits (examples/torch_elastic.py, Horovod Elastic, localhost).

    python benchmarks/elastic_bench.py [--out DIR]

Runs, one after the other:
  elastic   horovodrun --min-np 2 --max-np 4 with a discovery file rank 0 rewrites: 2 -> 3 -> 4 -> 2
            (graceful changes; residuals flushed). Latency = the discovery file written -> the first
            step on the new world (rank 0), so it includes the driver's discovery period (1 s).
  fixed     the same training at 2 ranks throughout (the accuracy reference)
  restart   kill-all-and-restart-from-checkpoint: a 2-rank job saves a checkpoint at step 30 and
            stops; a new 3-rank job is launched with --resume. Latency = launch -> its first step
            (the time to notice and kill the old job is not counted, which favours restart).
Prints a table of latencies and final accuracies (one seed each).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "torch_elastic.py")


def events(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return sorted((json.loads(line) for line in f if line.strip()), key=lambda e: e["t"])


def horovodrun(d, slots, args, minnp, maxnp, timeout):
    hosts, disc = os.path.join(d, "hosts"), os.path.join(d, "discover.sh")
    with open(hosts, "w") as f:
        f.write(f"localhost:{slots}\n")
    with open(disc, "w") as f:
        f.write(f"#!/bin/sh\ncat {hosts}\n")
    os.chmod(disc, 0o755)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [shutil.which("horovodrun"), "-np", str(slots), "--min-np", str(minnp), "--max-np", str(maxnp),
           "--network-interface", "lo", "--host-discovery-script", disc, sys.executable, EXAMPLE, *args]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return t0, hosts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--timeout", type=float, default=900)
    a = p.parse_args(argv)
    d = a.out or tempfile.mkdtemp(prefix="gradcomp-elastic-")
    os.makedirs(d, exist_ok=True)
    rows = []

    ev_path = os.path.join(d, "elastic.jsonl")
    hosts = os.path.join(d, "hosts")
    horovodrun(d, 2, ["--hosts", hosts, "--schedule", "30:3,60:4,90:2", "--events", ev_path], 2, 4, a.timeout)
    ev = events(ev_path)
    for h in (e for e in ev if e["event"] == "hosts"):
        nxt = next(e for e in ev if e["event"] == "first_step" and e["rank"] == 0 and e["t"] > h["t"])
        reset = next(e for e in ev if e["event"] == "reset" and e["rank"] == 0 and e["t"] > h["t"])
        kind = "expand" if h["slots"] > h["size"] else "shrink (graceful)"
        rows.append((f"{kind} {h['size']} -> {h['slots']}", nxt["t"] - h["t"], reset["t"] - h["t"], nxt["t"] - reset["t"]))
    acc_el = next(e["acc"] for e in ev if e["event"] == "done" and e["rank"] == 0)

    fx_path = os.path.join(d, "fixed.jsonl")
    horovodrun(d, 2, ["--events", fx_path], 2, 2, a.timeout)
    acc_fx = next(e["acc"] for e in events(fx_path) if e["event"] == "done" and e["rank"] == 0)

    ck = os.path.join(d, "ck.pt")
    horovodrun(d, 2, ["--checkpoint", ck, "--stop-after", "30"], 2, 2, a.timeout)
    rs_path = os.path.join(d, "restart.jsonl")
    t0, _ = horovodrun(d, 3, ["--resume", ck, "--stop-after", "1", "--events", rs_path], 3, 3, a.timeout)
    first = next(e for e in events(rs_path) if e["event"] == "first_step" and e["rank"] == 0)
    restart = first["t"] - t0
    rows.append(("kill-all-and-restart 2 -> 3 (relaunch from checkpoint)", restart, None, None))

    print("| change | event -> first step on the new world (s) | of which engine: event -> reset (s) | "
          "of which gradcomp + first step: reset -> first step (s) |\n|---|---|---|---|")
    for name, s, eng, ours in rows:
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {name} | {s:.2f} | {f(eng)} | {f(ours)} |")
    exp = [s for n, s, *_ in rows if n.startswith("expand")]
    if exp:
        print(f"\nrestart / expand latency: {restart / (sum(exp) / len(exp)):.2f}x (mean of {len(exp)} expands)")
    print(f"final accuracy: elastic 2->3->4->2 {acc_el:.2f}%, fixed 2 ranks {acc_fx:.2f}% (one seed each)")
    print(f"events in {d}")


if __name__ == "__main__":
    main()
