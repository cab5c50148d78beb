"""destroy_process_group() really frees the world group in a script that imports gradcomp_torch.

torch.distributed.nn, imported lazily by torch (torch.optim's first step -> torch._dynamo -> FSDP) after
init_process_group, binds the world group as default arguments and keeps it alive: Gloo's threads then
run into interpreter shutdown and abort the process once in a few exits (SIGABRT in CI,
test_ddp_hook_under_torchrun). gradcomp_torch imports that module before any group exists.
"""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("no torch.distributed", allow_module_level=True)

SCRIPT = r"""
import os, sys, time
import torch, torch.distributed as dist
import gradcomp_torch  # noqa: F401  (the import under test, before init_process_group)
def threads(): return len(os.listdir("/proc/self/task"))
base = threads()
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
m = torch.nn.Linear(3, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1)
m(torch.ones(1, 3)).sum().backward(); opt.step()          # imports torch._dynamo -> torch.distributed.nn
t = torch.ones(2); dist.all_reduce(t)
during = threads()
dist.destroy_process_group()
for _ in range(100):                                         # Gloo's threads are joined when the group is freed
    if threads() <= base: break
    time.sleep(0.05)
print("THREADS", base, during, threads(), "torch.distributed.nn" in sys.modules, flush=True)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_destroy_process_group_frees_gloo_threads(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "store")], capture_output=True, text=True,
                       timeout=240, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("THREADS")][-1]
    base, during, after, imported = line.split()[1:]
    assert imported == "True"                      # the lazy import that used to pin the group happened
    assert int(during) > int(base)                 # Gloo started threads
    assert int(after) <= int(base), f"Gloo threads still running after destroy_process_group: {line}"
