"""LocalWorld: N ranks as threads in one process, each with a real Communicator.

Collectives are genuinely asynchronous: a rank deposits its array and gets a Handle; the last
rank to arrive combines the arrays; `wait()` blocks until then. A rank that raises aborts the
world, so its peers fail with an error naming it instead of hanging; a collective that waits
longer than `timeout` seconds (default GRADCOMP_TIMEOUT, 300; None or 0: forever) raises
CollectiveTimeout (a TimeoutError) naming the collective, the rank and the ranks that never arrived.
"""
from __future__ import annotations

import threading

from gradcomp.backend import get_backend
from gradcomp.comm.base import Communicator, Handle, check_peers, timeout_error


class WorldAborted(RuntimeError):
    pass


class _Slot:
    __slots__ = ("data", "count", "result", "ready", "taken", "op", "name")

    def __init__(self, size, op, name):
        self.data, self.count, self.result, self.ready, self.taken = [None] * size, 0, None, False, 0
        self.op, self.name = op, name


class _Hub:
    def __init__(self, size, timeout):
        self.size, self.timeout = size, timeout
        self.cv = threading.Condition()
        self.slots: dict[int, _Slot] = {}
        self.error: BaseException | None = None
        self.failed_rank = None

    def deposit(self, seq, rank, op, name, x, combine):
        with self.cv:
            if self.error is not None:
                raise WorldAborted(f"rank {self.failed_rank} failed: {self.error!r}")
            slot = self.slots.setdefault(seq, _Slot(self.size, op, name))
            if slot.op != op:
                err = RuntimeError(f"collective mismatch at call #{seq}: rank {rank} called {op}({name!r}) "
                                   f"while others called {slot.op}({slot.name!r})")
                self.abort(rank, err)
                raise err
            slot.data[rank] = x
            slot.count += 1
            if slot.count == self.size:
                try:
                    slot.result = combine(slot.data)
                except BaseException as e:  # a combine failure must not hang the peers
                    self.abort(rank, e)
                    raise
                slot.ready = True
                self.cv.notify_all()
            return slot

    def wait(self, seq, slot, rank):
        with self.cv:
            ok = self.cv.wait_for(lambda: slot.ready or self.error is not None, timeout=self.timeout)
            if self.error is not None and not slot.ready:
                raise WorldAborted(f"rank {self.failed_rank} failed: {self.error!r}")
            if not ok:
                missing = [r for r, d in enumerate(slot.data) if d is None]
                raise timeout_error("LocalWorld", slot.op, slot.name, rank, self.size, self.timeout,
                                    f"ranks {missing} never arrived")
            slot.taken += 1
            if slot.taken == self.size:
                self.slots.pop(seq, None)
            return slot.result

    def abort(self, rank, err):
        with self.cv:
            if self.error is None:
                self.error, self.failed_rank = err, rank
            self.cv.notify_all()


class _LocalHandle(Handle):
    def __init__(self, hub, seq, slot, rank, post):
        self.hub, self.seq, self.slot, self.rank, self.post = hub, seq, slot, rank, post
        self._got, self._value = False, None

    def wait(self):
        if not self._got:
            self._value = self.post(self.hub.wait(self.seq, self.slot, self.rank))
            self._got = True
        return self._value

    def done(self):
        return self.slot.ready


class LocalCommunicator(Communicator):
    engine = "local"
    native_sendrecv = True

    def __init__(self, hub: _Hub, rank: int):
        self.hub, self.rank, self.size, self.local_rank = hub, rank, hub.size, rank
        self._seq = 0

    def _issue(self, op, name, x, combine, post):
        seq = self._seq
        self._seq += 1
        slot = self.hub.deposit(seq, self.rank, op, name, x, combine)
        return _LocalHandle(self.hub, seq, slot, self.rank, post)

    def allreduce(self, x, *, name=""):
        b = get_backend(x)

        def combine(xs):
            shapes = {tuple(b.shape(a)) for a in xs}
            if len(shapes) != 1:
                raise ValueError(f"allreduce({name!r}): ranks passed different shapes {sorted(shapes)}")
            total = b.copy(xs[0])
            for a in xs[1:]:
                total = total + a
            return total
        return self._issue("allreduce", name, b.copy(x), combine, b.copy)

    def allgather(self, x, *, name=""):
        b = get_backend(x)
        return self._issue("allgather", name, b.copy(x), lambda xs: list(xs),
                           lambda xs: [b.copy(a) for a in xs])

    def sendrecv(self, x, *, dest=None, source=None, count=None, name=""):
        """Every rank deposits (message, dest); each takes the one `source` addressed to it."""
        b = get_backend(x)
        check_peers(self, dest, source, name)
        want, me = (b.numel(x) if count is None else int(count)), self.rank

        def post(msgs):
            if source is None:
                return None
            got, to = msgs[source]
            if to != me:
                raise RuntimeError(f"sendrecv({name!r}): rank {me} expected a message from rank {source}, "
                                   f"which sent {'nothing' if to is None else f'to rank {to}'}")
            if b.numel(got) != want:
                raise ValueError(f"sendrecv({name!r}): rank {me} expected {want} elements from rank {source}, "
                                 f"which sent {b.numel(got)}; every pair must agree on the size")
            return b.copy(got)
        return self._issue("sendrecv", name, (b.copy(x) if dest is not None else None, dest),
                           lambda xs: list(xs), post)

    def broadcast(self, x, *, root=0, name=""):
        b = get_backend(x)
        return self._issue(f"broadcast[{root}]", name, b.copy(x), lambda xs: xs[root], b.copy)


class LocalWorld:
    """`LocalWorld(size).run(fn)` calls fn(comm) on every rank (a thread each) and returns the results."""

    def __init__(self, size: int, timeout="default"):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"LocalWorld size must be a positive int, got {size!r}")
        from gradcomp.config import resolve_timeout
        self.size, self.timeout = size, resolve_timeout(timeout)

    def run(self, fn, *args, **kwargs) -> list:
        hub = _Hub(self.size, self.timeout)
        comms = [LocalCommunicator(hub, r) for r in range(self.size)]
        results, errors = [None] * self.size, [None] * self.size

        def body(r):
            try:
                results[r] = fn(comms[r], *args, **kwargs)
            except BaseException as e:
                errors[r] = e
                hub.abort(r, e)

        threads = [threading.Thread(target=body, args=(r,), name=f"gradcomp-rank{r}", daemon=True)
                   for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        raised = [r for r in range(self.size) if errors[r] is not None]
        if raised:   # re-raise the error that aborted the world (if fn let it escape), else the first
            raise errors[hub.failed_rank if hub.failed_rank in raised else raised[0]]
        return results
