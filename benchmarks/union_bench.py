"""`python -m benchmarks.union_bench`: union size U/k, real per-rank traffic and accuracy of the
union-aware sparsifiers against local top-k, on P in-process ranks (LocalWorld threads).

Each rank trains its own copy of the examples' model (examples/torch_train.py: the digits CNN, or the
WikiText-2 word LSTM LM) on its own shard of the data (non-identical per rank), through
gradcomp_torch.DistributedOptimizer, from the same initial weights for every method. Logged per
method: U/k of every step (from stats(): union / union_kept differences), the mean and last-epoch
U/k, payload bytes sent per rank and step, per-rank wire bytes sent under the collective's ring
algorithm, the ratio against dense ring allreduce at the same P, and the test metric at the end
(digits accuracy %, LM perplexity). Wall times are not reported: ranks are threads sharing the CPU.

    python -m benchmarks.union_bench --task digits --ranks 8 --epochs 8 \\
        --methods "topk:ratio=0.01;scalecom:ratio=0.01;aggtopk:ratio=0.01" --out results/union
Methods are separated by ';' and may carry a memory after '|': "scalecom:ratio=0.01|lowpass:beta=0.5".
Writes union.csv (one row per method) and union_steps.csv (U/k per step) under --out, and prints
the table as Markdown.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time

from gradcomp.compressors.base import Compressor
from gradcomp.compressors.sparse import k_of
from gradcomp.params import Param

_BUILD = threading.Lock()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["task", "ranks", "seed", "method", "memory", "steps", "metric", "final", "U/k", "U/k_last_epoch",
           "payload_B_per_step", "wire_B_per_step", "ratio", "payload_ratio", "vs_topk_wire"]


def _example():
    ex = os.path.join(REPO, "examples")
    if ex not in sys.path:
        sys.path.insert(0, ex)
    import torch_train
    return torch_train


def _rank(comm, a, methods):
    import numpy as np
    import torch
    import gradcomp_torch as gct
    tt = _example()
    args = ["--task", a.task, "--no-progress", "--seed", str(a.seed)]
    args += (["--lr", str(a.lr)] if a.lr else []) + (["--momentum", str(a.momentum)] if a.momentum is not None else [])
    args += ["--batch-size", str(a.batch_size)] if a.batch_size and a.task == "digits" else []
    if a.task == "lm":
        args += ["--batch-size", str(a.lm_batch), "--max-vocab", str(a.max_vocab)]
        if a.data:
            args += ["--data", os.path.join(a.data, "wikitext2-valid.txt"),
                     "--eval-data", os.path.join(a.data, "wikitext2-test.txt")]
    opts = tt.parse_args(args)
    with _BUILD:                       # the ranks are threads: seed the global generator one at a time
        torch.manual_seed(opts.seed)
        task = (tt.LMTask if a.task == "lm" else tt.DigitsTask)(opts, comm)
    if a.task == "lm" and a.test_tokens:
        task.test = task.test[:, :max(2, a.test_tokens // task.test.shape[0])]
    gct.broadcast_parameters(task.model.state_dict(), root_rank=0, comm=comm)
    model0 = copy.deepcopy(task.model)
    out = []
    for spec, memory in methods:
        task.model = copy.deepcopy(model0)
        opt = gct.DistributedOptimizer(task.make_optimizer(), named_parameters=task.model.named_parameters(),
                                       compressor=spec, memory=memory or None, comm=comm, seed=0)
        if hasattr(task, "attach"):        # the example's task hooks its optimizer (virtual workers: off)
            task.attach(opt)
        per_step, steps, state, prev = [], 0, None, opt.stats()
        epochs_steps = []
        for epoch in range(a.epochs):
            task.model.train()
            for b in task.batches(epoch):
                _, _, state = task.train_step(opt, b, state)
                st = opt.stats()
                du = st.get("union", 0) - prev.get("union", 0)
                dk = st.get("union_kept", 0) - prev.get("union_kept", 0)
                per_step.append(du / dk if dk else float("nan"))
                prev, steps = st, steps + 1
                if a.max_steps and steps >= a.max_steps:
                    break
            epochs_steps.append(steps)
            state = None
            if a.max_steps and steps >= a.max_steps:
                break
        task.model.eval()
        final = task.evaluate()
        st = opt.stats()
        first_last = epochs_steps[-2] if len(epochs_steps) > 1 else 0
        last = [u for u in per_step[first_last:] if u == u]
        out.append({"task": a.task, "ranks": comm.size, "seed": a.seed, "method": spec, "memory": memory or "auto",
                    "steps": steps, "metric": task.metric, "final": final,
                    "U/k": st["union_k"] if "union_k" in st else float("nan"),
                    "U/k_last_epoch": float(np.mean(last)) if last else float("nan"),
                    "payload_B_per_step": st["bytes_sent"] / steps, "wire_B_per_step": st["wire_sent"] / steps,
                    "ratio": st["ratio"], "payload_ratio": st["payload_ratio"], "per_step": per_step})
        if comm.rank == 0:
            print(f"[union {a.task}] {spec} {memory or ''}: {task.metric} {final:.2f}, U/k {out[-1]['U/k']:.2f}, "
                  f"ratio {st['ratio']:.1f}", file=sys.stderr, flush=True)
            from benchmarks.union_bench import PROBE_LOG    # the registry's copy (this file may be __main__)
            if spec.startswith("leaderprobe") and PROBE_LOG:
                ov, cap = np.array([p[2] for p in PROBE_LOG]), np.array([p[3] for p in PROBE_LOG])
                half = len(PROBE_LOG) // 2
                print(f"[union {a.task}] {spec}: leader's top-k vs the sum's: overlap {ov.mean():.3f} "
                      f"(second half {ov[half:].mean():.3f}), |S| captured {cap.mean():.3f} "
                      f"(second half {cap[half:].mean():.3f}) over {len(PROBE_LOG)} tensor-steps",
                      file=sys.stderr, flush=True)
                PROBE_LOG.clear()
    return out


class Oracle(Compressor):
    """Diagnostic, not a method (`oracle:ratio=R`, registered by this benchmark only): the exact top-k
    of the *sum* of every rank's memory-compensated gradient, with every rank's values there. It
    allreduces the dense vectors (the traffic of dense), so it shows what a selection of k shared
    coordinates can reach at best; each rank's residual keeps what lies outside the k."""
    name = "oracle"
    summable = True
    graph_safe = False
    params = {"ratio": Param(float, 0.01, "fraction of entries kept", lo=0.0, hi=1.0, lo_open=True)}

    def compress(self, x, state, ctx):
        return [x], {"k": k_of(self.ratio, ctx.numel)}

    def decompress(self, payload, info, ctx):     # GradientSync decodes the sum first (sets J), then ours
        b, v = ctx.backend, payload[0]
        if "J" not in info:
            info["J"] = b.topk_abs(v, info["k"])
        return v * b.scatter(ctx.numel, info["J"], b.zeros(info["k"], b.dtype(v), v) + 1.0)


PROBE_LOG: list = []        # (step, name, overlap, captured): appended by LeaderProbe on rank 0


class LeaderProbe(Compressor):
    """Diagnostic (`leaderprobe:ratio=R`, this benchmark only): trains exactly like `scalecom`
    (the cyclic leader's top-k indices, every rank's values there, summed) but allreduces the dense
    vectors alongside, to measure on each step how good the leader's indices I are for the sum
    S = sum_r x_r: `overlap` = |I & J| / k with J the top-k of |S|, and `captured` =
    sum_I |S| / sum_J |S| (1 = as good as the exact global top-k)."""
    name = "leaderprobe"
    summable = True
    graph_safe = False
    params = {"ratio": Param(float, 0.01, "fraction of entries kept", lo=0.0, hi=1.0, lo_open=True)}

    def compress(self, x, state, ctx):
        from gradcomp.compressors.scalecom import leader_of
        b, k = ctx.backend, k_of(self.ratio, ctx.numel)
        lead = leader_of(ctx.step, ctx.name, ctx.size)
        mask = b.zeros(ctx.numel, b.dtype(x), x)
        if ctx.rank == lead:
            mask = b.scatter(ctx.numel, b.topk_abs(x, k), b.zeros(k, b.dtype(x), x) + 1.0)
        return [x, mask], {"k": k}

    def decompress(self, payload, info, ctx):     # the sums first (records I), then our own payload
        b = ctx.backend
        if "I" not in info:
            info["I"] = payload[1]
            if ctx.rank == 0:
                s = b.abs(b.cast(payload[0], "float64"))
                j = b.topk_abs(s, info["k"])
                inj = b.sum(b.gather(b.cast(payload[1], "float64"), j))
                best = b.sum(b.gather(s, j))
                got = b.sum(s * b.cast(payload[1], "float64"))
                PROBE_LOG.append((ctx.step, ctx.name, float(b.item(inj)) / info["k"],
                                  float(b.item(got)) / max(float(b.item(best)), 1e-30)))
        return payload[0] * info["I"]


def _register_oracle():
    from gradcomp import registry
    registry.COMPRESSORS.setdefault("oracle", "benchmarks.union_bench:Oracle")
    registry.COMPRESSORS.setdefault("leaderprobe", "benchmarks.union_bench:LeaderProbe")


def parse_methods(text: str):
    out = []
    for m in filter(None, (s.strip() for s in text.split(";"))):
        spec, _, mem = m.partition("|")
        out.append((spec.strip(), mem.strip()))
    return out


def run(a) -> list[dict]:
    import torch
    import gradcomp
    from benchmarks import plotting
    torch.set_num_threads(1)
    _register_oracle()
    methods = parse_methods(a.methods)
    t0 = time.time()
    res = gradcomp.LocalWorld(a.ranks, timeout=a.timeout).run(lambda comm: _rank(comm, a, methods))
    rows = res[0]
    base = next((r for r in rows if r["method"].startswith("topk")), None)
    for r in rows:
        r["vs_topk_wire"] = base["wire_B_per_step"] / r["wire_B_per_step"] if base else float("nan")
    os.makedirs(a.out, exist_ok=True)
    steps = [{"task": r["task"], "method": r["method"], "memory": r["memory"], "step": i, "U/k": u}
             for r in rows for i, u in enumerate(r.pop("per_step"))]
    plotting.emit(rows, COLUMNS, a.out, f"union_{a.task}", title=f"union and traffic, {a.task}, {a.ranks} ranks")
    plotting.write_csv(os.path.join(a.out, f"union_{a.task}_steps.csv"), steps, ["task", "method", "memory", "step", "U/k"])
    print(json.dumps({"seconds": round(time.time() - t0)}), file=sys.stderr)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("digits", "lm"), default="digits")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=0, help="stop each method after this many steps (0: epochs)")
    p.add_argument("--methods", default="topk:ratio=0.01;gtopk:ratio=0.01;scalecom:ratio=0.01;aggtopk:ratio=0.01")
    p.add_argument("--batch-size", type=int, default=0, help="digits: images per rank and step (default: the example's 32)")
    p.add_argument("--lm-batch", type=int, default=8)
    p.add_argument("--max-vocab", type=int, default=10000)
    p.add_argument("--test-tokens", type=int, default=20000)
    p.add_argument("--data", default="", help="lm: folder with wikitext2-valid.txt / -test.txt (default: the example's)")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate (default: the example's)")
    p.add_argument("--momentum", type=float, default=None, help="digits SGD momentum (default: the example's 0.9)")
    p.add_argument("--seed", type=int, default=0, help="data shards, initial weights")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait")
    p.add_argument("--out", default="results/union")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
