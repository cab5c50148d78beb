"""A training loop in which one rank fails, as a user's script would: no error handling of its own.

    mpirun -np 2 python tests/mpi_scripts/fail_probe.py --fail-rank 1 --mode raise
    torchrun --standalone --nproc_per_node 2 tests/mpi_scripts/fail_probe.py --fail-rank 1 --mode kill
    horovodrun -np 2 -H localhost:2 python tests/mpi_scripts/fail_probe.py --fail-rank 1

gradcomp_torch.init() (transport from GRADCOMP_BACKEND, default auto), a DistributedOptimizer on the
toy MLP, then steps; at step --at-step rank --fail-rank raises (--mode raise), kills itself with
SIGKILL (--mode kill), or calls sys.exit(3) (--mode exit). The launcher must then end every rank.
Each rank prints "PROBE READY rank=R engine=E" after init; the failing rank prints
"PROBE FAIL rank=R t=<unix time>" just before failing, so the caller can time the exit from there;
a rank that finishes prints "PROBE DONE rank=R" (which must not happen for the peers).
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toy import make_model, toy_data  # noqa: E402

import gradcomp_torch as gct  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fail-rank", type=int, default=1)
    ap.add_argument("--mode", choices=("raise", "kill", "exit", "none"), default="raise")
    ap.add_argument("--at-step", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    faulthandler.register(signal.SIGUSR1)   # `kill -USR1 PID` prints where a stuck rank is
    comm = gct.init()
    print(f"PROBE READY rank={comm.rank} engine={comm.engine} size={comm.size}", flush=True)
    model = make_model(8)
    opt = gct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                   named_parameters=model.named_parameters(), compressor="none")
    x, y = toy_data(0, 4)
    for step in range(args.steps):
        if step == args.at_step and comm.rank == args.fail_rank and args.mode != "none":
            print(f"PROBE FAIL rank={comm.rank} t={time.time():.3f}", flush=True)
            if args.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if args.mode == "exit":
                sys.exit(3)
            raise RuntimeError(f"probe: injected failure on rank {comm.rank} at step {step}")
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[step % 4, comm.rank]), y[step % 4, comm.rank])
        loss.backward()
        opt.step()
        time.sleep(0.01)
    print(f"PROBE DONE rank={comm.rank}", flush=True)


if __name__ == "__main__":
    main()
