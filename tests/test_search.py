"""The compiled beam search and the packed steps of several streams (charrnn/kernels/search.py,
Model.packed_steps, Model.run_search): the packed step against Model.step's BLAS step and the
float64 reference, for every cell, 1-2 layers, several stream counts and 1-2 blocks of units;
the packed copy sees a change of weights only when repacked; the compiled search finds the same
hypotheses as the numpy search it replaced (tests/beam_reference.py), on one thread and on two;
its pieces (log-softmax, top-K with ties) against beam.py's numpy definitions; and the same in
bf16 (`sample --precision bf16`) against the reference whose products round their operands to
bfloat16 (tests/reference.py's bfloat16_operand), on every backend this CPU has."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from charrnn import threads
from charrnn.beam import beam_search, log_softmax, top_flat
from charrnn.kernels import gemm16, search
from charrnn.kernels.jit import kernel
from charrnn.model import Model, ModelConfig, State
from charrnn.vocab import END_ID, START_ID, Vocab
from tests import reference as ref
from tests.beam_reference import beam_search_numpy
from tests.common import CASE_IDS, CASES, make, ref_params, two_threads


BACKENDS = gemm16.backends()
needs_bf16 = pytest.mark.skipif(not BACKENDS, reason="this CPU has no bfloat16 products (AVX512_BF16 or AMX)")
backend_params = pytest.mark.parametrize("backend", BACKENDS or ["none"])


def ref_step(m, tok, h, c, operand=None):
    """Reference logits (nb, V) and new state of one step, float64 (with operand=bfloat16_operand:
    the products' operands rounded to bfloat16, as the bf16 precision's)."""
    L, B = m.cfg.layers, tok.shape[0]
    x = tok.reshape(1, B).astype(np.int64)
    c0 = c.astype(np.float64) if m.cfg.cell == "lstm" else None
    kw = {"operand": operand} if operand is not None else {}
    _, logits, hT, cT, _ = ref.forward(m.cfg.cell, ref_params(m), x, x, h.astype(np.float64), c0, None, m.cfg.nonlinearity,
                                       **kw)
    assert hT.shape == (L, B, m.cfg.hidden)
    return logits[0], hT, cT


# ----------------------------------------------------------------------------- packed steps
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("L", [1, 2])
def test_packed_step_equals_the_blas_step(cell, nonlin, L):
    """Logits and state of PackedSteps.step against Model.step (BLAS) to float32 rounding, and
    both against the float64 reference; 1 to 17 streams (short and full tiles of the micro-kernel),
    H = 40 cut into 1 or 2 blocks of units (16 + 24, as two threads would)."""
    for nb in (1, 2, 5, 9, 17):
        m, _, _, h, c = make(cell, nonlin, L, V=11, H=40, T=1, B=nb, dtype=np.float32, seed=20 + nb)
        rng = np.random.default_rng(nb)
        tok = rng.integers(0, 11, nb).astype(np.int32)
        want, wh, wc = ref_step(m, tok, h, c)
        blas = State(h.copy(), c.copy())
        got_blas = m.step(tok, blas)
        for blocks in (1, 2):
            with m.packed_steps(blocks) as ps:
                assert len(ps.packed.ub) == blocks + 1
                state = State(h.copy(), c.copy())
                got = ps.step(tok, state)
                assert got.shape == (nb, 11) and got.dtype == np.float32
                scale = np.max(np.abs(want))
                np.testing.assert_allclose(got, got_blas, rtol=0, atol=2e-6 * scale)
                np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)
                np.testing.assert_allclose(state.h, blas.h, rtol=0, atol=2e-6)
                np.testing.assert_allclose(state.h, wh, rtol=0, atol=2e-6)
                if cell == "lstm":
                    np.testing.assert_allclose(state.c, blas.c, rtol=0, atol=4e-6)
                else:
                    np.testing.assert_array_equal(state.c, c)  # other cells leave c alone


@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_packed_steps_in_float64_match_the_reference_closely(cell, nonlin):
    m, _, _, h, c = make(cell, nonlin, 2, V=9, H=24, T=1, B=6, dtype=np.float64, seed=3)
    tok = np.array([0, 8, 3, 3, 5, 1], dtype=np.int32)
    want, wh, _ = ref_step(m, tok, h, c)
    state = State(h.copy(), c.copy())
    got = m.packed_steps(2).step(tok, state)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(state.h, wh, rtol=0, atol=1e-12)


def test_blocks_change_no_number():
    """The products sum in the same order whatever the block: 1, 2 and 3 blocks agree exactly."""
    m, _, _, h, c = make("lstm", "tanh", 2, V=13, H=64, T=1, B=7, dtype=np.float32, seed=5)
    tok = np.arange(7, dtype=np.int32)
    outs = []
    for blocks in (1, 2, 3):
        state = State(h.copy(), c.copy())
        outs.append((m.packed_steps(blocks).step(tok, state), state.h))
    for lg, hh in outs[1:]:
        np.testing.assert_array_equal(lg, outs[0][0])
        np.testing.assert_array_equal(hh, outs[0][1])


def test_packed_copy_changes_only_when_repacked():
    """The packed weights are the model's at packed_steps() or repack(), never a copy that goes
    stale unseen: a change to theta shows after repack(), and Model.step sees it at once."""
    m, _, _, h, c = make("gru", "tanh", 2, V=9, H=16, T=1, B=3, dtype=np.float64, seed=6)
    tok = np.array([1, 2, 3], dtype=np.int32)
    ps = m.packed_steps()
    before = ps.step(tok, State(h.copy(), c.copy()))
    for name in ("rnn.weight_hh_l0", "rnn.weight_ih_l0", "rnn.weight_ih_l1", "decoder.weight"):
        m.params[name][:] *= -1.5
        np.testing.assert_array_equal(ps.step(tok, State(h.copy(), c.copy())), before)  # still the old copy
        fresh = m.step(tok, State(h.copy(), c.copy()))
        np.testing.assert_allclose(ps.repack().step(tok, State(h.copy(), c.copy())), fresh, rtol=0, atol=1e-12)
        before = fresh


def test_packed_step_checks_its_inputs():
    m, _, _, h, c = make("lstm", "tanh", 2, V=9, H=8, T=1, B=3, dtype=np.float32)
    ps = m.packed_steps()
    with pytest.raises(ValueError):
        ps.step(np.array([1, 2], dtype=np.int32), State(h, c))
    with pytest.raises(ValueError):
        ps.step(np.array([1, 2, 9], dtype=np.int32), State(h, c))


# ----------------------------------------------------------------------------- the search
def lively(chars, cell, nonlin, H, seed, dtype=np.float32, L=2):
    vocab = Vocab(chars)
    m = Model(ModelConfig(cell=cell, layers=L, hidden=H, vocab_size=vocab.size, nonlinearity=nonlin),
              dtype=dtype).init(seed)
    m.theta[:] *= 3  # a trajectory that moves
    return m, vocab


def same_hypotheses(a, b, tol, greedy=True):
    """The same texts, ends and token counts, scores within tol; and, unless `greedy` is off, the
    same greedy flags (which of two equal texts is kept turns on rounding: BLAS could give the greedy
    row and the beam row of one sequence different last bits, the packed kernel gives both the same)."""
    assert [h.text for h in a] == [h.text for h in b]
    assert [(h.end, h.tokens) for h in a] == [(h.end, h.tokens) for h in b]
    if greedy:
        assert [h.greedy for h in a] == [h.greedy for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=0, atol=tol)
    np.testing.assert_allclose([h.logprob for h in a], [h.logprob for h in b], rtol=0, atol=tol * 50)


@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_compiled_search_finds_what_the_numpy_search_found(cell, nonlin):
    """In float64 the two agree to rounding: same texts, ends, greedy flags, and scores to 1e-12;
    with and without a stop string, documents, beams of 1 to 7, 1 and 2 layers."""
    for L in (1, 2):
        m, vocab = lively("abcdefgh ", cell, nonlin, 16, seed=L + 3, dtype=np.float64, L=L)
        for width in (1, 2, 4, 7):
            for stop, docs in ((None, False), ("ab", False), (None, True)):
                args = (m, vocab, vocab.encode("ab"), width, 40)
                kw = dict(num=width, stop=stop, documents=docs)
                same_hypotheses(beam_search(*args, **kw), beam_search_numpy(*args, **kw), 1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=hs.integers(0, 10_000), width=hs.integers(1, 9), length=hs.integers(1, 30),
       stop=hs.sampled_from([None, "a", "ba", "zz"]), docs=hs.booleans(), cell=hs.sampled_from(["lstm", "gru", "rnn"]))
def test_compiled_search_agrees_on_random_models(seed, width, length, stop, docs, cell):
    m, vocab = lively("abcz", cell, "tanh", 8, seed, dtype=np.float64)
    m.params["decoder.bias"][END_ID] += 1.0  # <END> often likely (documents)
    args = (m, vocab, vocab.encode("a"), width, length)
    kw = dict(num=width, stop=stop, documents=docs)
    same_hypotheses(beam_search(*args, **kw), beam_search_numpy(*args, **kw), 1e-12)


SPLITS = ["units", "streams"]  # what two threads split (Model.SEARCH_SPLIT)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_two_threads_find_the_same_hypotheses(cell, split):
    """H = 128 runs on the generation threads, splitting the units (two blocks) or the streams
    between them: the same texts and the very same scores as one thread; and the float32 search
    agrees with the numpy one (BLAS logits)."""
    m, vocab = lively("abcdefghij ", cell, "tanh", 128, seed=9)
    m.theta[:] *= 0.5
    m.SEARCH_SPLIT = split
    before = threads.get_threads()
    try:
        threads.set_threads(1)
        assert m.generation_threads() == 1
        one = beam_search(m, vocab, vocab.encode("ab"), 6, 50, num=6, stop="cd")
        two_threads()
        assert m.generation_threads() == 2
        two = beam_search(m, vocab, vocab.encode("ab"), 6, 50, num=6, stop="cd")
        same_hypotheses(one, two, 0.0)
        same_hypotheses(two, beam_search_numpy(m, vocab, vocab.encode("ab"), 6, 50, num=6, stop="cd"), 1e-5, greedy=False)
    finally:
        threads.set_threads(before)


def test_search_reuses_its_buffers_and_packs_each_time():
    """A second search of the same width reuses the packed buffers but packs the weights again:
    a change of theta between searches is seen."""
    m, vocab = lively("abcdef", "lstm", "tanh", 16, seed=2, dtype=np.float64)
    first = beam_search(m, vocab, [], 3, 20, num=3)
    buffers = m._search
    m.params["decoder.weight"][:] = m.params["decoder.weight"][::-1]
    second = beam_search(m, vocab, [], 3, 20, num=3)
    assert m._search is buffers
    same_hypotheses(second, beam_search_numpy(m, vocab, [], 3, 20, num=3), 1e-12)
    assert [h.text for h in first] != [h.text for h in second]


# ----------------------------------------------------------------------------- the pieces
@kernel
def _log_softmax_rows(z, out):
    for r in range(z.shape[0]):
        search.log_softmax_row(z[r], out[r])


@kernel
def _top(vals, k, top_v, top_i):
    cnt = 0
    for i in range(vals.shape[0]):
        if vals[i] > -np.inf:
            cnt = search.top_insert(top_v, top_i, cnt, k, vals[i], i)
    return cnt


def test_log_softmax_row_matches_numpy_including_nan_and_inf():
    z = np.array([[1.0, 2.0, -3.0, 0.5], [np.nan, 1.0, 2.0, 3.0], [-np.inf, -np.inf, -np.inf, -np.inf],
                  [np.inf, 1.0, 2.0, 3.0], [-np.inf, 0.0, 1e30, -1e30]], dtype=np.float32)
    out = np.zeros(z.shape)
    _log_softmax_rows(z, out)
    np.testing.assert_allclose(out, log_softmax(z), rtol=1e-15, atol=0, equal_nan=True)


@settings(max_examples=200, deadline=None)
@given(vals=hs.lists(hs.sampled_from([-np.inf, np.nan, np.inf, 0.0, -0.0, 1.0, 2.0, -5.0, 3.5]), min_size=1, max_size=40),
       k=hs.integers(1, 12))
def test_top_insert_keeps_the_best_with_ties_in_index_order(vals, k):
    """The k best finite (or +inf) entries, best first, ties in index order: the full sort's
    prefix (top_flat's rule; top_flat itself may take any of the entries tied at the boundary)."""
    a = np.array(vals)
    top_v, top_i = np.zeros(k), np.zeros(k, dtype=np.int64)
    cnt = _top(a, k, top_v, top_i)
    ok = np.flatnonzero(a > -np.inf)
    want = ok[np.lexsort((ok, -a[ok]))][:k]
    assert list(top_i[:cnt]) == list(want)
    got = top_flat(a, k)
    np.testing.assert_array_equal(a[got], a[want])  # the same values, whichever ties it took


@pytest.mark.parametrize("width", [1, 3])
def test_search_in_chunks_is_the_same_search(width):
    """Model.run_search goes SEARCH_CHUNK positions per compiled call (so Ctrl-C is seen between
    them): chunks of 1, 3 and 7 positions give the hypotheses of one call, whether the search runs
    to its length or stops early (<END> in documents)."""
    m, vocab = lively("abcdef", "gru", "tanh", 16, seed=4, dtype=np.float64)
    for docs in (False, True):
        if docs:
            m.params["decoder.bias"][END_ID] += 1.5
        want = beam_search(m, vocab, vocab.encode("ab"), width, 25, num=width, documents=docs)
        assert all(h.end == ("end" if docs else "length") for h in want)  # documents: over within a chunk
        for chunk in (1, 3, 7):
            m.SEARCH_CHUNK = chunk
            same_hypotheses(beam_search(m, vocab, vocab.encode("ab"), width, 25, num=width, documents=docs), want, 0.0)
        del m.SEARCH_CHUNK
        same_hypotheses(want, beam_search_numpy(m, vocab, vocab.encode("ab"), width, 25, num=width, documents=docs),
                        1e-12)


# ----------------------------------------------------------------------------- bf16 (sample --precision bf16)
@needs_bf16
@backend_params
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("L", [1, 2])
def test_bf16_packed_step_matches_the_bf16_reference(backend, cell, nonlin, L):
    """Logits and state of a bf16 PackedSteps.step against the reference with bfloat16 operands to
    float32 accumulation, 1 to 17 streams (short and full tiles), 1 and 2 blocks of units; the
    float32 packed step is measurably further from that reference (the comparison sees the rounding)."""
    for nb in (1, 5, 17):
        m, _, _, h, c = make(cell, nonlin, L, V=11, H=40, T=1, B=nb, dtype=np.float32, seed=30 + nb)
        tok = np.random.default_rng(nb).integers(0, 11, nb).astype(np.int32)
        want, wh, wc = ref_step(m, tok, h, c, ref.bfloat16_operand)
        scale = np.max(np.abs(want))
        f32 = m.packed_steps(1).step(tok, State(h.copy(), c.copy()))
        assert np.max(np.abs(f32 - want)) > 20 * 2e-6 * scale
        for blocks in (1, 2):
            with m.packed_steps(blocks, precision=backend) as ps:
                state = State(h.copy(), c.copy())
                got = ps.step(tok, state)
                assert got.shape == (nb, 11) and got.dtype == np.float32
                np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)
                np.testing.assert_allclose(state.h, wh, rtol=0, atol=2e-6)
                if cell == "lstm":
                    np.testing.assert_allclose(state.c, wc, rtol=0, atol=4e-6)


@needs_bf16
@backend_params
def test_bf16_packed_steps_repack_and_blocks_change_no_number(backend):
    """1, 2 and 3 blocks give the very same numbers in bf16 too (each column sums over k in the
    same order whatever the block), and repack() sees a change of weights."""
    m, _, _, h, c = make("lstm", "tanh", 2, V=13, H=64, T=1, B=7, dtype=np.float32, seed=5)
    tok = np.arange(7, dtype=np.int32)
    outs = [m.packed_steps(b, precision=backend).step(tok, State(h.copy(), c.copy())) for b in (1, 2, 3)]
    for lg in outs[1:]:
        np.testing.assert_array_equal(lg, outs[0])
    ps = m.packed_steps(2, precision=backend)
    m.params["rnn.weight_ih_l1"][:] *= -1.5
    np.testing.assert_array_equal(ps.step(tok, State(h.copy(), c.copy())), outs[0])
    want = ref_step(m, tok, h, c, ref.bfloat16_operand)[0]
    np.testing.assert_allclose(ps.repack().step(tok, State(h.copy(), c.copy())), want, rtol=0,
                               atol=2e-6 * np.max(np.abs(want)))


def packed_logprob(ps, m, prime, ids):
    """log p(ids | <START> prime) stepping PackedSteps `ps` one stream at a time, as beam_search
    starts: the prime but its last token fed by the float32 sampler, then one step a token."""
    tokens = np.concatenate([[START_ID], prime]).astype(np.int32)
    state = m.new_state(1)
    if len(tokens) > 1:
        m.feed(tokens[:-1], state.h, state.c)
    total, tok = 0.0, int(tokens[-1])
    for i in ids:
        total += float(log_softmax(ps.step(np.array([tok], dtype=np.int32), state))[0, i])
        tok = int(i)
    return total


@needs_bf16
@backend_params
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_bf16_search_scores_its_texts_as_the_bf16_step_does(backend, cell, split, restore_threads):
    """Every text the bf16 search returns has the log-probability it reports under the bf16 packed
    step (each stream's products are its own rows, so one stream at a time gives the same numbers,
    and the step is held to the reference above); the search beats or equals greedy decoding by
    that step; and one thread and two give the very same hypotheses (H = 128, the units or the
    streams split between the threads; the decoder split between them at K = 8). Not compared with a numpy search stepping the
    reference: a state that float32 and float64 round to different sides of a bfloat16 tie moves a
    40-step trajectory's logits by up to ~2e-4 (measured), which reorders near-equal hypotheses."""
    m, vocab = lively("abcdefghij ", cell, "tanh", 128, seed=11)
    m.theta[:] *= 0.5
    m.SEARCH_SPLIT = split
    prime = vocab.encode("ab")
    for width in (3, 8):
        threads.set_threads(1)
        one = beam_search(m, vocab, prime, width, 40, num=width, stop="cd", precision=backend)
        ps = m.packed_steps(1, precision=backend)
        for h in one:
            assert abs(packed_logprob(ps, m, prime, h.ids) - h.logprob) < 1e-9, h.text
        greedy = []
        state, tok = m.new_state(1), prime[-1]
        m.feed(np.concatenate([[START_ID], prime[:-1]]).astype(np.int32), state.h, state.c)
        for _ in range(40):
            tok = int(np.argmax(ps.step(np.array([tok], dtype=np.int32), state)[0]))
            greedy.append(tok)
        if one[0].end == "length" and "cd" not in vocab.decode(greedy):  # both 40 characters: by total
            assert one[0].logprob >= packed_logprob(ps, m, prime, greedy) - 1e-9
        two_threads()
        assert m.generation_threads() == 2
        same_hypotheses(beam_search(m, vocab, prime, width, 40, num=width, stop="cd", precision=backend), one, 0.0)
    # the bf16 search is not float32's: the texts or their scores differ
    f32 = beam_search(m, vocab, prime, 8, 40, num=8, stop="cd")
    assert [h.text for h in f32] != [h.text for h in one] or max(abs(a.logprob - b.logprob) for a, b in zip(f32, one)) > 1e-4


def test_bf16_search_needs_a_float32_model_and_the_instructions(monkeypatch):
    m, vocab = lively("abc", "lstm", "tanh", 16, seed=1, dtype=np.float64)
    with pytest.raises(ValueError, match="float32"):
        beam_search(m, vocab, [], 3, 5, precision="bf16")
    m, vocab = lively("abc", "lstm", "tanh", 16, seed=1)
    monkeypatch.setattr(gemm16, "backends", lambda: ())
    with pytest.raises(ValueError, match="no bfloat16 products"):
        beam_search(m, vocab, [], 3, 5, precision="bf16")
    assert beam_search(m, vocab, [], 1, 5, precision="bf16")  # a beam of one: the float32 sampler


def test_the_split_of_a_search_follows_the_cache_rule():
    """split_streams: the streams when the panels fit in half of one core's L2, or in all of it with
    16 or more streams; the units otherwise. Model.run_search follows it (and SEARCH_SPLIT forces it)."""
    mib = 1 << 20
    assert search.split_streams(mib, 5, l2=2 * mib) and search.split_streams(2 * mib, 17, l2=2 * mib)
    assert not search.split_streams(mib + 1, 9, l2=2 * mib) and not search.split_streams(2 * mib + 1, 17, l2=2 * mib)
    assert search.l2_bytes() >= 64 << 10
    m, vocab = lively("abcdef", "lstm", "tanh", 128, seed=3)
    before = threads.get_threads()
    try:
        two_threads()
        assert m.generation_threads() == 2
        want = search.split_streams(m._panel_bytes("fp32"), 4)
        beam_search(m, vocab, [], 3, 10)
        assert m._search[0][3] == want
        for split in SPLITS:
            m.SEARCH_SPLIT = split
            beam_search(m, vocab, [], 3, 10)
            assert m._search[0][3] == (split == "streams")
    finally:
        threads.set_threads(before)
