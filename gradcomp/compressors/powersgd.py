"""`powersgd`: rank-r power-iteration compression (Vogels, Karimireddy, Jaggi, PowerSGD: Practical
Low-Rank Gradient Compression for Distributed Optimization, NeurIPS 2019, Algorithm 1).

A gradient of shape (d0, d1, ..., dk) is viewed as the matrix M of shape n x m with n = d0 and
m = d1 * ... * dk (rows = output units, as in PyTorch's powerSGD_hook; the flat gradient is
row-major, so this view is free). With r = min(rank, n, m) and Q in R^{m x r} kept per tensor:

    round 1:  P_w = M_w Q                    payload P_w (n r values), summed by allreduce
    round 2:  P^ = orthonormalize(sum_w P_w)  (backend.qr, signs fixed: identical on every rank)
              Q_w = M_w^T P^                  payload Q_w (r m values, sent as Q_w^T), summed
    decode:   D(Q) = P^ Q^T                   (linear in Q: D(sum_w Q_w) / W is the average)
    warm start: Q <- (1/W) sum_w Q_w, kept in the compressor state for the next step

Error feedback (memory `residual`, the default) computes e_w = M_w - D(Q_w) = M_w - P^ P^T M_w from
this rank's own round-2 payload, exactly the paper's local error. The initial Q is drawn from
(seed, step, name) (Rademacher), so it is the same on every rank without communication.

Tensors where low rank does not pay are sent uncompressed (in round 2; round 1 sends nothing for
them): 0-d and 1-D tensors (biases, norms), and every matrix with n m < min_compression (n + m) r.
Payload bytes per compressed tensor: 4 (n + m) r for fp32.

Contract for drivers other than GradientSync: call `decompress` on the *reduced* round-2 payload
before `new_state` (the warm-start Q is the reduced sum recorded there).
"""
from __future__ import annotations

from gradcomp import rng
from gradcomp.compressors.base import Compressor
from gradcomp.params import Param


class PowerSGDCompressor(Compressor):
    name = "powersgd"
    summable = True
    decodes_fresh = True        # a matmul into a new array, or the reduced payload (dense tensors)
    rounds = 2
    replicated_state = ("q",)        # the warm-start Q is the average over ranks: identical everywhere
    paper = "Vogels, Karimireddy, Jaggi. PowerSGD: Practical Low-Rank Gradient Compression. NeurIPS 2019"
    params = {
        "rank": Param(int, 1, "rank r of the approximation", lo=1),
        "min_compression": Param(float, 2.0, "compress a matrix only if n*m >= this * (n+m)*r", lo=1.0),
        "warm_start": Param(bool, True, "reuse last step's Q (False: a fresh shared random Q every step)"),
    }

    def plan(self, ctx):
        """(n, m, r) of the matrix view, or None to send the tensor uncompressed."""
        if len(ctx.shape) < 2 or ctx.numel == 0:
            return None
        n = int(ctx.shape[0])
        m = ctx.numel // n
        r = min(self.rank, n, m)
        if n * m < self.min_compression * (n + m) * r:
            return None
        return n, m, r

    def _random_q(self, x, ctx, m, r, step=None):
        b = ctx.backend
        q = rng.rademacher(b, ctx.key("powersgd.q0", step=step), m * r, x, b.dtype(x))
        return b.reshape(q, (m, r))

    def init_state(self, x, ctx):
        p = self.plan(ctx)
        if p is None:
            return {}
        _, m, r = p
        return {"q": self._random_q(x, ctx, m, r)}

    def compress(self, x, state, ctx):
        b = ctx.backend
        p = self.plan(ctx)
        if p is None:
            return [], {"dense": True, "x": x}
        n, m, r = p
        q = state["q"] if self.warm_start else self._random_q(x, ctx, m, r)
        mat = b.reshape(x, (n, m))
        pm = b.matmul(mat, q)
        return [b.reshape(pm, (-1,))], {"dense": False, "M": mat, "nmr": (n, m, r)}

    def next_round(self, reduced, info, state, ctx):
        b = ctx.backend
        if info["dense"]:
            info["own"] = b.copy(info.pop("x"))               # a copy: collectives may work in place
            return [info["own"]], info
        n, m, r = info["nmr"]
        p_hat = b.qr(b.reshape(reduced[0], (n, r)))
        qt = b.matmul(b.transpose(p_hat), info["M"])          # Q^T = P^T M   (r x m)
        info["p_hat"] = p_hat
        info["own"] = b.reshape(qt, (-1,))
        info.pop("M")
        return [info["own"]], info

    def decompress(self, payload, info, ctx):
        b = ctx.backend
        y = payload[0]
        if y is not info["own"]:
            info["reduced"] = y                                 # the sum over ranks: warm start
        if info["dense"]:
            return y
        n, m, r = info["nmr"]
        return b.reshape(b.matmul(info["p_hat"], b.reshape(y, (r, m))), (-1,))

    def new_state(self, info, state, ctx):
        if info["dense"] or not self.warm_start:
            return state
        b = ctx.backend
        total = self.reduced_payload(info, ctx, "the warm-start Q (round 2's sum)")
        n, m, r = info["nmr"]
        q = b.transpose(b.reshape(total, (r, m)))
        return {"q": q * (1.0 / ctx.size) if ctx.size > 1 else q}
