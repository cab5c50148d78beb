"""`sketch`: count-sketch compression with heavy-hitter recovery, in two summable rounds.

After Sketched-SGD (Ivkin et al., NeurIPS 2019) and FetchSGD (Rothchild et al., ICML 2020): a count
sketch is linear, so the sketches of every rank's gradient are summed by an ordinary allreduce and
the heavy hitters of the *sum* are found without any rank sending indices.

Per tensor and step (x: the flattened, error-compensated gradient of n entries; r rows of w
buckets; hashes h_j: [n] -> [w] and signs s_j: [n] -> {-1, +1} drawn from (seed, step, name),
the same on every rank and redrawn every step, so collisions do not repeat):

    round 1:  S_j[b] = sum_{i: h_j(i) = b} s_j(i) x_i        payload S (r w values), summed
    unsketch: est_i = median_j s_j(i) S_j[h_j(i)]             (of the summed sketch: identical on
              I = the k largest |est_i| (1 + u_i / 1024),      every rank, so is I)
                  u_i shared uniforms in [0, 1) breaking ties
                  alike on every rank and backend; sorted
    round 2:  payload x_I (k exact values), summed
    decode:   D(y) = scatter(n, I, y)                          linear in y

So the decoded average is the exact average of x over k coordinates chosen from the aggregate, as
global top-k would choose them up to the sketch's estimation error. The memory (`residual`, the
default) keeps x - D(x_I) on every rank: error feedback of the ordinary local kind, and the
optimizer's own momentum acts on the decoded average. (FetchSGD instead keeps momentum and error in
sketch space, identical on every rank, and zeroes the sketch cells of the recovered coordinates;
that needs the optimizer's momentum removed and a fixed hash for the run. Here the hashes change
every step and no state lives in sketch space: this is our choice, not FetchSGD's rule. FetchSGD's
placement, momentum accumulated before compression and zeroed with the error at the recovered
coordinates, is memory `dgc` (momentum correction with factor masking) with the optimizer's momentum off,
in each rank's dense space instead of the shared sketch space; docs/benchmarks.md compares both.)

Budget: m = ceil(n / ratio) values per step; k = max(1, round(share * m)) exact values and
r w = m - k sketch cells (w = (m - k) // r', r' = min(rows, m - k)); payload 4 (r' w + k) bytes for
fp32. A tensor whose budget r' w + k reaches n is sent exactly (round 2 only). Median over rows
is a min/max sorting network (rows is small).
"""
from __future__ import annotations

import math

from gradcomp import rng
from gradcomp.compressors.base import Compressor
from gradcomp.params import Param


def _median(b, rows):
    """Element-wise median of a list of equal-length 1-D arrays (odd: middle; even: mean of two)."""
    v = list(rows)
    r = len(v)
    for i in range(r):                       # odd-even transposition sort: r rounds of min/max
        for j in range(i % 2, r - 1, 2):
            lo, hi = b.minimum(v[j], v[j + 1]), b.maximum(v[j], v[j + 1])
            v[j], v[j + 1] = lo, hi
    return v[r // 2] if r % 2 else (v[r // 2 - 1] + v[r // 2]) * 0.5


class SketchCompressor(Compressor):
    name = "sketch"
    summable = True
    rounds = 2
    paper = ("Ivkin et al. Communication-efficient Distributed SGD with Sketching (NeurIPS 2019); "
             "Rothchild et al. FetchSGD (ICML 2020)")
    params = {
        "ratio": Param(float, 100.0, "dense fp32 bytes / payload bytes (sketch + exact values)", lo=1.0),
        "rows": Param(int, 3, "count-sketch rows (estimate = median over rows)", lo=1, hi=15),
        "share": Param(float, 0.5, "fraction of the budget spent on exact values of recovered coordinates",
                       lo=0.0, hi=1.0, lo_open=True, hi_open=True),
    }

    def plan(self, n: int):
        """(r, w, k) for n entries, or None to send the tensor exactly."""
        m = max(2, math.ceil(n / self.ratio))
        k = max(1, int(round(self.share * m)))
        cells = max(1, m - k)
        r = min(self.rows, cells)
        w = cells // r
        if r * w + k >= n:
            return None
        return r, w, k

    def _hashes(self, ctx, x, r, w):
        b, n = ctx.backend, ctx.numel
        cells, signs = [], []
        for j in range(r):
            h = rng.randint(b, ctx.key(f"sketch.h{j}"), n, w, x)
            cells.append(h + j * w if j else h)
            signs.append(rng.rademacher(b, ctx.key(f"sketch.s{j}"), n, x, b.dtype(x)))
        return cells, signs

    def compress(self, x, state, ctx):
        b = ctx.backend
        p = self.plan(ctx.numel)
        if p is None:
            return [], {"dense": True, "x": x}
        r, w, k = p
        cells, signs = self._hashes(ctx, x, r, w)
        idx = cells[0] if r == 1 else b.cat(cells)
        vals = signs[0] * x if r == 1 else b.cat([s * x for s in signs])
        sk = b.scatter_add(r * w, idx, vals)
        return [sk], {"dense": False, "x": x, "rwk": p, "cells": cells, "signs": signs}

    def unsketch(self, sk, info, ctx):
        """Sorted int64 indices of the k largest |median estimate| of the (summed) sketch `sk`."""
        b = ctx.backend
        r, w, k = info["rwk"]
        est = [s * b.gather(sk, c) for c, s in zip(info["cells"], info["signs"])]
        score = b.abs(est[0] if r == 1 else _median(b, est))
        jitter = rng.uniform(b, ctx.key("sketch.tie"), ctx.numel, sk)       # shared: ties break alike
        score = b.cast(score, "float64") * (1.0 + b.cast(jitter, "float64") * 2.0 ** -10)
        return b.sort(b.topk_abs(score, k))

    def next_round(self, reduced, info, state, ctx):
        b = ctx.backend
        if info["dense"]:
            info["own"] = b.copy(info.pop("x"))                 # a copy: collectives may work in place
            return [info["own"]], info
        idx = self.unsketch(reduced[0], info, ctx)
        info["idx"] = idx
        info["own"] = b.gather(info.pop("x"), idx)
        for key in ("cells", "signs"):
            info.pop(key)
        return [info["own"]], info

    def decompress(self, payload, info, ctx):
        y = payload[0]
        if info["dense"]:
            return y
        return ctx.backend.scatter(ctx.numel, info["idx"], y)

    def ratio_of(self, numel: int) -> float:
        p = self.plan(numel)
        if p is None:
            return 1.0
        r, w, k = p
        return numel / (r * w + k)
