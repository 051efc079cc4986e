"""The compiled kernels against the plain-numpy reference (tests/reference.py), and float64
finite differences through the compiled kernels themselves; float32 accuracy, the one-hot gather,
thread-count determinism, state carry, dropout masks, and the generation loop and sampler."""

import numpy as np
import pytest

from charrnn import threads
from charrnn.kernels import core
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
    grad = Model(m.cfg, dtype=np.float64, theta=out["grad"].copy()).params
    for name in param_shapes(m.cfg):
        np.testing.assert_allclose(grad[name], grads[name], rtol=0, atol=1e-12, err_msg=name)


# ----------------------------------------------------------------------------- shared helpers
CASE_IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


@pytest.fixture
def restore_threads():
    n = threads.get_threads()
    yield
    threads.set_threads(n)


def two_threads():
    """Switch to 2 threads, or skip when the machine cannot give them."""
    if threads.set_threads(2) != 2:
        pytest.skip("needs 2 Numba threads")


def rel_error(a, n):
    """torch-rnn style: max |a - n| / max(|a| + |n|)  (0 when both are 0)."""
    a = np.asarray(a, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    return float(np.max(np.abs(a - n)) / max(np.max(np.abs(a) + np.abs(n)), 1e-300))


def ref_run(m, x, y, h, c, masks=None):
    """The float64 reference on the model's parameters (promoted): (loss, logits, hT, cT, grads, dh0, dc0)."""
    cell, nonlin, L = m.cfg.cell, m.cfg.nonlinearity, m.cfg.layers
    c0 = c.astype(np.float64) if cell == "lstm" else None
    rmasks = [masks[k].astype(np.float64) for k in range(L)] if masks is not None else None
    return ref.loss_and_grads(cell, ref_params(m), x, y, h.astype(np.float64), c0, rmasks, nonlin)


def ref_nll(logits, y):
    """Per-position -log p(y) (T, B) from reference logits (T, B, V)."""
    return -np.take_along_axis(ref.log_softmax(logits), y[..., None], axis=-1)[..., 0]


def grad_views(m, grad):
    return Model(m.cfg, dtype=grad.dtype, theta=grad.copy()).params


# ----------------------------------------------------------------------------- 1. finite differences
# Same sizes, step and tolerance as tests/test_reference.py (which explains the choice of EPS), but
# through the compiled float64 kernels: Model(..., dtype=np.float64).forward_backward.
FD_EPS = 1e-5
FD_TOL = 1e-6
RELU_MARGIN = 1e-4  # no relu pre-activation within this distance of the kink


def fd_problem(cell, nonlin, L, dropout):
    """A tiny problem; for relu the first seed whose pre-activations all avoid the kink."""
    for seed in range(100, 400):
        m, x, y, h, c = make(cell, nonlin, L, V=5, H=3, T=4, B=2, seed=seed, dropout=0.4 if dropout else 0.0)
        masks = m.dropout_masks(4, 2, seed=seed, step=1) if dropout else None
        if nonlin != "relu":
            return m, x, y, h, c, masks
        rmasks = [masks[k] for k in range(L)] if dropout else None
        cache = ref.forward(cell, ref_params(m), x, y, h, None, rmasks, nonlin)[4]
        pre = np.concatenate([a.ravel() for a in ref.relu_preactivations(cache)])
        if np.min(np.abs(pre)) > RELU_MARGIN and np.mean(pre > 0) > 0.3:
            return m, x, y, h, c, masks
    raise RuntimeError("no kink-free seed found")


def fd_check(loss, arr, analytic, name):
    """Central differences of loss() w.r.t. every entry of arr (perturbed in place)."""
    numeric = np.zeros(arr.shape)
    for idx in np.ndindex(*arr.shape):
        old = arr[idx]
        arr[idx] = old + FD_EPS
        lp = loss()
        arr[idx] = old - FD_EPS
        lm = loss()
        arr[idx] = old
        numeric[idx] = (lp - lm) / (2 * FD_EPS)
    assert np.max(np.abs(numeric)) > 0, f"{name}: loss does not depend on it"
    err = rel_error(analytic, numeric)
    assert err < FD_TOL, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "drop"])
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_finite_differences_through_kernels(cell, nonlin, L, dropout):
    m, x, y, h, c, masks = fd_problem(cell, nonlin, L, dropout)
    if dropout:
        assert 0 < np.mean(masks == 0) < 1  # the fixed mask really drops something
    out = m.forward_backward(x, y, h, c, masks=masks)
    grads = grad_views(m, out["grad"])
    dh0, dc0 = out["dh0"].copy(), out["dc0"].copy()

    def loss():
        return m.forward_backward(x, y, h, c, masks=masks, backward=False)["loss"]

    assert abs(loss() - out["loss"]) == 0  # the forward-only path gives the same loss
    for name, p in m.params.items():  # every array, every entry (views into theta)
        fd_check(loss, p, grads[name], name)
    fd_check(loss, h, dh0, "h0")
    if cell == "lstm":
        fd_check(loss, c, dc0, "c0")
    else:
        assert not np.any(dc0)


# ----------------------------------------------------------------------------- 2. float32 kernels
# float32 kernels against the float64 reference run on the same (float32-representable) weights.
# Error sources: float32 rounding (eps 6e-8) accumulated over T=10 steps and 3 layers, plus the
# rational tanh/sigmoid approximation in core.py (max abs error ~3e-7). Observed: nll and state
# <= 1.1e-7, gradients <= 5e-7 of each array's largest entry. Tolerances are ~10x that.
F32_NLL_ATOL = 1e-6  # per-position nll (values ~3 nats) and the mean loss
F32_STATE_ATOL = 1e-6  # h, c
F32_GRAD_RTOL = 5e-6  # max |error| / max |gradient|, per array and for dh0, dc0


@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "drop"])
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_float32_matches_reference(cell, nonlin, L, dropout):
    m64, x, y, h, c = make(cell, nonlin, L, V=20, H=32, T=10, B=4, seed=3, dropout=0.3 if dropout else 0.0)
    m = Model(m64.cfg, dtype=np.float32, theta=m64.theta.astype(np.float32))
    h, c = h.astype(np.float32), c.astype(np.float32)
    masks = m.dropout_masks(10, 4, seed=1, step=2) if dropout else None
    out = m.forward_backward(x, y, h, c, masks=masks)
    loss, logits, hT, cT, grads, dh0, dc0 = ref_run(m, x, y, h, c, masks)
    assert out["nll"].dtype == np.float64 and out["h"].dtype == np.float32
    np.testing.assert_allclose(out["nll"], ref_nll(logits, y), rtol=0, atol=F32_NLL_ATOL)
    assert abs(out["loss"] - loss) < F32_NLL_ATOL
    np.testing.assert_allclose(out["h"], hT, rtol=0, atol=F32_STATE_ATOL)
    if cell == "lstm":
        np.testing.assert_allclose(out["c"], cT, rtol=0, atol=F32_STATE_ATOL)
        assert rel_error(out["dc0"], dc0) < F32_GRAD_RTOL
    g = grad_views(m, out["grad"])
    for name in param_shapes(m.cfg):
        err = np.max(np.abs(g[name] - grads[name])) / np.max(np.abs(grads[name]))
        assert err < F32_GRAD_RTOL, f"{name}: {err:.2e}"
    assert np.max(np.abs(out["dh0"] - dh0)) / np.max(np.abs(dh0)) < F32_GRAD_RTOL


# ----------------------------------------------------------------------------- 3. one-hot gather
@pytest.mark.parametrize("dtype,atol", [(np.float64, 1e-15), (np.float32, 1e-6)])
def test_one_hot_gather_equals_one_hot_product(dtype, atol):
    """Layer 0 gathers columns of W_ih; Vocab.one_hot(ids) @ W_ih.T is the same thing.

    A 1-layer tanh RNN with W_hh = 0 and T = 1: h = tanh(onehot @ W_ih^T + b_ih + b_hh). Every id
    appears twice among the streams, so the backward's scatter-add must accumulate repeated ids.
    """
    from charrnn.vocab import Vocab

    vocab = Vocab.from_text("the quick brown fox")
    V, H = vocab.size, 6
    m = Model(ModelConfig(cell="rnn", layers=1, hidden=H, vocab_size=V), dtype=dtype).init(4)
    m.params["rnn.weight_hh_l0"][:] = 0
    ids = np.concatenate([np.arange(V), np.arange(V)[::-1]]).astype(np.int32)[None, :]  # (1, B)
    y = np.roll(ids, 3, axis=1).astype(np.int32)
    B = ids.shape[1]
    h, c = m.zero_state(B)
    h[:] = np.random.default_rng(0).normal(size=h.shape)  # ignored: W_hh = 0
    out = m.forward_backward(ids, y, h, c)

    X = vocab.one_hot(ids[0], dtype=np.float64)  # (B, V), a real one-hot matrix
    assert X.shape == (B, V) and np.all(X.sum(axis=1) == 1)
    W, b = m.params["rnn.weight_ih_l0"].astype(np.float64), m.params["rnn.bias_ih_l0"] + m.params["rnn.bias_hh_l0"]
    hp = np.tanh(X @ W.T + b)  # (B, H)
    np.testing.assert_allclose(out["h"][0], hp, rtol=0, atol=atol)
    # the gradient of W_ih_l0 is a product with the same one-hot matrix
    Wd, bd = m.params["decoder.weight"].astype(np.float64), m.params["decoder.bias"]
    P = np.exp(ref.log_softmax(hp @ Wd.T + bd))  # (B, V)
    dlogits = (P - np.eye(V)[y[0]]) / B
    dpre = (dlogits @ Wd) * (1 - hp**2)  # (B, H)
    gW = grad_views(m, out["grad"])["rnn.weight_ih_l0"]
    np.testing.assert_allclose(gW, dpre.T @ X, rtol=0, atol=10 * atol)
    np.testing.assert_allclose(out["nll"][0], -np.log(P[np.arange(B), y[0]]), rtol=0, atol=10 * atol)


# ----------------------------------------------------------------------------- 4. threads
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_thread_count_determinism(cell, nonlin, dtype, rtol, restore_threads):
    m64, x, y, h, c = make(cell, nonlin, 2, V=11, H=16, T=8, B=5, seed=9, dropout=0.2)
    theta = m64.theta.astype(dtype)
    h, c = h.astype(dtype), c.astype(dtype)
    keys = ("nll", "h", "c", "grad", "dh0", "dc0")

    def run(model):
        masks = model.dropout_masks(8, 5, seed=2, step=7)
        out = model.forward_backward(x, y, h, c, masks=masks)
        return {k: out[k].copy() for k in keys}

    results = {}
    for n in (1, 2):
        if n == 2:
            two_threads()
        else:
            threads.set_threads(1)
        m = Model(m64.cfg, dtype=dtype, theta=theta.copy())
        first, second = run(m), run(m)  # same model (workspace reused) ...
        third = run(Model(m64.cfg, dtype=dtype, theta=theta.copy()))  # ... and a fresh one
        for k in keys:
            np.testing.assert_array_equal(first[k], second[k], err_msg=f"{n} threads, {k}")
            np.testing.assert_array_equal(first[k], third[k], err_msg=f"{n} threads, {k}")
        results[n] = first
    for k in keys:
        scale = max(np.max(np.abs(results[1][k])), 1e-30)
        np.testing.assert_allclose(results[2][k], results[1][k], rtol=0, atol=rtol * scale, err_msg=k)


# ----------------------------------------------------------------------------- 5. state carry
@pytest.mark.parametrize("dtype,atol", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_state_carry_chained_batches(cell, nonlin, dtype, atol):
    m64, x, y, h, c = make(cell, nonlin, 2, V=9, H=8, T=7, B=3, seed=11)
    m = Model(m64.cfg, dtype=dtype, theta=m64.theta.astype(dtype))
    h, c = h.astype(dtype), c.astype(dtype)
    full = m.forward_backward(x, y, h, c, backward=False)
    T1 = 3
    a = m.forward_backward(np.ascontiguousarray(x[:T1]), np.ascontiguousarray(y[:T1]), h, c, backward=False)
    b = m.forward_backward(np.ascontiguousarray(x[T1:]), np.ascontiguousarray(y[T1:]), a["h"], a["c"], backward=False)
    assert not np.allclose(a["h"], full["h"], atol=1e-3)  # the state really moves
    np.testing.assert_allclose(b["h"], full["h"], rtol=0, atol=atol)
    np.testing.assert_allclose(b["c"], full["c"], rtol=0, atol=atol)
    np.testing.assert_allclose(np.concatenate([a["nll"], b["nll"]]), full["nll"], rtol=0, atol=atol)


# ----------------------------------------------------------------------------- 5b. scoring one stream
@pytest.mark.parametrize("nthreads,chunk", [(1, 256), (2, 3), (2, 256)], ids=["1thr", "2thr-chunk3", "2thr-chunk256"])
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_score_matches_reference(cell, nonlin, L, nthreads, chunk, restore_threads, monkeypatch):
    """Model.score (the layer pipeline with 2 threads and 2+ layers, else the batch forward) gives
    the reference's -log p(y) at every position and its final state, whatever the chunking."""
    if nthreads == 2:
        two_threads()
    else:
        threads.set_threads(1)
    monkeypatch.setattr(Model, "PIPE_CHUNK", chunk)
    m, x, y, h, c = make(cell, nonlin, L, V=9, H=8, T=23, B=1, seed=31)
    _loss, logits, hT, cT, *_ = ref_run(m, x, y, h, c)
    h1, c1 = h.copy(), c.copy()
    nll = m.score(x[:, 0], y[:, 0], h1, c1)
    np.testing.assert_allclose(nll, ref_nll(logits, y)[:, 0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(h1, hT, rtol=0, atol=1e-12)
    if cell == "lstm":
        np.testing.assert_allclose(c1, cT, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_score_float32_pipeline_equals_batch_forward(cell, nonlin, restore_threads, monkeypatch):
    """In float32 the pipeline and the batch forward agree to rounding (same products, same order
    within a chunk), so eval and the training-time forward are interchangeable."""
    two_threads()
    m64, x, y, h, c = make(cell, nonlin, 2, V=9, H=32, T=300, B=1, seed=7)
    m = Model(m64.cfg, dtype=np.float32, theta=m64.theta.astype(np.float32))
    h, c = h.astype(np.float32), c.astype(np.float32)
    full = m.forward_backward(x, y, h, c, backward=False)
    monkeypatch.setattr(Model, "PIPE_CHUNK", 64)
    h1, c1 = h.copy(), c.copy()
    nll = m.score(x[:, 0], y[:, 0], h1, c1)
    np.testing.assert_allclose(nll, full["nll"][:, 0], rtol=0, atol=2e-5)
    np.testing.assert_allclose(h1, full["h"], rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype,atol", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_feed_matches_forward(cell, nonlin, dtype, atol):
    """Model.feed (single steps) ends in the state forward_backward ends in, and its logits are the
    reference's logits at the last step."""
    m64, _, _, h, c = make(cell, nonlin, 2, V=9, H=8, T=7, B=3, seed=12)
    m = Model(m64.cfg, dtype=dtype, theta=m64.theta.astype(dtype))
    h, c = h.astype(dtype), c.astype(dtype)
    tokens = np.array([0, 4, 4, 8, 1, 3, 2], dtype=np.int32)
    x = np.ascontiguousarray(np.repeat(tokens[:, None], 3, axis=1))  # feed is lock step: same ids
    y = np.ascontiguousarray(np.roll(x, -1, axis=0))
    out = m.forward_backward(x, y, h, c, backward=False)
    hf, cf = h.copy(), c.copy()
    logits = m.feed(tokens, hf, cf)  # updates hf, cf in place
    assert logits.shape == (3, 9) and logits.dtype == dtype
    np.testing.assert_allclose(hf, out["h"], rtol=0, atol=atol)
    if cell == "lstm":  # c is unused (and left alone by feed, zero from forward_backward) otherwise
        np.testing.assert_allclose(cf, out["c"], rtol=0, atol=atol)
    ref_logits = ref_run(m, x, y, h, c)[1]
    np.testing.assert_allclose(logits, ref_logits[-1], rtol=0, atol=5 * atol)
    # feeding in two pieces continues from the carried state
    h2, c2 = h.copy(), c.copy()
    m.feed(tokens[:4], h2, c2)
    logits2 = m.feed(tokens[4:], h2, c2)
    np.testing.assert_array_equal(logits2, logits)
    np.testing.assert_array_equal(h2, hf)


# ----------------------------------------------------------------------------- 6. dropout masks
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_masks(p, dtype, restore_threads):
    cfg = ModelConfig(cell="lstm", layers=2, hidden=64, vocab_size=10, dropout=p)
    m = Model(cfg, dtype=dtype)
    T, B = 50, 20  # 128000 elements: the zero fraction has std ~0.0014
    a = m.dropout_masks(T, B, seed=3, step=10)
    assert a.shape == (2, T, B, 64) and a.dtype == dtype
    keep = dtype(1.0 / (1.0 - p))
    assert np.all((a == 0) | (a == keep))
    assert abs(np.mean(a == 0) - p) < 0.01
    for k in range(2):  # every layer, and every time step, drops about p
        assert abs(np.mean(a[k] == 0) - p) < 0.02
    assert np.all(np.abs(np.mean(a == 0, axis=(0, 2, 3)) - p) < 0.08)
    np.testing.assert_array_equal(m.dropout_masks(T, B, seed=3, step=10), a)  # (seed, step) decide it
    for other in (m.dropout_masks(T, B, seed=3, step=11), m.dropout_masks(T, B, seed=4, step=10)):
        agree = np.mean((other == 0) == (a == 0))
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01  # independent, not shifted copies
    assert abs(np.mean((a[0] == 0) == (a[1] == 0)) - (p * p + (1 - p) ** 2)) < 0.01
    threads.set_threads(1)
    one = m.dropout_masks(T, B, seed=3, step=10)
    two_threads()
    np.testing.assert_array_equal(one, a)
    np.testing.assert_array_equal(m.dropout_masks(T, B, seed=3, step=10), a)


def test_dropout_mask_p_zero_is_all_ones():
    m = Model(ModelConfig(cell="gru", layers=1, hidden=8, vocab_size=6, dropout=0.0))
    assert np.all(m.dropout_masks(5, 3, seed=1, step=1) == 1)


# ----------------------------------------------------------------------------- 8. generation


def gen_model(cell="lstm", nonlin="tanh", V=12, H=16, L=2, seed=21):
    m = Model(ModelConfig(cell=cell, layers=L, hidden=H, vocab_size=V, nonlinearity=nonlin)).init(seed)
    m.params["decoder.weight"][:] *= 6  # sharper distributions than at init, so ranks matter
    m.refresh()
    return m


def gen_start(m, nb, seed=0):
    rng = np.random.default_rng(seed)
    h, c = m.zero_state(nb)
    h[:] = rng.normal(0, 0.5, h.shape)
    c[:] = rng.normal(0, 0.5, c.shape)
    tok = rng.integers(0, m.cfg.vocab_size, nb).astype(np.int32)
    return tok, h, c


def run_generate(m, tok, h, c, n, temp=1.0, top_k=0, top_p=1.0, banned=(), end_id=-1, seed=5):
    """Generate from copies of (tok, h, c); returns (out, steps, done, h, c)."""
    V, nb = m.cfg.vocab_size, tok.shape[0]
    tok, h, c = tok.copy(), h.copy(), c.copy()
    out = np.full((n, nb), -7, dtype=np.int32)
    ban = np.zeros(V, dtype=np.bool_)
    ban[list(banned)] = True
    done = np.zeros(nb, dtype=np.bool_)
    steps = m.generate(tok, h, c, out, temp, top_k, top_p, ban, end_id, done, core._seed_state(seed))
    return out, steps, done, h, c


def replay_logits(m, tok, h, c, out):
    """The logits each generated token was drawn from: step the same streams through core._step
    (what Model.feed and Model.generate run) with the previously generated tokens."""
    cfg = m.cfg
    nb = tok.shape[0]
    tok, h, c = tok.copy(), h.copy(), c.copy()
    ws = m._step_workspace(nb)
    views = core._step_views(ws, cfg.cell_id, nb, cfg.hidden, cfg.vocab_size)
    logits = np.zeros((nb, cfg.vocab_size), dtype=m.dtype)
    all_logits = []
    for s in range(out.shape[0]):
        core._step(cfg.cell_id, cfg.layers, cfg.hidden, cfg.vocab_size, m.theta, m.params.table, m._w0t,
                   tok, h, c, logits, *views)
        all_logits.append(logits.astype(np.float64))
        tok = np.where(out[s] >= 0, out[s], tok).astype(np.int32)
    return np.array(all_logits), h, c  # (n, nb, V)


@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_greedy_is_argmax_of_feed_logits(cell, nonlin):
    m = gen_model(cell, nonlin, seed=29)
    tok, h, c = gen_start(m, 1)
    n = 20
    out, steps, done, hg, cg = run_generate(m, tok, h, c, n, temp=0.0, seed=1)
    again = run_generate(m, tok, h, c, n, temp=0.0, seed=2)[0]  # greedy ignores the rng
    assert steps == n and not done.any()
    np.testing.assert_array_equal(out, again)
    hf, cf = h.copy(), c.copy()
    logits = m.feed([tok[0]], hf, cf)
    for s in range(n):
        assert out[s, 0] == np.argmax(logits[0]), f"step {s}"
        if s < n - 1:
            logits = m.feed([out[s, 0]], hf, cf)
    np.testing.assert_array_equal(hf, hg)  # generate leaves the state after its last input
    np.testing.assert_array_equal(cf, cg)
    assert len(set(out[:, 0])) > 1  # not a trivially constant sequence


def test_top_k_never_leaves_the_top_k():
    m = gen_model()
    tok, h, c = gen_start(m, 4)
    k, n = 3, 60

    def ranks(out):
        lg = replay_logits(m, tok, h, c, out)[0]
        chosen = np.take_along_axis(lg, out[..., None].astype(np.int64), axis=-1)
        return np.sum(lg > chosen, axis=-1)  # (n, nb): how many logits beat the chosen one

    out = run_generate(m, tok, h, c, n, temp=2.0, top_k=k)[0]
    assert ranks(out).max() < k
    assert ranks(out).max() == k - 1  # the k-th is reachable
    free = run_generate(m, tok, h, c, n, temp=2.0, top_k=0)[0]
    assert ranks(free).max() >= k  # without top-k the test would notice
    one = run_generate(m, tok, h, c, n, temp=2.0, top_k=1)[0]
    np.testing.assert_array_equal(one, run_generate(m, tok, h, c, n, temp=0.0)[0])
    # top_p: every token is inside the smallest prefix with mass >= p of softmax(logits / temp)
    p = 0.6
    out = run_generate(m, tok, h, c, n, temp=1.0, top_p=p)[0]
    lg = replay_logits(m, tok, h, c, out)[0]
    for s in range(n):
        for b in range(4):
            z = lg[s, b]
            order = np.argsort(-z, kind="stable")
            q = np.exp(z[order] - z.max())
            q /= q.sum()
            keep = order[: int(np.searchsorted(np.cumsum(q), p)) + 1]
            assert out[s, b] in keep


def test_banned_tokens_never_appear():
    m = gen_model()
    banned = [0, 3, 5]
    m.params["decoder.bias"][banned] += 4.0  # make them the likeliest tokens
    tok, h, c = gen_start(m, 4)
    for kw in (dict(temp=1.0), dict(temp=0.0), dict(temp=1.5, top_k=4), dict(temp=1.0, top_p=0.9)):
        free = run_generate(m, tok, h, c, 40, **kw)[0]
        assert np.isin(free, banned).any(), kw
        out = run_generate(m, tok, h, c, 40, banned=banned, **kw)[0]
        assert not np.isin(out, banned).any(), kw
        assert np.all(out >= 0)


def test_end_token_marks_stream_done():
    m = gen_model()
    end = 1
    m.params["decoder.bias"][end] += 2.0
    tok, h, c = gen_start(m, 6)
    n = 60
    out, steps, done, _, _ = run_generate(m, tok, h, c, n, end_id=end, seed=3)
    assert done.all() and steps < n  # all streams ended, and the loop stopped early
    assert np.all(out[steps:] == -7)  # rows past the returned count are not written
    lengths = []
    for b in range(6):
        seq = out[:steps, b]
        i = int(np.argmax(seq == end))
        assert seq[i] == end
        assert np.all(seq[:i] >= 0) and np.all(seq[:i] != end)
        assert np.all(seq[i + 1 :] == -1)
        lengths.append(i)
    assert len(set(lengths)) > 1  # streams end at different steps
    # end_id = -1: nothing stops
    out, steps, done, _, _ = run_generate(m, tok, h, c, n, end_id=-1, seed=3)
    assert steps == n and not done.any() and np.all(out >= 0) and np.any(out == end)
    # a stream already done at the start emits nothing
    V = m.cfg.vocab_size
    o = np.full((5, 6), -7, dtype=np.int32)
    d = np.array([True, False, True, False, False, False])
    ban = np.zeros(V, np.bool_)
    steps = m.generate(tok.copy(), h.copy(), c.copy(), o, 1.0, 0, 1.0, ban, -1, d, core._seed_state(0))
    assert steps == 5 and np.all(o[:, d] == -1) and np.all(o[:, ~d] >= 0)


def test_same_seed_same_tokens():
    m = gen_model()
    tok, h, c = gen_start(m, 3)
    a = run_generate(m, tok, h, c, 30, seed=7)
    b = run_generate(m, tok, h, c, 30, seed=7)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], run_generate(m, tok, h, c, 30, seed=8)[0])
    s = core._seed_state(7)
    assert s.dtype == np.uint64 and s.shape == (1,)
    np.testing.assert_array_equal(s, core._seed_state(7))
    assert s[0] != core._seed_state(8)[0]


def draw_counts(z, n, temp=1.0, top_k=0, top_p=1.0, banned=None, seed=0):
    V = z.shape[0]
    banned = np.zeros(V, np.bool_) if banned is None else banned
    state = core._seed_state(seed)
    scratch, order = np.empty(V), np.empty(V, np.int64)
    counts = np.zeros(V, dtype=np.int64)
    for _ in range(n):
        counts[core._draw(z, temp, top_k, top_p, banned, state, scratch, order)] += 1
    return counts


def chi2_ok(counts, probs):
    """Pearson chi-square over the tokens with positive probability; none outside them."""
    from scipy.stats import chi2

    keep = probs > 0
    assert np.all(counts[~keep] == 0), "drew a token of probability 0"
    if keep.sum() == 1:
        return True
    n = counts.sum()
    e = n * probs[keep]
    stat = np.sum((counts[keep] - e) ** 2 / e)
    return stat < chi2.ppf(1 - 1e-6, keep.sum() - 1)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize("temp", [1.0, 0.6])
def test_draw_frequencies_match_softmax(temp):
    z = np.random.default_rng(1).normal(0, 1.5, 10)
    probs = softmax(z / temp)
    counts = draw_counts(z, 60000, temp=temp)
    assert chi2_ok(counts, probs)
    assert not chi2_ok(counts, softmax(z / (temp * 0.8)))  # the test can tell temperatures apart
    # banned ids get probability 0, the rest renormalise
    ban = np.zeros(10, np.bool_)
    ban[[int(np.argmax(z)), 4]] = True
    pb = np.where(ban, 0.0, probs)
    assert chi2_ok(draw_counts(z, 40000, temp=temp, banned=ban), pb / pb.sum())


def test_draw_top_k_and_top_p_frequencies():
    z = np.random.default_rng(2).normal(0, 1.5, 10)
    probs = softmax(z)
    order = np.argsort(-z)
    # top-k: exactly the k largest logits, renormalised
    pk = np.zeros(10)
    pk[order[:4]] = probs[order[:4]]
    assert chi2_ok(draw_counts(z, 40000, top_k=4), pk / pk.sum())
    # top-p: the smallest prefix (by probability) with mass >= p, renormalised
    cum = np.cumsum(probs[order])
    for p in (0.3, 0.6, 0.9, 0.96):
        n_keep = int(np.searchsorted(cum, p)) + 1
        assert np.min(np.abs(cum - p)) > 1e-3  # not on a boundary
        pp = np.zeros(10)
        pp[order[:n_keep]] = probs[order[:n_keep]]
        assert chi2_ok(draw_counts(z, 40000, top_p=p), pp / pp.sum()), p
    # a top-1 prefix: the argmax only
    assert np.all(draw_counts(z, 1000, top_p=1e-9)[order[1:]] == 0)


def assert_batch_matches_reference(m, x, y, h, c, masks, cell, nonlin):
    """A float64 forward/backward with dropout masks equals the reference: loss, final state,
    initial-state gradients and every parameter's gradient."""
    out = m.forward_backward(x, y, h, c, masks=masks)
    c0 = c if cell == "lstm" else None
    loss, logits, hT, cT, grads, dh0, dc0 = ref.loss_and_grads(cell, ref_params(m), x, y, h, c0, list(masks), nonlin)
    assert abs(out["loss"] - loss) < 1e-12
    np.testing.assert_allclose(out["h"], hT, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["dh0"], dh0, rtol=0, atol=1e-12)
    if cell == "lstm":
        np.testing.assert_allclose(out["c"], cT, rtol=0, atol=1e-12)
        np.testing.assert_allclose(out["dc0"], dc0, rtol=0, atol=1e-12)
    grad = Model(m.cfg, dtype=np.float64, theta=out["grad"].copy()).params
    for name in param_shapes(m.cfg):
        np.testing.assert_allclose(grad[name], grads[name], rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("cell,nonlin", CASES)
@pytest.mark.parametrize("by_units", [True, False])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_both_thread_plans_match_reference(cell, nonlin, by_units, nthreads, monkeypatch):
    """Threads split the time loops by units (large H) or by streams (small H); both equal the reference."""
    monkeypatch.setattr(Model, "UNITS_SPLIT_MIN_H", 0 if by_units else 10**9)
    monkeypatch.setattr(Model, "MIN_UNITS_PER_THREAD", 1)
    threads.set_threads(nthreads)
    m, x, y, h, c = make(cell, nonlin, 2, V=6, H=9, T=5, B=4, dropout=0.25)
    T, B = x.shape
    plan = m.plan(T, B)
    assert plan[0] == by_units and len(plan[3]) - 1 == nthreads
    assert_batch_matches_reference(m, x, y, h, c, m.dropout_masks(T, B, seed=2, step=1), cell, nonlin)


@pytest.mark.parametrize("cell,nonlin", CASES)
@pytest.mark.parametrize("nb", [1, 3])
def test_threaded_generation_equals_single_threaded(cell, nonlin, nb, monkeypatch):
    """Models from H = 128 sample with threads splitting each layer's units (_generate_spin); it must
    follow the same trajectory as the single-threaded loop: identical greedy tokens, the same final state."""
    for dtype in (np.float64, np.float32):
        m = Model(ModelConfig(cell=cell, layers=3, hidden=128, vocab_size=12, nonlinearity=nonlin), dtype=dtype).init(4)
        m.params["decoder.weight"][:] *= 6
        m.refresh()
        tok, h, c = gen_start(m, nb)
        results = []
        for min_h in (10**9, 0):  # serial, then threaded
            monkeypatch.setattr(Model, "GEN_THREADS_MIN_H", min_h)
            threads.set_threads(2)
            results.append(run_generate(m, tok, h, c, 40, temp=0.0))
            results.append(run_generate(m, tok, h, c, 40, temp=1.0, seed=9))
        tol = 1e-10 if dtype == np.float64 else 2e-5
        for a, b in ((results[0], results[2]), (results[1], results[3])):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_allclose(a[3], b[3], rtol=0, atol=tol)
            if cell == "lstm":
                np.testing.assert_allclose(a[4], b[4], rtol=0, atol=tol)
        assert getattr(m, "_gen_key", None) is not None  # the threaded path really ran


def test_threaded_generation_stops_at_end_like_serial(monkeypatch):
    """Streams ending at different steps: the threads agree on when to stop, and the tokens, the
    step count and the state equal the serial loop's."""
    m = Model(ModelConfig(layers=2, hidden=128, vocab_size=12), dtype=np.float64).init(4)
    m.params["decoder.weight"][:] *= 6
    m.params["decoder.bias"][1] += 2.0
    m.refresh()
    tok, h, c = gen_start(m, 5)
    two_threads()
    results = []
    for min_h in (10**9, 0):
        monkeypatch.setattr(Model, "GEN_THREADS_MIN_H", min_h)
        results.append(run_generate(m, tok, h, c, 200, end_id=1, seed=3))
    (o1, s1, d1, h1, c1), (o2, s2, d2, h2, c2) = results
    assert d1.all() and s1 < 200  # the case under test: every stream ended, early
    assert s1 == s2
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_allclose(h2, h1, rtol=0, atol=1e-10)
    np.testing.assert_allclose(c2, c1, rtol=0, atol=1e-10)


def test_threaded_generation_never_waits_for_a_thread_that_does_not_come(restore_threads):
    """A pool may run the region's tasks one after another (here: one Numba thread for two tasks).
    Thread 0 must then give up on its helper and generate alone, not spin forever."""
    m = Model(ModelConfig(layers=2, hidden=128, vocab_size=12), dtype=np.float64).init(4)
    m.params["decoder.weight"][:] *= 6
    m.refresh()
    tok, h, c = gen_start(m, 2)
    two_threads()
    out2, steps2, _, h2, _ = run_generate(m, tok, h, c, 30, temp=0.0)
    assert m._gen_key is not None  # that was the threaded path
    g = m._gen
    threads.set_threads(1)
    cfg = m.cfg
    tok1, h1, c1 = tok.copy(), h.copy(), c.copy()
    out1 = np.full((30, 2), -7, dtype=np.int32)
    steps1 = core._generate_spin(cfg.cell_id, cfg.layers, cfg.hidden, cfg.vocab_size, m.theta, m.params.table,
                                 m._w0t, tok1, h1, c1, out1, 30, 0.0, 0, 1.0, np.zeros(12, np.bool_), -1,
                                 np.zeros(2, np.bool_), core._seed_state(5), g["pws"], g["ub"], g["hs2"], g["cs2"],
                                 g["gates"], g["tcs"], g["sync"], m._step_workspace(2))
    assert len(g["ub"]) == 3 and steps1 == steps2 == 30
    assert g["sync"][0] == core.GO_SERIAL  # thread 0 gave up on its helper
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_allclose(h1, h2, rtol=0, atol=1e-10)


def test_thread_join_protocol_cannot_deadlock_in_either_order():
    """The join of _generate_spin, run by one thread as a pool might run the tasks: helper first
    (it claims its slot, waits a bounded time for thread 0, then decides serial), or thread 0 first
    (it waits a bounded time, then abandons the helper's slot). Either way both return, and they
    agree that the run is serial."""
    sync = np.zeros((2 + 2 * 2) * 8, dtype=np.int64)
    assert not core._join(sync, 1, 2)  # the helper arrives first and gives up waiting
    assert sync[0] == core.GO_SERIAL and sync[8] == core.JOINED
    assert not core._join(sync, 0, 2)  # thread 0 then finds the decision taken
    sync[:] = 0
    assert not core._join(sync, 0, 2)  # thread 0 first: abandons the helper's slot
    assert sync[0] == core.GO_SERIAL and sync[8] == core.ABANDONED
    assert not core._join(sync, 1, 2)  # the helper finds its slot abandoned
    sync[:] = 0
    sync[8] = core.JOINED  # the helper already claimed its slot: thread 0 goes parallel
    assert core._join(sync, 0, 2) and sync[0] == core.GO_PARALLEL


# ----------------------------------------------------------------------------- packed-weight GEMM
def _packed_case(dtype, G, H, u0, u1, M, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((G * H, H)).astype(dtype)
    return W, rng.standard_normal((M, H)).astype(dtype), rng.standard_normal((M, G * H)).astype(dtype)


def _guarded(M, N, dtype, guard=80):
    """A C-contiguous (M, N) array followed by NaN guard elements: a write past it shows."""
    buf = np.full(M * N + guard, np.nan, dtype=dtype)
    return buf, buf[: M * N].reshape((M, N))


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-13), (np.float32, 2e-6)])
@pytest.mark.parametrize("G,H,u0,u1", [(1, 1, 0, 1), (4, 5, 0, 5), (3, 40, 7, 33), (4, 70, 35, 70), (1, 300, 0, 300)])
@pytest.mark.parametrize("M", [1, 2, core._MR - 1, core._MR, core._MR + 1, 2 * core._MR + 3])
def test_packed_matmul_matches_numpy(dtype, rtol, G, H, u0, u1, M):
    """_mm_packed over _pack_fwd / _pack_bwd panels equals the float64 product, for row counts
    around the tile height, partial last panels and column blocks, and K above the k block (the
    accumulating path); nothing is written past C."""
    W, A, D = _packed_case(dtype, G, H, u0, u1, M)
    Hp = u1 - u0
    Wf = np.concatenate([W[g * H + u0 : g * H + u1] for g in range(G)])  # the block's rows, gate-major
    Wp = np.full(core._packed_size(H, G * Hp), np.nan, dtype=dtype)
    core._pack_fwd(W, G, H, u0, u1, Wp)
    buf, C = _guarded(M, G * Hp, dtype)
    core._mm_packed(A, Wp, C, H)
    want = A.astype(np.float64) @ Wf.T.astype(np.float64)
    np.testing.assert_allclose(C, want, rtol=0, atol=rtol * np.abs(want).max() * max(1, H) ** 0.5)
    assert np.isnan(buf[C.size :]).all()
    Wp = np.full(core._packed_size(G * H, Hp), np.nan, dtype=dtype)
    core._pack_bwd(W, u0, u1, Wp)
    buf, C = _guarded(M, Hp, dtype)
    core._mm_packed(D, Wp, C, G * H)
    want = D.astype(np.float64) @ W[:, u0:u1].astype(np.float64)
    np.testing.assert_allclose(C, want, rtol=0, atol=rtol * np.abs(want).max() * max(1, G * H) ** 0.5)
    assert np.isnan(buf[C.size :]).all()


def test_packed_matmul_reads_only_k_columns_of_a():
    """A may be wider than K (a row view of a larger matrix); columns past K must not count."""
    W, A, _ = _packed_case(np.float64, 1, 300, 0, 300, 9)
    Wp = np.zeros(core._packed_size(300, 300))
    core._pack_fwd(W, 1, 300, 0, 300, Wp)
    wide = np.concatenate([A, np.full((9, 17), np.nan)], axis=1)
    C = np.zeros((9, 300))
    core._mm_packed(wide, Wp, C, 300)
    np.testing.assert_allclose(C, A @ W.T, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("cell,nonlin", CASES)
@pytest.mark.parametrize("by_units", [True, False])
def test_packed_recurrence_matches_reference(cell, nonlin, by_units, monkeypatch, restore_threads):
    """A batch large enough for the packed products' every path (several row tiles, a partial
    panel, k blocks for the LSTM's backward) equals the float64 reference, with 2 threads."""
    monkeypatch.setattr(Model, "UNITS_SPLIT_MIN_H", 0 if by_units else 10**9)
    threads.set_threads(2)
    m, x, y, h, c = make(cell, nonlin, 2, V=6, H=70, T=3, B=2 * core._MR + 5, dropout=0.2)
    T, B = x.shape
    assert_batch_matches_reference(m, x, y, h, c, m.dropout_masks(T, B, seed=4, step=2), cell, nonlin)
