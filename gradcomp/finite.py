"""Agreeing across ranks on whether any of this step's arrays holds NaN/Inf, cheaply.

`agree_nonfinite(comm, arrays)` counts the non-finite values of every array on its own device
(Backend.count_nonfinite), adds the counts there, and sums that one number over ranks: one
4-byte allreduce and one host read per call, however many arrays. The framework adapters call
it on the local steps of periodic sync policies (localsgd, da, da-pipelined, slowmo), where no
gradient exchange runs, so that a NaN on one rank stops every rank before any optimizer step.
`start_nonfinite` issues the allreduce and returns a Handle (the torch adapter issues it at the
end of backward, so a rank that reads the result early does not issue an extra collective).
"""
from __future__ import annotations

import numpy as np

from gradcomp.backend import get_backend
from gradcomp.comm.base import DoneHandle, Handle, ThenHandle


def local_nonfinite(arrays) -> list:
    """The non-finite counts of `arrays` summed on the device: one 0-d float32 array per
    (backend, device) group, usually just one."""
    groups: dict = {}
    for a in arrays:
        if a is None:
            continue
        b = get_backend(a)
        groups.setdefault((id(b), str(b.device(a))), (b, []))[1].append(a)
    return [(b, b.count_nonfinite_all(xs)) for b, xs in groups.values()]


def start_nonfinite(comm, arrays, name: str = "nonfinite.local") -> Handle:
    """Issue the agreement on every rank of `comm`; `wait()` gives the number of non-finite values
    in `arrays` summed over ranks (an int)."""
    groups = local_nonfinite(arrays)
    if len(groups) == 1:
        b, total = groups[0]
        flag = b.reshape(b.cast(total, "float32"), (1,))
    else:                                   # no array, or several devices: add them on the host
        flag = np.array([sum(b.item(c) for b, c in groups)], np.float32)
    h = comm.allreduce(flag, name=name) if comm is not None and comm.size > 1 else DoneHandle(flag)
    return ThenHandle(h, _count)


def agree_nonfinite(comm, arrays, name: str = "nonfinite.local") -> int:
    """start_nonfinite(...).wait(): call it on every rank."""
    return start_nonfinite(comm, arrays, name).wait()


def _count(flag) -> int:
    rb = get_backend(flag)
    return int(rb.item(rb.reshape(flag, ())))
