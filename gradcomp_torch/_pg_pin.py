"""Keep torch from pinning the world process group (imported first by gradcomp_torch).

`torch.distributed.nn.functional` binds `group=group.WORLD` as default arguments when it is first
imported. torch imports it lazily (torch.optim's first step imports torch._dynamo, which imports FSDP,
which imports it), so in a script that calls `init_process_group` first, those defaults hold the world
group for the life of the process: `destroy_process_group()` then cannot free it, Gloo's worker threads
run on into interpreter shutdown, and one that releases a finished collective's tensor there needs the
GIL and aborts the process ("terminate called without an active exception", SIGABRT, exit code -6)
once in a few exits (found in CI: tests/test_torch_multiproc.py::test_ddp_hook_under_torchrun).
Importing the module here, before any process group exists, binds those defaults to None instead.
"""
from gradcomp.comm.torch_dist import import_dist

try:
    import_dist()            # imports torch.distributed.nn while no process group exists
except ImportError:          # a torch build without torch.distributed: nothing to pin
    pass
