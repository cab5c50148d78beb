"""Virtual workers, load balancing and the per-step rank-time report (framework-neutral).

Virtual workers (after VirtualFlow, Or et al., MLSys 2022). A job declares V virtual workers and a
global batch of N samples per step. Each step's N samples are cut into V virtual-worker
micro-batches that depend only on (seed, epoch, step), never on the number of ranks, and each rank
processes a contiguous run of them (`shares[r]` virtual workers), accumulating gradients locally and
compressing once per step. Whatever the world size P or the split, a step's gradient is the mean
over the same N samples: the global batch, the hyperparameters and the trajectory (up to
floating-point summation order) are those of the V-worker configuration. One device can train it,
and a resize only changes `shares` (`LoadBalancer.resize`).

Weighted averaging (our formulation). Rank r processes n_r of the step's N samples; its accumulated
gradient is its local mean g_r (micro-batch k's mean loss scaled by m_k / n_r, `loss_scales`). It
scales g_r by w_r = P * n_r / N (`gradient_weight`) before error feedback and compression
(GradientSync.start(weight=...)), so the plain average the pipeline computes is

    (1/P) * sum_r w_r g_r = (1/N) * sum_r n_r g_r,

the mean over all N samples. The weight enters before the memory's compensation, so a residual holds
what its rank still owes the weighted sum: with weights that change from step to step, error
feedback's invariant (what was sent + residual = sum of the weighted gradients) still holds, and a
compressor C with C(w x) = w C(x) (top-k, random-k, PowerSGD, scaled signs, ...) sends the weighted
contribution. A majority vote of signs (signsgd/signum) ignores magnitudes, and so the weights.

Load balancing (our rule, after VirtualFlow's heterogeneous assignment). Every rank measures the
seconds it spent computing its virtual workers in a step; the ranks allreduce a vector in which
each fills only its own slot, so every rank receives bit-identical numbers (`exchange_start`). Over
each window of `every` steps a rank's seconds per virtual worker are averaged (its compute seconds
over the virtual workers it ran), the window averages are smoothed by an exponential moving average
(weight `smoothing` on the previous estimate), and at the end of each window the V virtual
workers are re-assigned to minimise the predicted step time max_r s_r * t_r
(units handed out one at a time to the rank that would finish it earliest, ties to the lower rank;
optimal for this min-max with unit-sized work), at least `min_units` each, and the new split is
adopted only if it predicts a step at least `threshold` (a fraction) faster. The arithmetic is plain
Python floats in a fixed order on identical inputs, so every rank reaches the same decision.
"""
from __future__ import annotations

import math

import numpy as np


# ---------------------------------------------------------------------------------------- shares
def equal_shares(units: int, size: int) -> tuple:
    """`units` split over `size` ranks as evenly as possible (the first ranks get one more; >= 1 each)."""
    _check_units(units, size, 1)
    q, r = divmod(units, size)
    return tuple(q + (i < r) for i in range(size))


def balanced_shares(units: int, seconds_per_unit, min_units: int = 1) -> tuple:
    """Integer shares of `units` minimising max_r shares[r] * seconds_per_unit[r] (>= min_units each)."""
    t = [float(x) for x in seconds_per_unit]
    size = len(t)
    _check_units(units, size, min_units)
    if not all(math.isfinite(x) and x > 0 for x in t):
        raise ValueError(f"seconds_per_unit must be positive finite numbers, got {t}")
    s = [min_units] * size
    for _ in range(units - min_units * size):
        r = min(range(size), key=lambda i: ((s[i] + 1) * t[i], i))
        s[r] += 1
    return tuple(s)


def predicted_step(shares, seconds_per_unit) -> float:
    return max(float(n) * float(x) for n, x in zip(shares, seconds_per_unit))


def offsets(shares) -> list:
    """Rank r owns virtual workers offsets[r] .. offsets[r+1]-1."""
    out = [0]
    for n in shares:
        out.append(out[-1] + int(n))
    return out


def gradient_weight(samples: int, total: int, size: int) -> float:
    """w = P * n_r / N: the plain average over P ranks of w_r * (local mean) is the mean over N samples."""
    if total <= 0:
        raise ValueError(f"a step needs at least one sample, got total={total}")
    if not 0 <= samples <= total:
        raise ValueError(f"samples={samples} must lie in [0, total={total}]")
    return (size * samples) / total


def loss_scales(sizes) -> list:
    """m_k / n: scale micro-batch k's mean loss so the accumulated gradient is the mean over n samples."""
    n = sum(int(m) for m in sizes)
    return [int(m) / n if n else 0.0 for m in sizes]


def _check_units(units, size, min_units):
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"world size must be an int >= 1, got {size!r}")
    if not isinstance(units, int) or units < max(1, min_units * size):
        raise ValueError(f"{units!r} virtual workers cannot give {size} rank(s) at least {max(min_units, 1)} "
                         f"each; declare at least {max(min_units, 1) * size} virtual workers "
                         "(GRADCOMP_VIRTUAL_WORKERS / virtual_workers=)")


# ---------------------------------------------------------------------------------------- sampler
class VirtualSampler:
    """Deterministic split of a dataset into steps and of each step into V virtual workers.

    Epoch e visits a permutation of range(num_samples) drawn from numpy's Generator seeded with
    [seed, e] (identity order if shuffle=False), cut into consecutive steps of `global_batch`
    samples; the last step holds the remainder (drop_last=False: every sample exactly once per
    epoch) or is dropped. A step of n samples is cut into `virtual_workers` consecutive parts whose
    sizes differ by at most one (empty ones only when n < V). Nothing depends on the world size.
    """

    def __init__(self, num_samples: int, global_batch: int, virtual_workers: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        for key, v in (("num_samples", num_samples), ("global_batch", global_batch),
                       ("virtual_workers", virtual_workers)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{key} must be an int >= 1, got {v!r}")
        if global_batch < virtual_workers:
            raise ValueError(f"global_batch={global_batch} is smaller than virtual_workers={virtual_workers}: "
                             "every virtual worker needs at least one sample per step")
        if drop_last and num_samples < global_batch:
            raise ValueError(f"drop_last with {num_samples} samples < global_batch={global_batch} leaves no step")
        self.num_samples, self.global_batch = int(num_samples), int(global_batch)
        self.virtual_workers, self.seed = int(virtual_workers), int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_samples).astype(np.int64)

    def step_samples(self, epoch: int, step: int, order: np.ndarray | None = None) -> np.ndarray:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside 0..{self.steps_per_epoch - 1} of an epoch")
        order = self.epoch_order(epoch) if order is None else order
        return order[step * self.global_batch:(step + 1) * self.global_batch]

    def virtual_batches(self, epoch: int, step: int, order: np.ndarray | None = None) -> list:
        """The V virtual workers' sample indices for this step (a list of int64 arrays)."""
        idx = self.step_samples(epoch, step, order)
        return np.array_split(idx, self.virtual_workers)

    def rank_batches(self, epoch: int, step: int, shares, rank: int, order: np.ndarray | None = None):
        """(this rank's micro-batches, samples on this rank, samples in the step) under `shares`."""
        if sum(shares) != self.virtual_workers:
            raise ValueError(f"shares {tuple(shares)} must add up to virtual_workers={self.virtual_workers}")
        vws = self.virtual_batches(epoch, step, order)
        off = offsets(shares)
        mine = [b for b in vws[off[rank]:off[rank + 1]] if len(b)]
        return mine, sum(len(b) for b in mine), sum(len(b) for b in vws)


# ---------------------------------------------------------------------------------------- balancer
class LoadBalancer:
    """Shares of V virtual workers over P ranks that follow the ranks' measured speed (module docstring).

    Feed it every step's allreduced per-rank compute seconds with `observe`; it returns True when
    the shares changed. Rank-independent: identical inputs give identical shares on every rank.
    """

    def __init__(self, units: int, size: int, *, every: int = 10, smoothing: float = 0.5,
                 min_units: int = 1, threshold: float = 0.05, warmup: int = 1, enabled: bool = True):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be an int >= 1 (re-evaluate the split every N steps)")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing={smoothing!r} must lie in [0, 1) (weight of the previous estimate)")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold={threshold!r} must lie in [0, 1) (minimum predicted gain to move work)")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup={warmup!r} must be an int >= 0 (steps whose timings are ignored)")
        _check_units(units, size, min_units)
        self.units, self.every, self.smoothing = units, every, float(smoothing)
        self.min_units, self.threshold, self.warmup, self.enabled = min_units, float(threshold), warmup, enabled
        self.resize(size)

    def resize(self, size: int):
        """A new world size: equal shares, estimates forgotten (the new ranks' speeds are unknown)."""
        _check_units(self.units, size, self.min_units)
        self.size = size
        self.shares = equal_shares(self.units, size)
        self.estimate = None          # smoothed seconds per virtual worker, per rank
        self.seen = 0                 # steps observed since the last resize
        self.changes = 0
        self._window = ([0.0] * size, [0] * size)   # compute seconds and virtual workers since the last evaluation

    def due(self) -> bool:
        """True if the next observe() re-evaluates the split (it then needs the newest timings)."""
        n = self.seen + 1 - self.warmup
        return self.enabled and n > 0 and n % self.every == 0

    def observe(self, compute_seconds, shares=None) -> bool:
        """One step's compute seconds of every rank (identical on all ranks); True if shares changed."""
        shares = tuple(self.shares if shares is None else shares)
        sec = [float(x) for x in compute_seconds]
        if len(sec) != self.size or len(shares) != self.size:
            raise ValueError(f"expected {self.size} per-rank values, got {len(sec)} timings / {len(shares)} shares")
        self.seen += 1
        if self.seen <= self.warmup:
            return False
        wsec, wunits = self._window
        for r, (x, n) in enumerate(zip(sec, shares)):
            if n > 0 and math.isfinite(x) and x >= 0:
                wsec[r] += x
                wunits[r] += int(n)
        if (self.seen - self.warmup) % self.every:
            return False
        per = [x / n if n and x > 0 else None for x, n in zip(wsec, wunits)]
        self._window = ([0.0] * self.size, [0] * self.size)
        if self.estimate is None:
            self.estimate = per
        else:
            a = self.smoothing
            self.estimate = [old if x is None else (x if old is None else a * old + (1.0 - a) * x)
                             for old, x in zip(self.estimate, per)]
        return self._rebalance() if self.enabled else False

    def _rebalance(self) -> bool:
        est = self.estimate
        if est is None or any(x is None for x in est):
            return False
        new = balanced_shares(self.units, est, self.min_units)
        if new == self.shares:
            return False
        now, then = predicted_step(self.shares, est), predicted_step(new, est)
        if not then < now * (1.0 - self.threshold):
            return False
        self.shares = new
        self.changes += 1
        return True

    def state_dict(self) -> dict:
        return {"units": self.units, "size": self.size, "shares": list(self.shares), "seen": self.seen,
                "changes": self.changes, "estimate": None if self.estimate is None else list(self.estimate),
                "window": [list(self._window[0]), list(self._window[1])]}

    def load_state_dict(self, sd: dict):
        if int(sd["units"]) != self.units:
            raise ValueError(f"balancer state is for {sd['units']} virtual workers, this job has {self.units}")
        if int(sd["size"]) != self.size:
            self.resize(self.size)        # saved for another world size: start from equal shares
            return
        self.shares = tuple(int(x) for x in sd["shares"])
        self.seen, self.changes = int(sd["seen"]), int(sd.get("changes", 0))
        w = sd.get("window") or ([0.0] * self.size, [0] * self.size)
        self._window = ([float(x) for x in w[0]], [int(x) for x in w[1]])
        self.estimate = None if sd.get("estimate") is None else [None if x is None else float(x)
                                                                 for x in sd["estimate"]]


# ---------------------------------------------------------------------------------------- report
FIELDS = ("compute", "wait", "units", "samples")


def exchange_start(comm, values):
    """Allreduce `values` (len(FIELDS) numbers) into a FIELDS x P table; returns the handle."""
    vec = np.zeros((len(values), comm.size), dtype=np.float64)
    vec[:, comm.rank] = np.asarray(values, dtype=np.float64)
    return comm.allreduce(vec.reshape(-1), name="gradcomp.rank_times")


def exchange_finish(handle, size):
    out = np.asarray(handle.wait(), dtype=np.float64).reshape(-1, size)
    return [list(map(float, row)) for row in out]


class RankTimeReport:
    """Per-step compute and wait seconds of every rank, and their spread.

    compute[r]: from the step's first micro-batch to the end of rank r's last backward pass.
    wait[r]:    from there until its averaged gradient was ready (waiting at the collective for the
                slowest rank, plus the transfer not hidden behind backward and the decoding).
    spread:     max_r compute[r] - min_r compute[r]; wait_frac[r] = wait[r] / (compute[r] + wait[r]).
    """

    def __init__(self, keep: int = 10000):
        self.keep = keep
        self.steps: list[dict] = []

    def add(self, step: int, compute, wait, units, samples) -> dict:
        c, w = [float(x) for x in compute], [float(x) for x in wait]
        rec = {"step": int(step), "compute": c, "wait": w, "units": [int(x) for x in units],
               "samples": [int(x) for x in samples], "spread": max(c) - min(c),
               "step_time": max(ci + wi for ci, wi in zip(c, w)),
               "wait_frac": [wi / (ci + wi) if ci + wi > 0 else 0.0 for ci, wi in zip(c, w)]}
        self.steps.append(rec)
        if len(self.steps) > self.keep:
            del self.steps[: len(self.steps) - self.keep]
        return rec

    @property
    def last(self) -> dict | None:
        return self.steps[-1] if self.steps else None

    def summary(self, skip: int = 0) -> dict:
        """Totals over the recorded steps after the first `skip`: per-rank means and wait fractions."""
        recs = self.steps[skip:]
        if not recs:
            return {"steps": 0}
        size = len(recs[0]["compute"])
        comp = [sum(r["compute"][i] for r in recs) for i in range(size)]
        wait = [sum(r["wait"][i] for r in recs) for i in range(size)]
        step = sum(r["step_time"] for r in recs)
        samples = sum(sum(r["samples"]) for r in recs)
        n = len(recs)
        return {"steps": n, "compute": [x / n for x in comp], "wait": [x / n for x in wait],
                "step_time": step / n, "spread": sum(r["spread"] for r in recs) / n,
                "wait_frac": [wi / (ci + wi) if ci + wi > 0 else 0.0 for ci, wi in zip(comp, wait)],
                "samples_per_s": samples / step if step > 0 else float("nan"),
                "units": recs[-1]["units"]}

    def table(self, skip: int = 0) -> str:
        s = self.summary(skip)
        if not s["steps"]:
            return "(no steps recorded)"
        lines = ["rank  compute_ms  wait_ms  wait_%  units(last)"]
        for r in range(len(s["compute"])):
            lines.append(f"{r:>4}  {1e3 * s['compute'][r]:>10.2f}  {1e3 * s['wait'][r]:>7.2f}  "
                         f"{100 * s['wait_frac'][r]:>6.1f}  {s['units'][r]:>11}")
        lines.append(f"steps {s['steps']}, step {1e3 * s['step_time']:.2f} ms, spread {1e3 * s['spread']:.2f} ms, "
                     f"{s['samples_per_s']:.1f} samples/s")
        return "\n".join(lines)
