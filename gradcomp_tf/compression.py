"""Horovod-style `Compression` objects for TensorFlow, backed by gradcomp compressors.

    hvd.DistributedOptimizer(opt, compression=gradcomp_tf.Compression.fp16)   # older TF + Horovod
    hvd.allreduce(t, compression=gradcomp_tf.Compression.get("bf16:prescale=0.5"))

Same rules as gradcomp_torch.Compression. Horovod's interface is stateless and allreduce-only:
`compress(tensor) -> (tensor, ctx)`, Horovod averages the returned tensor over ranks, then
`decompress(tensor, ctx)`; it passes no tensor name and no step. A gradcomp compressor qualifies only
if it is (1) summable (linear decode), (2) single-round, (3) stateless (no `init_state`), and (4)
deterministic and step-independent: a probe compresses the same vector under different
(seed, step, name) and the payload must not change (randomk / randproj fail: a frozen draw would
send the same coordinates forever, and Horovod keeps no error feedback). Today: none, fp16, bf16.
Every other name raises an error that points to gradcomp_tf.DistributedOptimizer /
DistributedGradientTape, which run all compressors (allgather, residuals, shared randomness).
Inside Horovod 0.28.1's own TF tape/optimizer (mpi/build_horovod_tf.sh), none and fp16 run; bf16
fails with Horovod's own TypeError, because its TF allreduce has no bfloat16 kernel.
"""
from __future__ import annotations

import tensorflow as tf

from gradcomp.horovod_compat import (CompressionNamespace, HorovodCompressorBase,  # noqa: F401
                                     HorovodIncompatibleError, compatible, why_incompatible)


class HorovodCompressor(HorovodCompressorBase):
    """One gradcomp compressor behind Horovod's compress/decompress interface (TF tensors)."""

    adapter = "gradcomp_tf"
    instead = ("gradcomp_tf.DistributedOptimizer(opt, compressor={spec!r}) or "
               "gradcomp_tf.DistributedGradientTape(tape, compressor={spec!r})")

    def _as_array(self, tensor):
        return tf.convert_to_tensor(tensor)


Compression = CompressionNamespace(HorovodCompressor)
