"""`residual`: error feedback (Seide et al. 2014; Karimireddy et al., EF-SGD, ICML 2019).

    x_t = gamma * g_t + beta * e_t          (compensate)
    e_{t+1} = x_t - D(C(x_t))                (update; D(C(.)) is this rank's own decoded payload)

With beta = gamma = 1 (the default) the invariant sum_t D(C(x_t)) + e_{T+1} = sum_t g_t holds
exactly: nothing the compressor drops is ever lost, only delayed.
"""
from gradcomp.memory.base import Memory
from gradcomp.params import Param


class ResidualMemory(Memory):
    name = "residual"
    gradient_state = ("residual",)           # per rank
    fusable = True                # elementwise: a fused bucket's flat state is the per-name states
    params = {
        "beta": Param(float, 1.0, "weight of the carried residual", lo=0.0, hi=1.0),
        "gamma": Param(float, 1.0, "weight of the new gradient", lo=0.0, lo_open=True),
    }

    def init_state(self, x, ctx):
        return {"residual": ctx.backend.zeros_like(x)}

    def compensate(self, g, state, ctx):
        e = state["residual"]
        x = g if self.gamma == 1.0 else g * self.gamma
        return x + e if self.beta == 1.0 else x + e * self.beta

    def update(self, g, x, local, aggregated, state, ctx):
        return {"residual": x - local}
