"""Proves tests/reference.py correct: float64 central finite differences of the
mean loss w.r.t. every parameter entry, h0 and c0; state-carry consistency;
all-ones dropout masks == no dropout; (optionally) agreement with torch."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref

V, H, T, B = 5, 3, 4, 2
# eps=1e-5, not 1e-6: the layer-0 gradients of a 3-layer LSTM are ~1e-4, and
# with eps=1e-6 FD roundoff alone gives rel. errors ~1e-6; at 1e-5 all are <1e-7.
EPS = 1e-5
TOL = 1e-6
RELU_MARGIN = 1e-4   # no relu pre-activation may be closer than this to 0

CELLS = [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]
CELL_IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def rel_error(a, n):
    """torch-rnn style: max |a - n| / max(|a| + |n|)  (0 if both are ~0)."""
    a = np.asarray(a, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    return np.max(np.abs(a - n)) / max(np.max(np.abs(a) + np.abs(n)), 1e-300)


def make_problem(cell, L, seed, dropout, p=0.5):
    rng = np.random.default_rng(seed)
    params = ref.init_params(cell, V, H, L, rng)
    x = rng.integers(0, V, size=(T, B))
    y = rng.integers(0, V, size=(T, B))
    h0 = rng.uniform(-0.5, 0.5, size=(L, B, H))
    c0 = rng.uniform(-0.5, 0.5, size=(L, B, H)) if cell == "lstm" else None
    masks = None
    if dropout:
        masks = [(rng.random((T, B, H)) >= p) / (1.0 - p) for _ in range(L)]
    return params, x, y, h0, c0, masks


def relu_pattern(cache):
    return np.concatenate([(a > 0).ravel() for a in ref.relu_preactivations(cache)])


def find_problem(cell, nonlin, L, dropout):
    """For relu, pick the first seed whose pre-activations all avoid the kink."""
    for seed in range(1000 + 10 * L + dropout, 2000):
        prob = make_problem(cell, L, seed, dropout)
        if nonlin != "relu":
            return prob
        params, x, y, h0, c0, masks = prob
        cache = ref.forward(cell, params, x, y, h0, c0, masks, nonlin)[4]
        pre = ref.relu_preactivations(cache)
        if min(np.min(np.abs(a)) for a in pre) > RELU_MARGIN:
            # also insist that the relu units are not all dead
            if relu_pattern(cache).mean() > 0.3:
                return prob
    raise RuntimeError("no kink-free seed found")


def fd_check_array(f, arr, analytic, name, nonlin, min_frac=0.9):
    """Central differences of f() w.r.t. every entry of arr (perturbed in place).
    f returns (loss, relu_pattern or None). For relu, entries whose
    perturbation flips any relu unit are skipped (kink); at least min_frac of
    the entries must be checked."""
    base_pat = f()[1]
    numeric = np.zeros_like(arr)
    checked = np.zeros(arr.shape, dtype=bool)
    for idx in np.ndindex(*arr.shape):
        old = arr[idx]
        arr[idx] = old + EPS
        lp, pat_p = f()
        arr[idx] = old - EPS
        lm, pat_m = f()
        arr[idx] = old
        if nonlin == "relu" and not (np.array_equal(pat_p, base_pat)
                                     and np.array_equal(pat_m, base_pat)):
            continue
        numeric[idx] = (lp - lm) / (2 * EPS)
        checked[idx] = True
    assert checked.mean() >= min_frac, "%s: too many kink entries skipped" % name
    err = rel_error(analytic[checked], numeric[checked])
    assert err < TOL, "%s: relative error %.3e" % (name, err)
    return err


@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "drop"])
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("cell,nonlin", CELLS, ids=CELL_IDS)
def test_gradients_finite_differences(cell, nonlin, L, dropout):
    params, x, y, h0, c0, masks = find_problem(cell, nonlin, L, dropout)
    loss, logits, hT, cT, grads, dh0, dc0 = ref.loss_and_grads(
        cell, params, x, y, h0, c0, masks, nonlin)

    def f():
        l, _, _, _, cache = ref.forward(cell, params, x, y, h0, c0, masks, nonlin)
        return l, (relu_pattern(cache) if nonlin == "relu" else None)

    assert set(grads) == set(params)
    for name, p in params.items():
        assert grads[name].shape == p.shape
        fd_check_array(f, p, grads[name], name, nonlin)
    fd_check_array(f, h0, dh0, "h0", nonlin)
    if cell == "lstm":
        fd_check_array(f, c0, dc0, "c0", nonlin)
    else:
        assert dc0 is None and cT is None


@pytest.mark.parametrize("cell,nonlin", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "drop"])
def test_state_carry(cell, nonlin, dropout):
    """T-step forward == T chained single-step forwards."""
    L = 2
    params, x, y, h0, c0, masks = make_problem(cell, L, 7, dropout)
    loss, logits, hT, cT, _ = ref.forward(cell, params, x, y, h0, c0, masks, nonlin)
    h, c = h0, c0
    step_logits, step_losses = [], []
    for t in range(T):
        m = None if masks is None else [mk[t:t + 1] for mk in masks]
        l, lg, h, c, _ = ref.forward(cell, params, x[t:t + 1], y[t:t + 1],
                                     h, c, m, nonlin)
        step_logits.append(lg)
        step_losses.append(l)
    np.testing.assert_allclose(h, hT, rtol=0, atol=1e-13)
    if cell == "lstm":
        np.testing.assert_allclose(c, cT, rtol=0, atol=1e-13)
    else:
        assert c is None and cT is None
    np.testing.assert_allclose(np.concatenate(step_logits), logits, rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.mean(step_losses), loss, rtol=1e-13)


@pytest.mark.parametrize("cell,nonlin", CELLS, ids=CELL_IDS)
def test_all_ones_masks_equal_no_dropout(cell, nonlin):
    L = 2
    params, x, y, h0, c0, _ = make_problem(cell, L, 11, False)
    ones = [np.ones((T, B, H)) for _ in range(L)]
    a = ref.loss_and_grads(cell, params, x, y, h0, c0, None, nonlin)
    b = ref.loss_and_grads(cell, params, x, y, h0, c0, ones, nonlin)
    assert a[0] == b[0]
    for i in (1, 2, 5):
        np.testing.assert_array_equal(a[i], b[i])
    if cell == "lstm":
        np.testing.assert_array_equal(a[3], b[3])
        np.testing.assert_array_equal(a[6], b[6])
    for name in params:
        np.testing.assert_array_equal(a[4][name], b[4][name])


def test_dropout_mask_changes_result():
    params, x, y, h0, c0, masks = make_problem("lstm", 2, 3, True)
    l0 = ref.forward("lstm", params, x, y, h0, c0, None)[0]
    l1 = ref.forward("lstm", params, x, y, h0, c0, masks)[0]
    assert l0 != l1


def test_param_shapes_and_init():
    shapes = ref.param_shapes("gru", 7, 4, 2)
    assert list(shapes.items()) == [
        ("rnn.weight_ih_l0", (12, 7)), ("rnn.weight_hh_l0", (12, 4)),
        ("rnn.bias_ih_l0", (12,)), ("rnn.bias_hh_l0", (12,)),
        ("rnn.weight_ih_l1", (12, 4)), ("rnn.weight_hh_l1", (12, 4)),
        ("rnn.bias_ih_l1", (12,)), ("rnn.bias_hh_l1", (12,)),
        ("decoder.weight", (7, 4)), ("decoder.bias", (7,))]
    assert ref.param_shapes("lstm", 5, 3, 1)["rnn.weight_ih_l0"] == (12, 5)
    assert ref.param_shapes("rnn", 5, 3, 1)["rnn.weight_hh_l0"] == (3, 3)
    p = ref.init_params("lstm", 50, 16, 2, np.random.default_rng(0))
    assert list(p) == list(ref.param_shapes("lstm", 50, 16, 2))
    for name, a in p.items():
        assert a.dtype == np.float64
        assert np.all(np.abs(a) <= 0.25) and np.max(np.abs(a)) > 0.2


@pytest.mark.parametrize("cell,nonlin", CELLS, ids=CELL_IDS)
def test_matches_torch_if_available(cell, nonlin):
    """Independent check of the forward equations / gate orders (no dropout)."""
    torch = pytest.importorskip("torch")
    L = 2
    params, x, y, h0, c0, _ = make_problem(cell, L, 5, False)
    loss, logits, hT, cT, grads, dh0, dc0 = ref.loss_and_grads(
        cell, params, x, y, h0, c0, None, nonlin)

    if cell == "lstm":
        rnn = torch.nn.LSTM(V, H, L)
    elif cell == "gru":
        rnn = torch.nn.GRU(V, H, L)
    else:
        rnn = torch.nn.RNN(V, H, L, nonlinearity=nonlin)
    rnn = rnn.double()
    tp = {}
    for name, p in rnn.named_parameters():
        p.data = torch.tensor(params["rnn." + name])
        tp["rnn." + name] = p
    Wd = torch.tensor(params["decoder.weight"], requires_grad=True)
    bd = torch.tensor(params["decoder.bias"], requires_grad=True)
    tp["decoder.weight"], tp["decoder.bias"] = Wd, bd
    assert set(tp) == set(params)
    th0 = torch.tensor(h0, requires_grad=True)
    inp = torch.nn.functional.one_hot(torch.tensor(x), V).double()
    if cell == "lstm":
        tc0 = torch.tensor(c0, requires_grad=True)
        out, (thT, tcT) = rnn(inp, (th0, tc0))
    else:
        out, thT = rnn(inp, th0)
    tlogits = out @ Wd.T + bd
    tloss = torch.nn.functional.cross_entropy(tlogits.reshape(-1, V),
                                              torch.tensor(y).reshape(-1))
    tloss.backward()

    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-12)
    np.testing.assert_allclose(logits, tlogits.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(hT, thT.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(dh0, th0.grad.numpy(), atol=1e-12)
    if cell == "lstm":
        np.testing.assert_allclose(cT, tcT.detach().numpy(), atol=1e-12)
        np.testing.assert_allclose(dc0, tc0.grad.numpy(), atol=1e-12)
    for name in params:
        np.testing.assert_allclose(grads[name], tp[name].grad.numpy(),
                                   atol=1e-12, err_msg=name)
