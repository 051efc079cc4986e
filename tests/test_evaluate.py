"""Scoring text (charrnn/evaluate.py) exactly as docs/design.md defines it: <START> c1 ... cN from a zero
state, every character scored (no <END>) in stream mode; in document mode every character and
every <END>, never the <START> after an <END>; unknown characters as <UNK>, counted; the result
independent of how the text is cut into spans."""

import json
import math

import numpy as np
import pytest

from charrnn import evaluate
from charrnn.evaluate import Score, score_text, score_tokens
from charrnn.data import encode_stream
from charrnn.model import Model, ModelConfig
from charrnn.vocab import END_ID, START_ID, UNK_ID, Vocab


def model_for(text, cell="lstm", seed=2):
    vocab = Vocab.from_text(text)
    m = Model(ModelConfig(cell=cell, layers=2, hidden=8, vocab_size=vocab.size), dtype=np.float64).init(seed)
    return m, vocab


def nll_by_forward(m, tokens):
    """-log p(tokens[i+1] | tokens[:i+1]) for every i, through the batch forward with one stream."""
    x = np.ascontiguousarray(tokens[:-1, None], dtype=np.int32)
    y = np.ascontiguousarray(tokens[1:, None], dtype=np.int32)
    h, c = m.zero_state(1)
    return m.forward_backward(x, y, h, c, backward=False)["nll"][:, 0]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_stream_mode_scores_every_character_and_not_the_end(cell):
    text = "a cab, a dab.\nbad cab"
    m, v = model_for(text, cell)
    s = score_text(m, v, text)
    ids = v.encode(text)
    want = nll_by_forward(m, np.concatenate([[START_ID], ids]))
    assert s.tokens == len(text) and s.unk == 0
    assert math.isclose(s.nll, want.sum(), rel_tol=1e-12)
    assert math.isclose(s.nats, want.mean(), rel_tol=1e-12)
    assert math.isclose(s.bits, s.nats / math.log(2), rel_tol=1e-12)
    assert math.isclose(s.perplexity, math.exp(s.nats), rel_tol=1e-12)


def test_document_mode_scores_ends_but_not_the_starts_after_them():
    text = "ab\nba\n\naab\n"
    m, v = model_for(text.replace("\n", ""))
    s = score_text(m, v, text, docs="line")
    seq = []
    for d in ("ab", "ba", "aab"):
        seq += [START_ID, *v.encode(d), END_ID]
    seq = np.array(seq)
    nll = nll_by_forward(m, seq)
    keep = seq[1:] != START_ID  # the <START> after an <END> is certain by construction
    assert s.tokens == 3 * 1 + len("ab" + "ba" + "aab") == keep.sum()
    assert math.isclose(s.nll, nll[keep].sum(), rel_tol=1e-12)


def test_unknown_characters_count_as_unk():
    m, v = model_for("abc")
    s = score_text(m, v, "abzzc")
    ids = np.array([START_ID, *v.encode("ab"), UNK_ID, UNK_ID, *v.encode("c")])
    assert s.tokens == 5 and s.unk == 2
    assert math.isclose(s.nll, nll_by_forward(m, ids).sum(), rel_tol=1e-12)


def test_spans_do_not_change_the_result(monkeypatch):
    text = "the quick brown fox jumps over the lazy dog " * 20
    m, v = model_for(text)
    whole = score_text(m, v, text)
    seen = []
    monkeypatch.setattr(evaluate, "SPAN", 37)
    cut = score_text(m, v, text, progress=seen.append)
    assert math.isclose(cut.nll, whole.nll, rel_tol=1e-12) and cut.tokens == whole.tokens
    assert sum(seen) == len(text) and len(seen) == -(-len(text) // 37)


def test_nothing_to_score():
    m, v = model_for("ab")
    s = score_tokens(m, np.array([START_ID]))
    assert (s.nll, s.tokens, s.unk) == (0.0, 0, 0) and math.isnan(s.nats) and math.isnan(s.perplexity)
    d = Score(3.0, 2, 1).to_dict()
    assert d["nats_per_char"] == 1.5 and d["bits_per_char"] == 1.5 / math.log(2) and d["unk"] == 1


# ----------------------------------------------------------------------------- streaming over chunks
def chunked(text, k):
    return [text[i : i + k] for i in range(0, len(text), k)]


@pytest.mark.parametrize("docs", [None, "line", "blank"])
@pytest.mark.parametrize("k", [1, 2, 3, 7, 16, 1000])
def test_score_chunks_equals_score_text_exactly(monkeypatch, docs, k):
    """Scoring a text as chunks of k characters, with the state carried across them, gives the
    same number as scoring it whole, to the last bit: the model sees the same spans (a small SPAN
    puts span edges inside and across chunks), documents and separators split across chunks, and
    unknown characters counted."""
    text = "the cat sat.\nthe dog ran\n\n a cab, a dab. \n \nbad cab zq\n\n\nend" * 3
    m, v = model_for(text.replace("z", "").replace("q", ""))
    monkeypatch.setattr(evaluate, "SPAN", 11)
    whole = score_text(m, v, text, docs=docs)
    seen = []
    got = evaluate.score_chunks(m, v, chunked(text, k), docs=docs, progress=seen.append)
    assert (got.nll, got.tokens, got.unk) == (whole.nll, whole.tokens, whole.unk)
    assert got.unk == 6 and sum(seen) == len(
        encode_stream(v, text, docs, end=docs is not None)) - 1


def test_score_chunks_of_a_document_free_text():
    m, v = model_for("ab")
    s = evaluate.score_chunks(m, v, ["\n", "\n\n", " \n"], docs="blank")
    assert (s.nll, s.tokens, s.unk) == (0.0, 0, 0)


def test_score_tokens_reads_a_mapped_file_span_by_span(tmp_path, monkeypatch):
    """Validation scores the token file's mapped ids: the same number as from an int32 copy."""
    text = "the quick brown fox jumps over the lazy dog " * 30
    m, v = model_for(text)
    ids = encode_stream(v, text, None, end=False, dtype=np.uint8)
    np.save(tmp_path / "t.npy", ids)
    mapped = np.load(tmp_path / "t.npy", mmap_mode="r")
    monkeypatch.setattr(evaluate, "SPAN", 64)
    a, b = score_tokens(m, mapped), score_tokens(m, ids.astype(np.int32))
    assert (a.nll, a.tokens) == (b.nll, b.tokens) and a.tokens == len(text)


def test_eval_logs_progress_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    """Off a terminal (CliRunner's stderr is not one), eval says how far it got at intervals
    (progress.Tally.LOG_EVERY_S, 0 here so every span reports); with -q it says nothing."""
    from click.testing import CliRunner

    from charrnn import checkpoint, cli, progress

    text = "the quick brown fox jumps over the lazy dog\n" * 40
    m, v = model_for(text)
    checkpoint.save(str(tmp_path / "m.npz"), m, v, {"train": {"docs": None}})
    f = tmp_path / "t.txt"
    f.write_text(text)
    monkeypatch.setattr(progress.Tally, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(evaluate, "SPAN", 500)
    res = CliRunner().invoke(cli.cli, ["eval", str(f), "--model", str(tmp_path / "m.npz"), "--json"])
    assert res.exit_code == 0, res.output
    lines = [x for x in res.stderr.splitlines() if x.startswith(f"charrnn: scoring {f}:")]
    assert len(lines) == -(-len(text) // 500) and "characters so far" in lines[-1]
    rec = json.loads(res.stdout)
    ck = checkpoint.load(str(tmp_path / "m.npz"))
    assert rec["tokens"] == len(text) and rec["nll"] == score_text(ck.model, ck.vocab, text).nll  # exactly
    res = CliRunner().invoke(cli.cli, ["eval", str(f), "--model", str(tmp_path / "m.npz"), "-q"])
    assert res.exit_code == 0 and res.stderr == ""
