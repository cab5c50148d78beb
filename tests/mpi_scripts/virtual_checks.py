"""Virtual workers and load balancing across real processes (mpirun -np 2).

    mpirun -np 2 python tests/mpi_scripts/virtual_checks.py [--backend mpi]

Rank 0 prints "CHECK <name> PASS|FAIL <detail>" per check and "ALL PASS" when all passed:
  v2_bit_exact      V=2 virtual workers, `none`, float64, SGD with momentum: the 2-rank model equals the
                    1-rank model (every rank also trains the same V on a one-rank communicator) bit for bit
                    after every step of 2 epochs
  v4_fp64           V=4 (two micro-batches per rank): equal within float64 summation-order rounding
  balanced_same     rank 1 is slowed by an injected delay per micro-batch, balance=True: the virtual
                    workers move to rank 0, both ranks hold the same shares after every step, and the
                    model still equals the 1-rank model within float64 rounding
  report            the rank-time report is identical on both ranks and records rank 1's delay
  example_v2        examples/torch_train.py --virtual-workers 2 (digits CNN, float32, 1 epoch): the 2-rank
                    model's checksum equals the 1-rank run's
  benchmark_run     benchmarks/load_balance.py's run (1 epoch, balanced, 1 ms delay): the report covers every
                    step after --skip and the model equals the 1-rank one within float32 rounding
"""
import argparse
import os
import sys
import time
import traceback

import numpy as np
import torch

import gradcomp
import gradcomp_torch as gct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

N_SAMPLES = 90        # 2 full steps of 32 and a short last step of 26 per epoch


def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_SAMPLES, 10, generator=g, dtype=torch.float64)
    return x, (x @ torch.randn(10, 4, generator=g, dtype=torch.float64)).argmax(-1)


X, Y = data()


def make_model():
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return m


def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def train(comm, v, epochs, *, delay=0.0, balance=False, every=2, spec="none", on_step=None):
    m = make_model()
    opt = gct.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9),
                                   named_parameters=m.named_parameters(), compressor=spec, comm=comm,
                                   bucket_mb=0.0005)
    vw = gct.VirtualWorkers(opt, N_SAMPLES, global_batch=32, virtual_workers=v, balance=balance, every=every,
                            warmup=0, threshold=0.0, seed=5)
    for e in range(epochs):
        for step in vw.epoch(e):
            for mb in step:
                if delay:
                    time.sleep(delay)
                loss = torch.nn.functional.cross_entropy(m(X[mb.indices]), Y[mb.indices]) * mb.loss_scale
                loss.backward()
            opt.step()
            opt.zero_grad()
            if on_step is not None:
                on_step(m, vw)
    return m, vw


def _same_on_ranks(comm, obj):
    return all(o == obj for o in comm.allgather_object(obj))


def v2_bit_exact(comm, a):
    trail = []
    m1, _ = train(gradcomp.SingleCommunicator(), 2, 2, on_step=lambda m, vw: trail.append(flat(m).clone()))
    k = iter(trail)
    exact = []
    m2, _ = train(comm, 2, 2, on_step=lambda m, vw: exact.append(torch.equal(flat(m), next(k))))
    ok = all(exact) and len(exact) == len(trail) == 6 and not torch.equal(flat(m2), flat(make_model()))
    return ok, f"{sum(exact)}/{len(trail)} steps bit-identical"


def v4_fp64(comm, a):
    m1, _ = train(gradcomp.SingleCommunicator(), 4, 2)
    m2, _ = train(comm, 4, 2)
    err = float((flat(m1) - flat(m2)).abs().max())
    return 0 < err < 1e-12 or err == 0, f"max |1 rank - 2 ranks| = {err:.2e}"


def balanced_same(comm, a):
    m1, _ = train(gradcomp.SingleCommunicator(), 8, 3)
    agree = []
    seen = []
    m2, vw = train(comm, 8, 3, delay=0.03 if comm.rank == 1 else 0.0, balance=True,
                   on_step=lambda m, vw: (agree.append(_same_on_ranks(comm, list(vw.shares))),
                                          seen.append(tuple(vw.shares))))
    err = float((flat(m1) - flat(m2)).abs().max())
    final = vw.shares
    ok = all(agree) and final[0] > final[1] and vw.balancer.changes >= 1 and err < 1e-12
    a.report = vw.stats(skip=0)
    return ok, f"shares {seen}, agree {sum(agree)}/{len(agree)}, max err {err:.2e}"


def report(comm, a):
    st = getattr(a, "report", None)
    if st is None:
        return False, "balanced_same did not run"
    same = _same_on_ranks(comm, repr(st))
    s = st["summary"]
    slow_rank_slow = s["compute"][1] / max(1, st["last"]["units"][1]) > s["compute"][0] / max(1, st["last"]["units"][0])
    ok = same and s["steps"] == 9 and slow_rank_slow and all(w >= 0 for w in s["wait"])
    return ok, (f"identical {same}, steps {s['steps']}, compute ms {[round(1e3 * c, 1) for c in s['compute']]}, "
                f"wait ms {[round(1e3 * w, 1) for w in s['wait']]}")


def example_v2(comm, a):
    import torch_train
    args = ["--virtual-workers", "2", "--epochs", "1", "--no-progress", "--threads", "1", "--lr", "0.1"]
    one = torch_train.train(torch_train.parse_args(args), gradcomp.SingleCommunicator())
    two = torch_train.train(torch_train.parse_args(args), comm)
    ok = one["checksum"] == two["checksum"] and two["shares"] == [1, 1] and one["shares"] == [2]
    return ok, f"checksums {one['checksum']} (1 rank) {two['checksum']} (2 ranks), acc {two['acc']:.1f}"


def benchmark_run(comm, a):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import common_data
    import load_balance
    args = load_balance.parse(["--epochs", "1", "--skip", "2", "--every", "2", "--delay", "0.001"])
    data = tuple(torch.from_numpy(v) for v in common_data.digits(0))
    one = load_balance.run(args, gradcomp.SingleCommunicator(), data, balance=False, compressor="none", delay=0.0)
    two = load_balance.run(args, comm, data, balance=True, compressor="none", delay=args.delay)
    err = float((one["params"] - two["params"]).abs().max())
    s = two["stats"]["summary"]
    ok = s["steps"] == two["steps"] == 6 and err < 1e-5 and "wait_%" in two["table"]
    return ok, f"steps {s['steps']}, shares {two['shares']}, max err {err:.1e}"


CHECKS = {"v2_bit_exact": v2_bit_exact, "v4_fp64": v4_fp64, "balanced_same": balanced_same, "report": report,
          "example_v2": example_v2, "benchmark_run": benchmark_run}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    comm = gct.init(a.backend)
    assert comm.size == 2, f"run with 2 ranks, got {comm.size}"
    failed = 0
    for name, fn in CHECKS.items():
        try:
            ok, detail = fn(comm, a)
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            ok, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        oks = comm.allgather(np.array([1 if ok else 0], np.int64), name="check").wait()
        ok = all(int(np.asarray(o)[0]) for o in oks)
        failed += not ok
        if comm.rank == 0:
            print(f"CHECK {name} {'PASS' if ok else 'FAIL'} {detail}", flush=True)
    if comm.rank == 0 and not failed:
        print(f"ALL PASS ({comm.engine})", flush=True)
    sys.stdout.flush()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
