"""`python -m benchmarks.traffic_model`: expected per-rank traffic and time per step at P ranks
beyond this machine, for every method, from per-rank payloads measured on real gradients.

1. Payloads: one GradientSync step per method on a workload's real gradients (benchmarks/workloads.py,
   one backward pass; `--workload digits|lstm|lstm-small|resnet18|resnet50`). The per-rank payload of
   these methods does not depend on P (local top-k, gTop-k, ScaleCom, aggtopk, dense), so it is
   measured once, split per collective round.
2. Collectives (gradcomp/traffic.py; alpha = per-message latency, B = link bandwidth):

     dense / summable rounds   ring allreduce   bytes 2 (P-1)/P s     time 2 (P-1) alpha + bytes / B
     non-summable              ring allgather   bytes (P-1) s         time (P-1) alpha + bytes / B
     gtopk as run (merge=tree) recursive doubling  bytes L s, L = log2 m (+1 off powers of two, m =
                               2^floor(log2 P))      time L alpha + bytes / B  (busiest rank)
     gtopk, paper's tree       reduce + broadcast    bytes 2 ceil(log2 P) s    time 2 ceil(log2 P) alpha + bytes / B
     scalecom index round,     pipelined chain  bytes s (each rank receives and forwards it once)
     as a broadcast                             time (P-1) alpha + bytes / B

   gtopk is shown as it runs (pairwise merge over Communicator.sendrecv), under the paper's
   reduce-then-broadcast tree, and with merge=allgather. scalecom is shown as it runs (its index round rides an allreduce) and with
   that round as a broadcast.
3. Output: one row per method and P with MB per rank and step, ms per step, and the speed-up over
   dense ring allreduce; `--json` also writes the rows.

The figures are models of the algorithms (bandwidth-bound, no congestion, full-duplex links); the
payload bytes are measured.

    python -m benchmarks traffic --workload lstm --ratio 0.01 --bandwidth-gbit 10 --latency-us 5
    python -m benchmarks.traffic_model ...          (the same, printing only)
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from gradcomp import traffic

RANKS = (8, 16, 64, 256)


def method_specs(ratio: float) -> list[tuple[str, str]]:
    return [("dense allreduce", "none"), ("local top-k (allgather)", f"topk:ratio={ratio}"),
            ("gtopk", f"gtopk:ratio={ratio}"), ("scalecom", f"scalecom:ratio={ratio}"),
            ("scalecom fp16 + compact indices", f"scalecom:ratio={ratio},values=fp16,indices=compact"),
            ("scalecom int8 + compact indices", f"scalecom:ratio={ratio},values=int8,indices=compact"),
            ("aggtopk energy", f"aggtopk:ratio={ratio}"), ("aggtopk prev", f"aggtopk:ratio={ratio},metric=prev")]


def measure(grads: dict, spec: str) -> list[int]:
    """Per-round payload bytes of one rank for one step of `spec` on `grads` ({name: tensor})."""
    import gradcomp
    from gradcomp.compressors.base import Ctx
    comp = gradcomp.create(spec)
    rounds = [0] * comp.rounds
    for name, g in grads.items():
        from gradcomp.backend import get_backend
        b = get_backend(g)
        x = b.flatten(b.cast(g, "float32"))
        ctx = Ctx(b, name, tuple(g.shape), "float32", b.numel(x), 0, 0, 0, 1)
        state = comp.init_state(x, ctx)
        payload, info = comp.compress(x, state, ctx)
        rounds[0] += sum(b.nbytes(p) for p in payload)
        for r in range(1, comp.rounds):
            payload, info = comp.next_round(list(payload), info, state, ctx)
            rounds[r] += sum(b.nbytes(p) for p in payload)
    return rounds


def plans(label: str, spec: str, rounds: list[int]) -> list[tuple[str, list[tuple[str, int]]]]:
    """(row label, [(collective, bytes), ...]) variants of one method."""
    import gradcomp
    comp = gradcomp.create(spec)
    if not comp.summable:
        if getattr(comp, "exchanges", False):           # gtopk merge=tree: recursive doubling, as run
            return [(label + " (as run: pairwise merge)", [("butterfly", sum(rounds))]),
                    (label + " (paper's tree + broadcast, modelled)", [("tree", sum(rounds))]),
                    (label + " merge=allgather", [("allgather", sum(rounds))])]
        return [(label, [("allgather", sum(rounds))])]
    out = [(label + (" (as run)" if comp.name == "scalecom" else ""), [("allreduce", r) for r in rounds])]
    if comp.name == "scalecom":
        out.append((label + " (index round as broadcast)", [("bcast", rounds[0]), ("allreduce", rounds[1])]))
    return out


def cost(plan, p: int, bandwidth: float, alpha: float) -> tuple[float, float]:
    """(bytes per rank, seconds) of one step's collectives at p ranks."""
    nbytes = secs = 0.0
    for kind, s in plan:
        if kind == "bcast":
            b, msgs = (float(s) if p > 1 else 0.0), p - 1
        else:
            b = traffic.model(kind, s, p)
            msgs = {"allreduce": 2 * (p - 1), "allgather": p - 1, "tree": 2 * math.ceil(math.log2(p)),
                    "butterfly": traffic.butterfly_levels(p)}[kind]
        nbytes += b
        secs += msgs * alpha + b / bandwidth
    return nbytes, secs


def run(a) -> list[dict]:
    from benchmarks import workloads
    grads = workloads.model_gradients(a.workload)
    numel = sum(g.numel() for g in grads.values())
    ranks = [int(r) for r in a.ranks.split(",")]
    bw, alpha = a.bandwidth_gbit * 1e9 / 8, a.latency_us * 1e-6
    rows = []
    for label, spec in method_specs(a.ratio):
        rounds = measure(grads, spec)
        for name, plan in plans(label, spec, rounds):
            row = {"method": name, "spec": spec, "payload_MB": sum(rounds) / 1e6}
            for p in ranks:
                nb, t = cost(plan, p, bw, alpha)
                row[f"MB@{p}"], row[f"ms@{p}"] = nb / 1e6, t * 1e3
            rows.append(row)
    dense = rows[0]
    for r in rows:
        for p in ranks:
            r[f"x@{p}"] = dense[f"ms@{p}"] / r[f"ms@{p}"] if r[f"ms@{p}"] else float("nan")
    cols = ["method", "payload_MB"] + [f"{k}@{p}" for p in ranks for k in ("MB", "ms", "x")]
    from benchmarks import plotting
    title = (f"{workloads.MODEL_LABELS.get(a.workload, a.workload)} ({numel / 1e6:.2f}M parameters), ratio {a.ratio}, "
             f"{a.bandwidth_gbit:g} Gbit/s, {a.latency_us:g} us per message: per-rank MB and ms per step, x = "
             "speed-up over dense ring allreduce")
    if getattr(a, "out", ""):
        plotting.emit(rows, cols, a.out, "traffic", title=title)
    else:
        print(f"\n{title}\n", file=sys.stdout)
        print(plotting.table(rows, cols), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def add_args(p):
    p.add_argument("--workload", default="lstm", help="digits, lstm, lstm-small, resnet18, resnet50")
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--ranks", default=",".join(map(str, RANKS)))
    p.add_argument("--bandwidth-gbit", type=float, default=10.0, help="per-link bandwidth, Gbit/s")
    p.add_argument("--latency-us", type=float, default=5.0, help="per-message latency, microseconds")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
