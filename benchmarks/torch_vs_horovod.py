"""Step time of gradcomp_torch.DistributedOptimizer against Horovod's own, on the same transport.

    horovodrun -np 2 python benchmarks/torch_vs_horovod.py            # or: mpirun -np 2 python ...
    python benchmarks/torch_vs_horovod.py --launch                     # launches itself: mpirun -np 2

Model: a compute-heavy CNN (ResNet-18 / ResNet-50 with 10 classes on 3x32x32 random images, the
CIFAR shape; 11.2M / 23.5M parameters), SGD with momentum 0.9, `--batch` images per rank, one torch
thread per rank. Methods (each builds a fresh model with the same seed, so they compute the same thing):

  compute only        forward + backward + local step, no communication (lower bound)
  horovod             hvd.DistributedOptimizer(compression=hvd.Compression.none)
  gradcomp[horovod]   gradcomp_torch.DistributedOptimizer(compressor="none") over Horovod's collectives
                      (gradcomp.comm.HorovodCommunicator): the same transport as the row above
  gradcomp[mpi]       the same over gradcomp's mpi4py transport (another transport: for information)
  gradcomp topk       compressor "topk:ratio=0.01" with residual error feedback over Horovod (bytes column)

Rounds interleave the methods (`--rounds`, each `--steps` timed steps after `--warmup`), so slow drifts
of a shared machine hit all alike. Rank 0 prints a Markdown table: median and mean step time over all
timed steps of all rounds (each step ends with a barrier-free optimizer.step(); the max over ranks of
the per-step times is used), the ratio to `horovod`, and gradient bytes sent per step and rank.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

METHODS = ("compute", "horovod", "gradcomp-horovod", "gradcomp-mpi", "gradcomp-topk")
LABELS = {"compute": "compute only", "horovod": "horovod", "gradcomp-horovod": "gradcomp[horovod] none",
          "gradcomp-mpi": "gradcomp[mpi] none", "gradcomp-topk": "gradcomp[horovod] topk 0.01"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=("resnet18", "resnet50", "small"))
    p.add_argument("--batch", type=int, default=16, help="images per rank and step (default 16)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per method and round (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method and round (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the methods (default 3)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--bucket-mb", type=float, default=None, help="gradcomp bucket size (default: its default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--mpi-progress", default="auto", choices=("auto", "block", "poll"),
                   help="progress mode of gradcomp's MPI transport (default auto)")
    p.add_argument("--launch", action="store_true", help="run itself under `mpirun -np NP` (local ranks)")
    p.add_argument("--np", type=int, default=2, help="ranks for --launch (default 2)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds for --launch (default 1800)")
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    return a


def launch(a, argv):
    """Re-run this script under mpirun with local ranks (a timeout kills the whole group)."""
    cmd = ["mpirun", "-np", str(a.np), "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, os.path.abspath(__file__)] + [x for x in argv if x != "--launch"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        print(f"torch_vs_horovod: timed out after {a.timeout}s", file=sys.stderr)
        return 124


def build_model(name, torch):
    from benchmarks import workloads
    torch.manual_seed(0)
    if name == "small":
        return workloads.build("resnet18", small=True)
    return workloads.resnet18(10) if name == "resnet18" else workloads.resnet50(10)


def make_optimizer(method, model, hvd, a, torch):
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if method == "compute":
        return base, None
    if method == "horovod":
        return hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                        compression=hvd.Compression.none), None
    from gradcomp.comm.horovod import HorovodCommunicator
    from gradcomp.comm.mpi import MPICommunicator
    from gradcomp_torch import DistributedOptimizer
    comm = MPICommunicator(progress=a.mpi_progress) if method == "gradcomp-mpi" else HorovodCommunicator(hvd)
    spec = "topk:ratio=0.01" if method == "gradcomp-topk" else "none"
    opt = DistributedOptimizer(base, named_parameters=model.named_parameters(), compressor=spec,
                               memory="auto", comm=comm, bucket_mb=a.bucket_mb, seed=0)
    return opt, opt


def run_method(method, a, hvd, torch, data):
    model = build_model(a.model, torch)
    opt, gc = make_optimizer(method, model, hvd, a, torch)
    x, y = data
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    hvd.allreduce(torch.zeros(1), name="bench.barrier")       # start every method together
    for s in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if s >= a.warmup:
            times.append(dt)
    per_rank = torch.tensor(times, dtype=torch.float64)
    worst = hvd.allreduce(per_rank, op=hvd.Max) if hvd.size() > 1 else per_rank
    sent, note = None, ""
    if gc is not None:
        note = getattr(gc.comm, "progress", "")
        st = gc.stats()
        sent = st["bytes_sent"] / max(st["steps"], 1)
        gc.remove_hooks()
    elif method == "horovod":
        sent = 4 * sum(p.numel() for p in model.parameters())
    return worst.tolist(), sent, float(loss.detach()), note


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.launch:
        return launch(a, argv)
    import torch
    torch.set_num_threads(a.threads)
    try:
        import horovod.torch as hvd
    except ImportError as e:
        print(f"torch_vs_horovod: Horovod does not import ({e}); build it with `bash mpi/build_horovod.sh`",
              file=sys.stderr)
        return 2
    hvd.init()
    g = torch.Generator().manual_seed(1 + hvd.rank())
    x = torch.randn(a.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    results = {m: [] for m in a.methods}
    sent, losses, notes = {}, {}, {}
    for r in range(a.rounds):
        for m in a.methods:
            t, sent[m], losses[m], note = run_method(m, a, hvd, torch, (x, y))
            notes[m] = note
            results[m] += t
            if hvd.rank() == 0:
                print(f"round {r + 1}/{a.rounds} {LABELS[m]:<28} median {1e3 * statistics.median(t):8.1f} ms",
                      file=sys.stderr, flush=True)
    if hvd.rank() == 0:
        nparams = sum(p.numel() for p in build_model(a.model, torch).parameters())
        print(f"\n{a.model} (10 classes, 3x32x32), {nparams / 1e6:.2f}M parameters, batch {a.batch}/rank, "
              f"{hvd.size()} ranks, {a.threads} thread(s)/rank, {a.rounds} rounds x {a.steps} steps; "
              f"Horovod {__import__('horovod').__version__} "
              f"({'MPI' if hvd.mpi_enabled() and hvd.mpi_built() else 'Gloo'} controller)\n")
        base = statistics.median(results["horovod"]) if "horovod" in results else None
        print("| method | median ms/step | mean ms/step | vs horovod | bytes sent/step/rank | ratio vs dense |")
        print("|---|---:|---:|---:|---:|---:|")
        dense = 4 * nparams
        for m in a.methods:
            med, mean = statistics.median(results[m]), statistics.mean(results[m])
            rel = f"{med / base:.3f}x" if base else "-"
            b = sent.get(m)
            bs = f"{b / 1e6:.2f} MB" if b else "-"
            ratio = f"{dense / b:.1f}x" if b else "-"
            label = LABELS[m] + (f" ({notes[m]} progress)" if notes.get(m) else "")
            print(f"| {label} | {1e3 * med:.1f} | {1e3 * mean:.1f} | {rel} | {bs} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
