"""Cost of the issue-15 finiteness checks, measured against the same code with the check disabled.

  output check   GradientSync.finish() counts the non-finite values of the decoded averages
                 (PayloadOverflowError on overflow): step time with it vs with it patched out,
                 2 LocalWorld ranks, torch CPU tensors.
  local steps    DistributedOptimizer under localsgd agrees on NaN/Inf at every local step (one
                 4-byte allreduce issued at the end of backward): step time vs the agreement
                 patched out, 2 LocalWorld ranks.

The two variants alternate, `--repeats` rounds each, and the median per-step time is reported,
so load on the machine hits both alike; read the ratio, not the absolute times.

    python benchmarks/finite_checks.py [--numel 4000000] [--steps 20] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradcomp
import gradcomp_torch as gct
from gradcomp.pipeline import GradientSync


def _output_check(spec, numel, steps, repeats):
    def run(comm):
        g = {"a": torch.randn(numel // 2), "b": torch.randn(numel - numel // 2)}
        s = GradientSync(spec, comm=comm)
        s.step(g)
        t0 = time.perf_counter()
        for _ in range(steps):
            s.step(g)
        return (time.perf_counter() - t0) / steps

    times = {True: [], False: []}
    real = GradientSync._check_outputs
    for _ in range(repeats):
        for on in (True, False):
            GradientSync._check_outputs = real if on else (lambda self, out: None)
            try:
                times[on].append(max(gradcomp.LocalWorld(2, timeout=120).run(run)))
            finally:
                GradientSync._check_outputs = real
    return statistics.median(times[True]), statistics.median(times[False])


def _local_steps(numel, steps, repeats):
    width = max(8, int((numel / 2) ** 0.5))
    real = gct.DistributedOptimizer._start_local_flag

    def run(comm):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width))
        opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=1e-3), named_parameters=m.named_parameters(),
                                       sync="localsgd:period=1000", comm=comm)
        x = torch.randn(4, width)
        t0 = None
        for s in range(steps + 1):
            if s == 1:
                t0 = time.perf_counter()
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        return (time.perf_counter() - t0) / steps

    times = {True: [], False: []}
    for _ in range(repeats):
        for on in (True, False):
            if not on:         # an agreement that sends nothing: what a local step cost before
                gct.DistributedOptimizer._start_local_flag = lambda self: gradcomp.comm.base.DoneHandle(0)
            try:
                times[on].append(max(gradcomp.LocalWorld(2, timeout=120).run(run)))
            finally:
                gct.DistributedOptimizer._start_local_flag = real
    return statistics.median(times[True]), statistics.median(times[False]), 2 * width * width + 2 * width


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--numel", type=int, default=4_000_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    for spec in ("none", "fp16", "topk:ratio=0.01"):
        on, off = _output_check(spec, a.numel, a.steps, a.repeats)
        print(f"output check  {spec:16s} 2 ranks, {a.numel} floats: {on * 1e3:8.2f} ms vs {off * 1e3:8.2f} ms without "
              f"(x{on / off:.3f})")
    on, off, n = _local_steps(a.numel, a.steps, a.repeats)
    print(f"local steps   localsgd, 2 ranks, {n} params: {on * 1e3:8.2f} ms vs {off * 1e3:8.2f} ms without "
          f"(x{on / off:.3f})")


if __name__ == "__main__":
    main()
