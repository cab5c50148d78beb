"""gradcomp's own CPU time in one rank's training step, without a network.

    python -m benchmarks.step_cpu [--steps 8] [--model resnet18-c10] [--ops] SPEC [SPEC ...]

Trains `--model` (benchmarks/workloads.py, batch 2, 1 torch thread) through
gradcomp_torch.DistributedOptimizer over `_Echo`: rank 0 of a pretended 2-rank world whose peer
sent exactly the same payloads (allreduce returns 2x, allgather two copies), so every decode,
aggregation and statistic runs as at 2 ranks but nothing waits for a wire. `compute` is the plain
optimizer (forward + backward + SGD step). Times are CPU time of the training thread
(time.thread_time: the backward hooks that compress run on it), so they hold on a shared machine
better than wall time; per method: the fastest and the median step of `--steps`, and the phase
breakdown of the fastest step (GradientSync.timer with its clock set to thread time).
`--ops` also counts the framework (aten) operations of one step.
"""
from __future__ import annotations

import argparse
import statistics
import time


def _echo():
    from gradcomp.comm.base import Communicator, DoneHandle

    class _Echo(Communicator):
        engine, rank, size, local_rank = "echo", 0, 2, 0
        accepts_donation = True

        def allreduce(self, x, *, name="", donate=False):
            return DoneHandle(x * 2)

        def allgather(self, x, *, name=""):
            return DoneHandle([x, x.clone()])

        def broadcast(self, x, *, root=0, name=""):
            return DoneHandle(x)

        def allgather_object(self, obj, *, name="object"):
            return [obj, obj]
    return _Echo()


def _count_ops(step):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        step()
    return Count.n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+", help="compressor specs, or 'compute'")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", default="resnet18-c10")
    ap.add_argument("--ops", action="store_true")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    import gradcomp.pipeline as pipeline
    from benchmarks import workloads
    from gradcomp_torch.optimizer import DistributedOptimizer
    pipeline.now = time.thread_time            # the phase timer in CPU time of this thread
    model = workloads.build(a.model)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, loss_fn = workloads.example_batch(model, batch=2, image=32, seq=20,
                                            generator=torch.Generator().manual_seed(1000))
    print(f"{a.model}: {workloads.num_params(model):,} parameters; CPU ms per step of the training thread, "
          f"{a.steps} steps after 2 warm-up steps")
    for spec in a.specs:
        model.load_state_dict(init)
        base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        opt = base if spec == "compute" else DistributedOptimizer(
            base, named_parameters=model.named_parameters(), compressor=spec, memory="auto", comm=_echo(), seed=0)
        gs = getattr(opt, "_gs", None)

        def step():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        times, reps = [], []
        for i in range(a.steps + 2):
            if gs is not None:
                gs.timer.reset()
            t0 = time.thread_time()
            step()
            if i >= 2:
                times.append(time.thread_time() - t0)
                reps.append(gs.timer.report() if gs is not None else {})
        j = min(range(len(times)), key=times.__getitem__)
        r = reps[j]
        br = " ".join(f"{k}={r[k]:.1f}" for k in ("compensate", "compress", "wait", "decode", "update", "python",
                                                   "total")) if r else ""
        ops = f"  ops={_count_ops(step)}" if a.ops else ""
        print(f"{spec:36s} min {1e3 * times[j]:7.1f}  median {1e3 * statistics.median(times):7.1f}{ops}  {br}",
              flush=True)
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()


if __name__ == "__main__":
    main()
