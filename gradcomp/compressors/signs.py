"""Shared code of the sign and quantizing compressors: bit packing, majority vote, wire scalars.

Used by `signsgd`, `signum`, `efsignsgd`, `onebit` (sign bits), `terngrad`, `natural` (sign
bits), `qsgd` (small unsigned integers as bit planes) and the stochastic rounding of `qsgd` and
`terngrad`. Conventions:

- a sign bit is 1 where x < 0 (as in IEEE floats), so 0 decodes as +1;
- a scalar on the wire is a 1-element float32 array;
- private randomness (differs per rank, reproducible per (seed, step, name)) comes from
  `ctx.key(f"{purpose}/{ctx.rank}")`;
- stochastic rounding  R(y) = floor(y) + [u < y - floor(y)],  u ~ U[0, 1) on a 2**-24 grid, so
  E[R(y)] = y up to 2**-24 (the grid of u).

Majority vote (Bernstein et al., signSGD with Majority Vote, ICLR 2019):

    vote_i = sign( sum_r s_{r,i} ),   s_{r,i} in {-1, +1},   ties -> 0.
"""
from __future__ import annotations

from gradcomp import rng
from gradcomp.compressors.base import Compressor
from gradcomp.params import Param


def compute_dtype(ctx) -> str:
    """The dtype compressors compute and decode in: float64 for float64 gradients, else float32."""
    return "float64" if ctx.dtype == "float64" else "float32"


# --------------------------------------------------------------------------- fused buckets
def segmented(ctx) -> bool:
    """Is this a fused bucket of several tensors (per-tensor scales over ctx.segments)?"""
    return ctx.segments is not None and len(ctx.segments) > 1


def segs(ctx) -> tuple:
    """The segment lengths of ctx: the fused bucket's members, or the one tensor."""
    return ctx.segments if segmented(ctx) else (ctx.numel,)


def mean_abs_scales(b, y, ctx):
    """float32 (len(segs),): mean |y| of each segment (accumulated in y's precision: no float64 pass,
    so backends may differ in the last bit of a scale)."""
    sums = b.cast(b.segment_abs_sum(y, segs(ctx)), "float64")
    if not segmented(ctx):
        return b.cast(sums * (1.0 / ctx.numel), "float32")
    return b.cast(sums / b.lengths_array(ctx.segments, y, "float64"), "float32")


def spread(b, v, ctx):
    """Per-tensor values v (one per segment) broadcast over the entries: v as a 0-d array for a
    single tensor, else each v_i repeated over its segment."""
    return b.repeat_segments(v, ctx.segments) if segmented(ctx) else b.reshape(v, ())


# --------------------------------------------------------------------------- sign bits
def neg_bits(x):
    """1-D bool array: True where x < 0."""
    return x < 0


def pack_signs(b, x):
    """ceil(n/8) uint8 bytes: bit i is 1 where x_i < 0."""
    return b.packbits(neg_bits(x))


def unpack_signs(b, packed, n: int, dtype: str):
    """The +-1 array (dtype) encoded by pack_signs (zeros came through as +1)."""
    return b.unpack_pm1(packed, n, dtype)


def majority_vote(b, packed_list, n: int, dtype: str):
    """Elementwise sign of the sum of every rank's +-1 signs (ties give 0), as dtype."""
    neg = None
    for p in packed_list:
        bits = b.unpackbits(p, n)
        neg = bits if neg is None else neg + bits
    vote = len(packed_list) - 2 * neg          # (#non-negative) - (#negative), int32
    return b.cast(b.sign(vote), dtype)


# --------------------------------------------------------------------------- scalars
def scalar_to_wire(b, s):
    """A 0-d (any float dtype) -> 1-element float32 array."""
    return b.cast(b.reshape(s, (1,)), "float32")


def scalar_from_wire(b, p, dtype: str):
    """1-element float32 array -> 0-d array of dtype."""
    return b.reshape(b.cast(p, dtype), ())


# --------------------------------------------------------------------------- small unsigned ints
def pack_uint(b, w, bits: int):
    """n unsigned ints < 2**bits (int32/int64) -> `bits` packed bit planes, bits*ceil(n/8) uint8.

    Plane j holds bit j of every value (least significant first); each plane is packbits'ed.
    """
    w = b.cast(w, "int32")
    return b.cat([b.packbits(b.band(b.shr(w, j), 1)) for j in range(bits)])


def unpack_uint(b, packed, n: int, bits: int):
    """Inverse of pack_uint: int32 array of n values."""
    per = (n + 7) // 8
    planes = b.split(packed, [per] * bits) if bits > 1 else [packed]
    out = None
    for j, pl in enumerate(planes):
        v = b.unpackbits(pl, n)
        v = b.shl(v, j) if j else v
        out = v if out is None else b.bor(out, v)
    return out


# --------------------------------------------------------------------------- randomness
def private_uniform(ctx, purpose: str, n: int, like, dtype: str, native: bool = False):
    """n uniforms in [0, 1) private to this rank (key (seed, step, name, purpose/rank)), as dtype.
    native=False: the counter-based stream (bit-identical on every backend); native=True: the
    framework's own seeded generator (backend.native_uniform: one kernel; the same draws for the
    same key on the same backend, so a resumed run repeats them, but different across backends)."""
    b = ctx.backend
    key = ctx.key(f"{purpose}/{ctx.rank}")
    u = b.native_uniform(key, n, like) if native else rng.uniform(b, key, n, like)
    return b.cast(u, dtype)


RNG_PARAM = Param(str, "native", "private random stream: native (the framework's seeded generator: one kernel, "
                  "reproducible per backend; the default) or counter (bit-identical on every backend, slower)",
                  choices=("counter", "native"))


def stochastic_round(b, y, u):
    """floor(y) + [u < frac(y)]: unbiased rounding of y >= 0 to a neighbouring integer (y's dtype)."""
    fl = b.floor(y)
    return fl + b.cast(u < (y - fl), b.dtype(y))


# --------------------------------------------------------------------------- majority vote base
class SignVoteCompressor(Compressor):
    """Base of `signsgd` and `signum`: payload = packed sign bits of `signal(x)`; aggregate by vote.

    scale=mean (default): each rank also sends a = mean |signal| (one float32, as EF-signSGD
    scales its sign), and the vote is multiplied by the ranks' mean of a, so a step has the size
    of the gradient and an SGD learning rate transfers. scale=<number>: a fixed magnitude (the
    papers' form; the learning rate is then the per-coordinate step), payload = the bits only.
    decompress(own payload) = a * sign;  aggregate(all) = mean_r(a_r) * majority_vote.
    Subclasses implement `signal(x, state, ctx) -> (array to take the sign of, info)`.
    """

    summable = False
    default_memory = "none"
    params = {"scale": Param(str, "mean", "magnitude of the voted sign: mean (mean |g| per tensor, sent as "
                             "one float32) or a fixed number (the optimizer's lr multiplies it)")}

    def validate(self):
        if self.scale == "mean":
            self._fixed = None
            return
        try:
            self._fixed = float(self.scale)
        except ValueError:
            self._fixed = float("nan")
        if not self._fixed > 0 or self._fixed == float("inf"):
            raise ValueError(f"{self.kind} {self.name!r}: parameter scale={self.scale!r} is not valid; expected "
                             "mean or a positive number")

    cpu_fusion = False          # per tensor is faster on a CPU (docs part 1, wave 5)

    @property
    def fusion(self):
        """Elementwise sign and vote: a fused bucket only saves pad bits; scale=mean keeps one
        mean per tensor (segmented sums), sent as the bucket's T float32 scales."""
        return "exact" if self._fixed is not None else "segmented"

    def signal(self, x, state, ctx):
        return x, None

    def compress(self, x, state, ctx):
        b = ctx.backend
        y, info = self.signal(x, state, ctx)
        bits = pack_signs(b, y)
        if self._fixed is not None:
            return [bits], info
        return [mean_abs_scales(b, y, ctx), bits], info

    def _scaled(self, b, out, scales, dt, ctx):
        """out (a fresh +-1 / vote array, ours) times the scale, in place where the backend can."""
        if self._fixed is not None:
            return b.scale_(out, self._fixed) if self._fixed != 1.0 else out
        total = b.cast(scales[0], dt)
        for p in scales[1:]:
            total = total + b.cast(p, dt)
        return b.segment_mul_(out, total * (1.0 / len(scales)), segs(ctx))

    def decompress(self, payload, info, ctx):
        b, dt = ctx.backend, compute_dtype(ctx)
        out = unpack_signs(b, payload[-1], ctx.numel, dt)
        return self._scaled(b, out, payload[:-1], dt, ctx)

    def aggregate(self, gathered, info, ctx):
        b, dt = ctx.backend, compute_dtype(ctx)
        out = majority_vote(b, [p[-1] for p in gathered], ctx.numel, dt)
        return self._scaled(b, out, [p[0] for p in gathered] if self._fixed is None else [], dt, ctx)

    def ratio_of(self, numel):
        return 4 * numel / ((numel + 7) // 8 + (4 if self._fixed is None else 0))
