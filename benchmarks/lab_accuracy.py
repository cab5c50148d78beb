"""`python -m benchmarks accuracy`: accuracy / perplexity against bytes sent and wall time.

Trains the digits CNN and the WikiText-2 word-level LSTM language model of
`examples/torch_train.py` (its DigitsTask / LMTask, models and data loaders are imported, not
copied) on N ranks of the emulated cluster (mpi/netlab, default 1gbit per link; loopback TCP
without root), once per method, each for the same fixed budget of optimizer steps from the same
initial weights: dense SGD (one fused fp32 MPI_Allreduce per step) beside every gradcomp
compressor and sync policy (and Horovod's fp16 when horovod imports). Every `--eval-every`
steps (a multiple of the policies' period, so that the ranks have just synchronized) the test
metric is measured on every rank's shard and summed: accuracy (%) on the held-out digits, or
perplexity on the first `--lm-test-tokens` tokens per rank of wikitext2-test (the example's split of
the test stream over ranks, 10 rows each). Logged per point: step,
training wall time so far (evaluation excluded), cumulative bytes this rank handed to collectives;
per gradcomp method also, over the whole run, wire_MB (per-rank wire bytes under the collective's ring
algorithm) and U/k of sparsifiers, from GradientSync.stats() (gradcomp/traffic.py).

Optimizers are the example's: SGD(lr 0.05, momentum 0.9, batch 32 per rank) for digits; Adam(lr
0.003) with gradient clipping 0.25 for the LM (10k-word vocabulary from wikitext2-valid, embedding 64,
one LSTM layer of 128, bptt 35, `--lm-batch` sequences per rank). Outputs accuracy.csv (final point per task and method),
accuracy_curves.csv (every point) and accuracy_<task>.png (metric vs MB sent, metric vs seconds).

`--recipes` runs dense beside every recipe of gradcomp/recipes.py instead (the README's recipe table:
compressor, memory and the SGD lr / momentum as the user writes them, per method); `--schedule cosine`
decays the learning rate to 0 over the budget as the example does. `--network` may be a comma list
(e.g. 1gbit,100mbit: every method once per network); then time_to_accuracy.csv / .md and
time_to_accuracy_<task>.png give, per network and method, the training seconds (evaluations excluded) to
the first evaluation at 99% of dense's final accuracy (perplexity: dense's / 0.99) and dense's time over it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.lab_cluster import REPO, NetLab, _Counting, make_optimizer, method_list

COLUMNS = ["task", "network", "method", "steps", "metric", "final", "best", "MB_sent", "wire_MB", "U/k", "train_s",
           "status"]
CURVE_COLUMNS = ["task", "network", "method", "step", "wall_s", "MB_sent", "metric", "value"]


def add_args(p):
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--network", default="1gbit", help="per-link bandwidth of the emulated network (default 1gbit); "
                   "a comma list (e.g. 1gbit,100mbit) runs every method once per network")
    p.add_argument("--delay", default="2ms")
    p.add_argument("--tasks", default="digits,lm", help="digits,lm (default both)")
    p.add_argument("--methods", default="", help="only methods whose label contains one of these (comma list)")
    p.add_argument("--digits-steps", type=int, default=0, help="budget in optimizer steps (default 112, about 5 epochs)")
    p.add_argument("--lm-steps", type=int, default=0, help="budget in optimizer steps (default 60)")
    p.add_argument("--lm-batch", type=int, default=8, help="LM sequences per rank and step (default 8)")
    p.add_argument("--lm-test-tokens", type=int, default=0, help="test tokens per rank for perplexity (default 5000)")
    p.add_argument("--loopback", action="store_true")
    p.add_argument("--timeout", type=int, default=0, help="seconds per launch (default 1800; smoke 180)")
    p.add_argument("--recipes", action="store_true",
                   help="digits: run dense beside every recipe of gradcomp/recipes.py (the README's recipe table: "
                        "compressor, memory, SGD lr and momentum per method) instead of the method list")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate over the budget: constant (default), or the example's cosine decay to 0")


# =============================================================================== worker
def _load_example():
    ex = os.path.join(REPO, "examples")
    if ex not in sys.path:
        sys.path.insert(0, ex)
    import torch_train            # examples/torch_train.py: DigitsTask, LMTask, parse_args
    return torch_train


def _worker(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", required=True, help="comma list, e.g. digits,lm")
    ap.add_argument("--methods", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", required=True, help="budget per task, comma list")
    ap.add_argument("--eval-every", required=True, help="evaluation interval per task, comma list")
    ap.add_argument("--test-tokens", type=int, default=5000)
    ap.add_argument("--lm-batch", type=int, default=8)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--schedule", default="constant")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from mpi4py import MPI
    from gradcomp.comm import make_communicator
    world = MPI.COMM_WORLD
    comm = make_communicator("mpi")
    methods = json.load(open(a.methods))
    tasks = a.tasks.split(",")
    steps = dict(zip(tasks, map(int, a.steps.split(","))))
    every = dict(zip(tasks, map(int, a.eval_every.split(","))))
    try:
        tt = _load_example()
    except Exception as e:          # noqa: BLE001 - no example yet: every row says so
        for task in tasks:
            for m in methods:
                _emit(a.out, world.rank, {"task": task, "method": m["label"], "status":
                                          f"skipped: examples/torch_train.py unavailable ({type(e).__name__})"})
        return
    for name in tasks:
        _run_task(tt, name, steps[name], every[name], methods, a, torch, world, comm)


def _run_task(tt, name, steps, every, methods, a, torch, world, comm):
    args = ["--task", name, "--no-progress"] + (["--batch-size", str(a.lm_batch)] if name == "lm" else [])
    if a.smoke:
        args += ["--max-vocab", "300", "--emsize", "16", "--nhid", "16", "--bptt", "10"]
    opts = tt.parse_args(args)
    torch.manual_seed(opts.seed)
    task = (tt.LMTask if name == "lm" else tt.DigitsTask)(opts, comm)
    if name == "lm":
        task.test = task.test[:, :max(2, a.test_tokens // task.test.shape[0])]
    model0 = task.model            # pristine: each method trains a fresh copy (Horovod's hooks stay on a model)
    numel = sum(p.numel() for p in model0.parameters())
    for i, m in enumerate(methods):
        t_start = time.time()
        res = {"task": name, "method": m["label"], "metric": task.metric}
        try:
            res.update(_train(task, m, steps, every, torch, model0, world, comm, numel, a.schedule))
        except Exception as e:      # noqa: BLE001
            res["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        _emit(a.out, world.rank, res)
        if world.rank == 0:
            pts = res.get("points") or [{}]
            shown = f"{task.metric} {pts[-1]['value']:.2f}" if "value" in pts[-1] else res.get("status")
            print(f"[accuracy {name}] {i + 1}/{len(methods)} {m['label']}: {shown} ({time.time() - t_start:.0f}s)",
                  file=sys.stderr, flush=True)


def _emit(path, rank, res):
    if rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps(res) + "\n")


def _train(task, m, steps, every, torch, model0, world, comm, numel, schedule="constant"):
    if m.get("skip"):
        return {"status": m["skip"]}
    task.model = copy.deepcopy(model0)
    base = task.make_optimizer()
    for g in base.param_groups:            # a recipe's SGD settings, as the user writes them
        for key in ("lr", "momentum"):
            if m.get(key) is not None:
                g[key] = m[key]
                base.defaults[key] = m[key]
    opt, counter, cleanup, fixed, status = make_optimizer(m, task.model, base, world, comm, "", numel)
    if status:
        return {"status": status}
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=steps) if schedule == "cosine" else None
    if hasattr(task, "attach"):            # the example's task hooks its optimizer (virtual workers: off)
        task.attach(opt)
    if counter is not None:
        counter.nbytes = 0
    points, step, wall, epoch, state = [], 0, 0.0, 0, None
    try:
        task.model.eval()
        points.append({"step": 0, "wall_s": 0.0, "MB_sent": 0.0, "value": task.evaluate()})
        while step < steps:
            task.model.train()
            for b in task.batches(epoch):
                world.Barrier() if step == 0 else None
                t0 = time.perf_counter()
                _, _, state = task.train_step(opt, b, state)
                if sched is not None:
                    sched.step()
                wall += time.perf_counter() - t0
                step += 1
                if step % every == 0 or step == steps:
                    if hasattr(opt, "policy") and hasattr(opt.policy, "flush"):
                        opt.policy.flush()
                    world.Barrier()
                    sent = counter.nbytes if counter is not None else fixed * step
                    task.model.eval()
                    points.append({"step": step, "wall_s": wall, "MB_sent": sent / 1e6, "value": task.evaluate()})
                    task.model.train()
                if step >= steps:
                    break
            epoch, state = epoch + 1, None
    finally:
        if cleanup:
            cleanup()
    out = {"points": points, "status": "ok"}
    if m["kind"] == "gradcomp":            # gradcomp's own accounting over the run (gradcomp/traffic.py)
        st = opt.stats()
        out.update(wire_MB=st["wire_sent"] / 1e6, union_k=st.get("union_k"))
    return out


# =============================================================================== driver
def run(args) -> list[dict]:
    from benchmarks import plotting
    smoke = args.smoke
    tasks = args.tasks.split(",") if args.tasks else ["digits", "lm"]
    budget = {"digits": args.digits_steps or (4 if smoke else 112), "lm": args.lm_steps or (4 if smoke else 60)}
    every = {"digits": 2 if smoke else 8, "lm": 2 if smoke else 12}
    timeout = args.timeout or (180 if smoke else 1800)
    methods = ([m for m in method_list(smoke, args.methods) if m["label"] != "gradcomp none"] if not args.recipes
               else recipe_methods(args.methods))
    if smoke:
        methods = [m for m in methods if m["kind"] != "horovod"]
    if not methods:
        raise SystemExit(f"--methods {args.methods!r} matches no method; labels: "
                         + ", ".join(m["label"] for m in method_list(smoke)))
    tmp = tempfile.mkdtemp(prefix="gclab-acc-")
    mfile = os.path.join(tmp, "methods.json")
    json.dump(methods, open(mfile, "w"))
    rows, curves = [], []
    try:
        networks = args.network.split(",")
        for network in (networks[:1] if args.loopback else networks):     # loopback is unshaped: one run
            with NetLab(args.ranks, network, args.delay, smoke, args.loopback) as lab:
                lab.probe(20 if smoke else 100)
                out = os.path.join(tmp, f"results-{network}.jsonl")
                cmd = [sys.executable, "-m", "benchmarks.lab_accuracy", "--worker", "--tasks", ",".join(tasks),
                       "--methods", mfile, "--out", out, "--steps", ",".join(str(budget[t]) for t in tasks),
                       "--eval-every", ",".join(str(every[t]) for t in tasks),
                       "--schedule", args.schedule, "--test-tokens", str(args.lm_test_tokens or (400 if smoke else 5000)),
                       "--lm-batch", str(args.lm_batch)]
                cmd += ["--smoke"] if smoke else []
                t0 = time.time()
                try:
                    r = lab.launch(cmd, timeout)
                    failed = f"launcher exit {r.returncode}" if r.returncode else ""
                except subprocess.TimeoutExpired:
                    failed = f"timed out after {timeout}s"
                got = {}
                if os.path.exists(out):
                    got = {(g["task"], g["method"]): g for g in (json.loads(x) for x in open(out) if x.strip())}
                for task in tasks:
                    for m in methods:
                        g = got.get((task, m["label"]), {"status": f"not run ({failed or 'no result'})"})
                        row = {"task": task, "network": lab.label, "method": m["label"], "status": g.get("status")}
                        pts = g.get("points") or []
                        if g.get("status") == "ok" and pts:
                            vals = [p["value"] for p in pts]
                            row.update({"wire_MB": g.get("wire_MB"), "U/k": g.get("union_k")})
                            row.update(metric=g["metric"], steps=pts[-1]["step"], final=vals[-1],
                                       MB_sent=pts[-1]["MB_sent"],
                                       train_s=pts[-1]["wall_s"], best=max(vals) if g["metric"] == "acc" else min(vals))
                            curves += [dict(p, task=task, network=lab.label, method=m["label"], metric=g["metric"])
                                       for p in pts]
                        rows.append(row)
                plotting.note(f"accuracy: {','.join(tasks)} on {lab.label}: {time.time() - t0:.0f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plotting.emit(rows, COLUMNS, args.out, "accuracy", title=f"accuracy against bytes ({args.ranks} ranks)")
    plotting.write_csv(os.path.join(args.out, "accuracy_curves.csv"), curves, CURVE_COLUMNS)
    nets = list(dict.fromkeys(r["network"] for r in rows))
    for task in tasks:
        _plot(plotting, os.path.join(args.out, f"accuracy_{task}.png"), task,
              [c for c in curves if c["task"] == task and c.get("network") == nets[0]], nets[0] if nets else "")
    tta = time_to_accuracy(rows, curves)
    if tta:
        plotting.emit(tta, TTA_COLUMNS, args.out, "time_to_accuracy",
                      title=f"time to {TTA_FRACTION:.0%} of dense's final metric ({args.ranks} ranks)")
        for task in tasks:
            got = [r for r in tta if r["task"] == task]
            if got:
                tta_plot(plotting, os.path.join(args.out, f"time_to_accuracy_{task}.png"), task, got)
    return rows


TTA_FRACTION = 0.99
TTA_COLUMNS = ["task", "network", "method", "target", "tta_step", "tta_s", "speedup", "final"]


def tta_plot(plotting, path, task, rows):
    """Bars: training seconds to the target per method (x) and network (colour); no bar: not reached."""
    short = [dict(r, method=r["method"].replace("recipe ", "").replace("dense allreduce (MPI fp32)", "dense"),
                  network=r["network"].split(",")[0]) for r in rows]
    plotting.grouped_bars(path, short, "network", "method", "tta_s", ylabel="training seconds",
                          title=f"{task}: time to {TTA_FRACTION:.0%} of dense's final (no bar: not reached)")


def time_to_accuracy(rows, curves, fraction=TTA_FRACTION) -> list[dict]:
    """Per (task, network, method): the training wall time (evaluations excluded) of the first evaluation
    point at or beyond `fraction` of dense's final metric (accuracy >= f * dense; perplexity <= dense / f),
    and dense's time divided by it (speedup). Methods that never reach it get no time."""
    out = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        dense = next((d for d in rows if d["task"] == r["task"] and d["network"] == r["network"]
                      and d["method"].startswith("dense") and d.get("status") == "ok"), None)
        if dense is None:
            continue
        acc = r.get("metric") == "acc"
        target = dense["final"] * fraction if acc else dense["final"] / fraction
        pts = [c for c in curves if c["task"] == r["task"] and c.get("network") == r["network"]
               and c["method"] == r["method"]]
        hit = next((c for c in pts if (c["value"] >= target if acc else c["value"] <= target)), None)
        out.append({"task": r["task"], "network": r["network"], "method": r["method"], "target": target,
                    "tta_step": hit["step"] if hit else None, "tta_s": hit["wall_s"] if hit else None,
                    "final": r["final"]})
    for r in out:
        d = next((x for x in out if x["task"] == r["task"] and x["network"] == r["network"]
                  and x["method"].startswith("dense")), None)
        if d and d["tta_s"] and r["tta_s"]:
            r["speedup"] = d["tta_s"] / r["tta_s"]
    return out


def recipe_methods(only: str = "") -> list[dict]:
    """Dense beside every recipe of gradcomp/recipes.py (the README's recipe table), as lab methods."""
    from gradcomp.recipes import RECIPES
    out = [{"label": "dense allreduce (MPI fp32)", "kind": "dense"}]
    out += [{"label": r.label(), "kind": "gradcomp", "compressor": r.compressor, "memory": r.memory, "lr": r.lr,
             "momentum": r.momentum, "sync": "allreduce"} for r in RECIPES]
    keep = [k.strip() for k in only.split(",") if k.strip()]
    return [m for m in out if m["kind"] == "dense" or not keep or any(k in m["label"] for k in keep)]


def _plot(plotting, path, task, curves, network):
    series_b, series_t = {}, {}
    for c in curves:
        label = c["method"].replace("gradcomp ", "").replace("dense allreduce (MPI fp32)", "dense SGD (MPI fp32)")
        series_b.setdefault(label, ([], []))
        series_t.setdefault(label, ([], []))
        series_b[label][0].append(max(c["MB_sent"], 1e-3))
        series_b[label][1].append(c["value"])
        series_t[label][0].append(c["wall_s"])
        series_t[label][1].append(c["value"])
    ylabel = "test accuracy (%)" if task == "digits" else "test perplexity"
    lm = task == "lm"
    plotting.curves(path, [
        {"series": series_b, "xlabel": "MB sent per rank (cumulative, log)", "ylabel": ylabel, "logx": True, "logy": lm},
        {"series": series_t, "xlabel": "training wall time (s)", "ylabel": ylabel, "logy": lm},
    ], title=f"{'digits CNN' if task == 'digits' else 'WikiText-2 LSTM LM'} on {network}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    else:
        sys.exit("run the lab as `python -m benchmarks accuracy ...` (this module's own entry is for its ranks)")
