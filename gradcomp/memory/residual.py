"""`residual`: error feedback (Seide et al. 2014; Karimireddy et al., EF-SGD, ICML 2019).

    x_t = gamma * g_t + beta * e_t          (compensate)
    e_{t+1} = x_t - D(C(x_t))                (update; D(C(.)) is this rank's own decoded payload)

For a sparsifier whose decoded payload is x_t at the sent indices I and zero elsewhere (topk,
randomk, rbgs, dgc, threshold: Compressor.sent_indices), e_{t+1} is x_t with I set to zero, computed
in place on x_t with no decode: the same numbers. Otherwise the decode is subtracted from x_t in
place (unless the average or the decode is x_t itself). x_t is compensate's fresh array, or, when
the pipeline says the gradient buffer is a private copy of its own (ctx.memo "g_writable": a fused
bucket's concatenation or a cast; never the caller's array), that buffer with e_t added in place.

With beta = gamma = 1 (the default) the invariant sum_t D(C(x_t)) + e_{T+1} = sum_t g_t holds
exactly: nothing the compressor drops is ever lost, only delayed.
"""
from gradcomp.memory.base import Memory
from gradcomp.params import Param


class ResidualMemory(Memory):
    name = "residual"
    gradient_state = ("residual",)           # per rank
    fusable = True                # elementwise: a fused bucket's flat state is the per-name states
    masks_sent = True             # update(local=None): x with the sent indices zeroed (see above)
    params = {
        "beta": Param(float, 1.0, "weight of the carried residual", lo=0.0, hi=1.0),
        "gamma": Param(float, 1.0, "weight of the new gradient", lo=0.0, lo_open=True),
    }

    def init_state(self, x, ctx):
        return {"residual": ctx.backend.zeros_like(x)}

    def compensate(self, g, state, ctx):
        e = state["residual"]
        if ctx.memo.get("g_writable") and self.gamma == 1.0 and self.beta == 1.0:
            return ctx.backend.add_(g, e)       # g is the pipeline's to overwrite: no new buffer
        x = g if self.gamma == 1.0 else g * self.gamma
        return x + e if self.beta == 1.0 else x + e * self.beta

    def update(self, g, x, local, aggregated, state, ctx):
        if local is None:         # D(C(x)) = x at own_decode_idx, 0 elsewhere: x - D(C(x)) exactly
            idx = ctx.memo.get("own_decode_idx")
            if idx is None:
                raise RuntimeError("residual memory: update() needs this rank's decoded payload (local) or "
                                   "ctx.memo['own_decode_idx']; call it through GradientSync")
            return {"residual": ctx.backend.zero_at(x, idx)}
        b = ctx.backend
        if b.shares_memory(x, local) or b.shares_memory(x, aggregated):   # a lossless payload may be x itself
            return {"residual": x - local}
        return {"residual": b.sub_(x, local)}       # in place on compensate's fresh array
