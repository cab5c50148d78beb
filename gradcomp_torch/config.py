"""Resolve the adapter's arguments against GRADCOMP_* defaults (through gradcomp.from_env).

An argument given explicitly wins; None takes the environment's value. A memory left as None
with an explicit compressor follows GRADCOMP_MEMORY if set, else "auto" (the compressor's own
default: residual error feedback for lossy compressors, none for lossless ones).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from gradcomp import registry
from gradcomp.config import from_env
from gradcomp.params import check_seed


@dataclass
class AdapterConfig:
    compressor: object
    memory: object
    sync: object
    seed: int
    bucket_mb: float
    backend: object


def resolve_config(compressor=None, memory=None, sync=None, seed=None, bucket_mb=None, backend=None,
                   environ=None) -> AdapterConfig:
    env = dict(os.environ if environ is None else environ)
    comp = registry.create(compressor, "compressor") if compressor is not None else None
    if sync is not None:
        sync = registry.create(sync, "sync")
    cfg = from_env(env)
    if comp is None:
        comp = cfg.compressor
        mem = cfg.memory if memory is None else memory
    else:
        mem = memory if memory is not None else (env.get("GRADCOMP_MEMORY", "").strip() or "auto")
    if bucket_mb is not None:
        try:
            ok = not isinstance(bucket_mb, bool) and float(bucket_mb) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"bucket_mb={bucket_mb!r} is not valid; expected a non-negative number of MiB, e.g. "
                             "bucket_mb=25 (0: one bucket per tensor), or None for GRADCOMP_BUCKET_MB")
    if seed is not None:
        seed = check_seed(seed)
    return AdapterConfig(comp, mem, sync if sync is not None else cfg.sync,
                         cfg.seed if seed is None else seed,
                         cfg.bucket_mb if bucket_mb is None else float(bucket_mb),
                         cfg.backend if backend is None else backend)
