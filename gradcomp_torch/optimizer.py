"""DistributedOptimizer: wraps any torch.optim optimizer with compressed, overlapped gradient averaging.

    opt = gradcomp_torch.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                              named_parameters=model.named_parameters(),
                                              compressor="topk:ratio=0.01")

How one step runs (Horovod's semantics, over gradcomp.GradientSync):
  1. Parameters are cut into fixed buckets (reverse registration order, `bucket_mb` MiB each,
     default GRADCOMP_BUCKET_MB); every rank builds the same buckets.
  2. A post-accumulate-grad hook marks each gradient final on the last of `backward_passes_per_step`
     backward passes (earlier passes only accumulate locally). A complete bucket is compressed and
     its collectives issued at once (GradientSync.start), strictly in bucket order so every rank
     issues the same collectives in the same sequence; communication overlaps the rest of backward.
  3. At the end of backward the remaining buckets go out; a parameter that got no gradient sends
     zeros (as Horovod does), so every rank sends the same tensors. If no rank had a gradient for
     it, its .grad stays None and the wrapped optimizer skips it (a frozen or unused parameter does
     not move, as in torch); if some rank had one, every rank gets that average (zeros counted for
     the ranks without), so the ranks stay identical.
  4. step() (or synchronize()) waits (GradientSync.finish), writes the averages into p.grad, calls
     policy.before_step, the wrapped optimizer's step, policy.after_step.
Sync policies decide per step whether gradients are averaged at all (local SGD does not).
If any rank produced NaN/Inf, every rank's gradients become NaN: a GradScaler then skips the step
on all ranks alike; a plain step() raises NonFiniteGradientError on all ranks. A GradScaler is picked up on
its first unscale_ (or `opt.attach_grad_scaler(scaler)`): error-feedback state keeps its meaning across
scale changes. On the local steps
of a periodic policy (no gradient averaging) step() still agrees on that, with one 4-byte
allreduce of every rank's count (gradcomp.finite.start_nonfinite, issued at the end of backward),
before anything is changed.
Reading `optimizer.param_groups` after backward (GradScaler.unscale_ does) first finishes the
pending averaging, so loss scaling works as `scaler.step(opt)` with no extra call. Modifying
p.grad between backward and step needs `synchronize()` first (as in Horovod), then
`with opt.skip_synchronize(): opt.step()`. With a periodic policy (localsgd, ...) the same holds:
GradScaler.unscale_ reading param_groups runs that agreement, so every rank skips the step alike.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import warnings
import weakref
from collections import OrderedDict

import torch

from gradcomp import horovod_api as hvd_api
from gradcomp import registry
from gradcomp.comm.base import Communicator
from gradcomp.finite import start_nonfinite
from gradcomp.pipeline import GradientSync, NonFiniteGradientError
from gradcomp_torch import runtime
from gradcomp_torch.buckets import make_buckets, name_parameters
from gradcomp_torch.checkpoint import CheckpointMixin
from gradcomp_torch.config import resolve_config
from gradcomp_torch.momentum import take_over
from gradcomp_torch.sync_view import TorchParamAccess


class DistributedOptimizer(CheckpointMixin, torch.optim.Optimizer):
    """Compressed data-parallel wrapper of `optimizer` (see the module docstring)."""

    def __init__(self, optimizer, named_parameters=None, compressor=None, memory=None, backend=None,
                 backward_passes_per_step: int = 1, sync=None, bucket_mb: float | None = None,
                 seed: int | None = None, comm: Communicator | None = None, *, compression=None, op=None,
                 gradient_predivide_factor: float = 1.0, num_groups: int = 0, groups=None,
                 sparse_as_dense: bool = False, process_set=None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DistributedOptimizer):
            raise TypeError("optimizer is already a DistributedOptimizer")
        if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be an int >= 1, got {backward_passes_per_step!r}")
        torch._C._log_api_usage_once("gradcomp_torch.DistributedOptimizer")
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                      "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                      "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        self.inner = optimizer
        # Horovod's keyword arguments (gradcomp/horovod_api.py says what each one means here)
        compressor, memory = hvd_api.compressor_arg(compressor, compression, memory)
        self.op = hvd_api.check_op(op, gradient_predivide_factor)
        hvd_api.check_process_set(process_set)
        self.sparse_as_dense = bool(sparse_as_dense)
        hint = hvd_api.bucket_mb_for_groups(num_groups, groups, sum(
            p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"]))
        if hint is not None:
            if bucket_mb is not None:
                raise ValueError("pass bucket_mb= or num_groups=/groups= (Horovod's fusion hint), not both")
            bucket_mb = hint
        cfg = resolve_config(compressor, memory, sync, seed, bucket_mb, backend)
        if comm is None and isinstance(backend, Communicator):
            comm = backend
        if comm is None:
            comm = runtime.communicator() if backend is None else runtime.init(cfg.backend)
        self.comm = comm
        self.backward_passes_per_step = backward_passes_per_step
        self.bucket_mb = cfg.bucket_mb
        self._named = name_parameters(optimizer, named_parameters)
        self._buckets = make_buckets(self._named, self.bucket_mb)
        self._bucket_of = {i: b for b, idx in enumerate(self._buckets) for i in idx}
        self._gs = GradientSync(cfg.compressor, memory=cfg.memory, comm=comm, seed=cfg.seed)
        self._policy = registry.create(cfg.sync, "sync").bind(comm, compressor=self._gs.compressor,
                                                              seed=cfg.seed)
        if self.op == hvd_api.Sum and not self._policy.synchronous:
            raise ValueError(f"op=Sum needs gradients reduced every step; sync policy {self._policy.spec()!r} "
                             "takes local steps. Use op=Average (the default) with it")
        self._view = TorchParamAccess(self._named, optimizer)
        self._wd_momentum = take_over(optimizer, self._named, self._gs, comm.rank)   # gradcomp_torch/momentum.py
        self._lock = threading.RLock()
        self._step = 0
        self._weight = 1.0
        self._should_synchronize = True
        self._reset_step_state()
        self._gs.check({n: list(p.shape) for n, p in self._named}, self._fingerprint_extra())
        me = weakref.ref(self)
        self._hook_handles = [p.register_post_accumulate_grad_hook(_GradHook(me, i))
                              for i, (_, p) in enumerate(self._named)]

    # ------------------------------------------------------------------ torch.optim surface
    @property
    def param_groups(self):
        if "_grad_scaler" not in self.__dict__:
            self._detect_grad_scaler(sys._getframe(1))
        if self.__dict__.get("_backward_done") and not self._synced:
            self.synchronize()      # GradScaler.unscale_ and friends must see averaged gradients
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.inner.param_groups = value

    @property
    def state(self):
        return self.inner.state

    @state.setter
    def state(self, value):
        self.inner.state = value

    @property
    def defaults(self):
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value):
        self.inner.defaults = value

    def add_param_group(self, param_group):
        raise NotImplementedError("add parameter groups to the wrapped optimizer before wrapping it in "
                                  "DistributedOptimizer (every rank must agree on the parameters)")

    def __repr__(self):
        return (f"DistributedOptimizer({type(self.inner).__name__}, compressor={self.compressor.spec()!r}, "
                f"memory={self._gs.memory.spec()!r}, sync={self._policy.spec()!r}, "
                f"rank={self.comm.rank}/{self.comm.size})")

    @property
    def compressor(self):
        return self._gs.compressor

    @property
    def policy(self):
        return self._policy

    @property
    def gradient_sync(self) -> GradientSync:
        return self._gs

    def named_parameters(self):
        return list(self._named)

    def stats(self) -> dict:
        """bytes_sent, bytes_dense, steps and ratio of the gradient averaging so far; `policy`: the sync
        policy's own counters (its bytes_sent: parameter averaging of localsgd & co.), and
        bytes_sent_total = both together."""
        out = self._gs.stats()
        pol = self._policy.stats()
        out["policy"] = pol
        out["bytes_sent_total"] = out.get("bytes_sent", 0) + pol.get("bytes_sent", 0)
        return out

    def finalize(self) -> bool:
        """End of training, on every rank: if the sync policy left the ranks' parameters apart (local
        SGD whose run did not end on a sync step), synchronize them now, so the model rank 0 saves
        is the averaged one. A no-op for the default allreduce policy. True if it exchanged."""
        with self._lock:
            return bool(self._policy.finalize(self._view))

    def set_step_share(self, backward_passes: int, weight: float = 1.0):
        """From the next step on: `backward_passes` backward passes per step on this rank (may differ
        between ranks; 0 sends only the error-feedback residual), and this rank's accumulated gradient
        scaled by `weight` before compression (gradcomp.balance: w = P * n_r / N gives the mean weighted
        by samples). gradcomp_torch.VirtualWorkers calls it before every step."""
        if not isinstance(backward_passes, int) or backward_passes < 0:
            raise ValueError(f"backward_passes must be an int >= 0, got {backward_passes!r}")
        if not float(weight) >= 0.0 or float(weight) == float("inf"):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        with self._lock:
            if self._pass or self._launched:
                raise RuntimeError("set_step_share() during a step (after a backward pass): call it after "
                                   "optimizer.step() and before the next step's first backward")
            self.backward_passes_per_step, self._weight = backward_passes, float(weight)

    # ------------------------------------------------------------------ per-step state
    def _reset_step_state(self):
        self._pass = 0
        self._callback_queued = False
        self._backward_done = False
        self._ready = [False] * len(self._named)
        self._left = [len(b) for b in self._buckets]
        self._next = 0
        self._launched = False
        self._synced = False
        self._nonfinite = None
        self._sync_now = None
        self._local_flag = None          # a local step's non-finite agreement, issued at backward end

    def _sync_this_step(self) -> bool:
        if self._sync_now is None:
            self._sync_now = bool(self._policy.sync_gradients(self._step))
        return self._sync_now

    def _on_grad(self, i):
        with self._lock:
            if self._synced:                 # synchronized but no step (GradScaler skipped it)
                self._reset_step_state()
            if self._backward_done:
                raise RuntimeError(
                    f"gradients were computed more than backward_passes_per_step="
                    f"{self.backward_passes_per_step} time(s) before step(); call optimizer.step() "
                    "after that many backward passes, or raise backward_passes_per_step")
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
            if self._pass < self.backward_passes_per_step - 1 or not self._sync_this_step():
                return
            if self._ready[i]:
                raise RuntimeError(f"gradient of {self._named[i][0]!r} became ready twice in one backward pass")
            self._ready[i] = True
            b = self._bucket_of[i]
            self._left[b] -= 1
            while self._next < len(self._buckets) and self._left[self._next] == 0:
                self._launch(self._next)

    def _on_backward_end(self):
        with self._lock:
            self._callback_queued = False
            self._pass += 1
            if self._pass >= self.backward_passes_per_step:
                if self._sync_this_step():
                    self._launch_rest()
                else:
                    self._local_flag = self._start_local_flag()
                self._backward_done = True

    def _launch_rest(self):
        while self._next < len(self._buckets):
            self._launch(self._next)

    def _launch(self, b):
        named, absent = {}, []
        for i in self._buckets[b]:
            name, p = self._named[i]
            g = p.grad
            if g is None:           # zeros keep the collectives equal; skipped if no rank has a gradient
                g = torch.zeros_like(p, memory_format=torch.contiguous_format)
                absent.append(name)
            elif g.is_sparse:
                if not self.sparse_as_dense:
                    raise TypeError(f"parameter {name!r} has a sparse gradient; gradcomp averages dense gradients: "
                                    "pass DistributedOptimizer(..., sparse_as_dense=True) to densify it (as "
                                    "Horovod does), or use nn.Embedding(sparse=False)")
                p.grad = g = g.to_dense()           # the average is written into this dense gradient
            named[name] = g.detach()
        self._next = b + 1
        self._launched = True
        if b == 0:
            self._step_scale = self._loss_scale()               # once per step (buckets go out in order)
        self._gs.start(named, donate=True, weight=self._weight,  # p.grad receives the average: no copies
                       absent=absent, loss_scale=self._step_scale)

    # ------------------------------------------------------------------ synchronize / step
    @torch.no_grad()
    def synchronize(self):
        """Wait for the gradient averaging of this step and write the averages into p.grad.

        Call it on every rank. Idempotent until the next backward. On a step whose policy does not
        average gradients it only agrees, across ranks, on whether any gradient is NaN/Inf.
        """
        with self._lock:
            if self._synced:
                return
            if not self._sync_this_step():
                self._agree_finite()
            else:
                self._launch_rest()
                try:
                    out = self._gs.finish()
                except NonFiniteGradientError as e:
                    self._nonfinite = e
                    self._fill_nan()
                else:
                    for name, p in self._named:
                        avg = out[name]
                        if avg is None:                 # no rank had a gradient: skipped, as in torch
                            continue
                        if p.grad is None:
                            p.grad = avg.detach().reshape(p.shape).clone()
                        elif not (avg.data_ptr() == p.grad.data_ptr() and p.grad.is_contiguous()):
                            p.grad.copy_(avg.reshape(p.grad.shape))     # else averaged in place already
                        if self.op == hvd_api.Sum:
                            p.grad.mul_(self.comm.size)                 # Horovod's op=Sum: the sum over ranks
            self._synced = True

    def _start_local_flag(self):
        return start_nonfinite(self.comm, [p.grad for _, p in self._named], name="nonfinite.local")

    def attach_grad_scaler(self, scaler):
        """Tell the optimizer the torch.amp.GradScaler that scales the loss (None to detach).

        Error-feedback residuals and DGC/GMC/signum state are then kept meaningful across scale
        changes: the gradients arrive multiplied by scaler.get_scale(), and the state declared in
        gradient units is rescaled by new_scale / old_scale whenever the scale changes (exact for
        GradScaler's powers of two), so a run with loss scaling follows the unscaled run. Without
        it the state is kept in loss-scaled units and each scale change mis-weights it. Reads the
        scale once per step (on CUDA that is one device-to-host copy). A GradScaler that unscales
        this optimizer (scaler.step / scaler.unscale_) is attached automatically on its first
        step; call this to attach it explicitly, or with None to turn the detection off."""
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"attach_grad_scaler expects a torch.amp.GradScaler, got {type(scaler).__name__}")
        self._grad_scaler = scaler
        return self

    def _detect_grad_scaler(self, frame):
        """A GradScaler reads param_groups from its _unscale_grads_ (unscale_, step): adopt it as if
        attach_grad_scaler had been called; what the state holds so far is in its current scale.
        attach_grad_scaler(None) turns this off."""
        if frame is None or frame.f_code.co_name != "_unscale_grads_":
            return
        scaler = frame.f_locals.get("self")
        if not (callable(getattr(scaler, "get_scale", None)) and callable(getattr(scaler, "is_enabled", None))):
            return
        self._grad_scaler = scaler
        scale = self._loss_scale()
        if scale is not None:
            self._gs.set_state_scale(scale)

    def _loss_scale(self):
        scaler = self.__dict__.get("_grad_scaler")
        if scaler is None or not scaler.is_enabled():
            return None
        return float(scaler.get_scale())

    def _agree_finite(self):
        h, self._local_flag = self._local_flag or self._start_local_flag(), None
        bad = h.wait()
        if bad:
            self._nonfinite = NonFiniteGradientError(
                f"{bad} non-finite gradient value(s) across ranks on a local step of sync policy "
                f"{self._policy.spec()!r}; no parameter or optimizer state was changed.")
            self._fill_nan()

    def _fill_nan(self):
        for _, p in self._named:
            if p.grad is None:
                p.grad = torch.full_like(p, float("nan"))
            else:
                p.grad.fill_(float("nan"))

    @contextlib.contextmanager
    def skip_synchronize(self):
        """`with opt.skip_synchronize(): opt.step()` steps with p.grad as it is (after synchronize())."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._lock:
            if self._should_synchronize:
                self.synchronize()          # a local step agrees on non-finite gradients only
            elif self._local_flag is not None and not self._synced:
                self._agree_finite()        # the local step's agreement, issued by every rank
            elif self._launched and not self._synced:
                raise RuntimeError("step() inside skip_synchronize() while gradients are still being averaged: "
                                   "call optimizer.synchronize() after backward and before step()")
            err = self._nonfinite
            if err is not None:
                self._reset_step_state()
                msg = str(err) if str(err).startswith("step ") else f"step {self._step}: {err}"
                raise type(err)(f"{msg} Skipped on every rank; use torch.amp.GradScaler, lower the "
                                "learning rate, or catch this error and continue") from err   # keeps the subclass
            self._policy.before_step(self._step, self._view)
            if self._wd_momentum is not None:
                self._wd_momentum.apply()
            self.inner.step()
            self._policy.after_step(self._step, self._view)
            self._step += 1
            self._loaded_checkpoint = None      # kept by load_state_dict for broadcast_optimizer_state only
            self._reset_step_state()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        with self._lock:
            if self._local_flag is not None and not self._synced:
                self._local_flag.wait()       # every rank issued it; finish it (the step is discarded)
            elif self._launched and not self._synced:
                warnings.warn("zero_grad() called while gradients were being averaged; the averaging was "
                              "finished and discarded. Call zero_grad() before backward or after step().",
                              stacklevel=2)
                self.synchronize()
            self._reset_step_state()
        self.inner.zero_grad(set_to_none=set_to_none)

    def _fingerprint_extra(self) -> dict:
        return {"sync": self._policy.spec(), "optimizer": type(self.inner).__name__,
                "backward_passes_per_step": self.backward_passes_per_step,
                "buckets": [len(b) for b in self._buckets],
                "dtypes": {n: str(p.dtype).replace("torch.", "") for n, p in self._named}}

    def remove_hooks(self):
        """Detach the gradient hooks (the wrapper stops averaging)."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []


class _GradHook:
    """Post-accumulate-grad hook holding only a weak reference to its optimizer."""

    def __init__(self, opt_ref, index):
        self.opt_ref, self.index = opt_ref, index

    def __call__(self, param):
        opt = self.opt_ref()
        if opt is not None:
            opt._on_grad(self.index)
