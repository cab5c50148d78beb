"""Sync-policy equivalences with real torch optimizers over MPI (run under `mpirun -np 2`).

    mpirun -np 2 python tests/mpi_scripts/sync_equivalence.py --driver optimizer|manual

Checks (float64 model, different data on every rank):
  localsgd:period=1 == synchronous SGD (allreduce)            plain SGD
  slowmo:alpha=1,beta=0 == localsgd:period=4                   SGD momentum 0.9
  da-pipelined == da, step for step                            SGD momentum 0.9
  da == localsgd                                               plain SGD
  checkpoint at step k, fresh optimizer + policy, resume == uninterrupted (da-pipelined, slowmo)
Prints one `CHECK name diff tol PASS|FAIL` line per check on rank 0; exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import io
import sys

import torch

from sync_driver import DRIVERS, make_comm

torch.set_num_threads(1)


def data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, 3, generator=g, dtype=torch.float64) + rank
    return x, x @ w + 0.1 * torch.randn(64, 3, generator=g, dtype=torch.float64)


def model():
    g = torch.Generator().manual_seed(0)                 # identical start on every rank
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return m


def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]).clone()


def momenta(opt):
    bufs = [opt.state[p].get("momentum_buffer") for g in opt.param_groups for p in g["params"]]
    return torch.cat([b.reshape(-1) for b in bufs if b is not None]) if any(b is not None for b in bufs) else None


def train(comm, driver, spec, steps, momentum, resume_at=None):
    x, y = data(comm.rank)
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=momentum)
    d = DRIVERS[driver](m, opt, spec, comm)
    hist = []
    for step in range(steps):
        if step == resume_at:                       # checkpoint, rebuild everything, restore
            sd = d.state_dict()
            params = {k: v.clone() for k, v in m.state_dict().items()}
            buf = io.BytesIO()
            torch.save(sd, buf)
            m = model()
            m.load_state_dict(params)
            opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=momentum)
            d = DRIVERS[driver](m, opt, spec, comm)
            buf.seek(0)
            d.load_state_dict(torch.load(buf, weights_only=True))
        i = (step * 8) % 64
        d.step(lambda: torch.nn.functional.mse_loss(m(x[i:i + 8]), y[i:i + 8]))
        hist.append(flat(m))
    d.flush()
    return torch.stack(hist), momenta(opt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--driver", choices=sorted(DRIVERS), default="optimizer")
    args = ap.parse_args()
    comm = make_comm()
    checks = []

    def check(name, a, b, tol):
        diff = float((a - b).abs().max())
        checks.append((name, diff, tol, diff <= tol))

    T = 16
    sync_ref, _ = train(comm, args.driver, "allreduce", T, 0.0)
    loc1, _ = train(comm, args.driver, "localsgd:period=1", T, 0.0)
    check("localsgd_period1_eq_allreduce", loc1, sync_ref, 1e-10)
    loc4m, _ = train(comm, args.driver, "localsgd:period=4", T, 0.9)
    gap = float((loc4m - sync_ref).abs().max())         # the comparisons can fail: runs do differ
    checks.append(("localsgd_period4_differs_from_allreduce", gap, 1e-6, gap > 1e-6))
    slow, _ = train(comm, args.driver, "slowmo:period=4,alpha=1,beta=0", T, 0.9)
    check("slowmo_a1_b0_eq_localsgd", slow, loc4m, 1e-9)
    da, da_m = train(comm, args.driver, "da:period=3", T, 0.9)
    dap, dap_m = train(comm, args.driver, "da-pipelined:period=3", T, 0.9)
    check("da_pipelined_eq_da_params_each_step", dap, da, 1e-10)
    check("da_pipelined_eq_da_momentum", dap_m, da_m, 1e-10)
    loc3, _ = train(comm, args.driver, "localsgd:period=3", T, 0.0)
    da0, _ = train(comm, args.driver, "da:period=3", T, 0.0)
    check("da_plain_sgd_eq_localsgd", da0, loc3, 0.0)
    for spec, at in (("da-pipelined:period=3", 6), ("slowmo:period=3,beta=0.6", 7)):
        ref, ref_m = train(comm, args.driver, spec, T, 0.9)
        got, got_m = train(comm, args.driver, spec, T, 0.9, resume_at=at)
        check(f"resume[{spec}@{at}]", got, ref, 0.0)
        check(f"resume_momentum[{spec}@{at}]", got_m, ref_m, 0.0)
    # both ranks must agree on the verdicts
    verdicts = comm.allgather_object([c[3] for c in checks], name="verdicts")
    ok = all(all(v) for v in verdicts)
    if comm.rank == 0:
        for name, diff, tol, passed in checks:
            print(f"CHECK {name} diff={diff:.3e} tol={tol:g} {'PASS' if passed else 'FAIL'}", flush=True)
        print("ALL PASS" if ok else "SOME FAILED", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
