"""`lowpass`: error feedback with a low-pass filtered memory (ScaleCom, NeurIPS 2020).

Chen, Ni, Venkataramani, Zhang, Srinivasan, Gopalakrishnan, Wang, Kailkhura, Sun, Schlesinger,
ScaleCom: Scalable Sparsified Gradient Compression for Communication-Efficient Distributed Training.

    x_t     = g_t + m_t                                   (compensate)
    m_{t+1} = (1 - beta) m_t + beta (x_t - D(C(x_t)))       (update: a first-order low-pass filter)

beta = 1 is plain error feedback (`residual`). With beta < 1 each rank's memory moves slowly, so the
memories of different ranks stay similar, which is what makes one rank's top-k indices good for all
(ScaleCom's cyclic local top-k). Note that m_{t+1} = m_t + beta (g_t - D(C(x_t))): only a fraction
beta of what was dropped is carried, so error feedback no longer loses nothing when beta < 1.
The formula is our reading of the paper's filtered memory update.
"""
from gradcomp.memory.base import Memory
from gradcomp.params import Param


class LowPassMemory(Memory):
    name = "lowpass"
    gradient_state = ("residual",)           # per rank
    params = {"beta": Param(float, 1.0, "filter weight of the new error (1 = plain error feedback)",
                            lo=0.0, hi=1.0, lo_open=True)}

    def init_state(self, x, ctx):
        return {"residual": ctx.backend.zeros_like(x)}

    def compensate(self, g, state, ctx):
        return g + state["residual"]

    def update(self, g, x, local, aggregated, state, ctx):
        err = x - local
        if self.beta == 1.0:
            return {"residual": err}
        return {"residual": state["residual"] * (1.0 - self.beta) + err * self.beta}
