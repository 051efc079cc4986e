"""charrnn eval --per-char (charrnn/perchar.py): one JSON line per scored position whose logprobs
sum to the file's score as `charrnn eval` computes it, with ranks and top guesses that agree with
an independent float64 numpy forward (tests/reference.py), <END> lines in document mode, and
one-line errors."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn import evaluate
from charrnn.cli import cli
from charrnn.perchar import PerCharScorer, iter_positions
from charrnn.vocab import START_ID
from tests import reference as ref
from tests.inspect_helpers import TEXT, make_checkpoint


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def lines(res):
    return [json.loads(ln) for ln in res.stdout.splitlines()]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_per_char_lines_sum_to_evals_score(tmp_path, cell):
    model = tmp_path / "m.npz"
    make_checkpoint(model, cell)
    text = TEXT * 3 + "unknown: ~`\n"  # characters outside the vocabulary are scored as <UNK>
    f = tmp_path / "t.txt"
    f.write_text(text)
    total = json.loads(run(["eval", str(f), "--model", str(model), "--json", "-q"]).stdout)
    res = run(["eval", str(f), "--model", str(model), "--per-char", "-q"])
    assert res.exit_code == 0, res.output
    got = lines(res)
    assert len(got) == total["tokens"] == len(text)
    assert "".join(d["char"] for d in got) == text
    assert math.isclose(math.fsum(d["logprob"] for d in got), -total["nll"], rel_tol=1e-12, abs_tol=0)
    assert sum(1 for d in got if d.get("unk")) == total["unk"] > 0
    assert all(len(d["top"]) == 5 and d["rank"] >= 1 for d in got)


def test_per_char_agrees_with_a_numpy_forward(tmp_path):
    """logprob, rank and the top guesses against tests/reference.py's float64 forward of the same weights."""
    m, v = make_checkpoint(tmp_path / "m.npz", "gru", layers=2, hidden=12)
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    got = lines(run(["eval", str(f), "--model", str(tmp_path / "m.npz"), "--per-char", "--top", "3", "-q"]))
    tokens = np.concatenate([[START_ID], v.encode(TEXT)])
    x, y = tokens[:-1, None], tokens[1:, None]
    params = {k: a.astype(np.float64) for k, a in m.params.items()}
    L, H = m.cfg.layers, m.cfg.hidden
    _, logits, *_ = ref.forward("gru", params, x, y, np.zeros((L, 1, H)))
    logp = ref.log_softmax(logits[:, 0])  # (N, V)
    for t, d in enumerate(got):
        assert d["logprob"] == pytest.approx(logp[t, y[t, 0]], abs=1e-4)
        order = np.argsort(-logp[t])
        assert d["rank"] == 1 + int(np.flatnonzero(order == y[t, 0])[0])
        assert [c for c, _ in d["top"]] == [v.tokens[i] for i in order[:3]]
        assert [p for _, p in d["top"]] == pytest.approx(np.exp(logp[t, order[:3]]), abs=1e-5)


def test_document_mode_gives_end_its_own_line(tmp_path):
    model = tmp_path / "m.npz"
    make_checkpoint(model, "lstm", docs="line")
    f = tmp_path / "t.txt"
    f.write_text("the cat\nsat on\n")
    total = json.loads(run(["eval", str(f), "--model", str(model), "--json", "-q"]).stdout)
    got = lines(run(["eval", str(f), "--model", str(model), "--per-char", "-q"]))
    assert [d["char"] for d in got] == list("the cat") + ["<END>"] + list("sat on") + ["<END>"]
    assert len(got) == total["tokens"]
    assert math.isclose(math.fsum(d["logprob"] for d in got), -total["nll"], rel_tol=1e-12)


def test_spans_do_not_change_the_lines(tmp_path, monkeypatch):
    """Text longer than a span (scored in several, state carried) and fed in odd chunks."""
    m, v = make_checkpoint(tmp_path / "m.npz", "rnn")
    text = TEXT * 5
    whole = list(iter_positions(PerCharScorer(m, v, 2), [text]))
    monkeypatch.setattr(evaluate, "SPAN", 7)
    scorer = PerCharScorer(m, v, 2)
    cut = list(iter_positions(scorer, [text[i : i + 11] for i in range(0, len(text), 11)]))
    assert [p.char for p in cut] == [p.char for p in whole]
    assert [p.rank for p in cut] == [p.rank for p in whole]
    assert np.allclose([p.logprob for p in cut], [p.logprob for p in whole], atol=1e-6)
    assert math.isclose(math.fsum(p.logprob for p in cut), -scorer.score.nll, rel_tol=1e-12)


def test_per_char_usage_errors(tmp_path):
    model = tmp_path / "m.npz"
    make_checkpoint(model)
    f = tmp_path / "t.txt"
    f.write_text("the cat")
    for args, want in ((["--per-char", "--json"], "no --json"), (["--top", "3"], "--top goes with --per-char"),
                       (["--per-char", str(f)], "one FILE")):
        res = CliRunner().invoke(cli, ["eval", str(f), "--model", str(model), *args])
        assert res.exit_code == 2 and want in res.output
    bad = tmp_path / "b.bin"
    bad.write_bytes(b"\x00\xff\xfe binary")
    res = CliRunner().invoke(cli, ["eval", str(bad), "--model", str(model), "--per-char", "-q"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "error" in res.output


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_per_char_agrees_with_pytorch(tmp_path, cell):
    """The checkpoint loaded into torch.nn.LSTM/GRU/RNN + Linear fed one-hot vectors (DESIGN.md's
    portability contract): the same log-probability at every character, the same first guess."""
    torch = pytest.importorskip("torch")
    m, v = make_checkpoint(tmp_path / "m.npz", cell, layers=2, hidden=16, scale=2.0)
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    got = lines(run(["eval", str(f), "--model", str(tmp_path / "m.npz"), "--per-char", "--top", "1", "-q"]))
    V, H = v.size, 16
    rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](V, H, 2).double()
    dec = torch.nn.Linear(H, V).double()
    named = {f"rnn.{n}": p for n, p in rnn.named_parameters()}
    named.update({f"decoder.{n}": p for n, p in dec.named_parameters()})
    with torch.no_grad():
        for name, value in m.params.items():
            named[name].copy_(torch.from_numpy(value.astype(np.float64)))
        x = torch.nn.functional.one_hot(torch.tensor([START_ID] + v.encode(TEXT).tolist()[:-1]), V).double()
        out, _ = rnn(x[:, None, :])
        logp = torch.log_softmax(dec(out[:, 0]), dim=-1).numpy()  # (N, V)
    y = v.encode(TEXT)
    assert [d["logprob"] for d in got] == pytest.approx(logp[np.arange(len(y)), y].tolist(), abs=2e-5)
    assert [d["top"][0][0] for d in got] == [v.tokens[i] for i in logp.argmax(axis=1)]


def test_top_covers_the_whole_vocabulary_or_nothing(tmp_path):
    m, v = make_checkpoint(tmp_path / "m.npz", "lstm")
    f = tmp_path / "t.txt"
    f.write_text("the cat")
    whole = lines(run(["eval", str(f), "--model", str(tmp_path / "m.npz"), "--per-char", "--top", "100", "-q"]))
    for d in whole:
        assert len(d["top"]) == v.size and sum(p for _, p in d["top"]) == pytest.approx(1.0)
        probs = [p for _, p in d["top"]]
        assert probs == sorted(probs, reverse=True)
        assert [c for c, _ in d["top"]].index(d["char"]) + 1 == d["rank"]
    none = lines(run(["eval", str(f), "--model", str(tmp_path / "m.npz"), "--per-char", "--top", "0", "-q"]))
    assert all(d["top"] == [] for d in none) and [d["rank"] for d in none] == [d["rank"] for d in whole]
