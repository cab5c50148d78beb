"""The abort path: an uncaught exception on one rank ends every rank, instead of leaving them waiting.

Under mpirun, a rank that raises would otherwise print its traceback and sit in MPI_Finalize (which
waits for every rank) while its peers wait in their next collective: the job hangs until the
collective timeout. `install_mpi_abort(MPI)` (called by `gradcomp.comm.mpi.import_mpi`, so by every
gradcomp use of mpi4py, when the world has more than one rank) chains a `sys.excepthook` that, like
`python -m mpi4py`, prints the failing rank's traceback once, prefixed by one line naming the rank,
flushes stdout/stderr and calls `MPI_Abort` on COMM_WORLD, which makes the launcher end every rank.

Covered: uncaught exceptions (and KeyboardInterrupt) in the main thread. Not covered by the hook:
`sys.exit(n)` / SystemExit (Python does not call the hook for it) and exceptions in the user's own
threads; there the peers' collective timeout (GRADCOMP_TIMEOUT) ends the job. Exceptions inside
gradcomp's MPI worker thread never escape it: they are handed to the waiting caller.
"""
from __future__ import annotations

import sys

_STATE = {"installed": False, "previous": None, "aborting": False}


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not stop the abort
            pass


def install_mpi_abort(MPI) -> bool:
    """Chain the aborting excepthook (once per process; only when COMM_WORLD has > 1 rank).
    Returns whether the hook is installed."""
    if _STATE["installed"]:
        return True
    try:
        world = MPI.COMM_WORLD
        rank, size = world.Get_rank(), world.Get_size()
    except Exception:  # noqa: BLE001 - MPI not usable: nothing to abort
        return False
    if size <= 1:
        return False
    previous = sys.excepthook

    def hook(etype, value, tb):
        if _STATE["aborting"]:
            return previous(etype, value, tb)
        _STATE["aborting"] = True
        try:
            _flush()
            print(f"gradcomp: uncaught {etype.__name__} on rank {rank} of {size} (traceback below); calling "
                  "MPI_Abort so that every rank ends now instead of waiting for this one", file=sys.stderr)
            previous(etype, value, tb)
            _flush()
        finally:
            if MPI.Is_initialized() and not MPI.Is_finalized():
                world.Abort(1)

    sys.excepthook = hook
    _STATE.update(installed=True, previous=previous)
    return True


def uninstall():
    """Restore the excepthook that was there before install_mpi_abort (for tests)."""
    if _STATE["installed"]:
        sys.excepthook = _STATE["previous"]
        _STATE.update(installed=False, previous=None, aborting=False)
