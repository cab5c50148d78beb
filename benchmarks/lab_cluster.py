"""`python -m benchmarks cluster`: time per step, throughput and scaling on an emulated TCP cluster.

Driver (this process): for each network (default 1gbit and 10gbit per link) it builds the
namespace lab with `mpi/netlab/up.sh N BW DELAY` (N ranks, each in its own network namespace,
veth links to a bridge, tc tbf per direction; netem delay where the kernel has it), probes what
the links really carry (mpi/netlab/probe.py), launches the worker on every rank with a real
`mpirun` through `mpi/netlab/run.sh mpi N` (Open MPI's launch agent enters each namespace; TCP
only, no shared memory), and always removes the lab afterwards (`down.sh`, also on errors and
Ctrl-C). Without root or namespaces (or with --loopback) it falls back to `mpirun` over loopback
TCP and says so in the `network` column.

Worker (`python -m benchmarks.lab_cluster --worker ...`, one per rank): for each method it trains
the model from the same initial weights on a fixed random batch, `--warmup` steps then `--steps`
timed steps between barriers (the mean is reported; with period-4 policies, 4 steps hold exactly
one synchronization), and rank 0 appends one JSON line per method. `--rounds R` repeats the whole
method list R times, interleaved, and the driver keeps each method's fastest round: on a machine
shared with other work, a burst of load then spoils one round instead of one method. Methods:
  compute only      1 rank, no communication (the baseline of scaling efficiency)
  dense allreduce   all gradients in one fused fp32 buffer, MPI_Allreduce after backward
  horovod dense / fp16   hvd.DistributedOptimizer(compression=none/fp16), when horovod imports
  gradcomp SPEC     gradcomp_torch.DistributedOptimizer(compressor=SPEC): overlapped, bucketed
  gradcomp sync P   the same optimizer with sync policy P (no gradient exchange between syncs)
Bytes are those this rank hands to collectives in the timed steps (counted by wrapping the
communicator), per step; for gradcomp methods also GradientSync.stats() over the timed steps (see
gradcomp/traffic.py): wire_MB = per-rank wire bytes sent under the collective's ring algorithm,
recv_MB = bytes received from the other ranks, ratio = dense ring allreduce / wire_MB at this number
of ranks, U/k = union of the sparsifiers' selections over k. Throughput = N * batch / step time (samples/s over all ranks); scaling
efficiency = throughput_N / (N * throughput_1) = step_time(1 rank) / step_time(N ranks), weak
scaling with the same per-rank batch; vs_dense = step_time(dense allreduce) / step_time(method).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETLAB = os.path.join(REPO, "mpi", "netlab")
COLUMNS = ["model", "network", "ranks", "method", "step_ms", "samples_s", "efficiency", "MB_per_step",
           "wire_MB", "recv_MB", "ratio", "U/k", "vs_dense", "rounds_ms", "breakdown_ms", "status"]
# gradcomp's own time per step on rank 0 (gradcomp/timing.py), in this order
BREAKDOWN = (("compensate", "comp"), ("compress", "enc"), ("wait", "wait"), ("decode", "dec"),
             ("update", "upd"), ("python", "py"))
PHASES = ("zero", "fwd", "bwd", "opt")     # the lab's own per-step wall-time split: zero_grad, forward, backward, step
COMPRESSORS = ["none", "fp16", "topk", "randomk", "randproj", "sketch", "powersgd", "signsgd", "qsgd", "dgc",
               "gtopk", "scalecom", "aggtopk"]
POLICIES = ["localsgd:period=4", "da:period=4", "da-pipelined:period=4", "slowmo:period=4"]


# =============================================================================== methods
def method_list(smoke: bool, only: str = "") -> list[dict]:
    """The methods to run, each {'label', 'kind', ...}; unavailable ones carry a 'skip' reason."""
    from benchmarks.lab_kernels import resolve_spec
    out = [{"label": "dense allreduce (MPI fp32)", "kind": "dense"},
           {"label": "horovod dense", "kind": "horovod", "compression": "none"},
           {"label": "horovod fp16", "kind": "horovod", "compression": "fp16"}]
    names = ["none", "fp16", "topk"] if smoke and not only else COMPRESSORS   # --methods picks from all
    for name in names:
        spec, why = resolve_spec(name)
        out.append({"label": f"gradcomp {spec or name}", "kind": "gradcomp", "compressor": spec or name,
                    "sync": "allreduce", **({"skip": why} if why else {})})
    for pol in (["localsgd:period=2"] if smoke else POLICIES):
        m = {"label": f"gradcomp sync {pol}", "kind": "gradcomp", "compressor": "none", "sync": pol}
        try:
            import gradcomp
            gradcomp.create(pol, "sync")
        except Exception as e:       # noqa: BLE001 - a policy not written yet is a skipped row
            m["skip"] = f"skipped: {type(e).__name__}"
        out.append(m)
    if only:
        keep = [s.strip() for s in only.split(",") if s.strip()]
        out = [m for m in out if any(k in m["label"] for k in keep)]
    return out


class _Counting:
    """Communicator wrapper counting the bytes this rank hands to collectives."""

    def __new__(cls, inner):
        from gradcomp.backend import get_backend
        from gradcomp.comm.base import Communicator

        class Counting(Communicator):
            engine = inner.engine
            accepts_donation = getattr(inner, "accepts_donation", False)   # keep the zero-copy paths
            rank, size, local_rank = inner.rank, inner.size, getattr(inner, "local_rank", 0)
            nbytes = 0

            def _count(self, x):
                self.nbytes += get_backend(x).nbytes(x)

            def allreduce(self, x, *, name="", donate=False):
                self._count(x)
                return inner.allreduce(x, name=name, donate=True) if donate else inner.allreduce(x, name=name)

            def allreduce_group(self, xs, *, name="", donate=None):
                for x in xs:
                    self._count(x)
                return inner.allreduce_group(xs, name=name, donate=donate)

            def allgather(self, x, *, name=""):
                self._count(x)
                return inner.allgather(x, name=name)

            def broadcast(self, x, *, root=0, name=""):
                self._count(x)
                return inner.broadcast(x, root=root, name=name)

            native_sendrecv = getattr(inner, "native_sendrecv", False)     # gtopk's tree: point-to-point

            def sendrecv(self, x, *, dest=None, source=None, count=None, name=""):
                if dest is not None:
                    self._count(x)
                return inner.sendrecv(x, dest=dest, source=source, count=count, name=name)
        return Counting()


# =============================================================================== worker
def _worker(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--methods", required=True, help="JSON file with the method list")
    ap.add_argument("--out", required=True, help="JSON-lines file rank 0 appends to")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--single", action="store_true", help="one process, no MPI (compute-only baseline)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds over all methods (min is kept)")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from benchmarks import workloads
    methods = json.load(open(a.methods))
    if a.single:
        world, rank, size = None, 0, 1
    else:
        from mpi4py import MPI
        world = MPI.COMM_WORLD
        rank, size = world.rank, world.size
    gc_comm, gc_err = None, ""
    if not a.single:
        try:
            from gradcomp.comm import make_communicator
            gc_comm = make_communicator("mpi")
        except Exception as e:      # noqa: BLE001
            gc_err = f"skipped: gradcomp MPI transport unavailable ({type(e).__name__})"
    model0 = workloads.build(a.model, small=a.smoke)
    init = {k: v.clone() for k, v in model0.state_dict().items()}
    gen = torch.Generator().manual_seed(1000 + rank)
    x, y, loss_fn = workloads.example_batch(model0, batch=a.batch, image=32, seq=20, generator=gen)
    numel = workloads.num_params(model0)
    for rnd in range(a.rounds):            # interleaved: a burst of machine load hits one round, not one method
        for i, m in enumerate(methods):
            if rnd and m.get("skip"):
                continue
            t_start = time.time()
            res = {"label": m["label"], "model": a.model, "ranks": size, "round": rnd}
            try:
                res.update(_run_method(m, a, torch, workloads, init, x, y, loss_fn, world, gc_comm, gc_err, numel))
            except Exception as e:      # noqa: BLE001 - recorded, and the next method runs
                res["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            if rank == 0:
                with open(a.out, "a") as f:
                    f.write(json.dumps(res) + "\n")
                shown = f"{res['step_ms']:.0f} ms/step" if "step_ms" in res else res.get("status", "")
                if "breakdown_ms" in res:
                    shown += f" [ms/step: {res['breakdown_ms']}]"
                print(f"[cluster {a.model} {size} ranks] round {rnd + 1}/{a.rounds} {i + 1}/{len(methods)} "
                      f"{m['label']}: {shown} ({time.time() - t_start:.0f}s)", file=sys.stderr, flush=True)


def _run_method(m, a, torch, workloads, init, x, y, loss_fn, world, gc_comm, gc_err, numel):
    if m.get("skip"):
        return {"status": m["skip"]}
    model = workloads.build(a.model, small=a.smoke)
    model.load_state_dict(init)
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    barrier = world.Barrier if world is not None else (lambda: None)
    opt, counter, cleanup, fixed_bytes, status = make_optimizer(m, model, base, world, gc_comm, gc_err, numel)
    if status:
        return {"status": status}
    times = []
    phases = dict.fromkeys(PHASES, 0.0)
    gs = getattr(opt, "_gs", None)              # gradcomp's GradientSync: its phase timer
    try:
        for step in range(a.warmup + a.steps):
            if step == a.warmup:
                barrier()
                if counter is not None:
                    counter.nbytes = 0
                st0 = opt.stats() if m["kind"] == "gradcomp" else None
                if gs is not None:
                    gs.timer.reset()
                t0 = time.perf_counter()
            ts = time.perf_counter()
            opt.zero_grad()
            t1 = time.perf_counter()
            loss = loss_fn(model(x), y)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            opt.step()
            t4 = time.perf_counter()
            times.append(t4 - ts)
            if step >= a.warmup:    # where the step's wall time goes, for every method (dense included)
                for k, v in (("zero", t1 - ts), ("fwd", t2 - t1), ("bwd", t3 - t2), ("opt", t4 - t3)):
                    phases[k] += v
        if hasattr(opt, "policy") and hasattr(opt.policy, "flush"):
            opt.policy.flush()
        barrier()
        total = time.perf_counter() - t0
    finally:
        if cleanup:
            cleanup()
    sent = counter.nbytes / a.steps if counter is not None else (fixed_bytes or 0)
    timed = sorted(times[a.warmup:])
    out = {"step_ms": 1e3 * total / a.steps, "median_ms": 1e3 * timed[len(timed) // 2],
           "bytes_per_step": sent, "loss": float(loss.detach()), "status": "ok"}
    if st0 is not None:           # gradcomp's own accounting (gradcomp/traffic.py) over the timed steps
        st = opt.stats()
        d = {k: st.get(k, 0) - st0.get(k, 0) for k in ("wire_sent", "wire_dense", "bytes_recv", "union", "union_kept")}
        pol = st.get("policy", {}).get("bytes_sent", 0) - st0.get("policy", {}).get("bytes_sent", 0)
        if pol:   # a sync policy's parameter averaging: ring allreduces of what it handed to collectives
            from gradcomp.traffic import ring_allreduce
            size = world.size if world is not None else 1
            d["wire_sent"] += ring_allreduce(pol, size)
            d["bytes_recv"] += ring_allreduce(pol, size)
            if not d["wire_dense"]:   # no gradient averaging: compare with a dense fp32 allreduce every step
                d["wire_dense"] = ring_allreduce(4.0 * numel * a.steps, size)
        out.update(wire_per_step=d["wire_sent"] / a.steps, recv_per_step=d["bytes_recv"] / a.steps,
                   ratio=d["wire_dense"] / d["wire_sent"] if d["wire_sent"] else None,
                   union_k=d["union"] / d["union_kept"] if d["union_kept"] else None)
    ph = {k: 1e3 * v / a.steps for k, v in phases.items()}
    shown = [f"{k}={ph[k]:.0f}" for k in PHASES]
    if gs is not None and gs.timer.steps:
        rep = gs.timer.report()
        shown += [f"{short}={rep[k]:.0f}" for k, short in BREAKDOWN]
        # backward (its hooks start gradcomp's work) plus opt.step(), less gradcomp's own timers: hook and
        # wrapper overhead, the worker thread's handoff and anything else no timer of gradcomp's covers
        shown.append(f"outside={ph['bwd'] + ph['opt'] - sum(rep[k] for k, _ in BREAKDOWN):.0f}")
    # the barrier and the policy's final flush: the rest of step_ms
    shown.append(f"rest={out['step_ms'] - sum(ph.values()):.0f}")
    out["breakdown_ms"] = " ".join(shown)
    return out


def make_optimizer(m, model, base, world, gc_comm, gc_err, numel):
    """(optimizer, byte counter or None, cleanup or None, fixed bytes per step or None, skip status)."""
    if m["kind"] == "compute":
        return base, None, None, None, ""
    if m["kind"] == "dense":
        from mpi4py import MPI
        return _DenseAllreduce(base, list(model.parameters()), world, MPI, __import__("torch")), None, None, \
            4 * numel, ""
    if m["kind"] == "horovod":
        try:
            import horovod.torch as hvd
        except ImportError:
            return None, None, None, None, "not available (horovod does not import; see mpi/build_horovod.sh)"
        hvd.init()
        comp = hvd.Compression.fp16 if m["compression"] == "fp16" else hvd.Compression.none
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(), compression=comp)
        return opt, None, None, (2 if m["compression"] == "fp16" else 4) * numel, ""
    if gc_comm is None:
        return None, None, None, None, gc_err or "skipped: no gradcomp transport"
    try:
        from gradcomp_torch.optimizer import DistributedOptimizer
    except ImportError as e:
        return None, None, None, None, f"skipped: gradcomp_torch unavailable ({e})"
    counter = _Counting(gc_comm)
    opt = DistributedOptimizer(base, named_parameters=model.named_parameters(), compressor=m["compressor"],
                               memory=m.get("memory", "auto"), sync=m.get("sync", "allreduce"), comm=counter, seed=0)
    return opt, counter, getattr(opt, "remove_hooks", None), None, ""


class _DenseAllreduce:
    """The plain baseline: after backward, one fused fp32 MPI_Allreduce of all gradients.

    Offers synchronize() / skip_synchronize() as Horovod's optimizer does, for clipping loops."""

    def __init__(self, opt, params, world, MPI, torch):
        self.opt, self.params, self.world, self.MPI, self.torch = opt, params, world, MPI, torch
        self._skip = False

    def zero_grad(self):
        self.opt.zero_grad()

    def synchronize(self):
        torch = self.torch
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.world.Allreduce(self.MPI.IN_PLACE, flat.numpy())
        flat /= self.world.size
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()

    @contextlib.contextmanager
    def skip_synchronize(self):
        self._skip = True
        try:
            yield
        finally:
            self._skip = False

    def step(self):
        if not self._skip:
            self.synchronize()
        self.opt.step()


# =============================================================================== driver
def add_args(p):
    p.add_argument("--ranks", type=int, default=2, help="ranks (namespaces) N (default 2)")
    p.add_argument("--networks", default="", help="per-link bandwidths, comma list (default 1gbit,10gbit)")
    p.add_argument("--delay", default="2ms", help="one-way delay per link, netem (default 2ms; 0 for none)")
    p.add_argument("--models", default="", help="resnet18-c10,lstm (default both)")
    p.add_argument("--methods", default="", help="only methods whose label contains one of these (comma list)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per method (default 4; smoke 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=0, help="per-rank batch (default 2; smoke 4)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds over the methods, best kept (default 2)")
    p.add_argument("--loopback", action="store_true", help="skip namespaces: mpirun over loopback TCP")
    p.add_argument("--timeout", type=int, default=0,
                   help="seconds per launch (default 1200; smoke 120; both scaled by the machine's load); a launch "
                        "that times out is retried once with twice the time")


class NetLab:
    """Context manager: the namespace lab for one network (or the loopback fallback)."""

    def __init__(self, ranks, bw, delay, smoke, force_loopback=False):
        self.ranks, self.bw, self.delay = ranks, bw, delay
        self.env = dict(os.environ, GCNET_TAG="gcs" if smoke else "gc", GCNET_NET="10.99.1" if smoke else "10.99.0")
        self.env["GCNET_STATE"] = f"/tmp/{self.env['GCNET_TAG']}netlab"
        self.namespaces, self.reason = False, "--loopback given" if force_loopback else ""
        self.force_loopback = force_loopback

    def __enter__(self):
        if not self.force_loopback:
            why = _namespaces_unavailable()
            if why:
                self.reason = why
            else:
                r = subprocess.run(["bash", f"{NETLAB}/up.sh", str(self.ranks), self.bw, self.delay], env=self.env,
                                   capture_output=True, text=True, timeout=120)
                sys.stderr.write(r.stdout + r.stderr)
                if r.returncode == 0:
                    self.namespaces = True
                    self.delay_applied = "applied: 1" in r.stdout
                else:
                    self.reason = f"up.sh failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:120]}"
        if not self.namespaces:
            print(f"cluster: network namespaces unavailable ({self.reason}); FALLING BACK to loopback TCP "
                  "(no bandwidth shaping)", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc):
        if self.namespaces:
            subprocess.run(["bash", f"{NETLAB}/down.sh"], env=self.env, timeout=120)

    @property
    def label(self):
        if not self.namespaces:
            return "loopback TCP (unshaped)"
        d = self.delay if self.delay_applied else "no delay (netem missing)"
        return f"{self.bw}, {d}" + (f", measured {self.mbit:.0f} Mbit/s" if getattr(self, "mbit", None) else "")

    def probe(self, mb=60):
        """Measured TCP throughput rank1 -> rank0 over the shaped link, Mbit/s."""
        if not self.namespaces or self.ranks < 2:
            return None
        tag, net = self.env["GCNET_TAG"], self.env["GCNET_NET"]
        srv = subprocess.Popen(["ip", "netns", "exec", f"{tag}ns0", sys.executable, f"{NETLAB}/probe.py",
                                "server", f"{net}.1"], env=self.env)
        try:
            out = subprocess.run(["ip", "netns", "exec", f"{tag}ns1", sys.executable, f"{NETLAB}/probe.py",
                                  "client", f"{net}.1", str(mb)], env=self.env, capture_output=True, text=True,
                                 timeout=120)
            self.mbit = json.loads(out.stdout.strip().splitlines()[-1])["mbit_s"]
        except Exception:           # noqa: BLE001 - the probe is informative only
            self.mbit = None
        finally:
            try:
                srv.wait(timeout=10)
            except subprocess.TimeoutExpired:
                srv.kill()
        return self.mbit

    def launch(self, cmd, timeout):
        if self.namespaces:
            full = ["bash", f"{NETLAB}/run.sh", "mpi", str(self.ranks)] + cmd
            env = dict(self.env, GCNET_TIMEOUT=str(int(timeout)))
        else:
            if not shutil.which("mpirun"):
                raise RuntimeError("mpirun not found (install Open MPI) and no namespaces: cannot launch ranks")
            full = (["mpirun", "-np", str(self.ranks), "--oversubscribe", "--mca", "pml", "ob1", "--mca", "btl",
                     "tcp,self", "--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo"]
                    + (["--allow-run-as-root"] if os.geteuid() == 0 else []) + cmd)
            env = self.env
        proc = subprocess.Popen(full, env=env, cwd=REPO, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
        try:
            proc.wait(timeout=timeout + 30)
        except BaseException:              # timeout, Ctrl-C, SIGTERM: take the launcher's whole tree down
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            raise
        if self.namespaces and proc.returncode in (124, 137):    # run.sh's own `timeout` fired
            raise subprocess.TimeoutExpired(full, timeout)
        return proc


def _retry_once(start, timeout, what, out_path):
    """start(timeout); on a timeout, say so and run it once more with twice the time (the partial
    results file is removed first). A second timeout propagates."""
    try:
        return start(timeout)
    except subprocess.TimeoutExpired:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"cluster: {what} timed out after {timeout:.0f}s (load average {load:.1f}); the machine may be "
              f"loaded: retrying once with {2 * timeout:.0f}s", file=sys.stderr, flush=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(out_path)
        return start(2 * timeout)


def _namespaces_unavailable() -> str:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc", "mpirun"):
        if not shutil.which(tool):
            return f"{tool} not found"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return "" if r.returncode == 0 else f"ip netns list failed: {r.stderr.strip()[:80]}"


def _read_jsonl(path):
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def _best(lines) -> dict:
    """label -> the round with the lowest mean step time (an error in any round is reported)."""
    out = {}
    for g in lines:
        cur = out.get(g["label"])
        if cur is None or (g.get("status") == "ok" and (cur.get("status") != "ok" or g["step_ms"] < cur["step_ms"])):
            out[g["label"]] = dict(g, rounds_ms=(cur or {}).get("rounds_ms", []))
        if g.get("status") == "ok":
            out[g["label"]]["rounds_ms"] = out[g["label"]].get("rounds_ms", []) + [round(g["step_ms"], 1)]
    return out


def run(args) -> list[dict]:
    from benchmarks import plotting
    smoke = args.smoke
    nets = (args.networks or ("1gbit" if smoke else "1gbit,10gbit")).split(",")
    models = (args.models or ("resnet18-c10,lstm" if not smoke else "resnet18-c10")).split(",")
    steps, batch = args.steps or (2 if smoke else 4), args.batch or (4 if smoke else 2)
    from gradcomp.comm.launch import load_factor, scaled_timeout
    timeout = args.timeout or scaled_timeout(120 if smoke else 1200)   # a loaded machine gets more time
    if not args.timeout and load_factor() > 1:
        plotting.note(f"cluster: load factor {load_factor():.1f}: {timeout:.0f}s per launch")
    methods = method_list(smoke, args.methods)
    if not methods:
        raise SystemExit(f"--methods {args.methods!r} matches no method; labels: "
                         + ", ".join(m["label"] for m in method_list(smoke)))
    tmp = tempfile.mkdtemp(prefix="gclab-")
    mfile = os.path.join(tmp, "methods.json")
    json.dump(methods, open(mfile, "w"))
    common = ["--steps", str(steps), "--warmup", str(args.warmup), "--batch", str(batch), "--threads", "1",
              "--rounds", str(args.rounds or (1 if smoke else 2))]
    common += ["--smoke"] if smoke else []
    rows, single = [], {}
    try:
        for model in models:                     # 1 rank, no communication: the scaling baseline
            cfile = os.path.join(tmp, f"single-{model}.json")
            json.dump([{"label": "compute only (1 rank)", "kind": "compute"}], open(cfile, "w"))
            out = os.path.join(tmp, f"single-{model}.jsonl")
            _retry_once(lambda t: subprocess.run(
                [sys.executable, "-m", "benchmarks.lab_cluster", "--worker", "--single", "--model", model,
                 "--methods", cfile, "--out", out] + common, cwd=REPO, stdout=sys.stderr, timeout=t),
                timeout, f"single-rank {model}", out)
            got = list(_best(_read_jsonl(out)).values())
            single[model] = got[0] if got else {"status": "error: single-rank run failed"}
            rows.append(_row(single[model], model, "none (1 rank)", 1, batch, None, None))
        for net in nets:
            with NetLab(args.ranks, net, args.delay, smoke, args.loopback) as lab:
                lab.probe(20 if smoke else 100)
                for model in models:
                    out = os.path.join(tmp, f"{model}-{net}.jsonl")
                    t0 = time.time()
                    try:
                        r = _retry_once(lambda t: lab.launch(
                            [sys.executable, "-m", "benchmarks.lab_cluster", "--worker", "--model", model,
                             "--methods", mfile, "--out", out] + common, t), timeout, f"{model} on {lab.label}", out)
                        failed = f"launcher exit {r.returncode}" if r.returncode else ""
                    except subprocess.TimeoutExpired:
                        failed = f"timed out after {timeout:.0f}s and, retried, after {2 * timeout:.0f}s"
                    got = _best(_read_jsonl(out))
                    dense = next((got.get(m["label"], {}).get("step_ms") for m in methods if m["kind"] == "dense"), None)
                    for m in methods:
                        g = got.get(m["label"], {"status": f"not run ({failed or 'no result'})"})
                        rows.append(_row(g, model, lab.label, args.ranks, batch, single[model].get("step_ms"), dense,
                                         m["label"]))
                    plotting.note(f"cluster: {model} on {lab.label}: {time.time() - t0:.0f}s")
                if not lab.namespaces:
                    break                        # loopback: the bandwidth setting means nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plotting.emit(rows, COLUMNS, args.out, "cluster", title=f"emulated cluster ({args.ranks} ranks)")
    ok = [dict(r, series=f"{r['model']} | {r['network'].split(',')[0]}") for r in rows
          if r.get("status") == "ok" and r["ranks"] > 1]
    plotting.grouped_bars(f"{args.out}/cluster.png", ok, "series", "method", "step_ms", log=True,
                          title=f"time per training step, {args.ranks} ranks (lower is better)", ylabel="ms (log)")
    return rows


def _row(g, model, network, ranks, batch, step1, dense, label=None):
    r = {"model": model, "network": network, "ranks": ranks, "method": label or g.get("label"),
         "status": g.get("status", "?")}
    if g.get("status") == "ok":
        r["step_ms"] = g["step_ms"]
        r["rounds_ms"] = " ".join(map(str, g.get("rounds_ms", [])))
        r["breakdown_ms"] = g.get("breakdown_ms", "")
        r["samples_s"] = 1e3 * ranks * batch / g["step_ms"]
        r["MB_per_step"] = g.get("bytes_per_step", 0) / 1e6
        if "wire_per_step" in g:
            r.update({"wire_MB": g["wire_per_step"] / 1e6, "recv_MB": g["recv_per_step"] / 1e6, "ratio": g["ratio"],
                      "U/k": g["union_k"]})
        if step1:
            r["efficiency"] = step1 / g["step_ms"]
        if dense:
            r["vs_dense"] = dense / g["step_ms"]
    return r


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    else:
        sys.exit("run the lab as `python -m benchmarks cluster ...` (this module's own entry is for its ranks)")
