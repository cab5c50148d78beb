"""A DistributedDataParallel communication hook running gradcomp compressors over torch.distributed.

    model = DDP(model)
    hook = gradcomp_torch.ddp_hook("topk:ratio=0.01", named_parameters=model.named_parameters())
    model.register_comm_hook(None, hook)
    ...
    torch.save({"hook": hook.state_dict()}, f"ckpt.rank{rank}.pt")     # residuals are per rank

Algorithm, per DDP bucket (DDP calls the hook in bucket order, the same on every rank):
  1. Split the bucket into its parameters' gradients (bucket.gradients(), bucket.parameters()) and
     name each by its parameter, so per-tensor state (residuals, PowerSGD factors) survives DDP's
     bucket rebuild after the first iteration.
  2. GradientSync.start(): error-feedback compensation, compression, asynchronous collective
     (allreduce when summable, allgather otherwise) on a gradcomp torch.distributed communicator.
  3. Return a Future; on the last bucket of the iteration GradientSync.finish() waits for every
     bucket, decodes and averages, writes the averages into each bucket buffer and completes all
     futures. DDP copies the buffers into p.grad.
If any rank had NaN/Inf gradients, the buffers are filled with NaN on every rank (as plain DDP would
propagate them), so a GradScaler skips the step on all ranks alike.
Only the default `allreduce` sync policy: GRADCOMP_SYNC=localsgd (or any policy acting at the
optimizer step) raises ValueError, since the hook never sees the step.
The hook never sees the optimizer: with a method that implements momentum itself (memory dgc/gmc,
compressor signum; gradcomp/momentum.py) create the optimizer with momentum=0 yourself (rank 0
warns once), or use gradcomp_torch.DistributedOptimizer, which takes SGD's momentum over.
"""
from gradcomp.pipeline import GradientSync, NonFiniteGradientError
from gradcomp_torch.config import resolve_config

import torch


def _rank():
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class DDPHookState:
    """What the hook keeps between calls: the GradientSync, parameter names, pending buckets."""

    def __init__(self, compressor, memory, seed, process_group, comm, named_parameters):
        cfg = resolve_config(compressor, memory, None, seed, None, "torch")
        from gradcomp.sync.base import SyncPolicy
        pol = cfg.sync
        if any(getattr(type(pol), m) is not getattr(SyncPolicy, m)
               for m in ("sync_gradients", "before_step", "after_step")):
            raise ValueError(
                f"gradcomp ddp_hook cannot run sync policy {pol.spec()!r} (GRADCOMP_SYNC): a DDP comm hook sees "
                "gradient buckets only, never the optimizer step, and DDP always averages every step, so local "
                "SGD would silently be plain DDP. Use gradcomp_torch.DistributedOptimizer (it runs every sync "
                "policy) or torch's PostLocalSGDOptimizer, or unset GRADCOMP_SYNC for the hook")
        self.compressor, self.memory, self.seed = cfg.compressor, cfg.memory, cfg.seed
        from gradcomp.config import resolve_memory
        own = [o for o in (resolve_memory(cfg.memory, cfg.compressor), cfg.compressor)
               if getattr(o, "owns_momentum", False)]
        if own and (comm.rank if comm is not None else _rank()) == 0:
            import warnings
            warnings.warn(f"gradcomp ddp_hook: {own[0].kind} {own[0].name!r} implements momentum itself; create "
                          "the optimizer with momentum=0 (or use gradcomp_torch.DistributedOptimizer, which "
                          "takes SGD's momentum over), else momentum is applied twice", stacklevel=3)
        self.process_group, self.comm = process_group, comm
        self.names = {id(p): n for n, p in named_parameters} if named_parameters is not None else {}
        self._auto_names = named_parameters is None
        self.sync = None
        self.pending = []
        self._restore = None
        self.scaler, self._scale = None, None

    def attach_grad_scaler(self, scaler):
        """The torch.amp.GradScaler scaling the loss: error-feedback state is then rescaled when the
        scale changes, so it keeps its meaning (see gradcomp/pipeline.py, loss scaling)."""
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"attach_grad_scaler expects a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler

    def _ensure(self):
        if self.sync is None:
            comm = self.comm
            if comm is None:
                from gradcomp.comm import make_communicator
                kw = {"group": self.process_group} if self.process_group is not None else {}
                comm = make_communicator("torch", **kw)
            self.comm = comm
            self.sync = GradientSync(self.compressor, memory=self.memory, comm=comm, seed=self.seed)
            if self._restore is not None:
                self.sync.load_state_dict(self._restore)
                self._restore = None
        return self.sync

    def name_of(self, p):
        n = self.names.get(id(p))
        if n is None:
            if not self._auto_names:
                raise ValueError(f"a DDP parameter of shape {tuple(p.shape)} is not in named_parameters; pass "
                                 "the named_parameters() of the model wrapped by DDP")
            n = self.names[id(p)] = f"param{len(self.names)}"
        return n

    def state_dict(self) -> dict:
        """This rank's compressor/memory state (save one per rank)."""
        if self.sync is None:
            return dict(self._restore) if self._restore is not None else {}
        return self.sync.state_dict()

    def load_state_dict(self, sd: dict):
        if self.sync is None:
            self._restore = dict(sd) if sd else None
        else:
            self.sync.load_state_dict(sd)

    def stats(self) -> dict:
        return self.sync.stats() if self.sync is not None else {}

    def run(self, bucket):
        gs = self._ensure()
        grads, params = bucket.gradients(), bucket.parameters()
        names = [self.name_of(p) for p in params]
        fut = torch.futures.Future()
        if not self.pending:                # the iteration's first bucket: read the loss scale once
            sc = self.scaler
            self._scale = float(sc.get_scale()) if sc is not None and sc.is_enabled() else None
        self.pending.append((bucket.buffer(), grads, names, fut))
        try:
            gs.start(dict(zip(names, grads)), donate=True,     # DDP takes the bucket buffer back anyway
                     loss_scale=self._scale)
            if bucket.is_last():
                self._complete(gs)
        except BaseException as e:
            pending, self.pending = self.pending, []
            for *_, f in pending:
                if not f.done():
                    f.set_exception(e)
            raise
        return fut

    @torch.no_grad()
    def _complete(self, gs):
        pending, self.pending = self.pending, []
        try:
            out = gs.finish()
        except NonFiniteGradientError:
            out = None
        for buf, grads, names, fut in pending:
            if out is None:
                buf.fill_(float("nan"))
            else:
                off = 0
                for g, n in zip(grads, names):
                    k = g.numel()
                    dst, avg = buf[off:off + k], out[n].reshape(-1)
                    if not (avg.data_ptr() == dst.data_ptr() and avg.dtype == dst.dtype):
                        dst.copy_(avg.to(buf.dtype))          # else averaged in the buffer already
                    off += k
            fut.set_result(buf)


def ddp_hook(compressor=None, memory=None, *, seed=None, process_group=None, comm=None, named_parameters=None):
    """Build a DDP comm hook; register it with `ddp_model.register_comm_hook(None, hook)`.

    compressor / memory / seed: spec string, object, or None for GRADCOMP_* (as DistributedOptimizer).
    process_group: the torch.distributed group (default: the world); comm: any gradcomp Communicator
    instead. The returned function carries `.hook_state` with state_dict()/load_state_dict()/stats(),
    and `.attach_grad_scaler(scaler)` for loss scaling with error feedback.
    """
    st = DDPHookState(compressor, memory, seed, process_group, comm,
                      list(named_parameters) if named_parameters is not None else None)

    def gradcomp_ddp_hook(state, bucket):
        return st.run(bucket)

    gradcomp_ddp_hook.hook_state = st
    gradcomp_ddp_hook.state_dict = st.state_dict
    gradcomp_ddp_hook.load_state_dict = st.load_state_dict
    gradcomp_ddp_hook.stats = st.stats
    gradcomp_ddp_hook.attach_grad_scaler = st.attach_grad_scaler
    return gradcomp_ddp_hook
