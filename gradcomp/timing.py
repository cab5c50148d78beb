"""Where a step's time goes: host wall time of GradientSync's phases, summed over steps.

    compensate  memory.compensate          compress  compressor.compress (first round; later rounds
                                                     of multi-round compressors count as python)
    wait        waiting for collectives    decode    decompress / aggregate (and the local decode)
    update      memory.update              python    the rest of start() + finish(): flattening,
                                                     concatenation, bookkeeping, launching collectives

Host time: on an accelerator the kernels run asynchronously, so a phase's time is its launch cost
and the device work shows up where the host next waits (usually `wait` or the caller's own sync).
"""
from __future__ import annotations

import time

PHASES = ("compensate", "compress", "wait", "decode", "update")
now = time.perf_counter


class PhaseTimer:
    def __init__(self):
        self.reset()

    def reset(self):
        self.total = {p: 0.0 for p in PHASES + ("start", "finish")}
        self.steps = 0

    def add(self, phase: str, seconds: float):
        self.total[phase] += seconds

    def report(self) -> dict:
        """Milliseconds per step of each phase, `python` (the unaccounted rest) and `total`."""
        n = max(self.steps, 1)
        out = {p: 1e3 * self.total[p] / n for p in PHASES}
        total = 1e3 * (self.total["start"] + self.total["finish"]) / n
        out["python"] = max(0.0, total - sum(out.values()))
        out["total"] = total
        out["steps"] = self.steps
        return out
