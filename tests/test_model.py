"""The model (charrnn/model.py): scoring one stream (the layer pipeline and the batch forward)
against the reference, single steps and priming against the batch forward, the per-stream state
and its gather, and weights changed in place between calls."""

import numpy as np
import pytest

from charrnn import threads
from charrnn.model import Model, ModelConfig, State, param_shapes
from tests.common import CASE_IDS, CASES, make, ref_nll, ref_run, two_threads


# ----------------------------------------------------------------------------- 5b. scoring one stream
@pytest.mark.parametrize("path", ["pipe", "batch"])
@pytest.mark.parametrize("nthreads,chunk", [(1, 256), (2, 3), (2, 256)], ids=["1thr", "2thr-chunk3", "2thr-chunk256"])
@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_score_matches_reference(cell, nonlin, L, nthreads, chunk, path, restore_threads, monkeypatch):
    """Model.score (the layer pipeline up to PIPE_MAX_H units, on as many threads as there are
    layers to share; above it the batch forward) gives the reference's -log p(y) at every position
    and its final state, whatever the chunking."""
    if nthreads == 2:
        two_threads()
    else:
        threads.set_threads(1)
    monkeypatch.setattr(Model, "PIPE_CHUNK", chunk)
    monkeypatch.setattr(Model, "PIPE_MAX_H", 256 if path == "pipe" else 4)
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


# ----------------------------------------------------------------------------- single steps and the state
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_step_equals_feed_and_updates_the_state_in_place(cell, nonlin):
    """Model.step with one token per stream is feed's single step: the same logits and state, the
    state updated in place and the logits a new array each time."""
    m, _, _, h, c = make(cell, nonlin, 2, V=9, H=8, T=1, B=3, seed=13)
    state = State(h.copy(), c.copy())
    hf, cf = h.copy(), c.copy()
    tokens = np.array([[4, 1, 7], [0, 0, 8], [5, 2, 2]], dtype=np.int32)  # different ids per stream
    kept = []
    for row in tokens:
        logits = m.step(row, state)
        kept.append(logits)
        assert logits.shape == (3, 9)
    for b in range(3):  # each stream alone, fed its own sequence
        hb, cb = hf[:, b : b + 1].copy(), cf[:, b : b + 1].copy()
        last = m.feed(tokens[:, b], hb, cb)
        np.testing.assert_allclose(kept[-1][b], last[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(state.h[:, b : b + 1], hb, rtol=0, atol=1e-12)
    assert not np.shares_memory(kept[0], kept[1])
    with pytest.raises(ValueError):
        m.step(np.array([1, 2], dtype=np.int32), state)  # one token per stream
    with pytest.raises(ValueError):
        m.step(np.array([1, 2, 9], dtype=np.int32), state)  # outside the vocabulary


def test_state_take_reorders_repeats_and_drops_streams():
    m, _, _, h, c = make("lstm", "tanh", 2, V=9, H=8, T=1, B=4, seed=14)
    state = State(h, c)
    got = state.take([3, 3, 0])
    assert got.streams == 3
    np.testing.assert_array_equal(got.h, h[:, [3, 3, 0]])
    np.testing.assert_array_equal(got.c, c[:, [3, 3, 0]])
    got.h[:] = 0  # a copy: the original is untouched
    assert np.any(state.h != 0)
    # stepping a gathered state equals stepping the streams it came from
    tok = np.array([1, 2, 3, 4], dtype=np.int32)
    full = state.copy()
    logits = m.step(tok, full)
    part = state.take([2, 0])
    np.testing.assert_array_equal(m.step(tok[[2, 0]], part), logits[[2, 0]])
    np.testing.assert_array_equal(part.h, full.h[:, [2, 0]])
    for bad in ([4], [-1], [[0, 1]]):
        with pytest.raises(ValueError):
            state.take(bad)


def test_weights_changed_in_place_are_seen_at_once():
    """No derived copy of the weights survives between calls: after theta changes in place, step,
    feed, generate and score all use the new weights."""
    from charrnn.kernels import rng

    m, x, y, h, c = make("gru", "tanh", 2, V=9, H=8, T=12, B=1, seed=15, dtype=np.float64)
    before = m.feed(x[:, 0], h.copy(), c.copy())
    m.params["rnn.weight_ih_l0"][:] *= -1.5  # the layer-0 input weights, which a transposed copy would hold
    after = m.feed(x[:, 0], h.copy(), c.copy())
    assert not np.allclose(before, after)
    want = m.forward_backward(x, y, h, c, backward=False)
    np.testing.assert_allclose(m.score(x[:, 0], y[:, 0], h.copy(), c.copy()), want["nll"][:, 0], rtol=0, atol=1e-12)
    state = State(h.copy(), c.copy())
    for t in x[:, 0]:
        logits = m.step(np.array([t], dtype=np.int32), state)
    np.testing.assert_allclose(logits, after, rtol=0, atol=1e-12)
    out = np.zeros((5, 1), dtype=np.int32)
    tok = np.array([x[-1, 0]], dtype=np.int32)
    hg, cg = h.copy(), c.copy()
    m.feed(x[:-1, 0], hg, cg)
    m.generate(tok, hg, cg, out, 0.0, 0, 1.0, np.zeros(9, np.bool_), -1, np.zeros(1, np.bool_), rng.seed_state(0))
    assert out[0, 0] == np.argmax(after[0])


def test_config_validation_and_parameter_layout():
    for bad in (dict(cell="transformer"), dict(nonlinearity="gelu"), dict(layers=0), dict(hidden=0),
                dict(vocab_size=3), dict(dropout=1.0), dict(dropout=-0.1)):
        with pytest.raises(ValueError):
            ModelConfig(**dict(dict(cell="lstm", layers=1, hidden=4, vocab_size=8), **bad))
    for cell, G in (("lstm", 4), ("gru", 3), ("rnn", 1)):
        cfg = ModelConfig(cell=cell, layers=2, hidden=5, vocab_size=11)
        m = Model(cfg)
        shapes = param_shapes(cfg)
        assert cfg.G == G and shapes["rnn.weight_ih_l0"] == (G * 5, 11) and shapes["rnn.weight_hh_l1"] == (G * 5, 5)
        assert m.n_params == sum(int(np.prod(s)) for s in shapes.values())
        o = 0
        for name, view in m.params.items():  # the views tile theta in order, without gaps
            assert view.base is not None and np.shares_memory(view, m.theta)
            assert view.__array_interface__["data"][0] == m.theta.__array_interface__["data"][0] + 4 * o
            o += view.size
        assert m.theta.ctypes.data % 64 == 0  # aligned for the vector loads of the kernels
