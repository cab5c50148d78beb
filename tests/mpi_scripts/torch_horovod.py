"""Horovod checks (launch: horovodrun -np 2 python tests/mpi_scripts/torch_horovod.py).

Rank 0 prints "CHECK <name> PASS|FAIL <detail>" and "ALL PASS":
  hvd_compression_<c>   hvd.DistributedOptimizer(opt, compression=gradcomp_torch.Compression.<c>):
                        one step equals averaged SGD (exactly for none, within rounding for fp16/bf16)
  hvd_incompatible      Compression.topk / .get("randomk") raise errors naming DistributedOptimizer
  hvd_training          20 steps with Compression.fp16 inside Horovod: loss falls, ranks identical
  optimizer_horovod     gradcomp_torch.DistributedOptimizer over the Horovod transport: one step with
                        `none` equals averaged SGD; with topk the ranks stay identical
"""
import sys
import traceback

import torch

import horovod.torch as hvd

import gradcomp_torch as gct
import toy
from toy import flat, toy_data

X, Y = toy_data(seed=5, steps=20)


def make_model():
    return toy.make_model(32)


def loss_fn(m, step, rank):
    return torch.nn.functional.cross_entropy(m(X[step, rank]), Y[step, rank])


def reference_step():
    ref = make_model()
    for r in range(hvd.size()):
        loss_fn(ref, 0, r).backward()
    with torch.no_grad():
        return torch.cat([(p - 0.1 * p.grad / hvd.size()).reshape(-1) for p in ref.parameters()])


def identical(t):
    parts = hvd.allgather(t.reshape(1, -1))
    return all(torch.equal(parts[0], q) for q in parts)


def hvd_step(compression, tol):
    m = make_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                   compression=compression)
    loss_fn(m, 0, hvd.rank()).backward()
    opt.step()
    err = float((flat(m) - reference_step()).abs().max())
    same = identical(flat(m))
    return err <= tol and same, f"max error {err:.2e} (tolerance {tol:g})"


def hvd_incompatible():
    msgs = []
    try:
        gct.Compression.topk
    except AttributeError as e:
        msgs.append(str(e))
    try:
        gct.Compression.get("randomk")
    except ValueError as e:
        msgs.append(str(e))
    ok = len(msgs) == 2 and all("DistributedOptimizer" in s for s in msgs)
    return ok, msgs[0][:100] if msgs else "no error raised"


def hvd_training():
    m = make_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=m.named_parameters(), compression=gct.Compression.fp16)
    losses = []
    for s in range(20):
        opt.zero_grad()
        loss = loss_fn(m, s, hvd.rank())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    same = identical(flat(m))                      # collective: call it on every rank, unconditionally
    ok = sum(losses[-5:]) < sum(losses[:5]) and same
    return ok, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, ranks identical={same}"


def optimizer_horovod():
    comm = gct.init("horovod")
    m = make_model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                                   compressor="none", comm=comm, bucket_mb=0.001)
    loss_fn(m, 0, comm.rank).backward()
    opt.step()
    err = float((flat(m) - reference_step()).abs().max())
    m2 = make_model()
    opt2 = gct.DistributedOptimizer(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9),
                                    named_parameters=m2.named_parameters(), compressor="topk:ratio=0.1", comm=comm)
    for s in range(5):
        opt2.zero_grad()
        loss_fn(m2, s, comm.rank).backward()
        opt2.step()
    same = identical(flat(m2))
    return err < 1e-6 and same and comm.engine == "horovod", f"max error {err:.2e}, topk ranks identical={same}"


CHECKS = {
    "hvd_compression_none": lambda: hvd_step(gct.Compression.none, 1e-6),
    "hvd_compression_fp16": lambda: hvd_step(gct.Compression.fp16, 2e-3),
    "hvd_compression_bf16": lambda: hvd_step(gct.Compression.bf16, 2e-2),
    "hvd_compression_fp16_prescale": lambda: hvd_step(gct.Compression.get("fp16:prescale=0.5"), 2e-3),
    "hvd_incompatible": hvd_incompatible,
    "hvd_training": hvd_training,
    "optimizer_horovod": optimizer_horovod,
}


def main():
    torch.set_num_threads(1)
    hvd.init()
    failed = 0
    for name, fn in CHECKS.items():
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            ok, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        flag = hvd.allreduce(torch.tensor([0.0 if ok else 1.0]), op=hvd.Sum, name=f"flag.{name}")
        ok = float(flag) == 0
        failed += not ok
        if hvd.rank() == 0:
            print(f"CHECK {name} {'PASS' if ok else 'FAIL'} {detail}", flush=True)
    if hvd.rank() == 0 and not failed:
        print("ALL PASS (horovod)", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
