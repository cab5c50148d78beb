"""`warmup=N`: dense steps before a lossy compressor starts (any compressor, any memory).

    GRADCOMP_COMPRESSOR="topk:ratio=0.01,warmup=200"      # 200 dense steps, then top-k

Like PyTorch's PowerSGD hook (`start_powerSGD_iter`) and 1-bit Adam (`freeze_step`): the first N
pipeline steps send every gradient dense (payload = the whole fp32/fp64 vector, allreduced when
the compressor is summable, else allgathered and averaged); from step N on the compressor runs
as configured. `registry.create` wraps a compressor in `DenseWarmup` when its spec has
`warmup=N` (N > 0); spec() keeps the option, so checkpoints and the cross-rank check see it.

Memories see a dense step as one whose whole input was sent: error-feedback residuals stay zero
(x - D(C(x)) = 0), so they start clean when compression starts; ctx.memo "dense" tells the `dgc`
memory to keep its momentum unmasked (heavy-ball momentum during warm-up, as the DGC reference does
for tensors it does not compress). The compressor's own state is not touched during warm-up.
A compressor that owns momentum (`signum`) cannot be warmed up this way (its momentum would stop
during the dense steps): ValueError. The step must be a Python int (payload sizes change at N),
so inside a traced TF graph a warm-up raises TypeError; run those steps eagerly.
"""
from __future__ import annotations

import numbers

from gradcomp.compressors.base import Compressor


class DenseWarmup(Compressor):
    """`inner` with its first `steps` pipeline steps sent dense (see the module docstring)."""

    def __init__(self, inner: Compressor, steps: int):
        if getattr(inner, "owns_momentum", False):
            raise ValueError(f"compressor {inner.name!r} keeps its own momentum, which a dense warm-up would "
                             "interrupt; drop warmup= (or use a compressor without momentum, e.g. efsignsgd)")
        if inner.lossless:
            raise ValueError(f"compressor {inner.name!r} is lossless; warmup= is for lossy compressors")
        self.inner, self.warmup = inner, int(steps)
        self.name, self.params, self.paper = inner.name, inner.params, inner.paper
        self.summable, self.rounds, self.variable_size = inner.summable, inner.rounds, inner.variable_size
        self.lossless, self.default_memory = inner.lossless, inner.default_memory
        self.config = dict(inner.config, warmup=self.warmup)

    def __getattr__(self, key):              # the inner compressor's parameters and helpers
        if key == "inner":
            raise AttributeError(key)
        return getattr(self.inner, key)

    @property
    def dense_below(self):                   # small tensors dense (registry.create sets it on the inner one)
        return self.inner.dense_below

    @property
    def replicated_state(self):              # state classes (gradcomp/state.py): the inner compressor's
        return self.inner.replicated_state

    @property
    def gradient_state(self):
        return self.inner.gradient_state

    def spec(self) -> str:
        s = self.inner.spec()
        return s + ("," if ":" in s else ":") + f"warmup={self.warmup}"

    def dense_at(self, step) -> bool:
        if not isinstance(step, numbers.Integral):
            raise TypeError("warmup= changes the payload at step N, so it needs an integer step; run the "
                            "step eagerly (not inside a traced tf.function) or drop warmup=")
        return step < self.warmup

    def init_state(self, x, ctx):
        return self.inner.init_state(x, ctx)

    def compress(self, x, state, ctx):
        if not self.dense_at(ctx.step):
            return self.inner.compress(x, state, ctx)
        ctx.memo["dense"] = True
        return [x], _Warm(x)

    def next_round(self, reduced, info, state, ctx):
        if not isinstance(info, _Warm):
            return self.inner.next_round(reduced, info, state, ctx)
        if info.reduced is None:
            info.reduced = reduced
        return [], info

    def decompress(self, payload, info, ctx):
        if not isinstance(info, _Warm):
            return self.inner.decompress(payload, info, ctx)
        if payload is None:                  # the sum of a multi-round compressor's first round
            return info.reduced[0]
        return payload[0] if len(payload) else info.x

    def aggregate(self, gathered, info, ctx):
        if not isinstance(info, _Warm):
            return self.inner.aggregate(gathered, info, ctx)
        total = gathered[0][0]
        for p in gathered[1:]:
            total = total + p[0]
        return total * (1.0 / len(gathered))

    def union(self, result, info, ctx):
        return None if isinstance(info, _Warm) else self.inner.union(result, info, ctx)

    def sent_indices(self, x, ctx):
        return None if ctx.memo.get("dense") else self.inner.sent_indices(x, ctx)

    def peer_info(self, info, rank, ctx):
        return info if isinstance(info, _Warm) else self.inner.peer_info(info, rank, ctx)

    def new_state(self, info, state, ctx):
        return state if isinstance(info, _Warm) else self.inner.new_state(info, state, ctx)

    def ratio_of(self, numel):
        return self.inner.ratio_of(numel)


class _Warm:
    """Info of a dense warm-up step: this rank's input and, for multi-round compressors, the sum."""

    def __init__(self, x):
        self.x, self.reduced = x, None
