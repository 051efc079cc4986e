"""The training kernels (charrnn/kernels/bptt.py, gemm.py, rng.py) against the plain-numpy
reference (tests/reference.py), and float64 finite differences through the compiled kernels
themselves; float32 accuracy, the one-hot gather, thread-count determinism, both thread plans,
state carry, dropout masks and the packed-weight matrix product."""

import numpy as np
import pytest

from charrnn import threads
from charrnn.kernels import bptt, gemm, layout
from charrnn.model import Model, ModelConfig, param_shapes
from tests import reference as ref
from tests.common import CASE_IDS, CASES, grad_views, make, ref_nll, ref_params, ref_run, rel_error, two_threads


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


def fd_check(loss, arr, analytic, name, kept=None):
    """Central differences of loss() w.r.t. every entry of arr (perturbed in place). `kept`: where
    False (a weight dropped by a fixed mask), moving the entry must not change the loss at all."""
    numeric = np.zeros(arr.shape)
    for idx in np.ndindex(*arr.shape):
        old = arr[idx]
        arr[idx] = old + FD_EPS
        lp = loss()
        arr[idx] = old - FD_EPS
        lm = loss()
        arr[idx] = old
        numeric[idx] = (lp - lm) / (2 * FD_EPS)
        if kept is not None and not kept[idx]:
            assert lp == lm, f"{name}{idx}: a dropped weight changed the loss"
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_masks_of_some_streams_are_those_columns_of_the_whole_batch(dtype, restore_threads):
    """A data-parallel worker owning streams b0 .. b1-1 draws exactly the single process's masks
    for them."""
    m = Model(ModelConfig(cell="lstm", layers=2, hidden=24, vocab_size=10, dropout=0.3), dtype=dtype)
    T, B = 7, 12
    whole = m.dropout_masks(T, B, seed=9, step=4)
    for b0, b1 in ((0, 6), (6, 12), (3, 4), (0, 12), (8, 11)):
        part = m.dropout_masks(T, b1 - b0, seed=9, step=4, B_all=B, b0=b0)
        assert part.flags.c_contiguous
        np.testing.assert_array_equal(part, whole[:, :, b0:b1])
    assert not np.array_equal(m.dropout_masks(T, 6, seed=9, step=4, B_all=B, b0=6), whole[:, :, :6])
    with pytest.raises(ValueError, match="not within"):
        m.dropout_masks(T, 6, seed=9, step=4, B_all=B, b0=7)


def test_dropout_mask_p_zero_is_all_ones():
    m = Model(ModelConfig(cell="gru", layers=1, hidden=8, vocab_size=6, dropout=0.0))
    assert np.all(m.dropout_masks(5, 3, seed=1, step=1) == 1)


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
    monkeypatch.setattr(bptt, "UNITS_SPLIT_MIN_H", 0 if by_units else 10**9)
    monkeypatch.setattr(bptt, "MIN_STREAMS_PER_THREAD", 10**9)
    monkeypatch.setattr(bptt, "MIN_UNITS_PER_THREAD", 1)
    threads.set_threads(nthreads)
    m, x, y, h, c = make(cell, nonlin, 2, V=6, H=9, T=5, B=4, dropout=0.25)
    T, B = x.shape
    plan = bptt.plan(T, B, m.cfg.hidden, threads.get_threads())
    assert plan.by_units == by_units and len(plan.rb) - 1 == nthreads
    assert_batch_matches_reference(m, x, y, h, c, m.dropout_masks(T, B, seed=2, step=1), cell, nonlin)


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
@pytest.mark.parametrize("M", [1, 2, gemm.MR - 1, gemm.MR, gemm.MR + 1, gemm.MR + 5, 2 * gemm.MR + 3])
def test_packed_matmul_matches_numpy(dtype, rtol, G, H, u0, u1, M):
    """_mm_packed over _pack_fwd / _pack_bwd panels equals the float64 product, for row counts
    around the tile height and cut into tiles of unequal heights, partial last panels and column
    blocks, and K above the k block (the accumulating path); nothing is written past C."""
    W, A, D = _packed_case(dtype, G, H, u0, u1, M)
    Hp = u1 - u0
    Wf = np.concatenate([W[g * H + u0 : g * H + u1] for g in range(G)])  # the block's rows, gate-major
    Wp = np.full(gemm.packed_size(H, G * Hp), np.nan, dtype=dtype)
    gemm.pack_forward(W, G, H, u0, u1, Wp)
    buf, C = _guarded(M, G * Hp, dtype)
    gemm.matmul_packed(A, Wp, C, H)
    want = A.astype(np.float64) @ Wf.T.astype(np.float64)
    np.testing.assert_allclose(C, want, rtol=0, atol=rtol * np.abs(want).max() * max(1, H) ** 0.5)
    assert np.isnan(buf[C.size :]).all()
    Wp = np.full(gemm.packed_size(G * H, Hp), np.nan, dtype=dtype)
    gemm.pack_backward(W, u0, u1, Wp)
    buf, C = _guarded(M, Hp, dtype)
    gemm.matmul_packed(D, Wp, C, G * H)
    want = D.astype(np.float64) @ W[:, u0:u1].astype(np.float64)
    np.testing.assert_allclose(C, want, rtol=0, atol=rtol * np.abs(want).max() * max(1, G * H) ** 0.5)
    assert np.isnan(buf[C.size :]).all()


def test_packed_matmul_reads_only_k_columns_of_a():
    """A may be wider than K (a row view of a larger matrix); columns past K must not count."""
    W, A, _ = _packed_case(np.float64, 1, 300, 0, 300, 9)
    Wp = np.zeros(gemm.packed_size(300, 300))
    gemm.pack_forward(W, 1, 300, 0, 300, Wp)
    wide = np.concatenate([A, np.full((9, 17), np.nan)], axis=1)
    C = np.zeros((9, 300))
    gemm.matmul_packed(wide, Wp, C, 300)
    np.testing.assert_allclose(C, A @ W.T, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("cell,nonlin", CASES)
@pytest.mark.parametrize("by_units", [True, False])
def test_packed_recurrence_matches_reference(cell, nonlin, by_units, monkeypatch, restore_threads):
    """A batch large enough for the packed products' every path (several row tiles, a partial
    panel, k blocks for the LSTM's backward) equals the float64 reference, with 2 threads."""
    monkeypatch.setattr(bptt, "UNITS_SPLIT_MIN_H", 0 if by_units else 10**9)
    monkeypatch.setattr(bptt, "MIN_STREAMS_PER_THREAD", 10**9)
    threads.set_threads(2)
    m, x, y, h, c = make(cell, nonlin, 2, V=6, H=70, T=3, B=2 * gemm.MR + 5, dropout=0.2)
    T, B = x.shape
    assert bptt.plan(T, B, 70, 2).by_units == by_units
    assert_batch_matches_reference(m, x, y, h, c, m.dropout_masks(T, B, seed=4, step=2), cell, nonlin)


def test_thread_plan_splits_streams_when_each_thread_gets_enough():
    """Streams when every thread gets MIN_STREAMS_PER_THREAD of them (no barrier per step), units
    when they are fewer (a big machine: all streams in every product), and units for one stream."""
    p = bptt.plan(50, 50, 128, 2)  # 2x128 50x50 on two cores
    assert not p.by_units and list(p.sb) == [0, 25, 50] and p.n == 2
    p = bptt.plan(64, 32, 256, 16)  # 32 streams on 16 cores: 2 each
    assert p.by_units and p.n == 8 and list(p.ub) == list(range(0, 257, 32))  # 32 units per thread at least
    p = bptt.plan(64, 16, 256, 2)  # 8 streams each: still streams
    assert not p.by_units
    p = bptt.plan(300, 1, 512, 2)  # scoring one stream
    assert p.by_units and p.n == 2 and list(p.ub) == [0, 256, 512]
    p = bptt.plan(16, 8, 24, 2)  # a small layer: streams whatever their number
    assert not p.by_units and p.n == 2
    for T, B, H, n in ((50, 50, 128, 2), (64, 32, 256, 16), (1, 1, 8, 4), (7, 3, 5, 8)):
        p = bptt.plan(T, B, H, n)
        assert p.rb[0] == 0 and p.rb[-1] == T * B and len(p.rb) == p.n + 1 and np.all(np.diff(p.rb) > 0)


def test_thread_plan_splits_units_when_a_thread_would_read_more_weights_than_its_l2(monkeypatch):
    """Past one core's L2, a streams split reads all of W_hh from L3 at every step for a few rows:
    units then, up to MIN_STREAMS_PER_THREAD_PAST_L2 streams a thread; below it the old rule."""
    monkeypatch.setattr(layout, "l2_bytes", lambda: 2 << 20)
    big, small = 4 * 768 * 768 * 2, 4 * 384 * 384 * 2  # bf16 LSTM panels: 4.5 MiB, 1.1 MiB
    few = bptt.MIN_STREAMS_PER_THREAD_PAST_L2
    assert bptt.plan(64, 2 * few - 1, 768, 2, big).by_units
    assert not bptt.plan(64, 2 * few, 768, 2, big).by_units
    assert not bptt.plan(64, 32, 384, 2, small).by_units
    assert bptt.plan(64, 32, 512, 2, 2 << 20).by_units  # exactly the L2: other data must fit too
    p = bptt.plan(64, 32, 768, 2, big)
    assert p.n == 2 and list(p.ub) == [0, 384, 768] and list(p.sb) == [0, 32]
    assert not bptt.plan(64, 32, 64, 2, big).by_units  # a small layer stays split by streams


def test_a_batch_plans_its_split_from_the_bytes_its_products_read(monkeypatch, restore_threads):
    """The workspace gives plan() one layer's W_hh in the products' element size (here the float64
    model's 8 bytes): the same batch splits by units once those bytes reach the L2, by streams
    below, and equals the float64 reference either way."""
    threads.set_threads(2)
    m, x, y, h, c = make("lstm", "tanh", 2, V=6, H=128, T=3, B=20, dropout=0.25)
    T, B = x.shape
    masks = m.dropout_masks(T, B, seed=2, step=1)
    for l2, by_units in ((4 * 128 * 128 * 8, True), (4 * 128 * 128 * 8 + 1, False)):
        monkeypatch.setattr(layout, "l2_bytes", lambda l2=l2: l2)
        m._ws = {}
        assert_batch_matches_reference(m, x, y, h, c, masks, "lstm", "tanh")
        (ws,) = m._ws.values()
        assert ws.plan.by_units == by_units and ws.plan.n == 2


def test_bf16_batches_agree_split_by_units_and_by_streams(monkeypatch, restore_threads):
    """bf16 products count 2 bytes an element in the plan, and the split the L2 rule picks for a
    bf16 batch gives the gradient of the other split to float32 accumulation (the bf16 reference
    tests hold the streams split to the reference)."""
    from charrnn.kernels import gemm16

    if not gemm16.backends():
        pytest.skip("this CPU has no bfloat16 products (AVX512_BF16 or AMX)")
    threads.set_threads(2)
    m = Model(ModelConfig(layers=2, hidden=128, vocab_size=9)).init(3)
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, 9, size=(6, 20)).astype(np.int32) for _ in range(2))
    h, c = m.zero_state(20)
    got = {}
    for l2, by_units in ((4 * 128 * 128 * 2, True), (4 * 128 * 128 * 2 + 1, False)):
        monkeypatch.setattr(layout, "l2_bytes", lambda l2=l2: l2)
        m._ws = {}
        out = m.forward_backward(x, y, h, c, precision="bf16")
        (ws,) = m._ws.values()
        assert ws.plan.by_units == by_units
        got[by_units] = (out["loss"], out["grad"].copy())
    assert abs(got[True][0] - got[False][0]) < 1e-6
    np.testing.assert_allclose(got[True][1], got[False][1], rtol=0, atol=1e-5 * np.abs(got[False][1]).max())


def test_float32_exp_is_within_two_ulp_of_the_true_value_and_keeps_the_special_values():
    """kernels/mathf.exp in float32 (the softmax's): against float64 numpy on every order of
    magnitude it covers; 0 below the normal range, inf above it, NaN through."""
    from numba import njit

    from charrnn.kernels.mathf import exp

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = exp(x[i])

    x = np.concatenate([np.linspace(-87.3, 88.7, 1_000_001), np.random.default_rng(0).uniform(-20, 2, 100_000)])
    x = x.astype(np.float32)
    got = np.empty_like(x)
    apply(x, got)
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - want) / ulp) <= 2.0
    special = np.array([-np.inf, -1000.0, -88.0, 89.0, 1000.0, np.inf, np.nan, 0.0], dtype=np.float32)
    out = np.empty_like(special)
    apply(special, out)
    assert out[:3].tolist() == [0.0, 0.0, 0.0]
    assert np.isinf(out[3:6]).all() and np.isnan(out[6]) and out[7] == 1.0
    # float64 (the gradient checks' type) is libm's exp itself, to numpy's within an ulp
    x64 = np.linspace(-700, 700, 1001)
    out64 = np.empty_like(x64)
    apply(x64, out64)
    np.testing.assert_allclose(out64, np.exp(x64), rtol=4e-16, atol=0)


@pytest.mark.parametrize("cell,nonlin", CASES)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_a_vocabulary_larger_than_the_batch_matches_reference(cell, nonlin, nthreads, restore_threads):
    """With more tokens in the vocabulary than rows in a thread's part, the first layer's input
    gradient is written column by column for the tokens that occur (repeated ones included), and
    the transposed input weights tile by tile: the same numbers as the reference."""
    threads.set_threads(nthreads)
    m, x, y, h, c = make(cell, nonlin, 2, V=70, H=6, T=3, B=4, dropout=0.2)
    x[0, :] = 5  # one token four times, another at both ends of the vocabulary
    x[1, 0], x[2, 3] = 0, 69
    T, B = x.shape
    assert_batch_matches_reference(m, x, y, h, c, m.dropout_masks(T, B, seed=2, step=1), cell, nonlin)


# ----------------------------------------------------------------------------- 7. weight drop and locked dropout
def ref_params_dropped(m, wmasks):
    """The reference's parameters with every layer's weight_hh multiplied by its weight mask."""
    params = ref_params(m)
    for k in range(m.cfg.layers):
        params[f"rnn.weight_hh_l{k}"] = params[f"rnn.weight_hh_l{k}"] * wmasks[k]
    return params


@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_weight_drop_matches_reference_on_the_dropped_weights(cell, nonlin, L, nthreads, restore_threads):
    """A batch with weight drop is the reference run on weight_hh * mask; the gradient of the raw
    weight_hh is the reference's gradient times the mask, every other gradient the reference's."""
    threads.set_threads(nthreads)
    m, x, y, h, c = make(cell, nonlin, L, H=16, B=4, dropout=0.3)
    T, B = x.shape
    masks = m.dropout_masks(T, B, seed=5, step=3)
    wm = m.weight_masks(seed=5, step=3, p=0.4)
    assert 0 < np.mean(wm == 0) < 1
    theta0 = m.theta.copy()
    out = m.forward_backward(x, y, h, c, masks=masks, weight_masks=wm)
    np.testing.assert_array_equal(m.theta, theta0)  # the raw weights are untouched
    c0 = c if cell == "lstm" else None
    loss, logits, hT, cT, grads, dh0, dc0 = ref.loss_and_grads(cell, ref_params_dropped(m, wm), x, y, h, c0,
                                                               list(masks), nonlin)
    assert abs(out["loss"] - loss) < 1e-12
    np.testing.assert_allclose(out["h"], hT, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["dh0"], dh0, rtol=0, atol=1e-12)
    got = grad_views(m, out["grad"])
    for name in param_shapes(m.cfg):
        want = grads[name] * wm[int(name[-1])] if "weight_hh" in name else grads[name]
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-12, err_msg=name)
    plain = m.forward_backward(x, y, h, c, masks=masks)  # and without weight drop, the plain batch again
    assert abs(plain["loss"] - ref.loss_and_grads(cell, ref_params(m), x, y, h, c0, list(masks), nonlin)[0]) < 1e-12


@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_weight_drop_finite_differences_with_the_mask_fixed(cell, nonlin):
    m, x, y, h, c, masks = fd_problem(cell, nonlin, 2, True)
    wm = m.weight_masks(seed=3, step=2, p=0.4)
    assert 0 < np.mean(wm == 0) < 1
    out = m.forward_backward(x, y, h, c, masks=masks, weight_masks=wm)
    grads = grad_views(m, out["grad"])

    def loss():
        return m.forward_backward(x, y, h, c, masks=masks, weight_masks=wm, backward=False)["loss"]

    assert loss() == out["loss"]
    for name, p in m.params.items():
        if "weight_hh" in name:  # a dropped weight has no effect: its gradient is exactly 0
            k = int(name[-1])
            assert np.all(grads[name][wm[k] == 0] == 0)
            fd_check(loss, p, grads[name], name, kept=wm[k] != 0)
        else:
            fd_check(loss, p, grads[name], name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_masks_are_decided_by_seed_and_step_and_drop_about_p(dtype, restore_threads):
    m = Model(ModelConfig(cell="lstm", layers=2, hidden=64, vocab_size=10), dtype=dtype)
    p = 0.3
    a = m.weight_masks(seed=3, step=10, p=p)
    assert a.shape == (2, 4 * 64, 64) and a.dtype == dtype
    assert np.all((a == 0) | (a == dtype(1 / (1 - p))))
    assert abs(np.mean(a == 0) - p) < 0.01
    assert abs(np.mean((a[0] == 0) == (a[1] == 0)) - (p * p + (1 - p) ** 2)) < 0.01  # layers independent
    np.testing.assert_array_equal(m.weight_masks(seed=3, step=10, p=p), a)
    other = m.weight_masks(seed=3, step=11, p=p)
    assert abs(np.mean((other == 0) == (a == 0)) - (p * p + (1 - p) ** 2)) < 0.01
    out = m.dropout_masks(8, 32, seed=3, step=10, p=p)  # not the output masks of the same step
    assert abs(np.mean((out.reshape(2, -1)[:, :4096] == 0) == (a.reshape(2, -1)[:, :4096] == 0))
               - (p * p + (1 - p) ** 2)) < 0.02
    threads.set_threads(1)
    np.testing.assert_array_equal(m.weight_masks(seed=3, step=10, p=p), a)
    assert np.all(m.weight_masks(seed=3, step=10, p=0.0) == 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_locked_dropout_masks_are_one_mask_per_stream_for_every_step(dtype, restore_threads):
    m = Model(ModelConfig(cell="gru", layers=2, hidden=32, vocab_size=10), dtype=dtype)
    T, B, p = 9, 12, 0.4
    a = m.dropout_masks(T, B, seed=7, step=5, p=p, locked=True)
    for t in range(T):
        np.testing.assert_array_equal(a[:, t], a[:, 0])
    assert abs(np.mean(a == 0) - p) < 0.05
    assert not np.array_equal(a[:, :, 0], a[:, :, 1])  # streams and layers differ
    assert not np.array_equal(a[0], a[1])
    step_masks = m.dropout_masks(T, B, seed=7, step=5, p=p)
    np.testing.assert_array_equal(step_masks[:, 0], a[:, 0])  # step 0 is the per-step mask of step 0
    assert not np.array_equal(step_masks[:, 1], a[:, 1])
    for b0, b1 in ((0, 6), (6, 12), (5, 9)):  # a data-parallel worker's streams: the same columns
        np.testing.assert_array_equal(m.dropout_masks(T, b1 - b0, seed=7, step=5, p=p, B_all=B, b0=b0, locked=True),
                                      a[:, :, b0:b1])
    threads.set_threads(1)
    np.testing.assert_array_equal(m.dropout_masks(T, B, seed=7, step=5, p=p, locked=True), a)


# ----------------------------------------------------------------------------- buffers
@pytest.mark.parametrize("huge", [False, True])
@pytest.mark.parametrize("shape", [(3, 5), (2, (1 << 18) + 7)])  # below and above layout.HUGE_FROM in float32
def test_buffers_are_zeroed_aligned_writable_and_outlive_their_mapping(huge, shape):
    import gc

    from charrnn.kernels import layout

    a = layout.empty(shape, np.float32, huge=huge)
    assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % layout.ALIGN == 0 and not a.any()
    if huge and a.nbytes >= layout.HUGE_FROM and layout.huge_zeros(1) is not None:
        assert a.ctypes.data % layout.HUGE_PAGE == 0  # on its own mapping, at a huge page's start
    a[...] = 7.0
    b = a[1:]  # a view alone keeps the memory: no use after the mapping is gone
    del a
    gc.collect()
    assert (b == 7.0).all()
    rows = layout.per_thread(2, 1000, np.float32, huge=huge)
    assert rows.shape[0] == 2 and rows[1].ctypes.data % layout.ALIGN == 0


def test_buffers_fall_back_to_ordinary_memory_without_private_mappings(monkeypatch):
    import mmap

    from charrnn.kernels import layout

    monkeypatch.delattr(mmap, "MAP_PRIVATE")  # as on a platform without them (Windows)
    assert layout.huge_zeros(1 << 21) is None
    a = layout.empty((1 << 19,), np.float32, huge=True)
    assert a.ctypes.data % layout.ALIGN == 0 and not a.any() and a.flags.writeable
