"""Elastic resize latency and accuracy on digits: gradcomp_torch.pool (stop-free) and Horovod Elastic.

    python benchmarks/elastic_bench.py [--engine pool|horovod] [--seeds 0,1,2] [--out DIR]

--engine pool (default; examples/torch_elastic_pool.py under python -m gradcomp_torch.pool):
  elastic   --np 2 --max-np 4, rank 0 requests 2 -> 3 -> 4 -> 2 at steps 30/60/90 (the joiners were
            started with the job and prepared while the others trained). Latency = the request ->
            rank 0's first step on the new world done; pause = what the old workers see: the end
            of their last step on the old world -> the start of their first on the new one.
  restart   kill-all-and-restart-from-checkpoint on the same job: a 2-rank job saves a checkpoint
            at step 30 and stops; a 3-rank job is launched with --resume. Latency = launch -> its
            first step done (noticing and killing the old job is not counted: favours restart).
  sigkill   --np 3 --max-np 4, the last rank SIGKILLs itself after step 50: kill -> the failure
            seen -> rank 0's first step on the new world (a standby took the dead rank's place).
  accuracy  final test accuracy by seed: fixed 2 ranks, fixed 4 ranks, elastic with the residual
            rules flush (default), keep and zero, dense fixed and elastic (--accuracy; --runs).
--engine horovod (examples/torch_elastic.py under horovodrun --min-np 2 --max-np 4):
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
    p.add_argument("--engine", choices=("pool", "horovod"), default="pool")
    p.add_argument("--accuracy", action="store_true", help="also the accuracy table (pool; 5 runs per seed)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--runs", default="fixed2,fixed4,flush,keep,zero", help="which accuracy runs (comma list)")
    a = p.parse_args(argv)
    if a.engine == "pool":
        return pool_main(a)
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


POOL_EXAMPLE = os.path.join(ROOT, "examples", "torch_elastic_pool.py")


def pool_run(np_, max_np, args, timeout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "gradcomp_torch.pool", "--np", str(np_), "--max-np", str(max_np),
           "--timeout", str(int(timeout)), POOL_EXAMPLE, *args]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return t0, r.stdout


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if v else float("nan")


def pool_main(a):
    d = a.out or tempfile.mkdtemp(prefix="gradcomp-elastic-pool-")
    os.makedirs(d, exist_ok=True)
    rows = []
    ev_path = os.path.join(d, "elastic.jsonl")
    pool_run(2, 4, ["--schedule", "30:3,60:4,90:2", "--events", ev_path], a.timeout)
    ev = events(ev_path)
    launch0 = min(e["t_launch"] for e in ev if e["event"] == "ready")
    prep = {e["rank"]: e["t"] - launch0 for e in ev if e["event"] == "ready" and not e["active"]}
    r0 = [e for e in ev if e["rank"] == 0]
    steps = [e["t"] - e["t_begin"] for e in r0 if e["event"] == "step"]
    for q in (e for e in r0 if e["event"] == "request"):
        begin = next(e for e in r0 if e["event"] == "change_begin" and e["t"] >= q["t"])
        end = next(e for e in r0 if e["event"] == "change_end" and e["t"] >= begin["t"])
        first = next(e for e in r0 if e["event"] == "first_step" and e["t"] > end["t"])
        last_old = max((e for e in r0 if e["event"] in ("step", "first_step") and e["t"] <= begin["t"]),
                       key=lambda e: e["t"])
        kind = "expand" if q["want"] > q["size"] else "shrink (graceful)"
        rows.append((f"{kind} {q['size']} -> {q['want']}", first["t"] - q["t"], first["t_begin"] - last_old["t"],
                     end["t"] - begin["t"]))
    ck = os.path.join(d, "ck.pt")
    pool_run(2, 2, ["--checkpoint", ck, "--stop-after", "30"], a.timeout)
    rs_path = os.path.join(d, "restart.jsonl")
    t0, _ = pool_run(3, 3, ["--resume", ck, "--stop-after", "1", "--events", rs_path], a.timeout)
    first = next(e for e in events(rs_path) if e["event"] == "first_step" and e["rank"] == 0)
    restart = first["t"] - t0
    rows.append(("kill-all-and-restart 2 -> 3 (relaunch from checkpoint)", restart, restart, None))
    kl_path = os.path.join(d, "sigkill.jsonl")
    pool_run(3, 4, ["--kill-at", "50", "--events", kl_path], a.timeout)
    ev = events(kl_path)
    kill = next(e for e in ev if e["event"] == "kill")
    seen = min(e["t"] for e in ev if e["event"] == "failure")
    back = next(e for e in ev if e["event"] == "first_step" and e["rank"] == 0 and e["t"] > seen)
    done = next(e for e in ev if e["event"] == "done" and e["rank"] == 0)

    print("| change | event -> first step on the new world (s) | pause the old workers see (s) | "
          "of which the coordination step (s) |\n|---|---|---|---|")
    for name, lat, pause, coord in rows:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {name} | {lat:.3f} | {f(pause)} | {f(coord)} |")
    print(f"| SIGKILL of 1 of 3 ranks (a standby replaces it) | {back['t'] - kill['t']:.3f} "
          f"(failure seen after {seen - kill['t']:.3f}) | - | - |")
    exp = [lat for n, lat, *_ in rows if n.startswith("expand")]
    print(f"\nrestart / expand latency: {restart / (sum(exp) / len(exp)):.1f}x (mean of {len(exp)} expands); "
          f"median step {_median(steps):.3f} s; after the SIGKILL: {done['step']} steps, resumed from step "
          f"{back['step']} (commit every 5)")
    print("standbys prepared in the background (first process start -> ready, while the others trained): " +
          ", ".join(f"rank {r} {t:.2f} s" for r, t in sorted(prep.items())))
    if a.accuracy:
        pool_accuracy(a, d)
    print(f"events in {d}")


def pool_accuracy(a, d):
    runs = {"keep": ("topk 10%, elastic, rule keep", 2, 4, ["--rule", "keep"]),
            "flush": ("topk 10%, elastic, rule flush (default)", 2, 4, ["--rule", "flush"]),
            "zero": ("topk 10%, elastic, rule zero", 2, 4, ["--rule", "zero"]),
            "fixed2": ("topk 10%, fixed 2 ranks", 2, 2, []), "fixed4": ("topk 10%, fixed 4 ranks", 4, 4, []),
            "dense2": ("none (dense), fixed 2 ranks", 2, 2, ["--compressor", "none"]),
            "dense": ("none (dense), elastic", 2, 4, ["--compressor", "none"])}
    seeds = [int(s) for s in a.seeds.split(",")]
    table = {}
    which = [w for w in getattr(a, "runs", "fixed2,fixed4,flush,keep,zero").split(",") if w]
    for name, np_, mx, extra in (runs[w] for w in which):
        for seed in seeds:
            sched = ["--schedule", "30:3,60:4,90:2"] if mx != np_ else []
            _, out = pool_run(np_, mx, [*sched, *extra, "--seed", str(seed)], a.timeout)
            acc = float(next(line for line in out.splitlines() if line.startswith("ACC")).split()[1])
            table.setdefault(name, {})[seed] = acc
            print(f"  {name} seed {seed}: {acc:.2f}", flush=True)
    print("\n| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |\n|---|" + "---|" * (len(seeds) + 1))
    for name, by in table.items():
        vals = [by[s] for s in seeds if s in by]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / len(vals):.2f} |")


if __name__ == "__main__":
    main()
