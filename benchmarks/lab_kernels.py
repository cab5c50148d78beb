"""`python -m benchmarks kernels`: every registered compressor on real models' gradients, beside baselines.

For each model (ResNet-18, ResNet-50, the PTB-medium LSTM LM; real gradients from one backward
pass, layer by layer as the pipeline sees them) and each method, one step is

    compress  every tensor (all rounds of a multi-round compressor; the single-rank "sum" of a
              round's payload is the payload itself)
    decompress every tensor

timed separately (median over --reps steps after one warm-up step; state such as PowerSGD's warm
start carries over between steps, no error feedback). Reported: milliseconds, the time relative to
one fp32 copy of the gradient (the memory-bandwidth roofline), wire bytes per step, the ratio
dense/payload, and the relative reconstruction error ||D(C(g)) - g|| / ||g|| over the whole model.

Baselines a user has today, timed in the same process on the same tensors:
  torch.topk   GRACE's top-k: torch.topk(|g|, k) + gather; int64 indices on the wire; scatter back.
  powersgd-hook  PyTorch's DDP PowerSGD hook arithmetic (per matrix M = g.view(rows, -1):
               orthogonalize(Q) [warm start], P = M Q, orthogonalize(P), Q = M^T P; decode P Q^T;
               vectors and matrices not worth compressing go uncompressed), using the hook
               module's own _orthogonalize and _should_compress; error feedback left out as for ours.
  fp32 copy    one copy of every tensor into a preallocated buffer.
"""
from __future__ import annotations

import statistics
import time

import torch

import gradcomp
from gradcomp import registry
from gradcomp.backend import get_backend
from gradcomp.compressors.base import Ctx
from benchmarks import plotting, workloads

COLUMNS = ["device", "model", "method", "compress_ms", "decompress_ms", "total_ms", "x_copy",
           "payload_MB", "ratio", "rel_error", "status"]
LAB_PARAMS = {"ratio": "0.01", "rank": "4"}      # applied where a compressor declares the parameter
PER_NAME = {"randproj": {"ratio": "100"},         # its `ratio` is dense/payload (100x ~ 1% of the entries)
            "sketch": {"ratio": "100"}}
EXTRA_SPECS = {"topk": ["topk:ratio=0.01,mode=sampled"]}


def resolve_spec(name: str) -> tuple[str | None, str]:
    """(spec with the lab's parameters, "") for a registered compressor; (None, reason) if unusable."""
    try:
        cls = registry.lookup("compressor", name)
    except (ImportError, AttributeError) as e:
        return None, f"skipped: not importable ({type(e).__name__})"
    except ValueError as e:
        return None, f"skipped: {e}"
    params = getattr(cls, "params", {}) or {}
    lab = dict(LAB_PARAMS, **PER_NAME.get(name, {}))
    kv = [f"{k}={v}" for k, v in lab.items() if k in params]
    spec = name + (":" + ",".join(kv) if kv else "")
    try:
        gradcomp.create(spec)
    except (ValueError, TypeError):
        spec = name                                    # the lab value is out of its range: defaults
    return spec, ""


def lab_specs() -> list[tuple[str, str | None, str]]:
    """(label, spec or None, status) for every registered compressor (and lab variants)."""
    out = []
    for name in gradcomp.available():
        spec, why = resolve_spec(name)
        out.append((spec or name, spec, why or "ok"))
        if spec:
            out.extend((s, s, "ok") for s in EXTRA_SPECS.get(name, []))
    return out


# ------------------------------------------------------------------------------- methods
class GradcompMethod:
    def __init__(self, spec):
        self.label, self.comp = spec, gradcomp.create(spec)
        self.state, self.ctx = {}, {}

    def setup(self, name, x):
        b, shape = get_backend(x), self.shape[name]       # the tensor's own shape, as the pipeline passes it
        self.ctx[name] = lambda step, name=name, x=x, b=b: Ctx(b, name, shape, "float32", x.numel(), step, 0, 0, 1)
        self.state[name] = self.comp.init_state(x, self.ctx[name](0))

    def compress(self, name, x, step):
        c, ctx = self.comp, self.ctx[name](step)
        payload, info = c.compress(x, self.state[name], ctx)
        payload = list(payload)
        nbytes = sum(get_backend(p).nbytes(p) for p in payload)
        for _ in range(1, c.rounds):
            payload, info = c.next_round(payload, info, self.state[name], ctx)
            payload = list(payload)
            nbytes += sum(get_backend(p).nbytes(p) for p in payload)
        return payload, (info, ctx), nbytes

    def decompress(self, name, payload, info):
        info, ctx = info
        out = self.comp.decompress(payload, info, ctx)
        self.state[name] = self.comp.new_state(info, self.state[name], ctx)
        return out


class TorchTopK:
    """GRACE-style top-k: torch.topk on |g|, values + int64 indices, scatter to decode."""

    def __init__(self, ratio=0.01):
        self.label, self.ratio = f"torch.topk (GRACE) ratio={ratio}", ratio

    def setup(self, name, x):
        pass

    def compress(self, name, x, step):
        k = max(1, min(x.numel(), int(round(self.ratio * x.numel()))))
        _, idx = torch.topk(x.abs(), k, sorted=False)
        vals = torch.gather(x, 0, idx)
        return [vals, idx], x.numel(), vals.nbytes + idx.nbytes

    def decompress(self, name, payload, n):
        vals, idx = payload
        return torch.zeros(n, dtype=vals.dtype, device=vals.device).scatter_(0, idx, vals)


class PowerSGDHookMath:
    """torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook's per-matrix arithmetic."""

    def __init__(self, rank=4, min_compression_rate=2.0):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as hook
        self.hook, self.rank, self.mcr = hook, rank, min_compression_rate
        self.label = f"powersgd-hook (torch) rank={rank}"
        self.q = {}

    def setup(self, name, x):
        self.q.pop(name, None)

    def _matrix(self, name, x):
        shape = self.shape[name]
        if len(shape) <= 1:
            return None
        rows = shape[0]
        m = x.view(rows, -1)
        r = min(m.shape[0], m.shape[1], self.rank)
        return (m, r) if self.hook._should_compress(m.shape[0], m.shape[1], r, self.mcr)[0] else None

    def compress(self, name, x, step):
        got = self._matrix(name, x)
        if got is None:
            return [x.clone()], None, x.nbytes
        m, r = got
        q = self.q.get(name)
        if q is None:
            gen = torch.Generator().manual_seed(step)
            q = torch.randn(1, m.shape[1], r, generator=gen).to(x.device)
        self.hook._orthogonalize(q, 0)
        p = torch.bmm(m.unsqueeze(0), q)                # P = M Q   (allreduced)
        self.hook._orthogonalize(p, 0)
        q = torch.bmm(m.t().unsqueeze(0), p)           # Q = M^T P (allreduced)
        self.q[name] = q
        return [p, q], m.shape, p.nbytes + q.nbytes

    def decompress(self, name, payload, shape):
        if shape is None:
            return payload[0]
        p, q = payload
        return torch.bmm(p, q.transpose(1, 2)).reshape(-1)


class CopyBaseline:
    label = "fp32 copy (roofline)"

    def __init__(self):
        self.buf = {}

    def setup(self, name, x):
        self.buf[name] = torch.empty_like(x)

    def compress(self, name, x, step):
        self.buf[name].copy_(x)
        return [self.buf[name]], None, x.nbytes

    def decompress(self, name, payload, info):
        return payload[0]


# ------------------------------------------------------------------------------- timing
def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_method(method, grads: dict, device: str, reps: int) -> dict:
    """Median compress / decompress milliseconds over `reps` steps (after one warm-up step)."""
    flat = {n: g.reshape(-1).float().contiguous() for n, g in grads.items()}
    method.shape = {n: tuple(g.shape) for n, g in grads.items()}
    for n, x in flat.items():
        method.setup(n, x)
    tc, td, err2, ref2, nbytes = [], [], 0.0, 0.0, 0
    for step in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        sent = {n: method.compress(n, x, step) for n, x in flat.items()}
        _sync(device)
        t1 = time.perf_counter()
        dec = {n: method.decompress(n, p, info) for n, (p, info, _) in sent.items()}
        _sync(device)
        t2 = time.perf_counter()
        if step > 0:
            tc.append(t1 - t0)
            td.append(t2 - t1)
        if step == reps:
            nbytes = sum(b for _, _, b in sent.values())
            for n, x in flat.items():
                err2 += float(torch.sum((dec[n].reshape(-1).float() - x) ** 2))
                ref2 += float(torch.sum(x * x))
    c, d = statistics.median(tc), statistics.median(td)
    dense = 4 * sum(x.numel() for x in flat.values())
    return {"compress_ms": 1e3 * c, "decompress_ms": 1e3 * d, "total_ms": 1e3 * (c + d),
            "payload_MB": nbytes / 1e6, "ratio": dense / nbytes if nbytes else float("nan"),
            "rel_error": (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0, "status": "ok"}


def run(args) -> list[dict]:
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device; run with --device cpu")
    torch.set_num_threads(max(1, args.threads)) if args.threads else None
    models = ["resnet18", "resnet50", "lstm"] if not args.smoke else ["resnet18", "lstm"]
    if args.models:
        models = args.models.split(",")
    reps = args.reps or (1 if args.smoke else 3)
    specs = lab_specs()
    rows = []
    for model in models:
        grads = {n: g.to(device) for n, g in workloads.model_gradients(model, small=args.smoke).items()}
        numel = sum(g.numel() for g in grads.values())
        label = (workloads.MODEL_LABELS.get(model, model) if not args.smoke else f"{model} (smoke)") + f" {numel / 1e6:.2f}M"
        methods = [("fp32 copy (roofline)", CopyBaseline)]
        methods += [(lab, (lambda s=s: GradcompMethod(s)) if s else status) for lab, s, status in specs]
        methods += [("torch.topk (GRACE) ratio=0.01", lambda: TorchTopK(0.01)),
                    ("powersgd-hook (torch) rank=4", lambda: PowerSGDHookMath(4))]
        copy_ms = None
        for lab, make in plotting.progress(methods, desc=f"kernels {model}", enabled=not args.quiet):
            row = {"device": device, "model": label, "method": lab}
            if isinstance(make, str):
                row.update(status=make)
            else:
                try:
                    row.update(time_method(make(), grads, device, reps))
                except Exception as e:           # one broken compressor must not end the table
                    row.update(status=f"error: {type(e).__name__}: {str(e)[:80]}")
            if lab.startswith("fp32 copy"):
                copy_ms = row.get("total_ms")
            if copy_ms and "total_ms" in row:
                row["x_copy"] = row["total_ms"] / copy_ms
            rows.append(row)
    plotting.emit(rows, COLUMNS, args.out, "kernels", title=f"kernels on {device}")
    ok = [r for r in rows if r.get("status") == "ok"]
    plotting.grouped_bars(f"{args.out}/kernels.png", ok, "model", "method", "total_ms", log=True,
                          title=f"compress + decompress per step ({device}, lower is better)", ylabel="ms (log)")
    _error_plot(f"{args.out}/kernels_error.png", ok, device)
    return rows


def _error_plot(path, rows, device):
    """Reconstruction error against compression ratio, log-log; unscaled sign methods (error > 10) left out."""
    plt = plotting._plt()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    markers = "osD^v<>ph*"
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        pts = [r for r in rows if r["model"] == model and isinstance(r.get("ratio"), float) and 1.0001 < r["ratio"] < 1e4
               and 0 < r.get("rel_error", 0) <= 10]
        ax.scatter([r["ratio"] for r in pts], [r["rel_error"] for r in pts], marker=markers[i % 10], label=model, s=18)
        if i == 0:
            for r in pts:
                ax.annotate(r["method"].split(":")[0].split(" ")[0], (r["ratio"], r["rel_error"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio (dense fp32 bytes / wire bytes)")
    ax.set_ylabel("relative reconstruction error")
    ax.set_title(f"one-shot error vs ratio ({device}, no error feedback; unscaled sign methods omitted)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plotting._save(fig, path, 80)
