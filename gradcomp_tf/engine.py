"""The TensorFlow gradient exchange: GradientSync driven from eager code or from inside tf.function.

What runs where, for one step of named gradients:

  eager (no tf.function)   GradientSync.step on the eager TF tensors: memory/compression/decode are
                           TF ops on the tensors' device; HostComm hands only the fused payloads to
                           the transport (one allreduce per payload dtype, or one allgather, plus a
                           1-float non-finite flag). Every compressor, memory and sync policy.
                           A periodic policy's local step (no averaging) still sends that flag:
                           NaN/Inf on any rank raises NonFiniteGradientError on every rank before
                           the optimizer step.
  tf.function, "graph"     compression, decode and error feedback are traced as graph ops (residuals
                           live in tf.Variables, the step number is a graph input so shared random
                           draws change every step); every collective of a round is fused into ONE
                           tf.numpy_function that calls the transport with host arrays (see
                           gradcomp_tf/graph_sync.py). Used whenever the step traces: checked once
                           per variable list by a trace into a scratch graph, with the default
                           `allreduce` sync policy.
  tf.function, "island"    everything else (compressors that need the step or data as Python numbers,
                           variable-size payloads, classes with `graph_safe = False`, sync policies
                           that decide per step): the whole step runs inside one tf.py_function,
                           i.e. eagerly, still as TF ops on the tensors' device, with the same fused
                           transport calls. `Exchange.path` says which one was taken and why.
  XLA (jit_compile=True)   not possible: XLA cannot compile a host call. A clear error says to use
                           jit_compile=False or to keep the exchange outside the compiled function.
"""
from __future__ import annotations

import tensorflow as tf

import gradcomp
from gradcomp import registry
from gradcomp.config import resolve_memory
from gradcomp.finite import agree_nonfinite
from gradcomp.params import check_seed
from gradcomp.pipeline import GradientSync, NonFiniteGradientError
from gradcomp.state import restore, snapshot
from gradcomp.sync.base import SyncPolicy
from gradcomp_tf import runtime

XLA_MESSAGE = (
    "gradcomp_tf: the gradient exchange was traced inside an XLA-compiled function "
    "(Keras model.compile(jit_compile=True) or tf.function(jit_compile=True)). XLA cannot compile the host "
    "call that moves payloads between ranks. Fix: model.compile(..., jit_compile=False) (Keras' default "
    "'auto' picks True when a GPU is visible and False on CPU-only machines), or in a custom loop compile "
    "only the forward/backward "
    "pass with tf.function(jit_compile=True) and call the exchange (DistributedGradientTape / "
    "optimizer.apply_gradients) from a non-XLA tf.function or eagerly.")


def in_xla_context() -> bool:
    """True while tracing inside a jit_compile=True function (at any nesting level)."""
    if tf.executing_eagerly():
        return False
    from tensorflow.python.ops import control_flow_util
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def variable_names(variables) -> list[str]:
    """Names for a list of variables: "{index}:{short name}" ("0:kernel", "1:bias", ...).

    Keras' layer paths carry per-process counters ("dense_7/kernel") that differ between a run and
    its restart, or between ranks that built different helper models; the position in the list and
    the short name do not. Shapes are compared by the start-up check anyway.
    """
    names = []
    for i, v in enumerate(variables):
        n = str(getattr(v, "name", None) or "var").split("/")[-1]
        names.append(f"{i}:{n[:-2] if n.endswith(':0') else n}")
    return names


def dense(g):
    """IndexedSlices (embedding gradients) -> dense tensor; None stays None."""
    if isinstance(g, tf.IndexedSlices):
        return tf.convert_to_tensor(g)
    return g


def _overrides(policy, method: str) -> bool:
    return getattr(type(policy), method) is not getattr(SyncPolicy, method)


class Exchange:
    """One rank's compressed gradient averaging for a fixed list of TF variables."""

    def __init__(self, compressor=None, memory=None, backend=None, sync=None, seed=None):
        self.comm = runtime.resolve(backend)
        comp, mem, pol, sd = self._configure(compressor, memory, sync, seed)
        self.sync = GradientSync(comp, mem, comm=self.comm, seed=sd)
        self.policy = pol.bind(self.comm, None, sd)
        self.step = 0                  # optimizer steps taken (the policy's step counter)
        self.view = None               # ParamAccess, set by the optimizer
        self.active_vars = None        # the optimizer's variables during one apply()
        self._checked = False
        self._graph = None
        self.path = ("eager", "not traced")   # how the last traced step runs, and why

    @staticmethod
    def _configure(compressor, memory, sync, seed):
        env = None
        if compressor is None or memory is None or sync is None or seed is None:
            import os
            environ = dict(os.environ)
            if compressor is not None:    # memory "auto" must follow the compressor actually used
                spec = compressor if isinstance(compressor, str) else compressor.spec()
                environ["GRADCOMP_COMPRESSOR"] = spec
            env = gradcomp.from_env(environ)
        comp = registry.create(compressor, "compressor") if compressor is not None else env.compressor
        mem = resolve_memory(memory, comp) if memory is not None else env.memory
        pol = registry.create(sync, "sync") if sync is not None else env.sync
        sd = check_seed(seed) if seed is not None else env.seed
        return comp, mem, pol, sd

    # ------------------------------------------------------------------ configuration
    def describe(self) -> dict:
        return {"compressor": self.sync.compressor.spec(), "memory": self.sync.memory.spec(),
                "sync": self.policy.spec(), "seed": self.sync.seed}

    def check(self, names, shapes, extra=None):
        """The start-up fingerprint check (ConfigMismatchError on every rank on a difference)."""
        if self._checked:
            return
        ex = {"framework": "tensorflow", "sync": self.policy.spec()}
        ex.update(extra or {})
        self.sync.check({n: list(s) for n, s in zip(names, shapes)}, ex)
        self._checked = True

    def graph_blocker(self):
        """Why the traced path is excluded up front (None if it may be tried)."""
        comp, mem = self.sync.compressor, self.sync.memory
        if getattr(comp, "graph_safe", True) is False or getattr(mem, "graph_safe", True) is False:
            return "the compressor or memory is marked graph_safe = False"
        if comp.variable_size:
            return "payload sizes vary per step"
        if _overrides(self.policy, "sync_gradients") or _overrides(self.policy, "before_step"):
            return f"sync policy {self.policy.spec()!r} decides per step on the host"
        return None

    # ------------------------------------------------------------------ the step
    @tf.autograph.experimental.do_not_convert
    def average(self, grads, variables, mode: str = "auto", api: str = "Exchange.average") -> list:
        """Average the gradients of `variables` (None entries stay None); the first call checks the config.

        The way to combine the exchange with XLA: compute the gradients in a tf.function(jit_compile=True)
        and call this from the surrounding non-XLA tf.function (or eagerly).
        """
        grads = [dense(g) for g in grads]
        names = variable_names(variables)
        live = [i for i, g in enumerate(grads) if g is not None]
        self.check([names[i] for i in live], [tuple(grads[i].shape) for i in live], {"api": api})
        out = self([grads[i] for i in live], [names[i] for i in live], mode=mode)
        for i, o in zip(live, out):
            grads[i] = o
        return grads

    @tf.autograph.experimental.do_not_convert
    def __call__(self, grads: list, names: list, mode: str = "auto") -> list:
        """Average `grads` (dense TF tensors, one per name) across ranks; eager or traced."""
        if len(grads) != len(names):
            raise ValueError(f"got {len(grads)} gradients for {len(names)} names")
        if not grads:
            return []
        if tf.executing_eagerly():
            return self.eager(grads, names)
        if in_xla_context():
            raise RuntimeError(XLA_MESSAGE)
        if mode not in ("auto", "graph", "island"):
            raise ValueError(f"mode must be auto, graph or island, got {mode!r}")
        if mode == "island":
            self.path = ("island", "requested")
            return self.island(grads, names)
        blocker = self.graph_blocker()
        if blocker is not None and mode == "graph":
            raise ValueError(f"mode='graph' is not possible: {blocker}")
        if blocker is None:
            from gradcomp_tf.graph_sync import GraphRunner
            if self._graph is None:
                self._graph = GraphRunner(self)
            if mode == "graph" or self._graph.viable(grads, names):
                self.path = ("graph", "traced")
                return self._graph(grads, names)
            blocker = self._graph.why_not
        self.path = ("island", blocker)
        return self.island(grads, names)

    def eager(self, grads, names):
        step = self.step
        if self.policy.sync_gradients(step):
            out = self.sync.step(dict(zip(names, grads)))
            grads = [out[n] for n in names]
            if self._graph is not None:
                self._graph.push_state()
        elif self.sync.check_finite:        # a local step: still agree on NaN/Inf before anything changes
            bad = agree_nonfinite(self.comm, grads, name="nonfinite.local")
            if bad:
                raise NonFiniteGradientError(
                    f"step {step}: {bad} non-finite gradient value(s) across ranks on a local step of sync "
                    f"policy {self.policy.spec()!r}; skipped on every rank, no parameter or optimizer state "
                    "was changed. Lower the learning rate, scale the loss, or skip this batch.")
        if self.view is not None:
            self.policy.before_step(step, self.view)
        self.step += 1
        return grads

    def island(self, grads, names):
        def host(*gs):
            return self.eager(list(gs), names)
        outs = tf.py_function(host, list(grads), Tout=[g.dtype for g in grads], name="gradcomp_exchange")
        for o, g in zip(outs, grads):
            o.set_shape(g.shape)
        return list(outs)

    def wants_after_step(self) -> bool:
        return _overrides(self.policy, "after_step")

    @tf.autograph.experimental.do_not_convert
    def after_step(self, variables):
        """Run the policy's after_step once the optimizer has updated `variables` (eager or traced)."""
        if not self.wants_after_step() or self.view is None:
            return None
        if tf.executing_eagerly():
            self.policy.after_step(self.step - 1, self.view)
            return None
        reads = [tf.identity(v.value if hasattr(v, "value") and not isinstance(v, tf.Variable) else v)
                 for v in variables]          # ordered after the updates by automatic control deps

        def host(*_):
            self.policy.after_step(self.step - 1, self.view)
            return tf.constant(0, tf.int32)
        return tf.py_function(host, reads, Tout=tf.int32, name="gradcomp_after_step")

    # ------------------------------------------------------------------ bookkeeping
    def stats(self) -> dict:
        """GradientSync's stats, plus `policy` (the sync policy's counters and bytes_sent: parameter
        averaging of localsgd & co.) and bytes_sent_total (both together)."""
        out = self.sync.stats()
        pol = self.policy.stats()
        out["policy"] = pol
        out["bytes_sent_total"] = out.get("bytes_sent", 0) + pol.get("bytes_sent", 0)
        return out

    def finalize(self) -> bool:
        """End of training, on every rank (eager): if the sync policy left the ranks' parameters apart
        (local SGD whose run did not end on a sync step), synchronize them now. True if it exchanged."""
        if self.view is None:
            return False
        return bool(self.policy.finalize(self.view))

    def state_dict(self) -> dict:
        """GradientSync state (arrays as numpy), the policy's state and the step counter."""
        sd = self.sync.state_dict()
        for key in ("memory_state", "compressor_state"):
            sd[key] = {n: {k: _np(v) for k, v in st.items()} for n, st in sd[key].items()}
        return {"sync": sd, "policy": self.policy.state_dict(), "step": self.step}

    def replicated_state_dict(self) -> dict:
        """Only the state identical on every rank (gradcomp/state.py): step counters, shared
        compressor/memory state (PowerSGD's Q, GMC's global momentum), the policy's anchor."""
        sd = self.sync.replicated_state_dict()
        for key in ("memory_state", "compressor_state"):
            sd[key] = {n: {k: _np(v) for k, v in st.items()} for n, st in sd[key].items()}
        return {"sync": sd, "policy": self.policy.replicated_state_dict(), "step": self.step,
                "replicated_only": True}

    def load_replicated_state_dict(self, sd: dict):
        """Adopt a peer's replicated_state_dict(); this rank's residuals restart at zero. All or nothing."""
        if not isinstance(sd, dict) or not sd.get("replicated_only"):
            raise ValueError("not an Exchange.replicated_state_dict()")
        self._load_all_or_nothing(sd, self.sync.load_replicated_state_dict, self.policy.load_replicated_state_dict)

    def load_state_dict(self, sd: dict):
        """Restore; all or nothing: on any error (another configuration or sync policy) the state
        is left exactly as it was."""
        self._load_all_or_nothing(sd, self.sync.load_state_dict, self.policy.load_state_dict)

    def _load_all_or_nothing(self, sd: dict, load_sync, load_policy):
        snap, step = snapshot(self.sync, self.policy), self.step
        try:
            load_sync(sd["sync"])
            load_policy(sd.get("policy", {}))
            self.step = int(sd.get("step", 0))
        except BaseException:
            restore(snap)
            self.step = step
            raise
        if self._graph is not None:
            self._graph.push_state()


def _np(v):
    if v is None or isinstance(v, (int, float, bool)):
        return v
    if hasattr(v, "numpy"):
        return v.numpy()
    return v
