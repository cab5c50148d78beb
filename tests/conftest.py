"""Shared fixtures and helpers of the core test suite.

- Hypothesis profiles: "ci" (default: few examples, no deadline, reproducible) and "thorough"
  (HYPOTHESIS_PROFILE=thorough) for a longer local hunt.
- `load(spec)` builds a registered compressor or memory; one whose module is not written yet is a
  pytest skip ("module not written yet"), never an error, so the generic tests run over
  `gradcomp.available()` while other compressors are still being written.
- `TEST_SPECS` gives each compressor a spec that suits small test tensors (a larger ratio so k > 1).
- Small array helpers: gradients of any float dtype on numpy / torch / TF, `to_np`, a `Ctx`
  factory, a `world()` runner with a short timeout, and a `RecordingComm` that logs every
  collective's byte count.
"""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import gradcomp
from gradcomp import registry
from gradcomp.backend import backend_by_name, get_backend
from gradcomp.comm.base import Communicator
from gradcomp.compressors.base import Ctx

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=200, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

COMPRESSORS = gradcomp.available()
MEMORIES = gradcomp.available("memory")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# Specs that suit small test tensors; compressors not listed use their defaults.
TEST_SPECS = {
    "topk": "topk:ratio=0.1",
    "randomk": "randomk:ratio=0.25",
    "scalecom": "scalecom:ratio=0.1",
    "gtopk": "gtopk:ratio=0.1",
    "aggtopk": "aggtopk:ratio=0.1,chunk=8",
}
# Extra variants worth testing beside each compressor's TEST_SPECS entry.
EXTRA_SPECS = ["topk:ratio=0.1,mode=sampled", "aggtopk:ratio=0.1,chunk=8,metric=sketch",
               "aggtopk:ratio=0.1,chunk=8,metric=prev", "scalecom:ratio=0.1,leaders=3",
               "topk:ratio=0.2,block=3"]


def spec_for(name: str) -> str:
    return TEST_SPECS.get(name, name)


def cross_backend(spec: str) -> str:
    """`spec` with rng=counter where the compressor has private randomness: the counter stream is
    bit-identical on every backend; the default (rng=native) is the framework's own generator."""
    import gradcomp
    name = spec.split(":")[0]
    if "rng" in getattr(type(gradcomp.create(name)), "params", {}) and "rng=" not in spec:
        spec += ("," if ":" in spec else ":") + "rng=counter"
    return spec


def all_specs() -> list[str]:
    return [spec_for(n) for n in COMPRESSORS] + EXTRA_SPECS


def _module_of(kind: str, name: str) -> str:
    return registry.table(kind)[name].split(":")[0]


def require(kind: str, name: str):
    """Skip the calling test if the module registered for `name` does not exist yet."""
    mod = _module_of(kind, name)
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name == mod:
            pytest.skip(f"{kind} {name!r}: module {mod} not written yet")
        raise


def load(spec, kind: str = "compressor", **overrides):
    """registry.create with a skip for not-yet-written modules (any other error propagates)."""
    if isinstance(spec, str):
        require(kind, registry.parse_spec(spec)[0])
    return gradcomp.create(spec, kind, **overrides)


def spec_name(spec: str) -> str:
    return registry.parse_spec(spec)[0]


# ------------------------------------------------------------------------------ arrays
def np_dtype(name: str):
    from gradcomp.backend.numpy_backend import np_dtype as f
    return f(name)


def to_np(x) -> np.ndarray:
    """Any backend array -> numpy (bf16 widened to float32, other dtypes kept)."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        a = np.asarray(x)
        return a.astype(np.float32) if a.dtype == np_dtype("bfloat16") else a
    return np.asarray(get_backend(x).to_numpy(x))


def f64(x) -> np.ndarray:
    return to_np(x).astype(np.float64)


def make_array(a: np.ndarray, backend: str, dtype: str):
    """numpy float64 data -> an array of `dtype` on `backend` ("numpy", "torch", "tensorflow")."""
    if backend == "numpy":
        return np.asarray(a).astype(np_dtype(dtype))
    if backend == "torch":
        import torch
        from gradcomp.backend.torch_backend import torch_dtype
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(torch_dtype(dtype))
    if backend == "tensorflow":
        import tensorflow as tf
        return tf.cast(tf.constant(np.asarray(a, dtype=np.float64)), dtype)
    raise ValueError(backend)


def backend_available(name: str) -> bool:
    if name == "numpy":
        return True
    try:
        importlib.import_module({"torch": "torch", "tensorflow": "tensorflow"}[name])
        return True
    except ImportError:
        return False


def need_backend(name: str):
    if name == "torch":
        pytest.importorskip("torch")
    elif name == "tensorflow":
        pytest.importorskip("tensorflow")
    return backend_by_name(name)


def realistic_gradient(n: int, seed: int = 0) -> np.ndarray:
    """A heavy-tailed gradient like those of real networks: per-'layer' scales spanning two
    decades, Student-t(3) entries, a few dense outlier rows, many near-zero entries."""
    rng = np.random.default_rng(seed)
    g = np.empty(n, np.float32)
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(40, n - 1), replace=False))
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n]):
        g[lo:hi] = rng.standard_t(3, hi - lo) * 10.0 ** rng.uniform(-4, -2)
    g[rng.random(n) < 0.3] *= 1e-3
    return g


def make_ctx(backend, name: str, n: int, *, dtype="float32", step=0, seed=0, rank=0, size=1,
             shape=None) -> Ctx:
    return Ctx(backend, name, tuple(shape) if shape is not None else (n,), dtype, n, step, seed, rank, size)


def compress_once(comp, x, ctx):
    """One rank's compression with a fresh compressor state -> (final payload list, info).
    Multi-round compressors get their own payload back as each round's "sum" (a 1-rank world)."""
    state = comp.init_state(x, ctx)
    payload, info = comp.compress(x, state, ctx)
    for _ in range(1, comp.rounds):
        payload, info = comp.next_round(list(payload), info, state, ctx)
    return list(payload), info


# ------------------------------------------------------------------------------ worlds
def world(size: int, fn, timeout: float = 30.0):
    """Run fn(comm) on `size` LocalWorld ranks; a stuck collective fails after `timeout` seconds on an
    idle machine, scaled by the machine's load (a loaded CI machine is not a failure)."""
    from gradcomp.comm.launch import scaled_timeout
    return gradcomp.LocalWorld(size, timeout=scaled_timeout(timeout)).run(fn)


def catching(fn):
    """Wrap fn(comm) so each rank returns its exception instead of raising (to see every rank)."""
    def body(comm):
        try:
            return fn(comm)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            return e
    return body


class RecordingComm(Communicator):
    """Delegates to another Communicator and records (op, name, nbytes) of every collective issued."""

    def __init__(self, inner: Communicator, native_sendrecv: bool | None = None):
        self.inner, self.rank, self.size, self.local_rank = inner, inner.rank, inner.size, inner.local_rank
        self.engine = "recording"
        # native_sendrecv=False: sendrecv runs as the base class's allgather (a transport without p2p)
        self.native_sendrecv = inner.native_sendrecv if native_sendrecv is None else native_sendrecv
        self.log: list[tuple[str, str, int]] = []
        self.received: list[tuple[str, str, list]] = []   # (op, name, bytes of each rank's part)

    def _rec(self, op, x, name):
        self.log.append((op, name, get_backend(x).nbytes(x)))

    def _got(self, op, name, h):
        from gradcomp.comm.base import ThenHandle

        def note(res):
            parts = res if isinstance(res, list) else [res]
            self.received.append((op, name, [0 if a is None else get_backend(a).nbytes(a) for a in parts]))
            return res
        return ThenHandle(h, note)

    def allreduce(self, x, *, name=""):
        self._rec("allreduce", x, name)
        return self._got("allreduce", name, self.inner.allreduce(x, name=name))

    def allgather(self, x, *, name=""):
        self._rec("allgather", x, name)
        return self._got("allgather", name, self.inner.allgather(x, name=name))

    def broadcast(self, x, *, root=0, name=""):
        self._rec("broadcast", x, name)
        return self.inner.broadcast(x, root=root, name=name)

    def sendrecv(self, x, *, dest=None, source=None, count=None, name=""):
        if not self.native_sendrecv:            # the base class's fallback, through our allgather
            return Communicator.sendrecv(self, x, dest=dest, source=source, count=count, name=name)
        if dest is not None:
            self._rec("send", x, name)
        return self._got("recv", name, self.inner.sendrecv(x, dest=dest, source=source, count=count, name=name))

    def step_traffic(self) -> dict:
        """What the step collectives delivered, counted here at the transport: bytes received from
        the other ranks (allgather: their parts; allreduce: the sum) and per-rank ring wire bytes."""
        from gradcomp import traffic
        p, r = self.size, self.rank
        out = {"recv": 0, "wire_sent": 0.0, "wire_recv": 0.0}
        for op, name, parts in self.received:
            if not name.startswith("step"):
                continue
            if op == "recv":                    # point-to-point: what arrived (sends: below)
                sent, recv = 0, sum(parts)
                out["recv"] += recv
            elif op == "allgather":
                sent, recv = traffic.ring_allgather(parts, r)
                out["recv"] += recv
            else:
                sent = recv = traffic.ring_allreduce(parts[0], p)
                out["recv"] += parts[0] if p > 1 else 0
            out["wire_sent"] += sent
            out["wire_recv"] += recv
        out["wire_sent"] += sum(nb for op, name, nb in self.log if op == "send" and name.startswith("step"))
        return out

    def payload_bytes(self) -> int:
        """Bytes of the step collectives (payloads), excluding config checks and NaN flags; of a
        point-to-point exchange (gtopk's tree) only the first message a rank sends in each step, its
        own payload (the later ones forward merged sets, counted in step_traffic's wire bytes)."""
        first, total = set(), 0
        for op, name, nb in self.log:
            if not name.startswith("step"):
                continue
            if op == "send":
                tag = name.split(".")[0]
                if tag in first:
                    continue
                first.add(tag)
            total += nb
        return total


def record_locals(sync):
    """Make `sync` remember each memory.update call's (g, x, local, aggregated) per tensor name."""
    log: dict[str, list] = {}
    orig = sync.memory.update

    def update(g, x0, local0, aggregated, state, ctx):
        x, local = x0, local0
        own = ctx.memo.get("own_decode_idx") if local is None else None
        if own is not None:        # the decode the pipeline skipped (x at the sent indices); update zeroes x in place
            x = to_np(x).reshape(-1).copy()
            local = np.zeros_like(x)
            local[to_np(own)] = x[to_np(own)]
        if ctx.members is None:
            log.setdefault(ctx.name, []).append((g, x, local, aggregated))
        else:                      # a fused bucket (gradcomp/fusion.py): record each member's part
            off = 0
            for name, n in zip(ctx.members, ctx.segments):
                part = [None if a is None else to_np(a).reshape(-1)[off:off + n] for a in (g, x, local, aggregated)]
                log.setdefault(name, []).append(tuple(part))
                off += n
        return orig(g, x0, local0, aggregated, state, ctx)

    sync.memory.update = update
    return log


@pytest.fixture(params=["numpy", "torch", "tensorflow"])
def backend_name(request):
    need_backend(request.param)
    return request.param


# ------------------------------------------------------------------------------ shapes
SHAPES = [(), (0,), (1,), (2,), (7,), (33,), (129,), (1000,), (3, 5), (0, 3), (2, 3, 4), (17, 9)]
LAYOUTS = ("contiguous", "strided", "transposed")


def grad_array(rng: np.random.Generator, shape, layout: str, dtype: str, backend: str = "numpy",
               scale: float = 1.0):
    """A gradient of `shape`/`dtype` on `backend`; 'strided' and 'transposed' give non-contiguous
    views (numpy and torch; TF tensors have no views and get the same values contiguous)."""
    shape = tuple(shape)
    if layout == "strided" and len(shape) >= 1:
        base = rng.standard_normal(shape[:-1] + (2 * shape[-1],)) * scale
        arr = make_array(base, backend, dtype)
        if backend == "tensorflow":
            return arr[..., ::2]
        return arr[..., ::2]
    if layout == "transposed" and len(shape) >= 2:
        base = rng.standard_normal(shape[::-1]) * scale
        arr = make_array(base, backend, dtype)
        if backend == "tensorflow":
            import tensorflow as tf
            return tf.transpose(arr)
        return arr.T if backend == "numpy" else arr.permute(*reversed(range(len(shape))))
    return make_array(rng.standard_normal(shape) * scale, backend, dtype)
