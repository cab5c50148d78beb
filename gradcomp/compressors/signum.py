"""`signum`: sign of the local momentum with majority vote (Bernstein, Wang, Azizzadenesheli,
Anandkumar, signSGD: Compressed Optimisation for Non-Convex Problems, ICML 2018, Alg. 1 "Signum";
distributed form: Bernstein et al., ICLR 2019, Alg. 1).

Every rank keeps its own momentum m (compressor state, committed only through `new_state` once
the step succeeded) and sends its sign; the signs are combined by majority vote:

    m_r <- beta * m_r + g_r
    g~   = mean_r(mean_i |m_r,i|) * sign( sum_r sign(m_r) )        (ties -> 0; scale=mean)

The momentum is accumulated as torch.optim.SGD's buffer (no (1 - beta) dampening; the sign, the
paper's step, is the same either way), so with scale=mean a step has the size of SGD's momentum
step and SGD(momentum=beta)'s learning rate transfers. The momentum lives here: the torch and
Keras DistributedOptimizer take an SGD optimizer's momentum over as `beta` (gradcomp/momentum.py)
and refuse adaptive optimizers. `scale` as in `signsgd`. Default memory: none.
Wire: 4 + ceil(n/8) bytes (~32x).
"""
from gradcomp.compressors.signs import SignVoteCompressor
from gradcomp.momentum import MomentumOwner
from gradcomp.params import Param


class SignumCompressor(MomentumOwner, SignVoteCompressor):
    momentum_param = "beta"
    name = "signum"
    gradient_state = ("momentum",)               # this rank's momentum: per rank
    paper = "Bernstein et al. signSGD: Compressed Optimisation for Non-Convex Problems. ICML 2018"
    params = dict(SignVoteCompressor.params,
                  beta=Param(float, 0.9, "momentum factor", lo=0.0, hi=1.0, hi_open=True))

    def init_state(self, x, ctx):
        return {"momentum": ctx.backend.zeros_like(x)}

    def signal(self, x, state, ctx):
        beta, _ = self.momentum_for(ctx)
        m = state["momentum"] * beta + x
        return m, m

    def new_state(self, info, state, ctx):
        return {"momentum": info}
