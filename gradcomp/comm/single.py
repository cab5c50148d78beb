"""A one-rank Communicator (no engine): every collective returns its input."""
from gradcomp.backend import get_backend
from gradcomp.comm.base import Communicator, DoneHandle


class SingleCommunicator(Communicator):
    engine = "single"
    native_sendrecv = True          # nothing travels
    rank, size, local_rank = 0, 1, 0

    def allreduce(self, x, *, name=""):
        return DoneHandle(x)

    def allgather(self, x, *, name=""):
        return DoneHandle([x])

    def broadcast(self, x, *, root=0, name=""):
        return DoneHandle(x)

    def sendrecv(self, x, *, dest=None, source=None, count=None, name=""):
        from gradcomp.comm.base import check_peers
        check_peers(self, dest, source, name)      # one rank has no peer: only None is valid
        return DoneHandle(None)
