"""Load balancing and virtual workers on digits: an equal split against gradcomp_torch.VirtualWorkers(balance=True).

    python benchmarks/load_balance.py --launch                 # runs itself under mpirun -np 2
    mpirun -np 2 python benchmarks/load_balance.py

Workload: scikit-learn's digits (1438 training images, 359 test), an MLP 64-128-10, SGD lr 0.1 with
momentum 0.9, `--epochs` epochs, V = `--virtual-workers` virtual workers of `--micro-batch` images
(global batch V * micro-batch, the same in every run). An injected delay makes rank 1 a device s =
`--slowdown` times slower: after its k-th micro-batch of a step a rank sleeps until
start + s_r * (C_k + k * d), where C_k is its forward/backward time so far, d = `--delay`, s_0 = 1 and
s_1 = s (absolute deadlines, so sleep overshoot does not accumulate). With d dominating the real
compute the ratios stay meaningful on a loaded machine.

Runs (every rank takes part in each; the 1-rank runs train the same V on a one-rank communicator):
  equal          2 ranks, V/2 virtual workers each (balance=False)
  balanced       2 ranks, balance=True (re-evaluated every `--every` steps)
  1-rank         the same V on one rank, no delay (the model the 2-rank runs must reproduce)
  topk ...       the same three with compressor topk (`--topk`, residual error feedback)

Columns: wait % = each rank's wait at the collective over its compute + wait, and spread = the mean
over steps of max - min compute across ranks (VirtualWorkers' rank-time report, steps after the first
`--skip`, whose table is also printed for the balanced runs), step ms and samples/s from the wall clock
from the first timed step to the end of training (between two barriers), the speed-up against `equal`,
the final shares, test accuracy, and the largest parameter difference from the 1-rank model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--virtual-workers", type=int, default=24)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--delay", type=float, default=0.04, help="seconds slept per micro-batch on rank 0")
    p.add_argument("--slowdown", type=float, default=2.0, help="rank 1 takes this times as long per micro-batch")
    p.add_argument("--every", type=int, default=4, help="balancer: re-evaluate every N steps")
    p.add_argument("--skip", type=int, default=10, help="steps left out of the timings (start-up, first rebalance)")
    p.add_argument("--topk", default="topk:ratio=0.1", help="compressor of the topk rows ('' to skip them)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--json", action="store_true", help="rank 0 prints RESULT {json}")
    p.add_argument("--launch", action="store_true", help="run itself under mpirun -np 2")
    p.add_argument("--timeout", type=int, default=1800)
    return p.parse_args(argv)


def launch(a, argv):
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, os.path.abspath(__file__)] + [x for x in argv if x != "--launch"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    try:
        return proc.wait(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        print(f"load_balance: timed out after {a.timeout}s", file=sys.stderr)
        return 124


def run(a, comm, data, *, balance, compressor, delay):
    import torch
    import torch.nn.functional as F

    import gradcomp_torch as gct
    xtr, ytr, xte, yte = data
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = gct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9),
                                   named_parameters=model.named_parameters(), compressor=compressor, comm=comm)
    vw = gct.VirtualWorkers(opt, len(xtr), micro_batch=a.micro_batch, virtual_workers=a.virtual_workers,
                            balance=balance, every=a.every, seed=0)
    slow = a.slowdown if comm.rank == 1 else 1.0
    samples, gstep, t_from = 0, 0, None
    for epoch in range(a.epochs):
        for step in vw.epoch(epoch):
            if gstep == a.skip:
                comm.barrier()
                t_from = time.perf_counter()
            start, busy = time.perf_counter(), 0.0
            for k, mb in enumerate(step, 1):
                tc = time.perf_counter()
                (F.cross_entropy(model(xtr[mb.indices]), ytr[mb.indices]) * mb.loss_scale).backward()
                busy += time.perf_counter() - tc
                if delay:       # sleep until slow x (compute so far + k delays) after the step's start
                    time.sleep(max(0.0, start + slow * (busy + k * delay) - time.perf_counter()))
            opt.step()
            opt.zero_grad()
            samples += step.total if gstep >= a.skip else 0
            gstep += 1
    comm.barrier()
    elapsed = time.perf_counter() - t_from
    with torch.no_grad():
        acc = float((model(xte).argmax(-1) == yte).float().mean()) * 100
    st = vw.stats(skip=a.skip) if comm.size > 1 else None
    table = vw.report.table(skip=a.skip)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"wall": elapsed, "samples": samples, "steps": gstep - a.skip,
            "acc": acc, "stats": st, "params": params, "table": table, "shares": list(vw.shares),
            "changes": vw.balancer.changes}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.launch:
        return launch(a, argv)
    import torch

    import common_data
    import gradcomp
    import gradcomp_torch as gct
    torch.set_num_threads(1)
    comm = gct.init("mpi")
    if comm.size != 2:
        raise SystemExit(f"load_balance.py runs on 2 ranks (mpirun -np 2 or --launch), got {comm.size}")
    xtr, ytr, xte, yte = common_data.digits(0)
    data = (torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte))
    rows = []
    specs = [("none", "none")] + ([("topk", a.topk)] if a.topk else [])
    for label, spec in specs:
        one = run(a, gradcomp.SingleCommunicator(), data, balance=False, compressor=spec, delay=0.0)
        base = None
        for mode in ("equal", "balanced"):
            r = run(a, comm, data, balance=mode == "balanced", compressor=spec, delay=a.delay)
            s = r["stats"]["summary"]
            step_ms = 1e3 * r["wall"] / r["steps"]
            thr = r["samples"] / r["wall"]
            base = thr if mode == "equal" else base
            if comm.rank == 0 and mode == "balanced":
                print(f"rank-time report, {label} balanced (VirtualWorkers.report.table):\n"
                      + r["table"], flush=True)
            rows.append({"run": f"{label} {mode}", "wait_pct": [round(100 * w, 1) for w in s["wait_frac"]],
                         "compute_ms": [round(1e3 * c, 1) for c in s["compute"]],
                         "wait_ms": [round(1e3 * w, 1) for w in s["wait"]], "step_ms": round(step_ms, 1),
                         "spread_ms": round(1e3 * s["spread"], 1),
                         "samples_per_s": round(thr, 1), "speedup": round(thr / base, 2), "shares": r["shares"],
                         "rebalances": r["changes"], "acc": round(r["acc"], 2),
                         "max_diff_vs_1rank": float((r["params"] - one["params"]).abs().max())})
        rows.append({"run": f"{label} 1-rank (V={a.virtual_workers}, no delay)", "acc": round(one["acc"], 2),
                     "shares": one["shares"]})
    if comm.rank == 0:
        print(f"V={a.virtual_workers} x {a.micro_batch} images (global batch {a.virtual_workers * a.micro_batch}), "
              f"{a.epochs} epochs, rank 1 {a.slowdown}x slower per micro-batch "
              f"(delay {1e3 * a.delay:.0f} ms on rank 0), "
              f"timings over the steps after the first {a.skip}")
        print("| run | wait % (rank 0, 1) | compute ms (0, 1) | wait ms (0, 1) | spread ms | step ms | samples/s "
              "| speed-up | shares | accuracy % | max |param - 1-rank| |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "wait_pct" not in r:
                print(f"| {r['run']} | | | | | | | | {r['shares']} | {r['acc']:.2f} | 0 |")
                continue
            print(f"| {r['run']} | {r['wait_pct'][0]}, {r['wait_pct'][1]} | {r['compute_ms'][0]}, "
                  f"{r['compute_ms'][1]} | {r['wait_ms'][0]}, {r['wait_ms'][1]} | {r['spread_ms']} | {r['step_ms']} | "
                  f"{r['samples_per_s']} | {r['speedup']:.2f}x | {r['shares']} ({r['rebalances']} change(s)) | "
                  f"{r['acc']:.2f} | {r['max_diff_vs_1rank']:.1e} |")
        if a.json:
            print("RESULT " + json.dumps({"args": vars(a), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
