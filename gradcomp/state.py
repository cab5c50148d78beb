"""State classes: which gradcomp state is *replicated* (identical on every rank) and which is *per rank*.

Every piece of state gradcomp keeps belongs to exactly one class:

  replicated   identical on every rank after every committed step: GradientSync's step counter and
               seed, the tensor names/shapes/work dtypes, GMC's global momentum ("global"), PowerSGD's
               warm-start Q ("q"), the periodic sync policies' counters, anchor (the parameters after
               the last sync), SlowMo's slow momentum and learning rate, and the delta GradientSync's
               replicated part. Replicated state may be broadcast from any rank, like the model.
  per rank     differs between ranks: error-feedback residuals ("residual"), DGC's local momentum
               ("momentum"), signum's momentum, the byte counters, and the delta GradientSync's
               residuals; in the adapters also the wrapped optimizer's state and the parameters
               under a periodic policy (local steps). Per-rank state is never broadcast: it is saved
               and restored rank by rank (gathered_state_dict) or restarted at zero.

Components declare the per-tensor keys of their state dicts:

    class GMCMemory(Memory):
        replicated_state = ("global",)          # every other key of init_state/update is per rank
        gradient_state = ("residual", "global")  # in gradient units: rescaled with the loss scale

and the containers expose the split:

    GradientSync.replicated_state_dict()             -> only the replicated part
    GradientSync.load_replicated_state_dict(sd)      -> adopt it; per-rank state restarts at zero
    SyncPolicy.replicated_state_dict() / load_replicated_state_dict(sd)

`split(component, state)` below splits one tensor's state dict by a component's declaration.
Elastic resizing and Horovod's resume idiom (rank-0 load + broadcast_optimizer_state) build on
this: replicated state travels, per-rank state stays where it belongs.
"""
from __future__ import annotations

REPLICATED = "replicated"
PER_RANK = "per_rank"


def state_class(component, key: str) -> str:
    """REPLICATED or PER_RANK for `key` of `component`'s per-tensor state."""
    return REPLICATED if key in getattr(component, "replicated_state", ()) else PER_RANK


def split(component, state: dict) -> tuple[dict, dict]:
    """(replicated, per_rank) parts of one tensor's state dict, by `component`'s declaration."""
    rep = {k: v for k, v in state.items() if state_class(component, k) == REPLICATED}
    return rep, {k: v for k, v in state.items() if k not in rep}


def snapshot(*objs) -> list:
    """Shallow copies of the attributes of `objs` (and of a policy's delta GradientSync): the
    load_state_dict methods of GradientSync and the sync policies only rebind attributes, so
    restore(snapshot(...)) undoes a load that failed half-way exactly."""
    snap = []
    for obj in objs:
        snap.append((obj, dict(vars(obj))))
        delta = getattr(obj, "_delta", None)
        if delta is not None:
            snap.append((delta, dict(vars(delta))))
    return snap


def restore(snap: list):
    for obj, attrs in snap:
        vars(obj).clear()
        vars(obj).update(attrs)
