"""gradcomp_tf: compressed data-parallel training for TensorFlow 2.16+ with Keras 3 (no Horovod needed).

    import gradcomp_tf as gct
    gct.init()                                              # transport from GRADCOMP_BACKEND (MPI under mpirun)
    opt = gct.DistributedOptimizer(keras.optimizers.SGD(0.1), compressor="topk:ratio=0.01")
    model.compile(optimizer=opt, loss=..., jit_compile=False)
    model.fit(x, y, callbacks=[gct.callbacks.BroadcastGlobalVariablesCallback(0),
                               gct.callbacks.MetricAverageCallback(),
                               gct.callbacks.CompressionStatsCallback()])

Custom loops: `gct.DistributedGradientTape(tape, compressor=...)`. Horovod users on older TF:
`gct.Compression.fp16`. A Horovod script switches by its import (`import gradcomp_tf as hvd`):
compression=/op=/average_aggregated_gradients= are accepted, allreduce, allgather, broadcast (the
`gradcomp_tf.broadcast` module is callable), broadcast_object, alltoall, barrier, join, local_size, ...
are here (gradcomp_tf/collectives.py); PartialDistributedGradientTape (tape.py), load_model (keras_io.py).
`model.fit` synchronizes a periodic sync policy's parameters at its end by itself (optimizer.py). Checkpoints: tf.train.Checkpoint tracks the optimizer's `gradcomp_state`
(save one file per rank: `gct.rank_path(prefix)`). What runs where: gradcomp_tf/engine.py.
"""
from gradcomp_tf import callbacks
from gradcomp_tf import elastic  # noqa: F401  (hvd.elastic: refused with a clear error, see the module)
from gradcomp_tf.broadcast import broadcast_exchange_state, broadcast_variables
from gradcomp_tf.collectives import allgather_object, alltoall, shutdown  # noqa: F401
from gradcomp_tf.collectives import (Adasum, Average, Max, Min, Product, Sum, allgather, allreduce,  # noqa: F401
                                     barrier, broadcast_object, cross_rank, cross_size, cuda_built, gloo_built,
                                     grouped_allreduce, is_initialized, join, local_size, mpi_built, mpi_enabled,
                                     nccl_built, rocm_built)
from gradcomp_tf.checkpoint import GradcompState, rank_name, rank_path
from gradcomp_tf.compression import Compression
from gradcomp_tf.engine import XLA_MESSAGE, Exchange
from gradcomp_tf.optimizer import DistributedOptimizer
from gradcomp_tf.runtime import init, local_rank, rank, size
from gradcomp_tf.sync_view import KerasParamView
from gradcomp_tf.tape import DistributedGradientTape, PartialDistributedGradientTape
from gradcomp_tf.keras_io import load_model
from gradcomp_tf.sync_batchnorm import SyncBatchNormalization

__all__ = ["allgather_object", "shutdown", "init", "rank", "size", "local_rank", "broadcast_variables", "broadcast_exchange_state", "DistributedGradientTape",
           "DistributedOptimizer", "Exchange", "Compression", "GradcompState", "rank_path", "rank_name",
           "KerasParamView", "callbacks", "XLA_MESSAGE",
           "Average", "Sum", "Adasum", "Min", "Max", "Product", "allreduce", "grouped_allreduce", "allgather",
           "broadcast", "broadcast_object", "barrier", "join", "is_initialized", "local_size", "cross_rank",
           "cross_size", "mpi_built", "gloo_built", "nccl_built", "mpi_enabled", "cuda_built", "rocm_built",
           "alltoall", "PartialDistributedGradientTape", "load_model", "SyncBatchNormalization"]
