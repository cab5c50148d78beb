"""`gmc`: Global Momentum Compression (Shi, Zhao, Xie, Gao, Li, Global Momentum Compression for
Sparse Communication in Distributed Learning, arXiv 1905.12948), with the GMC+ variant.

Momentum SGD needs a momentum buffer; with sparse communication each worker only has its own
gradient, so earlier methods (DGC) keep a *local* momentum. GMC uses the *global* momentum
instead: the model difference w_{t-1} - w_t is the same on every worker, so the momentum term
costs no communication. Worker k at step t (memory u_k, learning rate eta, momentum beta):

    x_{t,k}  = g_{t,k} + u_{t,k} + beta (w_{t-1} - w_t) / eta        (compensate)
    send C(x_{t,k});  u_{t+1,k} = x_{t,k} - D(C(x_{t,k}))              (update: error feedback)
    w_{t+1}  = w_t - eta * (1/p) sum_k D(C(x_{t,k}))                  (the wrapped optimizer)

Without compression this is exactly heavy-ball momentum SGD: w_{t+1} = w_t - eta v_t with
v_t = avg_k g_{t,k} + beta v_{t-1}. With beta = 0 it is plain error feedback (memory `residual`).

In gradcomp the pipeline's output of the previous step IS (w_{t-1} - w_t) / eta: the wrapped
optimizer applies w_t = w_{t-1} - eta * aggregated_{t-1}. So this memory keeps aggregated_{t-1}
(state "global", identical on every rank) and never needs the weights or the learning rate.

GMC+ (`plus=true`), for aggressive compressors such as `rbgs`: this project's rule. The paper's
text is not available here (only its abstract, which describes GMC+ as GMC with "detached error
feedback" for aggressive sparsifiers such as RBGS), so the rule below is our reading, measured
against GMC and plain error feedback in tests/test_momentum_owners.py (impulse response) and
tests/test_compressors_research.py (least squares, rbgs:ratio=0.1). An aggressive sparsifier
sends a coordinate only every ~1/ratio steps; under GMC the momentum term travels through the
compressor with the gradient, so on a coordinate that is not sent it waits in the error-feedback
memory for that coordinate's next turn and arrives all at once, stale: the momentum acts per
*visit* instead of per step, and training becomes unstable. GMC+ detaches the error feedback from
the momentum: the memory feeds back only the compression error of the gradient, and the global
momentum is applied after aggregation, identically on every rank (no communication):

    x_{t,k}   = g_{t,k} + u_{t,k}                                     (compensate: gradient only)
    u_{t+1,k} = x_{t,k} - D(C(x_{t,k}))                               (update: error feedback)
    c_t       = (1/p) sum_k D(C(x_{t,k}))                             (the aggregate)
    v_t       = c_t + beta v_{t-1}                                    (output: global heavy ball)

Every coordinate moves every step with the full heavy-ball response (total displacement per unit
of gradient 1/(1 - beta), as for dense momentum SGD), whatever the compressor sends; without
compression GMC and GMC+ are both exactly heavy-ball momentum SGD. State "global" is the last
output (v_{t-1}; for GMC, (w_{t-1} - w_t)/eta), identical on every rank.

How to configure it (GRADCOMP_MEMORY="gmc:momentum=0.9" or "gmc:momentum=0.9,plus=true"):
  * the wrapped framework optimizer must be plain SGD: the momentum lives here. The torch and
    Keras DistributedOptimizer take an SGD optimizer's momentum over (it replaces `momentum`
    below; gradcomp/momentum.py) and refuse Adam and other adaptive optimizers;
  * weight decay: put it into the gradient before gradcomp (or accept that the momentum term does
    not carry it); an optimizer that adds wd * w after the step changes w_{t-1} - w_t;
  * learning-rate schedules are fine: the term is kept in gradient units ((w_{t-1} - w_t)/eta_{t-1},
    like torch.optim.SGD's momentum buffer), so a schedule scales the whole step as usual;
  * works with any compressor; intended for sparsifiers (topk, randomk, rbgs, dgc-style).
"""
from gradcomp.memory.base import Memory
from gradcomp.momentum import MomentumOwner
from gradcomp.params import Param


class GMCMemory(MomentumOwner, Memory):
    name = "gmc"
    replicated_state = ("global",)                # the last global step; the residual is per rank
    gradient_state = ("residual", "global")
    fusable = True                # elementwise: a fused bucket's flat state is the per-name states
    paper = "Shi, Zhao, Xie, Gao, Li. Global Momentum Compression for Sparse Communication. arXiv 1905.12948"
    params = {
        "momentum": Param(float, 0.9, "global momentum beta (an SGD optimizer's momentum replaces it)",
                          lo=0.0, hi=1.0, hi_open=True),
        "plus": Param(bool, False, "GMC+: error feedback detached from the momentum (aggressive sparsifiers)"),
    }

    def init_state(self, x, ctx):
        b = ctx.backend
        return {"residual": b.zeros_like(x), "global": b.zeros_like(x)}

    def compensate(self, g, state, ctx):
        x = g + state["residual"]
        beta, _ = self.momentum_for(ctx)
        if self.plus or beta == 0.0:
            return x
        return x + state["global"] * beta

    def update(self, g, x, local, aggregated, state, ctx):
        b = ctx.backend
        beta, _ = self.momentum_for(ctx)
        if self.plus and beta != 0.0:
            glob = aggregated + state["global"] * beta
        else:
            glob = b.copy(aggregated)                  # a copy: the framework may reuse the output
        return {"residual": x - local, "global": glob}

    def output(self, aggregated, state, ctx):
        return ctx.backend.copy(state["global"]) if self.plus else aggregated   # the caller may reuse it
