"""`dgc`: the memory half of Deep Gradient Compression (Lin, Han, Mao, Wang, Dally, ICLR 2018):
momentum correction, local gradient clipping and momentum factor masking (Sec. 3.2, Alg. 1),
following the reference implementation (synxlin/deep-gradient-compression, `dgc/memory.py`).

Per tensor, on every rank, with momentum m, N ranks and clip threshold c:

    g  <- g * min(1, (c / sqrt(N)) / ||g||)      local gradient clipping (c = clip; 0 = off)
    u  <- m * u + g                               momentum correction: local momentum ...
    v  <- v + u                                   ... accumulated into the velocity v
          (nesterov: u <- m * (u + g);  v <- v + u + g)
    send C(v)                                     (compensate returns v)
    u[I] <- 0,  v[I] <- 0                         momentum factor masking on the sent indices I

Masking and the warm-up (`masking`, this project's rule by default): zeroing u on every sent
coordinate removes the momentum a coordinate would still deliver; at the final density (~1/ratio
steps between sends) little is lost, but at the warm-up's densities (25% at first: a coordinate is
sent every few steps) almost all of it is, and DGC then trains like SGD without momentum (the
impulse response per unit gradient is ~2.3 at 25% density instead of 1/(1-m) = 10;
tests/test_momentum_owners.py). `masking=final` (default) masks u only once the compressor sends at
its final density (the `dgc` compressor marks warm-up steps with ctx.memo "warmup"; every other
compressor counts as final) and v always; `masking=on` is the reference's rule (mask on every
step, including the warm-up); `masking=off` never masks u (the reference's `momentum_masking=False`).

I comes from the compressor when it reports its indices (`dgc`, `topk`, `randomk`: ctx.memo
"sent_idx"), so masking costs O(k); otherwise I = {i : D(C(v))_i != 0}, this rank's own decoded
payload. A tensor the compressor sends dense (ctx.memo "dense": the `dgc` compressor's tensors
with <= 1 dimension, a dense warm-up step) keeps its momentum unmasked and v = 0: the average of
the ranks' u is then exactly heavy-ball momentum on the averaged gradient, which is what the
reference does for the tensors it does not compress.

The averaged result is already momentum-corrected, so the optimizer must not add momentum: the
torch and Keras DistributedOptimizer take the wrapped SGD's momentum over (gradcomp/momentum.py).
Clipping is per tensor (the memory sees one tensor at a time; the paper clips the rank's whole
gradient), the threshold scaled by N^(-1/2) as in the paper. State: {"momentum": u, "residual": v}
(v is what `GradientSync.residual(name)` reports); compensate passes the new u to update through
ctx.memo and nothing is kept outside the returned dicts.
"""
import math

from gradcomp.memory.base import Memory
from gradcomp.momentum import MomentumOwner
from gradcomp.params import Param


class DGCMemory(MomentumOwner, Memory):
    name = "dgc"
    nesterov_param = "nesterov"
    gradient_state = ("momentum", "residual")     # both per rank (local momentum)
    masks_sent = True                             # local=None: rebuilt below from own_decode_idx
    params = {
        "momentum": Param(float, 0.9, "momentum factor m (an SGD optimizer's momentum replaces it)",
                          lo=0.0, hi=1.0, hi_open=True),
        "nesterov": Param(bool, False, "Nesterov momentum correction"),
        "clip": Param(float, 0.0, "local gradient clipping: global norm threshold c (0 = off)", lo=0.0),
        "masking": Param(str, "final", "momentum factor masking: on (every step, the reference), final (only "
                         "once the compressor sends at its final density), off", choices=("on", "final", "off")),
    }

    def init_state(self, x, ctx):
        b = ctx.backend
        return {"momentum": b.zeros_like(x), "residual": b.zeros_like(x)}

    def clip_grad(self, g, ctx):
        b = ctx.backend
        thr = self.clip * ctx.loss_scale / math.sqrt(ctx.size)     # c is in unscaled gradient units
        norm = b.norm(g)
        factor = b.minimum(thr / b.maximum(norm, 1e-30), 1.0)
        return g * b.cast(factor, b.dtype(g))

    def compensate(self, g, state, ctx):
        if self.clip > 0:
            g = self.clip_grad(g, ctx)
        u, v = state["momentum"], state["residual"]
        m, nesterov = self.momentum_for(ctx)
        if nesterov:
            u = (u + g) * m
            v = v + u + g
        else:
            u = u * m + g
            v = v + u
        ctx.memo["dgc/momentum"] = u
        return v

    def update(self, g, x, local, aggregated, state, ctx):
        b = ctx.backend
        u = ctx.memo.get("dgc/momentum")
        if u is None:
            raise RuntimeError("dgc memory: update() needs compensate() of the same step; call it through "
                               "GradientSync")
        if ctx.memo.get("dense"):
            return {"momentum": u, "residual": b.zeros_like(x)}
        mask_u = self.masking == "on" or (self.masking == "final" and not ctx.memo.get("warmup"))
        idx = ctx.memo.get("sent_idx")
        if idx is None and local is None:     # the pipeline skipped the local decode: x was sent at these
            idx = ctx.memo.get("own_decode_idx")
            if idx is None:
                raise RuntimeError("dgc memory: update() needs this rank's decoded payload; call it through "
                                   "GradientSync")
        if idx is not None:
            return {"momentum": b.zero_at(u, idx) if mask_u else u, "residual": b.zero_at(x, idx)}
        keep = 1 - b.cast(b.abs(local) > 0, b.dtype(x))
        # x - local: x * keep when the sent values are x's own, and with rounded values on the wire
        # (topk/dgc values=fp16) the residual keeps the rounding error
        return {"momentum": u * keep if mask_u else u, "residual": x - local}
