"""Recipe test: a compressor with its documented recipe (README, docs/benchmarks.md "Recipes")
trains the digits CNN of examples/torch_train.py to within 1 point of dense, same epochs, same
seed, 2 in-process ranks (gradcomp.LocalWorld), the user's SGD(momentum=0.9) as written."""
from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import gradcomp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 8


def _train(compressor, memory="auto", extra=()):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import torch_train
    finally:
        sys.path.pop(0)
    a = torch_train.parse_args(["--epochs", str(EPOCHS), "--compressor", compressor, "--memory", memory,
                                "--no-progress", "--threads", "1", *extra])
    return gradcomp.LocalWorld(2, timeout=600).run(lambda comm: torch_train.train(a, comm))


RECIPES = [("powersgd:rank=4", "auto")]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("compressor,memory", RECIPES)
def test_recipe_reaches_dense_accuracy_on_digits(compressor, memory):
    dense = _train("none")[0]
    got = _train(compressor, memory)
    assert got[0]["acc"] == got[1]["acc"]
    assert got[0]["acc"] >= dense["acc"] - 1.0, (compressor, got[0]["acc"], dense["acc"])
    assert got[0]["total"]["ratio"] > 5, got[0]["total"]
