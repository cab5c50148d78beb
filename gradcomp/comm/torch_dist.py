"""torch.distributed transport (Gloo on CPU, NCCL on GPU), for `torchrun` users.

    dist.init_process_group("gloo")          # or let make_communicator("torch", init=True) do it
    comm = TorchDistCommunicator()
    h = comm.allreduce(x, name="b0")         # dist.all_reduce(..., async_op=True)
    total = h.wait()                         # same type, dtype and device as x

  allreduce   all_reduce(SUM, async_op=True) on a private copy (the input is never modified).
              Gloo (torch >= 2.1) and NCCL both sum float16/bfloat16 natively, 2 bytes per element.
  allgather   Gloo needs equal sizes: (count, dtype) of every rank is gathered first (a small
              blocking all_gather at issue time), then the data is padded to the largest count,
              all_gather'ed asynchronously, and each rank's part trimmed in wait().
  broadcast   (count, dtype) broadcast first (blocking, small), then the data, asynchronously.
Arrays the process group cannot hold where they are (numpy / TF / CPU tensors under NCCL-only,
CUDA tensors under Gloo-only) are moved once to the group's device and back in wait().
Calls must be issued in the same order on every rank, from one thread.
Timeouts: `wait()` and the small blocking exchanges above are bounded by `timeout` seconds (default
GRADCOMP_TIMEOUT, 300; None or 0: no bound but the process group's own) and then raise
CollectiveTimeout naming the collective and the rank; torchrun ends the other ranks when one exits.
"""
from __future__ import annotations

import atexit
import socket

from gradcomp.comm.base import CODES as _CODES, Communicator, Handle, as_torch_1d, poll_until, timeout_error

_INSTALL = 'the "torch" backend needs PyTorch with torch.distributed: pip install "gradcomp[torch]"'


def import_dist():
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    if not dist.is_available():
        raise ImportError("this PyTorch build has no torch.distributed; install a build that has it: "
                          'pip install "gradcomp[torch]"')
    if not dist.is_initialized():      # before any group exists: see gradcomp_torch/_pg_pin.py
        import torch.distributed.nn.functional  # noqa: F401
    return torch, dist


def wait_work(work, timeout, op, name, rank, size, interrupt=None):
    """work.wait(), bounded by `timeout` seconds (None: unbounded) -> CollectiveTimeout.
    `interrupt` (a callable, or None) is called while waiting and may raise to give up the wait
    (gradcomp_torch.pool raises PeerFailure there when a peer of the group died)."""
    if interrupt is not None:
        poll_until(lambda: work.is_completed() or interrupt(), timeout,
                   lambda: timeout_error("torch.distributed", op, name, rank, size, timeout), poll_max=2e-3)
    elif timeout is not None:
        poll_until(work.is_completed, timeout,
                   lambda: timeout_error("torch.distributed", op, name, rank, size, timeout))
    work.wait()


class TorchHandle(Handle):
    def __init__(self, work, post, op, name, rank, timeout, size=0, interrupt=None):
        self.work, self.post, self.op, self.name, self.rank, self.timeout = work, post, op, name, rank, timeout
        self.size, self.interrupt = size, interrupt
        self._got, self._value = False, None

    def done(self):
        return self._got or self.work is None or self.work.is_completed()

    def wait(self, timeout=None):
        if self._got:
            return self._value
        t = self.timeout if timeout is None else timeout
        if self.work is not None:
            wait_work(self.work, t, self.op, self.name, self.rank, self.size, self.interrupt)
        self._value, self._got, self.post = self.post(), True, None
        return self._value


def pg_timeout(timeout) -> dict:
    """init_process_group's `timeout=` for a gradcomp timeout (seconds or None): its own blocking
    calls are then bounded alike; None keeps torch's default."""
    if timeout is None:
        return {}
    import datetime
    return {"timeout": datetime.timedelta(seconds=timeout)}


def destroy_at_exit(dist):
    """A process group gradcomp created is destroyed at exit: Gloo's threads left running then make
    the C++ runtime abort ("terminate called without an active exception") once in a few exits."""
    def _destroy():
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
    atexit.register(_destroy)


class TorchDistCommunicator(Communicator):
    """Communicator over a torch.distributed process group (default: the world)."""

    engine = "torch"
    accepts_donation = True
    native_sendrecv = True
    interrupt = None                # see wait_work

    def __init__(self, group=None, *, init: bool = False, init_backend: str | None = None,
                 timeout="default", local_rank: int | None = None):
        from gradcomp.config import resolve_timeout
        timeout = resolve_timeout(timeout)
        torch, dist = self.torch, self.dist = import_dist()
        if not dist.is_initialized():
            if not init:
                raise RuntimeError("torch.distributed has no process group yet: call "
                                   "torch.distributed.init_process_group(...) first (launch with torchrun), "
                                   "or use make_communicator('torch', init=True)")
            dist.init_process_group(init_backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                                    **pg_timeout(timeout))
            destroy_at_exit(dist)
        self.group, self.timeout = group, timeout
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        pg = str(dist.get_backend(group)).lower()
        self.cpu_ok = any(b in pg for b in ("gloo", "mpi", "cpu:"))
        self.cuda_ok = "nccl" in pg or "cuda:" in pg
        self.home = torch.device("cpu") if self.cpu_ok else torch.device("cuda", torch.cuda.current_device())
        if local_rank is None:                      # ranks on this host, ordered by rank
            hosts = [None] * self.size
            dist.all_gather_object(hosts, socket.gethostname(), group=group)
            local_rank = sum(1 for h in hosts[:self.rank] if h == hosts[self.rank])
        self.local_rank = int(local_rank)

    # ------------------------------------------------------------------ conversion
    def _tensor(self, x):
        """(1-D tensor the group can use, whether it is a private copy, way back to x's kind)."""
        from_torch = type(x).__module__.startswith("torch")
        t, back = as_torch_1d(x, "torch")
        if not from_torch:                          # numpy / TF: host memory, moved to the group's device
            moved = t.to(self.home) if self.home.type != "cpu" else t
            return moved, moved is not t, back
        ok = self.cpu_ok if t.device.type == "cpu" else (t.device.type == "cuda" and self.cuda_ok)
        if ok:
            return t, False, back
        dev = t.device
        return t.to(self.home), True, lambda r: r.to(dev)

    def _wait(self, work, op, name):
        wait_work(work, self.timeout, op, name, self.rank, self.size, self.interrupt)

    def _meta(self, t):
        return self.torch.tensor([t.numel(), _CODES.index(str(t.dtype).replace("torch.", ""))],
                                 dtype=self.torch.int64, device=t.device)

    # ------------------------------------------------------------------ collectives
    def allreduce(self, x, *, name="", donate=False):
        t, private, back = self._tensor(x)
        torch = self.torch
        out = t if private or (donate and torch.is_tensor(x) and t.data_ptr() == x.data_ptr()) else t.clone()
        work = self.dist.all_reduce(out, op=self.dist.ReduceOp.SUM, group=self.group, async_op=True)
        return TorchHandle(work, lambda: back(out), "allreduce", name, self.rank, self.timeout, self.size, self.interrupt)

    def allgather(self, x, *, name=""):
        torch, dist = self.torch, self.dist
        t, _, back = self._tensor(x)
        mine = self._meta(t)
        metas = [torch.empty_like(mine) for _ in range(self.size)]
        self._wait(dist.all_gather(metas, mine, group=self.group, async_op=True), "allgather", name)
        metas = torch.stack(metas).cpu()
        codes = metas[:, 1].tolist()
        if len(set(codes)) != 1:
            raise ValueError(f"allgather({name!r}): ranks passed different dtypes {[_CODES[c] for c in codes]}; "
                             "every rank must send the same dtype")
        counts = metas[:, 0].tolist()
        top = max(counts)
        padded = t if t.numel() == top else torch.cat([t, t.new_zeros(top - t.numel())])
        outs = [torch.empty(top, dtype=t.dtype, device=t.device) for _ in range(self.size)]
        work = dist.all_gather(outs, padded, group=self.group, async_op=True)
        return TorchHandle(work, lambda: [back(o[:c]) for o, c in zip(outs, counts)], "allgather", name,
                           self.rank, self.timeout, self.size, self.interrupt)

    def sendrecv(self, x, *, dest=None, source=None, count=None, name=""):
        """torch.distributed isend to `dest` and irecv from `source`, in one batch_isend_irecv."""
        from gradcomp.comm.base import check_peers
        check_peers(self, dest, source, name)
        torch, dist = self.torch, self.dist
        t, _, back = self._tensor(x)
        glob = (lambda r: r) if self.group is None else (lambda r: dist.get_global_rank(self.group, r))
        out = torch.empty(t.numel() if count is None else int(count), dtype=t.dtype, device=t.device) \
            if source is not None else None
        ops = ([dist.P2POp(dist.irecv, out, glob(source), self.group)] if source is not None else []) + \
            ([dist.P2POp(dist.isend, t.contiguous(), glob(dest), self.group)] if dest is not None else [])
        works = dist.batch_isend_irecv(ops) if ops else []

        def post():          # gloo's point-to-point works complete in wait(), not by polling is_completed
            import datetime
            for w in works:
                try:
                    w.wait(datetime.timedelta(seconds=self.timeout)) if self.timeout is not None else w.wait()
                except RuntimeError as e:
                    if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
                        raise
                    raise timeout_error("torch.distributed", "sendrecv", name, self.rank, self.size,
                                        self.timeout, str(e)) from e
            return None if out is None else back(out)
        return TorchHandle(None, post, "sendrecv", name, self.rank, self.timeout, self.size)

    def broadcast(self, x, *, root=0, name=""):
        if not isinstance(root, int) or not 0 <= root < self.size:
            raise ValueError(f"broadcast root must be a rank in [0, {self.size}), got {root!r}")
        torch, dist = self.torch, self.dist
        t, private, back = self._tensor(x)
        src = root if self.group is None else dist.get_global_rank(self.group, root)
        hdr = self._meta(t)
        self._wait(dist.broadcast(hdr, src=src, group=self.group, async_op=True), f"broadcast[{root}]", name)
        n, code = (int(v) for v in hdr.cpu().tolist())
        mine = str(t.dtype).replace("torch.", "")
        if self.rank == root or (n == t.numel() and _CODES[code] == mine):
            out = t if private else t.clone()
        else:                                       # receive what root sends, then complain
            out = torch.empty(n, dtype=getattr(torch, _CODES[code]), device=t.device)
        work = dist.broadcast(out, src=src, group=self.group, async_op=True)

        def post():
            if _CODES[code] != mine:
                raise ValueError(f"broadcast({name!r}): root {root} sent {_CODES[code]} but rank {self.rank} "
                                 f"passed {mine}; pass the same dtype on every rank")
            return back(out)
        return TorchHandle(work, post, f"broadcast[{root}]", name, self.rank, self.timeout, self.size, self.interrupt)
