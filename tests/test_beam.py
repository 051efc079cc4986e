"""Beam search (charrnn/beam.py, `charrnn sample --beam K`): a beam of one is greedy decoding; a
wider beam is never less probable than greedy decoding, scored independently by the float64 numpy
reference (tests/reference.py); on models small enough to enumerate every sequence, a wide beam
finds the true best one; the stop-string automaton agrees with str.find; and the command line."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from charrnn.beam import StopMatcher, beam_search, top_flat
from charrnn.generate import SampleOptions, continuation_logprob, sample_pieces
from charrnn.model import Model, ModelConfig
from charrnn.vocab import END_ID, START_ID, Vocab
from tests import reference as ref
from tests.common import CASE_IDS, CASES, ROOT, ref_params, run


def tiny(chars="abc", cell="lstm", nonlin="tanh", H=8, L=2, seed=0, dtype=np.float32, sharp=3.0):
    vocab = Vocab(chars)
    m = Model(ModelConfig(cell=cell, layers=L, hidden=H, vocab_size=vocab.size, nonlinearity=nonlin),
              dtype=dtype).init(seed)
    m.params["decoder.weight"][:] *= sharp  # sharper distributions than at init, so paths differ
    m.params["decoder.bias"][:] = 0.0  # and the state, not a bias, decides the likeliest character
    return m, vocab


def ref_logprobs(m, prime_ids, seqs):
    """Reference log-probabilities (float64, numpy) of each sequence of token ids (all of one
    length) after <START> prime, from a zero state: per position, (B, n)."""
    seqs = np.asarray(seqs, dtype=np.int64).reshape(len(seqs), -1)
    B, n = seqs.shape
    head = np.concatenate([[START_ID], np.asarray(prime_ids, dtype=np.int64)])
    tokens = np.concatenate([np.repeat(head[None], B, 0), seqs], axis=1).T  # (T + 1, B)
    x, y = tokens[:-1], tokens[1:]
    L, H = m.cfg.layers, m.cfg.hidden
    h0 = np.zeros((L, B, H))
    c0 = np.zeros((L, B, H)) if m.cfg.cell == "lstm" else None
    logits = ref.forward(m.cfg.cell, ref_params(m), x, y, h0, c0, None, m.cfg.nonlinearity)[1]
    lp = np.take_along_axis(ref.log_softmax(logits), y[..., None], axis=-1)[..., 0]  # (T, B)
    return lp[len(head) - 1 :].T  # the positions of the sequence


def ref_total(m, prime_ids, ids):
    return float(ref_logprobs(m, prime_ids, [ids]).sum()) if len(ids) else 0.0


def greedy_sample(m, vocab, prime, length, documents=False):
    pieces = sample_pieces(m, vocab, SampleOptions(temp=0.0, length=length, prime=prime, seed=1), documents)
    return "".join(p.text for p in pieces)


# ----------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_beam_of_one_is_greedy_decoding(cell, nonlin):
    m, vocab = tiny("abcdefgh ", cell, nonlin, H=16, seed=4)
    m.theta[:] *= 5  # large weights: a lively trajectory rather than one repeated character
    texts = []
    for prime in ("", "ab c", "hgf"):
        beam = beam_search(m, vocab, vocab.encode(prime), 1, 60)
        assert len(beam) == 1 and beam[0].end == "length" and len(beam[0].text) == 60
        assert beam[0].text == greedy_sample(m, vocab, prime, 60)
        texts.append(beam[0].text)
    assert len(set("".join(texts))) > 1  # not one constant sequence


def test_beam_of_one_is_greedy_decoding_of_documents():
    m, vocab = tiny("abc", seed=5)
    m.params["decoder.bias"][END_ID] += 1.5  # documents end within the length
    beam = beam_search(m, vocab, [], 1, 40, documents=True)[0]
    assert beam.text == greedy_sample(m, vocab, "", 40, documents=True)
    assert beam.end == "end" and len(beam.text) < 39


def test_beam_is_never_less_probable_than_greedy():
    """Scored by the numpy reference, not by the search's own numbers; and a wider beam is
    sometimes strictly better (else the test could not tell a beam from greedy decoding)."""
    better = 0
    for seed in range(12):
        m, vocab = tiny("abcdef", seed=seed, sharp=1.5)
        greedy = vocab.encode(greedy_sample(m, vocab, "", 12))
        g = ref_total(m, [], greedy)
        for width in (2, 5):
            best = beam_search(m, vocab, [], width, 12)[0]
            b = ref_total(m, [], best.ids)
            assert len(best.ids) == 12
            assert b >= g - 1e-4, (seed, width, b, g)
            assert abs(best.logprob - b) < 1e-4  # the logprob it reports is the reference's
            better += b > g + 1e-3
    assert better >= 3


# ----------------------------------------------------------------------------- exhaustive search
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_wide_beam_finds_the_best_of_every_sequence(cell):
    """V = 3 characters, 5 positions: all 243 sequences scored by the reference; a beam of 81
    (= 3^4, so nothing is ever pruned) must find the best, and its 5 best in order."""
    m, vocab = tiny("abc", cell, seed=11, dtype=np.float64, sharp=2.0)
    prime = vocab.encode("ba")
    seqs = np.array(list(itertools.product(vocab.encode("abc").tolist(), repeat=5)))
    totals = ref_logprobs(m, prime, seqs).sum(axis=1)
    order = np.argsort(-totals)
    assert totals[order[4]] - totals[order[5]] > 1e-9  # no ties among the top: a well-posed test
    found = beam_search(m, vocab, prime, 81, 5, num=5)
    assert [h.text for h in found] == [vocab.decode(seqs[i]) for i in order[:5]]
    np.testing.assert_allclose([h.logprob for h in found], totals[order[:5]], rtol=0, atol=1e-9)
    # a narrow beam is no better than the truth (and here, worse or equal)
    assert beam_search(m, vocab, prime, 2, 5)[0].logprob <= totals[order[0]] + 1e-9


def test_wide_beam_finds_the_best_document():
    """Documents: every sequence of up to 4 tokens, ended by <END> or cut at the length, ranked
    by mean log-probability per token (<END> counted); a beam wider than their number finds the best."""
    m, vocab = tiny("abc", seed=2, dtype=np.float64, sharp=2.0)
    m.params["decoder.bias"][END_ID] += 1.0
    chars = vocab.encode("abc").tolist()
    best = None
    for k in range(0, 5):
        for seq in itertools.product(chars, repeat=k):
            ended = k < 4
            toks = list(seq) + ([END_ID] if ended else [])
            lp = ref_logprobs(m, [], [toks])[0]
            mean = lp.sum() / len(toks)
            if best is None or mean > best[0]:
                best = (mean, vocab.decode(seq), lp[: len(seq)].sum())
    h = beam_search(m, vocab, [], 200, 4, documents=True)[0]
    assert h.text == best[1]
    assert abs(h.score - best[0]) < 1e-9 and abs(h.logprob - best[2]) < 1e-9


def test_stop_string_ends_hypotheses_and_is_not_part_of_the_text():
    m, vocab = tiny("abc", seed=4, dtype=np.float64)
    plain = beam_search(m, vocab, [], 4, 30, num=4)
    stop = plain[0].text[5:7]
    found = beam_search(m, vocab, [], 4, 30, num=4, stop=stop)
    for h in found:
        assert stop not in h.text
        assert (h.end == "stop") == (len(h.ids) + len(stop) <= 30 and h.tokens == len(h.ids) + len(stop))
        assert abs(h.logprob - ref_total(m, [], h.ids)) < 1e-9
    assert any(h.end == "stop" for h in found)


@settings(max_examples=200, deadline=None)
@given(stop=hs.text("ab", min_size=1, max_size=5), text=hs.text("abc", max_size=30))
def test_stop_automaton_agrees_with_str_find(stop, text):
    vocab = Vocab("abc")
    sm = StopMatcher(vocab, stop)
    state, first = 0, -1
    for i, tok in enumerate(vocab.encode(text)):
        state = int(sm.advance(np.array([state]), np.array([tok]))[0])
        if state == sm.m:
            first = i + 1 - len(stop)
            break
    assert first == text.find(stop)


def test_top_flat_orders_ties_by_index_and_skips_non_finite():
    s = np.array([[1.0, 3.0, -np.inf], [3.0, np.nan, 2.0]])
    np.testing.assert_array_equal(top_flat(s, 3), [1, 3, 5])
    np.testing.assert_array_equal(top_flat(s, 1), [1])
    np.testing.assert_array_equal(top_flat(s, 10), [1, 3, 5, 0])


def test_num_gives_distinct_texts_best_first():
    m, vocab = tiny("abcd", seed=6)
    found = beam_search(m, vocab, [], 6, 10, num=6)
    assert len({h.text for h in found}) == 6
    scores = [h.score for h in found]
    assert scores == sorted(scores, reverse=True)


def test_sample_logprob_matches_the_reference():
    m, vocab = tiny("abcdef", seed=9)
    prime = vocab.encode("cab")
    ids = vocab.encode("fedcbaabc")
    assert abs(continuation_logprob(m, prime, ids) - ref_total(m, prime, ids)) < 1e-4
    assert continuation_logprob(m, prime, ids[:0]) == 0.0


# ----------------------------------------------------------------------------- command line
def sh(args, input=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "charrnn", *args], input=input, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("beam")
    corpus = d / "markov.txt"
    corpus.write_text(open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8").read()[:20000])
    res = run(["train", str(corpus), "--out", str(d / "run"), "--steps", "30", "--hidden", "32", "--batch", "16",
               "--seq", "32", "--threads", "1", "-q"])
    assert res.exit_code == 0, res.output
    return str(d / "run")


def test_cli_beam_of_one_equals_greedy_and_reports_logprob(model_dir):
    greedy = run(["sample", "--model", model_dir, "--temp", "0", "--length", "80", "-q"])
    beam = sh(["sample", "--model", model_dir, "--beam", "1", "--length", "80"])
    assert beam.returncode == 0 and beam.stdout == greedy.output and len(beam.stdout) == 81
    assert "log-probability" in beam.stderr
    q = run(["sample", "--model", model_dir, "--beam", "4", "--length", "40", "--num", "2", "-q"])
    assert q.exit_code == 0 and len(q.output.split("\n")) == 3
    assert "log-probability" not in q.output


def test_cli_beam_jsonl(model_dir):
    res = run(["sample", "--model", model_dir, "--beam", "4", "--num", "3", "--length", "30", "--prime", "the ",
               "--format", "jsonl", "-q"])
    assert res.exit_code == 0
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert len(rows) == 3 and len({r["text"] for r in rows}) == 3
    for r in rows:
        # the run's tokens.npy is at hand: the copy check (tests/test_copycheck.py) adds two keys
        assert set(r) == {"text", "prime", "seed", "temp", "logprob", "end", "longest_copy", "copied_frac"}
        assert r["prime"] == "the " and r["seed"] is None and r["temp"] is None and r["end"] == "length"
        assert len(r["text"]) == 30 and r["logprob"] < 0
    assert [r["logprob"] for r in rows] == sorted((r["logprob"] for r in rows), reverse=True)


@pytest.mark.parametrize("args,needle", [
    (["--beam", "3", "--temp", "0.5"], "--temp"), (["--beam", "3", "--top-k", "2"], "--top-k"),
    (["--beam", "3", "--top-p", "0.9"], "--top-p"), (["--beam", "3", "--length", "0"], "--length"),
    (["--beam", "2", "--num", "3"], "--num 3"), (["--beam", "0"], "--beam"), (["--beam", "x"], "--beam"),
    (["--beam", "100000"], "--beam"), (["--precision", "bf16"], "--precision bf16 is for --beam"),
    (["--beam", "3", "--precision", "bf8"], "--precision"),
])
def test_cli_beam_refusals(model_dir, args, needle):
    res = run(["sample", "--model", model_dir, *args])
    assert res.exit_code == 2 and needle in res.output
    if "charrnn: error" in res.output:
        assert len(res.output.strip().splitlines()) == 1


def test_cli_beam_precision_bf16(model_dir):
    """--precision bf16 runs the search on bfloat16 products and says so on stderr (the texts those of
    beam_search(precision="bf16")); on a CPU without them, a one-line note and float32's texts. A beam
    of one stays the float32 sampler's greedy decoding, silently."""
    from charrnn import checkpoint, precision
    from charrnn.beam import beam_search

    args = ["sample", "--model", model_dir, "--beam", "4", "--num", "2", "--length", "40", "--prime", "the "]
    res = sh(args + ["--precision", "bf16"])
    assert res.returncode == 0, res.stderr
    ck = checkpoint.load(checkpoint.resolve(model_dir)[0])
    have = precision.backend() is not None
    if have:
        assert "beam search on bf16 products" in res.stderr and "note:" not in res.stderr
    else:
        assert "note: this CPU has no bfloat16 products" in res.stderr
    found = beam_search(ck.model, ck.vocab, ck.vocab.encode("the "), 4, 40, num=2, precision="bf16" if have else "fp32")
    assert res.stdout == "".join("the " + h.text + "\n" for h in found)
    one = sh(["sample", "--model", model_dir, "--beam", "1", "--length", "40", "--precision", "bf16", "-q"])
    assert one.returncode == 0 and one.stderr == ""
    assert one.stdout == run(["sample", "--model", model_dir, "--temp", "0", "--length", "40", "-q"]).output


def test_cli_beam_pipe_ends_quietly(model_dir):
    cmd = (f"{sys.executable} -m charrnn sample --model {model_dir} --beam 3 --num 3 --length 50 | head -n 1; "
           "echo status=${PIPESTATUS[0]}")
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=180)
    assert "status=0" in res.stdout and "Traceback" not in res.stderr
