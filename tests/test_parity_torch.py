"""The compiled kernels against PyTorch: the checkpoint's parameter names are torch's, so loading
them into torch.nn.LSTM / GRU / RNN (fed one-hot vectors) plus torch.nn.Linear(H, V) must give the
same per-position NLL, final state and gradients (parameters and initial state).

torch is not a dependency of charrnn: these tests are skipped when it is not installed."""

import numpy as np
import pytest

from charrnn.model import Model, ModelConfig, param_shapes

torch = pytest.importorskip("torch")

CASES = [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]
CASE_IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
V, H, T, B = 20, 32, 10, 4

# float64: both sides compute the same sums in a different order; observed errors < 1e-13.
F64 = dict(nll=1e-10, state=1e-10, grad=1e-10)
# float32: float32 rounding on both sides (eps 6e-8, accumulated over T steps and L layers) plus the
# rational tanh/sigmoid approximation in charrnn/kernels/mathf.py (max abs error ~3e-7); torch uses
# its own float32 tanh/sigmoid and summation order. Observed: nll and state < 4e-7 absolute,
# gradients < 1.5e-6 relative to the array's largest |entry|; the tolerances are 5-7x that.
F32 = dict(nll=2e-6, state=1e-6, grad=1e-5)


def torch_modules(cell, nonlin, L, dtype):
    if cell == "lstm":
        rnn = torch.nn.LSTM(V, H, L)
    elif cell == "gru":
        rnn = torch.nn.GRU(V, H, L)
    else:
        rnn = torch.nn.RNN(V, H, L, nonlinearity=nonlin)
    dec = torch.nn.Linear(H, V)
    return rnn.to(dtype), dec.to(dtype)


def load(model, rnn, dec):
    """Copy the model's checkpoint-named parameters into the torch modules (names must all match)."""
    named = {f"rnn.{n}": p for n, p in rnn.named_parameters()}
    named.update({f"decoder.{n}": p for n, p in dec.named_parameters()})
    assert set(named) == set(param_shapes(model.cfg))
    with torch.no_grad():
        for name, value in model.params.items():
            assert tuple(named[name].shape) == value.shape, name
            named[name].copy_(torch.from_numpy(value.copy()))
    return named


@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_matches_torch(cell, nonlin, dtype, L):
    tol = F64 if dtype == np.float64 else F32
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, layers=L, hidden=H, vocab_size=V, nonlinearity=nonlin)
    m = Model(cfg, dtype=dtype).init(1)
    rng = np.random.default_rng(2)
    x = rng.integers(0, V, size=(T, B)).astype(np.int32)
    y = rng.integers(0, V, size=(T, B)).astype(np.int32)
    h, c = m.zero_state(B)
    h[:] = rng.normal(0, 0.5, h.shape)
    c[:] = rng.normal(0, 0.5, c.shape)
    out = m.forward_backward(x, y, h, c)

    rnn, dec = torch_modules(cell, nonlin, L, tdtype)
    named = load(m, rnn, dec)
    X = torch.nn.functional.one_hot(torch.from_numpy(x).long(), V).to(tdtype)  # (T, B, V)
    th0 = torch.from_numpy(h.copy()).requires_grad_(True)
    tc0 = torch.from_numpy(c.copy()).requires_grad_(True)
    if cell == "lstm":
        top, (thT, tcT) = rnn(X, (th0, tc0))
    else:
        top, thT = rnn(X, th0)
    logits = dec(top)  # (T, B, V)
    tnll = torch.nn.functional.cross_entropy(logits.reshape(T * B, V), torch.from_numpy(y).long().reshape(-1),
                                             reduction="none").reshape(T, B)
    tnll.mean().backward()

    np.testing.assert_allclose(out["nll"], tnll.detach().double().numpy(), rtol=0, atol=tol["nll"])
    assert abs(out["loss"] - float(tnll.detach().mean())) < tol["nll"]
    np.testing.assert_allclose(out["h"], thT.detach().numpy(), rtol=0, atol=tol["state"])
    if cell == "lstm":
        np.testing.assert_allclose(out["c"], tcT.detach().numpy(), rtol=0, atol=tol["state"])

    def close(ours, theirs, name):
        theirs = theirs.detach().double().numpy()
        err = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
        assert err < tol["grad"], f"{name}: {err:.2e}"

    grad = Model(cfg, dtype=dtype, theta=out["grad"].copy()).params
    for name, p in named.items():
        close(grad[name], p.grad, name)
    close(out["dh0"], th0.grad, "h0")
    if cell == "lstm":
        close(out["dc0"], tc0.grad, "c0")


@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_weight_drop_matches_torch_on_masked_recurrent_weights(cell, nonlin):
    """Weight drop as AWD-LSTM writes it in torch: the module runs with weight_hh_l{k} = raw * mask
    (torch.func.functional_call), and autograd takes the gradient back to the raw weights."""
    L, tol = 2, F64
    cfg = ModelConfig(cell=cell, layers=L, hidden=H, vocab_size=V, nonlinearity=nonlin)
    m = Model(cfg, dtype=np.float64).init(3)
    rng = np.random.default_rng(4)
    x = rng.integers(0, V, size=(T, B)).astype(np.int32)
    y = rng.integers(0, V, size=(T, B)).astype(np.int32)
    h, c = m.zero_state(B)
    wm = m.weight_masks(seed=8, step=5, p=0.5)
    out = m.forward_backward(x, y, h, c, weight_masks=wm)

    rnn, dec = torch_modules(cell, nonlin, L, torch.float64)
    named = load(m, rnn, dec)
    params = {n: p for n, p in rnn.named_parameters()}
    run_with = dict(params)
    for k in range(L):
        run_with[f"weight_hh_l{k}"] = params[f"weight_hh_l{k}"] * torch.from_numpy(wm[k].copy())
    X = torch.nn.functional.one_hot(torch.from_numpy(x).long(), V).to(torch.float64)
    h0 = torch.from_numpy(h.copy())
    state = (h0, torch.from_numpy(c.copy())) if cell == "lstm" else h0
    top, _ = torch.func.functional_call(rnn, run_with, (X, state))
    tnll = torch.nn.functional.cross_entropy(dec(top).reshape(T * B, V), torch.from_numpy(y).long().reshape(-1))
    tnll.backward()
    assert abs(out["loss"] - float(tnll.detach())) < tol["nll"]
    grad = Model(cfg, dtype=np.float64, theta=out["grad"].copy()).params
    for name, p in named.items():
        theirs = p.grad.detach().numpy()
        assert np.max(np.abs(grad[name] - theirs)) <= tol["grad"] * np.max(np.abs(theirs)), name
    assert np.all(grad["rnn.weight_hh_l0"][wm[0] == 0] == 0)
