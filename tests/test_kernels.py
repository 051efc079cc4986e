"""The compiled kernels against the plain-numpy reference (tests/reference.py), and float64
finite differences through the compiled kernels themselves."""

import numpy as np
import pytest

from charrnn import threads
from charrnn.model import Model, ModelConfig, param_shapes
from tests import reference as ref

CASES = [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]


def make(cell, nonlin, L, V=7, H=5, T=6, B=3, dtype=np.float64, seed=0, dropout=0.0):
    cfg = ModelConfig(cell=cell, layers=L, hidden=H, vocab_size=V, nonlinearity=nonlin, dropout=dropout)
    m = Model(cfg, dtype=dtype).init(seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.integers(0, V, size=(T, B)).astype(np.int32)
    y = rng.integers(0, V, size=(T, B)).astype(np.int32)
    h, c = m.zero_state(B)
    h[:] = rng.normal(0, 0.5, h.shape)
    c[:] = rng.normal(0, 0.5, c.shape)
    return m, x, y, h, c


def ref_params(m):
    return {name: v.astype(np.float64) for name, v in m.params.items()}


@pytest.mark.parametrize("cell,nonlin", CASES)
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_matches_reference_float64(cell, nonlin, L, dropout, nthreads):
    threads.set_threads(nthreads)
    m, x, y, h, c = make(cell, nonlin, L, dropout=0.3 if dropout else 0.0)
    T, B = x.shape
    masks = m.dropout_masks(T, B, seed=5, step=3) if dropout else None
    out = m.forward_backward(x, y, h, c, masks=masks)
    c0 = c if cell == "lstm" else None
    rmasks = [masks[k] for k in range(L)] if dropout else None
    loss, logits, hT, cT, grads, dh0, dc0 = ref.loss_and_grads(cell, ref_params(m), x, y, h, c0, rmasks, nonlin)
    assert abs(out["loss"] - loss) < 1e-12
    np.testing.assert_allclose(out["h"], hT, rtol=0, atol=1e-12)
    if cell == "lstm":
        np.testing.assert_allclose(out["c"], cT, rtol=0, atol=1e-12)
        np.testing.assert_allclose(out["dc0"], dc0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["dh0"], dh0, rtol=0, atol=1e-12)
    for name, g in m.params.items():
        pass
    grad = Model(m.cfg, dtype=np.float64, theta=out["grad"].copy()).params
    for name in param_shapes(m.cfg):
        np.testing.assert_allclose(grad[name], grads[name], rtol=0, atol=1e-12, err_msg=name)
