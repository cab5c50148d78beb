"""Horovod's examples/pytorch/pytorch_synthetic_benchmark.py, shape for shape, with only its import
changed to gradcomp_torch (and, for an offline CPU machine, a tiny model instead of torchvision's
ResNet-50, CPU tensors and fewer iterations). Everything after "gradcomp checks" is not part of the
Horovod script: it prints CHECK lines for tests/test_horovod_dropin.py.
"""
import argparse
import os
import timeit

import numpy as np
import torch
import torch.nn.functional as F
import torch.optim as optim
import torch.utils.data.distributed

if os.environ.get("HVD_REAL"):         # the same script on Horovod itself, to compare the results
    import horovod.torch as hvd
else:
    import gradcomp_torch as hvd      # was: import horovod.torch as hvd

# Benchmark settings
parser = argparse.ArgumentParser(description='PyTorch Synthetic Benchmark',
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument('--fp16-allreduce', action='store_true', default=False,
                    help='use fp16 compression during allreduce')
parser.add_argument('--batch-size', type=int, default=8, help='input batch size')
parser.add_argument('--num-warmup-batches', type=int, default=1,
                    help='number of warm-up batches that don\'t count towards benchmark')
parser.add_argument('--num-batches-per-iter', type=int, default=2, help='number of batches per benchmark iteration')
parser.add_argument('--num-iters', type=int, default=3, help='number of benchmark iterations')
parser.add_argument('--use-adasum', action='store_true', default=False, help='use adasum algorithm to do reduction')
args = parser.parse_args()

hvd.init()
torch.manual_seed(1234 + hvd.rank())        # different starting points: broadcast_parameters must fix it

# Set up standard model (a tiny CNN: no torchvision weights offline).
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                            torch.nn.Flatten(), torch.nn.Linear(128, 10))

# By default, Adasum doesn't need scaling up learning rate.
lr_scaler = hvd.size() if not args.use_adasum else 1

optimizer = optim.SGD(model.parameters(), lr=0.01 * lr_scaler)

# Horovod: (optional) compression algorithm.
compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none

# Horovod: wrap optimizer with DistributedOptimizer.
optimizer = hvd.DistributedOptimizer(optimizer,
                                     named_parameters=model.named_parameters(),
                                     compression=compression,
                                     op=hvd.Adasum if args.use_adasum else hvd.Average)

# Horovod: broadcast parameters & optimizer state.
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)

# Set up fixed fake data
data = torch.randn(args.batch_size, 3, 16, 16)
target = torch.LongTensor(args.batch_size).random_() % 10


def benchmark_step():
    optimizer.zero_grad()
    output = model(data)
    loss = F.cross_entropy(output, target)
    loss.backward()
    optimizer.step()


def log(s, nl=True):
    if hvd.rank() != 0:
        return
    print(s, end='\n' if nl else '')


log('Model: tiny CNN')
log('Batch size: %d' % args.batch_size)
device = 'CPU'
log('Number of %ss: %d' % (device, hvd.size()))

# Warm-up
log('Running warmup...')
timeit.timeit(benchmark_step, number=args.num_warmup_batches)

# Benchmark
log('Running benchmark...')
img_secs = []
for x in range(args.num_iters):
    time = timeit.timeit(benchmark_step, number=args.num_batches_per_iter)
    img_sec = args.batch_size * args.num_batches_per_iter / time
    log('Iter #%d: %.1f img/sec per %s' % (x, img_sec, device))
    img_secs.append(img_sec)

# Results
img_sec_mean = np.mean(img_secs)
img_sec_conf = 1.96 * np.std(img_secs)
log('Img/sec per %s: %.1f +-%.1f' % (device, img_sec_mean, img_sec_conf))
log('Total img/sec on %d %s(s): %.1f +-%.1f' %
    (hvd.size(), device, hvd.size() * img_sec_mean, hvd.size() * img_sec_conf))

# ---------------------------------------------------------------- gradcomp checks (not Horovod's script)
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
if hvd.rank() == 0:
    import hashlib
    print(f"PARAMS sha256={hashlib.sha256(flat.numpy().tobytes()).hexdigest()}")
if os.environ.get("HVD_REAL"):
    raise SystemExit(0)
optimizer.finalize()                         # local SGD (GRADCOMP_SYNC) may not end on a sync step
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
rows = hvd.allgather(flat[None])
same = bool((rows - rows[0]).abs().max() == 0)
mean_rank = float(hvd.allreduce(torch.tensor(float(hvd.rank()))))
total = float(hvd.allreduce(torch.tensor(1.0), op=hvd.Sum))
mode = os.environ.get("GRADCOMP_SYNC") or "allreduce"
memory = optimizer.gradient_sync.memory.spec()
stats = optimizer.stats()
if hvd.rank() == 0:
    print(f"CHECK params_equal[{mode}] {'PASS' if same else 'FAIL'}")
    ok = mean_rank == (hvd.size() - 1) / 2 and total == hvd.size() and hvd.size() == 2
    print(f"CHECK collectives[{mode}] {'PASS' if ok else 'FAIL'} mean_rank={mean_rank} total={total}")
    want = "none" if args.fp16_allreduce or optimizer.compressor.name == "none" else None
    print(f"CHECK fp16_memory_none[{mode}] {'PASS' if want is None or memory == want else 'FAIL'} {memory}")
    env_comp = (os.environ.get("GRADCOMP_COMPRESSOR") or "none").split(":")[0]
    got = optimizer.compressor.name
    ok = got == ("fp16" if args.fp16_allreduce else env_comp)      # Compression.none: the environment decides
    print(f"CHECK compressor[{mode}] {'PASS' if ok else 'FAIL'} {got}")
    sent = stats["bytes_sent_total"] > 0
    print(f"CHECK bytes_sent[{mode}] {'PASS' if sent else 'FAIL'} {stats['bytes_sent']} {stats['policy']}")
