"""torchrun elastic with gradcomp_torch.elastic.save_elastic / load_elastic.

    torchrun --nnodes=1:2 --nproc_per_node=2 --max-restarts=1 --rdzv-backend=c10d ... this.py --dir D

Every rank resumes from D/elastic.pt (the latest commit), trains to --batches committing every
--every batches, and (first attempt only) rank 1 SIGKILLs itself at --die-at. Each rank appends
one JSON line per event to D/events.jsonl."""
import argparse
import json
import os
import signal
import time

import torch

import gradcomp_torch as gct
import gradcomp_torch.elastic as gce
from gradcomp import elastic as core

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--batches", type=int, default=12)
ap.add_argument("--every", type=int, default=2)
ap.add_argument("--die-at", type=int, default=5)
args = ap.parse_args()

restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
comm = gce.init_torchrun()        # gct.init("torch") would reuse the last attempt's keys
path = os.path.join(args.dir, "elastic.pt")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = gct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), named_parameters=model.named_parameters(),
                               compressor="topk:ratio=0.1", memory="residual", comm=comm)
gct.broadcast_parameters(model.state_dict(), root_rank=0)


def emit(**kw):
    kw.update(rank=comm.rank, size=comm.size, restart=restart, t=time.time(), pid=os.getpid())
    with open(os.path.join(args.dir, "events.jsonl"), "a") as f:
        f.write(json.dumps(kw) + "\n")


def residual():
    return float(sum(float(abs(v).sum()) for v in core.held_mass(opt.gradient_sync).values()))


extra = gce.load_elastic(path, model, opt)
start = int(extra.get("batch", 0))
emit(event="resumed", batch=start, step=opt.gradient_sync.steps, residual=residual())
for b in range(start, args.batches):
    g = torch.Generator().manual_seed(1000 * b + comm.rank)
    x = torch.randn(16, 8, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
    opt.step()
    if restart == 0 and comm.rank == 1 and b == args.die_at:
        emit(event="die", batch=b)
        os.kill(os.getpid(), signal.SIGKILL)
    if (b + 1) % args.every == 0:
        gce.save_elastic(path, model, opt, {"batch": b + 1})
        emit(event="commit", batch=b + 1, residual=residual())
with torch.no_grad():
    params = float(sum(p.double().sum() for p in model.parameters()))
emit(event="done", batch=args.batches, step=opt.gradient_sync.steps, params=params)
print(f"DONE {comm.rank}", flush=True)   # one write: two ranks share the stdout
