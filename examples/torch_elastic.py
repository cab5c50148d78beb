"""Elastic training on digits with Horovod Elastic and gradcomp (top-k with error feedback).

The world may grow and shrink while it trains; the global batch stays fixed (every step each of
the P ranks takes an equal slice of the same GLOBAL_BATCH samples, so the averaged gradient is
the mean over the same samples at any P), and gradcomp_torch.elastic.TorchState flushes the
residuals into the next update at every graceful change.

    # fixed size (the reference run)
    horovodrun -np 2 python examples/torch_elastic.py
    # elastic: rank 0 rewrites the discovery file on a schedule (step:slots,...): 2 -> 3 -> 4 -> 2
    echo localhost:2 > /tmp/hosts; printf '#!/bin/sh\\ncat /tmp/hosts\\n' > /tmp/discover.sh; chmod +x /tmp/discover.sh
    horovodrun -np 2 --min-np 2 --max-np 4 --network-interface lo --host-discovery-script /tmp/discover.sh \\
        python examples/torch_elastic.py --hosts /tmp/hosts --schedule 30:3,60:4,90:2
  (mpi/elastic_recipe.sh runs both and compares.) --events FILE appends one JSON line per event
(host change asked, reset, first step on a world, the end) for benchmarks/elastic_bench.py.
--checkpoint PATH writes a gradcomp checkpoint at every commit (and --resume loads one): the
kill-and-restart alternative the benchmark compares with.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common_data  # noqa: E402
from torch_train import DigitsCNN  # noqa: E402

import horovod.torch as hvd  # noqa: E402
import gradcomp_torch as gct  # noqa: E402
import gradcomp_torch.elastic as gce  # noqa: E402

GLOBAL_BATCH = 96            # divisible by 1, 2, 3 and 4 ranks


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--compressor", default="topk:ratio=0.1")
    p.add_argument("--hosts", help="discovery file rank 0 rewrites on --schedule")
    p.add_argument("--schedule", default="", help="step:slots,... (host changes, by global step)")
    p.add_argument("--commit-every", type=int, default=5)
    p.add_argument("--events", help="append JSON events here")
    p.add_argument("--checkpoint", help="save_checkpoint at every commit (rank 0)")
    p.add_argument("--resume", help="load this checkpoint first")
    p.add_argument("--stop-after", type=int, default=0, help="exit after this many steps of this process")
    p.add_argument("--kill-at", type=int, default=0, help="the last rank SIGKILLs itself after this step "
                   "(first time only: a marker file next to --events)")
    p.add_argument("--on-change", choices=("flush", "zero"), default="flush",
                   help="residuals at a graceful change: flushed into the next update (gradcomp's rule) or "
                        "dropped (the alternative measured in docs/benchmarks.md)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    t_start = time.time()
    hvd.init()
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = (torch.from_numpy(v) for v in common_data.digits(a.seed))
    model = DigitsCNN()
    opt = gct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=a.lr), named_parameters=model.named_parameters(),
                                   compressor=a.compressor, memory="residual", backend="horovod", seed=a.seed)
    steps_per_epoch = len(ytr) // GLOBAL_BATCH
    total = a.epochs * steps_per_epoch
    schedule = {int(s): int(n) for s, n in (x.split(":") for x in a.schedule.split(",") if x)}

    def emit(**kw):
        if a.events:
            kw.update(rank=hvd.rank(), size=hvd.size(), t=time.time(), pid=os.getpid())
            with open(a.events, "a") as f:
                f.write(json.dumps(kw) + "\n")

    if a.on_change == "zero":               # the alternative: drop the residuals (restart at zero)
        gce.DistributedOptimizerStateHandler.flush = lambda h: gce.core.zero_per_rank(h.value.gradient_sync)
    start_step = 0
    if a.resume and os.path.exists(a.resume):
        ck = gct.load_checkpoint(a.resume)
        model.load_state_dict(ck["model"])
        opt.inner.load_state_dict(ck["optimizer_inner"])
        rep = ck["replicated"]
        rep["size"] = hvd.size()
        opt.load_replicated_state_dict(rep)
        start_step = int(ck["step"])
    state = gce.TorchState(model=model, optimizer=opt, step=start_step)
    state.register_reset_callbacks([lambda: emit(event="reset")])
    emit(event="start", t_launch=t_start, step=start_step)
    local_steps = 0

    @gce.run
    def train(state):
        nonlocal local_steps
        first = True
        while state.step < total:
            s = state.step
            epoch, i = divmod(s, steps_per_epoch)
            order = np.random.default_rng(a.seed + epoch).permutation(len(ytr))
            batch = order[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]
            share = GLOBAL_BATCH // hvd.size()
            mine = torch.from_numpy(batch[hvd.rank() * share:(hvd.rank() + 1) * share])
            opt.zero_grad()
            F.cross_entropy(model(xtr[mine]), ytr[mine]).backward()
            opt.step()
            state.step = s + 1
            local_steps += 1
            if first:
                emit(event="first_step", step=s)
                first = False
            marker = f"{a.events or '/tmp/gradcomp-elastic'}.killed"
            if a.kill_at and s == a.kill_at and hvd.rank() == hvd.size() - 1 and hvd.size() > 1 \
                    and not os.path.exists(marker):
                open(marker, "w").close()
                emit(event="kill", step=s)
                os.kill(os.getpid(), 9)
            if s in schedule and hvd.size() != schedule[s]:
                if hvd.rank() == 0 and a.hosts:
                    with open(a.hosts + ".tmp", "w") as f:
                        f.write(f"localhost:{schedule[s]}\n")
                    os.replace(a.hosts + ".tmp", a.hosts)
                    emit(event="hosts", slots=schedule[s], step=s)
                for _ in range(400):           # commit until the driver's discovery sees the change
                    state.commit()
                    time.sleep(0.05)
            if state.step % a.commit_every == 0:
                state.commit()
                if a.checkpoint and hvd.rank() == 0:
                    gct.save_checkpoint({"model": model.state_dict(), "optimizer_inner": opt.inner.state_dict(),
                                         "replicated": opt.replicated_state_dict(), "step": state.step},
                                        a.checkpoint)
            if a.stop_after and local_steps >= a.stop_after:
                return

    train(state)
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean()) * 100
    emit(event="done", step=state.step, acc=acc)
    if hvd.rank() == 0:
        print(f"ACC {acc:.2f} steps {state.step} size {hvd.size()} compressor {a.compressor}", flush=True)


if __name__ == "__main__":
    main()
