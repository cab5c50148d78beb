"""Per-rank traffic and union statistics of GradientSync, under the collective actually used.

A payload of s bytes costs a rank different wire traffic depending on the collective:

  ring allreduce of s bytes         sends and receives 2 (P-1)/P * s   (reduce-scatter + allgather)
  ring allgather, rank r's own s_r  sends sum_q s_q - s_{r+1},  receives sum_q s_q - s_r
                                    (block q travels q -> q+1 -> ... -> q-1: rank r forwards every
                                    block but its successor's; with equal sizes both are (P-1) s)
  tree merge (gTop-k) of s bytes    as run (gtopk merge=tree, recursive doubling): log2 m messages of
                                    s sent and received per rank (m = 2^floor(log2 P)), plus one more
                                    each way on the ranks folded in at other P; counted message by
                                    message by the compressor (an allgather per level on a transport
                                    without point-to-point). The model `tree_merge` below is the
                                    paper's reduce-then-broadcast tree: 2 ceil(log2 P) * s on the
                                    critical path
  dense allreduce (the reference)   ring allreduce of the gradients in their own dtype

`account(stats, comp, entry)` adds one committed tensor of one step to the counters kept in
GradientSync's stats dict (plain numbers, so they checkpoint with it); `report(stats, size)` turns the
counters into what `GradientSync.stats()` returns:

  bytes_sent    payload bytes this rank contributed (every round), headers excluded
  bytes_meta    size headers of variable-size payloads (allgathered like payloads)
  bytes_recv    payload + header bytes the collectives delivered to this rank from the other ranks
                (allgather: the others' payloads; allreduce: the sum, as large as what was sent)
  bytes_dense   the gradients in their own dtype (2 bytes per fp16/bf16 entry, 4 fp32, 8 fp64)
  wire_sent, wire_recv   per-rank bytes on the wire under the ring algorithm of the collective used
  wire_dense    per-rank wire bytes of a dense ring allreduce of the same gradients at the same P
  ratio         wire_dense / wire_sent at P > 1 (real traffic saved against dense allreduce); at P = 1
                nothing travels and ratio is bytes_dense / bytes_sent (the payload compression)
  payload_ratio bytes_dense / bytes_sent at any P (what `ratio` meant before P was accounted)
  union, union_kept, union_k   for sparsifiers: sum over steps and tensors of U (distinct indices
                in the aggregate) and of k (entries one rank selected, mean over ranks), and U/k;
                local top-k at P ranks gives up to P, a shared selection at most 1
                (absent for compressors that do not select entries, and in traced TF graphs)

These are models of the algorithm, not measurements of a particular MPI library's choice (which
may use recursive doubling or Bruck's algorithm for small messages); the payload bytes are exact.
"""
from __future__ import annotations

import math

COUNTERS = ("bytes_sent", "bytes_dense", "bytes_meta", "bytes_recv", "allreduced", "gather_sent",
            "gather_recv")


def ring_allreduce(nbytes: float, size: int) -> float:
    """Per-rank bytes sent (= received) by a ring allreduce of nbytes at `size` ranks."""
    return 2.0 * (size - 1) / size * nbytes if size > 1 else 0.0


def ring_allgather(sizes, rank: int) -> tuple[int, int]:
    """(sent, received) bytes of `rank` in a ring allgather where rank q contributes sizes[q]."""
    p = len(sizes)
    if p <= 1:
        return 0, 0
    total = sum(sizes)
    return total - sizes[(rank + 1) % p], total - sizes[rank]


def tree_merge(nbytes: float, size: int) -> float:
    """Critical-path bytes of gTop-k's tree merge of one nbytes sparse payload per rank at `size`."""
    return 2.0 * math.ceil(math.log2(size)) * nbytes if size > 1 else 0.0


def butterfly_levels(size: int) -> int:
    """Messages the busiest rank sends in gtopk's recursive-doubling merge at `size` ranks:
    log2 m levels (m = 2^floor(log2 size)), plus the result sent back to a folded-in rank."""
    if size <= 1:
        return 0
    m = 1 << (size.bit_length() - 1)
    return (m.bit_length() - 1) + (1 if size > m else 0)


def model(kind: str, nbytes: float, size: int) -> float:
    """Per-rank wire bytes of one step for a method whose per-rank payload is nbytes, at `size`
    ranks: kind is 'allreduce', 'allgather' (equal sizes), 'tree' (gTop-k's reduce-then-broadcast
    tree, critical path) or 'butterfly' (gtopk merge=tree as run, busiest rank)."""
    if kind == "allreduce":
        return ring_allreduce(nbytes, size)
    if kind == "allgather":
        return float((size - 1) * nbytes)
    if kind == "tree":
        return tree_merge(nbytes, size)
    if kind == "butterfly":
        return float(butterfly_levels(size) * nbytes)
    raise ValueError(f"unknown collective model {kind!r}; valid: allreduce, allgather, tree, butterfly")


def new_counters() -> dict:
    return {k: 0 for k in COUNTERS}


def account(stats: dict, comp, e, pending: list | None = None):
    """Add one committed entry (gradcomp.pipeline._Entry) of one step to `stats`. A union size
    still on the device is appended to `pending` (if given) instead of being read now: no host
    synchronisation per tensor; `flush(stats, pending)` adds them all with one read."""
    ctx = e.ctx
    b, p, r = ctx.backend, ctx.size, ctx.rank
    from gradcomp.backend.base import ITEMSIZE
    for k in COUNTERS:
        stats.setdefault(k, 0)
    stats["bytes_sent"] += e.sent_bytes
    stats["bytes_dense"] += ITEMSIZE[ctx.dtype] * ctx.numel
    if comp.summable:
        stats["allreduced"] += e.sent_bytes
        stats["bytes_recv"] += e.sent_bytes if p > 1 else 0
    elif p > 1 and isinstance(e.info, dict) and "wire" in e.info:   # its own exchange counted its bytes
        sent, recv = e.info["wire"]
        stats["gather_sent"] = stats.get("gather_sent", 0) + sent
        stats["gather_recv"] = stats.get("gather_recv", 0) + recv
        stats["bytes_recv"] += recv
    elif p > 1:
        if comp.variable_size and not b.traced():
            sizes = [sum(b.nbytes(a) for a in payload) for payload in e.gathered]
        else:
            sizes = [e.sent_bytes] * p
        sent, recv = ring_allgather(sizes, r)
        stats["gather_sent"] += sent
        stats["gather_recv"] += recv
        stats["bytes_recv"] += recv
    if b.traced():
        return
    u = comp.union(e.reduced if comp.summable else e.gathered, e.info, ctx)
    if u is not None:
        size_u, kept = u
        if not isinstance(size_u, (int, float)):
            if pending is not None:
                pending.append((b, size_u))
                size_u = 0
            else:
                size_u = b.item(size_u)
        stats["union"] = stats.get("union", 0) + int(size_u)
        stats["union_kept"] = stats.get("union_kept", 0) + kept


def flush(stats: dict, pending: list):
    """Add the device-side union sizes collected by account(..., pending) to stats (one host read
    per backend and device) and empty `pending`."""
    groups: dict = {}
    for b, v in pending:
        groups.setdefault((id(b), str(b.device(v))), (b, []))[1].append(b.reshape(b.cast(v, "float64"), (1,)))
    for b, vals in groups.values():
        stats["union"] = stats.get("union", 0) + int(round(b.item(b.sum(b.cat(vals)))))
    pending.clear()


def report(stats: dict, size: int, steps: int) -> dict:
    """The dict GradientSync.stats() returns (see the module docstring)."""
    s = {k: stats.get(k, 0) for k in ("bytes_sent", "bytes_dense", "bytes_meta", "bytes_recv")}
    s["steps"] = steps
    meta_wire = (size - 1) * stats.get("bytes_meta", 0)
    s["bytes_recv"] += meta_wire
    ar = ring_allreduce(stats.get("allreduced", 0), size)
    s["wire_sent"] = ar + stats.get("gather_sent", 0) + meta_wire
    s["wire_recv"] = ar + stats.get("gather_recv", 0) + meta_wire
    s["wire_dense"] = ring_allreduce(s["bytes_dense"], size)
    sent = s["bytes_sent"]
    s["payload_ratio"] = s["bytes_dense"] / sent if sent else float("nan")
    if size > 1:
        s["ratio"] = s["wire_dense"] / s["wire_sent"] if s["wire_sent"] else float("nan")
    else:
        s["ratio"] = s["payload_ratio"]
    if "union" in stats:
        s["union"], s["union_kept"] = stats["union"], stats["union_kept"]
        s["union_k"] = stats["union"] / stats["union_kept"] if stats["union_kept"] else float("nan")
    return s
