"""gradcomp_torch checks across real processes, in one launch (mpirun -np 2, torchrun, horovodrun).

    mpirun -np 2 python tests/mpi_scripts/torch_checks.py --tmpdir DIR [--backend mpi|torch|horovod]

Rank 0 prints "CHECK <name> PASS|FAIL <detail>" per check and "ALL PASS" when all passed:
  one_step_none        with `none`, one step equals plain SGD on the average of every rank's gradient
  resume_per_rank      stop after 3 of 6 steps (topk + momentum), every rank saves its own state_dict to a
                       file, fresh objects load it: the final parameters equal the uninterrupted run's bit for bit
  resume_gathered      the same through one file written by rank 0 (gathered_state_dict)
  resume_horovod_idiom localsgd (cut between syncs) + randomk: rank 0 alone loads one gathered file
                       (save_checkpoint/load_checkpoint), then broadcast_parameters and
                       broadcast_optimizer_state: every rank continues exactly (its own part travels)
  example_resume       examples/torch_train.py: 2 epochs vs 1 epoch + --resume, same checksum
  config_mismatch      rank 1 asks for another compressor: ConfigMismatchError on every rank
  order_mismatch       rank 1's optimizer holds the same parameters in reverse order: ConfigMismatchError
                       naming position 0 on every rank
  local_step_nan       localsgd: NaN on rank 1 at a local step raises on both ranks, parameters unchanged
  fp16_sum_overflow    fp16: 4e4 on each rank is finite, its sum over the transport is not: both ranks
                       raise PayloadOverflowError and keep their parameters
  grad_scaler          an overflow on rank 1 only: GradScaler skips the step on both ranks alike
  broadcast            broadcast_parameters / broadcast_optimizer_state make every rank equal to root
"""
import argparse
import io
import os
import sys
import traceback

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import gradcomp  # noqa: E402
import gradcomp_torch as gct  # noqa: E402
import toy  # noqa: E402
from toy import flat, toy_data  # noqa: E402

X, Y = toy_data(seed=7, steps=8)


def make_model():
    return toy.make_model(32)


def loss_of(m, step, rank):
    return torch.nn.functional.cross_entropy(m(X[step, rank]), Y[step, rank])


def same_everywhere(comm, t) -> bool:
    parts = comm.allgather(t.detach().reshape(-1).contiguous().clone(), name="check").wait()
    return all(torch.equal(torch.as_tensor(parts[0]), torch.as_tensor(q)) for q in parts)


def one_step_none(comm, a):
    m = make_model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                   compressor="none", comm=comm, bucket_mb=0.001)
    loss_of(m, 0, comm.rank).backward()
    opt.step()
    ref = make_model()
    for r in range(comm.size):
        loss_of(ref, 0, r).backward()
    with torch.no_grad():
        want = torch.cat([(p - 0.1 * p.grad / comm.size).reshape(-1) for p in ref.parameters()])
    err = float((flat(m) - want).abs().max())
    return err < 1e-6, f"max error {err:.2e}"


def _train(comm, steps, spec, load=None):
    m = make_model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=m.named_parameters(), compressor=spec, comm=comm)
    if load is not None:
        ck = torch.load(load, map_location="cpu", weights_only=True)
        m.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
    for s in steps:
        opt.zero_grad()
        loss_of(m, s, comm.rank).backward()
        opt.step()
    return m, opt


def resume(comm, a, gathered):
    spec = "topk:ratio=0.05"
    full, _ = _train(comm, range(6), spec)
    m, opt = _train(comm, range(3), spec)
    if gathered:
        path = os.path.join(a.tmpdir, "ck_gathered.pt")
        sd = opt.gathered_state_dict()
        if comm.rank == 0:
            torch.save({"model": m.state_dict(), "opt": sd}, path)
    else:
        path = os.path.join(a.tmpdir, f"ck_rank{comm.rank}.pt")
        torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, path)
    comm.barrier()
    resumed, _ = _train(comm, range(3, 6), spec, load=path)
    exact = torch.equal(flat(full), flat(resumed))
    moved = not torch.equal(flat(full), flat(make_model()))
    return exact and moved, f"bitwise equal: {exact}"


def resume_horovod_idiom(comm, a):
    def build():
        m = make_model()
        opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                       named_parameters=m.named_parameters(), compressor="randomk:ratio=0.3",
                                       sync="localsgd:period=4", comm=comm)
        return m, opt

    def train(m, opt, steps):
        for s in steps:
            opt.zero_grad()
            loss_of(m, s, comm.rank).backward()
            opt.step()

    full, fo = build()
    train(full, fo, range(6))
    m, opt = build()
    train(m, opt, range(3))
    path = os.path.join(a.tmpdir, "ck_idiom.pt")
    sd = opt.gathered_state_dict()
    if comm.rank == 0:
        gct.save_checkpoint({"model": m.state_dict(), "opt": sd}, path)
    comm.barrier()
    m2, opt2 = build()
    if comm.rank == 0:
        ck = gct.load_checkpoint(path)
        m2.load_state_dict(ck["model"])
        opt2.load_state_dict(ck["opt"])
    gct.broadcast_parameters(m2.state_dict(), root_rank=0, comm=comm)
    gct.broadcast_optimizer_state(opt2, root_rank=0, comm=comm)
    train(m2, opt2, range(3, 6))
    exact = torch.equal(flat(full), flat(m2))
    return exact, f"bitwise equal: {exact}, steps {opt2._step}"


def example_resume(comm, a):
    import torch_train
    ck = os.path.join(a.tmpdir, "example.pt")
    common = ["--epochs", "2", "--no-progress", "--compressor", "topk:ratio=0.02"]
    full = torch_train.main(common)
    torch_train.main(common + ["--checkpoint", ck, "--stop-after", "1"])
    resumed = torch_train.main(common + ["--checkpoint", ck, "--resume"])
    ok = full["checksum"] == resumed["checksum"] and resumed["epoch"] == 2
    return ok, f"uninterrupted {full['checksum']} resumed {resumed['checksum']}"


def config_mismatch(comm, a):
    m = make_model()
    spec = "none" if comm.rank == 0 else "fp16"
    try:
        gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                 compressor=spec, comm=comm)
        raised = 0.0
    except gradcomp.ConfigMismatchError as e:
        raised = 1.0 if "fp16" in str(e) else 0.5
    total = float(np.asarray(comm.allreduce(np.array([raised], np.float64), name="check").wait())[0])
    return total == comm.size, f"{total:g} of {comm.size} ranks raised a ConfigMismatchError naming fp16"


def order_mismatch(comm, a):
    m = make_model()
    ps = list(m.parameters())
    try:
        gct.DistributedOptimizer(torch.optim.SGD(ps[::-1] if comm.rank == 1 else ps, lr=0.1),
                                 named_parameters=m.named_parameters(), comm=comm)
        raised = 0.0
    except gradcomp.ConfigMismatchError as e:
        raised = 1.0 if "order: first difference at position 0" in str(e) else 0.5
    total = float(np.asarray(comm.allreduce(np.array([raised], np.float64), name="check").wait())[0])
    return total == comm.size, f"{total:g} of {comm.size} ranks raised a ConfigMismatchError naming position 0"


def _raises_and_keeps(comm, m, opt, loss, error):
    loss.backward()
    before = flat(m).clone()
    try:
        opt.step()
        raised = 0.0
    except error:
        raised = 1.0
    kept = 1.0 if torch.equal(before, flat(m)) and bool(torch.isfinite(flat(m)).all()) else 0.0
    total = np.asarray(comm.allreduce(np.array([raised, kept], np.float64), name="check").wait())
    return bool(total[0] == total[1] == comm.size), f"raised on {total[0]:g}, parameters kept on {total[1]:g} ranks"


def local_step_nan(comm, a):
    m = make_model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=m.named_parameters(), sync="localsgd:period=2", comm=comm)
    loss = loss_of(m, 0, comm.rank) * (float("nan") if comm.rank == 1 else 1.0)
    return _raises_and_keeps(comm, m, opt, loss, gct.NonFiniteGradientError)


def fp16_sum_overflow(comm, a):
    m = make_model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                   compressor="fp16", comm=comm)
    w = next(m.parameters())
    loss = loss_of(m, 0, comm.rank) + 4e4 * w.reshape(-1)[0]     # a finite 4e4 in the gradient on each rank
    return _raises_and_keeps(comm, m, opt, loss, gradcomp.PayloadOverflowError)


def grad_scaler(comm, a):
    m = make_model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                   compressor="topk:ratio=0.1", comm=comm)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    history = []
    for s in range(3):
        opt.zero_grad()
        loss = loss_of(m, s, comm.rank)
        if s == 1 and comm.rank == 1:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        history.append((scaler.get_scale(), flat(m).clone()))
    skipped = torch.equal(history[0][1], history[1][1]) and not torch.equal(history[1][1], history[2][1])
    agree = all(same_everywhere(comm, p) for _, p in history)
    scales = comm.allgather(np.array([h[0] for h in history]), name="check").wait()
    same_scale = all(np.array_equal(scales[0], s) for s in scales) and scales[0][1] == scales[0][0] / 2
    return skipped and agree and same_scale, f"skipped={skipped} ranks agree={agree} scales={list(scales[0])}"


def broadcast(comm, a):
    m = make_model()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(comm.rank)
    opt = torch.optim.Adam(m.parameters(), lr=0.01 * (comm.rank + 1))
    loss_of(m, comm.rank, comm.rank).backward()
    opt.step()
    gct.broadcast_parameters(m.state_dict(), root_rank=0, comm=comm)
    gct.broadcast_optimizer_state(opt, root_rank=0, comm=comm)
    avg = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in m.parameters()])
    same = [same_everywhere(comm, flat(m)), same_everywhere(comm, avg)]     # collectives: never short-circuit
    ok = all(same) and opt.param_groups[0]["lr"] == 0.01
    return ok, "parameters, exp_avg and lr equal to rank 0's"


CHECKS = {
    "one_step_none": one_step_none,
    "resume_per_rank": lambda c, a: resume(c, a, False),
    "resume_gathered": lambda c, a: resume(c, a, True),
    "resume_horovod_idiom": resume_horovod_idiom,
    "example_resume": example_resume,
    "config_mismatch": config_mismatch,
    "order_mismatch": order_mismatch,
    "local_step_nan": local_step_nan,
    "fp16_sum_overflow": fp16_sum_overflow,
    "grad_scaler": grad_scaler,
    "broadcast": broadcast,
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tmpdir", required=True)
    p.add_argument("--backend", default=None)
    p.add_argument("--only", nargs="*", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    comm = gct.init(a.backend)
    assert comm.size == 2, f"run with 2 ranks, got {comm.size}"
    failed = 0
    for name, fn in CHECKS.items():
        if a.only and name not in a.only:
            continue
        try:
            ok, detail = fn(comm, a)
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            ok, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        oks = comm.allgather(np.array([1 if ok else 0], np.int64), name="check").wait()
        ok = all(int(np.asarray(o)[0]) for o in oks)
        failed += not ok
        if comm.rank == 0:
            print(f"CHECK {name} {'PASS' if ok else 'FAIL'} {detail}", flush=True)
    if comm.rank == 0 and not failed:
        print(f"ALL PASS ({comm.engine})", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
