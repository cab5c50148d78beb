"""Which compressors fit Horovod's stateless `Compression` interface, decided once for every framework.

Horovod calls `compress(tensor) -> (tensor, ctx)`, averages the returned tensor by allreduce, then
`decompress(tensor, ctx)`; it passes no tensor name and no step and keeps no state. A gradcomp
compressor qualifies only if it is (1) summable, (2) single-round, (3) stateless (no `init_state`),
and (4) step- and name-independent: a probe compresses the same vector under different
(seed, step, name) and the payload must not change. The rule, the compress/decompress wrapping
(`HorovodCompressorBase`, written once against the backend protocol) and the `Compression.<name>`
namespace live here; the adapters (gradcomp_torch.compression, gradcomp_tf.compression) only say
which tensors are theirs and what to suggest instead.
"""
from __future__ import annotations

import numpy as np

from gradcomp import registry
from gradcomp.backend import get_backend
from gradcomp.compressors.base import Compressor, Ctx


class HorovodIncompatibleError(ValueError):
    """The compressor cannot work through Horovod's stateless allreduce Compression interface."""


def _probe_payload(comp, seed, step, name):
    x = np.random.default_rng(1234).standard_normal(1000).astype(np.float32)
    b = get_backend(x)
    payload, _ = comp.compress(x, {}, Ctx(b, name, (1000,), "float32", 1000, step, seed, 0, 1))
    return [np.asarray(b.to_numpy(p)) for p in payload]


def why_incompatible(comp) -> str | None:
    """None if `comp` works as a Horovod Compression object, else the reason it cannot."""
    if not comp.summable:
        return "its payloads cannot be summed by allreduce (gradcomp allgathers them and aggregates)"
    if comp.rounds != 1:
        return f"it needs {comp.rounds} communication rounds per step"
    if type(comp).init_state is not Compressor.init_state:
        return "it keeps per-tensor state between steps, which Horovod's interface cannot hold"
    try:
        ref = _probe_payload(comp, 0, 0, "a")
        for seed, step, name in ((1, 0, "a"), (0, 1, "a"), (0, 0, "b")):
            other = _probe_payload(comp, seed, step, name)
            if len(other) != len(ref) or any(x.shape != y.shape or not (x == y).all() for x, y in zip(ref, other)):
                return ("it draws shared randomness per step and tensor, and Horovod passes neither the "
                        "step nor the tensor name")
    except Exception as e:  # noqa: BLE001 - a compressor that cannot run the probe does not qualify
        return f"it failed the stateless probe ({type(e).__name__}: {e})"
    dts = {str(p.dtype) for p in ref}
    if len(dts) != 1:
        return f"its payload mixes dtypes {sorted(dts)}; Horovod allreduces a single tensor"
    return None


def compatible() -> list[str]:
    """Registered compressor names that work through Horovod's interface (with default parameters)."""
    out = []
    for name in registry.available("compressor"):
        try:
            if why_incompatible(registry.create(name, "compressor")) is None:
                out.append(name)
        except (ImportError, ValueError):
            continue
    return out


class HorovodCompressorBase:
    """One gradcomp compressor behind Horovod's `compress(tensor) -> (tensor, ctx)` /
    `decompress(tensor, ctx)` interface, for any backend. Subclasses set `adapter` (for repr) and
    `instead` (what to use for compressors that do not qualify, with `{spec}`), and may override
    `_as_array` (None: not a tensor of this framework, passed through) and `_to_wire`."""

    adapter = "gradcomp"
    instead = "gradcomp's DistributedOptimizer (compressor={spec!r})"

    def __init__(self, compressor):
        comp = registry.create(compressor, "compressor")
        reason = why_incompatible(comp)
        if reason is not None:
            raise HorovodIncompatibleError(
                f"compressor {comp.spec()!r} cannot be used as a Horovod Compression object: {reason}. Use "
                f"{self.instead.format(spec=comp.spec())} instead. Usable here: {', '.join(compatible())}")
        self.compressor = comp

    def __repr__(self):
        return f"<{self.adapter}.Compression {self.compressor.spec()}>"

    def _as_array(self, tensor):
        return tensor

    def _to_wire(self, wire):
        return wire

    def compress(self, tensor):
        t = self._as_array(tensor)
        if t is None:
            return tensor, None
        b = get_backend(t)
        if not b.is_floating(t) or b.numel(t) == 0 or b.numel(t) < self.compressor.dense_below:
            return t, None
        dtype, shape, n = b.dtype(t), tuple(int(d) for d in b.shape(t)), b.numel(t)
        flat = b.cast(b.flatten(t), "float64" if dtype == "float64" else "float32")
        ctx = Ctx(b, "horovod", shape, dtype, n, 0, 0, 0, 1)
        payload, info = self.compressor.compress(flat, {}, ctx)
        sizes = [b.numel(p) for p in payload]
        wire = b.flatten(payload[0]) if len(payload) == 1 else b.cat(payload)
        return self._to_wire(wire), (ctx, info, sizes)

    def decompress(self, tensor, ctx):
        if ctx is None:
            return tensor
        gctx, info, sizes = ctx
        b = gctx.backend
        flat = b.flatten(tensor)
        payload = [flat] if len(sizes) == 1 else b.split(flat, sizes)
        return b.cast(b.reshape(self.compressor.decompress(payload, info, gctx), gctx.shape), gctx.dtype)


class CompressionNamespace:
    """`Compression.fp16`, `.bf16`, `.none`, `Compression.get("fp16:prescale=0.5")` for one adapter's
    HorovodCompressor class (which raises HorovodIncompatibleError for compressors that do not fit)."""

    def __init__(self, factory):
        self._factory, self._cache = factory, {}

    def get(self, spec):
        key = spec if isinstance(spec, str) else id(spec)
        if key not in self._cache:
            self._cache[key] = self._factory(spec)
        return self._cache[key]

    create = get

    def available(self) -> list[str]:
        return compatible()

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in registry.table("compressor"):
            raise AttributeError(f"Compression has no compressor {name!r}; usable through Horovod: "
                                 f"{', '.join(compatible())}")
        try:
            return self.get(name)
        except HorovodIncompatibleError as e:
            raise AttributeError(str(e)) from None

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(compatible()))
