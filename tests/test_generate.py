"""Sampling: the compiled generation loop on one thread and with threads splitting every layer's
units (charrnn/kernels/sample.py through Model.generate), and the draw: greedy, temperature,
top-k, top-p, banned ids, the end token, seeds; the draw against the reference distribution
(tests/reference.py draw_probs) at any temperature; what generate.py refuses and never prints."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from charrnn import threads
from charrnn.errors import UsageError
from charrnn.generate import SampleOptions, SamplerBug, sample_chunks
from charrnn.kernels import rng, sample
from charrnn.model import Model, ModelConfig, State
from charrnn.vocab import END_ID, START_ID, UNK_ID, Vocab
from tests import reference as ref
from tests.common import CASE_IDS, CASES, two_threads


def gen_model(cell="lstm", nonlin="tanh", V=12, H=16, L=2, seed=21):
    m = Model(ModelConfig(cell=cell, layers=L, hidden=H, vocab_size=V, nonlinearity=nonlin)).init(seed)
    m.params["decoder.weight"][:] *= 6  # sharper distributions than at init, so ranks matter
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
    steps = m.generate(tok, h, c, out, temp, top_k, top_p, ban, end_id, done, rng.seed_state(seed))
    return out, steps, done, h, c


def replay_logits(m, tok, h, c, out):
    """The logits each generated token was drawn from: step the same streams through Model.step
    (the single step that Model.feed and the generation loop run) with the previously generated
    tokens."""
    state = State(h.copy(), c.copy())
    tok = tok.copy()
    all_logits = []
    for s in range(out.shape[0]):
        all_logits.append(m.step(tok, state).astype(np.float64))
        tok = np.where(out[s] >= 0, out[s], tok).astype(np.int32)
    return np.array(all_logits), state.h, state.c  # (n, nb, V)


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
    steps = m.generate(tok.copy(), h.copy(), c.copy(), o, 1.0, 0, 1.0, ban, -1, d, rng.seed_state(0))
    assert steps == 5 and np.all(o[:, d] == -1) and np.all(o[:, ~d] >= 0)


def test_same_seed_same_tokens():
    m = gen_model()
    tok, h, c = gen_start(m, 3)
    a = run_generate(m, tok, h, c, 30, seed=7)
    b = run_generate(m, tok, h, c, 30, seed=7)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], run_generate(m, tok, h, c, 30, seed=8)[0])
    s = rng.seed_state(7)
    assert s.dtype == np.uint64 and s.shape == (1,)
    np.testing.assert_array_equal(s, rng.seed_state(7))
    assert s[0] != rng.seed_state(8)[0]
    assert rng.seed_state(-1)[0] == rng.seed_state(2**64 - 1)[0]  # any int: taken modulo 2**64


def draw_counts(z, n, temp=1.0, top_k=0, top_p=1.0, banned=None, seed=0):
    return sample.draw_many(z, n, temp=temp, top_k=top_k, top_p=top_p, banned=banned, seed=seed)


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


@pytest.mark.parametrize("cell,nonlin", CASES)
@pytest.mark.parametrize("nb", [1, 3])
def test_threaded_generation_equals_single_threaded(cell, nonlin, nb, monkeypatch):
    """Models from H = 128 sample with threads splitting each layer's units; they must
    follow the same trajectory as the single-threaded loop: identical greedy tokens, the same final state."""
    for dtype in (np.float64, np.float32):
        m = Model(ModelConfig(cell=cell, layers=3, hidden=128, vocab_size=12, nonlinearity=nonlin), dtype=dtype).init(4)
        m.params["decoder.weight"][:] *= 6
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
        assert m.generation_threads() == 2  # the threaded path really ran


def test_threaded_generation_stops_at_end_like_serial(monkeypatch):
    """Streams ending at different steps: the threads agree on when to stop, and the tokens, the
    step count and the state equal the serial loop's."""
    m = Model(ModelConfig(layers=2, hidden=128, vocab_size=12), dtype=np.float64).init(4)
    m.params["decoder.weight"][:] *= 6
    m.params["decoder.bias"][1] += 2.0
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


# ----------------------------------------------------------------------------- any temperature
# Dividing the logits by a tiny temperature before subtracting their maximum once turned every
# weight into 0 (a fastmath rounding residual of ~1e22 in the exponent), and the draw fell back to
# id 0, <START>, banned or not: `charrnn sample --temp 1e-38` printed "<START><START>...".
EXTREME_TEMPS = [5e-324, 1e-300, 1e-38, 1e-3, 0.7, 1e38, 1e300, 1.7e308]
Z_TIED = np.array([0.3, 2.5, -1.0, 0.9, 2.5, -7.0, 1.1, 2.0, -0.2, 0.0])  # ids 1 and 4 tie for the max


@pytest.mark.parametrize("temp", EXTREME_TEMPS)
@pytest.mark.parametrize("kw", [{}, {"top_k": 3}, {"top_p": 0.5}, {"top_k": 5, "top_p": 0.9}], ids=["plain", "k", "p", "kp"])
def test_draw_follows_the_reference_at_any_temperature(temp, kw):
    ban = np.zeros(10, np.bool_)
    ban[[0, 2]] = True  # id 0 as <START>: never drawn, however small the temperature
    for z, banned in ((Z_TIED, None), (Z_TIED, ban), (np.random.default_rng(3).normal(0, 2, 10), ban)):
        probs = ref.draw_probs(z, temp, banned=banned, **kw)
        counts = draw_counts(z, 20000, temp=temp, banned=banned, **kw)
        assert chi2_ok(counts, probs), (temp, kw, counts, probs)


def test_tiny_temperature_is_the_limit_of_sampling():
    """Tiny temperatures share the draws among the tied maxima (the limit as temp -> 0), so a
    model's logits, which hardly ever tie, give the greedy sequence."""
    for temp in (1e-38, 1e-300, 5e-324):
        p = ref.draw_probs(Z_TIED, temp)
        np.testing.assert_array_equal(p, np.where(Z_TIED == Z_TIED.max(), 0.5, 0.0))
    m = gen_model()
    tok, h, c = gen_start(m, 3)
    greedy = run_generate(m, tok, h, c, 40, temp=0.0, banned=[START_ID])[0]
    for temp in (1e-38, 5e-324):
        out = run_generate(m, tok, h, c, 40, temp=temp, banned=[START_ID])[0]
        np.testing.assert_array_equal(out, greedy)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hs.data(),
       temp=hs.floats(min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False),
       top_k=hs.integers(0, 12), top_p=hs.floats(min_value=0.0, max_value=1.0, exclude_min=True))
def test_draw_never_leaves_the_reference_support(data, temp, top_k, top_p):
    """For any finite temp > 0, top-k and top-p, every draw is an allowed id the reference gives
    a positive probability (to within a relative 1e-9 of top_p, where rounding may differ)."""
    V = data.draw(hs.integers(1, 10))
    level = hs.sampled_from([-1e6, -30.0, -1.0, 0.0, 0.5, 1.0, 3.0, 1e6])  # few values: ties are common
    z = np.array(data.draw(hs.lists(level | hs.floats(-100, 100), min_size=V, max_size=V)))
    banned = np.array(data.draw(hs.lists(hs.booleans(), min_size=V, max_size=V)), dtype=np.bool_)
    banned[data.draw(hs.integers(0, V - 1))] = False  # at least one id allowed
    counts = draw_counts(z, 64, temp=temp, top_k=top_k, top_p=top_p, banned=banned, seed=data.draw(hs.integers(0, 99)))
    p = ref.draw_probs(z, temp, top_k, min(1.0, top_p * (1 + 1e-9)), banned)
    assert counts.sum() == 64
    assert np.all(counts[banned] == 0)
    assert np.all(counts[p == 0] == 0), (z, banned, counts, p)


def test_draw_never_returns_a_banned_id_from_nan_logits():
    z = np.array([0.0, np.nan, 1.0, np.nan, 2.0])
    ban = np.array([True, False, False, False, True])
    for kw in ({}, {"top_k": 2}, {"top_p": 0.5}):
        counts = draw_counts(z, 200, banned=ban, **kw)
        assert counts.sum() == 200 and np.all(counts[ban] == 0), kw


# ----------------------------------------------------------------------------- generate.py
class _FakeModel:
    """A stand-in for Model that draws what it is told to: for generate.py's own checks."""

    def __init__(self, ids):
        self.ids = ids

    def zero_state(self, nb):
        return np.zeros((1, nb, 1)), np.zeros((1, nb, 1))

    def feed(self, tokens, h, c):
        return None

    def generate(self, tok, h, c, out, *args):
        out[:] = -1
        out[: len(self.ids)] = np.asarray(self.ids, dtype=np.int32)[:, None]
        return out.shape[0]


@pytest.mark.parametrize("special,documents", [(START_ID, False), (UNK_ID, True), (END_ID, False)])
def test_special_tokens_are_never_turned_into_text(special, documents):
    """Defence in depth: a special token the draw should have skipped stops sampling with an
    internal error instead of reaching the output as "<START>" (the kernel never draws one)."""
    vocab = Vocab.from_text("abc")
    a = vocab.id_of("a")
    chunks = sample_chunks(_FakeModel([a, a, special, a]), vocab, SampleOptions(length=8, seed=1), documents=documents)
    with pytest.raises(SamplerBug, match="<"):
        for _, text, _ in chunks:
            assert "<" not in text
    # <END> of a documents model is how a sample ends, not a bug
    out = list(sample_chunks(_FakeModel([a, END_ID]), vocab, SampleOptions(length=8, seed=1), documents=True))
    assert out == [(0, "a", True)]


@pytest.mark.parametrize("field,value", [
    ("temp", math.nan), ("temp", math.inf), ("temp", -1.0), ("top_p", math.nan), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("top_k", 2.5), ("length", -1), ("num", 0), ("seed", -1), ("seed", 2**64), ("seed", 1.5),
    ("unknown", "ignore"),
])
def test_sample_options_are_checked_for_library_callers(field, value):
    vocab = Vocab.from_text("abc")
    opts = SampleOptions(**{field: value})
    with pytest.raises(UsageError, match=field):
        sample_chunks(_FakeModel([]), vocab, opts)
    for ok in (SampleOptions(temp=0.0), SampleOptions(temp=1e-320, top_p=1e-300, top_k=1), SampleOptions(seed=2**64 - 1)):
        sample_chunks(_FakeModel([]), vocab, ok)  # no error


# ----------------------------------------------------------------------------- lock step to sample order
@hs.composite
def lock_step(draw):
    """Pieces of samples advancing in lock step, as sample_pieces hands them out: rounds in which
    every sample not yet ended gives a piece, the last one of each sample carrying its end."""
    from charrnn.generate import Piece

    n = draw(hs.integers(1, 5))
    lengths = [draw(hs.integers(1, 5)) for _ in range(n)]  # pieces per sample
    out = []
    for r in range(max(lengths)):
        for b in range(n):
            if r < lengths[b]:
                end = "end" if r == lengths[b] - 1 else None
                out.append(Piece(b, draw(hs.text("abc", max_size=3)), end))
    return n, out


@given(lock_step())
@settings(max_examples=300, deadline=None)
def test_in_order_puts_lock_step_pieces_in_sample_order(case):
    """generate.in_order: every sample's text and end unchanged, one sample after another, and the
    current sample's pieces handed out as they come (nothing of it waits for a later piece)."""
    from charrnn.generate import in_order

    n, ps = case
    consumed = []

    def source():
        for p in ps:
            consumed.append(p)
            yield p

    out = []
    for q in in_order(source()):
        if q.stream == 0 or out and out[-1].stream == q.stream and out[-1].end is None:
            assert consumed[-1] is q  # the current sample's piece: passed on at once
        out.append(q)
    assert [q.stream for q in out] == sorted(q.stream for q in out)  # sample order
    for b in range(n):
        mine = [p for p in ps if p.stream == b]
        got = [q for q in out if q.stream == b]
        assert "".join(q.text for q in got) == "".join(p.text for p in mine)
        assert [q.end for q in got if q.end] == [mine[-1].end] and got[-1].end == mine[-1].end
