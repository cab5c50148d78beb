"""Checkpointing of DistributedOptimizer: exact for every sync policy, checksummed, loaded without pickle.

The one exact way (default policy and the periodic ones: localsgd, da, da-pipelined, slowmo):

    sd = opt.gathered_state_dict()                 # collective: call on every rank
    if gct.rank() == 0:
        gct.save_checkpoint({"model": model.state_dict(), "optimizer": sd, "epoch": e}, path)
    ...
    ck = gct.load_checkpoint(path)                 # every rank reads the one file: sha256 checked,
    model.load_state_dict(ck["model"])             #   weights_only; first the model (rank 0's values),
    opt.load_state_dict(ck["optimizer"])           #   then each rank takes its own part (below)

What a rank's part holds (state classes, gradcomp/state.py): GradientSync's state (residuals and
compressor state: per rank), the sync policy's state, and under a policy that does not average
gradients every step (`policy.synchronous` False: the periodic ones) also this rank's parameters
and this rank's wrapped-optimizer state (momentum), which differ between ranks between syncs.
load_state_dict() writes that rank's parameters into the model, so call it after
model.load_state_dict(). Under the default policy parameters and optimizer state are identical on
every rank and travel once, in the wrapped optimizer's own state_dict.

One file per rank works too (`opt.state_dict()` on every rank, each loading its own); a file with
only some ranks' parts is refused on the others, naming what to do.

Integrity and validation: state_dict() stores a sha256 of the wrapped optimizer's state and of each
rank's part; load_state_dict() first checks everything (checksums, compressor, memory, sync policy,
seed, world size, that this rank's part is there, parameter names and shapes, parameter groups)
and only then changes anything; should a step of the restore still fail, everything is rolled
back, so a failed load leaves the optimizer, the model and gradcomp's state exactly as they were.
`save_checkpoint(obj, path)` writes atomically with a sha256 of the whole file, `load_checkpoint`
checks it (a flipped byte anywhere: a ValueError naming the file) and loads with
`torch.load(weights_only=True)`: tensors, numbers, strings and containers only, so a crafted file
cannot run code. The parts exchanged by gathered_state_dict and broadcast_object are decoded the
same way.

Horovod's resume idiom also works:

    if rank == 0: opt.load_state_dict(gct.load_checkpoint(path)["optimizer"])
    gct.broadcast_parameters(model.state_dict(), root_rank=0)
    gct.broadcast_optimizer_state(opt, root_rank=0)

(broadcast_parameters first, as Horovod's examples do: under a periodic policy the optimizer broadcast
then writes each rank's own parameters from the gathered checkpoint over rank 0's.)
broadcast_optimizer_state sends the wrapped optimizer's state and gradcomp's *replicated* state
(step counter, seed-derived state, GMC's global momentum, PowerSGD's Q, the policy's counters,
anchor and slow momentum), so every rank continues at the same step. Per-rank state is never
broadcast: if rank 0 had just loaded a gathered checkpoint, each rank receives *its own* part of it
and the resume is exact; otherwise every other rank's residuals (and delta residuals) restart at
zero. We restart them rather than keep them because a rank's old residual belongs to whatever
history that process had (none for a fresh process), not to the restored step; zero is what a
fresh start has and makes the result independent of process history.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings

import numpy as np
import torch

from gradcomp.state import restore, snapshot

_MAGIC = b"GRADCOMP-CHECKPOINT-1 sha256="
_FORMAT = 2


# ---------------------------------------------------------------------------------- safe bytes
def dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def safe_loads(data: bytes, what: str, map_location="cpu"):
    """torch.load(weights_only=True) of `data`; a clear ValueError if it holds anything else."""
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{what}: refused to load: it holds objects other than tensors, numbers, strings and "
                         f"containers ({first[:200]}). gradcomp loads with torch.load(weights_only=True) so that "
                         "a file or a peer cannot run code here; pass plain data.") from None


def digest(obj) -> str:
    """sha256 of a canonical encoding of nested dicts/lists/tuples of tensors, arrays and scalars."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, x):
    if isinstance(x, dict):
        h.update(b"{%d" % len(x))
        for k in sorted(x, key=lambda k: (type(k).__name__, str(k))):
            _feed(h, k)
            _feed(h, x[k])
    elif isinstance(x, (list, tuple)):
        h.update(b"[%d" % len(x))
        for v in x:
            _feed(h, v)
    elif torch.is_tensor(x):
        t = x.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(x.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(x, np.ndarray):
        a = np.ascontiguousarray(x)
        h.update(f"A{a.dtype}{a.shape}:".encode())
        h.update(a.tobytes())
    elif x is None or isinstance(x, (bool, int, float, str, np.generic)):
        h.update(f"{type(x).__name__}:{x!r};".encode())
    else:
        h.update(f"{type(x).__name__}:{x!r};".encode())


# ---------------------------------------------------------------------------------- files
def save_checkpoint(obj, path: str) -> str:
    """Write `obj` (torch.save format) to `path` atomically, with a sha256 of its bytes in front."""
    data = dumps(obj)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(_MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str, map_location="cpu"):
    """Read a file of save_checkpoint(): checks its sha256, then torch.load(weights_only=True)."""
    with open(path, "rb") as f:
        raw = f.read()
    head, sep, data = raw.partition(b"\n")
    if not head.startswith(_MAGIC) or not sep:
        raise ValueError(f"{path}: not a gradcomp checkpoint (no '{_MAGIC.decode()}' header; written by "
                         "gradcomp_torch.save_checkpoint?). A plain torch file loads with "
                         "torch.load(path, weights_only=True), without an integrity check")
    want = head[len(_MAGIC):].decode(errors="replace")
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise ValueError(f"{path}: checksum mismatch (sha256 {got[:16]}... but the header says {want[:16]}...): the "
                         "file is corrupted (a changed or truncated byte); nothing was loaded. Restore from "
                         "another checkpoint")
    return safe_loads(data, path, map_location)


# ---------------------------------------------------------------------------------- the mixin
class CheckpointMixin:
    """state_dict / gathered_state_dict / load_state_dict / replicated state for DistributedOptimizer.

    API for code that moves state between ranks (elastic training, Horovod's idiom):
      state_dict()                   this rank's everything (["gradcomp"]["ranks"][rank]), checksummed
      gathered_state_dict()          collective: every rank's part in one dict
      load_state_dict(sd)            this rank's part; all checks first, all or nothing
      replicated_state_dict()        only state identical on every rank (gradcomp/state.py): safe to
                                     broadcast from any rank; never holds residuals
      load_replicated_state_dict(r)  adopt it: same step and shared state, per-rank state restarts at
                                     zero (the wrapped optimizer's state is not touched)
    """

    # -------------------------------------------------------------- saving
    def _holds_local_copies(self) -> bool:
        """Do parameters and optimizer state differ per rank (a policy with local steps)?"""
        return not getattr(self._policy, "synchronous", True)

    def _local_gradcomp_state(self) -> dict:
        part = {"sync": self._gs.state_dict(), "policy": self._policy.state_dict()}
        if self._holds_local_copies():
            part["params"] = {n: p.detach().clone() for n, p in self._named}
            part["optimizer_state"] = self.inner.state_dict()["state"]
        part["checksum"] = digest(part)
        return part

    def _header(self) -> dict:
        return {"version": _FORMAT, "rank": self.comm.rank, "size": self.comm.size, "step": self._step,
                "compressor": self._gs.compressor.spec(), "memory": self._gs.memory.spec(),
                "sync": self._policy.spec(), "seed": self._gs.seed,
                "params": {n: list(p.shape) for n, p in self._named}}

    def _require_idle(self, what):
        with self._lock:
            if self._launched and not self._synced:
                raise RuntimeError(f"{what} while gradients are being averaged; call it after step()")

    def state_dict(self) -> dict:
        """The wrapped optimizer's state_dict plus "gradcomp": configuration, step, checksums and this
        rank's part under ["ranks"][rank]. Use gathered_state_dict() to collect every rank's part."""
        self._require_idle("state_dict()")
        self._policy.flush()                 # da-pipelined: the momentum average lands in the optimizer first
        part = self._local_gradcomp_state()
        sd = self.inner.state_dict()
        gc = self._header()
        gc["optimizer_checksum"] = digest(sd)
        gc["ranks"] = {self.comm.rank: part}
        sd["gradcomp"] = gc
        return sd

    def gathered_state_dict(self) -> dict:
        """Collective (call on every rank): state_dict() holding every rank's part, so one file
        written by rank 0 restores every rank exactly (see the module docstring). It is an allgather:
        every rank holds all parts for a moment (under a periodic policy that is world-size copies of
        the parameters and optimizer state); where that is too much, let every rank save its own
        state_dict() instead."""
        sd = self.state_dict()
        raw = np.frombuffer(dumps(sd["gradcomp"]["ranks"][self.comm.rank]), dtype=np.uint8).copy()
        parts = self.comm.allgather(raw, name="gathered_state_dict").wait()
        ranks = {}
        for r, p in enumerate(parts):
            part = safe_loads(np.asarray(p, dtype=np.uint8).tobytes(), f"gathered_state_dict: rank {r}'s part")
            _verify_part(part, r)
            ranks[r] = part
        sd["gradcomp"]["ranks"] = ranks
        return sd

    # -------------------------------------------------------------- loading
    def _validate(self, sd: dict, gc: dict):
        """Every check of load_state_dict, before anything changes. Returns this rank's part."""
        rank, size = self.comm.rank, self.comm.size
        if not isinstance(gc, dict) or "ranks" not in gc:
            raise ValueError("the 'gradcomp' entry of this state_dict is not a DistributedOptimizer state; pass "
                             "what opt.state_dict() or opt.gathered_state_dict() returned")
        version = int(gc.get("version", 1))
        if version > _FORMAT:
            raise ValueError(f"checkpoint format {version} is newer than this gradcomp ({_FORMAT}); upgrade gradcomp")
        mine = {"compressor": self._gs.compressor.spec(), "memory": self._gs.memory.spec(),
                "sync": self._policy.spec()}
        if version >= 2:
            mine["seed"] = self._gs.seed
        for key, want in mine.items():
            if gc.get(key) != want:
                env = {"compressor": "GRADCOMP_COMPRESSOR", "memory": "GRADCOMP_MEMORY", "sync": "GRADCOMP_SYNC",
                       "seed": "GRADCOMP_SEED"}[key]
                raise ValueError(f"checkpoint was saved with {key} {gc.get(key)!r} but this run uses {want!r}; "
                                 f"resume with the same configuration ({env} / the {key}= argument)")
        if int(gc.get("size", size)) != size:
            raise ValueError(f"checkpoint was written by {gc.get('size')} rank(s) but this run has {size}; "
                             "per-rank residuals cannot be mapped. Resume with the same number of ranks, or "
                             "load_state_dict() of the wrapped optimizer only (optimizer.inner) to restart "
                             "error feedback from zero")
        ranks = {int(k): v for k, v in gc["ranks"].items()}
        part = ranks.get(rank)
        if part is None:
            raise ValueError(f"checkpoint holds the gradcomp state of rank(s) {sorted(ranks)} only, not of "
                             f"rank {rank}; save with optimizer.gathered_state_dict() on every "
                             "rank (rank 0 writes it), or let every rank save its own state_dict()")
        if "optimizer_checksum" in gc:
            inner = {k: v for k, v in sd.items() if k != "gradcomp"}
            if digest(inner) != gc["optimizer_checksum"]:
                raise ValueError("checkpoint: the wrapped optimizer's state fails its checksum: the checkpoint "
                                 "was corrupted (or edited after state_dict()); nothing was loaded")
        if version >= 2:
            _verify_part(part, rank)
        names = {n: list(p.shape) for n, p in self._named}
        if "params" in gc and {k: list(v) for k, v in gc["params"].items()} != names:
            saved = {k: list(v) for k, v in gc["params"].items()}
            diff = sorted(set(saved) ^ set(names)) or [n for n in names if saved[n] != names[n]]
            raise ValueError(f"checkpoint's parameters differ from this model's (first differences: {diff[:4]}); "
                             "resume with the same model")
        for n, shape in part.get("sync", {}).get("shapes", {}).items():
            if n not in names or int(np.prod(shape)) != int(np.prod(names[n])):
                raise ValueError(f"checkpoint holds gradcomp state for {n!r} of shape {list(shape)}, which this "
                                 "model does not have; resume with the same model")
        for n, st in part.get("sync", {}).get("memory_state", {}).items():
            for k, v in (st or {}).items():     # residuals and momenta: one value per entry of the tensor
                if torch.is_tensor(v) and n in names and v.numel() != int(np.prod(names[n])):
                    raise ValueError(f"checkpoint's {k!r} state of {n!r} has {v.numel()} values, the parameter "
                                     f"{int(np.prod(names[n]))}; the checkpoint does not belong to this model")
        groups = sd.get("param_groups")
        own = self.inner.param_groups
        if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != [len(g["params"]) for g in own]:
            raise ValueError("checkpoint's parameter groups differ from the wrapped optimizer's (number of groups "
                             "or parameters per group); resume with the same optimizer set-up")
        local = self._holds_local_copies()
        if version >= 2 and local != ("params" in part):
            raise ValueError(f"checkpoint and this run differ in whether ranks keep local parameters (sync policy "
                             f"{gc.get('sync')!r}); resume with the same GRADCOMP_SYNC")
        for n, t in (part.get("params") or {}).items():
            if n not in names or list(t.shape) != names[n]:
                raise ValueError(f"checkpoint's parameter {n!r} has shape {list(t.shape)}; expected {names.get(n)}")
        return part

    def load_state_dict(self, state_dict: dict):
        """Restore the wrapped optimizer and this rank's gradcomp state (residuals, step, policy, and
        under a periodic policy this rank's parameters and optimizer state). Everything is checked
        first; a failed load changes nothing (see the module docstring)."""
        self._require_idle("load_state_dict()")
        sd = dict(state_dict)
        gc = sd.pop("gradcomp", None)
        if gc is None:
            warnings.warn("state_dict without gradcomp state (a plain optimizer checkpoint?): error-feedback "
                          "residuals and the step counter were not restored", stacklevel=2)
            self.inner.load_state_dict(sd)
            with self._lock:
                self._reset_step_state()
            return
        part = self._validate(sd, gc)
        if "optimizer_state" in part:
            sd["state"] = part["optimizer_state"]
        # torch's load_state_dict adopts the given tensors: clone, so that training does not change the
        # caller's dict (it stays a valid checkpoint, e.g. for broadcast_optimizer_state right after)
        sd["state"] = {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                       if isinstance(v, dict) else v for k, v in sd.get("state", {}).items()}
        self._apply(lambda: self._load_parts(sd, part, int(gc["step"])))
        # kept for broadcast_optimizer_state right after this load (Horovod's idiom): each rank's own part
        full = len(gc["ranks"]) == self.comm.size
        self._loaded_checkpoint = (self._step, dict(state_dict)) if full else None

    def _load_parts(self, inner_sd, part, step):
        self.inner.load_state_dict(inner_sd)
        self._gs.load_state_dict(part["sync"])
        self._policy.load_state_dict(part["policy"])
        if part.get("params") is not None:
            with torch.no_grad():
                for n, p in self._named:
                    p.copy_(part["params"][n].to(device=p.device, dtype=p.dtype))
        self._step = step

    def _apply(self, fn):
        """Run `fn` (which restores state); on any error undo everything it changed, then re-raise."""
        with self._lock:
            inner = self.inner.state_dict()                  # aliases the live tensors: load only rebinds
            inner = {"state": dict(inner["state"]), "param_groups": [dict(g) for g in inner["param_groups"]]}
            params = [p.detach().clone() for _, p in self._named] if self._holds_local_copies() else None
            snaps = snapshot(self._gs, self._policy)
            step = self._step
            try:
                fn()
            except BaseException:
                self.inner.load_state_dict(inner)
                if params is not None:
                    with torch.no_grad():
                        for (_, p), v in zip(self._named, params):
                            p.copy_(v)
                restore(snaps)
                self._step = step
                raise
            finally:
                self._reset_step_state()

    # -------------------------------------------------------------- replicated state (broadcasts)
    def replicated_state_dict(self) -> dict:
        """gradcomp's replicated state only (gradcomp/state.py): step, configuration, GradientSync's and
        the policy's replicated parts. Identical on every rank; never holds residuals."""
        self._require_idle("replicated_state_dict()")
        self._policy.flush()
        return dict(self._header(), replicated_only=True, sync_state=self._gs.replicated_state_dict(),
                    policy_state=self._policy.replicated_state_dict())

    def load_replicated_state_dict(self, rep: dict):
        """Adopt a peer's replicated_state_dict(): same step and shared state; this rank's per-rank state
        (residuals, delta residuals) restarts at zero. Validated first; a failure changes nothing."""
        self._require_idle("load_replicated_state_dict()")
        if not isinstance(rep, dict) or not rep.get("replicated_only"):
            raise ValueError("not a replicated_state_dict() of a DistributedOptimizer")
        for key, want in (("compressor", self._gs.compressor.spec()), ("memory", self._gs.memory.spec()),
                          ("sync", self._policy.spec()), ("seed", self._gs.seed), ("size", self.comm.size),
                          ("params", {n: list(p.shape) for n, p in self._named})):
            if rep.get(key) != want:
                raise ValueError(f"the broadcast gradcomp state has {key} {rep.get(key)!r} but this rank has "
                                 f"{want!r}; every rank must run the same configuration")

        def load():
            self._gs.load_replicated_state_dict(rep["sync_state"])
            self._policy.load_replicated_state_dict(rep["policy_state"])
            self._step = int(rep["step"])
        self._apply(load)

    def _broadcast_state(self, root_rank: int, comm, broadcast_object):
        """broadcast_optimizer_state for a DistributedOptimizer (Horovod's resume idiom; module docstring)."""
        self._require_idle("broadcast_optimizer_state()")
        payload = None
        if comm.rank == root_rank:
            ck = getattr(self, "_loaded_checkpoint", None)
            ck = ck[1] if ck is not None and ck[0] == self._step else None      # no step taken since the load
            payload = {"checkpoint": ck} if ck is not None else \
                {"inner": self.inner.state_dict(), "replicated": self.replicated_state_dict()}
        got = broadcast_object(payload, root_rank, comm, name="broadcast_optimizer_state")
        self._loaded_checkpoint = None
        if comm.rank == root_rank:
            return
        if got.get("checkpoint") is not None:
            self.load_state_dict(got["checkpoint"])          # this rank's own part of the gathered checkpoint
            return
        self.load_replicated_state_dict(got["replicated"])
        self._apply(lambda: self.inner.load_state_dict(got["inner"]))


def _verify_part(part, rank):
    if not isinstance(part, dict) or "sync" not in part:
        raise ValueError(f"checkpoint: rank {rank}'s gradcomp part is not a DistributedOptimizer state")
    want = part.get("checksum")
    body = {k: v for k, v in part.items() if k != "checksum"}
    if want is None or digest(body) != want:
        raise ValueError(f"checkpoint: rank {rank}'s gradcomp state fails its checksum: the checkpoint was "
                         "corrupted (or edited after state_dict()); nothing was loaded")
