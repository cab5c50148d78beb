"""`dense_below=N`: tensors with fewer than N entries skip the compressor and travel in one dense
allreduce per bucket, with the configured memory (gradcomp/pipeline.py compressor_for)."""
from __future__ import annotations

import numpy as np
import pytest

import gradcomp
from conftest import RecordingComm

SHAPES = {"w1": (40, 30), "b1": (30,), "w2": (30, 20), "b2": (20,), "scale": (1,)}
SMALL = ("b1", "b2", "scale")


def world(size, fn):
    return gradcomp.LocalWorld(size, timeout=60).run(fn)


def grads(rank, step):
    rng = np.random.default_rng([3, rank, step])
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("spec", ["topk:ratio=0.05", "gtopk:ratio=0.05", "powersgd:rank=2", "efsignsgd",
                                  "qsgd", "threshold:threshold=1.5", "scalecom:ratio=0.05", "dgc:ratio=0.05"])
def test_small_tensors_are_averaged_exactly_in_one_allreduce_and_the_rest_is_compressed(spec):
    def fn(comm):
        rec = RecordingComm(comm)
        sync = gradcomp.GradientSync(spec + ("," if ":" in spec else ":") + "dense_below=100", comm=rec, seed=2)
        plain = gradcomp.GradientSync(spec, comm=comm, seed=2)
        outs = []
        for t in range(3):
            g = grads(comm.rank, t)
            outs.append((g, sync.step(dict(g)), plain.step(dict(g))))
        return outs, rec.log

    res = world(2, fn)
    for t in range(3):
        for r in range(2):
            _, dense, plain = res[r][0][t]
            for k in SMALL:
                mean = (res[0][0][t][0][k] + res[1][0][t][0][k]) / 2
                if spec.startswith("dgc"):      # its memory's momentum, as dgc's own dense_1d path gives
                    np.testing.assert_allclose(dense[k], plain[k], rtol=1e-6, atol=1e-7)
                else:
                    np.testing.assert_allclose(dense[k], mean, rtol=1e-6, atol=1e-7)
            for k in ("w1", "w2"):          # the large tensors: what the compressor alone gives
                np.testing.assert_array_equal(dense[k], plain[k])
    log = res[0][1]
    small_bytes = 4 * sum(int(np.prod(SHAPES[k])) for k in SMALL)
    dense_ops = [(op, nb) for op, name, nb in log if ".dense." in name]
    assert dense_ops == [("allreduce", small_bytes)] * 3     # one fused allreduce a step, fp32 sums


def test_the_dense_tensors_keep_the_memory_and_the_spec_round_trips():
    c = gradcomp.create("topk:ratio=0.1,dense_below=64,warmup=3")
    assert c.dense_below == 64 and c.spec().endswith(",dense_below=64,warmup=3")
    assert gradcomp.create(c.spec()).spec() == c.spec()
    assert gradcomp.create("topk:dense_below=0").spec() == gradcomp.create("topk").spec()
    assert gradcomp.create("topk").dense_below == 0
    for bad in ("topk:dense_below=-1", "topk:dense_below=2.5", "topk:dense_below=x"):
        with pytest.raises(ValueError, match="dense_below"):
            gradcomp.create(bad)
    # the residual of a dense tensor stays zero (nothing left unsent), of a compressed one it does not
    sync = gradcomp.GradientSync("topk:ratio=0.05,dense_below=100")
    sync.step(grads(0, 0))
    assert not np.any(sync.residual("b1")) and np.any(sync.residual("w1"))


def test_dgc_memory_keeps_momentum_on_dense_routed_tensors():
    """A dense-routed tensor under the dgc memory is momentum SGD (momentum not masked by sending)."""
    g = {"b": np.ones(10, np.float32), "w": np.ones(1000, np.float32)}
    sync = gradcomp.GradientSync("topk:ratio=0.01,dense_below=100", memory="dgc:momentum=0.9")
    outs = [sync.step(dict(g))["b"][0] for _ in range(3)]
    np.testing.assert_allclose(outs, [1.0, 1.9, 2.71], rtol=1e-6)


def test_a_checkpoint_with_another_dense_below_is_refused():
    a = gradcomp.GradientSync("powersgd:rank=1,dense_below=100")
    a.step(grads(0, 0))
    b = gradcomp.GradientSync("powersgd:rank=1")
    with pytest.raises(ValueError, match="dense_below=100"):
        b.load_state_dict(a.state_dict())
    c = gradcomp.GradientSync("powersgd:rank=1,dense_below=100")
    c.load_state_dict(a.state_dict())
    g = grads(0, 1)
    out_a, out_c = a.step(dict(g)), c.step(dict(g))
    for k in SHAPES:
        np.testing.assert_array_equal(out_a[k], out_c[k])


def test_torch_fused_bucket_with_dense_tensors_matches_per_tensor():
    torch = pytest.importorskip("torch")
    g = {k: torch.from_numpy(v) for k, v in grads(0, 0).items()}
    outs = []
    for fuse in (True, False):
        sync = gradcomp.GradientSync("randomk:ratio=0.1,dense_below=100", seed=4, fuse=fuse)
        outs.append(sync.step(dict(g)))
    for k in SMALL:
        torch.testing.assert_close(outs[0][k], g[k])
    for k in SHAPES:
        assert outs[0][k].shape == g[k].shape


@pytest.mark.tf
def test_tf_traced_step_sends_small_tensors_dense():
    tf = pytest.importorskip("tensorflow")
    import gradcomp_tf as gct

    def fn(comm):
        w = tf.Variable(tf.ones([200]))
        b = tf.Variable(tf.ones([8]))
        ex = gct.Exchange("topk:ratio=0.05,dense_below=100", None, comm, sync="allreduce", seed=0)
        coef = tf.range(200, dtype=tf.float32) * float(comm.rank + 1)

        @tf.function
        def step():
            with tf.GradientTape() as t:
                loss = tf.reduce_sum(w * coef) + tf.reduce_sum(b * float(comm.rank + 1))
            return gct.DistributedGradientTape(t, exchange=ex).gradient(loss, [w, b])
        gw, gb = step()
        return gw.numpy(), gb.numpy(), ex.path

    (gw, gb, path), _ = world(2, fn)
    assert path[0] == "graph"
    np.testing.assert_allclose(gb, np.full(8, 1.5))     # (1 + 2) / 2: averaged exactly
    assert 0 < np.count_nonzero(gw) <= 20               # the 200-entry tensor: top-k (k = 10 per rank)
