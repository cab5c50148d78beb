"""Recipes: what a user sets for each method, in one table shared by the README and the lab.

A recipe is the compressor spec, memory spec and SGD settings (learning rate, momentum) that a
method is documented to use on the digits CNN of `examples/torch_train.py` (SGD with momentum,
cosine schedule, batch 32 per rank). The README's recipe table is printed from `RECIPES` by
`python -m gradcomp recipes`; `python -m benchmarks accuracy --recipes` trains every recipe beside
dense from the same table, and tests/test_recipes.py checks recipes against dense. So the documented
recipe and the measured one cannot drift apart. The measured accuracies are in docs/benchmarks.md
("Recipes"), never here.

`lr` and `momentum` are the values written in the user's `torch.optim.SGD(...)`: a method that owns
its momentum (memory `dgc`, `gmc`) takes that momentum over (gradcomp/momentum.py), so the user
never changes the optimizer's momentum by hand. `None` means the example's value (lr 0.05,
momentum 0.9).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    method: str                      # the label: the compressor's registry name, or name + memory
    compressor: str                  # GRADCOMP_COMPRESSOR spec
    memory: str = "auto"             # GRADCOMP_MEMORY spec
    lr: float | None = None          # SGD learning rate (None: the example's 0.05)
    momentum: float | None = None    # SGD momentum as the user writes it (None: the example's 0.9)
    note: str = ""                   # why the recipe differs from the defaults, one line

    def sgd(self, lr: float, momentum: float) -> tuple[float, float]:
        """(lr, momentum) of this recipe, falling back to the given example values."""
        return (lr if self.lr is None else self.lr), (momentum if self.momentum is None else self.momentum)

    def label(self) -> str:
        extra = [f"lr {self.lr:g}"] if self.lr is not None else []
        extra += [f"momentum {self.momentum:g}"] if self.momentum is not None else []
        mem = "" if self.memory == "auto" else f" memory={self.memory}"
        return f"recipe {self.compressor}{mem}" + (f" ({', '.join(extra)})" if extra else "")


# The digits CNN recipes (SGD). Order: the README table's.
RECIPES: tuple[Recipe, ...] = (
    Recipe("topk", "topk:ratio=0.01", lr=0.5, momentum=0.0,
           note="error feedback: no SGD momentum, lr / (1 - 0.9) instead (the same step per unit gradient)"),
    Recipe("dgc", "dgc:ratio=0.01,warmup_steps=23,init_ratio=0.1", lr=0.1,
           note="SGD(momentum=0.9) as written (taken over); density warm-up 10% -> 1% over ~1 epoch of steps "
                "(the 1000-step default suits runs of thousands of steps)"),
    Recipe("powersgd", "powersgd:rank=4"),
    Recipe("efsignsgd", "efsignsgd", lr=0.5, momentum=0.0,
           note="error feedback: no SGD momentum, lr / (1 - 0.9) instead"),
    Recipe("onebit", "onebit", lr=0.5, momentum=0.0, note="error feedback: no SGD momentum, lr / (1 - 0.9) instead"),
    Recipe("rbgs+gmc", "rbgs:ratio=0.01", "gmc:plus=true", lr=0.25, momentum=0.5,
           note="GMC+ (SGD's momentum taken over). Does not reach dense at 8 epochs (docs/benchmarks.md)"),
)


# The WikiText-2 LSTM LM of `examples/torch_train.py --task lm` (Adam, cosine schedule over 1 epoch, 2
# ranks) at >= 100x fewer bytes: `lr` is Adam's (dense's best there: 0.03), momentum does not apply.
# 2-byte values and compact index codes (OURS) carry about 2.6x the entries of fp32 + int32 at the
# same bytes. Measured perplexities against dense (4 seeds): docs/benchmarks.md, "WikiText-2 LM".
LM_RECIPES: tuple[Recipe, ...] = (
    Recipe("topk", "topk:ratio=0.0132,values=fp16,indices=compact", lr=0.05,
           note="100.2x; sparse methods under Adam want a higher lr than dense"),
    Recipe("scalecom", "scalecom:ratio=0.0132,values=fp16,indices=compact", lr=0.05, note="100.2x"),
    Recipe("gtopk", "gtopk:ratio=0.0132,values=fp16,indices=compact", lr=0.04,
           note="100.2x; lr 0.05 broke on one of four seeds"),
    Recipe("dgc", "dgc:ratio=0.0057,warmup_steps=0,values=fp16,indices=compact", "residual", lr=0.06,
           note="100.1x (1-D tensors dense); the dgc memory is SGD's, so Adam needs memory residual; seed 0 only so far"),
)


def get(method: str) -> Recipe:
    for r in RECIPES:
        if r.method == method:
            return r
    raise KeyError(f"no recipe named {method!r}; recipes: {', '.join(r.method for r in RECIPES)}")


def table() -> str:
    """The README's recipe table (Markdown)."""
    rows = ["| method | GRADCOMP_COMPRESSOR | GRADCOMP_MEMORY | SGD lr | SGD momentum | note |",
            "|---|---|---|---|---|---|"]
    for r in RECIPES:
        rows.append(f"| {r.method} | `{r.compressor}` | `{r.memory}` | {'0.05' if r.lr is None else f'{r.lr:g}'} | "
                    f"{'0.9' if r.momentum is None else f'{r.momentum:g}'} | {r.note or '-'} |")
    return "\n".join(rows)


def lm_table() -> str:
    """The README's LM recipe table (Markdown): Adam, no momentum column."""
    rows = ["| method | GRADCOMP_COMPRESSOR | GRADCOMP_MEMORY | Adam lr | note |", "|---|---|---|---|---|"]
    for r in LM_RECIPES:
        rows.append(f"| {r.method} | `{r.compressor}` | `{r.memory}` | {r.lr:g} | {r.note or '-'} |")
    return "\n".join(rows)
