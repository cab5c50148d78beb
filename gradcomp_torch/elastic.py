"""Elastic training for gradcomp_torch: Horovod Elastic and torchrun elastic, with gradcomp's state
handled by the rules of gradcomp/elastic.py (graceful change: residuals flushed into the next update;
failure: back to the last commit, residuals at zero; fingerprint checked again on the new world).

Horovod Elastic -- switch by import, the script stays Horovod's:

    import horovod.torch as hvd
    import gradcomp_torch.elastic as gce                  # instead of hvd.elastic
    opt = gct.DistributedOptimizer(sgd, named_parameters=model.named_parameters(), backend="horovod")
    state = gce.TorchState(model=model, optimizer=opt, epoch=0, batch=0)
    state.register_reset_callbacks([on_reset])            # e.g. VirtualWorkers.resize, an lr rule

    @gce.run                                              # hvd.elastic.run
    def train(state): ... state.commit() ...

`TorchState` is hvd.elastic.TorchState with a handler for a DistributedOptimizer in place of
Horovod's optimizer handler, because Horovod's would broadcast rank 0's whole optimizer state
(rank 0's residuals over everyone's). Ours:
  commit (save)   the wrapped optimizer's state and gradcomp's *replicated* state (copies)
  hosts changed   (state.commit -> check_host_updates raises HostsUpdatedInterrupt on every rank
                  together, the old world still complete) the residuals are flushed first (one
                  dense allreduce) and the state committed again, so the flushed mass is added to
                  the first update on the new world
  restore         (after HorovodInternalError: a rank died) the committed state; residuals zero
  reset           (hvd was re-initialized on the new world) a new HorovodCommunicator is bound to
                  the optimizer, its sync policy and gradcomp_torch's default communicator, and the
                  configuration fingerprint is checked on the new world (ConfigMismatchError on every
                  rank if a joining process differs)
  sync            rank 0's wrapped-optimizer state and replicated gradcomp state are broadcast; every
                  rank adopts the replicated state; per-rank state is never taken from rank 0 (it is
                  zero at that point by the rules above, on every rank alike)

torchrun elastic (`--nnodes=MIN:MAX`, `--max-restarts`): every restart is a new process group, so
the job resumes from a checkpoint. `save_elastic(path, model, opt, extra)` (collective) writes one
file holding the model, the wrapped optimizer and every rank's gradcomp part keyed by (rank, world
size); `load_elastic(path, model, opt)` restores it exactly when the world size is unchanged, and
otherwise remaps: the residuals of all the old ranks are summed (merged) into a pending flush, so
their mass reaches the first update of the new world, and per-rank state restarts at zero.
"""
from __future__ import annotations

import copy
import os

import torch

from gradcomp import elastic as core
from gradcomp_torch import runtime
from gradcomp_torch.checkpoint import load_checkpoint, save_checkpoint

try:                                                   # Horovod is optional
    import horovod.torch as _hvd
    from horovod.common.exceptions import HostsUpdatedInterrupt
    from horovod.torch.elastic import run as _hvd_run
    from horovod.torch.elastic.state import StateHandler as _StateHandler
    from horovod.torch.elastic.state import TorchState as _HvdTorchState
    from horovod.torch.elastic import ElasticSampler  # noqa: F401  (Horovod's, re-exported)
    from horovod.common.elastic import ObjectState  # noqa: F401
except Exception as _e:  # noqa: BLE001 - absent or broken build: the Horovod parts raise on use
    _hvd, _HVD_ERROR = None, _e
    _HvdTorchState = _StateHandler = object
    HostsUpdatedInterrupt = None

    def ElasticSampler(*args, **kwargs):  # noqa: N802 - Horovod's name; needs Horovod
        _need_horovod()
    ObjectState = ElasticSampler
else:
    _HVD_ERROR = None


def _need_horovod():
    if _hvd is None:
        from gradcomp.comm.horovod import _INSTALL
        raise ImportError(f"gradcomp_torch.elastic.TorchState / run need Horovod: {_INSTALL} ({_HVD_ERROR})")


# ------------------------------------------------------------------------------- the adapter side
def _require_idle(opt, what):
    opt._require_idle(what)


def flush(opt) -> dict:
    """Graceful rule on `opt` (collective on the current world): see gradcomp.elastic.flush."""
    _require_idle(opt, "elastic flush")
    return core.flush(opt.gradient_sync)


def rebind(opt, comm, *, check: bool = True):
    """Move DistributedOptimizer `opt` onto communicator `comm` (a new world) and check the
    configuration fingerprint there (collective on the new world)."""
    _require_idle(opt, "elastic rebind")
    opt.comm = comm
    core.rebind(opt.gradient_sync, opt.policy, comm)
    with opt._lock:
        opt._reset_step_state()
    if check:
        opt.gradient_sync.check({n: list(p.shape) for n, p in opt.named_parameters()}, opt._fingerprint_extra())


def _saved(opt) -> dict:
    _require_idle(opt, "elastic commit")
    return {"inner": copy.deepcopy(opt.inner.state_dict()), "replicated": copy.deepcopy(opt.replicated_state_dict())}


def _abandon_step(opt):
    """After a failure the step in flight is lost: drop its pending collectives (their engine is gone)."""
    with opt._lock:
        core.abandon(opt.gradient_sync)
        opt._reset_step_state()


def _restore_saved(opt, saved: dict):
    saved = copy.deepcopy(saved)
    opt.inner.load_state_dict(saved["inner"])
    rep = saved["replicated"]
    rep["size"] = opt.comm.size          # the commit may come from the previous world
    opt.load_replicated_state_dict(rep)


# ------------------------------------------------------------------------------- Horovod Elastic
class DistributedOptimizerStateHandler(_StateHandler):
    """hvd.elastic state handler for a gradcomp_torch.DistributedOptimizer (module docstring)."""

    def __init__(self, optimizer):
        self.value = optimizer
        self.save()

    def save(self):
        self._saved = _saved(self.value)

    def restore(self):
        _abandon_step(self.value)           # a rank died, maybe mid-step
        _restore_saved(self.value, self._saved)

    def flush(self) -> dict:
        return flush(self.value)

    def reset(self):
        from gradcomp.comm.horovod import HorovodCommunicator
        comm = HorovodCommunicator(_hvd, init=False, timeout=getattr(self.value.comm, "timeout", "default"))
        if runtime._STATE.get("comm") is self.value.comm or runtime._STATE.get("comm") is None or \
                getattr(runtime._STATE.get("comm"), "engine", "") == "horovod":
            runtime.init(comm=comm)
        rebind(self.value, comm)

    def sync(self):
        opt = self.value
        payload = _saved(opt) if _hvd.rank() == 0 else None
        got = _hvd.broadcast_object(payload, root_rank=0, name="gradcomp.elastic.sync")
        _restore_saved(opt, got)          # rank 0 too: every rank leaves sync in the same state class
        self._saved = got


class TorchState(_HvdTorchState):
    """hvd.elastic.TorchState that handles gradcomp_torch.DistributedOptimizer (module docstring)."""

    def __init__(self, model=None, optimizer=None, **kwargs):
        _need_horovod()
        from gradcomp_torch.optimizer import DistributedOptimizer
        kwargs.update(model=model, optimizer=optimizer)
        ours = {k: v for k, v in kwargs.items() if isinstance(v, DistributedOptimizer)}
        rest = {k: v for k, v in kwargs.items() if k not in ours}
        super().__init__(**rest)
        for k, v in ours.items():
            self._saved_state.pop(k, None)
            self._handlers[k] = DistributedOptimizerStateHandler(v)
            object.__setattr__(self, k, v)

    def _ours(self):
        return [h for h in self._handlers.values() if isinstance(h, DistributedOptimizerStateHandler)]

    def check_host_updates(self):
        try:
            super().check_host_updates()
        except HostsUpdatedInterrupt:
            # every rank raises here together and the old world is still complete: flush, commit again
            for h in self._ours():
                h.flush()
            self.save()
            raise

    def reset(self):
        for h in self._ours():
            h.reset()
        super().reset()


def run(func):
    """hvd.elastic.run (a decorator for `train(state, ...)`): retries on failures and host changes.

    When `train` returns normally -- on every rank together, the end of training -- the state's
    gradcomp DistributedOptimizers are finalized (a periodic sync policy that left the ranks apart
    synchronizes, so the model the script saves next is the averaged one); inside the retried
    function, so a failure there is handled like one during training."""
    import functools
    _need_horovod()

    @functools.wraps(func)
    def train_then_finalize(state, *args, **kwargs):
        out = func(state, *args, **kwargs)
        for h in getattr(state, "_ours", lambda: [])():
            h.value.finalize()
        return out
    return _hvd_run(train_then_finalize)


# ------------------------------------------------------------------------------- torchrun elastic
def init_torchrun(timeout="default"):
    """Create the process group of this torchrun attempt and gradcomp_torch's default communicator.

    torchrun keeps one rendezvous store across restarts; the process group's keys are put under a
    prefix of the attempt (TORCHELASTIC_RESTART_COUNT), so a restarted worker never reads a
    peer's address from the attempt before (whose process is gone)."""
    import datetime

    import torch.distributed as dist

    from gradcomp.comm.torch_dist import TorchDistCommunicator, destroy_at_exit
    from gradcomp.config import resolve_timeout
    t = resolve_timeout(timeout)
    if not dist.is_initialized():
        env = os.environ
        attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), size, is_master=False,
                              timeout=datetime.timedelta(seconds=t or 1800), use_libuv=True)
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl" and "LOCAL_RANK" in env:
            torch.cuda.set_device(int(env["LOCAL_RANK"]))
        dist.init_process_group(backend, store=dist.PrefixStore(f"gradcomp/attempt{attempt}", store),
                                rank=rank, world_size=size,
                                **({"timeout": datetime.timedelta(seconds=t)} if t else {}))
        destroy_at_exit(dist)
    return runtime.init(comm=TorchDistCommunicator(timeout=t))


def save_elastic(path: str, model, opt, extra=None):
    """Collective: one checkpoint with every rank's gradcomp part keyed by (rank, world size);
    rank 0 writes it (atomically, sha256-checked). Returns the path on rank 0, None elsewhere."""
    sd = opt.gathered_state_dict()
    if opt.comm.rank != 0:
        return None
    size = opt.comm.size
    sd["gradcomp"]["ranks"] = {f"{r}/{size}": part for r, part in sd["gradcomp"]["ranks"].items()}
    obj = {"model": model.state_dict(), "optimizer": sd, "world_size": size, "extra": extra or {}}
    return save_checkpoint(obj, path)


def load_elastic(path: str, model, opt) -> dict:
    """Restore a save_elastic() checkpoint on this (possibly resized) world; returns its `extra`.

    Same world size: this rank's own part, exact (residuals included). Other size: the model and
    the wrapped optimizer's state, gradcomp's replicated state from the old rank 0's part, and the
    old ranks' residuals merged: their sum becomes the pending flush (added, divided by the old
    size, to the first update here), per-rank state restarts at zero. Returns {} if `path` does
    not exist (a fresh start)."""
    if not os.path.exists(path):
        return {}
    ck = load_checkpoint(path)
    model.load_state_dict(ck["model"])
    sd, old = ck["optimizer"], int(ck["world_size"])
    parts = {tuple(int(x) for x in k.split("/")): v for k, v in sd["gradcomp"]["ranks"].items()}
    if old == opt.comm.size:
        sd["gradcomp"]["ranks"] = {r: v for (r, s), v in parts.items()}
        opt.load_state_dict(sd)
        return ck.get("extra", {})
    return _load_remapped(sd, parts, old, opt) or ck.get("extra", {})


def _load_remapped(sd, parts, old, opt):
    from gradcomp_torch.checkpoint import _verify_part
    if not getattr(opt.policy, "synchronous", True):
        raise ValueError(f"this checkpoint was written by {old} rank(s) and this run has {opt.comm.size}: under "
                         f"sync policy {opt.policy.spec()!r} every rank holds its own parameters, which cannot be "
                         "remapped; resume with the same world size (or the default sync policy)")
    for (r, _), part in parts.items():
        _verify_part(part, r)
    if sorted(r for r, _ in parts) != list(range(old)):
        raise ValueError(f"elastic checkpoint holds the parts of ranks {sorted(r for r, _ in parts)} of a "
                         f"{old}-rank world; every rank's part is needed to remap it")
    p0 = parts[(0, old)]["sync"]
    keys = core.flush_keys(opt.gradient_sync.memory)
    merged = {}
    for (r, _), part in sorted(parts.items()):
        gs = part["sync"]
        for n, st in gs.get("memory_state", {}).items():
            vals = [st[k] for k in keys if st.get(k) is not None]
            if not vals:
                continue
            v = sum(vals[1:], vals[0]).reshape(-1).to(torch.float64 if gs["work_dtypes"].get(n) == "float64"
                                                        else torch.float32)
            v = v / float(gs.get("loss_scale", {}).get(n, 1.0))
            merged[n] = v if n not in merged else merged[n] + v
    inner = {k: v for k, v in sd.items() if k != "gradcomp"}
    gc = sd["gradcomp"]
    rep = dict(opt.replicated_state_dict())
    rep.update(step=int(gc["step"]))
    gsd = opt.gradient_sync
    # replicated part of the old rank 0's GradientSync state, then the merged residuals as the flush
    from gradcomp.state import split
    r_sd = dict(p0)
    r_sd["memory_state"] = {k: split(gsd.memory, v)[0] for k, v in p0.get("memory_state", {}).items()}
    r_sd["compressor_state"] = {k: split(gsd.compressor, v)[0] for k, v in p0.get("compressor_state", {}).items()}
    r_sd["replicated_only"] = True
    prev = {k: v * 1.0 for k, v in p0.get("flushed", {}).items()}
    prev_size = int(p0.get("flushed_size", old))
    for n, v in prev.items():                   # an older pending flush, in the old world's units
        merged[n] = merged[n] + v.reshape(-1) * (old / prev_size) if n in merged else v.reshape(-1) * (old / prev_size)
    r_sd["flushed"], r_sd["flushed_size"] = merged, old
    rep["sync_state"] = r_sd
    rep["policy_state"] = parts[(0, old)].get("policy", {})
    opt.inner.load_state_dict(inner)
    opt.load_replicated_state_dict(rep)
    return None
