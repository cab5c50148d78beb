"""The one registry: every compressor, memory and sync policy gradcomp knows, by name.

Modules are imported lazily on first use, so `available()` is cheap and an unknown name lists
the known ones.
"""
from __future__ import annotations

import importlib

COMPRESSORS = {
    "none": "gradcomp.compressors.none:NoneCompressor",
    "fp16": "gradcomp.compressors.fp16:FP16Compressor",
    "bf16": "gradcomp.compressors.bf16:BF16Compressor",
    "topk": "gradcomp.compressors.topk:TopKCompressor",
    "randomk": "gradcomp.compressors.randomk:RandomKCompressor",
    "threshold": "gradcomp.compressors.threshold:ThresholdCompressor",
    "dgc": "gradcomp.compressors.dgc:DGCCompressor",
    "qsgd": "gradcomp.compressors.qsgd:QSGDCompressor",
    "terngrad": "gradcomp.compressors.terngrad:TernGradCompressor",
    "signsgd": "gradcomp.compressors.signsgd:SignSGDCompressor",
    "signum": "gradcomp.compressors.signum:SignumCompressor",
    "efsignsgd": "gradcomp.compressors.efsignsgd:EFSignSGDCompressor",
    "onebit": "gradcomp.compressors.onebit:OneBitCompressor",
    "natural": "gradcomp.compressors.natural:NaturalCompressor",
    "powersgd": "gradcomp.compressors.powersgd:PowerSGDCompressor",
    "randproj": "gradcomp.compressors.randproj:RandProjCompressor",
    "sketch": "gradcomp.compressors.sketch:SketchCompressor",
    "rbgs": "gradcomp.compressors.rbgs:RBGSCompressor",
    "scalecom": "gradcomp.compressors.scalecom:ScaleComCompressor",
    "gtopk": "gradcomp.compressors.gtopk:GTopKCompressor",
    "aggtopk": "gradcomp.compressors.aggtopk:AggTopKCompressor",
}

MEMORIES = {
    "none": "gradcomp.memory.none:NoMemory",
    "residual": "gradcomp.memory.residual:ResidualMemory",
    "dgc": "gradcomp.memory.dgc:DGCMemory",
    "gmc": "gradcomp.memory.gmc:GMCMemory",
    "lowpass": "gradcomp.memory.lowpass:LowPassMemory",
}

SYNCS = {
    "allreduce": "gradcomp.sync.allreduce:AllreducePolicy",
    "localsgd": "gradcomp.sync.localsgd:LocalSGDPolicy",
    "da": "gradcomp.sync.da:DoubleAveragingPolicy",
    "da-pipelined": "gradcomp.sync.da:PipelinedDoubleAveragingPolicy",
    "slowmo": "gradcomp.sync.slowmo:SlowMoPolicy",
}

_KINDS = {"compressor": COMPRESSORS, "memory": MEMORIES, "sync": SYNCS}


def table(kind: str) -> dict:
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(_KINDS)}")
    return _KINDS[kind]


def lookup(kind: str, name: str):
    """The class registered as `name` of `kind`; ValueError listing the valid names."""
    t = table(kind)
    if name not in t:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind} names: {', '.join(sorted(t))}")
    mod, cls = t[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def parse_spec(spec: str) -> tuple[str, dict]:
    """'topk:ratio=0.001,mode=sampled' -> ('topk', {'ratio': '0.001', 'mode': 'sampled'})."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty or non-string spec {spec!r}; expected 'name' or 'name:key=value,...'")
    name, _, rest = spec.strip().partition(":")
    kwargs = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = part.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"bad parameter {part!r} in spec {spec!r}; expected key=value")
        if k.strip() in kwargs:
            raise ValueError(f"parameter {k.strip()!r} is given twice in spec {spec!r}; give each parameter "
                             "once")
        kwargs[k.strip()] = v.strip()
    return name.strip().lower(), kwargs


def create(spec, kind: str = "compressor", **overrides):
    """Build an algorithm from a spec string ('topk:ratio=0.01'), an instance (returned as is) or None."""
    if spec is None:
        spec = "none" if kind != "sync" else "allreduce"
    if not isinstance(spec, str):
        base = {"compressor": "gradcomp.compressors.base:Compressor", "memory": "gradcomp.memory.base:Memory",
                "sync": "gradcomp.sync.base:SyncPolicy"}[kind]
        mod, cls = base.split(":")
        if not isinstance(spec, getattr(importlib.import_module(mod), cls)):
            raise ValueError(f"expected a {kind} spec string or {cls} instance, got {type(spec).__name__}")
        return spec
    name, kwargs = parse_spec(spec)
    kwargs.update(overrides)
    warmup = kwargs.pop("warmup", None) if kind == "compressor" else None
    small = kwargs.pop("dense_below", None) if kind == "compressor" else None
    obj = lookup(kind, name)(**kwargs)
    if small is not None:                       # small tensors dense (compressors/base.py, pipeline.py)
        from gradcomp.params import Param
        small = Param(int, 0, lo=0).check(f"compressor {name!r}", "dense_below", small)
        if small:
            obj.dense_below = small
            obj.config = dict(obj.config, dense_below=small)
    if warmup is not None:                      # dense warm-up of any lossy compressor (compressors/warmup.py)
        from gradcomp.compressors.warmup import DenseWarmup
        from gradcomp.params import Param
        steps = Param(int, 0, lo=0).check(f"compressor {name!r}", "warmup", warmup)
        if steps:
            obj = DenseWarmup(obj, steps)
    return obj


def available(kind: str = "compressor") -> list[str]:
    return sorted(table(kind))
