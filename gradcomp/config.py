"""The one reader of GRADCOMP_* environment variables.

    GRADCOMP_COMPRESSOR  compressor spec, e.g. "topk:ratio=0.001"       (default "none")
    GRADCOMP_MEMORY      memory spec, e.g. "residual" or "gmc:momentum=0.9" (default "auto":
                         the compressor's own choice, residual for lossy compressors)
    GRADCOMP_SEED        integer seed of all shared randomness             (default 0)
    GRADCOMP_SYNC        sync policy spec, e.g. "localsgd:period=4"        (default "allreduce")
    GRADCOMP_BACKEND     transport: auto | horovod | mpi | torch | local   (default "auto"; local = one rank)
    GRADCOMP_BUCKET_MB   fusion bucket size in MiB for the optimizers      (default 25)
    GRADCOMP_VIRTUAL_WORKERS  virtual workers of gradcomp_torch.VirtualWorkers (default: the world size)
    GRADCOMP_TIMEOUT     seconds any collective may wait before it raises a CollectiveTimeout
                         naming the collective and rank; 0 or "none" disables (default 300)

Nothing reads the environment at import time: call `from_env()`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from gradcomp import registry

BACKENDS = ("auto", "horovod", "mpi", "torch", "local")
DEFAULT_TIMEOUT = 300.0
_NO_TIMEOUT = ("0", "none", "off", "no", "false", "inf", "infinite")


@dataclass
class Config:
    compressor: object
    memory: object
    seed: int = 0
    sync: object = None
    backend: str = "auto"
    bucket_mb: float = 25.0
    timeout: float | None = DEFAULT_TIMEOUT

    def describe(self) -> dict:
        return {"compressor": self.compressor.spec(), "memory": self.memory.spec(), "seed": self.seed,
                "sync": self.sync.spec() if self.sync is not None else "allreduce"}


def resolve_memory(memory, compressor):
    """'auto'/None -> the compressor's default memory; otherwise a spec or instance."""
    if memory is None or (isinstance(memory, str) and memory.strip().lower() == "auto"):
        memory = "none" if compressor.lossless else compressor.default_memory
    return registry.create(memory, "memory")


def _int(env, key, default):
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not an integer; set it to e.g. {key}={default}") from None


def parse_timeout(value, source: str = "timeout"):
    """A collective timeout -> seconds (float > 0) or None (disabled).

    Accepts a number of seconds (int/float or a string such as "300" or "2.5"), and 0, None, "none",
    "off" or "inf" for "never time out". Anything else (negative, NaN, a word, a bool) is a ValueError
    that names `source` and the valid forms."""
    raw = value
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip().lower()
        if value in _NO_TIMEOUT:
            return None
    if isinstance(value, bool):
        value = "bool"                              # True/False are not a number of seconds
    try:
        sec = float(value)
    except (TypeError, ValueError):
        sec = float("nan")
    if sec != sec or sec < 0:
        raise ValueError(f"{source}={raw!r} is not a number of seconds; give e.g. {source}=300 (seconds any "
                         f"collective may wait), or 0 / none to wait forever")
    return None if sec == 0 or sec == float("inf") else sec


def timeout_from_env(environ=None):
    """GRADCOMP_TIMEOUT (validated) -> seconds or None; unset or empty gives DEFAULT_TIMEOUT."""
    env = os.environ if environ is None else environ
    raw = env.get("GRADCOMP_TIMEOUT", "").strip()
    return DEFAULT_TIMEOUT if not raw else parse_timeout(raw, "GRADCOMP_TIMEOUT")


def resolve_timeout(timeout="default", environ=None):
    """The timeout a transport uses: `timeout` if given (validated), else GRADCOMP_TIMEOUT / DEFAULT_TIMEOUT.
    "default" (the transports' default argument) means "not given"."""
    if isinstance(timeout, str) and timeout == "default":
        return timeout_from_env(environ)
    return parse_timeout(timeout, "timeout")


def backend_from_env(environ=None) -> str:
    """GRADCOMP_BACKEND (validated, lower case); unset or empty gives "auto"."""
    env = os.environ if environ is None else environ
    backend = env.get("GRADCOMP_BACKEND", "").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"GRADCOMP_BACKEND={backend!r} is not valid; valid: {', '.join(BACKENDS)}")
    return backend


def from_env(environ=None) -> Config:
    """Read GRADCOMP_* variables into a validated Config (ValueError naming valid choices)."""
    env = os.environ if environ is None else environ
    try:
        comp = registry.create(env.get("GRADCOMP_COMPRESSOR", "").strip() or "none", "compressor")
    except ValueError as e:
        raise ValueError(f"GRADCOMP_COMPRESSOR: {e}") from None
    try:
        mem = resolve_memory(env.get("GRADCOMP_MEMORY", "").strip() or "auto", comp)
    except ValueError as e:
        raise ValueError(f"GRADCOMP_MEMORY: {e}") from None
    sync_spec = env.get("GRADCOMP_SYNC", "").strip() or "allreduce"
    try:
        sync = registry.create(sync_spec, "sync")
    except (ValueError, ImportError) as e:
        raise ValueError(f"GRADCOMP_SYNC: {e}") from None
    backend = backend_from_env(env)
    raw_bucket = env.get("GRADCOMP_BUCKET_MB", "").strip()
    try:
        bucket = float(raw_bucket) if raw_bucket else 25.0
        if not bucket >= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"GRADCOMP_BUCKET_MB={raw_bucket!r} is not a non-negative number of MiB; set it to e.g. "
                         "GRADCOMP_BUCKET_MB=25 (0: one bucket per tensor)") from None
    return Config(comp, mem, _int(env, "GRADCOMP_SEED", 0), sync, backend, bucket, timeout_from_env(env))


def virtual_workers_from_env(environ=None) -> int | None:
    """GRADCOMP_VIRTUAL_WORKERS as an int >= 1, or None when unset."""
    env = os.environ if environ is None else environ
    raw = env.get("GRADCOMP_VIRTUAL_WORKERS", "").strip()
    if not raw:
        return None
    try:
        v = int(raw)
    except ValueError:
        v = 0
    if v < 1:
        raise ValueError(f"GRADCOMP_VIRTUAL_WORKERS={raw!r} is not an int >= 1; set it to the number of virtual "
                         "workers, e.g. GRADCOMP_VIRTUAL_WORKERS=8, or leave it unset for one per rank")
    return v
