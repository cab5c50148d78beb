"""One rank's pipeline cost per step, per tensor against fused buckets (gradcomp/fusion.py).

    python benchmarks/fused_step.py --threads 2            # ResNet-50 gradients: 25.6M fp32, 161 tensors
    python benchmarks/fused_step.py --quick                # ResNet-18 sized, 1 repetition: a smoke run
    python benchmarks/fused_step.py --only topk,randomk --bucket-mb 25

For every method, GradientSync.start() per bucket (the optimizer's buckets: reverse registration
order, `--bucket-mb` MiB) then finish(), on a single rank (no network: the collectives are
identities), so the time is all of gradcomp's own work: compensate, compress, decode, update and
Python. Reported: the median step time with `fuse=False` (tensor by tensor) and `fuse=True` (one
flat buffer per bucket), each as a multiple of one fp32 copy of all the gradients (one flat
`clone()`, measured in the same run: a ratio that is fairly robust to machine load), and the
speed-up. The gradients are heavy-tailed per layer, built once from a fixed seed. This is a
measurement, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

import gradcomp
from benchmarks import workloads
from gradcomp_torch.buckets import make_buckets

METHODS = ["fp16", "signsgd", "efsignsgd", "onebit", "terngrad", "natural", "qsgd", "randomk:ratio=0.01",
           "rbgs:ratio=0.01", "randproj:ratio=64", "threshold:threshold=0.001", "topk:ratio=0.01",
           "topk:ratio=0.01,scope=bucket", "topk:ratio=0.01,mode=sampled",
           "topk:ratio=0.01,mode=sampled,scope=bucket"]


def gradients(model: str, seed: int = 0) -> dict:
    net = workloads.build(model)
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in net.named_parameters():
        g = rng.standard_t(3, p.numel()).astype(np.float32) * np.float32(10.0 ** rng.uniform(-4, -2))
        out[name] = torch.from_numpy(g).reshape(p.shape)
    return out


CLOCK = time.perf_counter        # --cpu-time: time.process_time (this process's CPU seconds, all threads)


def copy_time(flat, reps) -> float:
    """Median ms of one flat fp32 clone() (a fresh allocation, as the pipeline's own buffers are)."""
    copy = []
    for _ in range(max(3, reps)):
        t0 = CLOCK()
        flat.clone()
        copy.append(CLOCK() - t0)
    return statistics.median(copy) * 1e3


def time_method(spec, grads, buckets, fuse, reps):
    sync = gradcomp.GradientSync(spec, seed=1, fuse=fuse, check_config=False)
    names = list(grads)

    def step():
        for idx in buckets:
            sync.start({names[i]: grads[names[i]] for i in idx})
        return sync.finish()

    return median_ms(step, reps)


def median_ms(fn, reps) -> float:
    """Median ms of `reps` calls of fn after one warm-up call (state creation, caches)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return statistics.median(ts) * 1e3


def selection_table(grads, buckets, reps, copy_ms):
    """Issue 10's top-k target is against `torch.topk` *selection*: GRACE's torch.topk(|g|, k) + gather of
    the values per tensor, against gradcomp's top-k compress alone (selection and packing values + int32
    indices; no error feedback, decode or checks), per tensor (the default scope) and per bucket."""
    from gradcomp.backend import backend_by_name
    from gradcomp.compressors.base import Ctx
    b, names = backend_by_name("torch"), list(grads)

    print("\n| selection at ratio | torch.topk + gather, per tensor ms | gradcomp compress ms (spec) | "
          "x copy | faster than torch.topk |")
    print("|---|---:|---|---:|---:|")
    for ratio in (0.01, 0.001):
        def grace():
            for g in grads.values():
                x = g.reshape(-1)
                k = max(1, int(ratio * x.numel()))
                idx = torch.topk(x.abs(), k, sorted=False).indices
                x.gather(0, idx)
        base = median_ms(grace, reps)
        for scope in ("tensor", "bucket"):
            spec = f"topk:ratio={ratio},mode=sampled,scope={scope}"
            comp = gradcomp.create(spec)
            if scope == "tensor":
                items = [(g.reshape(-1), Ctx(b, n, tuple(g.shape), "float32", g.numel(), 1, 1, 0, 1))
                         for n, g in grads.items()]
            else:
                items = []
                for idx in buckets:
                    flat = torch.cat([grads[names[i]].reshape(-1) for i in idx])
                    items.append((flat, Ctx(b, f"bucket{idx[0]}", (flat.numel(),), "float32", flat.numel(), 1, 1, 0, 1,
                                            segments=tuple(grads[names[i]].numel() for i in idx))))
            ms = median_ms(lambda: [comp.compress(x, {}, c) for x, c in items], reps)
            print(f"| {ratio} | {base:.1f} | {ms:.1f} ({spec}) | {ms / copy_ms:.1f} | {base / ms:.1f}x |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 and 1 repetition (CI smoke run)")
    ap.add_argument("--model", default="", help="resnet50 (default), resnet18 or lstm")
    ap.add_argument("--reps", type=int, default=0, help="timed steps per row, median reported (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size in MiB (default 25)")
    ap.add_argument("--only", default="", help="comma list of compressor names or specs (separate specs that contain commas by ';')")
    ap.add_argument("--row-copy", action="store_true",
                    help="re-measure the copy right after each row and divide by that (steadier ratios on a loaded machine)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process's CPU time instead of wall time (robust to other jobs on a shared "
                         "machine; counts spinning worker threads too)")
    ap.add_argument("--fused-only", action="store_true", help="time only fuse=True (the per-tensor columns are blank)")
    ap.add_argument("--select", action="store_true",
                    help="also print top-k selection alone against torch.topk + gather (issue 10's top-k target)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    model = a.model or ("resnet18" if a.quick else "resnet50")
    reps = a.reps or (1 if a.quick else 3)
    grads = gradients(model)
    named = list(grads.items())
    buckets = make_buckets(named, a.bucket_mb)
    n = sum(g.numel() for g in grads.values())
    flat = torch.cat([g.reshape(-1) for g in grads.values()])
    copy_ms = copy_time(flat, reps)
    only = {s.strip() for s in a.only.split(";" if ";" in a.only else ",") if s.strip()}
    specs = [m for m in METHODS if not only or m in only or m.split(":")[0] in only]
    specs += [s for s in sorted(only) if not any(m == s or m.split(":")[0] == s for m in METHODS)]  # any other spec
    print(f"# pipeline step on one rank: {model}, {n:,} fp32 entries in {len(grads)} tensors, "
          f"{len(buckets)} buckets of <= {a.bucket_mb:g} MiB; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; one flat fp32 copy = {copy_ms:.1f} ms; median of {reps}"
          f"{'; CPU time' if a.cpu_time else ''}\n")
    extra = (" copy ms |", "---:|") if a.row_copy else ("", "")
    print("| method | per tensor ms | x copy | fused ms | x copy | fused speed-up |" + extra[0])
    print("|---|---:|---:|---:|---:|---:|" + extra[1])
    for spec in specs:
        f = time_method(spec, grads, buckets, True, reps)
        if a.fused_only:
            c = copy_time(flat, reps) if a.row_copy else copy_ms
            print(f"| {spec} | | | {f:.1f} | {f / c:.1f} | |" + (f" {c:.1f} |" if a.row_copy else ""), flush=True)
            continue
        t = time_method(spec, grads, buckets, False, reps)
        c = copy_time(flat, reps) if a.row_copy else copy_ms
        print(f"| {spec} | {t:.1f} | {t / c:.1f} | {f:.1f} | {f / c:.1f} | {t / f:.2f}x |" +
              (f" {c:.1f} |" if a.row_copy else ""), flush=True)
    if a.select:
        selection_table(grads, buckets, reps, copy_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
