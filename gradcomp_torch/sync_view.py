"""TorchParamAccess: the gradcomp.sync.ParamAccess view over torch parameters and momentum buffers.

Sync policies (local SGD, double averaging, SlowMo) read and overwrite parameters and the wrapped
optimizer's momentum buffers by name through this view; they never see torch.optim internals.

    momentum buffer = optimizer.state[p]["momentum_buffer"]   SGD, RMSprop(momentum>0)
                      optimizer.state[p]["exp_avg"]           Adam, AdamW, NAdam, RAdam, Adamax

get() returns the parameter's own storage (detached alias); set() and set_momentum() copy in place,
so the optimizer and model keep their tensors.
"""
from __future__ import annotations

import torch

from gradcomp.sync.base import ParamAccess

MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def _as_tensor_like(value, ref: torch.Tensor) -> torch.Tensor:
    t = value if torch.is_tensor(value) else torch.as_tensor(value)
    if t.numel() != ref.numel():
        raise ValueError(f"cannot write {t.numel()} values into a tensor of shape {tuple(ref.shape)}")
    return t.reshape(ref.shape).to(device=ref.device, dtype=ref.dtype)


class TorchParamAccess(ParamAccess):
    """View over `named_params` (list of (name, Parameter)) and `optimizer.state`."""

    def __init__(self, named_params, optimizer):
        self._params = dict(named_params)
        self._names = list(self._params)
        self._opt = optimizer

    def names(self) -> list[str]:
        return list(self._names)

    def param(self, name) -> torch.Tensor:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"unknown parameter {name!r}; known: {', '.join(self._names[:8])}"
                           f"{' ...' if len(self._names) > 8 else ''}") from None

    def get(self, name):
        return self.param(name).detach()

    @torch.no_grad()
    def set(self, name, value):
        p = self.param(name)
        p.copy_(_as_tensor_like(value, p))

    def _state(self, name):
        return self._opt.state.get(self.param(name)) if hasattr(self._opt, "state") else None

    def momentum(self, name):
        st = self._state(name)
        if not st:
            return None
        for k in MOMENTUM_KEYS:
            v = st.get(k)
            if torch.is_tensor(v):
                return v
        return None

    def learning_rate(self, name):
        p = self.param(name)
        for g in getattr(self._opt, "param_groups", []):
            if any(q is p for q in g["params"]):
                lr = g.get("lr")
                return float(lr) if lr is not None else None
        return None

    def adaptive(self) -> bool:
        return not isinstance(self._opt, torch.optim.SGD) and any(
            k in getattr(self._opt, "defaults", {}) for k in ("betas", "alpha", "lr_decay", "rho"))

    @torch.no_grad()
    def set_momentum(self, name, value):
        buf = self.momentum(name)
        if buf is not None:
            buf.copy_(_as_tensor_like(value, buf))
            return
        p = self.param(name)
        if not isinstance(self._opt, torch.optim.SGD) or self._opt.state.get(p):
            raise ValueError(f"optimizer {type(self._opt).__name__} has no momentum buffer for {name!r} yet; "
                             "only SGD's buffer can be created from outside (take one step first)")
        # SGD with momentum creates its buffer on the first step as a clone of the gradient
        self._opt.state[p]["momentum_buffer"] = _as_tensor_like(value, p).clone()
