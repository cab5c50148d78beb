"""Stop-free elastic training on digits with gradcomp_torch.pool (top-k with error feedback).

The same training as examples/torch_elastic.py (global batch 96 split equally over the P ranks, so
the averaged gradient is the mean over the same samples at any P), but the joining workers are
started up front and prepared while the others train; a change is a short step at a step boundary.

    # fixed size (the reference run)
    python -m gradcomp_torch.pool --np 2 --max-np 2 examples/torch_elastic_pool.py
    # elastic: rank 0 asks for the sizes of --schedule (step:size,...): 2 -> 3 -> 4 -> 2 (graceful)
    python -m gradcomp_torch.pool --np 2 --max-np 4 examples/torch_elastic_pool.py --schedule 30:3,60:4,90:2
    # a SIGKILL: the last rank kills itself after step 50; a standby takes its place
    python -m gradcomp_torch.pool --np 3 --max-np 4 examples/torch_elastic_pool.py --kill-at 50
    # mpi/elastic_recipe.sh: 2 -> 3 -> 4, a SIGKILL at step 75 (4 -> 3), a graceful leave at 90 (3 -> 2)

--events FILE appends one JSON line per event (request, change begin/end, first step on a world,
the end) for benchmarks/elastic_bench.py; --checkpoint / --resume give the kill-and-restart
alternative it compares with.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_START = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common_data  # noqa: E402
from torch_train import DigitsCNN  # noqa: E402

import gradcomp_torch as gct  # noqa: E402
import gradcomp_torch.pool as gcp  # noqa: E402

GLOBAL_BATCH = 96            # divisible by 1, 2, 3 and 4 ranks


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--compressor", default="topk:ratio=0.1")
    p.add_argument("--rule", choices=gcp.RULES, default="flush", help="residuals at a graceful change")
    p.add_argument("--schedule", default="", help="step:size,... (rank 0 requests these sizes)")
    p.add_argument("--commit-every", type=int, default=5)
    p.add_argument("--events", help="append JSON events here")
    p.add_argument("--checkpoint", help="save a checkpoint at every commit (rank 0)")
    p.add_argument("--resume", help="load this checkpoint first")
    p.add_argument("--stop-after", type=int, default=0, help="stop after this many steps of this process")
    p.add_argument("--kill-at", type=int, default=0, help="the last active rank SIGKILLs itself after this step")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    pool = gcp.init()
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = (torch.from_numpy(v) for v in common_data.digits(a.seed))
    model = DigitsCNN()
    opt = gct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=a.lr), named_parameters=model.named_parameters(),
                                   compressor=a.compressor, memory="residual", comm=pool.comm, seed=a.seed)
    steps_per_epoch = len(ytr) // GLOBAL_BATCH
    total = a.epochs * steps_per_epoch
    schedule = {int(s): int(n) for s, n in (x.split(":") for x in a.schedule.split(",") if x)}

    def emit(event, **kw):
        if a.events:
            kw.update(event=event, rank=pool.rank, size=pool.size, active=pool.active, t=kw.get("t", time.time()),
                      pid=os.getpid())
            with open(a.events, "a") as f:
                f.write(json.dumps(kw, default=str) + "\n")

    start_step = 0
    if a.resume and os.path.exists(a.resume):
        ck = gct.load_checkpoint(a.resume)
        model.load_state_dict(ck["model"])
        opt.inner.load_state_dict(ck["optimizer_inner"])
        rep = ck["replicated"]
        rep["size"] = pool.comm.size
        opt.load_replicated_state_dict(rep)
        start_step = int(ck["step"])
    state = gcp.State(pool, model, opt, rule=a.rule, step=start_step, on_event=emit)
    emit("ready", t_launch=T_START, step=start_step)
    local = {"steps": 0}

    def train(state):
        first = True
        while state.step < total:
            s = state.step
            t0 = time.time()
            epoch, i = divmod(s, steps_per_epoch)
            order = np.random.default_rng(a.seed + epoch).permutation(len(ytr))
            batch = order[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]
            share = GLOBAL_BATCH // pool.size
            r = pool.comm.rank
            mine = torch.from_numpy(batch[r * share:(r + 1) * share])
            opt.zero_grad()
            F.cross_entropy(model(xtr[mine]), ytr[mine]).backward()
            opt.step()
            state.step = s + 1
            local["steps"] += 1
            if first:
                emit("first_step", step=s, t_begin=t0)
                first = False
            else:
                emit("step", step=s, t_begin=t0) if a.events and r == 0 else None
            if a.kill_at and s == a.kill_at and r == pool.size - 1 and pool.size > 1 \
                    and pool.store.add("example/killed", 1) == 1:        # once (the steps after a commit rerun)
                emit("kill", step=s)
                os.kill(os.getpid(), 9)
            if r == 0 and s in schedule and pool.size != schedule[s]:
                n = pool.request(size=schedule[s])
                emit("request", step=s, want=schedule[s], n=n)
            if state.check():
                if state.left:
                    return
                first = True
            if state.step % a.commit_every == 0:
                state.commit()
                if a.checkpoint and pool.comm.rank == 0:
                    gct.save_checkpoint({"model": model.state_dict(), "optimizer_inner": opt.inner.state_dict(),
                                         "replicated": opt.replicated_state_dict(), "step": state.step}, a.checkpoint)
            if a.stop_after and local["steps"] >= a.stop_after:
                return

    gcp.run(train, state)
    if state.left or not pool.active:
        emit("exit", step=state.step)
        return
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean()) * 100
    emit("done", step=state.step, acc=acc)
    if pool.comm.rank == 0:
        print(f"ACC {acc:.2f} steps {state.step} size {pool.size} compressor {a.compressor} rule {a.rule}", flush=True)


if __name__ == "__main__":
    main()
