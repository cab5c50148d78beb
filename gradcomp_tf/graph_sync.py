"""GradientSync traced into a tf.function: compression as graph ops, one host call per round.

At trace time GradientSync's own code builds the graph of memory.compensate -> compress -> decode ->
memory.update on the symbolic gradients; nothing of it runs on the host. What differs from eager:

  * step: GradientSync's step counter is a graph input (read from the host each execution), so
    `ctx.key()` derives the shared random key per step (Backend.traced_key) and randomized
    compressors (randomk, qsgd, natural, ...) draw fresh indices every step;
  * state: each tensor's error-feedback/compressor state lives in tf.Variables (created once, outside
    the function, from GradientSync's state or its `init_state`); the traced update assigns them after
    the collectives returned, so a failed step changes nothing;
  * transport: a lazy communicator records every collective GradientSync issues in a round; the first
    `wait()` turns them into ONE `tf.numpy_function` (host arrays in, host arrays out) that starts
    them all on the real transport and waits. A 1-float non-finite counter rides in the same call;
    if any rank saw NaN/Inf every rank raises NonFiniteGradientError there;
  * outputs: a second small host call (no collective) checks the decoded averages: finite inputs that
    gave NaN/Inf (fp16 overflow) raise PayloadOverflowError on every rank before any state is assigned;
  * bookkeeping: the step counter and byte counts are advanced by that second call, per execution.

A compressor or memory whose Python code needs the step or data values as Python numbers (DGC's
warm-up schedule, rbgs/randproj block offsets, data-dependent payload sizes, non-array state) cannot
be traced; `viable()` finds out once by tracing into a scratch graph that never runs, and the
Exchange then uses the eager "island" path for it.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from gradcomp.backend import get_backend
from gradcomp.comm.base import Communicator, Handle
from gradcomp.compressors.base import Ctx
from gradcomp.pipeline import NonFiniteGradientError, PayloadOverflowError, overflow_message


class _LazyHandle(Handle):
    def __init__(self, comm):
        self.comm, self.value, self.ready = comm, None, False

    def wait(self):
        if not self.ready:
            self.comm.flush()
        return self.value


class _LazyComm(Communicator):
    """Records collectives while tracing; `flush()` emits one numpy_function for all of them."""

    engine = "tf-graph"

    def __init__(self, host, on_first):
        self.host, self.on_first = host, on_first
        self.rank, self.size = host.rank, host.size
        self.local_rank = getattr(host, "local_rank", 0)
        self.pending, self.flushes = [], 0

    def _add(self, kind, x, name):
        h = _LazyHandle(self)
        self.pending.append((kind, tf.reshape(x, [-1]), name, h))
        return h

    def allreduce(self, x, *, name=""):
        return self._add("allreduce", x, name)

    def allgather(self, x, *, name=""):
        return self._add("allgather", x, name)

    def broadcast(self, x, *, root=0, name=""):
        raise RuntimeError("broadcast is not used by GradientSync inside tf.function")

    def flush(self):
        batch, self.pending = self.pending, []
        if not batch:
            return
        first, self.flushes = self.flushes == 0, self.flushes + 1
        kinds = [k for k, *_ in batch]
        names = [n for _, _, n, _ in batch]
        host, size, on_first = self.host, self.size, (self.on_first if first else None)

        def call(*arrays):
            hs = [host.allreduce(a, name=n) if k == "allreduce" else host.allgather(a, name=n)
                  for k, a, n in zip(kinds, arrays, names)]
            outs = []
            for k, a, n, h in zip(kinds, arrays, names, hs):
                r = h.wait()
                if k == "allgather":
                    if any(np.asarray(p).size != a.size for p in r):
                        raise RuntimeError(f"gradcomp_tf: allgather {n!r} got payloads of different sizes "
                                           "across ranks inside tf.function; this compressor needs the eager path")
                    r = np.concatenate([np.asarray(p).reshape(-1) for p in r])
                outs.append(np.asarray(r).reshape(-1).astype(a.dtype, copy=False))
            if on_first is not None:
                on_first(outs)
            return outs

        xs = [x for _, x, _, _ in batch]
        res = tf.numpy_function(call, xs, [x.dtype for x in xs], stateful=True, name="gradcomp_transport")
        for (k, x, _, h), r in zip(batch, res):
            n = int(x.shape[0])
            if k == "allreduce":
                r.set_shape([n])
                h.value = r
            else:
                r.set_shape([n * size])
                h.value = tf.split(r, size) if size > 1 else [r]
            h.ready = True


class GraphRunner:
    """Traces one Exchange's GradientSync step with state in tf.Variables."""

    def __init__(self, exchange):
        self.x = exchange
        self.vars: dict[str, tuple[dict, dict]] = {}   # name -> (memory vars, compressor vars)
        self._viable: dict[tuple, bool] = {}
        self.why_not = None                              # why the last viability check failed

    def viable(self, grads, names) -> bool:
        """Can this step be traced? Decided once per name list by a trace into a scratch graph."""
        key = tuple(names)
        if key not in self._viable:
            try:
                probe = tf.function(lambda *gs: self(list(gs), names), autograph=False)
                probe.get_concrete_function(*[tf.TensorSpec(g.shape, g.dtype) for g in grads])
                self._viable[key] = True
            except Exception as e:  # noqa: BLE001 - any trace failure means: run it eagerly
                self.why_not = f"{type(e).__name__}: {e}"
                self._viable[key] = False
        return self._viable[key]

    # ------------------------------------------------------------------ state variables
    def _ensure(self, name, g):
        gs = self.x.sync
        if name in self.vars:
            return
        with tf.init_scope():
            shape = tuple(int(d) for d in g.shape)
            n = int(np.prod(shape)) if shape else 1
            dt = "float64" if g.dtype == tf.float64 else "float32"
            flat = tf.zeros([n], dt)
            b = get_backend(flat)
            ctx = Ctx(b, name, shape, g.dtype.name, n, gs._step, gs.seed, gs.comm.rank, gs.comm.size)
            mem = gs._mem.get(name)
            cst = gs._cst.get(name)
            mem = gs.memory.init_state(flat, ctx) if mem is None else mem
            cst = gs.compressor_for(n).init_state(flat, ctx) if cst is None else cst
            mv = {k: self._var(name, "mem", k, v) for k, v in mem.items()}
            cv = {k: self._var(name, "cst", k, v) for k, v in cst.items()}
        self.vars[name] = (mv, cv)
        gs._shapes.setdefault(name, shape)
        gs._mem[name], gs._cst[name] = dict(mv), dict(cv)

    @staticmethod
    def _var(name, kind, key, v):
        if v is None or isinstance(v, (int, float, bool)):
            raise TypeError(f"state {kind}.{key} of {name!r} is not an array; this compressor cannot run "
                            "traced (mark it graph_safe = False)")
        val = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
        safe = "".join(c if c.isalnum() else "_" for c in f"gradcomp_{kind}_{key}_{name}")
        return tf.Variable(val, trainable=False, name=safe[:200])

    def push_state(self):
        """After an eager step or a restore: copy GradientSync's state dicts into the variables."""
        gs = self.x.sync
        for name, (mv, cv) in self.vars.items():
            for vars_, key in ((mv, "_mem"), (cv, "_cst")):
                st = getattr(gs, key).get(name, {})
                for k, var in vars_.items():
                    v = st.get(k)
                    if v is not None and v is not var:
                        var.assign(tf.convert_to_tensor(v.numpy() if hasattr(v, "numpy") else v, var.dtype))
                getattr(gs, key)[name] = dict(vars_)

    # ------------------------------------------------------------------ the traced step
    @tf.autograph.experimental.do_not_convert
    def __call__(self, grads, names):
        gs = self.x.sync
        for n, g in zip(names, grads):
            self._ensure(n, g)
        saved = (gs._step, dict(gs._stats), gs.comm, gs.check_finite, gs._checked)
        record = {}
        step = tf.numpy_function(lambda: np.int64(gs._step), [], tf.int64, stateful=True,
                                 name="gradcomp_step")
        step.set_shape([])

        def on_first(outs):                 # host side, once per execution
            if outs[0][0] > 0:
                raise NonFiniteGradientError(
                    f"step {gs._step}: {int(outs[0][0])} non-finite gradient value(s) across ranks; no state "
                    "was changed. Lower the learning rate, use loss scaling, or skip this batch.")

        def commit(bad_out):                # host side, after decoding: the outputs' check, then bookkeeping
            if bad_out > 0:                 # identical on every rank (collective results are)
                raise PayloadOverflowError(overflow_message(gs._step, int(bad_out), gs.compressor.spec(),
                                                            gs.comm.size))
            gs._step += 1
            self.x.step += 1                # the sync policy's step counter (after_step reads it)
            for k, d in record["stats"].items():
                gs._stats[k] = gs._stats.get(k, 0) + d
            return np.int32(0)

        lazy = _LazyComm(gs.comm, on_first)
        b = get_backend(grads[0])
        bad = tf.add_n([tf.cast(b.count_nonfinite(g), tf.float32) for g in grads])
        lazy.allreduce(tf.reshape(bad, [1]), name="nonfinite")
        for n in names:
            mv, cv = self.vars[n]
            gs._mem[n] = {k: tf.identity(v) for k, v in mv.items()}
            gs._cst[n] = {k: tf.identity(v) for k, v in cv.items()}
        gs.comm, gs.check_finite, gs._checked, gs._step = lazy, False, True, step
        try:
            out = gs.step(dict(zip(names, grads)))
            new = {n: (gs._mem[n], gs._cst[n]) for n in names}
            record["stats"] = {k: v - saved[1].get(k, 0) for k, v in gs._stats.items()}
        finally:
            gs._step, gs._stats, gs.comm, gs.check_finite, gs._checked = saved
            for n in names:
                gs._mem[n], gs._cst[n] = dict(self.vars[n][0]), dict(self.vars[n][1])
        outs = [out[n] for n in names]
        bad_out = tf.add_n([tf.cast(b.count_nonfinite(o), tf.float32) for o in outs])
        ok = tf.numpy_function(commit, [bad_out], tf.int32, stateful=True, name="gradcomp_commit")
        assigns = []
        with tf.control_dependencies(outs + [ok]):
            for n in names:
                for vars_, st in zip(self.vars[n], new[n]):
                    for k, var in vars_.items():
                        assigns.append(var.assign(tf.cast(st[k], var.dtype)))
        with tf.control_dependencies(assigns):
            return [tf.identity(o) for o in outs]
