"""Helpers of the sync-policy MPI scripts: the communicator and two ways to drive a policy in torch.

    driver "optimizer": gradcomp_torch.DistributedOptimizer(optimizer, ..., sync=spec) (the real API)
    driver "manual":    the SyncPolicy protocol by hand over gradcomp_torch.sync_view.TorchParamAccess
                        and a GradientSync, exactly as the adapter is documented to call it

Both expose step(loss_fn), flush(), state_dict(), load_state_dict(sd).
"""
from __future__ import annotations

import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import gradcomp  # noqa: E402
from gradcomp.pipeline import GradientSync  # noqa: E402


def make_comm():
    try:
        from gradcomp.comm import make_communicator
        return make_communicator("mpi")
    except ImportError:
        from gradcomp.comm.mpi import MPICommunicator
        return MPICommunicator()


def have_optimizer_driver() -> bool:
    try:
        import gradcomp_torch
        return hasattr(gradcomp_torch, "DistributedOptimizer")
    except ImportError:
        return False


def _torch_param_access():
    """gradcomp_torch's TorchParamAccess; loaded from its file if the package does not import yet."""
    try:
        from gradcomp_torch.sync_view import TorchParamAccess
    except ImportError:
        import importlib.util
        path = os.path.join(os.path.dirname(__file__), "..", "..", "gradcomp_torch", "sync_view.py")
        spec = importlib.util.spec_from_file_location("_gradcomp_torch_sync_view", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        TorchParamAccess = mod.TorchParamAccess
    return TorchParamAccess


class ManualDriver:
    """The protocol of gradcomp/sync/base.py, driven by hand."""

    def __init__(self, model, opt, spec, comm, compressor=None):
        TorchParamAccess = _torch_param_access()
        self.model, self.opt, self.comm = model, opt, comm
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.policy = gradcomp.create(spec, "sync").bind(comm, compressor, seed=0)
        self.gsync = GradientSync("none", comm=comm)
        self.view = TorchParamAccess(self.named, opt)
        self.step_no = 0

    def step(self, loss_fn):
        self.opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if self.policy.sync_gradients(self.step_no):
            avg = self.gsync.step({n: p.grad for n, p in self.named})
            for n, p in self.named:
                p.grad.copy_(avg[n])
        self.policy.before_step(self.step_no, self.view)
        self.opt.step()
        self.policy.after_step(self.step_no, self.view)
        self.step_no += 1
        return float(loss.detach())

    def flush(self):
        self.policy.flush()

    def state_dict(self):
        pol = self.policy.state_dict()            # first: drains a pending momentum average
        return {"policy": pol, "opt": self.opt.state_dict(), "gsync": self.gsync.state_dict(),
                "step": self.step_no}

    def load_state_dict(self, sd):
        self.policy.load_state_dict(sd["policy"])
        self.opt.load_state_dict(sd["opt"])
        self.gsync.load_state_dict(sd["gsync"])
        self.step_no = sd["step"]


class OptimizerDriver:
    """gradcomp_torch.DistributedOptimizer(optimizer, named_parameters=..., sync=spec)."""

    def __init__(self, model, opt, spec, comm, compressor=None):
        import gradcomp_torch
        cls = gradcomp_torch.DistributedOptimizer
        want = {"named_parameters": list(model.named_parameters()), "compressor": compressor or "none",
                "memory": "none" if compressor is None else "auto", "sync": spec, "comm": comm}
        accepted = inspect.signature(cls).parameters
        if "sync" not in accepted:
            raise RuntimeError("gradcomp_torch.DistributedOptimizer has no sync= argument yet")
        kwargs = {k: v for k, v in want.items() if k in accepted}
        if "comm" not in accepted and hasattr(gradcomp_torch, "init"):
            gradcomp_torch.init(comm=comm)
        self.opt = cls(opt, **kwargs)
        self.inner = opt

    def step(self, loss_fn):
        self.opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    @property
    def policy(self):
        return self.opt.policy

    def flush(self):
        if hasattr(self.opt, "flush"):
            self.opt.flush()
        else:
            self.opt.policy.flush()

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, sd):
        self.opt.load_state_dict(sd)


DRIVERS = {"manual": ManualDriver, "optimizer": OptimizerDriver}
