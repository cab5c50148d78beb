"""PyTorch's DDP tutorial (getting started with DistributedDataParallel, the torchrun variant) with a
communication hook -- the DDP comm-hook tutorial's `register_comm_hook(state, hook)` line -- where
the hook comes from gradcomp_torch instead of torch.distributed.algorithms.ddp_comm_hooks. Run it
with torchrun; the mode comes from GRADCOMP_COMPRESSOR (a periodic GRADCOMP_SYNC is refused)."""
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.optim as optim
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcomp_torch as hooks       # was: from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


class ToyModel(nn.Module):
    def __init__(self):
        super(ToyModel, self).__init__()
        self.net1 = nn.Linear(10, 10)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(10, 5)

    def forward(self, x):
        return self.net2(self.relu(self.net1(x)))


def demo_basic(steps=4):
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(f"Start running basic DDP example on rank {rank}.")
    torch.manual_seed(0)
    model = ToyModel()
    ddp_model = DDP(model)
    ddp_model.register_comm_hook(None, hooks.ddp_hook())      # was: (None, default_hooks.allreduce_hook)

    loss_fn = nn.MSELoss()
    optimizer = optim.SGD(ddp_model.parameters(), lr=0.001)
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        optimizer.zero_grad()
        outputs = ddp_model(torch.randn(20, 10, generator=g))
        labels = torch.randn(20, 5, generator=g)
        loss_fn(outputs, labels).backward()
        optimizer.step()
    return ddp_model


if __name__ == "__main__":
    demo_basic()
    dist.destroy_process_group()
    print(f"Finished running basic DDP example on rank {os.environ.get('RANK')}.")
