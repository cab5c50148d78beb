"""SyncBatchNorm: batch normalization whose batch statistics are computed over all ranks.

    import gradcomp_torch as hvd
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), hvd.SyncBatchNorm(8), torch.nn.ReLU())

Horovod's `hvd.SyncBatchNorm(num_features, eps, momentum, affine, track_running_stats)`, over whichever
gradcomp transport is active (MPI, Horovod, torch.distributed, LocalWorld; `comm=` picks one). In
training mode with more than one rank, the per-channel mean and the biased variance are those of the
union of all ranks' batches (ranks may hold different batch sizes); the running statistics are updated
with that mean and the unbiased variance, as torch.nn.BatchNorm does on the whole batch. In eval mode,
or with one rank, it is torch's batch norm on the local batch.

Ours: two differentiable Sum allreduces per forward pass -- [per-channel sums, element count], then
the per-channel sums of squared deviations from the global mean (two passes, so the variance does not
suffer the cancellation of E[x^2] - E[x]^2) -- and the backward pass reduces their gradients the same
way (gradcomp_torch.collectives' differentiable allreduce). Autograd then gives each rank the exact
gradient of the sum of all ranks' losses with respect to its own input, which is what
torch.nn.SyncBatchNorm computes; the weight and bias gradients stay local (the DistributedOptimizer
averages them). The statistics cross the transport as host arrays (2 * (C + 1) numbers per layer and
pass), and every rank must run the same SyncBatchNorm layers in the same order.
"""
from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from gradcomp_torch import runtime


class SyncBatchNorm(_BatchNorm):
    """Batch norm with statistics over every rank's batch (see the module docstring)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._comm = comm

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects a (N, C, ...) input with at least 2 dimensions, got "
                             f"shape {tuple(input.shape)}")

    def _factor(self):
        if self.momentum is not None:
            return self.momentum
        return 1.0 / float(self.num_batches_tracked)          # cumulative moving average, as torch

    def forward(self, input):
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm({self.num_features}) got {input.shape[1]} channels "
                             f"(input shape {tuple(input.shape)})")
        comm = runtime.communicator(self._comm) if self.training else None
        if not self.training or comm.size == 1:
            return super().forward(input)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        from gradcomp_torch.collectives import allreduce
        from gradcomp.horovod_api import Sum
        C = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        shape = [1, C] + [1] * (input.dim() - 2)
        work = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        n_local = work.numel() // C
        first = allreduce(torch.cat([work.sum(dims), work.new_tensor([float(n_local)])]), op=Sum,
                          name="syncbn.sum", comm=comm)
        count = first[C].detach()
        if count.item() < 2:
            raise ValueError(f"SyncBatchNorm: {int(count.item())} value(s) per channel over all ranks; "
                             "training needs at least 2 (a larger batch)")
        mean = first[:C] / count
        xc = work - mean.view(shape)
        var = allreduce((xc * xc).sum(dims), op=Sum, name="syncbn.var", comm=comm) / count
        out = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                f = self._factor()
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                unbiased = var.detach() * (count / (count - 1))
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return out.to(input.dtype)

    @classmethod
    def convert_sync_batchnorm(cls, module, comm=None):
        """A copy-free conversion: every torch.nn.BatchNorm*d in `module` becomes a SyncBatchNorm with
        the same parameters and buffers (as torch.nn.SyncBatchNorm.convert_sync_batchnorm)."""
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, comm=comm)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, comm))
        return out


__all__ = ["SyncBatchNorm"]
