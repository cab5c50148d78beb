"""Hand a wrapped torch.optim.SGD's momentum to a method that implements momentum itself.

See gradcomp/momentum.py for the rule. `take_over` runs once when DistributedOptimizer is built;
it returns a `WeightDecayMomentum` (or None) whose `apply()` the optimizer calls just before the
wrapped step: with the group's momentum m set to 0 the wrapped SGD adds wd * w without momentum,
so this adds the rest of the reference's momentum on the weight-decay term (buf <- m buf + wd w;
step = grad + buf, nesterov: grad + wd w + m buf). Its buffers live in the wrapped optimizer's
state (`gradcomp_wd_momentum`), so they are saved with optimizer.state_dict().
"""
from __future__ import annotations

import warnings

import torch

from gradcomp.momentum import hand_over, owners, refuse

KEY = "gradcomp_wd_momentum"


class WeightDecayMomentum:
    def __init__(self, optimizer, groups):
        self.opt, self.groups = optimizer, groups      # [(group dict, momentum, nesterov)]

    @torch.no_grad()
    def apply(self):
        for group, m, nesterov in self.groups:
            wd = group.get("weight_decay", 0.0)
            if not wd or not m:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.opt.state[p]
                d = p.detach() * wd
                buf = st.get(KEY)
                if buf is None:
                    buf = st[KEY] = d.clone()
                    extra = None if not nesterov else buf * m
                else:
                    buf.mul_(m).add_(d)
                    extra = buf * m if nesterov else buf - d
                if extra is not None:
                    p.grad.add_(extra.to(p.grad.dtype))


def take_over(optimizer, named, sync, rank: int):
    """Move the momentum of `optimizer` (SGD) into the momentum-owning part of `sync`, if any."""
    if not owners(sync):
        return None
    if not isinstance(optimizer, torch.optim.SGD):
        refuse(sync, type(optimizer).__name__)
    name_of = {id(p): n for n, p in named}
    groups = []
    for g in optimizer.param_groups:
        names = [name_of[id(p)] for p in g["params"] if id(p) in name_of]
        groups.append((names, float(g.get("momentum", 0.0)), bool(g.get("nesterov", False)),
                       float(g.get("dampening", 0.0)) if g.get("momentum", 0.0) else 0.0))
    msg = hand_over(sync, groups, type(optimizer).__name__)
    if msg is None:
        return None
    kept = []
    for g, (_, m, nest, _) in zip(optimizer.param_groups, groups):
        g["momentum"], g["nesterov"] = 0.0, False
        kept.append((g, m, nest))
    if rank == 0:
        warnings.warn(msg, stacklevel=3)
    return WeightDecayMomentum(optimizer, kept)
