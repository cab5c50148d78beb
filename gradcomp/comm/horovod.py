"""Horovod transport: Horovod's own asynchronous collectives (horovod.torch), for `horovodrun` users.

    hvd.init()                               # or HorovodCommunicator(init=True) (the default)
    comm = HorovodCommunicator()
    h = comm.allreduce(x, name="b0")         # hvd.allreduce_async_(copy, op=hvd.Sum)
    total = h.wait()                         # hvd.synchronize(); same type/dtype/device as x

  allreduce   allreduce_async_ (op=Sum) on a private copy (in place on a donated tensor); Horovod's
              fusion buffer and background thread batch it with other pending tensors. Horovod 0.28
              cannot sum bfloat16, int8 or uint8: those are summed as float32 / int32 and cast back
              (rounded once to nearest-even, integers wrap), so 4 bytes per element travel for them.
  allreduce_group  grouped_allreduce_async_ (op=Sum): one group, fused by Horovod's background thread
              (in place on donated tensors, on private copies otherwise).
  allgather   allgather_async of the data (first dimensions may differ) plus a 2-element
              (count, dtype) allgather issued right beside it, so wait() can split by rank.
  broadcast   broadcast_async_ on a private copy (Horovod requires equal shapes on every rank).
numpy arrays ride through CPU torch tensors (zero-copy `torch.from_numpy`), TF eager tensors through
`.numpy()`. Horovod matches tensors across ranks by name: names are "gradcomp.<call#>.<name>", so
calls must be issued in the same order on every rank. Horovod is imported lazily; without it an
ImportError says how to build it (`bash mpi/build_horovod.sh`). `wait()` polls Horovod's handles
and raises CollectiveTimeout after `timeout` seconds (default GRADCOMP_TIMEOUT, 300; None or 0: it
blocks in hvd.synchronize); Horovod itself ends the job when a rank dies.
"""
from __future__ import annotations

from gradcomp.comm.base import CODES as _CODES, Communicator, Handle, as_torch_1d, poll_until, timeout_error

_INSTALL = ('the "horovod" backend needs Horovod built for PyTorch; from the gradcomp source tree run '
            '`bash mpi/build_horovod.sh` (Horovod 0.28.1 with MPI+Gloo, C++17 wrapper for torch>=2.1), '
            'or use backend "mpi" or "torch", which need no Horovod')


# dtypes Horovod 0.28's torch allreduce lacks: summed in a wider type (more bytes on the wire)
_WIDEN = {"bfloat16": "float32", "int8": "int32", "uint8": "int32"}


def _bits(t, torch):
    """bfloat16 moves through allgather/broadcast as its 16 bits (Horovod has no bf16 type)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def import_horovod():
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise ImportError(f"{_INSTALL} ({e})") from e
    return hvd


class HorovodHandle(Handle):
    def __init__(self, hvd, handles, post, op, name, rank, timeout, size=0):
        self.hvd, self.handles, self.post = hvd, handles, post
        self.op, self.name, self.rank, self.timeout, self.size = op, name, rank, timeout, size
        self._got, self._value = False, None

    def done(self):
        return self._got or all(self.hvd.poll(h) for h in self.handles)

    def wait(self, timeout=None):
        if self._got:
            return self._value
        t = self.timeout if timeout is None else timeout
        if t is not None:
            poll_until(lambda: all(self.hvd.poll(h) for h in self.handles), t,
                       lambda: timeout_error("Horovod", self.op, self.name, self.rank, self.size, t))
        outs = [self.hvd.synchronize(h) for h in self.handles]
        self._value, self._got, self.post = self.post(*outs), True, None
        return self._value


class HorovodCommunicator(Communicator):
    """Communicator over Horovod (horovod.torch). `hvd` may be passed in; it is imported otherwise."""

    engine = "horovod"
    accepts_donation = True

    def __init__(self, hvd=None, *, init: bool = True, timeout="default"):
        from gradcomp.config import resolve_timeout
        timeout = resolve_timeout(timeout)
        hvd = self.hvd = hvd if hvd is not None else import_horovod()
        self.torch = __import__("torch")
        if not hvd.is_initialized():
            if not init:
                raise RuntimeError("Horovod is not initialized: call hvd.init() first or pass init=True")
            hvd.init()
        self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        self.timeout = timeout
        self._seq = 0

    def _name(self, name, op):
        self._seq += 1
        return f"gradcomp.{self._seq}.{name or op}"

    def _tensor(self, x):
        """(1-D torch tensor viewing x, way back to x's kind)."""
        return as_torch_1d(x, "Horovod")

    # ------------------------------------------------------------------ collectives
    def allreduce(self, x, *, name="", donate=False):
        hvd, torch = self.hvd, self.torch
        t, back = self._tensor(x)
        wide = _WIDEN.get(str(t.dtype).replace("torch.", ""))
        if wide is not None:                        # Horovod 0.28 cannot sum bf16 / int8 / uint8
            orig = t.dtype
            out, back0 = t.to(getattr(torch, wide)), back
            back = lambda r: back0(r.to(orig))     # noqa: E731 - integer sums wrap like the dtype
        else:                                       # a donated tensor is summed in place
            out = t if donate and t.data_ptr() == getattr(x, "data_ptr", lambda: None)() else t.clone()
        h = hvd.allreduce_async_(out, op=hvd.Sum, name=self._name(name, "allreduce"))
        return HorovodHandle(hvd, [h], lambda r: back(r), "allreduce", name, self.rank, self.timeout, self.size)

    def allreduce_group(self, xs, *, name="", donate=None):
        """Horovod's grouped allreduce: the tensors go to its fusion buffer from its background thread
        (no concatenation on the caller's thread); donated tensors are summed in place."""
        hvd = self.hvd
        if len(xs) < 2 or not all(type(x).__module__.startswith("torch") for x in xs) or \
                any(str(x.dtype).replace("torch.", "") in _WIDEN for x in xs):
            return super().allreduce_group(xs, name=name, donate=donate)
        donate = donate or [False] * len(xs)
        outs = []
        for x, give in zip(xs, donate):
            t, _ = self._tensor(x)
            outs.append(t if give and t.data_ptr() == x.data_ptr() else t.clone())
        h = hvd.grouped_allreduce_async_(outs, op=hvd.Sum, name=self._name(name, "allreduce_group"))
        return HorovodHandle(hvd, [h], lambda r: list(r), "allreduce_group", name, self.rank, self.timeout, self.size)

    def allgather(self, x, *, name=""):
        hvd, torch = self.hvd, self.torch
        t, back = self._tensor(x)
        nm = self._name(name, "allgather")
        meta = torch.tensor([t.numel(), _CODES.index(str(t.dtype).replace("torch.", ""))], dtype=torch.int64)
        hm = hvd.allgather_async(meta, name=nm + ".meta")
        hd = hvd.allgather_async(_bits(t, torch), name=nm)

        def post(metas, data):
            metas = metas.view(-1, 2).tolist()
            if len({c for _, c in metas}) != 1:
                raise ValueError(f"allgather({name!r}): ranks passed different dtypes "
                                 f"{[_CODES[c] for _, c in metas]}; every rank must send the same dtype")
            parts = torch.split(data.view(t.dtype), [n for n, _ in metas])
            return [back(p) for p in parts]
        return HorovodHandle(hvd, [hm, hd], post, "allgather", name, self.rank, self.timeout, self.size)

    def broadcast(self, x, *, root=0, name=""):
        if not isinstance(root, int) or not 0 <= root < self.size:
            raise ValueError(f"broadcast root must be a rank in [0, {self.size}), got {root!r}")
        hvd = self.hvd
        t, back = self._tensor(x)
        out = _bits(t, self.torch).clone()
        h = hvd.broadcast_async_(out, root_rank=root, name=self._name(name, "broadcast"))
        return HorovodHandle(hvd, [h], lambda r: back(r.view(t.dtype)), f"broadcast[{root}]", name, self.rank,
                             self.timeout, self.size)
