"""`slowmo`: slow momentum on top of periodic averaging (SlowMo; BMUF as a special case).

Wang, Tantia, Ballas, Rabbat, SlowMo: Improving Communication-Efficient Distributed SGD with
Slow Momentum, ICLR 2020 (Algorithm 1), with the base optimizer run locally (local SGD).

Outer iteration t starts from the common anchor x_{t,0}; each rank takes H = `period` steps of
the wrapped (base) optimizer with learning rate gamma_t, then

    x_{t,H}   = (1/n) sum_r x_{t,H}^r                         exact (or compressed-delta) average
    u_{t+1}   = beta u_t + (x_{t,0} - x_{t,H}) / gamma_t       slow momentum, u_0 = 0
    x_{t+1,0} = x_{t,0} - alpha gamma_t u_{t+1}                slow update, on every rank

alpha = `alpha` (slow learning rate), beta = `beta` (slow momentum). With alpha = 1, beta = 0
and buffers=keep it is local SGD. The base optimizer's buffers are kept, averaged or reset at
every outer step (`buffers=keep|average|reset`: Algorithm 1 allows all three; `average` is
Double-Averaging's momentum exchange). A small world wants a small beta (fairseq's tuned
defaults: 0 up to 16 workers, 0.2 for 32, 0.5 for 64, 0.6 beyond), hence the default 0.2.
Slow momentum on top of a kept base momentum compounds the two: on the digits MLP (2 ranks,
SGD momentum 0.9, period 4) beta=0.5 reached 86% with buffers=keep but 97% with buffers=reset.

gamma_t, the base learning rate, is read from the wrapped optimizer at every sync step (per
tensor: a torch parameter group's current lr, Keras' learning_rate at the current iteration),
through ParamAccess.learning_rate, so an lr schedule needs nothing extra: the slow momentum carries
gradient units across rate changes, as in the paper. Where the view cannot tell (a custom
ParamAccess), the parameter `lr` is used, or the last `policy.set_lr(current_lr)`; while the rate
is constant its value cancels (write v = gamma u: v <- beta v + (x_{t,0} - x_{t,H}),
x <- x_{t,0} - alpha v).

    GRADCOMP_SYNC="slowmo:period=12,alpha=1.0,beta=0.6"
"""
from gradcomp.backend import get_backend
from gradcomp.params import Param
from gradcomp.sync.common import PeriodicPolicy, as_like


class SlowMoPolicy(PeriodicPolicy):
    name = "slowmo"
    keeps_anchor = True
    paper = "Wang, Tantia, Ballas, Rabbat. SlowMo: Improving Communication-Efficient Distributed SGD. ICLR 2020"
    params = {
        **PeriodicPolicy.params,
        "alpha": Param(float, 1.0, "slow learning rate", lo=0.0, lo_open=True),
        "beta": Param(float, 0.2, "slow momentum factor", lo=0.0, hi=1.0, hi_open=True),
        "lr": Param(float, 1.0, "base learning rate gamma when the optimizer's cannot be read (see set_lr)",
                    lo=0.0, lo_open=True),
        "buffers": Param(str, "keep", "base optimizer buffers at each outer step",
                         choices=("keep", "average", "reset")),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._u = None
        self._lr = self.lr

    def validate(self):
        self.average_momentum = self.buffers == "average"

    def set_lr(self, lr: float):
        """The base optimizer's current learning rate gamma_t (call when a schedule changes it)."""
        lr = float(lr)
        if not lr > 0:
            raise ValueError(f"slowmo: set_lr({lr!r}) needs a positive learning rate")
        self._lr = lr

    def after_step(self, step, view):
        if self.is_sync_step(step):
            read = getattr(view, "learning_rate", None)       # a view that is not a ParamAccess may lack it
            self._gamma = {n: read(n) for n in view.names()} if read is not None else {}
        super().after_step(step, view)

    def outer_update(self, names, avg):
        out, u_new = {}, {}
        rates = getattr(self, "_gamma", None) or {}
        for n in names:
            gamma = rates.get(n) or self._lr
            x0 = as_like(self._anchor[n], avg[n])
            step = (x0 - avg[n]) * (1.0 / gamma)
            if self._u is not None and self.beta != 0.0:
                step = as_like(self._u[n], step) * self.beta + step
            u_new[n] = step
            out[n] = x0 - step * (self.alpha * gamma)
        self._u = u_new
        return out

    def after_average(self, names, view):
        if self.buffers == "reset":
            for n in names:
                m = view.momentum(n)
                if m is not None:
                    view.set_momentum(n, get_backend(m).zeros_like(m))

    def extra_state(self):
        return {"slow_momentum": dict(self._u) if self._u is not None else None, "lr": self._lr}

    def load_extra_state(self, sd):
        self._u = dict(sd["slow_momentum"]) if sd.get("slow_momentum") is not None else None
        self._lr = float(sd.get("lr", self.lr))
