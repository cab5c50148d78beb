"""Parameter naming and fixed gradient buckets for DistributedOptimizer.

Every rank must send the same tensors in the same collectives: names come from
`named_parameters` (or the optimizer's group/index order), and buckets are cut from the
parameters in reverse registration order (roughly the order backward produces gradients), at
most `bucket_mb` MiB each (a larger tensor gets its own bucket), never mixing devices.
"""
from __future__ import annotations


def name_parameters(optimizer, named_parameters):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if named_parameters is None:
        named = [(f"param.{gi}.{i}", p) for gi, g in enumerate(optimizer.param_groups)
                 for i, p in enumerate(g["params"])]
    else:
        given = list(named_parameters)
        if any(not (isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str)) for t in given):
            raise TypeError("named_parameters must be an iterable of (name, parameter) pairs, "
                            "e.g. model.named_parameters()")
        names = [n for n, _ in given]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"named_parameters has duplicate names {dup[:5]}; names must be unique")
        name_of = {id(p): n for n, p in given}
        missing = [i for i, p in enumerate(params) if id(p) not in name_of]
        if missing:
            raise ValueError(f"{len(missing)} of the optimizer's {len(params)} parameters are not in "
                             "named_parameters; pass model.named_parameters() of the model whose parameters "
                             "the optimizer holds")
        named = [(name_of[id(p)], p) for p in params]
    seen, out = set(), []
    for n, p in named:
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out.append((n, p))
    if not out:
        raise ValueError("the optimizer has no parameter that requires grad")
    for n, p in out:
        if not p.is_floating_point():
            from gradcomp.pipeline import unsupported_dtype
            raise TypeError(unsupported_dtype("parameter", n, str(p.dtype).replace("torch.", "")))
    return out


def make_buckets(named, bucket_mb):
    cap = float(bucket_mb) * 2 ** 20
    buckets, cur, cur_bytes = [], [], 0
    for i in reversed(range(len(named))):
        p = named[i][1]
        nb = p.numel() * p.element_size()
        if cur and (cur_bytes + nb > cap or p.device != named[cur[0]][1].device):
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += nb
    if cur:
        buckets.append(cur)
    return buckets
