"""The Communicator interface: the only code that touches a communication engine.

Every collective takes one 1-D array (the pipeline fuses payloads first), is issued
asynchronously and returns a Handle; `Handle.wait()` returns the result:
  allreduce(x)  -> the element-wise sum over ranks (same dtype and length)
  allgather(x)  -> list over ranks of each rank's 1-D array (lengths may differ per rank)
  broadcast(x)  -> root's array
Calls must be issued in the same order on every rank (as with MPI); `name` labels errors.

  allreduce_group(xs) -> list of the sums of several 1-D arrays of one dtype, as one collective
                   (default: concatenated, one allreduce, split; Horovod: its grouped allreduce)
  sendrecv(x, dest=, source=) -> the array `source` sent to this rank (pairwise exchange, issued
                   by every rank in the same order like a collective; gTop-k's tree merge uses it).
                   `native_sendrecv = True`: only the pairwise messages travel (LocalWorld, MPI,
                   torch.distributed); otherwise (Horovod) it runs as an allgather, so every rank
                   receives every rank's message, and gradcomp/traffic.py counts it that way.
Ownership (what lets the pipeline skip copies): a transport with `accepts_donation = True` takes
`allreduce(x, name=..., donate=True)`, meaning the caller gives `x` away, so the sum may be written
into it in place; and with size > 1 its allreduce results are always private to the caller (never
the input nor a buffer it keeps) or a donated input, so the caller may modify them in place.
`allreduce_group(xs, donate=[...])` takes one flag per array.
"""
from __future__ import annotations

import hashlib
import json


class CollectiveTimeout(TimeoutError):
    """A collective waited longer than the communicator's timeout (GRADCOMP_TIMEOUT / init(timeout=))."""


def timeout_error(engine: str, op: str, name: str, rank: int, size: int, seconds: float,
                  detail: str = "") -> CollectiveTimeout:
    """The error every transport raises when a wait times out: the collective, the rank, the likely
    causes and what to do."""
    return CollectiveTimeout(
        f"{engine} {op}({name!r}) did not finish within {seconds:g}s on rank {rank} of {size}"
        + (f" ({detail})" if detail else "") + ": a peer rank has probably failed, hung, or issued its "
        "collectives in a different order. Look in the other ranks' output for their error; if a step "
        "legitimately takes longer, raise GRADCOMP_TIMEOUT (seconds) or pass init(timeout=...); "
        "GRADCOMP_TIMEOUT=0 disables the timeout.")


def poll_until(done, timeout, on_timeout, poll_max: float = 5e-4):
    """Return once `done()` is true, polling with a sleep backing off to `poll_max` seconds; after
    `timeout` seconds (None: never) raise `on_timeout()`."""
    import time
    if done():
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 2e-5
    while not done():
        if deadline is not None and time.monotonic() > deadline:
            raise on_timeout()
        time.sleep(delay)
        delay = min(poll_max, delay * 1.5)


class Handle:
    def wait(self):
        raise NotImplementedError

    def done(self) -> bool:
        return True


class DoneHandle(Handle):
    """A handle whose result is already known."""

    def __init__(self, value):
        self._value = value

    def wait(self):
        return self._value


class ThenHandle(Handle):
    """A handle whose result is `fn(inner.wait())`, computed once."""

    def __init__(self, inner: Handle, fn):
        self._inner, self._fn, self._done, self._value = inner, fn, False, None

    def wait(self):
        if not self._done:
            self._value = self._fn(self._inner.wait())
            self._done = True
        return self._value

    def done(self):
        return self._done or self._inner.done()


class Communicator:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    engine = "abstract"
    accepts_donation = False        # see the module docstring
    native_sendrecv = False         # sendrecv moves only the pairwise messages (else: an allgather)

    def allreduce(self, x, *, name: str = "") -> Handle:
        raise NotImplementedError

    def allgather(self, x, *, name: str = "") -> Handle:
        raise NotImplementedError

    def broadcast(self, x, *, root: int = 0, name: str = "") -> Handle:
        raise NotImplementedError

    def allreduce_group(self, xs, *, name: str = "", donate=None) -> Handle:
        """Sum several 1-D arrays of one dtype in one collective; wait() gives the list of sums.

        `donate[i]` gives xs[i] away (see the module docstring). This default concatenates (a fresh
        array, so it is donated to a transport that takes donations) and splits the result."""
        from gradcomp.backend import get_backend
        take = bool(getattr(self, "accepts_donation", False))
        if len(xs) == 1:
            if take and donate and donate[0]:
                return ThenHandle(self.allreduce(xs[0], name=name, donate=True), lambda r: [r])
            return ThenHandle(self.allreduce(xs[0], name=name), lambda r: [r])
        b = get_backend(xs[0])
        sizes = [b.numel(x) for x in xs]
        fused = b.cat(xs)
        h = self.allreduce(fused, name=name, donate=True) if take else self.allreduce(fused, name=name)
        return ThenHandle(h, lambda r: b.split(r, sizes))

    def sendrecv(self, x, *, dest=None, source=None, count=None, name: str = "") -> Handle:
        """Point-to-point exchange, called by every rank in the same order (like a collective): this
        rank sends the 1-D array x to rank `dest` and receives from rank `source` a 1-D array of x's
        dtype and `count` elements (default: x's length); either may be None (nothing sent /
        received; x still gives the dtype). wait() returns the received array, or None.

        This default runs it as one allgather: correct on any transport, but every rank then
        receives every rank's message ((P-1) messages of traffic, not one); transports with
        `native_sendrecv = True` override it with real point-to-point messages."""
        from gradcomp.backend import get_backend
        b = get_backend(x)
        check_peers(self, dest, source, name)
        want = b.numel(x) if count is None else int(count)
        mine = x if dest is not None else b.slice(x, 0, 0)
        h = self.allgather(mine, name=name)

        def pick(parts):
            if source is None:
                return None
            got = parts[source]
            if b.numel(got) != want:
                raise ValueError(f"sendrecv({name!r}): rank {self.rank} expected {want} elements from rank "
                                 f"{source}, which sent {b.numel(got)}; every pair must agree on the size")
            return got
        return ThenHandle(h, pick)

    def barrier(self):
        import numpy as np
        self.allreduce(np.zeros(1, np.float32), name="barrier").wait()

    # --- helpers every transport gets -----------------------------------------------------
    def allgather_object(self, obj, *, name: str = "object") -> list:
        """Gather one JSON-serialisable object from every rank (for configuration checks)."""
        import numpy as np
        raw = np.frombuffer(json.dumps(obj, sort_keys=True, default=str).encode(), dtype=np.uint8).copy()
        return [json.loads(bytes(np.asarray(p, dtype=np.uint8)).decode())
                for p in self.allgather(raw, name=name).wait()]


def check_peers(comm, dest, source, name: str):
    """ValueError unless dest and source are None or ranks of `comm` other than this one."""
    for what, peer in (("dest", dest), ("source", source)):
        if peer is not None and (not isinstance(peer, int) or not 0 <= peer < comm.size or peer == comm.rank):
            raise ValueError(f"sendrecv({name!r}): {what}={peer!r} on rank {comm.rank} of {comm.size}; pass "
                             "another rank's number, or None for nothing")


CODES = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int32", "int64")   # wire dtypes


def as_torch_1d(x, engine: str):
    """(1-D torch tensor for x, way back to x's kind) for the torch-based transports. A torch tensor
    is used as it is (detached, contiguous); numpy arrays and eager TF tensors become CPU tensors
    sharing host memory where possible, bfloat16 through its 16 bits."""
    import numpy as np
    import torch
    mod = type(x).__module__
    if mod.startswith("torch"):
        if x.dim() != 1:
            raise ValueError(f"collectives take one 1-D tensor, got shape {tuple(x.shape)}; flatten it first")
        if str(x.dtype).replace("torch.", "") not in CODES:
            raise TypeError(f"{engine} transport: dtype {x.dtype} is not supported; use one of {', '.join(CODES)}")
        return x.detach().contiguous(), lambda r: r
    back_np = lambda a: a  # noqa: E731
    if not isinstance(x, np.ndarray):
        if not (mod.startswith("tensorflow") or mod.startswith("keras")):
            raise TypeError(f"{engine} transport: unsupported array type {type(x)!r}; pass numpy, torch or TF")
        if not hasattr(x, "numpy"):
            raise TypeError(f"{engine} transport needs eager TF tensors; inside tf.function use tf.py_function")
        import tensorflow as tf
        dev = getattr(x, "device", "") or "/cpu:0"

        def back_np(a, dev=dev):
            with tf.device(dev):
                return tf.convert_to_tensor(a)
        x = np.asarray(x.numpy())
    if x.ndim != 1:
        raise ValueError(f"collectives take one 1-D array, got shape {x.shape}; flatten it first")
    bf = x.dtype if x.dtype.name == "bfloat16" else None
    if bf is None and x.dtype.name not in CODES:
        raise TypeError(f"{engine} transport: dtype {x.dtype} is not supported; use one of {', '.join(CODES)}")
    t = torch.from_numpy(np.ascontiguousarray(x.view(np.int16) if bf is not None else x))
    t = t.view(torch.bfloat16) if bf is not None else t

    def back(r):
        r = r.cpu()
        return back_np(r.view(torch.int16).numpy().view(bf) if bf is not None else r.numpy())
    return t, back


class ConfigMismatchError(RuntimeError):
    """Ranks were started with different configurations."""


def check_consistent(comm: Communicator, config: dict, what: str = "gradcomp configuration"):
    """Compare `config` across ranks; on any difference raise ConfigMismatchError on *every* rank.

    The error names the keys that differ and each rank's value, so the launch can be fixed; for a
    list-valued key (e.g. `order`, the tensor names in registration order) it names the first
    position at which the ranks' lists differ and each rank's entry there.
    """
    if comm.size == 1:
        return
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    everyone = comm.allgather_object({"digest": digest, "config": config}, name="config-check")
    if all(e["digest"] == digest for e in everyone):
        return
    keys = sorted(set().union(*(e["config"].keys() for e in everyone)))
    lines = []
    for k in keys:
        vals = [e["config"].get(k, "<missing>") for e in everyone]
        if any(v != vals[0] for v in vals):
            if all(isinstance(v, list) for v in vals):
                i = _first_difference(vals)
                at = lambda v: _short(v[i]) if i < len(v) else "<end of list>"  # noqa: E731
                shown = f"first difference at position {i}: " + "; ".join(
                    f"rank {r}: {at(v)}" for r, v in enumerate(vals))
            else:
                shown = "; ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(vals))
            lines.append(f"  {k}: {shown}")
    raise ConfigMismatchError(
        f"{what} differs across ranks (seen on rank {comm.rank}):\n" + "\n".join(lines)
        + "\nStart every rank with the same GRADCOMP_* variables, arguments and model.")


def _first_difference(lists) -> int:
    """The first index at which the lists are not all equal (their common length if one ends first)."""
    n = min(len(v) for v in lists)
    return next((i for i in range(n) if any(v[i] != lists[0][i] for v in lists)), n)


def _short(v, n=160):
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[:n] + "..."
