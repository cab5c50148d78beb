"""Shared machinery of the periodic sync policies (localsgd, da, da-pipelined, slowmo).

`fused_allreduce` sums many named arrays in one collective per exchange dtype (16-bit floats
travel as float32). `PeriodicPolicy` holds what the policies share:

  schedule   steps 0..warmup-1 average gradients (post-local SGD); afterwards step s is a sync
             step when (s - warmup + 1) % period == 0, and the exchange runs in after_step(s).
  exchange   exact:      x_avg = (1/n) sum_r x_r           one fused allreduce of the parameters
             compressed: x_avg = a + D(avg_r C(x_r - a + e_r))   with a the common anchor (the
                         parameters after the last sync) and e_r this rank's error-feedback
                         residual (Basu et al., Qsparse-local-SGD, NeurIPS 2019): plain residual
                         error feedback, also for compressors whose default memory implements
                         momentum (dgc), which must not momentum-correct parameter deltas. Used when bind()
                         is given a lossy compressor and `compress=true`; a lossless or no
                         compressor gives the exact path. The deltas go through a GradientSync:
                         summable compressors (fp16, bf16, randomk, powersgd) by allreduce, the
                         others (topk, ...) by allgather; both work, summable ones scale better.
  momentum   (DA, SlowMo buffers=average) every rank appends a presence flag per tensor to the
             parameter exchange; buffers present on every rank are then averaged exactly in one
             more fused allreduce, waited at once (da) or in the next before_step (da-pipelined).
             A buffer missing on some rank stays local on every rank.
  state      step/sync counters, anchor, subclass state (slow momentum) and the delta
             compressor's residuals in state_dict(); a pending exchange is drained first.

The averaged parameters are checked for NaN/Inf before anything is written: FloatingPointError
on every rank, parameters left as they were, the message saying whether this rank's own
parameters are non-finite. The adapters check every local step's gradients first
(gradcomp.finite), so a NaN gradient stops every rank at its local step, before it reaches a
parameter; what remains for this check is an optimizer update that overflowed.
"""
from __future__ import annotations

import time

import numpy as np

from gradcomp import registry
from gradcomp.backend import get_backend
from gradcomp.comm.base import Handle, check_consistent
from gradcomp.finite import local_nonfinite
from gradcomp.params import Param, check_seed
from gradcomp.pipeline import NonFiniteGradientError, PayloadOverflowError, unsupported_dtype
from gradcomp.sync.base import SyncPolicy

_WIRE = {"float16": "float32", "bfloat16": "float32"}


class _FusedHandle(Handle):
    """Waits for the per-dtype allreduces and returns the summed arrays in the original order/shapes."""

    def __init__(self, groups, count, average=0, size=1):
        self.groups, self.count, self._out = groups, count, None
        self.average, self.size = average, size

    def wait(self):
        if self._out is None:
            out = [None] * self.count
            for h, b, items in self.groups:
                total = h.wait()
                parts = b.split(total, [n for _, n, _, _ in items]) if len(items) > 1 else [total]
                for (i, _, shape, dt), p in zip(items, parts):
                    if i < self.average and self.size > 1:    # divide in the wire dtype, then cast back:
                        p = p * (1.0 / self.size)              # two float16 4e4 average to 4e4, not inf
                    out[i] = b.reshape(b.cast(p, dt), shape)
            self._out = out
        return self._out

    def done(self):
        return all(h.done() for h, _, _ in self.groups)

    def nonfinite(self) -> float:
        """Count of non-finite values in the results, in the arrays' own dtypes (after wait())."""
        return sum(b.item(c) for b, c in local_nonfinite(self.wait()))


def fused_allreduce(comm, arrays, name: str, average: int = 0) -> _FusedHandle:
    """Issue the element-wise sum over ranks of `arrays`, one allreduce per exchange dtype; the
    first `average` arrays come back divided by the number of ranks (the mean), computed in the
    exchange dtype before the cast back to their own.

    The flattened arrays are copied into a fresh buffer, so the caller may change them at once.
    """
    groups: dict[str, list] = {}
    for i, x in enumerate(arrays):
        b = get_backend(x)
        dt = b.dtype(x)
        groups.setdefault(_WIRE.get(dt, dt), []).append((i, b, x, dt))
    handles = []
    for wire, items in groups.items():
        b = items[0][1]
        flats = [b.cast(b.flatten(x), wire) for _, _, x, _ in items]
        buf = b.cat(flats) if len(flats) > 1 else b.copy(flats[0])
        h = comm.allreduce(buf, name=f"{name}.{wire}")
        handles.append((h, b, [(i, b.numel(x), tuple(b.shape(x)), dt) for i, _, x, dt in items]))
    return _FusedHandle(handles, len(arrays), average, comm.size)


def _nbytes(a) -> int:
    """Bytes of one array on the wire (its own dtype; bfloat16 is 2)."""
    b = get_backend(a)
    dt = str(b.dtype(a))
    return b.numel(a) * (2 if dt == "bfloat16" else np.dtype(dt).itemsize)


def as_like(a, ref):
    """`a` (maybe restored from a checkpoint of another backend/device) on `ref`'s backend and device."""
    ab, rb = get_backend(a), get_backend(ref)
    if ab is rb and ab.device(a) == rb.device(ref):
        return a
    out = rb.from_numpy(np.ascontiguousarray(ab.to_numpy(a)), ref)
    return rb.cast(out, ab.dtype(a)) if rb.dtype(out) != ab.dtype(a) else out


class PeriodicPolicy(SyncPolicy):
    """Base of the policies that step locally and synchronize every `period` steps."""

    synchronous = False
    average_momentum = False      # DA: also average the optimizer's momentum buffers
    pipelined = False             # da-pipelined: the momentum average is waited in the next before_step
    keeps_anchor = False          # SlowMo: keeps x_{t,0} even on the exact path
    params = {
        "period": Param(int, 4, "local optimizer steps between synchronizations (H)", lo=1),
        "warmup": Param(int, 0, "first steps with synchronous gradient averaging (post-local SGD)", lo=0),
        "compress": Param(bool, True, "send parameter deltas through the compressor given to bind(), if any"),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.comm, self.delta_compressor, self.seed = None, None, 0
        self._delta = None
        self._anchor = None
        self._pending = None
        self._checked = False
        self._steps = self._syncs = 0
        self._final_at = -1           # _steps when finalize() last synchronized
        self._bytes = 0               # bytes this rank sent averaging parameters (and momenta)
        self._times = {"param_exchange_s": 0.0, "momentum_exchange_s": 0.0, "momentum_wait_s": 0.0}

    # ------------------------------------------------------------------ protocol
    def bind(self, comm, compressor=None, seed: int = 0):
        from gradcomp.comm.single import SingleCommunicator
        from gradcomp.pipeline import GradientSync
        super().bind(comm if comm is not None else SingleCommunicator(), None, check_seed(seed))
        self._delta = None
        if compressor is not None and self.compress:
            comp = registry.create(compressor, "compressor")
            if not comp.lossless:
                self.delta_compressor = comp
                # parameter deltas get plain error feedback, never a momentum-correcting memory (dgc)
                owner = getattr(registry.lookup("memory", comp.default_memory), "owns_momentum", False)
                mem = "residual" if owner else "auto"
                self._delta = GradientSync(comp, memory=mem, comm=self.comm, seed=self.seed)
        return self

    def sync_gradients(self, step: int) -> bool:
        return step < self.warmup

    def is_sync_step(self, step: int) -> bool:
        return step >= self.warmup and (step - self.warmup + 1) % self.period == 0

    def before_step(self, step: int, view):
        self._require_bound()
        self._drain()
        if not self._checked:
            self._check(view)
        if self._anchor is None and step >= self.warmup and (self.keeps_anchor or self._delta is not None):
            self._anchor = {n: get_backend(view.get(n)).copy(view.get(n)) for n in view.names()}

    def after_step(self, step: int, view):
        self._require_bound()
        self._drain()
        self._steps = step + 1
        if self.is_sync_step(step):
            self._synchronize(view)

    def flush(self):
        """Finish a pending momentum exchange (da-pipelined) and write it into the optimizer."""
        self._drain()

    def finalize(self, view):
        """End of training: if steps were taken since the last synchronization, synchronize now (the
        policy's own exchange: an average for localsgd/da, an outer step for slowmo), so every rank
        holds the same parameters and a saved model is the averaged one. Call it on every rank; it
        does nothing when the last step was a sync step (or during warm-up's synchronous steps)."""
        self._require_bound()
        self._drain()
        last = self._steps - 1
        if self._steps > self.warmup and not self.is_sync_step(last) and self._final_at != self._steps:
            self._synchronize(view)
            self._drain(count=False)
            self._final_at = self._steps        # until the next step, a second call has nothing to do
            return True
        return False

    def stats(self) -> dict:
        """Counters, bytes sent by parameter averaging and seconds spent blocked in exchanges."""
        return dict(self._times, syncs=self._syncs, steps=self._steps, bytes_sent=self._bytes)

    # ------------------------------------------------------------------ the exchange
    def _synchronize(self, view):
        names = list(view.names())
        if not names:
            return
        params = [view.get(n) for n in names]
        presence = [1.0 if view.momentum(n) is not None else 0.0 for n in names] if self.average_momentum else None
        t0 = time.perf_counter()
        before = self._delta.stats()["bytes_sent"] if self._delta is not None else 0
        avg, counts = self._average(names, params, presence)
        self._times["param_exchange_s"] += time.perf_counter() - t0
        if self._delta is not None:
            self._bytes += self._delta.stats()["bytes_sent"] - before
        else:
            self._bytes += sum(_nbytes(p) for p in params)
        new = self.outer_update(names, avg)
        for n in names:
            view.set(n, new[n])
        if self._anchor is not None or self.keeps_anchor or self._delta is not None:
            self._anchor = {n: get_backend(new[n]).copy(new[n]) for n in names}
        self._syncs += 1
        self.after_average(names, view)
        if presence is not None:
            agreed = [n for n, c in zip(names, counts) if c > self.comm.size - 0.5]
            if agreed:
                self._bytes += sum(_nbytes(view.momentum(n)) for n in agreed)
                h = fused_allreduce(self.comm, [view.momentum(n) for n in agreed], name=f"sync{self._syncs}.momentum",
                                    average=len(agreed))
                self._pending = (h, view, agreed)
                if not self.pipelined:
                    t0 = time.perf_counter()
                    self._drain(count=False)
                    self._times["momentum_exchange_s"] += time.perf_counter() - t0

    def _average(self, names, params, presence):
        """{name: average over ranks of the parameter}, and the per-tensor presence counts."""
        b = get_backend(params[0])
        size = self.comm.size
        tag = f"sync{self._syncs}"
        if self._delta is None:
            extra = []
            if presence is not None:
                wire = _WIRE.get(b.dtype(params[0]), b.dtype(params[0]))
                extra = [b.from_numpy(np.asarray(presence, dtype=wire), params[0])]
            h = fused_allreduce(self.comm, list(params) + extra, name=f"{tag}.params", average=len(params))
            means = h.wait()
            bad = h.nonfinite()
            if bad:
                raise self._diverged(f"the parameter average has {int(bad)} non-finite value(s)", params)
            counts = [float(v) for v in b.to_numpy(means[-1])] if presence is not None else None
            return dict(zip(names, means)), counts
        hp = None
        if presence is not None:
            hp = self.comm.allreduce(b.from_numpy(np.asarray(presence, dtype=np.float32), params[0]),
                                     name=f"{tag}.presence")
        try:
            anchor = {n: as_like(self._anchor[n], p) for n, p in zip(names, params)}
            deltas = {n: p - anchor[n] for n, p in zip(names, params)}
            try:
                avg_delta = self._delta.step(deltas)
            except PayloadOverflowError as e:
                raise FloatingPointError(f"{self.name}: sync {self._syncs}: the compressed parameter deltas "
                                         f"overflowed ({e}); parameters were left as they were.") from e
            except NonFiniteGradientError as e:
                raise self._diverged(f"the compressed parameter deltas could not be averaged ({e})", params) from e
        finally:
            counts = [float(v) for v in get_backend(params[0]).to_numpy(hp.wait())] if hp is not None else None
        return {n: anchor[n] + avg_delta[n] for n in names}, counts

    def _diverged(self, what, params) -> FloatingPointError:
        """The error of a sync whose average is not finite: nothing is written, and the message says
        which rank's own parameters are already non-finite (local steps diverged there)."""
        mine = sum(get_backend(p).item(get_backend(p).count_nonfinite(p)) for p in params)
        where = (f"this rank's own parameters hold {int(mine)} non-finite value(s), so local steps diverged "
                 "here" if mine else "this rank's own parameters are finite; another rank's diverged")
        return FloatingPointError(
            f"{self.name}: sync {self._syncs}: {what}; {where}. This exchange wrote nothing (every rank keeps "
            "its parameters as they are). The adapters check every local step's gradients, so the likely "
            "cause is an optimizer update that overflowed: restore a checkpoint and lower the learning rate.")

    def _drain(self, count: bool = True):
        if self._pending is None:
            return
        h, view, names = self._pending
        self._pending = None
        t0 = time.perf_counter()
        means = h.wait()
        if count:
            self._times["momentum_wait_s"] += time.perf_counter() - t0
        for n, m in zip(names, means):
            view.set_momentum(n, m)

    # ------------------------------------------------------------------ hooks for subclasses
    def outer_update(self, names, avg: dict) -> dict:
        """The parameters every rank continues from, given the average (SlowMo overrides)."""
        return avg

    def after_average(self, names, view):
        """Called after the parameters were written (SlowMo resets buffers here)."""

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, sd: dict):
        pass

    # ------------------------------------------------------------------ checks and state
    def _require_bound(self):
        if self.comm is None:
            raise RuntimeError(f"sync policy {self.spec()!r} is not bound: call policy.bind(comm) first "
                               "(the DistributedOptimizer does this for you)")

    def _check(self, view):
        shapes = {}
        for n in view.names():
            x = view.get(n)
            b = get_backend(x)
            if not b.is_floating(x):
                raise TypeError(f"{self.name}: " + unsupported_dtype("parameter", n, b.dtype(x)))
            shapes[n] = list(b.shape(x))
        if self.average_momentum and getattr(view, "adaptive", bool)() and self.comm.rank == 0:
            import warnings
            warnings.warn(f"{self.name}: the wrapped optimizer is adaptive (Adam-like); Double-Averaging averages "
                          "only its first moment (exp_avg), the second moments stay local to each rank. Use SGD "
                          "with momentum for the paper's algorithm, or sync=localsgd to average parameters only.",
                          stacklevel=3)
        delta = self.delta_compressor.spec() if self._delta is not None else None
        check_consistent(self.comm, {"sync": self.spec(), "delta_compressor": delta, "tensors": shapes,
                                     "order": list(shapes)},   # the exchange fuses tensors by position
                         what="gradcomp sync policy configuration")
        self._checked = True

    def state_dict(self) -> dict:
        self._drain()
        return {"version": 1, "policy": self.spec(), "steps": self._steps, "syncs": self._syncs,
                "anchor": dict(self._anchor) if self._anchor is not None else None,
                "delta_sync": self._delta.state_dict() if self._delta is not None else None,
                **self.extra_state()}

    def replicated_state_dict(self) -> dict:
        """state_dict() without the per-rank part: counters, anchor and slow momentum are identical on
        every rank; of the delta compressor's GradientSync only its replicated state is kept."""
        sd = self.state_dict()
        if self._delta is not None:
            sd["delta_sync"] = self._delta.replicated_state_dict()
        return sd

    def load_replicated_state_dict(self, sd: dict):
        """Adopt a peer's replicated_state_dict(); the delta residuals (per rank) restart at zero."""
        self.load_state_dict(sd, _replicated=True)

    def load_state_dict(self, sd: dict, _replicated: bool = False):
        if not isinstance(sd, dict) or "steps" not in sd:
            raise ValueError(f"not a {self.name} sync policy state_dict (got keys {sorted(sd)[:6] if isinstance(sd, dict) else type(sd).__name__}); "
                             f"it was saved by another sync policy: restore with the same GRADCOMP_SYNC ({self.spec()!r})")
        if sd.get("policy") != self.spec():
            raise ValueError(f"checkpoint was saved with sync policy {sd.get('policy')!r} but this run uses "
                             f"{self.spec()!r}; restore with the same GRADCOMP_SYNC")
        if (sd.get("delta_sync") is None) != (self._delta is None):
            raise ValueError("checkpoint and this run differ in whether parameter deltas are compressed; bind the "
                             "policy with the same compressor (and compress=) as the saved run")
        if self._delta is not None:
            self._delta._check_config(sd["delta_sync"])
        self._pending = None
        self._steps, self._syncs = int(sd["steps"]), int(sd["syncs"])
        self._anchor = dict(sd["anchor"]) if sd.get("anchor") is not None else None
        if self._delta is not None:
            if _replicated:
                self._delta.load_replicated_state_dict(sd["delta_sync"])
            else:
                self._delta.load_state_dict(sd["delta_sync"])
        self.load_extra_state(sd)
