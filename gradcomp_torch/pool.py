"""Stop-free elastic training: a pool of processes started up front, the active world a sub-group.

Expanding under Horovod Elastic or torchrun means starting Python processes (imports, model build)
and a new rendezvous after the change, which a restart from a checkpoint pays too. Here the joining
workers are prepared before they are needed -- started, imported, model built, connected -- and join
in a short coordination step at a step boundary; the old workers never stop otherwise:

    python -m gradcomp_torch.pool --np 2 --max-np 4 train.py ARGS     # 4 processes, 2 of them training

    pool = gcp.init()                           # every process: one Gloo world of max-np ranks
    model = build(); opt = gct.DistributedOptimizer(..., comm=pool.comm)
    state = gcp.State(pool, model, opt, step=0)

    def train(state):                           # runs on the active ranks only
        while state.step < total:
            ...forward/backward...; opt.step(); state.step += 1
            state.check()                       # a step boundary: resizes happen here
            if state.step % 5 == 0: state.commit()
    gcp.run(train, state)                       # standbys wait inside until they are admitted

    pool.request(size=3)                        # any process, any time: grow / shrink to 3 ranks
    pool.request(leave=[pool.rank])             # this process announces it will leave

The launcher (`python -m gradcomp_torch.pool`) hosts the TCPStore every process coordinates through,
starts --max-np processes (RANK = 0..max-np-1) and watches them: when one dies it records the rank
in the store, which is how the survivors learn who failed (the engine's detection: immediate for a
SIGKILL on this host, the waitpid). It never kills the survivors.

Protocol (keys under "gcpool/" in the store):
  ready/R     written by a standby once it is prepared (State made); only ready ranks are admitted.
  req/N       a request (size, leave); "reqseq" counts them. At `State.check()` the active world's
              rank 0 reads the newest request, chooses the new members (the staying ranks first, in
              their old order, then ready standbys by rank) and writes plan/G+1; then one small
              broadcast on the active world tells every active rank the plan's number. A request
              that needs more ready standbys than there are waits, training goes on meanwhile.
  plan/G      the members of world G (global ranks, in new-rank order) and the kind of change
              (graceful, failure, end). Standbys block on the next plan key (store.wait).
  dead/R, failures   written by the launcher when process R exits abnormally.

A graceful change (at a step boundary, every old rank alive): the residual rule runs on the old
world ("flush", the default and gradcomp/elastic.py's graceful rule: one dense allreduce of every
rank's residuals, applied in the next update; "keep", ours: gradcomp.elastic.handoff -- staying
ranks keep their residuals, rescaled by P_new / P_old, and the leaving ranks' residuals are handed
to them with one dense allreduce; or "zero": dropped), the leaving
ranks leave (`run` returns on them), the new world's communicator is made on its members only
(torch.distributed.new_group with use_local_synchronization, cached per membership), the joiners
receive rank 0's model, wrapped optimizer state, gradcomp's replicated state and the State's
attributes (one broadcast_object_list; skipped when nobody joins), the optimizer is rebound and the
configuration fingerprint checked on the new world, and every member commits.

A failure (a peer died): the survivors' collectives fail -- Gloo raises when a connection resets,
and a rank waiting on a collective whose peer died is interrupted by the launcher's record (the
communicator's `interrupt` polls the failure counter) -- and `run` handles it: the first survivor
to write plan/G+1 decides the members (the survivors, then ready standbys up to the old size when
`replace`), everyone adopts the new rank 0's last commit (model, optimizer, replicated gradcomp
state; per-rank state restarts at zero: the failure rule of gradcomp/elastic.py) and training goes
on. The steps since the last commit are lost. One failure is handled at a time: a second failure
while the new world is being formed ends in the pool's timeout. A group that had a dead member
is abandoned, not destroyed (its Gloo work may still be pending in its threads).

`on_resize` callbacks (State(..., on_resize=[f])) get the new size after every change (rescale a
learning rate, re-split virtual workers). `request` refuses sizes outside 1..max-np and unknown
ranks with a ValueError that says the allowed range.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
import time

import torch

from gradcomp import elastic as core
from gradcomp.comm.torch_dist import TorchDistCommunicator
from gradcomp_torch import elastic as gce

P = "gcpool/"
ENV_STORE, ENV_NP = "GRADCOMP_POOL_STORE", "GRADCOMP_POOL_NP"
RULES = ("flush", "keep", "zero")


class PeerFailure(RuntimeError):
    """A peer of this rank's world died (recorded by the pool launcher)."""


class Pool:
    """This process's view of the pool (see the module docstring). Made by `init()`."""

    def __init__(self, timeout: float = 120.0, check_period: float = 0.05):
        import torch.distributed as dist
        self.dist = dist
        env = os.environ
        if ENV_STORE not in env:
            raise RuntimeError("gradcomp_torch.pool.init() runs under the pool launcher: "
                               "python -m gradcomp_torch.pool --np N --max-np M script.py ...")
        host, port = env[ENV_STORE].rsplit(":", 1)
        self.rank, self.max_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        np0 = int(env[ENV_NP])
        self.timeout = float(timeout)
        td = datetime.timedelta(seconds=self.timeout)
        self.store = dist.TCPStore(host, int(port), self.max_size, is_master=False, timeout=td, use_libuv=True)
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.PrefixStore(P + "pg", self.store), rank=self.rank,
                                    world_size=self.max_size, timeout=td)
        self.gen, self.members = 0, list(range(np0))
        self._groups, self._comms = {}, {}
        self._failures_seen, self._last_poll, self.check_period = 0, 0.0, check_period
        self._req_seen = 0
        self.comm = self._comm(self.members) if self.active else _single()

    # ------------------------------------------------------------------ membership
    @property
    def active(self) -> bool:
        return self.rank in self.members

    @property
    def size(self) -> int:
        return len(self.members)

    def _comm(self, members):
        key = tuple(members)
        if key not in self._comms:
            g = _new_group(list(key), self.timeout)
            self._groups[key] = g
            c = TorchDistCommunicator(g, timeout=self.timeout, local_rank=key.index(self.rank))
            c.interrupt = self._interrupt
            c.pool_members = key
            self._comms[key] = c
        return self._comms[key]

    # ------------------------------------------------------------------ failures
    def failures(self) -> int:
        return int(self.store.add(P + "failures", 0))

    def dead(self) -> set:
        return {r for r in range(self.max_size) if self.store.check([P + f"dead/{r}"])}

    def _interrupt(self):
        now = time.monotonic()
        if now - self._last_poll < self.check_period:
            return False
        self._last_poll = now
        if self.failures() > self._failures_seen and self.dead() & set(self.members):
            raise PeerFailure(f"rank(s) {sorted(self.dead() & set(self.members))} of this world died")
        return False

    # ------------------------------------------------------------------ requests
    def request(self, size: int | None = None, leave=()) -> int:
        """Ask for a change (any process, any time): grow/shrink to `size` ranks, or let the global
        ranks `leave` go. Returns the request's number. Applied at a later State.check()."""
        leave = [int(r) for r in leave]
        if size is None and not leave:
            raise ValueError("request(size=N) or request(leave=[ranks]): say what should change")
        if size is not None and not 1 <= int(size) <= self.max_size:
            raise ValueError(f"request(size={size}): the pool has {self.max_size} processes (--max-np); "
                             f"ask for 1..{self.max_size}")
        if any(not 0 <= r < self.max_size for r in leave):
            raise ValueError(f"request(leave={leave}): ranks are 0..{self.max_size - 1}")
        n = int(self.store.add(P + "reqseq", 1))
        self.store.set(P + f"req/{n}", json.dumps({"size": size, "leave": leave, "t": time.time(), "n": n}))
        return n

    def _plan_from_request(self):
        """Rank 0 of the active world: the plan for the newest request, or None (nothing to do yet)."""
        n = int(self.store.add(P + "reqseq", 0))
        if n <= self._req_seen:
            return None
        req = json.loads(self.store.get(P + f"req/{n}"))
        dead = self.dead()
        stay = [r for r in self.members if r not in req["leave"] and r not in dead]
        if not stay:
            raise ValueError(f"request {req} would leave no rank of the current world {self.members}")
        want = req["size"] if req["size"] is not None else len(stay)
        stay = stay[:max(1, want)]                  # the old order: the first staying rank is rank 0
        ready = [r for r in range(self.max_size) if r not in self.members and r not in dead
                 and self.store.check([P + f"ready/{r}"])]
        if len(stay) + len(ready) < want:
            return None                             # not prepared yet: training goes on
        members = stay + ready[:want - len(stay)]
        self._req_seen = n
        if members == self.members:
            return None
        return {"members": members, "old": list(self.members), "kind": "graceful", "t_event": req["t"],
                "req": n, "gen": self.gen + 1}

    def _propose(self, plan) -> dict:
        """Write plan/G+1 unless someone did first; the plan in the store is returned."""
        key = P + f"plan/{self.gen + 1}"
        got = self.store.compare_set(key, "", json.dumps(plan))
        return json.loads(got)

    def _next_plan(self) -> dict:
        key = P + f"plan/{self.gen + 1}"
        self.store.wait([key], datetime.timedelta(days=365))
        return json.loads(self.store.get(key))


def _new_group(ranks, timeout):
    """dist.new_group(ranks) called by the members only (use_local_synchronization), under a name
    that depends on the ranks alone: torch's own hashed name also counts the groups this process
    made before, which differs between a standby and the ranks that trained."""
    import torch.distributed.distributed_c10d as c10d
    name = "gcpool_" + "_".join(map(str, ranks))
    orig = getattr(c10d, "_process_group_name", None)
    if orig is not None:
        c10d._process_group_name = lambda _ranks, use_hashed_name=False: c10d.GroupName(name) \
            if hasattr(c10d, "GroupName") else name
    try:
        return c10d.new_group(ranks, timeout=datetime.timedelta(seconds=timeout), use_local_synchronization=True)
    finally:
        if orig is not None:
            c10d._process_group_name = orig


def _single():
    from gradcomp import SingleCommunicator
    return SingleCommunicator()


_POOL = None


def init(timeout: float = 120.0) -> Pool:
    """Join the pool (every process of `python -m gradcomp_torch.pool`, once)."""
    global _POOL
    if _POOL is None:
        _POOL = Pool(timeout=timeout)
    return _POOL


class State:
    """What a change carries: the model, the DistributedOptimizer, and attributes (step, epoch...).

    `rule` is the residual rule at a graceful change (module docstring); `replace` lets ready
    standbys take the place of failed ranks; `on_resize` callbacks get the new world size;
    `on_event(name, **info)` is called with "change_begin", "change_end", "left", "failure"
    (for benchmarks)."""

    def __init__(self, pool: Pool, model, optimizer, *, rule: str = "flush", replace: bool = True,
                 on_resize=(), on_event=None, **attrs):
        if rule not in RULES:
            raise ValueError(f"rule={rule!r}: choose one of {RULES}")
        self.pool, self.model, self.opt = pool, model, optimizer
        self.rule, self.replace, self.on_resize, self.on_event = rule, replace, list(on_resize), on_event
        self.attrs = dict(attrs)
        self.left = False
        self.handed = {}        # the last graceful change's handoff: {name: the leaving ranks' residual sum}
        self._committed = None
        self.commit()
        if not pool.active:
            pool.store.set(P + f"ready/{pool.rank}", str(time.time()))

    def __getattr__(self, k):
        attrs = self.__dict__.get("attrs")
        if attrs is not None and k in attrs:
            return attrs[k]
        raise AttributeError(k)

    def __setattr__(self, k, v):
        if "attrs" in self.__dict__ and k in self.__dict__["attrs"]:
            self.attrs[k] = v
        else:
            object.__setattr__(self, k, v)

    def _emit(self, name, **kw):
        if self.on_event is not None:
            self.on_event(name, **kw)

    # ------------------------------------------------------------------ commit / payload
    def _payload(self) -> dict:
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "opt": gce._saved(self.opt), "attrs": copy.deepcopy(self.attrs)}

    def commit(self):
        """Keep a copy of the model, the optimizer and the attributes (in memory, no collective)."""
        self._committed = self._payload()

    def _adopt(self, payload):
        self.model.load_state_dict(payload["model"])
        gce._restore_saved(self.opt, payload["opt"])
        self.attrs = copy.deepcopy(payload["attrs"])

    # ------------------------------------------------------------------ step boundary
    def check(self) -> bool:
        """Call at every step boundary on the active ranks (collective: one small broadcast).
        Applies a pending request; returns True if the world changed. After it returns on a rank
        that left, `state.left` is True and the training function should return."""
        pool = self.pool
        flag = torch.zeros(1, dtype=torch.int64)
        if pool.comm.rank == 0:
            plan = pool._plan_from_request()
            if plan is not None:
                flag[0] = int(pool._propose(plan)["gen"])
        if pool.size > 1:
            from gradcomp.comm.torch_dist import wait_work
            work = pool.dist.broadcast(flag, src=pool.members[0], group=pool._groups[tuple(pool.members)],
                                       async_op=True)
            wait_work(work, pool.timeout, "broadcast", "gcpool.check", pool.comm.rank, pool.size, pool._interrupt)
        nxt = int(flag[0])
        if nxt == 0:
            return False
        plan = json.loads(pool.store.get(P + f"plan/{nxt}"))
        if plan.get("kind") != "graceful":          # a failure plan won the race: recovered by run()
            raise PeerFailure(f"world {nxt} was formed after a failure: {plan}")
        self._change(plan)
        return True

    def _change(self, plan):
        """Graceful change on an old member (plan from check())."""
        pool = self.pool
        t0 = time.time()
        self._emit("change_begin", t=t0, plan=plan)
        old, new = list(pool.members), list(plan["members"])
        stay = [r for r in old if r in new]
        me_leaving = pool.rank not in new
        sync = self.opt.gradient_sync
        gce._require_idle(self.opt, "elastic change")
        self.handed = {}
        if self.rule == "keep":
            self.handed = core.handoff(sync, leaving=me_leaving, n_stay=len(stay), new_size=len(new))
        elif self.rule == "flush":
            core.flush(sync)
        else:
            core.zero_per_rank(sync)
        pool.gen, pool.members = int(plan["gen"]), new
        if me_leaving:
            self.left = True
            pool.comm = _single()
            self._emit("left", t=time.time(), plan=plan)
            return
        self._enter(plan, joiner=False)
        self._emit("change_end", t=time.time(), t_begin=t0, plan=plan, size=len(new))

    def _enter(self, plan, *, joiner: bool, failure: bool = False):
        """Every member of the new world: communicator, state to the joiners, rebind, commit."""
        pool = self.pool
        new = list(plan["members"])
        comm = pool._comm(new)
        pool.comm = comm
        old = plan.get("old", [])
        joins = failure or any(r not in old for r in new)
        if joins:
            obj = [(self._committed if failure else self._payload()) if comm.rank == 0 else None]
            pool.dist.broadcast_object_list(obj, src=new[0], group=pool._groups[tuple(new)])
            payload = obj[0]
        if joiner or failure:
            gce._abandon_step(self.opt)
        gce.rebind(self.opt, comm, check=False)
        if joins and (joiner or failure):
            self._adopt(payload)
        pool._failures_seen = pool.failures()
        opt = self.opt                              # the fingerprint, on the new world (collective)
        opt.gradient_sync.check({n: list(p.shape) for n, p in opt.named_parameters()}, opt._fingerprint_extra())
        for cb in self.on_resize:
            cb(comm.size)
        self.commit()


def run(train, state: State):
    """Run `train(state)` on this process while it is in the active world (see the module
    docstring): standbys wait until admitted, leavers return, failures are recovered. Returns
    when the job ends (train returned on the active ranks) or this rank left."""
    pool = state.pool
    while True:
        if not pool.active:
            plan = pool._next_plan()
            if plan.get("kind") == "end":
                return
            pool.gen = int(plan["gen"])
            if pool.rank not in plan["members"]:
                pool.members = list(plan["members"])
                continue
            pool.members = list(plan["members"])
            state._enter(plan, joiner=True, failure=plan.get("kind") == "failure")
            state._emit("joined", t=time.time(), plan=plan, size=pool.size)
        try:
            train(state)
        except Exception as e:  # noqa: BLE001 - a failure of a peer is recovered, anything else re-raised
            if not _peer_failed(pool, e):
                raise
            _recover(state, e)
            continue
        if state.left:
            return
        if pool.comm.rank == 0:
            pool._propose({"gen": pool.gen + 1, "kind": "end", "members": []})
            pool.store.set(P + "ended", "1")
        return


def _peer_failed(pool, err) -> bool:
    if isinstance(err, PeerFailure):
        return True
    deadline = time.monotonic() + 5.0           # the launcher's record follows the death closely
    while time.monotonic() < deadline:
        if pool.failures() > pool._failures_seen and pool.dead() & set(pool.members):
            return True
        time.sleep(0.02)
    return False


def _recover(state, err):
    pool = state.pool
    t0 = time.time()
    dead = pool.dead()
    pool._failures_seen = pool.failures()
    old = list(pool.members)
    survivors = [r for r in old if r not in dead]
    members = list(survivors)
    if state.replace:
        ready = [r for r in range(pool.max_size) if r not in old and r not in dead
                 and pool.store.check([P + f"ready/{r}"])]
        members += ready[:len(old) - len(survivors)]
    plan = pool._propose({"gen": pool.gen + 1, "kind": "failure", "members": members, "old": old,
                          "dead": sorted(dead & set(old)), "t_event": t0})
    state._emit("failure", t=t0, plan=plan, error=f"{type(err).__name__}: {err}"[:300])
    pool.gen, pool.members = int(plan["gen"]), list(plan["members"])
    if pool.rank not in pool.members:
        raise RuntimeError(f"rank {pool.rank} is not in the world formed after a failure: {plan}") from err
    state._enter(plan, joiner=False, failure=True)
    state._emit("change_end", t=time.time(), t_begin=t0, plan=plan, size=pool.size)


# ------------------------------------------------------------------------------- the launcher
def launch(argv=None) -> int:
    """python -m gradcomp_torch.pool --np N --max-np M [--timeout S] script.py ARGS"""
    import argparse
    import socket
    p = argparse.ArgumentParser(prog="python -m gradcomp_torch.pool", description=launch.__doc__)
    p.add_argument("--np", type=int, required=True, help="ranks training at the start")
    p.add_argument("--max-np", type=int, required=True, help="processes started (the others stand by)")
    p.add_argument("--timeout", type=float, default=0, help="kill everything after this many seconds (0: none)")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if not 1 <= a.np <= a.max_np:
        p.error(f"--np {a.np} must be in 1..--max-np ({a.max_np})")
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, a.max_np + 1, is_master=True,
                          timeout=datetime.timedelta(seconds=300), wait_for_workers=False, use_libuv=True)
    procs = []
    for r in range(a.max_np):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(a.max_np),
                   **{ENV_STORE: f"127.0.0.1:{port}", ENV_NP: str(a.np)})
        procs.append(subprocess.Popen([sys.executable, a.script, *a.args], env=env))   # our process group
    deadline = time.monotonic() + a.timeout if a.timeout else None
    rcs = [None] * a.max_np
    while any(rc is None for rc in rcs):
        for r, pr in enumerate(procs):
            if rcs[r] is None and pr.poll() is not None:
                rcs[r] = pr.returncode
                if pr.returncode != 0:
                    store.set(P + f"dead/{r}", str(pr.returncode))
                    store.add(P + "failures", 1)
                    print(f"[gradcomp pool] rank {r} exited with {pr.returncode}", file=sys.stderr, flush=True)
        if deadline is not None and time.monotonic() > deadline:
            for r, pr in enumerate(procs):
                if rcs[r] is None:
                    pr.kill()
            print(f"[gradcomp pool] timeout after {a.timeout:.0f} s: killed", file=sys.stderr, flush=True)
            return 124
        time.sleep(0.01)
    ended = store.check([P + "ended"])
    if ended and all(rc == 0 or store.check([P + f"dead/{r}"]) for r, rc in enumerate(rcs)):
        return 0
    return max((rc for rc in rcs if rc and rc > 0), default=1)


if __name__ == "__main__":
    sys.exit(launch())
