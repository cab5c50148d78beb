"""Union-aware sparsifiers (scalecom, gtopk, aggtopk), the lowpass memory, and the union / traffic
statistics of GradientSync.stats(), on constructed cases whose answers are known exactly."""
from __future__ import annotations

import numpy as np
import pytest

import gradcomp
from gradcomp import traffic
from gradcomp.compressors.scalecom import (INDEX_CODES, code_bytes, decode_indices, encode_indices, index_bytes,
                                          leader_of, pack_indices, resolve_code, unpack_indices)

from conftest import RecordingComm, backend_available, f64, make_array, record_locals, world

NP = gradcomp.backend.backend_by_name("numpy")


def _spiky(n, rank, hot, scale=10.0):
    """Small noise plus large entries at `hot` (a list of indices), different per rank if asked."""
    x = np.random.default_rng(rank).standard_normal(n).astype(np.float32) * 0.01
    x[list(hot)] = scale * (1 + np.arange(len(hot), dtype=np.float32))
    return x


# --------------------------------------------------------------------------- union statistics
@pytest.mark.parametrize("size", [2, 4])
def test_topk_union_is_exact_for_disjoint_and_shared_selections(size):
    n, k = 40, 3

    def fn(comm):
        out = {}
        for case in ("disjoint", "shared"):
            sync = gradcomp.GradientSync(f"topk:ratio={k / n}", comm=comm, memory="none")
            hot = range(k * comm.rank, k * comm.rank + k) if case == "disjoint" else range(5, 5 + k)
            sync.step({"w": _spiky(n, comm.rank, hot)})
            sync.step({"w": _spiky(n, comm.rank, hot)})
            out[case] = sync.stats()
        return out

    for st in world(size, fn):
        assert st["disjoint"]["union"] == 2 * size * k and st["disjoint"]["union_kept"] == 2 * k
        assert st["disjoint"]["union_k"] == size
        assert st["shared"]["union"] == 2 * k and st["shared"]["union_k"] == 1.0


def test_union_counts_partial_overlap_and_uneven_threshold_selections():
    """threshold: rank r keeps r + 1 entries, overlapping on index 0: U = 3, k = mean (1+2+3)/3 = 2."""
    n = 30

    def fn(comm):
        x = np.zeros(n, np.float32)
        x[: comm.rank + 1] = 1.0
        sync = gradcomp.GradientSync("threshold:threshold=0.5", comm=comm, memory="none")
        sync.step({"w": x})
        return sync.stats()

    for st in world(3, fn):
        assert st["union"] == 3 and st["union_kept"] == pytest.approx(2.0) and st["union_k"] == pytest.approx(1.5)


def test_compressors_that_select_no_entries_report_no_union():
    sync = gradcomp.GradientSync("qsgd")
    sync.step({"w": np.ones(10, np.float32)})
    assert "union_k" not in sync.stats()


@pytest.mark.parametrize("spec", ["scalecom:ratio=0.1", "gtopk:ratio=0.1", "aggtopk:ratio=0.1,chunk=4",
                                  "aggtopk:ratio=0.1,chunk=4,metric=prev", "randomk:ratio=0.1"])
def test_shared_selections_have_union_exactly_k(spec):
    def fn(comm):
        sync = gradcomp.GradientSync(spec, comm=comm)
        rng = np.random.default_rng(comm.rank)
        for _ in range(3):
            sync.step({"w": rng.standard_normal(400).astype(np.float32),
                       "v": rng.standard_normal(37).astype(np.float32)})
        return sync.stats()

    for st in world(4, fn):
        assert st["union_k"] == 1.0


# --------------------------------------------------------------------------- traffic accounting
def test_wire_traffic_of_allgather_and_allreduce_at_eight_ranks():
    n = 1000

    def fn(comm):
        out = {}
        for spec in ("topk:ratio=0.01", "none", "scalecom:ratio=0.01"):
            rec = RecordingComm(comm)
            sync = gradcomp.GradientSync(spec, comm=rec)
            sync.step({"w": np.random.default_rng(comm.rank).standard_normal(n).astype(np.float32)})
            out[spec] = (sync.stats(), rec.step_traffic())
        return out

    for res in world(8, fn):
        st, seen = res["topk:ratio=0.01"]
        assert st["bytes_sent"] == 10 * 8 and st["bytes_recv"] == 7 * 80 == seen["recv"]
        assert st["wire_sent"] == st["wire_recv"] == 7 * 80 == seen["wire_sent"]
        assert st["wire_dense"] == pytest.approx(2 * 7 / 8 * 4 * n)
        assert st["ratio"] == pytest.approx(st["wire_dense"] / (7 * 80)) and st["payload_ratio"] == 50
        st, seen = res["none"]
        assert st["wire_sent"] == pytest.approx(2 * 7 / 8 * 4 * n) and st["ratio"] == pytest.approx(1.0)
        st, seen = res["scalecom:ratio=0.01"]
        assert st["bytes_sent"] == 10 * (index_bytes(n) + 4)            # 2-byte indices, fp32 values
        assert st["wire_sent"] == pytest.approx(2 * 7 / 8 * st["bytes_sent"]) == seen["wire_sent"]


def test_bytes_dense_counts_the_gradient_dtype():
    sync = gradcomp.GradientSync("topk:ratio=0.1")
    sync.step({"a": np.ones(10, np.float16), "b": np.ones(10, np.float64), "c": np.ones(10, np.float32)})
    assert sync.stats()["bytes_dense"] == 10 * (2 + 8 + 4)


def test_stats_survive_a_checkpoint():
    def run(comm, cut):
        sync = gradcomp.GradientSync("threshold:threshold=1.0", comm=comm)
        rng = np.random.default_rng(comm.rank)
        for t in range(4):
            if t == cut:
                sd = sync.state_dict()
                sync = gradcomp.GradientSync("threshold:threshold=1.0", comm=comm)
                sync.load_state_dict(sd)
            sync.step({"w": rng.standard_normal(100).astype(np.float32)})
        return sync.stats()

    for a, b in zip(world(3, lambda c: run(c, None)), world(3, lambda c: run(c, 2))):
        assert a == b and isinstance(b["union_kept"], float)


def test_traffic_models():
    assert traffic.ring_allreduce(800, 8) == 1400 and traffic.ring_allreduce(800, 1) == 0
    assert traffic.ring_allgather([1, 2, 3, 4], 0) == (10 - 2, 10 - 1)
    assert traffic.ring_allgather([1, 2, 3, 4], 3) == (10 - 1, 10 - 4)
    assert traffic.tree_merge(100, 8) == 600 and traffic.tree_merge(100, 5) == 600
    assert traffic.model("allgather", 100, 64) == 6300
    assert [traffic.butterfly_levels(p) for p in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]
    assert traffic.model("butterfly", 100, 8) == 300
    with pytest.raises(ValueError, match="valid: allreduce"):
        traffic.model("ring", 1, 2)


# --------------------------------------------------------------------------- scalecom
def test_every_rank_draws_the_same_leader_and_leaders_cycle():
    def fn(comm):
        comp = gradcomp.create("scalecom:ratio=0.1")
        seen = []
        for step in range(8):
            ctx = gradcomp.compressors.base.Ctx(NP, "layer.w", (50,), "float32", 50, step, 0, comm.rank, comm.size)
            _, info = comp.compress(np.ones(50, np.float32), {}, ctx)
            seen.append(info["leader"])
        return seen

    res = world(4, fn)
    assert all(r == res[0] for r in res)
    assert sorted(res[0][:4]) == [0, 1, 2, 3] and res[0][:4] == res[0][4:]
    assert res[0] == [leader_of(s, "layer.w", 4) for s in range(8)]


@pytest.mark.parametrize("n", [1, 255, 256, 70000])
def test_index_packing_round_trips(n):
    idx = np.unique(np.random.default_rng(n).integers(0, n, size=min(n, 50))).astype(np.int64)
    packed = pack_indices(NP, idx, n)
    assert packed.dtype == np.uint8 and packed.size == idx.size * index_bytes(n)
    np.testing.assert_array_equal(unpack_indices(NP, packed, n, idx.size), idx)


def test_scalecom_sums_the_values_at_the_leaders_topk():
    n, k, size = 60, 6, 3

    def fn(comm):
        sync = gradcomp.GradientSync(f"scalecom:ratio={k / n}", comm=comm, memory="none")
        x = _spiky(n, comm.rank, range(10 * comm.rank, 10 * comm.rank + k))
        return x, f64(sync.step({"w": x})["w"])

    res = world(size, fn)
    lead = leader_of(0, "w", size)
    idx = np.sort(np.argsort(-np.abs(res[lead][0]))[:k])
    want = np.zeros(n)
    want[idx] = np.sum([f64(x)[idx] for x, _ in res], axis=0) / size
    for _, avg in res:
        np.testing.assert_allclose(avg, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["numpy", "torch", "tensorflow"])
@pytest.mark.parametrize("n", [1, 2, 16, 255, 1000, 32768, 70000])
def test_index_codes_round_trip_in_exactly_their_stated_bytes(backend, n):
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")
    be = gradcomp.backend.backend_by_name(backend)
    rng = np.random.default_rng(n)
    for k in sorted({1, max(1, n // 40), max(1, n // 3), n}):
        idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
        for code in INDEX_CODES + ("compact",):
            packed = encode_indices(be, make_array(idx, backend, "int64"), n, code)
            got = be.to_numpy(packed)
            assert got.dtype == np.uint8 and got.size == code_bytes(n, k, code)
            np.testing.assert_array_equal(be.to_numpy(decode_indices(be, packed, n, k, code)), idx)
            if backend == "numpy":
                continue
            np.testing.assert_array_equal(got, encode_indices(NP, idx, n, code))   # same bytes as numpy
        assert code_bytes(n, k, "compact") == min(code_bytes(n, k, c) for c in INDEX_CODES)
        lo = int(np.floor(np.log2(n / k)))                  # (n-1) >> lo < 2k: at most lo + 3 bits per index
        assert code_bytes(n, k, "eliasfano") <= -(-k * lo // 8) + -(-(3 * k + 1) // 8)


def test_elias_fano_sizes_on_the_digits_cnns_largest_tensor():
    """fc1 of the digits CNN (32768 entries) at k = 2.5%: 819 indices in 743 bytes, not 2 x 819."""
    assert code_bytes(32768, 819, "eliasfano") == 743 and code_bytes(32768, 819, "planes") == 1638
    assert resolve_code(32768, 819, "compact") == "eliasfano"
    assert resolve_code(100, 90, "compact") == "bitmap" and resolve_code(144, 1, "compact") == "planes"


@pytest.mark.parametrize("leaders", [1, 2])
@pytest.mark.parametrize("spec", ["indices=compact,values=fp16", "indices=eliasfano", "indices=bitmap,values=bf16"])
def test_scalecom_compact_codes_decode_to_the_sum_of_the_rounded_values(spec, leaders):
    """Small integers (every partial sum exact in fp16 and bf16): the average is exactly the sum at
    the leaders' top-k over P, as with the default codes; the bytes are the codes' stated sizes."""
    n, k, size = 300, 12, 3
    if "bf16" in spec:
        pytest.importorskip("ml_dtypes")
    opts = dict(o.split("=") for o in spec.split(","))
    slots = [k // leaders + (1 if i < k % leaders else 0) for i in range(leaders)]
    per_step = sum(code_bytes(n, s, opts.get("indices", "planes")) for s in slots) + \
        k * (2 if "values" in opts else 4)

    def fn(comm):
        out = {}
        for s in (f"scalecom:ratio={k / n},leaders={leaders}", f"scalecom:ratio={k / n},leaders={leaders},{spec}"):
            sync = gradcomp.GradientSync(s, comm=comm, memory="none")
            rng = np.random.default_rng(comm.rank)
            x = rng.integers(-3, 4, n).astype(np.float32)
            x[rng.choice(n, k, replace=False)] = 32.0
            out[s] = [f64(sync.step({"w": x * 2 ** t})["w"]) for t in range(3)], sync.stats()
        return out

    for res in world(size, fn):
        (base, bst), (got, gst) = res.values()
        for a, b in zip(base, got):
            np.testing.assert_array_equal(b, a)
        assert gst["union"] == bst["union"] <= 3 * k
        assert gst["bytes_sent"] == 3 * per_step


def test_scalecom_fp16_values_keep_their_rounding_error_in_the_memory():
    """Error feedback with fp16 values: each rank's residual is x minus its own fp16-rounded values
    (sum of inputs - sum of residuals = the sum of what was sent, exactly), and the average is that
    sum as the fp16 allreduce rounds it (relative 2^-11 per addition: not fed back)."""
    n, k, size = 200, 20, 4
    xs = [np.random.default_rng(r).standard_normal(n).astype(np.float32) / 3 for r in range(size)]

    def fn(comm):
        sync = gradcomp.GradientSync(f"scalecom:ratio={k / n},values=fp16,indices=compact", comm=comm,
                                     memory="residual")
        return f64(sync.step({"w": xs[comm.rank].copy()})["w"]), f64(sync.residual("w"))

    res = world(size, fn)
    avg = res[0][0]
    sent = np.flatnonzero(avg)
    assert sent.size == k
    lead = leader_of(0, "w", size)
    np.testing.assert_array_equal(sent, np.sort(np.argsort(-np.abs(xs[lead]))[:k]))
    rounded = np.zeros(n)
    rounded[sent] = np.sum([x[sent].astype(np.float16).astype(np.float64) for x in xs], 0)
    for r, (_, resid) in enumerate(res):
        want = f64(xs[r]).copy()
        want[sent] -= xs[r][sent].astype(np.float16)
        np.testing.assert_allclose(resid, want, rtol=0, atol=1e-7)        # own rounding error kept
        assert np.any(resid[sent] != 0)
    np.testing.assert_allclose(size * avg, rounded, rtol=2 ** -9, atol=0)


@pytest.mark.parametrize("size", [2, 8])
def test_scalecom_int8_values_sum_exactly_and_lose_nothing(size):
    """values=int8: the scale s = sum_r max|x_r| / (127 - ceil(P/2)) is shared (round 1 sums the
    maxima), every rank sends round(x_r[I] / s) as int8, and the int8 sum cannot wrap even when every
    rank's value at an index is its maximum: the average is sum_r q_r s / P, and with residual memory
    sum of inputs = P * average + sum of residuals (nothing dropped but float rounding)."""
    n, k = 120, 12
    xs = [np.random.default_rng(r).standard_normal(n).astype(np.float32) for r in range(size)]
    for x in xs:
        x[[7, 40]] = 50.0, -50.0                         # every rank's maximum at the same indices

    def fn(comm):
        sync = gradcomp.GradientSync(f"scalecom:ratio={k / n},values=int8,indices=compact", comm=comm,
                                     memory="residual")
        return f64(sync.step({"w": xs[comm.rank].copy()})["w"]), f64(sync.residual("w")), sync.stats()

    res = world(size, fn)
    avg = res[0][0]
    lead = leader_of(0, "w", size)
    sent = np.sort(np.argsort(-np.abs(xs[lead]))[:k])
    assert set(np.flatnonzero(avg)) <= set(sent.tolist())   # small values may round to 0 (kept in memory)
    levels = 127 - (size + 1) // 2
    scale = np.float32(sum(np.abs(x).max() for x in xs)) / np.float32(levels)
    q = [np.floor(x[sent] / scale + np.float32(0.5)) for x in xs]
    assert np.all(np.abs(np.sum(q, 0)) <= 127)
    np.testing.assert_allclose(avg[sent], np.sum(q, 0) * scale / size, rtol=1e-6)
    assert avg[7] > 0 and avg[40] < 0                    # no wrap-around at the shared maxima
    np.testing.assert_allclose(avg[[7, 40]], [50.0, -50.0], rtol=0.5 * size / levels)
    np.testing.assert_allclose(np.sum([f64(x) for x in xs], 0) - np.sum([r for _, r, _ in res], 0), size * avg,
                               rtol=0, atol=1e-5)
    for _, _, st in res:                                 # indices + 4-byte max + 1 byte per value
        assert st["bytes_sent"] == code_bytes(n, k, "compact") + 4 + k


def test_scalecom_fp16_overflow_raises_with_no_state_changed():
    def fn(comm):
        sync = gradcomp.GradientSync("scalecom:ratio=0.5,values=fp16", comm=comm, memory="residual")
        with pytest.raises(gradcomp.PayloadOverflowError):
            sync.step({"w": np.full(8, 40000.0, np.float32)})          # 2 x 40000 > 65504
        return sync.steps, sync.residual("w")

    for steps, resid in world(2, fn):
        assert steps == 0 and (resid is None or not np.any(resid))      # the initial residual, untouched


def test_scalecom_compact_traffic_matches_the_bytes_counted_at_the_transport():
    """8 ranks, two tensors: payload = index code (a function of n, k) + 2 bytes per fp16 value;
    wire = the ring allreduce of both rounds, as the transport saw it."""
    shapes = {"w": 32768, "v": 1000}

    def fn(comm):
        rec = RecordingComm(comm)
        sync = gradcomp.GradientSync("scalecom:ratio=0.025,values=fp16,indices=compact", comm=rec)
        rng = np.random.default_rng(comm.rank)
        sync.step({m: rng.standard_normal(n).astype(np.float32) for m, n in shapes.items()})
        return sync.stats(), rec.step_traffic()

    want = code_bytes(32768, 819, "eliasfano") + 2 * 819 + code_bytes(1000, 25, "compact") + 2 * 25
    for st, seen in world(8, fn):
        assert st["bytes_sent"] == want
        assert st["wire_sent"] == pytest.approx(2 * 7 / 8 * want) == seen["wire_sent"]
        assert st["union_k"] == 1.0


# --------------------------------------------------------------------------- gtopk
def test_gtopk_allgather_is_the_global_topk_of_the_summed_local_topk_and_puts_back_the_rest():
    n, k, size = 50, 4, 4

    def fn(comm):
        sync = gradcomp.GradientSync(f"gtopk:ratio={k / n},merge=allgather", comm=comm, memory="residual")
        x = np.random.default_rng(comm.rank).standard_normal(n).astype(np.float32) * 0.01
        x[[0, 1]] = 3.0, -3.0                                  # hot on every rank: sums 12, -12
        x[10 + comm.rank], x[30 + comm.rank] = 5.0 + comm.rank, 1.0 + 0.1 * comm.rank   # local only
        avg = f64(sync.step({"w": x})["w"])
        return f64(x), avg, f64(sync.residual("w"))

    res = world(size, fn)
    summed = np.zeros(n)
    for x, _, _ in res:
        loc = np.argsort(-np.abs(x))[:k]
        summed[loc] += x[loc]
    keep = np.argsort(-np.abs(summed))[:k]
    want = np.zeros(n)
    want[keep] = summed[keep] / size
    assert sorted(keep) == [0, 1, 12, 13]
    for x, avg, resid in res:
        np.testing.assert_allclose(avg, want, rtol=1e-6, atol=1e-7)
        assert np.count_nonzero(avg) == k
        sent = np.zeros(n)
        loc = np.argsort(-np.abs(x))[:k]
        both = np.intersect1d(loc, keep)
        sent[both] = x[both]
        np.testing.assert_allclose(resid, x - sent, rtol=0, atol=1e-7)       # local top-k not kept: put back


# --------------------------------------------------------------------------- aggtopk
@pytest.mark.parametrize("metric", ["energy", "sketch", "prev"])
def test_aggtopk_sends_whole_chunks_shared_by_every_rank_and_decodes_to_the_sum(metric):
    n, c, size = 64, 8, 3

    def fn(comm):
        sync = gradcomp.GradientSync(f"aggtopk:ratio={2 * c / n},chunk={c},metric={metric}", comm=comm)
        log = record_locals(sync)
        rng = np.random.default_rng(comm.rank)
        outs = []
        for _ in range(3):
            x = rng.standard_normal(n).astype(np.float32) * 0.01
            x[16:24] += 5.0                                       # chunk 2 is hot on every rank
            outs.append(f64(sync.step({"w": x})["w"]))
        return outs, [f64(loc) for _, _, loc, _ in log["w"]]

    res = world(size, fn)
    for t in range(3):
        locs = [res[r][1][t] for r in range(size)]
        support = [set(np.flatnonzero(loc)) for loc in locs]
        assert all(s == support[0] for s in support)                  # the same coordinates on every rank
        chunks = {i // c for i in support[0]}
        assert len(chunks) == 2 and len(support[0]) == 2 * c         # two whole chunks
        if metric != "prev" or t == 1:
            assert 2 in chunks                                        # the hot chunk (prev: by last scores)
        np.testing.assert_allclose(size * res[0][0][t], np.sum(locs, axis=0), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- lowpass memory
def test_lowpass_memory_filters_the_error():
    n = 20
    mem = gradcomp.create("lowpass:beta=0.25", "memory")
    ctx = gradcomp.compressors.base.Ctx(NP, "w", (n,), "float32", n, 0, 0, 0, 1)
    g = np.arange(n, dtype=np.float32)
    st = mem.init_state(g, ctx)
    st = {"residual": np.full(n, 2.0, np.float32)}
    x = mem.compensate(g, st, ctx)
    np.testing.assert_array_equal(x, g + 2)
    local = np.where(np.arange(n) % 2 == 0, x, 0).astype(np.float32)
    new = mem.update(g, x, local, None, st, ctx)["residual"]
    np.testing.assert_allclose(new, 0.75 * 2.0 + 0.25 * (x - local))
    plain = gradcomp.create("lowpass:beta=1", "memory").update(g, x, local, None, st, ctx)["residual"]
    np.testing.assert_array_equal(plain, x - local)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("spec", ["scalecom:ratio=0.1", "gtopk:ratio=0.1", "aggtopk:ratio=0.1,chunk=8",
                                  "scalecom:ratio=0.1,values=int8,indices=compact",
                                  "scalecom:ratio=0.1,values=fp16,indices=compact"])
def test_framework_backends_match_numpy_at_four_ranks(backend, spec):
    if not backend_available(backend):
        pytest.skip(f"{backend} not installed")

    def fn(comm, be):
        sync = gradcomp.GradientSync(spec, comm=comm)
        rng = np.random.default_rng(comm.rank)
        outs = [f64(sync.step({"w": make_array(rng.standard_normal(300), be, "float32")})["w"]) for _ in range(3)]
        return outs, sync.stats()

    ref, got = world(4, lambda c: fn(c, "numpy")), world(4, lambda c: fn(c, backend))
    for (ra, rs), (ga, gs) in zip(ref, got):
        for a, b in zip(ra, ga):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        assert rs == gs


def test_scalecom_with_several_leaders_sends_every_leaders_top_entries_once():
    """leaders=4 at 4 ranks, k=8: slots of 2; rank r's top-2 are {r, 20} (20 is hot everywhere)."""
    n, k, size = 40, 8, 4

    def fn(comm):
        sync = gradcomp.GradientSync(f"scalecom:ratio={k / n},leaders=4", comm=comm, memory="none")
        x = np.random.default_rng(comm.rank).standard_normal(n).astype(np.float32) * 0.01
        x[comm.rank], x[20] = 5.0, 9.0
        out = f64(sync.step({"w": x})["w"])
        return f64(x), out, sync.stats()

    res = world(size, fn)
    want_idx = [0, 1, 2, 3, 20]                              # duplicates of 20 removed: U = 5 <= k
    want = np.zeros(n)
    want[want_idx] = np.sum([x[want_idx] for x, _, _ in res], axis=0) / size
    for _, avg, st in res:
        np.testing.assert_allclose(avg, want, rtol=1e-6, atol=1e-7)
        assert st["union"] == 5 and st["union_kept"] == k


# --------------------------------------------------------------------------- gtopk tree merge
def _reference_tree(xs, n, k):
    """The paper's tree on plain numpy: ranks m.. folded into 0.., then pairwise merges (group sets)."""
    from gradcomp.compressors.gtopk import merge_sets
    p = len(xs)
    m = 1 << (p.bit_length() - 1)
    cur = []
    for x in xs:
        i = np.sort(np.argsort(-np.abs(x), kind="stable")[:k]).astype(np.int64)
        cur.append((x[i], i))
    for q in range(m, p):
        cur[q - m] = merge_sets(NP, n, k, cur[q - m], cur[q])
    g, step = cur[:m], 1
    while step < m:
        g = [merge_sets(NP, n, k, g[q], g[q ^ step]) for q in range(m)]
        step *= 2
    return g[0]


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_gtopk_tree_merge_is_the_papers_tree_and_loses_nothing(size):
    """Every rank gets the tree's k entries / P; what did not survive the merges stays in the residual
    (sum of the ranks' inputs = P * average + sum of residuals, also for ranks folded in at P = 3, 5)."""
    n, k = 120, 6
    xs = [np.random.default_rng(r).standard_normal(n).astype(np.float32) for r in range(size)]
    for x in xs:
        x[[3, 50]] += 4.0                                  # hot on every rank: must win

    def fn(comm):
        sync = gradcomp.GradientSync(f"gtopk:ratio={k / n}", comm=comm, memory="residual")
        return f64(sync.step({"w": xs[comm.rank].copy()})["w"]), f64(sync.residual("w")), sync.stats()

    res = world(size, fn)
    v, i = _reference_tree(xs, n, k)
    want = np.zeros(n)
    want[i] = v / size
    assert {3, 50} <= set(i.tolist())
    for avg, _, st in res:
        np.testing.assert_allclose(avg, want, rtol=1e-6, atol=1e-8)
        assert np.count_nonzero(avg) == k and st["union"] == k and st["union_k"] == 1.0
    np.testing.assert_allclose(np.sum([f64(x) for x in xs], 0) - np.sum([r for _, r, _ in res], 0), size * want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_gtopk_tree_traffic_matches_the_bytes_counted_at_the_transport(native):
    """8 ranks: 3 levels of k (value, index) pairs each way (native point-to-point); without it each
    level is an allgather and every rank receives the 7 others' messages. Same result either way."""
    n, k = 400, 4

    def fn(comm):
        rec = RecordingComm(comm, native_sendrecv=native)
        sync = gradcomp.GradientSync(f"gtopk:ratio={k / n}", comm=rec)
        rng = np.random.default_rng(comm.rank)
        outs = [f64(sync.step({"w": rng.standard_normal(n).astype(np.float32),
                               "v": rng.standard_normal(n // 2).astype(np.float32)})["w"]) for _ in range(2)]
        return outs, sync.stats(), rec.step_traffic()

    res = world(8, fn)
    pair = 2 * k * 8 + 2 * (k // 2) * 8                 # two tensors per message, 8 bytes per pair, 2 steps
    for outs, st, seen in res:
        np.testing.assert_array_equal(outs[1], res[0][0][1])
        assert st["bytes_sent"] == pair
        if native:
            assert st["wire_sent"] == st["wire_recv"] == 3 * pair == seen["wire_sent"] == seen["recv"]
        else:
            assert st["wire_sent"] == st["wire_recv"] == 3 * 7 * pair == seen["wire_sent"] == seen["recv"]


def test_gtopk_tree_and_fallback_give_identical_results():
    n, k = 90, 5

    def fn(comm, native):
        sync = gradcomp.GradientSync(f"gtopk:ratio={k / n}", comm=RecordingComm(comm, native_sendrecv=native))
        rng = np.random.default_rng(comm.rank)
        return [f64(sync.step({"w": rng.standard_normal(n).astype(np.float32)})["w"]) for _ in range(3)]

    for a, b in zip(world(5, lambda c: fn(c, True)), world(5, lambda c: fn(c, False))):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_sendrecv_errors_name_the_problem():
    def fn(comm):
        x = np.arange(3, dtype=np.float32)
        with pytest.raises(ValueError, match="dest=5"):
            comm.sendrecv(x, dest=5, source=None, name="bad")
        with pytest.raises(ValueError, match="dest=.*another rank"):
            comm.sendrecv(x, dest=comm.rank, name="self")
        got = comm.sendrecv(x + comm.rank, dest=1 - comm.rank, source=1 - comm.rank, name="ok").wait()
        return got

    res = world(2, fn)
    np.testing.assert_array_equal(res[0], np.arange(3) + 1)
    np.testing.assert_array_equal(res[1], np.arange(3))
    with pytest.raises(ValueError, match="expected 4 elements from rank 0, which sent 3"):
        world(2, lambda c: c.sendrecv(np.zeros(3 if c.rank == 0 else 4, np.float32), dest=1 - c.rank,
                                      source=1 - c.rank, name="size").wait())


def test_cluster_labs_byte_counter_keeps_gtopk_on_point_to_point():
    """benchmarks/lab_cluster.py wraps the transport to count bytes; the wrapper must pass sendrecv
    through (else the tree silently runs, and is counted, as allgathers)."""
    from benchmarks.lab_cluster import _Counting
    n, k = 200, 5

    def fn(comm):
        counted = _Counting(comm)
        sync = gradcomp.GradientSync(f"gtopk:ratio={k / n}", comm=counted)
        sync.step({"w": np.random.default_rng(comm.rank).standard_normal(n).astype(np.float32)})
        return counted.native_sendrecv, sync.stats()["wire_sent"], counted.nbytes

    for native, wire, handed in world(4, fn):
        assert native and wire == 2 * k * 8 and handed >= wire
