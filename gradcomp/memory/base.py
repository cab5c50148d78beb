"""The Memory interface: error feedback and momentum that wrap a compressor.

compensate(g) builds what should be sent this step (gradient plus residual, momentum, ...);
update(...) computes the state to keep from what was meant (x), what this rank actually sent
(its own payload decoded) and the global average the step produced. State is plain arrays,
committed by the pipeline only once the whole step succeeded.
"""
from __future__ import annotations

from gradcomp.params import Configurable


class Memory(Configurable):
    kind = "memory"
    needs_local_decode = True     # does update() use this rank's own decoded payload?
    reads_inputs = True           # does update() read g or x (so a payload aliasing them must stay intact)?
    # State classes (gradcomp/state.py): the per-tensor state keys identical on every rank (broadcast
    # like the model); every other key is per rank (never broadcast). `gradient_state`: the keys
    # measured in gradient units, rescaled when the loss scale changes (GradScaler).
    replicated_state: tuple = ()
    gradient_state: tuple = ()
    fusable = False               # elementwise, so a fused bucket may run it once on its flat buffer?
    # May update() get local=None when the compressor reported (Compressor.sent_indices) that this
    # rank's decoded payload is x at the indices ctx.memo["own_decode_idx"] and zero elsewhere? The
    # pipeline then skips the local decode; update() may modify x in place (compensate made it).
    masks_sent = False

    def init_state(self, x, ctx) -> dict:
        return {}

    def compensate(self, g, state: dict, ctx):
        raise NotImplementedError

    def update(self, g, x, local, aggregated, state: dict, ctx) -> dict:
        """g: the raw gradient, x: compensate(g), local: decode(own payload), aggregated: the average."""
        raise NotImplementedError

    def output(self, aggregated, state: dict, ctx):
        """What the step returns for this tensor, given the average and update()'s new state."""
        return aggregated
