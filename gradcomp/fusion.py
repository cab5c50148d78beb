"""Fused buckets: the tensors of one `GradientSync.start()` compressed as one flat buffer.

A step should cost a handful of kernels per bucket, not tens per tensor. When the compressor
declares `fusion` (gradcomp/compressors/base.py) and the memory declares `fusable`, `start()`
concatenates the bucket's gradients of one working dtype into one flat buffer and runs memory
and compressor once on it, with

    ctx.name     = bucket_key(names)   (the same on every rank: buckets are built identically)
    ctx.segments = the members' sizes  (for methods with per-tensor scales)

State stays keyed by parameter name: after a step, every name's memory and compressor state
arrays are views into the bucket's flat state arrays, so `state_dict()` (which copies views out),
checkpoints and elastic resets are unchanged. The next step finds the views still in place and
reuses the flat arrays without a copy; after `load_state_dict()` or a change of the bucket's
membership the flat arrays are rebuilt from the per-name ones (one concatenation).

`GradientSync(fuse=...)`: "auto" (default) fuses except, on a CPU, the one-kernel casts (`none`,
`fp16`, `bf16`) and the methods whose `cpu_fusion` is False (the sign family, onebit, natural, qsgd,
terngrad: measured faster per tensor on an idle CPU, docs/benchmarks.md part 1), where concatenating
costs more than the per-tensor kernels it saves (their collectives are fused per bucket anyway); True
fuses wherever the compressor allows; False never.
Inside a traced TF graph (gradcomp_tf) the per-name state variables are concatenated and split
by graph ops each execution. Multi-round compressors (PowerSGD) stay per tensor.
"""
from __future__ import annotations

import hashlib

from gradcomp.compressors.base import Ctx

FUSING_BACKENDS = ("numpy", "torch", "tensorflow")


def bucket_key(names) -> str:
    """The fused bucket's name for randomness and caches: a hash of its members' names in order."""
    h = hashlib.blake2b("\0".join(names).encode(), digest_size=8).hexdigest()
    return f"bucket/{len(names)}/{h}"


def wanted(sync, entries) -> bool:
    comp, fuse = sync.compressor, sync.fuse
    if fuse is False or comp.fusion is None or comp.rounds != 1 or not getattr(sync.memory, "fusable", False):
        return False
    for owner in (sync.memory, comp):      # momentum adopted per parameter (gradcomp/momentum.py)
        if any(k is not None for k in owner.__dict__.get("_adopted", {})):
            return False
    live = [e for e in entries if e.numel_ok]
    if len(live) < 2:
        return False
    b = live[0].ctx.backend
    if b.name not in FUSING_BACKENDS:
        return False
    if fuse == "auto" and (comp.elementwise_cheap or not comp.cpu_fusion) and b.on_host(live[0].g):
        return False
    return True


def groups(sync, entries) -> list:
    """Entries in order, as groups: one group per (backend, device, dtype) of fusable tensors, and
    every other entry (empty tensors; everything when fusion is off) alone."""
    if not wanted(sync, entries):
        return [[e] for e in entries]
    out, by_key = [], {}
    for e in entries:
        if not e.numel_ok:
            out.append([e])
            continue
        key = (e.ctx.backend.name, e.ctx.backend.device(e.g), e.dtype)
        if key not in by_key:
            by_key[key] = []
            out.append(by_key[key])
        by_key[key].append(e)
    return out


def fused_entry(sync, members):
    """One entry for the group: the concatenated gradients and a bucket-wide Ctx."""
    b, c0 = members[0].ctx.backend, members[0].ctx
    sizes = tuple(m.ctx.numel for m in members)
    n, work, dtype = sum(sizes), members[0].work, members[0].dtype
    key = bucket_key([m.name for m in members])
    ctx = Ctx(b, key, (n,), dtype, n, c0.step, c0.seed, c0.rank, c0.size, loss_scale=c0.loss_scale,
              segments=sizes, members=tuple(m.name for m in members))
    e = type(members[0])(key, (n,), dtype, ctx, g=b.cat([m.g for m in members]))
    e.numel_ok, e.orig, e.work, e.members = True, e.g, work, members
    return e


def split_output(e, avg) -> dict:
    """The fused average as {name: view reshaped and cast to the member's own shape/dtype}."""
    b, out, off = e.ctx.backend, {}, 0
    for m in e.members:
        n = m.ctx.numel
        out[m.name] = b.reshape(b.cast(b.slice(avg, off, off + n), m.dtype), m.shape)
        off += n
    return out


class FusedState:
    """Flat per-bucket state arrays and the per-name views handed out from them."""

    def __init__(self):
        self.flat = {}        # (kind, bucket key) -> (flat state dict, {name: per-name view dict})

    def flat_states(self, e, mem_store, cst_store):
        return self._flat("memory", e, mem_store), self._flat("compressor", e, cst_store)

    def _flat(self, kind, e, store):
        names = [m.name for m in e.members]
        cached = self.flat.get((kind, e.name))
        if cached is not None and all(store[n] is cached[1].get(n) for n in names):
            return cached[0]
        b, first, out = e.ctx.backend, store[names[0]], {}
        for k in first:
            vals = [store[n].get(k) for n in names]
            ok = all(v is not None and not isinstance(v, (int, float, bool)) and b.numel(v) == m.ctx.numel
                     for v, m in zip(vals, e.members))
            if not ok:
                raise RuntimeError(f"{kind} state {k!r} is not one value per gradient entry, so a bucket "
                                   "cannot be fused; construct GradientSync(fuse=False) (and report it: the "
                                   "method should not declare fusion)")
            out[k] = b.cat([b.flatten(v) for v in vals])
        return out

    def commit(self, e, mem, cst, mem_store, cst_store, keep=()):
        """Hand out the new flat state as per-name views; names in `keep` (no rank had a gradient
        for them) keep their old state, and the flat arrays are rebuilt next step."""
        for kind, flat, store in (("memory", mem, mem_store), ("compressor", cst, cst_store)):
            b, views, off = e.ctx.backend, {}, 0
            for m in e.members:
                n = m.ctx.numel
                views[m.name] = {k: b.slice(v, off, off + n) for k, v in flat.items()}
                off += n
            store.update({k: v for k, v in views.items() if k not in keep})
            if not b.traced():             # graph tensors (gradcomp_tf) are not reused across traces
                self.flat[(kind, e.name)] = (flat, views)
