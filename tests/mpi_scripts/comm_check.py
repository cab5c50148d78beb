"""Multi-process check of one transport: every collective, several dtypes, async, GradientSync.

    mpirun -np 2 python tests/mpi_scripts/comm_check.py mpi          (or: auto)
    torchrun --standalone --nproc_per_node 2 tests/mpi_scripts/comm_check.py torch
    horovodrun -np 2 python tests/mpi_scripts/comm_check.py horovod

Each rank prints "COMM_CHECK OK rank=R size=S engine=E checks=N". On any error a rank prints its
traceback and ends the whole job (MPI Abort, or a non-zero exit the launcher propagates), so a
failing rank never leaves its peers hanging (a rank failing in a script without such handling:
fail_probe.py).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback

import numpy as np

try:
    import ml_dtypes
except ImportError:  # numpy bfloat16 is optional
    ml_dtypes = None

from gradcomp.comm.launch import scaled_timeout  # noqa: E402

CHECKS = [0]
INNER_TIMEOUT = scaled_timeout(60)       # a collective's bound: 60 s on an idle machine, more under load
INT_DTYPES = ("int8", "uint8", "int32")


def ok(cond, what):
    if not cond:
        raise AssertionError(what)
    CHECKS[0] += 1


def data(r, n, dtype):
    """Rank r's deterministic input (float64 values exactly representable in `dtype`)."""
    i = np.arange(n, dtype=np.float64)
    if dtype == "uint8":                        # sums over ranks overflow: they must wrap
        return (i * 37 + r * 101) % 256
    if dtype == "int8":
        return (i * 37 + r * 101) % 256 - 128
    if dtype in INT_DTYPES:
        return ((i % 50) - 25) * (r + 1)
    v = ((i % 2000) - 1000) * 0.37 * (r + 1) + r / 3.0
    return cast_np(v, dtype).astype(np.float64)


def cast_np(v, dtype):
    if dtype == "bfloat16":
        return np.asarray(v, np.float32).astype(ml_dtypes.bfloat16) if ml_dtypes else None
    return np.asarray(v).astype(dtype)


def make(kind, v, dtype):
    if kind == "numpy":
        return cast_np(v, dtype)
    import torch
    return torch.tensor(np.asarray(v, np.float64), dtype=torch.float64).to(getattr(torch, dtype))


def as_np(x):
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return x.detach().cpu().double().numpy()


def same_kind(res, like, dtype, n, what):
    if isinstance(like, np.ndarray):
        ok(isinstance(res, np.ndarray) and str(res.dtype) == dtype, f"{what}: got {type(res)} {res.dtype}")
    else:
        ok(type(res) is type(like) and res.dtype == like.dtype, f"{what}: got {type(res)} {res.dtype}")
    ok(tuple(res.shape) == (n,), f"{what}: shape {tuple(res.shape)} != ({n},)")


def kinds_dtypes():
    for kind in ("numpy", "torch"):
        for dt in ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int32"):
            if kind == "numpy" and dt == "bfloat16" and ml_dtypes is None:
                continue
            yield kind, dt


def check_allreduce(comm):
    size, rank = comm.size, comm.rank
    for kind, dt in kinds_dtypes():
        for n in ((0, 7, 1000, 1 << 16) if dt == "float16" else (7, 1000)):
            x = make(kind, data(rank, n, dt), dt)
            before = as_np(x).copy()
            res = comm.allreduce(x, name=f"ar.{kind}.{dt}.{n}").wait()
            what = f"allreduce {kind} {dt} n={n}"
            same_kind(res, x, dt, n, what)
            total = sum(data(r, n, dt) for r in range(size))
            if dt in INT_DTYPES:                    # integer sums wrap like the dtype
                expect = total.astype(np.int64).astype(dt).astype(np.float64)
            else:                                   # one correctly rounded sum (exact for 2 ranks)
                expect = as_np(make(kind, total, dt))
            if size == 2 or dt in INT_DTYPES:
                ok(np.array_equal(as_np(res), expect), f"{what}: wrong sum {as_np(res)[:5]} vs {expect[:5]}")
            else:
                ok(np.allclose(as_np(res), expect, rtol=1e-2), f"{what}: wrong sum")
            ok(np.array_equal(as_np(x), before), f"{what}: input was modified")


def check_donation(comm):
    """allreduce(x, donate=True): the right sum, summed in place into a CPU torch tensor; results of
    plain allreduce are private (modifying one changes neither the input nor a later result)."""
    import torch
    size, rank = comm.size, comm.rank
    ok(comm.accepts_donation, f"{comm.engine} transport should accept donated buffers")
    for kind, dt in (("torch", "float32"), ("torch", "float16"), ("torch", "int8"), ("numpy", "float32"),
                     ("numpy", "float64")):
        x = make(kind, data(rank, 1000, dt), dt)
        res = comm.allreduce(x, name=f"donate.{kind}.{dt}", donate=True).wait()
        total = sum(data(r, 1000, dt) for r in range(size))
        expect = total.astype(np.int64).astype(dt).astype(np.float64) if dt in INT_DTYPES else \
            as_np(make(kind, total, dt))
        ok(np.array_equal(as_np(res), expect), f"donated allreduce {kind} {dt}: wrong sum")
        if kind == "torch" and dt == "float32":
            ok(res.data_ptr() == x.data_ptr(), f"{comm.engine}: a donated float32 CPU tensor was copied")
    # allreduce_group: one collective for several tensors; donated ones are summed in place (Horovod's
    # grouped allreduce) or through a fresh concatenation (others); the rest are never modified
    for kind, dt in (("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"), ("torch", "int8"),
                     ("numpy", "float64"), ("numpy", "uint8")):
        xs = [make(kind, data(rank + k, n, dt), dt) for k, n in enumerate((5, 300, 1))]
        kept = [as_np(x).copy() for x in xs]
        res = comm.allreduce_group(xs, name=f"group.{dt}", donate=[True, False, True]).wait()
        ok(isinstance(res, list) and len(res) == 3, f"allreduce_group {dt}: expected 3 results")
        for k, (n, r) in enumerate(zip((5, 300, 1), res)):
            total = sum(data(q + k, n, dt) for q in range(size))
            expect = total.astype(np.int64).astype(dt).astype(np.float64) if dt in INT_DTYPES else \
                as_np(make(kind, total, dt))
            same_kind(r, xs[k], dt, n, f"allreduce_group {kind} {dt} part {k}")
            ok(np.array_equal(as_np(r), expect), f"allreduce_group {kind} {dt} part {k}: wrong sum")
        ok(np.array_equal(as_np(xs[1]), kept[1]), f"allreduce_group {dt}: an array that was not donated changed")
        if comm.engine == "horovod" and dt == "float32":
            ok(res[0].data_ptr() == xs[0].data_ptr() and res[2].data_ptr() == xs[2].data_ptr(),
               "Horovod grouped allreduce copied donated tensors")
    x = torch.ones(64)
    r1 = comm.allreduce(x, name="private.1").wait()
    r1.mul_(7.0)
    r2 = comm.allreduce(x, name="private.2").wait()
    ok(torch.equal(x, torch.ones(64)) and torch.equal(r2, torch.full((64,), float(size))),
       "modifying an allreduce result changed the input or a later result")


def check_allgather(comm):
    size, rank = comm.size, comm.rank
    for kind, dt in kinds_dtypes():
        n_of = lambda r: 0 if r == 0 and dt == "float32" else 3 + 5 * r  # noqa: E731 (an empty part too)
        x = make(kind, data(rank, n_of(rank), dt), dt)
        res = comm.allgather(x, name=f"ag.{kind}.{dt}").wait()
        what = f"allgather {kind} {dt}"
        ok(isinstance(res, list) and len(res) == size, f"{what}: expected a list of {size}")
        for r, part in enumerate(res):
            same_kind(part, x, dt, n_of(r), f"{what} part {r}")
            ok(np.array_equal(as_np(part), as_np(make(kind, data(r, n_of(r), dt), dt))), f"{what}: part {r} wrong")


def check_broadcast(comm):
    size, rank = comm.size, comm.rank
    root = 1 if size > 1 else 0
    for kind, dt in (("numpy", "float32"), ("numpy", "int32"), ("torch", "float16"), ("torch", "bfloat16"),
                     ("torch", "float64"), ("numpy", "uint8")):
        x = make(kind, data(rank, 33, dt), dt)
        before = as_np(x).copy()
        res = comm.broadcast(x, root=root, name=f"bc.{kind}.{dt}").wait()
        same_kind(res, x, dt, 33, f"broadcast {kind} {dt}")
        ok(np.array_equal(as_np(res), as_np(make(kind, data(root, 33, dt), dt))), f"broadcast {kind} {dt}: wrong")
        ok(np.array_equal(as_np(x), before), f"broadcast {kind} {dt}: input was modified")


def check_sendrecv(comm):
    """Pairwise exchange (rank r with r ^ 1), a call where this rank only sends or only receives, and
    gtopk's tree merge (which runs on it) equal to the LocalWorld reference, with its wire bytes."""
    import gradcomp
    size, rank = comm.size, comm.rank
    peer = rank ^ 1 if (rank ^ 1) < size else None
    for kind, dt in (("numpy", "float32"), ("torch", "float32"), ("numpy", "uint8"), ("torch", "int32")):
        x = make(kind, data(rank, 17, dt), dt)
        res = comm.sendrecv(x, dest=peer, source=peer, name=f"sr.{kind}.{dt}").wait()
        if peer is None:
            ok(res is None, f"sendrecv {kind} {dt}: no source, expected None")
        else:
            same_kind(res, x, dt, 17, f"sendrecv {kind} {dt}")
            ok(np.array_equal(as_np(res), as_np(make(kind, data(peer, 17, dt), dt))), f"sendrecv {kind} {dt}: wrong")
    if size > 1:                                    # one way only: rank 0 -> rank size-1, 5 elements
        x = make("numpy", data(rank, 5, "float32"), "float32")
        res = comm.sendrecv(x, dest=size - 1 if rank == 0 else None, source=0 if rank == size - 1 else None,
                            count=5, name="sr.oneway").wait()
        ok((res is None) == (rank != size - 1), "sendrecv one way: wrong receiver")
        ok(res is None or np.array_equal(as_np(res), data(0, 5, "float32")), "sendrecv one way: wrong data")

    def run(c, kind):
        import torch
        s = gradcomp.GradientSync("gtopk:ratio=0.05", comm=c, seed=1)
        outs = []
        for step in range(2):
            g = data(c.rank + 7 * step, 300, "float32").astype(np.float32) / 50.0
            outs.append(as_np(s.step({"w": torch.from_numpy(g) if kind == "torch" else g})["w"]))
        return outs, s.stats()
    for kind in ("numpy", "torch"):
        mine, stats = run(comm, kind)
        ref = gradcomp.LocalWorld(size).run(lambda c: run(c, kind))[rank]
        ok(all(np.array_equal(a, b) for a, b in zip(mine, ref[0])), f"gtopk tree {kind}: differs from LocalWorld")
        want = ref[1]["wire_sent"] if comm.native_sendrecv else None
        ok(want is None or stats["wire_sent"] == want, f"gtopk tree {kind}: wire {stats} vs reference {ref[1]}")


def check_async(comm):
    size, rank = comm.size, comm.rank
    a = data(rank, 4096, "float32").astype(np.float32)
    h1 = comm.allreduce(a, name="async.a")
    h2 = comm.allgather(np.full(rank + 2, rank, np.int32), name="async.g")
    import torch
    h3 = comm.allreduce(torch.full((5,), float(rank + 1), dtype=torch.float64), name="async.t")
    r3, r2, r1 = h3.wait(), h2.wait(), h1.wait()     # reverse order
    ok(np.array_equal(r1, sum(data(r, 4096, "float32").astype(np.float32) for r in range(size))), "async: a")
    ok([list(p) for p in r2] == [[r] * (r + 2) for r in range(size)], "async: g")
    ok(torch.equal(r3, torch.full((5,), float(sum(range(1, size + 1))), dtype=torch.float64)), "async: t")
    ok(h1.wait() is r1, "wait() twice returns the same result")
    # overlap: rank 0 issues while rank 1 is still busy; issuing must not block on the peer
    if size > 1:
        if rank == 1:
            time.sleep(1.0)
        t0 = time.monotonic()
        h = comm.allreduce(np.ones(256, np.float32), name="overlap")
        issued = time.monotonic() - t0
        if rank == 0:
            ok(issued < 0.5, f"allreduce blocked the caller for {issued:.2f}s while the peer was away")
            ok(not h.done(), "done() was True before the peer joined")
            try:
                h.wait(timeout=0.05)
                ok(False, "wait(timeout=0.05) returned before the peer joined")
            except TimeoutError as e:            # CollectiveTimeout: names the collective, rank, remedy
                from gradcomp.comm.base import CollectiveTimeout
                msg = str(e)
                ok(isinstance(e, CollectiveTimeout) and "overlap" in msg and "rank 0 of" in msg
                   and "GRADCOMP_TIMEOUT" in msg, f"unclear timeout error: {e!r}")
        ok(np.array_equal(h.wait(), np.full(256, size, np.float32)), "overlap: wrong result after timeout")
        ok(h.done(), "done() False after wait()")


def check_mpi_options(comm):
    """MPI only: progress="poll" and the synchronous (unthreaded) mode give the same results."""
    if comm.engine != "mpi":
        return
    from gradcomp.comm.mpi import MPICommunicator, cores_per_rank
    size, rank = comm.size, comm.rank
    want = "block" if cores_per_rank(comm.local_size) >= 2 else "poll"
    ok(comm.progress == want, f"progress 'auto' chose {comm.progress!r} with {cores_per_rank(comm.local_size)} "
                              "core(s) per local rank")
    for kw in ({"progress": "poll"}, {"threaded": False}):
        c = MPICommunicator(timeout=INNER_TIMEOUT, **kw)
        ok(c.threaded == kw.get("threaded", True) and c.local_rank == comm.local_rank, f"{kw}: settings")
        x = data(rank, 500, "float16").astype(np.float16)
        res = c.allreduce(x, name="opt.ar").wait()
        ok(np.array_equal(res, sum(data(r, 500, "float16") for r in range(size)).astype(np.float16)), f"{kw}: ar")
        parts = c.allgather(np.full(rank + 1, rank, np.int8), name="opt.ag").wait()
        ok([p.tolist() for p in parts] == [[r] * (r + 1) for r in range(size)], f"{kw}: allgather")
        got = c.broadcast(np.full(4, rank, np.float64), root=size - 1, name="opt.bc").wait()
        ok(np.array_equal(got, np.full(4, size - 1, np.float64)), f"{kw}: broadcast")
        c.close()
        try:
            c.allreduce(x)
            ok(False, "a closed communicator accepted a collective")
        except RuntimeError:
            CHECKS[0] += 1


def check_mpi_sum_paths(comm):
    """MPI only: every way the transport sums (2 ranks: its pairwise exchange; 4+: MPI_Iallreduce
    through a separate buffer; allreduce_algorithm="mpi": MPI_Iallreduce as it is; unthreaded) gives
    bit for bit what one blocking MPI_Allreduce gives, the same on every rank, for every wire dtype,
    in place (donated, grouped) or not, at sizes from 0 to above the latency threshold."""
    if comm.engine != "mpi":
        return
    from gradcomp.comm.mpi import MPICommunicator, _HOST, _MPI_TYPE, _sum_op, f32_to_bf16
    MPI, size, rank = comm.MPI, comm.size, comm.rank
    comms = [comm] + [MPICommunicator(timeout=INNER_TIMEOUT, **kw) for kw in
                      ({"allreduce_algorithm": "mpi"}, {"allreduce_algorithm": "pairwise"},
                       {"allreduce_algorithm": "pairwise", "threaded": False}, {"threaded": False},
                       {"progress": "poll"})]
    ok(comm.pairwise, "allreduce_algorithm 'auto' did not choose gradcomp's own sum paths")
    if "Open MPI" in MPI.Get_library_version() and "OMPI_MCA_coll_libnbc_iallreduce_algorithm" not in os.environ:
        # a world of 2 ranks: libnbc switched to recursive doubling through MPI_T (else: not touched)
        ok(comm.nbc_rdbl == (MPI.COMM_WORLD.Get_size() == 2), f"nbc_rdbl={comm.nbc_rdbl} with {size} ranks")
    try:
        for dt in ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int32", "int64"):
            for n in (0, 1, 7, 70001):
                rng = np.random.default_rng(1000 * rank + n)
                if dt.startswith("int") or dt.startswith("uint"):
                    x = rng.integers(-100, 100, n).astype(_HOST[dt])
                elif dt == "bfloat16":
                    x = f32_to_bf16((rng.standard_normal(n) * 100).astype(np.float32))
                else:
                    x = (rng.standard_normal(n) * 100).astype(_HOST[dt])
                ref = np.empty_like(x)
                mdt = getattr(MPI, _MPI_TYPE[dt])
                comm.comm.Allreduce([x, mdt], [ref, mdt], op=_sum_op(MPI, dt))
                every = comm.allgather(ref.view(np.uint8), name="sum.ref").wait()
                ok(all(np.array_equal(e, every[0]) for e in every), f"{dt} n={n}: MPI_Allreduce differs across ranks")
                exact = size == 2 or not dt.startswith(("float", "bfloat"))   # else the order of the sum differs

                def same(got, what):
                    got = np.ascontiguousarray(got).view(ref.dtype)
                    every = comm.allgather(got.view(np.uint8), name="sum.got").wait()
                    ok(all(np.array_equal(e, every[0]) for e in every), f"{what}: differs across ranks")
                    if exact:
                        ok(np.array_equal(got.view(np.uint8), ref.view(np.uint8)), f"{what}: differs from MPI_Allreduce")
                    else:
                        wide = (lambda a: (a.astype(np.uint32) << 16).view(np.float32)) if dt == "bfloat16" else \
                            (lambda a: a.astype(np.float64))
                        ok(np.allclose(wide(got), wide(ref), rtol=0, atol=0.02 * np.abs(wide(ref)).max(initial=0.0)), f"{what}: wrong sum")
                for i, c in enumerate(comms):
                    arr = x.view(ml_dtypes.bfloat16) if dt == "bfloat16" and ml_dtypes else x
                    if dt == "bfloat16" and not ml_dtypes:
                        continue
                    what = f"sum path {i} ({c.allreduce_algorithm}, {c.nbc_rdbl=}, {c.threaded=}, {c.progress}) {dt} n={n}"
                    same(c.allreduce(arr, name="sum.plain").wait(), what)
                    ok(np.array_equal(arr.view(np.uint8), x.view(np.uint8)), f"{what}: input modified")
                    same(c.allreduce(arr.copy(), name="sum.donated", donate=True).wait(), what + " donated")
                    if n:
                        k = n // 3
                        parts = c.allreduce_group([arr[:k], arr[k:]], name="sum.group").wait()
                        same(np.concatenate([np.asarray(q) for q in parts]), what + " group")
    finally:
        for c in comms[1:]:
            c.close()


def check_errors(comm):
    import torch
    from gradcomp.comm.base import ConfigMismatchError, check_consistent
    for bad, err in ((np.zeros((2, 2), np.float32), ValueError), (np.zeros(3, bool), TypeError),
                     (torch.zeros(3, dtype=torch.complex64), TypeError)):
        try:
            comm.allreduce(bad, name="bad")
            ok(False, f"allreduce accepted {type(bad).__name__} {bad.dtype} {tuple(bad.shape)}")
        except err:
            CHECKS[0] += 1
    if comm.size > 1:                               # the same error on every rank, and no hang
        try:
            comm.allgather(np.zeros(3, np.float32 if comm.rank == 0 else np.float64), name="mixed").wait()
            ok(False, "allgather accepted different dtypes on different ranks")
        except Exception as e:  # noqa: BLE001 - any engine's error type, as long as it names the problem
            ok("type" in str(e).lower(), f"mixed-dtype allgather error does not say why: {e!r}")
        comm.barrier()
    try:
        check_consistent(comm, {"compressor": "topk", "lr": 0.1 * (comm.rank + 1)})
        ok(comm.size == 1, "check_consistent accepted different configurations")
    except ConfigMismatchError as e:
        ok("lr" in str(e) and "rank 1" in str(e), f"mismatch message does not name the key: {e}")
    comm.barrier()


def check_tf(comm):
    """TF eager tensors in and out (float32, bfloat16, int32)."""
    import tensorflow as tf
    size, rank = comm.size, comm.rank
    for dt in ("float32", "bfloat16", "int32"):
        x = tf.cast(tf.constant(data(rank, 9, dt)), getattr(tf, dt))
        res = comm.allreduce(x, name=f"tf.{dt}").wait()
        ok(isinstance(res, tf.Tensor) and res.dtype == x.dtype and tuple(res.shape) == (9,), f"tf allreduce {dt}")
        expect = tf.cast(tf.constant(sum(data(r, 9, dt) for r in range(size))), x.dtype)
        ok(bool(tf.reduce_all(res == expect)), f"tf allreduce {dt}: wrong sum")
        parts = comm.allgather(x[: rank + 1], name=f"tf.ag.{dt}").wait()
        ok([int(p.shape[0]) for p in parts] == list(range(1, size + 1)), f"tf allgather {dt}: sizes")
        ok(all(isinstance(p, tf.Tensor) and p.dtype == x.dtype for p in parts), f"tf allgather {dt}: types")
        got = comm.broadcast(x, root=size - 1, name=f"tf.bc.{dt}").wait()
        want = tf.cast(tf.constant(data(size - 1, 9, dt)), x.dtype)
        ok(bool(tf.reduce_all(got == want)), f"tf broadcast {dt}: wrong")


def check_gradient_sync(comm):
    import torch
    import gradcomp
    size, rank = comm.size, comm.rank
    shapes = {"w": (6, 5), "b": (7,), "e": (300,)}

    def grads(r, step, kind):
        g = {k: (data(r + 3 * step, int(np.prod(s)), "float32").astype(np.float32) / 50.0).reshape(s)
             for k, s in shapes.items()}
        return g if kind == "numpy" else {k: torch.from_numpy(v) for k, v in g.items()}

    # none: exactly the average (one bucket of three tensors, then three one-tensor buckets); the
    # caller's gradients stay as they were although the transport sums and scales in place
    for kind, split in (("numpy", False), ("torch", False), ("torch", True)):
        sync = gradcomp.GradientSync("none", comm=comm, seed=0)
        mine = grads(rank, 0, kind)
        kept = {k: as_np(v).copy() for k, v in mine.items()}
        if split:
            for k, v in mine.items():
                sync.start({k: v})
            out = sync.finish()
        else:
            out = sync.step(mine)
        ok(all(np.array_equal(as_np(mine[k]), kept[k]) for k in shapes), f"GradientSync none {kind}: input changed")
        for k in shapes:
            stack = [grads(r, 0, "numpy")[k] for r in range(size)]
            expect = stack[0].copy()
            for s in stack[1:]:
                expect = expect + s
            expect = expect * np.float32(1.0 / size)
            ok(np.array_equal(as_np(out[k]).reshape(-1), expect.astype(np.float64).reshape(-1)),
               f"GradientSync none {kind}: {k} is not the exact average")
    # topk with error feedback over 3 steps == the in-process LocalWorld reference
    def run(c, r, kind):
        s = gradcomp.GradientSync("topk:ratio=0.1", comm=c, seed=3)
        outs = [s.step(grads(r, step, kind)) for step in range(3)]
        return outs, s.stats()
    for kind in ("numpy", "torch"):
        mine, stats = run(comm, rank, kind)
        ref = gradcomp.LocalWorld(size).run(lambda c: run(c, c.rank, kind))[rank]
        for step in range(3):
            for k in shapes:
                ok(np.allclose(as_np(mine[step][k]), as_np(ref[0][step][k]), rtol=1e-6, atol=1e-7),
                   f"GradientSync topk {kind}: step {step} {k} differs from the LocalWorld reference")
        ok(stats["bytes_sent"] == ref[1]["bytes_sent"] and stats["bytes_sent"] < stats["bytes_dense"],
           f"GradientSync topk {kind}: stats {stats} vs reference {ref[1]}")


def setup(backend):
    from gradcomp.comm import make_communicator
    if backend == "torch":
        import torch.distributed as dist
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=INNER_TIMEOUT))
        comm = make_communicator("auto")
        assert comm.engine == "torch", f"auto picked {comm.engine} under torchrun"
        return comm
    if backend == "horovod":
        import horovod.torch as hvd
        hvd.init()
        comm = make_communicator("auto")
        assert comm.engine == "horovod", f"auto picked {comm.engine} after hvd.init()"
        return comm
    comm = make_communicator(backend, timeout=INNER_TIMEOUT)
    assert comm.engine == "mpi", f"{backend} picked {comm.engine} under mpirun"
    return comm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("backend", choices=("mpi", "auto", "torch", "horovod"))
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--tf", action="store_true", help="also check TF eager tensors")
    ap.add_argument("--only", default="", help="run only check_ONLY (e.g. mpi_sum_paths)")
    args = ap.parse_args()
    comm = None
    try:
        comm = setup(args.backend)
        ok(0 <= comm.rank < comm.size and 0 <= comm.local_rank < comm.size, "rank/local_rank out of range")
        ranks = comm.allgather_object({"rank": comm.rank})
        ok([r["rank"] for r in ranks] == list(range(comm.size)), f"ranks {ranks}")
        checks = (check_allreduce, check_donation, check_allgather, check_broadcast, check_sendrecv, check_async,
                  check_mpi_options, check_mpi_sum_paths, check_errors, check_gradient_sync) \
            + ((check_tf,) if args.tf else ())
        if args.only:
            checks = tuple(c for c in checks if c.__name__ == f"check_{args.only}")
        for check in checks:
            t0 = time.monotonic()
            check(comm)
            if args.verbose:
                print(f"rank {comm.rank}: {check.__name__} {time.monotonic() - t0:.2f}s", flush=True)
        comm.barrier()
        print(f"COMM_CHECK OK rank={comm.rank} size={comm.size} engine={comm.engine} checks={CHECKS[0]}", flush=True)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        if args.backend in ("mpi", "auto"):
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(1)
        os._exit(1)
    if hasattr(comm, "close"):
        comm.close()
    if args.backend == "torch":                     # gloo's threads must stop before the interpreter exits
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
