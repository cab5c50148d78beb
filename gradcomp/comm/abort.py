"""The abort path: an uncaught exception on one rank ends every rank, instead of leaving them waiting.

Under mpirun, a rank that raises would otherwise print its traceback and sit in MPI_Finalize (which
waits for every rank) while its peers wait in their next collective: the job hangs until the
collective timeout. `install_mpi_abort(MPI)` (called by `gradcomp.comm.mpi.import_mpi`, so by every
gradcomp use of mpi4py, when the world has more than one rank) chains a `sys.excepthook` that, like
`python -m mpi4py`, prints the failing rank's traceback once, prefixed by one line naming the rank,
flushes stdout/stderr and calls `MPI_Abort` on COMM_WORLD, which makes the launcher end every rank.

Covered: uncaught exceptions (and KeyboardInterrupt) in the main thread, and `sys.exit(status)` with a
non-zero status (argparse's exit on a bad argument included): Python never hands SystemExit to the
excepthook, so `sys.exit` is wrapped too; a zero or None status exits as usual. Not covered: a bare
`raise SystemExit(n)`, `os._exit` and exceptions in the user's own threads; there the peers'
collective timeout (GRADCOMP_TIMEOUT) ends the job. Exceptions inside gradcomp's MPI worker thread
never escape it: they are handed to the waiting caller.
"""
from __future__ import annotations

import sys

_STATE = {"installed": False, "previous": None, "exit": None, "aborting": False}


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

    previous_exit = sys.exit

    def exit_(status=None):
        if status not in (None, 0) and not _STATE["aborting"] and MPI.Is_initialized() and not MPI.Is_finalized():
            _STATE["aborting"] = True
            _flush()
            if not isinstance(status, int):
                print(status, file=sys.stderr)
            print(f"gradcomp: sys.exit({status!r}) on rank {rank} of {size}; calling MPI_Abort so that every rank "
                  "ends now instead of waiting for this one", file=sys.stderr)
            _flush()
            world.Abort(status if isinstance(status, int) and 0 < status < 256 else 1)
        return previous_exit(status)

    sys.excepthook = hook
    sys.exit = exit_
    _STATE.update(installed=True, previous=previous, exit=previous_exit)
    return True


def uninstall():
    """Restore the excepthook that was there before install_mpi_abort (for tests)."""
    if _STATE["installed"]:
        sys.excepthook = _STATE["previous"]
        sys.exit = _STATE["exit"]
        _STATE.update(installed=False, previous=None, exit=None, aborting=False)
