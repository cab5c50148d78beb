"""`none`: no error feedback; what the compressor drops is lost."""
from gradcomp.memory.base import Memory


class NoMemory(Memory):
    name = "none"
    needs_local_decode = False
    reads_inputs = False
    fusable = True                # elementwise: a fused bucket's flat state is the per-name states

    def compensate(self, g, state, ctx):
        return g

    def update(self, g, x, local, aggregated, state, ctx):
        return state
