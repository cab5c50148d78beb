"""Runs one of Horovod's example scripts (tests/mpi_scripts/examples/, only their import changed to
gradcomp) once per mode in one launch, then prints CHECK lines for tests/test_horovod_dropin.py.

    mpirun -np 2 python tests/mpi_scripts/hvd_examples.py pytorch_mnist none topk powersgd localsgd
    horovodrun -np 2 python ...   |   torchrun --nproc_per_node 2 ...

A mode is the environment a user would set: none, topk (GRADCOMP_COMPRESSOR=topk:ratio=0.05),
powersgd (powersgd:rank=2), localsgd (GRADCOMP_SYNC=localsgd:period=2). Nothing here changes the
example scripts: this driver only sets the environment and sys.argv, runs the file with runpy, and
afterwards inspects the optimizer / tape / hook the script built (recorded by wrapping the
constructors) -- after calling the optimizer's finalize() for torch scripts, which is what a script
must add before saving under local SGD (README: torch has no end-of-training signal). Scripts that
cannot run a mode (DistributedGradientTape and the DDP hook never see the optimizer step, so a
periodic sync policy is refused) must fail with that error on every rank: checked as `refused`.
"""
import os
import runpy
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = {"none": ("", ""), "topk": ("topk:ratio=0.05", ""), "powersgd": ("powersgd:rank=2", ""),
         "localsgd": ("", "localsgd:period=2")}
REFUSED = {("tensorflow2_mnist", "localsgd"), ("ddp_comm_hook", "localsgd")}
example, modes = sys.argv[1], sys.argv[2:] or list(MODES)
path = os.path.join(HERE, "examples", example + ".py")
if example == "pytorch_synthetic_benchmark":       # kept beside this driver (it also runs on Horovod itself)
    path = os.path.join(HERE, "hvd_synthetic.py")
is_tf = example.startswith("tensorflow")
if is_tf:
    import gradcomp_tf as gc
    from gradcomp_tf import tape as tape_mod
else:
    import gradcomp_torch as gc
    import torch

made = []


def record(name):
    orig = getattr(gc, name)

    def wrapped(*a, **k):
        made.append(orig(*a, **k))
        return made[-1]
    setattr(gc, name, wrapped)


for n in (["DistributedOptimizer", "DistributedGradientTape"] if is_tf else ["DistributedOptimizer", "ddp_hook"]):
    record(n)


def rank():
    if example == "ddp_comm_hook":
        import torch.distributed as dist
        return dist.get_rank()
    return gc.rank()


def report(mode, name, ok, extra=""):
    if rank() == 0:
        print(f"CHECK {example}[{mode}] {name} {'PASS' if ok else 'FAIL'} {extra}", flush=True)


def equal_on_ranks(flat):
    if example == "ddp_comm_hook":
        import torch.distributed as dist
        rows = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, flat)
        return all(torch.equal(r, rows[0]) for r in rows)
    g = np.asarray(gc.allgather(flat[None] if not is_tf else gc_tf_const(flat[None])))
    return bool(np.abs(g - g[0]).max() == 0)


def gc_tf_const(a):
    import tensorflow as tf
    return tf.constant(a)


for mode in modes:
    comp, sync = MODES[mode]
    os.environ.update(GRADCOMP_COMPRESSOR=comp, GRADCOMP_SYNC=sync, GRADCOMP_MEMORY="")
    made.clear()
    if is_tf:
        tape_mod.reset_shared()
    argv = [path]
    if example == "pytorch_imagenet_resnet50":
        import tempfile
        ck = os.path.join(tempfile.gettempdir(), f"gc-hvd-ex-{os.getppid()}-{mode}-{{epoch}}.pt")
        argv += ["--checkpoint-format", ck]
    sys.argv = argv
    want = comp.split(":")[0] or "none"
    try:
        g = runpy.run_path(path, run_name="__main__" if example != "ddp_comm_hook" else "example")
        if example == "ddp_comm_hook":
            ddp_model = g["demo_basic"]()
        if example == "pytorch_imagenet_resnet50":     # Horovod's resume idiom: rank 0 loads, then broadcasts
            sys.argv = argv + ["--epochs", "2"]
            made.clear()
            g = runpy.run_path(path, run_name="__main__")
            report(mode, "resumed", g.get("resume_from_epoch") == 1, g.get("resume_from_epoch"))
    except ValueError as e:
        refused = (example, mode) in REFUSED and "sync policy" in str(e)
        line = next((ln for ln in str(e).splitlines() if "sync policy" in ln), str(e).splitlines()[0])
        report(mode, "refused" if (example, mode) in REFUSED else "ran", refused, line.strip()[:120])
        continue
    if (example, mode) in REFUSED:
        report(mode, "refused", False, "the script ran although the mode cannot")
        continue
    obj = made[-1]
    if is_tf:
        model = g["mnist_model"]
        flat = np.concatenate([v.numpy().ravel() for v in model.variables])
        ex = obj.gradcomp_exchange if hasattr(obj, "gradcomp_exchange") else obj.exchange
        desc, st = ex.describe(), ex.stats()
        got = desc["compressor"].split(":")[0]
        report(mode, "compressor", got == want and (not sync or desc["sync"].startswith("localsgd")), desc)
        report(mode, "params_equal", equal_on_ranks(flat))
        report(mode, "bytes_sent", st["bytes_sent_total"] > 0, st["bytes_sent_total"])
    elif example == "ddp_comm_hook":
        flat = torch.cat([p.detach().reshape(-1) for p in ddp_model.parameters()])
        st = obj.hook_state.stats()
        got = obj.hook_state.sync.compressor.name
        report(mode, "compressor", got == want, got)
        report(mode, "params_equal", equal_on_ranks(flat))
        report(mode, "bytes_sent", st.get("bytes_sent", 0) > 0, st.get("bytes_sent"))
    else:
        obj.finalize()
        flat = torch.cat([p.detach().reshape(-1) for grp in obj.param_groups for p in grp["params"]])
        st = obj.stats()
        got = obj.compressor.name
        pol = st["policy"]
        report(mode, "compressor", got == want and (not sync or pol.get("syncs", 0) > 0), f"{got} {pol}")
        report(mode, "params_equal", equal_on_ranks(flat))
        report(mode, "bytes_sent", st["bytes_sent_total"] > 0, st["bytes_sent_total"])
if rank() == 0:
    engine = ("torch.distributed" if example == "ddp_comm_hook" else
              getattr(gc.runtime.comm() if is_tf else gc.communicator(), "engine", "?"))
    print(f"TRANSPORT {engine}", flush=True)
    print(f"DONE {example} {' '.join(modes)}", flush=True)
if example == "ddp_comm_hook":
    import torch.distributed as dist
    dist.destroy_process_group()
