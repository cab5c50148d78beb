"""gradcomp: communication-efficient distributed deep learning, framework-neutral core.

    import gradcomp
    gradcomp.available()                       # compressor names
    comp = gradcomp.create("topk:ratio=0.001")
    results = gradcomp.LocalWorld(4).run(lambda comm: ...)
    sync = gradcomp.GradientSync(comp, memory="residual", comm=comm, seed=0)
    avg = sync.step({"w": grad})
"""
from gradcomp.comm.base import Communicator, ConfigMismatchError, check_consistent
from gradcomp.comm.local import LocalWorld
from gradcomp.comm.single import SingleCommunicator
from gradcomp.compressors.base import Compressor, Ctx
from gradcomp.config import Config, from_env
from gradcomp.memory.base import Memory
from gradcomp.pipeline import GradientSync, NonFiniteGradientError, PayloadOverflowError
from gradcomp.registry import available as _available
from gradcomp.registry import create as _create

__version__ = "0.1.0"


def available(kind: str = "compressor") -> list[str]:
    """Registered names: available() -> compressors; available("memory"), available("sync")."""
    return _available(kind)


def create(spec, kind: str = "compressor", **overrides):
    """Build a compressor (or memory/sync policy) from a spec string such as "topk:ratio=0.001"."""
    return _create(spec, kind, **overrides)


__all__ = ["available", "create", "from_env", "Config", "LocalWorld", "GradientSync", "Communicator",
           "SingleCommunicator", "Compressor", "Memory", "Ctx", "ConfigMismatchError", "check_consistent",
           "NonFiniteGradientError", "PayloadOverflowError", "__version__"]
