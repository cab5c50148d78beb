"""VirtualWorkers: V virtual workers run as accumulated micro-batches, load-balanced, with a rank-time report.

    opt = gradcomp_torch.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                              named_parameters=model.named_parameters())
    vw = gradcomp_torch.VirtualWorkers(opt, num_samples=len(x_train), global_batch=256,
                                       virtual_workers=16, balance=True)
    for epoch in range(epochs):
        for step in vw.epoch(epoch):
            for mb in step:                                  # this rank's virtual workers
                out = model(x_train[mb.indices])
                (F.cross_entropy(out, y_train[mb.indices]) * mb.loss_scale).backward()
            opt.step()
            opt.zero_grad()
    print(vw.report.table())

Every step the N = global_batch samples are cut into V virtual-worker micro-batches that depend
only on (seed, epoch, step) (gradcomp.balance.VirtualSampler); this rank processes `shares[rank]`
of them, one backward pass each, and the optimizer compresses and averages once per step with the
weight P * n_r / N, so the average is the mean over all N samples whatever the number of ranks or
the split (the trajectory of the V-worker job, up to summation order: gradcomp.balance). The
global batch and hyperparameters therefore stay fixed when the world size changes: after the
optimizer's communicator changed, `resize()` re-splits the same V virtual workers.

Iterating a Step: before the first micro-batch it sets the optimizer's backward passes and weight
(DistributedOptimizer.set_step_share); after the last one it calls optimizer.synchronize() and
times both phases (compute: the micro-batches; wait: until the average was ready). The timings of
all ranks are exchanged with one small allreduce, waited for at the end of the next step (when the
gradient collectives issued after it have completed) or, on a step where the balancer re-evaluates,
before the split is made; they feed the report (`report`, `stats()`) and, with balance=True, the
LoadBalancer, which re-splits the virtual workers every `every` steps after the ranks' smoothed speed.
Every rank collects at the same points, so all make the same decision. `mb.loss_scale` = m_k / n_r makes the
accumulated gradient this rank's mean; with a sum-reduced loss use `mb.loss_scale / len(mb)`.
A rank given no sample in a step (only when a short last step has fewer samples than V) still
takes part in the averaging with its error-feedback residual.
"""
from __future__ import annotations

import time

import torch

from gradcomp import balance as gb
from gradcomp.config import virtual_workers_from_env


class MicroBatch:
    """One virtual worker's samples on this rank: `indices` (int64 tensor) and its `loss_scale`."""

    __slots__ = ("indices", "loss_scale", "worker")

    def __init__(self, indices, loss_scale, worker):
        self.indices, self.loss_scale, self.worker = indices, loss_scale, worker

    def __len__(self):
        return int(self.indices.numel())

    def __repr__(self):
        return f"MicroBatch(worker={self.worker}, samples={len(self)}, loss_scale={self.loss_scale:.4g})"


class Step:
    """This rank's part of one global step; iterate it for the micro-batches (see the module docstring)."""

    def __init__(self, owner, epoch, index, micro_batches, samples, total, shares):
        self.owner, self.epoch, self.index = owner, epoch, index
        self.micro_batches, self.samples, self.total, self.shares = micro_batches, samples, total, shares
        self.weight = gb.gradient_weight(samples, total, len(shares))

    def __len__(self):
        return len(self.micro_batches)

    def __iter__(self):
        opt = self.owner.optimizer
        opt.set_step_share(len(self.micro_batches), self.weight)
        t0 = time.perf_counter()
        yield from self.micro_batches
        t1 = time.perf_counter()
        opt.synchronize()
        t2 = time.perf_counter()
        self.owner._finish_step(self, t1 - t0, t2 - t1)


class VirtualWorkers:
    """V virtual workers on the ranks of `optimizer.comm` (a gradcomp_torch.DistributedOptimizer).

    global_batch (or micro_batch: global_batch = V * micro_batch) samples per step; virtual_workers
    defaults to GRADCOMP_VIRTUAL_WORKERS, else the world size. balance=True moves virtual workers
    towards faster ranks (every `every` steps, smoothing, threshold, min_units: gradcomp.balance.
    LoadBalancer); report=False skips the per-step timing exchange (then balance must be False).
    """

    def __init__(self, optimizer, num_samples: int, global_batch: int | None = None,
                 virtual_workers: int | None = None, *, micro_batch: int | None = None, balance: bool = False,
                 every: int = 10, smoothing: float = 0.5, threshold: float = 0.05, min_units: int = 1,
                 warmup: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 report: bool = True):
        if not hasattr(optimizer, "set_step_share") or not hasattr(optimizer, "comm"):
            raise TypeError("VirtualWorkers drives a gradcomp_torch.DistributedOptimizer, got "
                            f"{type(optimizer).__name__}")
        if balance and not report:
            raise ValueError("balance=True needs the timings: leave report=True")
        self.optimizer = optimizer
        v = virtual_workers if virtual_workers is not None else virtual_workers_from_env()
        v = v or optimizer.comm.size
        if (global_batch is None) == (micro_batch is None):
            raise ValueError("give exactly one of global_batch (samples per step) and micro_batch "
                             "(samples per virtual worker)")
        if micro_batch is not None:
            if not isinstance(micro_batch, int) or micro_batch < 1:
                raise ValueError(f"micro_batch must be an int >= 1, got {micro_batch!r}")
            global_batch = v * micro_batch
        self.sampler = gb.VirtualSampler(num_samples, global_batch, v, seed=seed, shuffle=shuffle,
                                              drop_last=drop_last)
        self.balancer = gb.LoadBalancer(v, optimizer.comm.size, every=every, smoothing=smoothing,
                                             min_units=min_units, threshold=threshold, warmup=warmup,
                                             enabled=balance)
        self.report = gb.RankTimeReport()
        self.timing = report
        self.global_step = 0
        self._pending = None

    # ------------------------------------------------------------------ properties
    @property
    def virtual_workers(self) -> int:
        return self.sampler.virtual_workers

    @property
    def global_batch(self) -> int:
        return self.sampler.global_batch

    @property
    def shares(self) -> tuple:
        self._collect()
        return self.balancer.shares

    def __len__(self):
        return self.sampler.steps_per_epoch

    # ------------------------------------------------------------------ the loop
    def epoch(self, epoch: int, start_step: int = 0):
        """The Steps of `epoch` (from `start_step`, e.g. after resuming mid-epoch)."""
        order = self.sampler.epoch_order(epoch)
        comm = self.optimizer.comm
        for i in range(start_step, self.sampler.steps_per_epoch):
            if self.balancer.due():
                self._collect()            # the split of this step depends on the last step's timings
            shares = self.balancer.shares
            mine, n, total = self.sampler.rank_batches(epoch, i, shares, comm.rank, order)
            first = gb.offsets(shares)[comm.rank]
            scales = gb.loss_scales([len(b) for b in mine])
            mbs = [MicroBatch(torch.from_numpy(b), s, first + k) for k, (b, s) in enumerate(zip(mine, scales))]
            yield Step(self, epoch, i, mbs, n, total, shares)

    def _finish_step(self, step, compute, wait):
        if self.timing:
            self._collect()                # the previous step's exchange: complete, it preceded this step's
            h = gb.exchange_start(self.optimizer.comm,
                                       [compute, wait, step.shares[self.optimizer.comm.rank], step.samples])
            self._pending = (h, self.global_step, step.shares)
        self.global_step += 1

    def _collect(self):
        """Finish the pending timing exchange: report the step, let the balancer see it."""
        if self._pending is None:
            return
        h, gstep, shares = self._pending
        self._pending = None
        comp, wait, units, samples = gb.exchange_finish(h, self.optimizer.comm.size)
        self.report.add(gstep, comp, wait, units, samples)
        self.balancer.observe(comp, shares)

    def stats(self, skip: int = 1) -> dict:
        """The rank-time report's summary (skip the first `skip` steps) and the last step's record."""
        self._collect()
        return {"summary": self.report.summary(skip), "last": self.report.last,
                "shares": list(self.balancer.shares), "rebalances": self.balancer.changes}

    # ------------------------------------------------------------------ world changes, checkpoints
    def resize(self):
        """Re-split the same V virtual workers equally over optimizer.comm's (new) size.

        Any timing exchange still pending is dropped (it belonged to the old world's collectives)."""
        self._pending = None
        self.balancer.resize(self.optimizer.comm.size)

    def state_dict(self) -> dict:
        self._collect()
        return {"global_step": self.global_step, "virtual_workers": self.virtual_workers,
                "global_batch": self.global_batch, "balancer": self.balancer.state_dict()}

    def load_state_dict(self, sd: dict):
        for key in ("virtual_workers", "global_batch"):
            if int(sd[key]) != getattr(self, key):
                raise ValueError(f"checkpoint has {key}={sd[key]} but this job declares {getattr(self, key)}; "
                                 "restore with the same virtual-worker configuration")
        self._pending = None
        self.global_step = int(sd["global_step"])
        self.balancer.load_state_dict(sd["balancer"])
