"""Elastic training: what gradcomp's state does when the world changes size (framework-neutral).

Two kinds of change, two rules:

  graceful   a host is added or announces it will leave, and every rank of the *old* world is
             still alive and at the same step. `flush(sync)` (a collective on the old world) sums
             every rank's error-feedback residuals with ONE dense allreduce (one per working dtype),
             sets the residuals to zero and keeps the sum as *replicated* state. The next step's
             averaged gradients (GradientSync.finish, on the new world) get sum / P_old added, so the
             residual mass every old rank held -- the leaving ranks' too -- reaches the model in the
             next update: nothing is lost. (sum / P_old is what those residuals would have
             contributed to an average over the old world, the world whose batch they came from.)
             Because the pending flush is replicated state it travels in replicated_state_dict(), so
             ranks that join receive it with the broadcast from rank 0, and each rank adds it once.
  failure    a rank died (SIGKILL, lost host). The survivors cannot know what it held, so
             `Elastic.restore()` rolls gradcomp's state back to the last `commit()`: the committed
             replicated state is adopted and every per-rank state (residuals, DGC's local momentum)
             restarts at zero, on every rank alike. The steps since the last commit are lost (the
             model is rolled back by the engine, e.g. hvd.elastic.TorchState.restore, to the same commit).

After either, `Elastic.resize(comm)` moves the state onto the new world's communicator: GradientSync
and the sync policy (and its delta GradientSync) get the new communicator, the configuration
fingerprint (compressor, memory, seed, tensor names/shapes/order, and what the adapter adds) is
checked again on the new world (ConfigMismatchError on every rank if a joining rank differs), and
the callbacks given as `on_resize` run with the new world size, for everything else that depends
on it (gradcomp_torch.VirtualWorkers.resize re-splits the same virtual workers so the global batch
stays fixed; a learning-rate rule). What is derived from comm.size on every step (the 1/P of the
average, ctx.size for the compressors, the traffic report's dense reference) follows the new
communicator by itself.

Which keys are flushed: the memory's `flush_state` keys (default: "residual", the gradient mass a
rank has not sent yet). DGC's local momentum and a periodic policy's delta residuals are not
flushed (momentum is not unsent mass; the delta residual of a local-SGD policy would need a
parameter sync to be applied, which we leave out): `rebind` zeroes the delta residuals, and the
momentum restarts at zero where the new world adopts the replicated state
(load_replicated_state_dict, as gradcomp_torch.elastic's sync does on every rank). So a graceful
change needs no per-rank state to be carried, whatever the new ranks' numbering. The flush's
allreduce is not counted in stats() (it is not a gradient step).
"""
from __future__ import annotations

import numpy as np

from gradcomp.backend import get_backend

FLUSH_KEYS = ("residual",)


def flush_keys(memory) -> tuple:
    """The per-rank keys of `memory`'s state that hold unsent gradient mass."""
    return tuple(getattr(memory, "flush_state", FLUSH_KEYS))


def held_mass(sync) -> dict:
    """{name: this rank's unsent gradient mass} in unscaled gradient units (a copy, numpy):
    the sum of the flush keys of each tensor's memory state divided by its loss scale."""
    out = {}
    keys = flush_keys(sync.memory)
    for name in sync._shapes:
        st = sync._mem.get(name) or {}
        vals = [st[k] for k in keys if st.get(k) is not None]
        if not vals:
            continue
        b = get_backend(vals[0])
        tot = sum(np.asarray(b.to_numpy(v), dtype=np.float64 if sync._work.get(name) == "float64" else np.float32)
                  for v in vals)
        tot = tot.reshape(sync._shapes[name])
        out[name] = tot / sync._scale.get(name, 1.0) if sync._scale.get(name, 1.0) != 1.0 else tot
    return out


def flush(sync, *, name: str = "elastic.flush") -> dict:
    """Collective on the current (old) world: sum every rank's residuals (one dense allreduce per
    working dtype), zero them, and keep the sum to be added, divided by the current world size,
    to the next averaged gradient. Returns {name: summed residual} (flat arrays of the residuals'
    backend, unscaled gradient units).

    Every rank must call it at the same step. A flush still pending (not yet applied) is summed
    into the new one."""
    if sync._buckets:
        raise RuntimeError("elastic flush while a step is in flight; call it after finish() / optimizer.step()")
    keys = flush_keys(sync.memory)
    names = [n for n in sync._shapes if any((sync._mem.get(n) or {}).get(k) is not None for k in keys)]
    groups = {}
    for n in names:
        groups.setdefault(sync._work.get(n, "float32"), []).append(n)
    size = sync.comm.size
    summed = {}
    for work, grp in sorted(groups.items()):
        parts = []
        for n in grp:
            st = sync._mem[n]
            vals = [st[k] for k in keys if st.get(k) is not None]
            b = get_backend(vals[0])
            v = b.flatten(vals[0]) if len(vals) == 1 else b.flatten(sum(vals[1:], vals[0]))
            scale = sync._scale.get(n, 1.0)
            parts.append(v * (1.0 / scale) if scale != 1.0 else v)
        b = get_backend(parts[0])
        flat = b.cat(parts) if len(parts) > 1 else b.copy(parts[0])
        total = sync.comm.allreduce(flat, name=f"{name}.{work}").wait() if size > 1 else flat
        off = 0
        for n, p in zip(grp, parts):
            k = b.numel(p)
            summed[n] = b.copy(b.slice(total, off, off + k))        # flat, like the residuals
            off += k
    # commit only after every collective came back: a failure above changes nothing
    old = getattr(sync, "_flushed", None) or {}
    old_size = getattr(sync, "_flushed_size", size)
    pend = {}
    for n, s in summed.items():
        prev = old.get(n)
        if prev is not None:        # carry the earlier pending flush, in this world's units
            b = get_backend(s)
            s = s + b.from_numpy(np.asarray(get_backend(prev).to_numpy(prev)) * (size / old_size), s)
        pend[n] = s
    for n, prev in old.items():
        if n not in pend:
            pend[n] = prev * (size / old_size) if old_size != size else prev
    for n in names:
        st = dict(sync._mem[n])
        for k in keys:
            if st.get(k) is not None:
                st[k] = get_backend(st[k]).zeros_like(st[k])
        sync._mem[n] = st
    sync._flushed, sync._flushed_size = pend, size
    return summed


def handoff(sync, *, leaving: bool, n_stay: int, new_size: int, name: str = "elastic.handoff") -> dict:
    """The "keep" rule for a graceful change (ours; gradcomp_torch.pool's rule="keep"): the ranks
    that stay keep their residuals, the leaving ranks' residuals are handed to them, and every kept
    residual is rescaled by new_size / old_size (a residual e sent on a world of P ranks reaches the
    average as e / P, so e * P_new / P_old reaches it with the same mass as e did on the old world).

    Collective on the current (old) world when a rank leaves: ONE dense allreduce (one per working
    dtype and flush key) in which only the leaving ranks contribute; each staying rank then adds
    1 / n_stay of the sum to its own residual. With nobody leaving (an expand) nothing is
    communicated: each rank only rescales. Joining ranks start at zero. Unlike `flush`, the mass is
    not applied in one update: it goes through the compressor with the rest of the residual.
    Every rank of the old world must call it at the same step, with the same n_stay and new_size
    (`leaving` differs). Returns {name: the summed residual of the leaving ranks} (flat, unscaled
    gradient units; {} when nobody leaves)."""
    if sync._buckets:
        raise RuntimeError("elastic handoff while a step is in flight; call it after finish() / optimizer.step()")
    if n_stay < 1:
        raise ValueError(f"handoff needs at least one staying rank, got n_stay={n_stay}")
    keys = flush_keys(sync.memory)
    old_size = sync.comm.size
    names = [n for n in sync._shapes if any((sync._mem.get(n) or {}).get(k) is not None for k in keys)]
    stays = not leaving
    leavers = old_size - n_stay
    got = {}
    if leavers > 0 and old_size > 1:
        groups = {}
        for n in names:
            for k in keys:
                if (sync._mem[n]).get(k) is not None:
                    groups.setdefault((sync._work.get(n, "float32"), k), []).append(n)
        for (work, k), grp in sorted(groups.items()):
            parts = []
            for n in grp:
                v = sync._mem[n][k]
                b = get_backend(v)
                v = b.flatten(v)
                parts.append(b.copy(v) if leaving else b.zeros_like(v))
            b = get_backend(parts[0])
            flat = b.cat(parts) if len(parts) > 1 else parts[0]
            total = sync.comm.allreduce(flat, name=f"{name}.{work}.{k}").wait()
            off = 0
            for n, p in zip(grp, parts):
                c = b.numel(p)
                got.setdefault(n, {})[k] = b.copy(b.slice(total, off, off + c))
                off += c
    # commit only after every collective came back: a failure above changes nothing
    f = float(new_size) / float(old_size)
    out = {}
    for n in names:
        st = dict(sync._mem[n])
        scale = sync._scale.get(n, 1.0)
        for k in keys:
            v = st.get(k)
            if v is None:
                continue
            b = get_backend(v)
            add = (got.get(n) or {}).get(k)
            if add is not None:
                u = add * (1.0 / scale) if scale != 1.0 else add
                out[n] = u if n not in out else out[n] + u
            if not stays:
                st[k] = b.zeros_like(v)
                continue
            if add is not None:
                v = v + b.reshape(add, b.shape(v)) * (1.0 / n_stay)
            st[k] = v * f if f != 1.0 else v
        sync._mem[n] = st
    return out


def abandon(sync):
    """Forget a step in flight (started, not finished) after a failure: its collectives belonged to
    a world that is gone. Nothing of it was committed (GradientSync commits only in finish())."""
    for bk in sync._buckets:
        bk.handles = []
    sync._buckets = []


def zero_per_rank(sync):
    """Restart every per-rank state of `sync` at zero (replicated state kept): the failure rule."""
    sync.load_replicated_state_dict(sync.replicated_state_dict())


def rebind(sync, policy=None, comm=None):
    """Give `sync` (and `policy`, with its delta GradientSync) the communicator `comm`."""
    sync.comm = comm
    sync._donate = bool(getattr(comm, "accepts_donation", False))
    sync._checked = False
    if policy is not None:
        policy.comm = comm
        delta = getattr(policy, "_delta", None)
        if delta is not None:
            delta.comm = comm
            delta._donate = bool(getattr(comm, "accepts_donation", False))
            delta._checked = False
            zero_per_rank(delta)


def _copy_tree(x):
    if isinstance(x, dict):
        return {k: _copy_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_copy_tree(v) for v in x)
    if x is None or isinstance(x, (bool, int, float, str, np.generic)):
        return x
    try:
        return get_backend(x).copy(x)
    except Exception:   # noqa: BLE001 - not an array of a known backend: kept as is (immutable data)
        return x


class Elastic:
    """gradcomp's side of an elastic job: commit / restore / flush / resize for one GradientSync
    (and its sync policy). See the module docstring for the rules.

        el = Elastic(sync, policy, shapes=named_shapes, fingerprint=lambda: extra, on_resize=[cb])
        el.commit()                       # with the engine's commit (model, optimizer)
        ... graceful change announced:    el.flush(); el.commit()   # on the old world
        ... failure:                      el.restore()              # last commit, residuals zero
        el.resize(new_comm)               # fingerprint checked on the new world, callbacks run
    """

    def __init__(self, sync, policy=None, *, shapes=None, fingerprint=None, on_resize=()):
        self.sync, self.policy = sync, policy
        self.shapes, self.fingerprint = shapes, fingerprint
        self.on_resize = list(on_resize)
        self.commits = 0
        self._committed = None
        self.commit()

    def commit(self):
        """Keep a copy of the replicated state (step, shared state, a pending flush)."""
        rep = {"sync": _copy_tree(self.sync.replicated_state_dict())}
        if self.policy is not None:
            self.policy.flush()
            rep["policy"] = _copy_tree(self.policy.replicated_state_dict())
        self._committed = rep
        self.commits += 1

    @property
    def committed_step(self) -> int:
        return int(self._committed["sync"]["step"])

    def restore(self):
        """Failure rule: back to the last commit's replicated state; per-rank state restarts at zero."""
        rep = _copy_tree(self._committed)
        abandon(self.sync)
        self.sync.load_replicated_state_dict(rep["sync"])
        if self.policy is not None and "policy" in rep:
            self.policy.load_replicated_state_dict(rep["policy"])

    def flush(self) -> dict:
        """Graceful rule (collective on the old world): see `flush`."""
        return flush(self.sync)

    def resize(self, comm):
        """Move onto `comm` (the new world): rebind, check the fingerprint there, run on_resize(size)."""
        rebind(self.sync, self.policy, comm)
        extra = self.fingerprint() if callable(self.fingerprint) else self.fingerprint
        shapes = self.shapes() if callable(self.shapes) else (self.shapes or self.sync._shapes)
        self.sync.check({k: list(v) for k, v in shapes.items()}, extra)
        for cb in self.on_resize:
            cb(comm.size)
