"""A/B of the torch backend's CPU sort and k-th largest (numpy's one-thread sort/partition, the default)
against torch.sort / torch.kthvalue, inside the per-tensor top-k compress of real-model gradients,
interleaved in one process (min and median of 5).

    python benchmarks/sort_ab.py 2 resnet50        # torch threads, model
    python benchmarks/sort_ab.py 2 resnet50 & python benchmarks/sort_ab.py 2 resnet50   # oversubscribed
"""
import statistics
import sys
import time

import torch

import gradcomp
from benchmarks.fused_step import gradients
from gradcomp.backend import backend_by_name
from gradcomp.compressors.base import Ctx


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    model = sys.argv[2] if len(sys.argv) > 2 else "resnet50"
    torch.set_num_threads(threads)
    grads = gradients(model)
    b = backend_by_name("torch")
    cls = type(b)
    new = (cls.sort, cls.kth_largest_abs)
    old = (lambda self, x: torch.sort(x).values,
           lambda self, x, k: torch.kthvalue(x.abs().float(), x.numel() - k + 1).values)
    items = [(g.reshape(-1), Ctx(b, n, tuple(g.shape), "float32", g.numel(), 1, 1, 0, 1)) for n, g in grads.items()]
    for spec in ("topk:ratio=0.01", "topk:ratio=0.001", "topk:ratio=0.01,mode=exact"):
        comp = gradcomp.create(spec)
        res = {"torch": [], "numpy": []}
        for _ in range(5):
            for which, fns in (("torch", old), ("numpy", new)):
                cls.sort, cls.kth_largest_abs = fns
                t0 = time.perf_counter()
                for x, c in items:
                    comp.compress(x, {}, c)
                res[which].append(time.perf_counter() - t0)
        cls.sort, cls.kth_largest_abs = new
        print(model, threads, spec, *(f"{k} min/med {min(v) * 1e3:.0f}/{statistics.median(v) * 1e3:.0f} ms"
                                      for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
