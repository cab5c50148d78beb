"""The Compressor interface and the per-tensor step context.

A compressor turns one flattened gradient into a payload (a list of arrays whose bytes are
exactly what goes on the wire) and back. It declares `summable`: if True, payloads from all
ranks may be summed element-wise before decoding (the pipeline uses allreduce and the decode is
linear: decompress(sum_r p_r) == sum_r decompress(p_r)); otherwise the pipeline allgathers the
payloads and calls `aggregate`. Multi-round summable compressors (PowerSGD) set `rounds` > 1 and
implement `next_round`.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from gradcomp.params import Configurable
from gradcomp.rng import derive_key


@dataclass
class Ctx:
    """What one compressor/memory call knows about the tensor and the step."""
    backend: object
    name: str
    shape: tuple
    dtype: str              # the gradient's own dtype
    numel: int
    step: int
    seed: int
    rank: int
    size: int
    memo: dict = field(default_factory=dict)   # scratch shared by memory and compressor this step
    loss_scale: float = 1.0                    # the gradients arrive multiplied by this (GradScaler)
    segments: tuple | None = None   # fused bucket: the member tensors' sizes, in order (else None)
    members: tuple | None = None    # fused bucket: the member tensors' names, in the same order

    def key(self, purpose: str = "", step: int | None = None, name: str | None = None):
        """RNG key from (seed, step, name, purpose): identical on every rank."""
        s = self.step if step is None else step
        if not isinstance(s, numbers.Integral):   # a step tensor inside a traced graph (gradcomp_tf)
            return self.backend.traced_key(self.seed, s, self.name if name is None else name, purpose)
        return derive_key(self.seed, s, self.name if name is None else name, purpose)


class Compressor(Configurable):
    """Base class. Subclasses set `name`, `params`, `summable` and implement compress/decompress."""

    kind = "compressor"
    summable = False
    rounds = 1
    variable_size = False     # payload sizes may differ across ranks (threshold)
    lossless = False          # exact (no error to feed back)
    default_memory = "residual"
    paper = ""
    # State classes (gradcomp/state.py): init_state/new_state keys identical on every rank (broadcast
    # like the model; the rest is per rank) and keys in gradient units (rescaled with the loss scale).
    replicated_state: tuple = ()
    gradient_state: tuple = ()
    # May a bucket of tensors be compressed as one flat buffer (ctx.name = the bucket's key,
    # ctx.segments = the members' sizes)? None: per tensor only. "exact": the result is, element
    # for element, the per-tensor result. "segmented": per-tensor scales are computed over
    # ctx.segments, so the result equals the per-tensor one up to float rounding of the scales.
    # "correct": a valid compressor of its own, not the per-tensor result: the method applied to
    # the bucket as one tensor (one random draw, one selection or one projection per bucket).
    fusion = None
    elementwise_cheap = False   # one elementwise kernel per tensor: fusing buys nothing on a CPU
    # fuse="auto" on a CPU: False where the idle one-rank benchmark (benchmarks/fused_step.py, docs part 1)
    # measured the per-tensor path faster than the flat bucket (the concatenation and bucket-sized
    # temporaries cost more than the per-tensor kernels save); accelerators fuse regardless.
    cpu_fusion = True
    # Summable: decompress() returns a newly allocated array or (a view of) the reduced payload, never
    # state or an input, so the pipeline may scale the average in place (no second buffer of n).
    decodes_fresh = False
    # `dense_below=N` in a compressor's spec (registry.create; 0 = off): GradientSync sends the tensors
    # with fewer than N entries uncompressed, in one fused allreduce per bucket beside this compressor's
    # collectives, with the same memory (compressor_for in gradcomp/pipeline.py).
    dense_below = 0

    def init_state(self, x, ctx: Ctx) -> dict:
        """Persistent per-tensor state (plain arrays), created on first sight of the tensor."""
        return {}

    def compress(self, x, state: dict, ctx: Ctx):
        """x: 1-D float32/float64 array. Returns (payload: list of arrays, info)."""
        raise NotImplementedError

    def next_round(self, reduced: list, info, state: dict, ctx: Ctx):
        """Multi-round only: reduced = sum over ranks of this round's payload. Returns (payload, info)."""
        raise NotImplementedError

    def decompress(self, payload: list, info, ctx: Ctx):
        """Payload -> 1-D array of ctx.numel (float32/float64). Linear in payload if summable."""
        raise NotImplementedError

    def aggregate(self, gathered: list, info, ctx: Ctx):
        """Non-summable: payloads of every rank (list over ranks) -> the averaged 1-D gradient."""
        b = ctx.backend
        total = None
        for r, p in enumerate(gathered):
            d = self.decompress(p, self.peer_info(info, r, ctx), ctx)
            total = d if total is None else total + d
        return total * (1.0 / len(gathered))

    def union(self, result, info, ctx: Ctx):
        """Sparsifiers: (U, k) once the collective is done, where U (an int or a 0-d array) is the
        number of distinct indices in the aggregate and k the entries one rank selected (mean over
        ranks); `result` is the gathered payloads (non-summable) or the reduced ones (summable).
        None (the default) for compressors that do not select entries. Feeds stats()["union_k"]."""
        return None

    def peer_info(self, info, rank: int, ctx: Ctx):
        """The info needed to decode another rank's payload (defaults to our own)."""
        return info

    def sent_indices(self, x, ctx: Ctx):
        """int64 indices I such that decompress(this rank's own payload of this step) is exactly x at
        I and zero elsewhere, when compress(x) recorded them in ctx.memo["own_idx"] (sparsifiers
        whose values are x's own entries); None otherwise. A memory may then form x - D(C(x)) by
        zeroing I in x, with no decode (the pipeline skips the local decode)."""
        own = ctx.memo.get("own_idx")
        return own[1] if own is not None and own[0] is x else None

    def new_state(self, info, state: dict, ctx: Ctx) -> dict:
        """State to commit once the step succeeded (default: unchanged)."""
        return state

    def reduced_payload(self, info, ctx: Ctx, what: str):
        """For state that every rank must update identically (PowerSGD's warm-start Q, randproj's
        reference, aggtopk's scores): the summed payload that decompress() recorded in info["reduced"];
        on one rank our own payload. `what` names that state in the error for a driver that skipped it."""
        total = info.get("reduced")
        if total is None:
            if ctx.size > 1:
                raise RuntimeError(f"{self.name}: new_state() needs decompress() of the reduced payload first "
                                   f"(GradientSync does this); {what} is updated from that sum")
            total = info["own"]
        return total

    def ratio_of(self, numel: int) -> float:
        """Nominal dense fp32 bytes / payload bytes, for documentation and tables."""
        return float("nan")
