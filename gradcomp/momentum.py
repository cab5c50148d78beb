"""Methods that own their momentum, and handing a framework optimizer's momentum over to them.

A memory or compressor that implements momentum SGD itself declares `owns_momentum = True`: the
`dgc` memory (momentum correction), the `gmc` memory (global momentum) and the `signum`
compressor (sign of the local momentum). Beside an optimizer that applies momentum too, the
momentum would act twice: DGC under SGD(momentum=0.9) moves a weight 1/(1-m)^2 = 100x instead of
1/(1-m) = 10x per unit of gradient. So the framework optimizers (gradcomp_torch and gradcomp_tf
DistributedOptimizer) take the wrapped SGD's momentum over, per parameter group:

  * the optimizer's momentum (and nesterov) is set to 0 / off and its value handed to the method
    for the tensors of that group (`MomentumOwner.adopt_momentum`);
  * weight decay keeps the momentum, as in the DGC reference implementation (its SGD applies
    momentum only to the weight-decay term: buf <- m buf + wd w; step = buf + grad, nesterov
    step = wd w + m buf + grad); the torch adapter does this with a buffer of its own;
  * the take-over is announced once (a warning on rank 0);
  * an optimizer whose momentum is not heavy-ball SGD (Adam, RMSprop, ...) raises ValueError:
    such a method is defined only over plain SGD.

If no group has momentum, the method keeps its own parameter (e.g. dgc's momentum=0.9).
"""
from __future__ import annotations


class MomentumOwner:
    """Mixin of memories/compressors that implement momentum SGD (see the module docstring)."""

    owns_momentum = True
    momentum_param = "momentum"     # the parameter holding the momentum factor
    nesterov_param = None           # the parameter holding the Nesterov switch, None: no Nesterov form

    def adopt_momentum(self, name, momentum: float, nesterov: bool = False):
        """Use `momentum` (and nesterov) for tensor `name` (None: every tensor) instead of this
        method's own parameter."""
        momentum, nesterov = float(momentum), bool(nesterov)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{self.kind} {self.name!r}: momentum {momentum} for {name!r} is outside [0, 1)")
        if nesterov and self.nesterov_param is None:
            raise ValueError(f"{self.kind} {self.name!r} has no Nesterov form; use nesterov=False in the optimizer")
        self.__dict__.setdefault("_adopted", {})[name] = (momentum, nesterov)

    def momentum_for(self, ctx) -> tuple[float, bool]:
        """(momentum, nesterov) for the tensor of `ctx`: the adopted value, else the parameters."""
        adopted = self.__dict__.get("_adopted", {})
        got = adopted.get(ctx.name, adopted.get(None))
        if got is not None:
            return got
        nest = bool(getattr(self, self.nesterov_param)) if self.nesterov_param else False
        return float(getattr(self, self.momentum_param)), nest

    def adopted(self) -> dict:
        return dict(self.__dict__.get("_adopted", {}))


def owners(sync) -> list:
    """The momentum-owning parts (memory, compressor) of a GradientSync."""
    return [o for o in (sync.memory, sync.compressor) if getattr(o, "owns_momentum", False)]


def hand_over(sync, groups, optimizer: str) -> str | None:
    """Give the optimizer's momentum to the momentum-owning parts of `sync`.

    groups: list of (names, momentum, nesterov, dampening), one per parameter group (names None:
    every tensor). Returns the
    message to announce, or None when there is nothing to take over. Raises ValueError when two
    parts own momentum or when a group's momentum cannot be handed over."""
    own = owners(sync)
    if not own:
        return None
    what = " and ".join(f"{o.kind} {o.name!r}" for o in own)
    if len(own) > 1:
        raise ValueError(f"{what} both implement momentum; it would be applied twice. Use one of them "
                         "(e.g. memory=residual or memory=none beside signum)")
    if not any(m for _, m, _, _ in groups):
        return None
    o = own[0]
    for names, m, nest, damp in groups:
        if damp:
            raise ValueError(f"{what} takes over the optimizer's momentum, which needs dampening=0 "
                             f"(got dampening={damp}); remove dampening from the optimizer")
        if nest and o.nesterov_param is None:
            raise ValueError(f"{what} implements heavy-ball momentum without a Nesterov form; "
                             "create the optimizer with nesterov=False")
        for n in (names if names is not None else [None]):
            o.adopt_momentum(n, m, nest)
    vals = sorted({(m, bool(nest)) for _, m, nest, _ in groups})
    desc = ", ".join(f"momentum={m:g}{' nesterov' if nest else ''}" for m, nest in vals)
    return (f"gradcomp: {what} implements momentum itself, so it took over {optimizer}'s {desc} (the "
            "optimizer now runs with momentum=0; weight decay keeps its momentum). Nothing to change "
            "in your script: the step equals the method's paper with that momentum.")


def refuse(sync, optimizer: str):
    """ValueError for an optimizer whose momentum cannot be handed to the owner(s) in `sync`."""
    own = owners(sync)
    if own:
        what = " and ".join(f"{o.kind} {o.name!r}" for o in own)
        raise ValueError(f"{what} implements momentum SGD itself and is defined only over plain SGD, not "
                         f"{optimizer}. Wrap SGD (any momentum; it is taken over), or with {optimizer} use a "
                         "method without momentum of its own (e.g. compressor topk with memory residual)")
