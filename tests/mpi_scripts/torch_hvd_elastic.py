"""Horovod Elastic with gradcomp_torch.elastic: 1 rank -> 2 (expand) -> 1 (graceful leave).

Run by tests/test_elastic_multiproc.py under
    horovodrun --min-np 1 --max-np 2 --host-discovery-script DISCOVER ... this.py --hosts HOSTS --out DIR
DISCOVER prints the contents of HOSTS; rank 0 rewrites HOSTS at fixed batches. Every rank writes
one JSON line per event to DIR/rank<pid>.jsonl; the test checks them.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

import horovod.torch as hvd
import gradcomp_torch as gct
import gradcomp_torch.elastic as gce

ap = argparse.ArgumentParser()
ap.add_argument("--hosts", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--batches", type=int, default=14)
ap.add_argument("--grow-at", type=int, default=3)
ap.add_argument("--shrink-at", type=int, default=8)
args = ap.parse_args()

hvd.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = gct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                               named_parameters=model.named_parameters(), compressor="topk:ratio=0.1",
                               memory="residual", backend="horovod")
log = open(os.path.join(args.out, f"rank{os.getpid()}.jsonl"), "a")


def emit(**kw):
    kw.update(pid=os.getpid(), rank=hvd.rank(), size=hvd.size(), t=time.time())
    log.write(json.dumps(kw) + "\n")
    log.flush()


def residual_norm():
    gs = opt.gradient_sync
    return float(sum(float(np.abs(v).sum()) for v in gce.core.held_mass(gs).values()))


def pending():
    gs = opt.gradient_sync
    return {k: float(torch.as_tensor(v).double().sum()) for k, v in gs._flushed.items()}


def params():
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


state = gce.TorchState(model=model, optimizer=opt, batch=0)


def on_reset():
    emit(event="reset", residual=residual_norm(), pending=pending(), step=opt.gradient_sync.steps)


state.register_reset_callbacks([on_reset])
_orig_flush = gce.DistributedOptimizerStateHandler.flush


def _logged_flush(self):
    held = gce.core.held_mass(self.value.gradient_sync)
    summed = _orig_flush(self)
    emit(event="flush", held={k: v.reshape(-1).tolist() for k, v in held.items()},
         summed={k: torch.as_tensor(v).reshape(-1).tolist() for k, v in (summed or {}).items()})
    return summed


gce.DistributedOptimizerStateHandler.flush = _logged_flush


def set_hosts(n):
    with open(args.hosts + ".tmp", "w") as f:
        f.write(f"localhost:{n}\n")
    os.replace(args.hosts + ".tmp", args.hosts)


@gce.run
def train(state):
    emit(event="synced", residual=residual_norm(), pending=pending(), step=opt.gradient_sync.steps,
         batch=state.batch, params=params())
    while state.batch < args.batches:
        b = state.batch
        g = torch.Generator().manual_seed(1000 * b + hvd.rank())
        x = torch.randn(16, 8, generator=g)
        y = x.sum(1, keepdim=True)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        state.batch = b + 1
        emit(event="step", batch=b, params=params())
        want = {args.grow_at: (1, 2), args.shrink_at: (2, 1)}.get(b)
        if want is not None and hvd.size() == want[0]:
            if hvd.rank() == 0:
                set_hosts(want[1])
                emit(event="hosts", slots=want[1])
            for _ in range(600):          # wait (committing) until the driver's discovery sees it
                state.commit()
                time.sleep(0.05)
        state.commit()


train(state)
emit(event="done", batch=state.batch, step=opt.gradient_sync.steps)
print("DONE", hvd.rank(), flush=True)
