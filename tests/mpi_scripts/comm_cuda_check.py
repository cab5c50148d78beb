"""CUDA tensors through the transports (needs a GPU; every rank may share one device).

    mpirun -np 2 python tests/mpi_scripts/comm_cuda_check.py mpi           # staged + (if any) CUDA-aware
    torchrun --standalone --nproc_per_node 2 tests/mpi_scripts/comm_cuda_check.py torch   # Gloo, staged
    torchrun --standalone --nproc_per_node 1 tests/mpi_scripts/comm_cuda_check.py nccl    # NCCL, 1 rank

Checks allreduce / allgather (uneven) / broadcast on CUDA float32, float16, bfloat16, int8 tensors
(results stay CUDA tensors on the same device, equal to the CPU sum), numpy inputs under NCCL, and a
GradientSync step on CUDA gradients equal to the CPU LocalWorld reference. Prints
"COMM_CUDA_CHECK OK ..." per rank; any error ends the job.
"""
from __future__ import annotations

import datetime
import os
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comm_check import CHECKS, INNER_TIMEOUT, as_np, data, ok  # noqa: E402


def check_cuda(comm, dev):
    import torch
    size, rank = comm.size, comm.rank
    for dt in ("float32", "float16", "bfloat16", "int8"):
        td = getattr(torch, dt)
        cpu = [torch.tensor(data(r, 1000, dt), dtype=torch.float64).to(td) for r in range(size)]
        x = cpu[rank].to(dev)
        before = x.clone()
        res = comm.allreduce(x, name=f"cuda.ar.{dt}").wait()
        ok(res.device == x.device and res.dtype == td, f"allreduce {dt}: {res.device} {res.dtype}")
        expect = cpu[0].double()
        for c in cpu[1:]:
            expect = expect + c.double()
        expect = expect.to(td) if dt != "int8" else expect.to(torch.int64).to(torch.int8)
        ok(torch.equal(res.cpu(), expect), f"allreduce cuda {dt}: wrong sum")
        ok(torch.equal(x, before), f"allreduce cuda {dt}: input modified")
        parts = comm.allgather(x[: 3 + rank], name=f"cuda.ag.{dt}").wait()
        ok(all(p.device == x.device and p.dtype == td for p in parts), f"allgather cuda {dt}: placement")
        ok([p.numel() for p in parts] == [3 + r for r in range(size)], f"allgather cuda {dt}: sizes")
        ok(all(torch.equal(p.cpu(), cpu[r][: 3 + r]) for r, p in enumerate(parts)), f"allgather cuda {dt}: values")
        root = size - 1
        got = comm.broadcast(x, root=root, name=f"cuda.bc.{dt}").wait()
        ok(got.device == x.device and torch.equal(got.cpu(), cpu[root]), f"broadcast cuda {dt}")
    # numpy in, numpy out, whatever the engine's device
    a = data(rank, 17, "float32").astype(np.float32)
    res = comm.allreduce(a, name="cuda.np").wait()
    ok(isinstance(res, np.ndarray) and np.array_equal(res, sum(data(r, 17, "float32").astype(np.float32)
                                                             for r in range(size))), "numpy through cuda engine")


def check_sync_cuda(comm, dev):
    import torch
    import gradcomp
    shapes = {"w": (40, 30), "b": (30,)}

    def grads(r, step):
        return {k: torch.tensor(data(r + step, int(np.prod(s)), "float32") / 50.0,
                                dtype=torch.float32).reshape(s) for k, s in shapes.items()}

    def run(c, r, device):
        s = gradcomp.GradientSync("topk:ratio=0.1", comm=c, seed=1)
        return [s.step({k: v.to(device) for k, v in grads(r, step).items()}) for step in range(3)]
    mine = run(comm, comm.rank, dev)
    ref = gradcomp.LocalWorld(comm.size).run(lambda c: run(c, c.rank, "cpu"))[comm.rank]
    for step in range(3):
        for k in shapes:
            ok(mine[step][k].device == dev, f"GradientSync cuda: {k} left the device")
            ok(np.allclose(as_np(mine[step][k]), as_np(ref[step][k]), rtol=1e-5, atol=1e-6),
               f"GradientSync cuda: step {step} {k} differs from the CPU reference")


def main():
    backend = sys.argv[1]
    try:
        import torch
        from gradcomp.comm import make_communicator
        if backend == "mpi":
            probe = make_communicator("mpi", timeout=INNER_TIMEOUT)
            aware = probe.cuda_aware
            dev = torch.device("cuda", probe.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(dev)
            comms = [make_communicator("mpi", timeout=INNER_TIMEOUT, cuda_aware=False)] + ([probe] if aware else [])
            print(f"rank {probe.rank}: Open MPI CUDA-aware: {aware}", flush=True)
        else:
            dist_backend = "nccl" if backend == "nccl" else "gloo"
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            torch.cuda.set_device(dev)
            torch.distributed.init_process_group(dist_backend, timeout=datetime.timedelta(seconds=INNER_TIMEOUT))
            comms = [make_communicator("torch", timeout=INNER_TIMEOUT)]
        for comm in comms:
            check_cuda(comm, dev)
            check_sync_cuda(comm, dev)
            comm.barrier()
        c = comms[0]
        print(f"COMM_CUDA_CHECK OK rank={c.rank} size={c.size} engine={c.engine} checks={CHECKS[0]}", flush=True)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        if backend == "mpi":
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(1)
        os._exit(1)


if __name__ == "__main__":
    main()
