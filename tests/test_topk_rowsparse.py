"""Sampled top-k on a row-sparse tensor (mostly exact zeros) selects among the nonzeros, not by a full top-k."""
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from gradcomp.backend import backend_by_name  # noqa: E402
from gradcomp.compressors.topk import TopKCompressor  # noqa: E402


@pytest.mark.parametrize("nrows", [5, 100])
def test_rowsparse_no_full_topk(monkeypatch, nrows):
    b = backend_by_name("torch")
    rs = np.random.RandomState(0)
    x = np.zeros((2000, 200), np.float32)
    x[rs.choice(2000, nrows, replace=False)] = rs.randn(nrows, 200)
    t = torch.from_numpy(x.reshape(-1))
    n, k = t.numel(), int(0.01 * t.numel())
    sizes, real = [], b.topk_abs
    monkeypatch.setattr(b, "topk_abs", lambda v, kk: (sizes.append(b.numel(v)), real(v, kk))[1])
    ctx = types.SimpleNamespace(backend=b, numel=n, key=lambda s: (1, 2))
    idx = TopKCompressor(ratio=0.01, mode="sampled").select(t, k, ctx)
    assert n not in sizes                      # no exact top-k over the whole tensor
    sel = idx.tolist()
    assert len(sel) == k == len(set(sel)) and sel == sorted(sel)
    nz = set(torch.nonzero(t).reshape(-1).tolist())
    assert set(sel) & nz == set(real(t, k).tolist()) & nz
