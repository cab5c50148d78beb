"""Horovod's API surface, written once for every framework: argument translation and collectives.

Two parts, both framework-neutral (numpy at the boundary; the adapters gradcomp_torch / gradcomp_tf
convert their tensors):

1. `horovod_options(...)` turns the keyword arguments of Horovod's DistributedOptimizer /
   DistributedGradientTape (`compression=`, `op=`, `gradient_predivide_factor=`, `num_groups=`,
   `groups=`, `process_set=`, `sparse_as_dense=`) into gradcomp's (compressor, memory, bucket hint,
   scale). What has a meaning is accepted; everything else raises ValueError naming what to do.
   - `compression=` takes Horovod's own `hvd.Compression.none/fp16` (the classes, or instances),
     gradcomp's `Compression.<name>` objects, or any gradcomp compressor spec string ("topk:ratio=0.01").
     A Compression *object* means Horovod's semantics: the compressor with no error feedback
     (memory "none"); a spec string means gradcomp's (memory "auto": residuals for lossy ones).
     `compression=Compression.none` (Horovod's default) leaves the choice to GRADCOMP_COMPRESSOR.
   - `op=`: Average (0, default) or Sum (1) -- Horovod's constants are these ints, so `hvd.Average`
     works too; Adasum (2) raises (gradcomp has no Adasum reduction).
2. The collectives Horovod users call directly: `allreduce` (Average / Sum / Min / Max / Product,
   prescale and postscale), `allgather` (concatenation along the first dimension, which may differ
   between ranks), `broadcast`, `alltoall`, `join` and the launcher facts (`local_size`, `cross_rank`,
   ...). They run over whichever gradcomp Communicator is active; each has an `*_async` form that
   issues the collective and returns a Handle (`poll(h)`, `synchronize(h)`), the blocking form waits.
"""
from __future__ import annotations

import os
import time

import numpy as np

Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
OP_NAMES = {Average: "Average", Sum: "Sum", Adasum: "Adasum", Min: "Min", Max: "Max", Product: "Product"}

# Horovod's own Compression classes, by class name (horovod.torch / horovod.tensorflow compression.py)
_HOROVOD_COMPRESSION = {"NoneCompressor": "none", "FP16Compressor": "fp16"}


def compression_spec(compression, where: str = "compression"):
    """(compressor spec or instance, memory) for a `compression=` value; ValueError if it has no meaning."""
    from gradcomp.compressors.base import Compressor
    from gradcomp.horovod_compat import HorovodCompressorBase
    if compression is None:
        return None, None
    if isinstance(compression, HorovodCompressorBase):      # gradcomp_torch/tf.Compression.fp16 etc.
        return compression.compressor, "none"
    if isinstance(compression, Compressor):
        return compression, None
    if isinstance(compression, str):
        return compression, None
    cls = compression if isinstance(compression, type) else type(compression)
    mod = getattr(cls, "__module__", "") or ""
    if mod.startswith("horovod") and cls.__name__ in _HOROVOD_COMPRESSION:
        return _HOROVOD_COMPRESSION[cls.__name__], "none"
    raise ValueError(
        f"{where}={compression!r} is not a compression gradcomp understands. Pass Horovod's "
        "hvd.Compression.none / hvd.Compression.fp16, gradcomp's Compression.<name> (e.g. Compression.fp16), "
        "or a gradcomp compressor spec string such as 'fp16', 'bf16', 'topk:ratio=0.01' "
        "(`python -m gradcomp compressors` lists them)")


def compressor_arg(compressor, compression, memory):
    """Merge `compressor=` and `compression=` (Horovod's name); returns (compressor, memory).

    Either may be a spec string, a gradcomp Compressor, a Compression object or Horovod's class."""
    if compressor is not None and compression is not None:
        raise ValueError("pass compressor= or compression= (Horovod's name for it), not both")
    given = compression if compression is not None else compressor
    where = "compression" if compression is not None else "compressor"
    if given is None:
        return None, memory
    spec, mem = compression_spec(given, where)
    if compression is not None and mem is not None and _name(spec) == "none":
        # Horovod's default `compression=hvd.Compression.none` says "no compression asked for": the
        # environment decides (GRADCOMP_COMPRESSOR, default none), so a Horovod script runs every
        # gradcomp mode with only its import changed
        return None, memory
    if mem is not None and memory is None:
        memory = mem
    return spec, memory


def _name(spec) -> str:
    return spec if isinstance(spec, str) else getattr(spec, "name", "")


def check_op(op, gradient_predivide_factor=1.0, where="DistributedOptimizer") -> int:
    """Validate `op=` (Average or Sum) and `gradient_predivide_factor=`; returns the op."""
    if op is None:
        op = Average
    if isinstance(op, bool) or not isinstance(op, (int, np.integer)) or int(op) not in OP_NAMES:
        raise ValueError(f"{where}: op={op!r} is not a reduction; use gradcomp's Average or Sum "
                         "(hvd.Average / hvd.Sum work too)")
    op = int(op)
    if op == Adasum:
        raise ValueError(f"{where}: op=Adasum is not supported: gradcomp has no Adasum reduction (it "
                         "combines gradients pairwise by their projections, which no gradcomp transport "
                         "implements). Use op=Average (the default) with a gradcomp compressor instead")
    if op not in (Average, Sum):
        raise ValueError(f"{where}: op={OP_NAMES[op]} is not a gradient reduction; use Average or Sum")
    try:
        f = float(gradient_predivide_factor)
    except (TypeError, ValueError):
        f = float("nan")
    if not f > 0 or f == float("inf"):
        raise ValueError(f"{where}: gradient_predivide_factor={gradient_predivide_factor!r} must be a "
                         "positive number (1.0 = no split)")
    if f != 1.0 and op != Average:
        raise ValueError(f"{where}: gradient_predivide_factor is only meaningful with op=Average (as in Horovod)")
    return op


def check_process_set(process_set, where="DistributedOptimizer"):
    """None or Horovod's global process set (id 0) are accepted; a subset of ranks is refused."""
    if process_set is None:
        return
    pid = getattr(process_set, "process_set_id", None)
    if pid == 0 or (pid is None and getattr(process_set, "ranks", None) in (None, [])):
        return
    raise ValueError(f"{where}: process_set={process_set!r} is not supported: gradcomp averages over all "
                     "ranks of its transport. Leave process_set unset (the global set), or start a "
                     "separate job for the subset of ranks")


def bucket_mb_for_groups(num_groups, groups, total_bytes: int, where="DistributedOptimizer"):
    """Horovod's `num_groups=` / `groups=<int>` as a bucket-size hint (MiB), or None (keep bucket_mb).

    Horovod fuses the gradients into `num_groups` groups; gradcomp fuses into buckets of bucket_mb
    MiB, so n groups become buckets of total/n. Explicit lists of parameters (groups=[[...], ...])
    are refused: gradcomp's buckets follow registration order."""
    if groups is not None and not (isinstance(groups, (int, np.integer)) and not isinstance(groups, bool)):
        raise ValueError(f"{where}: groups= as lists of parameters is not supported (gradcomp fuses gradients "
                         "into buckets of bucket_mb MiB in registration order). Pass num_groups=<int> or "
                         "bucket_mb=<MiB> instead")
    n = int(groups) if groups is not None else num_groups
    if n is None or n == 0:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{where}: num_groups={n!r} must be an int >= 0 (0: bucket_mb decides)")
    return max(total_bytes / int(n), 1.0) / 2 ** 20


# ------------------------------------------------------------------------------- collectives
def _c(x) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    x = np.asarray(x)
    return x if x.flags.c_contiguous else x.copy(order="C")


def _scalar(h):
    return np.asarray(h.wait())


def allreduce_async(comm, x: np.ndarray, op=None, average=None, prescale_factor=1.0, postscale_factor=1.0,
                    name="allreduce"):
    """Start Horovod's allreduce on a host array; returns a Handle (`poll` / `synchronize`) whose
    wait() gives postscale * reduce(prescale * x) over ranks.

    op: Average (default), Sum, Min, Max, Product; `average=True/False` is Horovod's older spelling
    of Average/Sum. Integer arrays are averaged with integer division, as Horovod does. The
    collective is issued now (one transport call: an allreduce, or an allgather for Min/Max/Product);
    ranks must issue their async collectives in the same order (gradcomp's transports match calls
    by order, Horovod by name)."""
    from gradcomp.comm.base import DoneHandle, ThenHandle
    if average is not None:
        if op is not None:
            raise ValueError("allreduce: pass op= or the deprecated average=, not both")
        op = Average if average else Sum
    op = Average if op is None else op
    if isinstance(op, bool) or not isinstance(op, (int, np.integer)) or int(op) not in OP_NAMES:
        raise ValueError(f"allreduce: op={op!r} is not one of Average, Sum, Min, Max, Product")
    op = int(op)
    if op == Adasum:
        raise ValueError("allreduce: op=Adasum is not supported by gradcomp; use Average or Sum")
    x = _c(x)
    shape, dtype = x.shape, x.dtype
    wide = np.float64 if dtype == np.float64 else (np.float32 if np.issubdtype(dtype, np.floating) else dtype)
    v = x.reshape(-1).astype(wide, copy=True)
    if prescale_factor != 1.0:
        v = v * prescale_factor

    def finish(out):
        if op == Average:
            out = out / comm.size if np.issubdtype(out.dtype, np.floating) else out // comm.size
        if postscale_factor != 1.0:
            out = out * postscale_factor
        return np.asarray(out).astype(dtype, copy=False).reshape(shape)

    if comm.size == 1:
        return DoneHandle(finish(v))
    if op in (Average, Sum):
        if v.dtype == np.bool_:
            v = v.astype(np.int32)
        return ThenHandle(comm.allreduce(v, name=name), lambda r: finish(np.asarray(r).reshape(-1)))

    def combine(parts):
        parts = np.stack([np.asarray(p).reshape(-1) for p in parts])
        return finish({Min: parts.min(0), Max: parts.max(0), Product: parts.prod(0)}[op])
    return ThenHandle(comm.allgather(v, name=name), combine)


def allreduce(comm, x: np.ndarray, op=None, average=None, prescale_factor=1.0, postscale_factor=1.0,
              name="allreduce") -> np.ndarray:
    """Horovod's allreduce on a host array, blocking: allreduce_async(...).wait()."""
    return allreduce_async(comm, x, op, average, prescale_factor, postscale_factor, name).wait()


def allgather_async(comm, x: np.ndarray, name="allgather"):
    """Start an allgather: every rank's array concatenated along the first dimension (which may
    differ between ranks). The shapes are exchanged first (blocking, small); the data collective is
    issued without waiting. Returns a Handle."""
    from gradcomp.comm.base import DoneHandle, ThenHandle
    x = _c(x)
    if x.ndim == 0:
        x = x.reshape(1)
    if comm.size == 1:
        return DoneHandle(x.copy())
    metas = comm.allgather_object({"shape": list(x.shape), "dtype": str(x.dtype)}, name=f"{name}.meta")
    if any(m["shape"][1:] != list(x.shape[1:]) or m["dtype"] != str(x.dtype) for m in metas):
        raise ValueError(f"allgather({name!r}): ranks passed different trailing shapes or dtypes "
                         f"{[(m['shape'], m['dtype']) for m in metas]}; only the first dimension may differ")
    rows = [m["shape"][0] for m in metas]
    per_row = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
    pad = np.zeros(max(rows) * per_row, dtype=x.dtype)
    pad[:x.size] = x.reshape(-1)
    wire = pad.view(np.uint8) if x.dtype == np.bool_ else pad

    def finish(parts):
        out = [np.asarray(p).reshape(-1)[:r * per_row].view(x.dtype) if x.dtype == np.bool_
               else np.asarray(p).reshape(-1)[:r * per_row] for p, r in zip(parts, rows)]
        return np.concatenate(out).reshape((sum(rows),) + x.shape[1:]).astype(x.dtype, copy=False)
    return ThenHandle(comm.allgather(wire, name=name), finish)


def allgather(comm, x: np.ndarray, name="allgather") -> np.ndarray:
    """Concatenate every rank's array along the first dimension (blocking)."""
    return allgather_async(comm, x, name).wait()


def broadcast_async(comm, x: np.ndarray, root_rank=0, name="broadcast"):
    """Start a broadcast of root_rank's array; a Handle whose wait() gives a new array (same shape
    and dtype as `x` on every rank)."""
    from gradcomp.comm.base import DoneHandle, ThenHandle
    if not 0 <= int(root_rank) < comm.size:
        raise ValueError(f"broadcast: root_rank={root_rank} is not a rank of this {comm.size}-rank job")
    x = _c(x)
    if comm.size == 1:
        return DoneHandle(x.copy())
    v = x.reshape(-1)
    v = v.astype(np.uint8) if v.dtype == np.bool_ else v
    return ThenHandle(comm.broadcast(v.copy(), root=int(root_rank), name=name),
                      lambda out: np.asarray(out).reshape(-1).astype(x.dtype, copy=False).reshape(x.shape))


def broadcast(comm, x: np.ndarray, root_rank=0, name="broadcast") -> np.ndarray:
    """root_rank's array on every rank (blocking)."""
    return broadcast_async(comm, x, root_rank, name).wait()


def alltoall_async(comm, x: np.ndarray, splits=None, name="alltoall"):
    """Start Horovod's alltoall: rank r sends rows [sum(splits[:j]), sum(splits[:j+1])) of `x` (first
    dimension) to rank j and receives, in rank order, the rows every rank sends it. `splits`: one
    non-negative int per rank summing to x.shape[0]; None splits the first dimension equally (it must
    divide). A Handle whose wait() gives (received array, received_splits as int32).

    Ours, over the transports' allgather: the splits and shapes are exchanged first (blocking,
    small), then every rank's padded array goes to every rank and each keeps its slices -- correct
    on every transport, but each rank receives all P arrays, not 1/P of them (for the small
    tensors scripts pass; no transport here has a native alltoall)."""
    from gradcomp.comm.base import DoneHandle, ThenHandle
    x = _c(x)
    if x.ndim == 0:
        raise ValueError(f"alltoall({name!r}): needs a tensor with at least one dimension, got a scalar")
    P, n = comm.size, int(x.shape[0])
    if splits is None:
        if n % P:
            raise ValueError(f"alltoall({name!r}): first dimension {n} does not divide evenly over {P} ranks; "
                             "pass splits= (one count per rank)")
        sp = np.full(P, n // P, np.int64)
    else:
        sp = np.asarray(splits).reshape(-1)
        if sp.size != P or not np.issubdtype(sp.dtype, np.integer) or (sp < 0).any() or int(sp.sum()) != n:
            raise ValueError(f"alltoall({name!r}): splits={sp.tolist()} must be {P} non-negative ints (one per "
                             f"rank) summing to the first dimension {n}")
        sp = sp.astype(np.int64)
    if P == 1:
        return DoneHandle((x.copy(), sp.astype(np.int32)))
    metas = comm.allgather_object({"shape": list(x.shape), "dtype": str(x.dtype), "splits": sp.tolist()},
                                  name=f"{name}.meta")
    if any(m["shape"][1:] != list(x.shape[1:]) or m["dtype"] != str(x.dtype) for m in metas):
        raise ValueError(f"alltoall({name!r}): ranks passed different trailing shapes or dtypes "
                         f"{[(m['shape'], m['dtype']) for m in metas]}; only the first dimension may differ")
    S = np.array([m["splits"] for m in metas], np.int64)          # S[r, j]: rows r sends to j
    me = comm.rank
    per_row = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
    pad = np.zeros(int(S.sum(1).max()) * per_row, dtype=x.dtype)
    pad[:x.size] = x.reshape(-1)
    wire = pad.view(np.uint8) if x.dtype == np.bool_ else pad

    def finish(parts):
        out = []
        for r, p in enumerate(parts):
            p = np.asarray(p).reshape(-1)
            p = p.view(x.dtype) if x.dtype == np.bool_ else p
            a = int(S[r, :me].sum()) * per_row
            out.append(p[a:a + int(S[r, me]) * per_row])
        got = np.concatenate(out).reshape((int(S[:, me].sum()),) + x.shape[1:]).astype(x.dtype, copy=False)
        return got, S[:, me].astype(np.int32)
    return ThenHandle(comm.allgather(wire, name=name), finish)


def alltoall(comm, x: np.ndarray, splits=None, name="alltoall"):
    """(received array, received_splits), blocking; see alltoall_async."""
    return alltoall_async(comm, x, splits, name).wait()


def poll(handle) -> bool:
    """Whether an async collective has completed (synchronize then returns without blocking)."""
    _check_handle(handle, "poll")
    return bool(handle.done())


def synchronize(handle):
    """Wait for an async collective and return its result."""
    _check_handle(handle, "synchronize")
    return handle.wait()


def _check_handle(handle, where):
    if not (hasattr(handle, "wait") and hasattr(handle, "done")):
        raise TypeError(f"{where}: expected a handle returned by an *_async collective, got "
                        f"{type(handle).__name__}")


def join(comm) -> int:
    """Block until every rank has called join(); returns the rank that arrived last (wall-clock
    arrival times, compared across ranks). Unlike Horovod's join, a rank waiting here does not
    take part in other ranks' allreduces, so every rank must run the same number of steps."""
    if comm.size == 1:
        return 0
    t = np.array([time.time()], np.float64)
    times = [float(np.asarray(p).reshape(-1)[0]) for p in comm.allgather(t, name="join").wait()]
    return int(np.argmax(times))


_LOCAL_SIZE = ("OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE", "HOROVOD_LOCAL_SIZE", "MPI_LOCALNRANKS",
               "MV2_COMM_WORLD_LOCAL_SIZE")
_LOCAL_RANK = ("OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK", "HOROVOD_LOCAL_RANK", "MPI_LOCALRANKID",
               "MV2_COMM_WORLD_LOCAL_RANK")


def _env_int(names, environ=None):
    env = os.environ if environ is None else environ
    for k in names:
        raw = str(env.get(k, "")).strip()
        if raw.isdigit():
            return int(raw)
    return None


def local_rank(comm, environ=None) -> int:
    v = _env_int(_LOCAL_RANK, environ)
    return v if v is not None and comm.size > 1 else int(getattr(comm, "local_rank", 0) or 0)


def local_size(comm, environ=None) -> int:
    """Processes on this node: the launcher's variable, else the whole world (one node)."""
    v = _env_int(_LOCAL_SIZE, environ)
    return v if v is not None and comm.size > 1 else comm.size


def cross_size(comm, environ=None) -> int:
    """Nodes in the job (world size / local size, as Horovod computes it for homogeneous nodes)."""
    env = os.environ if environ is None else environ
    v = _env_int(("HOROVOD_CROSS_SIZE",), env)
    return v if v is not None and comm.size > 1 else max(1, comm.size // max(1, local_size(comm, env)))


def cross_rank(comm, environ=None) -> int:
    """This node's index (rank // local size for homogeneous nodes)."""
    env = os.environ if environ is None else environ
    v = _env_int(("HOROVOD_CROSS_RANK",), env)
    return v if v is not None and comm.size > 1 else comm.rank // max(1, local_size(comm, env))


def mpi_built() -> bool:
    """Whether an MPI transport is usable here (mpi4py imports)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True
