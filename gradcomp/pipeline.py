"""GradientSync: one training step of compressed gradient averaging, as data.

    grad -> memory.compensate -> compressor.compress -> fused collective(s) -> decode/aggregate
         -> memory.update -> averaged gradient

`start()` compresses a group of named gradients and issues their collectives asynchronously
(call it once per bucket while backward is still running); `finish()` waits, runs the later
rounds of multi-round compressors, decodes, and only then commits every residual and counter.
Summable payloads go through one allreduce per dtype and bucket; the others through one
allgather per bucket, or, for a compressor with its own exchange (`exchanges`: gtopk's tree merge),
through its `exchange(comm, entries, tag)`. Where the compressor allows it, a bucket's tensors are compressed as one
flat buffer (gradcomp/fusion.py; `fuse=`), with state still keyed by parameter name. If any
rank saw a non-finite gradient, every rank raises
NonFiniteGradientError from `finish()` and no state changes: the step can be skipped or retried.

Missing gradients: `start(..., absent=names)` says this rank has no gradient for `names` (it
passes zeros in their place, so every rank issues the same collectives). Every rank learns, with
the non-finite flag, on how many ranks each tensor had a gradient: a tensor no rank had comes back
as None and its state is left untouched (a frozen or unused parameter is skipped, as in torch);
a tensor some rank had is averaged with zeros for the ranks without (Horovod's rule), so the
ranks stay identical.

Loss scaling: `start(..., loss_scale=S)` says the gradients arrive multiplied by S (GradScaler).
The state the memory and compressor declare in gradient units (`gradient_state`, gradcomp/state.py)
is kept in the units of the scale it was last used with and rescaled by S_new / S_old when the
scale changes, so a residual keeps its meaning across scale changes while the payloads stay in
loss-scaled units (fp16 compression keeps the range loss scaling buys).

No finite input gives a non-finite update: finish() also checks the decoded averages (in the
gradient's own dtype) and raises NonFiniteGradientError, committing nothing, when finite inputs
produced NaN/Inf: a payload that overflowed its wire dtype (fp16 beyond +-65504), the sum of
several ranks' payloads overflowing (two fp16 4e4 sum to inf), or an average beyond a float16
gradient's range. We check rather than saturate (clamp to the dtype's maximum): saturating
would silently clip the update, and a torch GradScaler could no longer see the overflow and
lower its scale (it does when the averaged gradients come back as inf/NaN). Collective results
are identical on every rank, so every rank reaches the same decision without another message.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradcomp import fusion, registry, traffic
from gradcomp.timing import PhaseTimer, now
from gradcomp.backend import get_backend
from gradcomp.comm.base import check_consistent
from gradcomp.comm.single import SingleCommunicator
from gradcomp.compressors.base import Ctx
from gradcomp.config import resolve_memory
from gradcomp.state import split
from gradcomp.finite import local_nonfinite
from gradcomp.params import check_seed


class NonFiniteGradientError(FloatingPointError):
    """Some rank produced NaN/Inf gradients; raised on every rank, state untouched."""


class PayloadOverflowError(NonFiniteGradientError):
    """Finite gradients gave a non-finite average (the compressor's payload or its sum over ranks
    overflowed); raised on every rank, state untouched."""


@dataclass
class _Entry:
    name: str
    shape: tuple
    dtype: str
    ctx: Ctx
    g: object = None
    x: object = None
    payload: list = None
    info: object = None
    round: int = 0
    reduced: list = None
    gathered: list = None
    sent_bytes: int = 0


@dataclass
class _Bucket:
    entries: list
    handles: list = field(default_factory=list)   # (kind, handle, layout)
    flag: object = None
    presence: bool = False                        # flag carries, after the count, a has-gradient flag per tensor
    names: list = None                            # the tensors' names in the order of the presence flags
    meta: int = 0                                 # header bytes, counted only once the step commits


def _payload_list(payload):
    if not isinstance(payload, (list, tuple)):
        raise TypeError("a compressor must return its payload as a list of 1-D arrays")
    return list(payload)


class GradientSync:
    """Compressed gradient averaging for named gradients on one rank of `comm`."""

    def __init__(self, compressor="none", memory="auto", comm=None, seed: int = 0, *,
                 check_finite: bool = True, check_config: bool = True, fuse="auto"):
        self.compressor = registry.create(compressor, "compressor")
        self.memory = resolve_memory(memory, self.compressor)
        self._dense = registry.create("none", "compressor")   # small tensors (`dense_below`, see compressor_for)
        self.comm = comm if comm is not None else SingleCommunicator()
        self.seed = check_seed(seed)
        self.check_finite, self.check_config = check_finite, check_config
        self._mem, self._cst, self._shapes, self._work = {}, {}, {}, {}
        self._scale, self._adopt_rep = {}, {}     # loss scale of each tensor's state; replicated state to adopt
        self._flushed, self._flushed_size = {}, 1   # residual sums of an elastic flush (gradcomp/elastic.py)
        self._step = 0
        self._stats = traffic.new_counters()     # plain numbers: they checkpoint (gradcomp/traffic.py)
        self._union_pending = []                 # union sizes still on the device (read when reported)
        self.timer = PhaseTimer()                # host time per phase (gradcomp/timing.py)
        self._buckets: list[_Bucket] = []
        self._checked = False
        if fuse not in ("auto", True, False):
            raise ValueError(f"fuse must be 'auto', True or False, got {fuse!r}")
        self.fuse = fuse                          # gradcomp/fusion.py
        self._fused = fusion.FusedState()
        # A transport that accepts donation also hands back private results (comm/base.py), so a
        # decoded average that is a view of one (`none`) is scaled in place: no copy of the gradients.
        self._donate = bool(getattr(self.comm, "accepts_donation", False))

    # ------------------------------------------------------------------ configuration
    def fingerprint(self, named_shapes: dict) -> dict:
        """What every rank must agree on: configuration, tensor names and shapes, and their order
        (`order`: the collectives fuse tensors by position, so a permuted model would average
        different layers together)."""
        return {"compressor": self.compressor.spec(), "memory": self.memory.spec(), "seed": self.seed,
                "tensors": {k: list(v) for k, v in named_shapes.items()}, "order": list(named_shapes)}

    def check(self, named_shapes: dict, extra: dict | None = None):
        """Compare configuration and tensor names/shapes across ranks (ConfigMismatchError on all)."""
        cfg = self.fingerprint(named_shapes)
        if extra:
            cfg.update(extra)
        check_consistent(self.comm, cfg)
        self._checked = True

    # ------------------------------------------------------------------ the step
    def step(self, named_grads: dict) -> dict:
        self.start(named_grads)
        return self.finish()

    def start(self, named_grads: dict, *, donate: bool = False, weight: float = 1.0, absent=None,
              loss_scale: float | None = None):
        """Compress `named_grads` and issue their collectives; returns immediately.

        donate=True gives the gradient arrays away: a payload that is the gradient itself (`none`
        without error feedback) is then summed and averaged in place, and finish() returns views of
        the gradients holding the averages (on any error they hold unspecified values). Without it
        the gradients are never modified.

        weight scales this rank's gradients before error feedback and compression, exactly as if the
        caller had passed weight * g: with w_r = P * n_r / N the average is the mean weighted by the
        n_r samples each rank processed (gradcomp.balance). absent: names this rank has no gradient
        for (zeros passed in their place); every rank must pass it or none must (see the module
        docstring). loss_scale: the factor the gradients carry (GradScaler's scale; None = 1)."""
        t_start = now()
        if not isinstance(named_grads, dict):
            raise TypeError("GradientSync expects a dict {name: gradient array}")
        weight = _check_weight(weight)
        if not self._checked and self.check_config:
            self.check({k: get_backend(v).shape(v) for k, v in named_grads.items()})
        scale = 1.0 if loss_scale is None else float(loss_scale)
        if not (scale > 0 and scale != float("inf")):
            raise ValueError(f"loss_scale must be a positive finite number, got {loss_scale!r}")
        admitted = [self._admit(name, g, donate, scale, weight) for name, g in named_grads.items()]
        bad = None
        if self.check_finite and admitted:  # before compressing: the memory may overwrite a private g
            bad = admitted[0].ctx.backend.count_nonfinite_all([e.g for e in admitted])
        small = [e for e in admitted if e.comp is self._dense]
        entries = [self._compress(e, donate) for e in small] + \
            [self._fuse(grp) if len(grp) > 1 else self._compress(grp[0], donate)
             for grp in fusion.groups(self, [e for e in admitted if e.comp is not self._dense])]
        bucket = _Bucket(entries, names=[e.name for e in admitted])
        if (self.check_finite or absent is not None) and entries:
            b = entries[0].ctx.backend
            flag = b.reshape(b.cast(bad, "float32"), (1,)) if self.check_finite else \
                b.from_numpy(np.zeros(1, np.float32), entries[0].g)
            if absent is not None:
                absent = set(absent)
                here = np.array([e.name not in absent for e in admitted], dtype=np.float32)
                flag = b.cat([flag, b.from_numpy(here, entries[0].g)])
                bucket.presence = True
            bucket.flag = self.comm.allreduce(flag, name="nonfinite")
        self._launch(bucket, [e for e in entries if e.numel_ok])
        self._buckets.append(bucket)
        self.timer.add("start", now() - t_start)

    def _admit(self, name, g, donate=False, scale=1.0, weight=1.0):
        """Check one gradient and flatten it into its working dtype (an _Entry, nothing compressed)."""
        b = get_backend(g)
        shape, dtype = tuple(b.shape(g)), b.dtype(g)
        if not b.is_floating(g):
            raise TypeError(unsupported_dtype("gradient", name, dtype))
        if name in self._shapes and self._shapes[name] != shape:
            raise ValueError(f"gradient {name!r} changed shape from {self._shapes[name]} to {shape}; "
                             "a tensor's shape must stay fixed (reset() after changing the model)")
        work = "float64" if dtype == "float64" else "float32"     # the dtype state and payloads use
        if self._work.get(name, work) != work:
            raise ValueError(f"gradient {name!r} changed dtype to {dtype} after being averaged in "
                             f"{self._work[name]}; float64 gradients are processed in float64, all others "
                             "in float32, and a tensor cannot move between the two (reset() after changing "
                             "the model's precision)")
        n = b.numel(g)
        ctx = Ctx(b, name, shape, dtype, n, self._step, self.seed, self.comm.rank, self.comm.size,
                  loss_scale=scale)
        flat = b.flatten(g)
        flat = b.cast(flat, work)
        if weight != 1.0:               # in the working precision; in place only on what may be written
            flat = b.scale_(flat, weight) if donate or not b.shares_memory(flat, g) else flat * weight
        e = _Entry(name, shape, dtype, ctx, g=flat)
        e.numel_ok, e.orig, e.work, e.members = n > 0, g, work, None
        e.comp = self.compressor_for(n)
        if e.comp is self._dense:
            ctx.memo["dense"] = True    # a momentum-correcting memory keeps this tensor's momentum unmasked
        return e

    def compressor_for(self, numel: int):
        """The compressor a tensor of `numel` entries goes through: the configured one, or `none` for
        the tensors below its `dense_below` (compressors/base.py; they join the step's dense allreduce,
        with the configured memory)."""
        return self._dense if numel < self.compressor.dense_below else self.compressor

    def _init_state(self, e):
        """Create (first sight), adopt (restored elsewhere) and rescale (new loss scale) e's state."""
        name, b, ctx, flat, scale = e.name, e.ctx.backend, e.ctx, e.g, e.ctx.loss_scale
        if name not in self._mem:
            self._shapes[name], self._work[name] = e.shape, e.work
            self._mem[name] = self.memory.init_state(flat, ctx)
            self._cst[name] = e.comp.init_state(flat, ctx)
            rep = self._adopt_rep.pop(name, None)         # replicated state from load_replicated_state_dict
            if rep is not None:
                self._mem[name] = _adopt(dict(self._mem[name], **rep[0]), flat, b)
                self._cst[name] = _adopt(dict(self._cst[name], **rep[1]), flat, b)
            else:
                self._scale[name] = scale
        else:
            self._mem[name] = _adopt(self._mem[name], flat, b)
            self._cst[name] = _adopt(self._cst[name], flat, b)
        old = self._scale.get(name, 1.0)
        if old != scale:                # same meaning in the new units (exact for powers of two)
            self._mem[name] = _rescale(self.memory, self._mem[name], scale / old)
            self._cst[name] = _rescale(e.comp, self._cst[name], scale / old)
            self._scale[name] = scale

    def _compress(self, e, donate=False):
        """Compensate and compress one tensor with its own state."""
        if not e.numel_ok:
            return e
        self._init_state(e)
        copy = not e.ctx.backend.shares_memory(e.g, e.orig)
        return self._encode(e, self._mem[e.name], self._cst[e.name], donate or copy, copy)

    def _fuse(self, members):
        """Compensate and compress a group of tensors as one flat buffer (gradcomp/fusion.py)."""
        for m in members:
            self._init_state(m)
        e = fusion.fused_entry(self, members)
        e.comp = self.compressor
        mem, cst = self._fused.flat_states(e, self._mem, self._cst)
        return self._encode(e, mem, cst, True, True)  # the flat buffer is a private copy

    def _encode(self, e, mem_state, cst_state, private, own=False):
        b, ctx = e.ctx.backend, e.ctx
        e.mem_state, e.cst_state = mem_state, cst_state
        # A copy of our own (never the caller's donated array, which receives the average later):
        # compensate may reuse its buffer, and the state may keep it.
        ctx.memo["g_writable"] = own
        t0 = now()
        e.x = self.memory.compensate(e.g, mem_state, ctx)
        t1 = now()
        self.timer.add("compensate", t1 - t0)
        try:
            payload, e.info = e.comp.compress(e.x, cst_state, ctx)
        except Exception:
            # A compressor may choke on NaN/Inf (QR, log, int casts). Keep this rank's collectives in
            # step with its peers by sending the compression of zeros; finish() then raises
            # NonFiniteGradientError on every rank and commits nothing.
            if not self.check_finite or not b.item(b.count_nonfinite(e.x)):
                raise
            payload, e.info = e.comp.compress(b.zeros_like(e.x), cst_state, ctx)
        e.payload = _payload_list(payload)
        self.timer.add("compress", now() - t1)
        e.sent_bytes = sum(b.nbytes(p) for p in e.payload)
        # May the transport sum a payload that is the (flattened) gradient in place? Only if nothing
        # reads the gradient afterwards and it is ours: donated by the caller, or a private cast copy.
        e.give = self._donate and e.comp.rounds == 1 and not self.memory.reads_inputs and \
            not self.memory.needs_local_decode and private
        return e

    def _launch(self, bucket, entries):
        """Issue the fused collectives for the current round of `entries`: the small tensors' dense
        allreduce (compressor_for), then the configured compressor's collectives."""
        small = [e for e in entries if e.comp is self._dense]
        if small:
            self._launch_with(bucket, small, self._dense, ".dense")
        if len(small) < len(entries):
            self._launch_with(bucket, [e for e in entries if e.comp is not self._dense], self.compressor, "")

    def _launch_with(self, bucket, entries, comp, sub):
        b = entries[0].ctx.backend
        tag = f"step{self._step}.r{entries[0].round}{sub}"
        if comp.summable:
            groups: dict[str, list] = {}
            for e in entries:
                for i, p in enumerate(e.payload):
                    groups.setdefault(b.dtype(p), []).append((e, i, p))
            for dt, items in groups.items():
                parts = [b.flatten(p) for _, _, p in items]
                give = [e.give and b.shares_memory(p, e.g) for (e, _, _), p in zip(items, parts)]
                h = self.comm.allreduce_group(parts, name=f"{tag}.{dt}", donate=give)
                bucket.handles.append(("allreduce", h, [(e, i, b.numel(p)) for e, i, p in items]))
        elif getattr(comp, "exchanges", False):     # its own algorithm (gtopk's tree merge)
            h = comp.exchange(self.comm, [(e.payload, e.info, e.ctx) for e in entries], f"{tag}.tree")
            bucket.handles.append(("exchange", h, entries))
        else:
            arrays = [(e, i, p) for e in entries for i, p in enumerate(e.payload)]
            parts = [b.to_bytes(p) for _, _, p in arrays]
            if comp.variable_size:
                header = np.array([b.nbytes(p) for _, _, p in arrays], dtype=np.int64)
                parts.insert(0, b.from_numpy(header.view(np.uint8), parts[0]))
                bucket.meta += header.nbytes
            fused = b.cat(parts) if len(parts) > 1 else parts[0]
            h = self.comm.allgather(fused, name=f"{tag}.gather")
            bucket.handles.append(("allgather", h, [(e, i, b.dtype(p), b.nbytes(p)) for e, i, p in arrays]))

    def _collect(self, bucket):
        """Wait for the bucket's collectives and hand each entry its reduced or gathered payload."""
        for kind, h, layout in bucket.handles:
            t0 = now()
            res = h.wait()
            self.timer.add("wait", now() - t0)
            if kind == "exchange":
                for e, part in zip(layout, res):
                    e.gathered = part
            elif kind == "allreduce":
                for (e, i, _), part in zip(layout, res):
                    if e.reduced is None:
                        e.reduced = [None] * len(e.payload)
                    e.reduced[i] = part
            else:
                b = layout[0][0].ctx.backend
                for e, *_ in layout:
                    e.gathered = [[None] * len(e.payload) for _ in res]
                for r, buf in enumerate(res):
                    if self.compressor.variable_size:
                        k = len(layout)
                        sizes = np.frombuffer(b.to_numpy(b.slice(buf, 0, 8 * k)).tobytes(), dtype=np.int64)
                        off = 8 * k
                    else:
                        sizes, off = [nb for *_, nb in layout], 0
                    for (e, i, dt, _), nb in zip(layout, sizes):
                        nb = int(nb)
                        e.gathered[r][i] = b.from_bytes(b.slice(buf, off, off + nb), dt, (-1,))
                        off += nb
        bucket.handles = []

    def finish(self) -> dict:
        """Wait for every started bucket, decode, commit state; returns {name: averaged gradient}."""
        t_finish = now()
        buckets, self._buckets = self._buckets, []
        comp = self.compressor
        try:
            for bk in buckets:
                self._collect(bk)
            bad, nobody = 0.0, set()
            flagged = [bk for bk in buckets if bk.flag is not None]
            if flagged:                     # one host read per step, not one per bucket
                res = [bk.flag.wait() for bk in flagged]
                rb = get_backend(res[0])
                allr = np.asarray(rb.to_numpy(rb.cat(res) if len(res) > 1 else res[0]), dtype=np.float64)
                off = 0
                for bk, r in zip(flagged, res):
                    r, off = allr[off:off + rb.numel(r)], off + rb.numel(r)
                    bad += float(r[0])
                    if bk.presence:
                        nobody.update(n for n, c in zip(bk.names, r[1:]) if c < 0.5)
            if bad:
                raise NonFiniteGradientError(
                    f"step {self._step}: {int(bad)} non-finite gradient value(s) across ranks; no state was "
                    "changed. Lower the learning rate, use loss scaling, or skip this batch and call again.")
            live = [e for bk in buckets for e in bk.entries if e.numel_ok]
            skipped = [e for e in live if e.name in nobody]
            meta = sum(bk.meta for bk in buckets)
            for rnd in range(1, comp.rounds):
                pending = _Bucket([])
                for e in (live := [e for e in live if e.comp.rounds > rnd]):
                    e.payload, e.info = comp.next_round(e.reduced, e.info, e.cst_state, e.ctx)
                    e.payload = _payload_list(e.payload)
                    e.sent_bytes += sum(e.ctx.backend.nbytes(p) for p in e.payload)
                    e.round, e.reduced = rnd, None
                self._launch(pending, live)
                self._collect(pending)
                meta += pending.meta
            out, commits = {}, []
            for bk in buckets:
                for e in bk.entries:
                    b = e.ctx.backend
                    if e.name in nobody:        # no rank had a gradient: skipped, state untouched
                        out[e.name] = None
                        continue
                    if not e.numel_ok:
                        out[e.name] = b.reshape(b.cast(e.g, e.dtype), e.shape)
                        continue
                    comp = e.comp
                    t0 = now()
                    if comp.summable:
                        avg = comp.decompress(e.reduced, e.info, e.ctx)
                        if e.ctx.size > 1:
                            view = any(b.shares_memory(avg, r) for r in e.reduced or ())
                            mine = self._donate if view else comp.decodes_fresh
                            avg = b.scale_(avg, 1.0 / e.ctx.size) if mine else avg * (1.0 / e.ctx.size)
                    else:
                        avg = comp.aggregate(e.gathered, e.info, e.ctx)
                    local = None
                    if self.memory.needs_local_decode:
                        own = comp.sent_indices(e.x, e.ctx) if self.memory.masks_sent else None
                        if own is None:
                            local = comp.decompress(e.payload, e.info, e.ctx)
                        else:           # D(C(x)) = x at `own`, 0 elsewhere: the memory zeroes them in x
                            e.ctx.memo["own_decode_idx"] = own
                    t1 = now()
                    mem = self.memory.update(e.g, e.x, local, avg, e.mem_state, e.ctx)
                    avg = self.memory.output(avg, mem, e.ctx)
                    self.timer.add("decode", t1 - t0)
                    self.timer.add("update", now() - t1)
                    commits.append((e, mem, comp.new_state(e.info, e.cst_state, e.ctx)))
                    if e.members is None:
                        out[e.name] = b.reshape(b.cast(avg, e.dtype), e.shape)
                    else:                       # a member no rank had: None, its state untouched
                        out.update({k: None if k in nobody else v for k, v in fusion.split_output(e, avg).items()})
            flushed = self._add_flushed(out) if self._flushed else ()
            if self.check_finite and not (self.compressor.lossless and self.comm.size == 1 and not flushed):
                self._check_outputs(out)        # else: the checked input
        except BaseException:
            for bk in buckets:
                bk.handles = []
            raise
        self._stats["bytes_meta"] += meta
        for e in skipped:                   # sent, though nobody had a gradient: the traffic counts
            traffic.account(self._stats, e.comp, e, self._union_pending)
        for e, mem, cst in commits:
            if e.members is None:
                self._mem[e.name], self._cst[e.name] = mem, cst
            else:
                self._fused.commit(e, mem, cst, self._mem, self._cst, keep=nobody)
            traffic.account(self._stats, e.comp, e, self._union_pending)
        for n in flushed:
            self._flushed.pop(n, None)
        self._step += 1
        self.timer.steps += 1
        self.timer.add("finish", now() - t_finish)
        return out

    def _add_flushed(self, out) -> list:
        """Add a pending elastic flush (gradcomp/elastic.py) to the averages: sum / P_old, in the
        step's loss-scaled units. Returns the names it was added to (cleared once the step commits)."""
        done = []
        for n, s in self._flushed.items():
            avg = out.get(n)
            if avg is None:
                continue
            b = get_backend(avg)
            f = _adopt({"f": s}, avg, b)["f"]
            f = f * (self._scale.get(n, 1.0) / self._flushed_size)
            out[n] = avg + b.reshape(b.cast(f, b.dtype(avg)), b.shape(avg))
            done.append(n)
        return done

    def _check_outputs(self, out):
        """NonFiniteGradientError if finite inputs gave non-finite averages (see the module docstring)."""
        bad = sum(b.item(c) for b, c in local_nonfinite(out.values()))
        if bad:
            raise PayloadOverflowError(overflow_message(self._step, int(bad), self.compressor.spec(),
                                                          self.comm.size))

    # ------------------------------------------------------------------ bookkeeping
    @property
    def steps(self) -> int:
        return self._step

    def stats(self) -> dict:
        """Bytes sent/received, per-rank wire traffic under the collective used, ratio against dense
        allreduce at this number of ranks, union size U/k of sparsifiers: see gradcomp/traffic.py."""
        traffic.flush(self._stats, self._union_pending)
        return traffic.report(self._stats, self.comm.size, self._step)

    def residual(self, name):
        """This rank's error-feedback residual for `name` (None if the memory keeps none)."""
        st = self._mem.get(name, {})
        return st.get("residual")

    def state_dict(self) -> dict:
        traffic.flush(self._stats, self._union_pending)
        return {"version": 1, "step": self._step, "seed": self.seed, "compressor": self.compressor.spec(),
                "memory": self.memory.spec(), "rank": self.comm.rank, "stats": dict(self._stats),
                "shapes": {k: list(v) for k, v in self._shapes.items()}, "work_dtypes": dict(self._work),
                "memory_state": {k: _compact(v) for k, v in self._mem.items()},
                "compressor_state": {k: _compact(v) for k, v in self._cst.items()},
                "loss_scale": dict(self._scale), **self._flushed_state()}

    def _flushed_state(self) -> dict:
        if not self._flushed:
            return {}
        return {"flushed": {k: _compact({"f": v})["f"] for k, v in self._flushed.items()},
                "flushed_size": self._flushed_size}

    def _load_flushed(self, sd):
        self._flushed = dict(sd.get("flushed", {}))
        self._flushed_size = int(sd.get("flushed_size", 1))

    def set_state_scale(self, loss_scale: float):
        """Declare that the gradient-unit state held so far is in units of `loss_scale` (nothing is
        rescaled now; the next start(loss_scale=) rescales from there). For an adapter that learns
        the scale only after the first scaled step."""
        scale = float(loss_scale)
        if not (scale > 0 and scale != float("inf")):
            raise ValueError(f"loss_scale must be a positive finite number, got {loss_scale!r}")
        self._scale = {n: scale for n in set(self._scale) | set(self._mem)}

    def replicated_state_dict(self) -> dict:
        """Only the replicated state (gradcomp/state.py): step, seed, configuration, tensor shapes and
        the per-tensor keys the memory and compressor declare replicated (GMC's global momentum,
        PowerSGD's Q). Identical on every rank; what a broadcast from one rank may carry."""
        sd = self.state_dict()
        sd["memory_state"] = {k: _compact(split(self.memory, v)[0]) for k, v in self._mem.items()}
        sd["compressor_state"] = {k: _compact(split(self.compressor, v)[0]) for k, v in self._cst.items()}
        sd.pop("stats"), sd.pop("rank")
        sd["replicated_only"] = True
        return sd

    def load_replicated_state_dict(self, sd: dict):
        """Adopt another rank's replicated_state_dict(); this rank's per-rank state (residuals, local
        momentum) restarts at zero: per-rank state is never taken from a peer. Validates first
        (ValueError, nothing changed)."""
        self._check_config(sd)
        shapes = {k: tuple(v) for k, v in sd.get("shapes", {}).items()}
        for name, shape in shapes.items():
            if name in self._shapes and self._shapes[name] != shape:
                raise ValueError(f"the replicated state has {name!r} of shape {shape}, this rank {self._shapes[name]}")
        mem, cst, pending = {}, {}, {}
        for name in shapes:
            rep = (dict(sd.get("memory_state", {}).get(name, {})), dict(sd.get("compressor_state", {}).get(name, {})))
            like = _any_array(self._mem.get(name, {}), self._cst.get(name, {}))
            if like is None:                 # no state here yet: adopted on first sight (_prepare)
                pending[name] = rep
                continue
            b = get_backend(like)
            mem[name] = _adopt(dict({k: _zero(v) for k, v in self._mem[name].items()}, **rep[0]), like, b)
            cst[name] = _adopt(dict({k: _zero(v) for k, v in self._cst[name].items()}, **rep[1]), like, b)
        self._step = int(sd["step"])
        self._shapes = shapes
        self._work = dict(sd.get("work_dtypes", {}))
        self._scale = {k: float(v) for k, v in sd.get("loss_scale", {}).items()}
        self._mem, self._cst, self._adopt_rep = mem, cst, pending
        self._load_flushed(sd)

    def _check_config(self, sd):
        if not isinstance(sd, dict) or "step" not in sd:
            raise ValueError("not a GradientSync state_dict (no 'step'); pass what state_dict() returned")
        for key in ("compressor", "memory"):
            mine = getattr(self, key).spec()
            if sd.get(key) != mine:
                raise ValueError(f"checkpoint was saved with {key} {sd.get(key)!r} but this run uses {mine!r}; "
                                 "restore with the same configuration")
        if int(sd.get("seed", self.seed)) != self.seed:
            raise ValueError(f"checkpoint seed {sd.get('seed')} differs from this run's seed {self.seed}")

    def load_state_dict(self, sd: dict):
        self._check_config(sd)
        if sd.get("replicated_only"):
            raise ValueError("this is a replicated_state_dict() (no per-rank residuals): restore it with "
                             "load_replicated_state_dict()")
        self._step = int(sd["step"])
        self._stats = {k: v if isinstance(v, float) else int(v) for k, v in sd.get("stats", {}).items()} or self._stats
        self._union_pending = []
        self._shapes = {k: tuple(v) for k, v in sd.get("shapes", {}).items()}
        self._work = dict(sd.get("work_dtypes", {}))
        self._mem = {k: dict(v) for k, v in sd.get("memory_state", {}).items()}
        self._cst = {k: dict(v) for k, v in sd.get("compressor_state", {}).items()}
        self._scale = {k: float(v) for k, v in sd.get("loss_scale", {}).items()}
        self._adopt_rep = {}
        self._load_flushed(sd)
        self._fused = fusion.FusedState()

    def reset(self):
        """Forget all residuals and per-tensor state (e.g. after the model or world changed)."""
        self._mem, self._cst, self._shapes, self._work, self._buckets = {}, {}, {}, {}, []
        self._scale, self._adopt_rep = {}, {}
        self._flushed, self._flushed_size = {}, 1
        self._checked = False
        self._fused = fusion.FusedState()


def _compact(state: dict) -> dict:
    """A copy of a state dict whose arrays own their memory (fused buckets hand out views)."""
    return {k: v if v is None or isinstance(v, (int, float)) else get_backend(v).compact(v)
            for k, v in state.items()}


def _check_weight(weight) -> float:
    w = float(weight)
    if not w >= 0.0 or w == float("inf"):
        raise ValueError(f"gradient weight must be a finite number >= 0, got {weight!r}")
    return w


def _any_array(*states):
    for st in states:
        for v in st.values():
            if v is not None and not isinstance(v, (int, float, bool)):
                return v
    return None


def _zero(v):
    """A per-rank state entry restarted: zeros of its shape (numbers become 0)."""
    if v is None or isinstance(v, (int, float, bool)):
        return type(v)(0) if v is not None else None
    return get_backend(v).zeros_like(v)


def _rescale(component, state: dict, factor: float) -> dict:
    """`state` with the keys `component` declares in gradient units multiplied by `factor`."""
    keys = [k for k in getattr(component, "gradient_state", ()) if state.get(k) is not None]
    if not keys:
        return state
    out = dict(state)
    for k in keys:
        out[k] = state[k] * factor
    return out


def unsupported_dtype(what: str, name: str, dtype: str) -> str:
    """The error for a tensor gradcomp cannot average (integer, bool, complex)."""
    msg = f"{what} {name!r} has dtype {dtype}; gradcomp averages real floating-point tensors"
    if "complex" in dtype:
        msg += (" (complex gradients are not supported: keep the parameter as a real tensor with a trailing "
                "dimension of size 2, torch.view_as_real/view_as_complex in forward, or leave it out of the "
                "optimizer)")
    return msg


def overflow_message(step, bad: int, spec: str, size: int) -> str:
    return (f"step {step}: the averaged gradient has {bad} non-finite value(s) although every rank's gradients "
            f"were finite: compressor {spec!r} overflowed (its payload, the sum of {size} ranks' payloads, or "
            "the cast back to the gradient's dtype); no state was changed. For fp16 use prescale=1/N or "
            f"smaller (N ranks: fp16:prescale={1.0 / max(size, 1):g} keeps every sum in range for inputs within "
            "+-65504), or bf16; with a torch GradScaler the step is skipped and the scale lowered.")


def _adopt(state: dict, like, b) -> dict:
    """Move restored state arrays onto the gradient's backend/device if they came from elsewhere."""
    out = None
    for k, v in state.items():
        if v is None or isinstance(v, (int, float)):
            continue
        vb = get_backend(v)
        if vb is not b or vb.device(v) != b.device(like):
            out = dict(state) if out is None else out
            out[k] = b.from_numpy(vb.to_numpy(v), like)
            if vb.dtype(v) != b.dtype(out[k]):
                out[k] = b.cast(out[k], vb.dtype(v))
    return state if out is None else out
