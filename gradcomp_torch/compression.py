"""Horovod `Compression` objects built from gradcomp compressors.

    hvd.DistributedOptimizer(opt, compression=gradcomp_torch.Compression.fp16)
    hvd.allreduce(t, compression=gradcomp_torch.Compression.get("bf16"))

Horovod's interface is stateless and allreduce-only: `compress(tensor) -> (tensor, ctx)`, Horovod
averages the returned tensor over ranks, then `decompress(tensor, ctx)`. It passes no tensor name,
no step and keeps no per-tensor state, so a gradcomp compressor qualifies only if it is
  1. summable (its decode is linear, so decompress(average of payloads) = average gradient),
  2. single-round (no PowerSGD-style second exchange),
  3. stateless (no init_state: nothing kept per tensor between steps), and
  4. deterministic and step-independent: a probe compresses the same vector under different
     (seed, step, name); the payload must not change. Compressors that draw shared randomness per
     step (randomk, randproj) fail here: with a fixed draw they would send the same coordinates or
     subspace forever, and without error feedback (Horovod keeps none) the rest never trains.
Error feedback is not available through this interface; for fp16/bf16 it is not needed (the
per-step rounding error is tiny and unbiased in sign). Today this admits none, fp16 and bf16 (with
any parameters, e.g. "fp16:prescale=0.5"). Every other compressor raises an error pointing to
gradcomp_torch.DistributedOptimizer, which runs all of them (with allgather and residuals).
Horovod 0.28.1's torch binding cannot allreduce bfloat16: there Compression.bf16 rounds to bf16
and hands Horovod float32 (correct, but no bandwidth saved; it warns once).
"""
from __future__ import annotations

import sys
import warnings

import torch

from gradcomp.horovod_compat import (CompressionNamespace, HorovodCompressorBase,  # noqa: F401
                                     HorovodIncompatibleError, compatible, why_incompatible)


class HorovodCompressor(HorovodCompressorBase):
    """One gradcomp compressor behind Horovod's compress/decompress interface (torch tensors)."""

    adapter = "gradcomp_torch"
    instead = ("gradcomp_torch.DistributedOptimizer(opt, named_parameters=..., compressor={spec!r}) (it runs "
               "over Horovod too, with GRADCOMP_BACKEND=horovod)")

    def _as_array(self, tensor):
        return tensor if torch.is_tensor(tensor) else None

    def _to_wire(self, wire):
        if wire.dtype == torch.bfloat16 and not _horovod_sums_bf16():
            return wire.float()          # bf16-rounded values, summed in float32 (4 bytes on the wire)
        return wire


_BF16 = {}


def _horovod_sums_bf16() -> bool:
    """Whether the Horovod in use can allreduce bfloat16 (0.28.1's torch binding cannot).

    If not, Compression.bf16 still rounds to bfloat16 but hands Horovod float32, so it works
    everywhere but saves no bandwidth there; a warning says so once."""
    if "v" not in _BF16:
        ops = sys.modules.get("horovod.torch.mpi_ops")
        lib = getattr(ops, "mpi_lib", None)
        ok = lib is None or hasattr(lib, "horovod_torch_allreduce_async_torch_BFloat16Tensor")
        if not ok:
            warnings.warn("this Horovod cannot allreduce bfloat16: Compression.bf16 rounds gradients to "
                          "bfloat16 but sends them as float32 (no bandwidth saved). Use Compression.fp16, or "
                          "gradcomp_torch.DistributedOptimizer(compressor='bf16').", stacklevel=4)
        _BF16["v"] = ok
    return _BF16["v"]


Compression = CompressionNamespace(HorovodCompressor)
