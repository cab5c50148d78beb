"""Data-parallel training with compressed gradients: a CNN on digits or an LSTM language model.

    python examples/torch_train.py                                    # one process
    GRADCOMP_COMPRESSOR=topk:ratio=0.01 mpirun -np 2 python examples/torch_train.py
    torchrun --nproc_per_node 2 examples/torch_train.py --compressor fp16
    horovodrun -np 2 python examples/torch_train.py --backend horovod
    mpirun -np 2 python examples/torch_train.py --task lm             # WikiText-2 (../shared/data)
    python examples/torch_train.py --virtual-workers 8                # digits: the 8-worker job on one process

Each rank trains on its own shard of the data; gradients are averaged through
gradcomp_torch.DistributedOptimizer (compressor / memory / sync policy from the arguments or the
GRADCOMP_* variables). Rank 0 shows a progress bar and prints per epoch the training loss, the test
accuracy (digits) or perplexity (lm), the bytes this rank sent and the compression ratio.
--checkpoint PATH saves after every epoch: opt.gathered_state_dict() collects every rank's residuals
(and, under a periodic --sync policy, every rank's own parameters and momentum) into one file that
rank 0 writes with gradcomp_torch.save_checkpoint (sha256-checked, loaded with weights_only=True);
--resume continues from it exactly as if the run had not stopped, under every sync policy.
--virtual-workers V (digits; or GRADCOMP_VIRTUAL_WORKERS) trains V virtual workers of --batch-size
images each, whatever the number of ranks (gradcomp_torch.VirtualWorkers: the same global batch and
model on 1 or P ranks); --balance moves virtual workers to faster ranks; rank 0 prints the rank-time
report at the end.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common_data  # noqa: E402

import gradcomp_torch as gct  # noqa: E402
from gradcomp.config import virtual_workers_from_env  # noqa: E402


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class WordLM(nn.Module):
    def __init__(self, vocab, emsize, nhid):
        super().__init__()
        self.emb = nn.Embedding(vocab, emsize)
        self.rnn = nn.LSTM(emsize, nhid, batch_first=True)
        self.out = nn.Linear(nhid, vocab)

    def forward(self, x, hidden=None):
        h, hidden = self.rnn(self.emb(x), hidden)
        return self.out(h), hidden


def parse_args(argv=None):
    p = common_data.training_parser(__doc__.split("\n\n")[0], backends="auto | mpi | torch | horovod",
                                    max_vocab=8000, threads_help="torch threads per rank (0: cores / local ranks)",
                                    checkpoint_help="save here after every epoch")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning rate over the run: cosine decay to 0, or constant")
    p.add_argument("--bucket-mb", type=float, default=None, help="fusion bucket MiB (default GRADCOMP_BUCKET_MB)")
    p.add_argument("--virtual-workers", type=int, default=None,
                   help="digits: V virtual workers of --batch-size images (default GRADCOMP_VIRTUAL_WORKERS)")
    p.add_argument("--balance", action="store_true", help="with virtual workers: follow each rank's speed")
    a = common_data.finish_args(p, argv)
    a.virtual_workers = a.virtual_workers or virtual_workers_from_env()
    if a.balance and not a.virtual_workers:
        p.error("--balance needs --virtual-workers V (or GRADCOMP_VIRTUAL_WORKERS)")
    if a.virtual_workers and a.task != "digits":
        p.error("--virtual-workers is implemented for --task digits")
    return a


def _local_ranks(size):
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return size


def allreduce_sum(comm, values):
    return np.asarray(comm.allreduce(np.asarray(values, dtype=np.float64), name="metrics").wait(), np.float64)


def checksum(model) -> str:
    h = hashlib.sha256()
    for _, t in sorted(model.state_dict().items()):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ tasks
class DigitsTask:
    def __init__(self, a, comm):
        self.a, self.comm = a, comm
        self.xtr, self.ytr, self.xte, self.yte = (torch.from_numpy(v) for v in common_data.digits(a.seed))
        self.model = DigitsCNN()
        self.metric = "acc"

    def make_optimizer(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.a.lr, momentum=self.a.momentum)

    def attach(self, opt):
        self.vw = None if not self.a.virtual_workers else gct.VirtualWorkers(
            opt, len(self.ytr), micro_batch=self.a.batch_size, virtual_workers=self.a.virtual_workers,
            balance=self.a.balance, seed=self.a.seed)

    def batches(self, epoch):
        if self.vw is not None:
            return _VirtualSteps(self.vw, epoch)
        idx = common_data.epoch_shard(len(self.ytr), self.comm.rank, self.comm.size, self.a.seed, epoch)
        return common_data.batches(idx, self.a.batch_size)

    def train_step(self, opt, batch, state):
        if self.vw is not None:               # a VirtualWorkers step: this rank's virtual workers
            opt.zero_grad()
            total = 0.0
            for mb in batch:
                loss = F.cross_entropy(self.model(self.xtr[mb.indices]), self.ytr[mb.indices])
                (loss * mb.loss_scale).backward()
                total += loss.item() * len(mb)
            opt.step()
            return total, batch.samples, state
        x, y = self.xtr[batch], self.ytr[batch]
        opt.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        opt.step()
        return loss.item() * len(batch), len(batch), state

    @torch.no_grad()
    def evaluate(self):
        idx = common_data.shard_tokens(np.arange(len(self.yte)), self.comm.rank, self.comm.size)
        if self.comm.rank == self.comm.size - 1:
            idx = np.arange(idx[0] if len(idx) else 0, len(self.yte))   # the last rank takes the remainder
        logits = self.model(self.xte[idx])
        correct = float((logits.argmax(1) == self.yte[idx]).sum())
        c, n = allreduce_sum(self.comm, [correct, len(idx)])
        return 100.0 * c / n


class LMTask:
    def __init__(self, a, comm):
        self.a, self.comm = a, comm
        corpus = common_data.Corpus(a.data, a.max_vocab)
        train = common_data.shard_tokens(corpus.encode(a.data), comm.rank, comm.size)
        self.train = torch.from_numpy(common_data.batchify(train, a.batch_size))
        test = common_data.shard_tokens(corpus.encode(a.eval_data), comm.rank, comm.size)
        self.test = torch.from_numpy(common_data.batchify(test, 10))
        self.model = WordLM(len(corpus), a.emsize, a.nhid)
        self.metric = "ppl"

    def make_optimizer(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.a.lr)

    def batches(self, epoch):
        t = self.train.shape[1] - 1
        return [(i, min(self.a.bptt, t - i)) for i in range(0, t, self.a.bptt)]

    def train_step(self, opt, batch, hidden):
        i, n = batch
        x, y = self.train[:, i:i + n], self.train[:, i + 1:i + 1 + n]
        if hidden is not None:
            hidden = tuple(h.detach() for h in hidden)
        opt.zero_grad()
        out, hidden = self.model(x, hidden)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.synchronize()                                  # averaged gradients, then clip them
        nn.utils.clip_grad_norm_(self.model.parameters(), self.a.clip)
        with opt.skip_synchronize():
            opt.step()
        return loss.item() * y.numel(), y.numel(), hidden

    @torch.no_grad()
    def evaluate(self):
        total, count, hidden = 0.0, 0, None
        for i in range(0, self.test.shape[1] - 1, self.a.bptt):
            n = min(self.a.bptt, self.test.shape[1] - 1 - i)
            out, hidden = self.model(self.test[:, i:i + n], hidden)
            y = self.test[:, i + 1:i + 1 + n]
            total += float(F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum"))
            count += y.numel()
        s, n = allreduce_sum(self.comm, [total, count])
        return math.exp(s / n)


class _VirtualSteps:
    """An epoch of VirtualWorkers steps with a length (built lazily: the balancer may re-split)."""

    def __init__(self, vw, epoch):
        self.vw, self.epoch = vw, epoch

    def __len__(self):
        return len(self.vw)

    def __iter__(self):
        return self.vw.epoch(self.epoch)


# ------------------------------------------------------------------ main loop
def main(argv=None):
    a = parse_args(argv)
    return train(a, gct.init(a.backend))


_INIT_LOCK = threading.Lock()


def train(a, comm):
    """Train with parsed arguments `a` on communicator `comm`; returns the last epoch's metrics."""
    torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // max(1, _local_ranks(comm.size))))
    with _INIT_LOCK:         # in-process ranks (LocalWorld threads) share torch's generator: seed + init atomically
        torch.manual_seed(a.seed)
        task = (LMTask if a.task == "lm" else DigitsTask)(a, comm)
    model = task.model
    gct.broadcast_parameters(model.state_dict(), root_rank=0, comm=comm)
    opt = gct.DistributedOptimizer(task.make_optimizer(), named_parameters=model.named_parameters(),
                                   compressor=a.compressor, memory=a.memory, sync=a.sync,
                                   bucket_mb=a.bucket_mb, comm=comm)
    if hasattr(task, "attach"):
        task.attach(opt)
    total_steps = a.epochs * len(task.batches(0))
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps) if a.schedule == "cosine"
             else torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    start = 0
    if a.resume and os.path.exists(a.checkpoint):
        ck = gct.load_checkpoint(a.checkpoint)      # checksum verified; tensors and plain data only
        model.load_state_dict(ck["model"])          # rank 0's parameters first ...
        opt.load_state_dict(ck["optimizer"])        # ... then this rank's own part (params under local SGD)
        sched.load_state_dict(ck["scheduler"])
        start = int(ck["epoch"])
    rank0 = comm.rank == 0
    if rank0:
        print(f"gradcomp: {a.task} on {comm.size} rank(s) via {getattr(comm, 'engine', '?')}; {opt!r}", flush=True)
    result = {}
    last = a.epochs if a.stop_after is None else min(a.epochs, start + a.stop_after)
    for epoch in range(start, last):
        model.train()
        t0, before = time.time(), opt.stats()
        steps = task.batches(epoch)
        bar = None
        if rank0 and not a.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=len(steps), desc=f"epoch {epoch + 1}/{a.epochs}", leave=False, file=sys.stderr)
        loss_sum, count, state = 0.0, 0, None
        for b in steps:
            ls, n, state = task.train_step(opt, b, state)
            sched.step()
            loss_sum, count = loss_sum + ls, count + n
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ls / n:.3f}")
        if bar is not None:
            bar.close()
        s, n = allreduce_sum(comm, [loss_sum, count])
        model.eval()
        score = task.evaluate()
        after = opt.stats()
        sent = after["bytes_sent"] - before["bytes_sent"]
        dense = after["bytes_dense"] - before["bytes_dense"]
        ratio = dense / sent if sent else float("nan")
        result = {"epoch": epoch + 1, "loss": s / n, task.metric: score, "bytes_sent": sent, "ratio": ratio,
                  "time_s": time.time() - t0}
        if rank0:
            shown = f"acc {score:.2f}%" if task.metric == "acc" else f"ppl {score:.1f}"
            print(f"epoch {epoch + 1}/{a.epochs}  loss {s / n:.4f}  {shown}  sent {sent / 1e6:.3f} MB  "
                  f"ratio {ratio:.1f}x  {result['time_s']:.1f}s", flush=True)
        if a.checkpoint:
            sd = opt.gathered_state_dict()           # collective: every rank's own state
            if rank0:                                # atomic write, sha256 in the file
                gct.save_checkpoint({"model": model.state_dict(), "optimizer": sd, "scheduler": sched.state_dict(),
                                     "epoch": epoch + 1}, a.checkpoint)
            comm.barrier()
    vw = getattr(task, "vw", None)
    if vw is not None:
        st = vw.stats(skip=1)
        result.update(virtual_workers=vw.virtual_workers, shares=st["shares"], rank_times=st["summary"])
        if rank0:
            print(f"virtual workers: {vw.virtual_workers} x {a.batch_size} images, rank-time report:\n"
                  + vw.report.table(skip=1), flush=True)
    result.update(checksum=checksum(model), compressor=opt.compressor.spec(), size=comm.size, total=opt.stats())
    if rank0 and a.json:
        print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
