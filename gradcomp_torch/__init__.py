"""gradcomp_torch: the PyTorch adapter of gradcomp (Horovod-style API).

    import gradcomp_torch as gct
    gct.init()                                   # GRADCOMP_BACKEND: auto | horovod | mpi | torch
    opt = gct.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())  # GRADCOMP_COMPRESSOR
    gct.broadcast_parameters(model.state_dict(), root_rank=0)
    gct.broadcast_optimizer_state(opt, root_rank=0)

    hvd.DistributedOptimizer(opt, compression=gct.Compression.fp16)     # inside Horovod
    ddp_model.register_comm_hook(None, gct.ddp_hook("topk:ratio=0.01"))  # inside DDP

A Horovod script switches by its import (`import gradcomp_torch as hvd`): DistributedOptimizer takes
Horovod's compression=, op=, gradient_predivide_factor=, num_groups=, sparse_as_dense=; allreduce,
allgather, broadcast, alltoall (and their *_async forms with poll/synchronize), barrier, join,
local_size, cross_rank, ... are here (gradcomp_torch/collectives.py; SyncBatchNorm: sync_batchnorm.py;
README "Horovod scripts: change the import" says what is and is not supported).
"""
from gradcomp_torch import _pg_pin  # noqa: F401  (first: see its docstring)
from gradcomp.pipeline import NonFiniteGradientError
from gradcomp_torch.checkpoint import load_checkpoint, save_checkpoint
from gradcomp_torch.collectives import allgather_object, start_timeline, stop_timeline  # noqa: F401
from gradcomp_torch.collectives import (allgather_async, allreduce_async, allreduce_async_, alltoall,  # noqa: F401
                                        alltoall_async, broadcast_async, broadcast_async_,
                                        grouped_allreduce_, grouped_allreduce_async, grouped_allreduce_async_,
                                        poll, synchronize)
from gradcomp_torch.collectives import (Adasum, Average, Max, Min, Product, Sum, allgather, allreduce,  # noqa: F401
                                        allreduce_, barrier, broadcast, broadcast_, ccl_built, cross_rank,
                                        cross_size, cuda_built, gloo_built, grouped_allreduce, is_initialized,
                                        join, local_size, mpi_built, mpi_enabled, mpi_threads_supported,
                                        nccl_built, rocm_built)
from gradcomp_torch.compression import Compression
from gradcomp_torch.ddp_hook import ddp_hook
from gradcomp_torch.optimizer import DistributedOptimizer
from gradcomp_torch.runtime import (broadcast_object, broadcast_optimizer_state, broadcast_parameters,
                                    communicator, init, local_rank, rank, shutdown, size)
from gradcomp_torch.sync_batchnorm import SyncBatchNorm
from gradcomp_torch.sync_view import TorchParamAccess
from gradcomp_torch.virtual import VirtualWorkers

__all__ = ["allgather_object", "start_timeline", "stop_timeline", "init", "shutdown", "communicator", "rank", "size", "local_rank", "broadcast_parameters",
           "broadcast_optimizer_state", "broadcast_object", "DistributedOptimizer", "Compression", "ddp_hook",
           "TorchParamAccess", "NonFiniteGradientError", "VirtualWorkers", "save_checkpoint", "load_checkpoint",
           "Average", "Sum", "Adasum", "Min", "Max", "Product", "allreduce", "allreduce_", "grouped_allreduce",
           "allgather", "broadcast", "broadcast_", "barrier", "join", "is_initialized", "local_size", "cross_rank",
           "cross_size", "mpi_built", "gloo_built", "nccl_built", "mpi_enabled", "mpi_threads_supported",
           "ccl_built", "cuda_built", "rocm_built", "allreduce_async", "allreduce_async_", "allgather_async",
           "broadcast_async", "broadcast_async_", "alltoall", "alltoall_async", "grouped_allreduce_",
           "grouped_allreduce_async", "grouped_allreduce_async_", "poll", "synchronize", "SyncBatchNorm"]


def __getattr__(name):
    """`hvd.elastic` (Horovod's namespace: run, TorchState, ElasticSampler, ObjectState) is
    gradcomp_torch.elastic, imported on first use because it imports Horovod where installed."""
    if name == "elastic":
        import importlib
        return importlib.import_module("gradcomp_torch.elastic")
    raise AttributeError(f"module 'gradcomp_torch' has no attribute {name!r}")

