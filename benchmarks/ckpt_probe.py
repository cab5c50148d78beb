"""Reliability probes of checkpoints, loss scaling and missing gradients (issue 15 items 5, 7, 8; issue 16).

    python benchmarks/ckpt_probe.py                 # this tree
    python benchmarks/ckpt_probe.py --cost          # seconds of save/load with the integrity checks
    PYTHONPATH=/path/to/older/tree python benchmarks/ckpt_probe.py   # the same probes on another version

Two ranks as threads (gradcomp.LocalWorld), a 5-8-3 MLP, SGD lr 0.1. Prints a Markdown table:

  resume (policy)   8 steps uninterrupted vs 4 steps, one file of gathered_state_dict() written by
                    rank 0 (the example's way), loaded by every rank, 4 more steps (topk:ratio=0.3,
                    momentum 0.9; period 3, so the cut falls between syncs): max |difference|
  GradScaler (mem)  6 steps with the loss scale doubling every step (growth_interval=1) vs the same run
                    unscaled (topk:ratio=0.2, no optimizer momentum); the optimizer is told the scaler
                    through attach_grad_scaler where that exists: max |difference| of the parameters
  frozen weight     topk:ratio=0.3, momentum 0.9; a weight set requires_grad=False after 2 steps:
                    how far it moves in the next 5
  Horovod idiom     rank 0 loads its own state_dict() of step 6, rank 1 is a process that ran 2 steps;
                    broadcast_parameters + broadcast_optimizer_state, then 6 steps with randomk:ratio=0.3:
                    gradcomp's step on each rank and the largest parameter difference between ranks
"""
from __future__ import annotations

import io
import os
import tempfile

import torch

import gradcomp
import gradcomp_torch as gct

N = 2
_G = torch.Generator().manual_seed(7)
X = torch.randn(12, N, 12, 5, generator=_G)
Y = torch.randint(0, 3, (12, N, 12), generator=_G)


def _model():
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def _flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def _build(comm, comp="topk:ratio=0.3", sync=None, momentum=0.9, memory=None):
    m = _model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=momentum),
                                   named_parameters=m.named_parameters(), compressor=comp, sync=sync,
                                   memory=memory, comm=comm)
    return m, opt


def _train(m, opt, comm, steps, scaler=None):
    for s in steps:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(X[s, comm.rank]), Y[s, comm.rank])
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()


def resume(sync, path):
    def fn(comm):
        m, opt = _build(comm, sync=sync)
        _train(m, opt, comm, range(8))
        a, oa = _build(comm, sync=sync)
        _train(a, oa, comm, range(4))
        sd = oa.gathered_state_dict()
        if comm.rank == 0:
            torch.save({"model": a.state_dict(), "opt": sd}, path)
        comm.barrier()
        ck = torch.load(path, weights_only=True)
        b, ob = _build(comm, sync=sync)
        b.load_state_dict(ck["model"])
        ob.load_state_dict(ck["opt"])
        _train(b, ob, comm, range(4, 8))
        return float((_flat(m) - _flat(b)).abs().max())
    return max(gradcomp.LocalWorld(N, timeout=120).run(fn))


def grad_scaler(memory):
    def fn(comm, scaled):
        m, opt = _build(comm, "topk:ratio=0.2", momentum=0.0, memory=memory)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1, enabled=scaled)
        if hasattr(opt, "attach_grad_scaler"):
            opt.attach_grad_scaler(scaler)
        _train(m, opt, comm, range(6), scaler)
        return _flat(m)
    plain = gradcomp.LocalWorld(N, timeout=120).run(fn, False)
    amp = gradcomp.LocalWorld(N, timeout=120).run(fn, True)
    return max(float((x - y).abs().max()) for x, y in zip(plain, amp))


def frozen():
    def fn(comm):
        m, opt = _build(comm)
        _train(m, opt, comm, range(2))
        m[0].weight.requires_grad_(False)
        w = m[0].weight.detach().clone()
        _train(m, opt, comm, range(2, 7))
        return float((w - m[0].weight.detach()).abs().max())
    return max(gradcomp.LocalWorld(N, timeout=120).run(fn))


def horovod_idiom():
    def fn(comm):
        a, oa = _build(comm, "randomk:ratio=0.3")
        _train(a, oa, comm, range(6))
        buf = io.BytesIO()
        torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
        m, opt = _build(comm, "randomk:ratio=0.3")
        _train(m, opt, comm, range(2))
        if comm.rank == 0:
            buf.seek(0)
            ck = torch.load(buf, weights_only=True)
            m.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
        gct.broadcast_parameters(m.state_dict(), root_rank=0, comm=comm)
        gct.broadcast_optimizer_state(opt, root_rank=0, comm=comm)
        step = opt.gradient_sync.steps
        _train(m, opt, comm, range(6, 12))
        parts = comm.allgather(_flat(m), name="probe").wait()
        return step, float((torch.as_tensor(parts[0]) - torch.as_tensor(parts[1])).abs().max())
    res = gradcomp.LocalWorld(N, timeout=120).run(fn)
    return f"steps {[s for s, _ in res]}, max rank difference {res[0][1]:.3g}"


def cost(path):
    """Seconds of the checkpoint calls on a 10.5M-parameter MLP (one process, SGD momentum, topk)."""
    import time
    m = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(10)])
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
                                   named_parameters=m.named_parameters(), compressor="topk:ratio=0.01",
                                   comm=gradcomp.SingleCommunicator())
    x = torch.randn(8, 1024)
    for _ in range(2):
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()
    out = {}

    def timed(name, fn):
        t = time.perf_counter()
        r = fn()
        out[name] = time.perf_counter() - t
        return r
    timed("digest of the momentum state", lambda: gct.checkpoint.digest(opt.inner.state_dict()))
    sd = timed("opt.state_dict()", opt.state_dict)
    obj = {"model": m.state_dict(), "opt": sd}
    timed("torch.save", lambda: torch.save(obj, path + ".plain"))
    timed("save_checkpoint", lambda: gct.save_checkpoint(obj, path))
    timed("torch.load(weights_only=True)", lambda: torch.load(path + ".plain", weights_only=True))
    ck = timed("load_checkpoint", lambda: gct.load_checkpoint(path))
    timed("opt.load_state_dict", lambda: opt.load_state_dict(ck["opt"]))
    print(f"file {os.path.getsize(path) / 1e6:.0f} MB\n| call | seconds |\n|---|---|")
    for k, v in out.items():
        print(f"| {k} | {v:.3f} |")


def main():
    import sys
    torch.set_num_threads(1)
    if "--cost" in sys.argv:
        with tempfile.TemporaryDirectory() as d:
            cost(os.path.join(d, "ck.pt"))
        return
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for sync in (None, "localsgd:period=3", "da:period=3", "da-pipelined:period=3", "slowmo:period=3,beta=0.5"):
            rows.append((f"resume from one gathered file, {sync or 'allreduce'}", f"{resume(sync, os.path.join(d, 'ck.pt')):.3g}"))
    for mem in ("residual", "dgc", "gmc"):
        rows.append((f"GradScaler, scale x2 per step, memory {mem}", f"{grad_scaler(mem):.3g}"))
    rows.append(("frozen weight, movement in 5 steps", f"{frozen():.3g}"))
    rows.append(("Horovod idiom from rank 0's own state, randomk", horovod_idiom()))
    print(f"tree: {os.path.dirname(os.path.dirname(os.path.abspath(gct.__file__)))}")
    print("| probe | result |\n|---|---|")
    for probe, res in rows:
        print(f"| {probe} | {res} |")


if __name__ == "__main__":
    main()
