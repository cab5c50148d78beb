"""The SyncPolicy protocol, called by the framework adapters around every optimizer step.

Per training step the adapter (gradcomp_torch / gradcomp_tf DistributedOptimizer) does:

    if policy.sync_gradients(step):   # average this step's gradients through GradientSync
        grads = gradient_sync.step(grads)
    policy.before_step(step, view)     # e.g. da-pipelined waits for last sync's momentum average
    optimizer.step()                   # the wrapped framework optimizer
    policy.after_step(step, view)      # e.g. every H steps average parameters (and momenta)

`step` counts optimizer steps already taken (0 for the first). `view` is a ParamAccess the
adapter implements over its parameters and the wrapped optimizer's momentum buffers, so the
policies are written once against plain arrays and the backend protocol.
"""
from __future__ import annotations

from gradcomp.params import Configurable


class ParamAccess:
    """Adapter-provided view of parameters and optimizer momentum buffers, keyed by name."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def get(self, name):
        """The parameter's current value (an array of the framework; may alias the parameter)."""
        raise NotImplementedError

    def set(self, name, value):
        """Overwrite the parameter in place with `value`."""
        raise NotImplementedError

    def momentum(self, name):
        """The optimizer's momentum buffer for `name`, or None (plain SGD, not yet created)."""
        return None

    def set_momentum(self, name, value):
        raise NotImplementedError

    def learning_rate(self, name):
        """The optimizer's current learning rate for `name` (a float), or None if unknown."""
        return None

    def adaptive(self) -> bool:
        """Does the optimizer keep per-coordinate second moments (Adam, RMSprop, ...)?"""
        return False


class SyncPolicy(Configurable):
    kind = "sync"
    synchronous = True        # True: gradients are averaged every step

    def bind(self, comm, compressor=None, seed: int = 0):
        """Attach the communicator (and optionally a compressor for exchanged deltas)."""
        self.comm, self.delta_compressor, self.seed = comm, compressor, seed
        return self

    def sync_gradients(self, step: int) -> bool:
        return True

    def before_step(self, step: int, view: ParamAccess):
        """Called just before the wrapped optimizer's step."""

    def after_step(self, step: int, view: ParamAccess):
        """Called just after the wrapped optimizer's step."""

    def flush(self):
        """Finish any exchange still in flight (da-pipelined's momentum average) and write it into
        the optimizer: call before evaluating or checkpointing, and at the end of training."""

    def finalize(self, view) -> bool:
        """End of training: bring the ranks' parameters together if the policy left them apart
        (PeriodicPolicy synchronizes when the run did not end on a sync step). True if it exchanged."""
        self.flush()
        return False

    def stats(self) -> dict:
        """The policy's own traffic: bytes this rank sent beyond the gradient averaging."""
        return {"bytes_sent": 0}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict):
        if sd:
            raise ValueError(f"the checkpoint holds sync policy state ({', '.join(sorted(map(str, sd))[:4])}) but this "
                             f"run's policy {self.spec()!r} keeps none: it was saved under another GRADCOMP_SYNC; "
                             "restore with the same sync policy")

    # State classes (gradcomp/state.py): a policy's state is replicated unless it overrides these.
    def replicated_state_dict(self) -> dict:
        return self.state_dict()

    def load_replicated_state_dict(self, sd: dict):
        self.load_state_dict(sd)
