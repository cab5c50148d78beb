"""gradcomp_torch.pool under its launcher: a tiny model, every event as a JSON line in --dir.

    python -m gradcomp_torch.pool --np 1 --max-np 3 this.py --dir D --plan 3:size=3,7:leave=2
    python -m gradcomp_torch.pool --np 2 --max-np 3 this.py --dir D --die-at 5

--plan step:size=N / step:leave=R,...: rank 0 requests these changes after that step.
--die-at B: the last rank of the first world SIGKILLs itself after step B."""
import argparse
import json
import os
import signal
import time

import torch

import gradcomp_torch as gct
import gradcomp_torch.pool as gcp
from gradcomp import elastic as core

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--batches", type=int, default=12)
ap.add_argument("--every", type=int, default=2)
ap.add_argument("--plan", default="")
ap.add_argument("--die-at", type=int, default=-1)
ap.add_argument("--rule", default="keep")
ap.add_argument("--die-rank", type=int, default=-1, help="the rank (of the first world) that dies; default the last")
args = ap.parse_args()
plan = {}
for item in filter(None, args.plan.split(",")):
    b, what = item.split(":")
    k, v = what.split("=")
    plan[int(b)] = {"size": int(v)} if k == "size" else {"leave": [int(v)]}

pool = gcp.init(timeout=60)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = gct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), named_parameters=model.named_parameters(),
                               compressor="topk:ratio=0.1", memory="residual", comm=pool.comm)


def held():
    return {n: v.reshape(-1).tolist() for n, v in core.held_mass(opt.gradient_sync).items()}


def params():
    return [round(float(v), 7) for v in torch.cat([p.detach().reshape(-1) for p in model.parameters()])[:6]]


def emit(event, **kw):
    kw.pop("plan", None) if event in ("step",) else None
    kw.update(event=event, rank=pool.rank, size=pool.size, gen=pool.gen, t=kw.get("t", time.time()))
    if event in ("change_begin", "change_end", "left", "joined"):
        kw["held"] = held()
    if event in ("change_end", "left"):
        kw["handed"] = {n: v.reshape(-1).tolist() for n, v in state.handed.items()}
    with open(os.path.join(args.dir, f"events{pool.rank}.jsonl"), "a") as f:
        f.write(json.dumps(kw, default=str) + "\n")


state = gcp.State(pool, model, opt, rule=args.rule, step=0, on_event=emit)


def train(state):
    while state.step < args.batches:
        b = state.step
        g = torch.Generator().manual_seed(1000 * b + pool.comm.rank)
        x = torch.randn(16, 8, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
        opt.step()
        state.step = b + 1
        emit("step", batch=b, params=params(), step=opt.gradient_sync.steps)
        if b == args.die_at and pool.gen == 0 and pool.comm.rank == (pool.size - 1 if args.die_rank < 0 else args.die_rank):
            # only a standby that is ready when the failure is seen replaces the dead rank (otherwise the world
            # shrinks, by design): on a loaded machine a standby can still be importing torch at batch 5
            t_wait = time.time() + 45    # inside the survivors' 60 s collective timeout
            while time.time() < t_wait and not all(pool.store.check([gcp.P + f"ready/{r}"])
                                                   for r in range(pool.max_size) if r not in pool.members):
                time.sleep(0.05)
            emit("die", batch=b)
            os.kill(os.getpid(), signal.SIGKILL)
        if b in plan and pool.comm.rank == 0:
            for r in range(plan[b].get("size") or 0):   # deterministic: the standbys are prepared first
                while r not in pool.members and not pool.store.check([gcp.P + f"ready/{r}"]):
                    time.sleep(0.05)
            pool.request(**plan[b])
        if state.check() and state.left:
            return
        if state.step % args.every == 0:
            state.commit()
            emit("commit", batch=state.step)


gcp.run(train, state)
if pool.active and not state.left:
    emit("done", batch=state.step, step=opt.gradient_sync.steps, params=params())
    print(f"DONE {pool.comm.rank}", flush=True)
