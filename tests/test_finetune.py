"""Fine-tuning (train --init-from) and given vocabularies (train --vocab): the transplanted and
extended weights (old tokens' logits unchanged, also through PyTorch), --unknown error|unk|extend,
the origin record, exact resume of such runs, and one-line errors for every bad input."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn import checkpoint
from charrnn.cli import cli
from charrnn.finetune import transplant
from charrnn.model import Model, ModelConfig
from charrnn.vocab import Vocab
from tests.common import CASE_IDS, CASES, meta_of, params_of, run
from tests.common import SMALL_FINETUNE as SMALL

LETTERS = "the cat sat on the mat and the dog ran to the hat while a bird sang\n" * 60
DIGITS = "3 + 4 = 7\n12 - 5 = 7\nthe sum of 8 and 9 is 17\n" * 80
NEW_CHARS = sorted(set(DIGITS) - set(LETTERS))  # digits, "+", "-", "=", and the "u" and "f" of "sum of"


def one_line_error(res, code):
    assert res.exit_code == code, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("charrnn: error: "), res.output
    return lines[0]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "letters.txt").write_text(LETTERS, encoding="utf-8")
    (d / "digits.txt").write_text(DIGITS, encoding="utf-8")
    return str(d / "letters.txt"), str(d / "digits.txt")


@pytest.fixture(scope="module")
def parent(texts, tmp_path_factory):
    """A 2x16 LSTM trained a few steps on letters only (no digits, '+', '-', '=')."""
    out = str(tmp_path_factory.mktemp("parent") / "run")
    res = run(["train", texts[0], "--out", out, "--hidden", "16", "--steps", "8", *SMALL])
    assert res.exit_code == 0, res.output
    return out


# ---------------------------------------------------------------------------------- the weights
def logits_of(model, vocab, text):
    state = model.new_state(1)
    ids = [0] + [vocab.id_of(ch) for ch in text]
    return np.stack([model.step(np.array([i]), state)[0] for i in ids])  # (N+1, V)


@pytest.mark.parametrize("cell,nonlin", CASES, ids=CASE_IDS)
def test_extended_model_keeps_the_old_tokens_logits_and_new_rows_only_add(cell, nonlin):
    old = Vocab("acegx")
    new = Vocab("abcdefgxyz")  # new characters sorted in before, between and after the old ones
    parent = Model(ModelConfig(cell, 2, 12, old.size, nonlin)).init(5, forget_bias=1.0)
    child = transplant(parent, old, new, ModelConfig(cell, 2, 12, new.size, nonlin), seed=7)
    text = "cagexaacg"
    a, b = logits_of(parent, old, text), logits_of(child, new, text)
    idx = [new.id_of(t) for t in old.tokens]
    np.testing.assert_array_equal(b[:, idx], a)  # identical: the same numbers in the same sums
    fresh = [new.id_of(ch) for ch in "bdfyz"]
    assert not np.allclose(b[:, fresh], 0)
    bound = 1 / np.sqrt(12)
    for name in ("rnn.weight_ih_l0", "decoder.weight", "decoder.bias"):
        w = child.params[name]
        part = w[:, fresh] if name == "rnn.weight_ih_l0" else w[fresh]
        assert np.all(np.abs(part) <= bound) and np.std(part) > bound / 4, name  # uniform in +-1/sqrt(H)
    for name in ("rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.bias_ih_l0", "rnn.bias_hh_l1"):
        np.testing.assert_array_equal(child.params[name], parent.params[name])


def test_new_rows_depend_on_the_seed_alone():
    old, new = Vocab("ab"), Vocab("abcd")
    parent = Model(ModelConfig("gru", 1, 8, old.size)).init(1)
    cfg = ModelConfig("gru", 1, 8, new.size)
    a, b, c = (transplant(parent, old, new, cfg, seed=s).theta for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@settings(max_examples=40, deadline=None)
@given(st.sets(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=12),
       st.sets(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=12))
def test_transplant_moves_every_old_token_to_its_sorted_id(old_chars, more):
    old, new = Vocab(old_chars), Vocab(old_chars | more)
    parent = Model(ModelConfig("rnn", 1, 4, old.size)).init(0)
    child = transplant(parent, old, new, ModelConfig("rnn", 1, 4, new.size), seed=0)
    for tok in old.tokens:
        i, j = old.id_of(tok), new.id_of(tok)
        np.testing.assert_array_equal(child.params["rnn.weight_ih_l0"][:, j], parent.params["rnn.weight_ih_l0"][:, i])
        np.testing.assert_array_equal(child.params["decoder.weight"][j], parent.params["decoder.weight"][i])
        assert child.params["decoder.bias"][j] == parent.params["decoder.bias"][i]
    assert list(new.chars) == sorted(new.chars)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_extended_checkpoint_loads_into_pytorch_and_old_logits_are_unchanged(cell, tmp_path):
    torch = pytest.importorskip("torch")
    old, new = Vocab("hello wrd"), Vocab("hello wrd0123!")
    H, L = 16, 2
    parent = Model(ModelConfig(cell, L, H, old.size)).init(2)
    child = transplant(parent, old, new, ModelConfig(cell, L, H, new.size), seed=9)
    paths = {}
    for name, m, v in (("parent", parent, old), ("child", child, new)):
        paths[name] = str(tmp_path / f"{name}.npz")
        checkpoint.save(paths[name], m, v, {"step": 0})

    def torch_logits(path, vocab, text):
        arrays = params_of(path)
        V = vocab.size
        rnn = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(V, H, L)
        dec = torch.nn.Linear(H, V)
        with torch.no_grad():
            for n, p in rnn.named_parameters():
                p.copy_(torch.from_numpy(arrays[f"rnn.{n}"]))
            for n, p in dec.named_parameters():
                p.copy_(torch.from_numpy(arrays[f"decoder.{n}"]))
            ids = torch.tensor([0] + [vocab.id_of(ch) for ch in text])
            x = torch.nn.functional.one_hot(ids, V).float()[:, None, :]  # (T, 1, V)
            return dec(rnn(x)[0][:, 0]).numpy()  # (T, V)

    text = "hello world"
    a, b = torch_logits(paths["parent"], old, text), torch_logits(paths["child"], new, text)
    idx = [new.id_of(t) for t in old.tokens]
    np.testing.assert_allclose(b[:, idx], a, rtol=0, atol=1e-6)  # torch's own float32 sums, both sides
    ck = checkpoint.load(paths["child"])  # and charrnn reads what torch read
    np.testing.assert_allclose(logits_of(ck.model, ck.vocab, text), b, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------- the command line
def test_unknown_error_lists_the_characters_and_writes_nothing(parent, texts, tmp_path):
    out = str(tmp_path / "ft")
    line = one_line_error(run(["train", texts[1], "--out", out, "--init-from", parent, "--steps", "2", *SMALL]), 2)
    assert "'+', '-', '1', '2'" in line and "--unknown extend" in line and "--unknown unk" in line
    assert "(" in line and "in all)" in line  # more than the few it names: a count
    assert not os.path.exists(out)


def test_init_from_extend_starts_from_the_parent_and_records_its_origin(parent, texts, tmp_path):
    out = str(tmp_path / "ft")
    best = os.path.join(parent, "best.npz")
    # a learning rate of 1e-9: one step leaves the weights where they started
    res = CliRunner().invoke(cli, ["train", texts[1], "--out", out, "--init-from", parent, "--unknown", "extend",
                                   "--steps", "1", "--lr", "1e-9", "--batch", "4", "--seq", "16", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert f"added {len(NEW_CHARS)} character(s)" in res.output and "sorted in" in res.output  # the note on stderr
    meta, pm = meta_of(os.path.join(out, "last.npz")), meta_of(best)
    o = meta["origin"]
    assert o["init_from"] == os.path.abspath(best)
    assert o["sha256"] == hashlib.sha256(open(best, "rb").read()).hexdigest()
    assert o["step"] == pm["step"] and o["unknown"] == "extend"
    assert o["added"] == NEW_CHARS
    assert meta["vocab"] == ["<START>", "<END>", "<UNK>"] + sorted(set(LETTERS) | set(DIGITS))
    assert (meta["cell"], meta["layers"], meta["hidden"]) == (pm["cell"], pm["layers"], pm["hidden"])
    assert meta["optimizer"]["t"] == 1 and meta["step"] == 1  # a fresh optimizer, steps counted anew
    old, new = params_of(best), params_of(os.path.join(out, "last.npz"))
    idx = [meta["vocab"].index(t) for t in pm["vocab"]]
    np.testing.assert_allclose(new["rnn.weight_hh_l1"], old["rnn.weight_hh_l1"], atol=1e-6)
    np.testing.assert_allclose(new["decoder.weight"][idx], old["decoder.weight"], atol=1e-6)


def test_unk_keeps_the_vocabulary_and_maps_the_rest(parent, texts, tmp_path):
    out = str(tmp_path / "ft")
    res = CliRunner().invoke(cli, ["train", texts[1], "--out", out, "--init-from", parent, "--unknown", "unk",
                                   "--steps", "2", "--batch", "4", "--seq", "16", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "read as <UNK>" in res.output
    n_unk = sum(DIGITS.count(ch) for ch in NEW_CHARS)
    assert f"note: {n_unk:,} of the text's" in res.output
    meta = meta_of(os.path.join(out, "best.npz"))
    assert meta["vocab"] == meta_of(os.path.join(parent, "best.npz"))["vocab"]
    assert meta["origin"]["as_unk"] == NEW_CHARS and meta["origin"]["added"] == []
    ids = np.load(os.path.join(out, "tokens.npy"))
    assert int((ids == 2).sum()) == n_unk


@pytest.mark.parametrize("unknown", ["extend", "unk"])
def test_a_fine_tuned_run_resumes_exactly(parent, texts, tmp_path, unknown):
    """The resume check used to compare the corpus's own characters with the checkpoint's
    vocabulary: a fine-tuned run (its parent's vocabulary, extended or not) could not resume."""
    opts = ["--init-from", parent, "--unknown", unknown, "--eval-every", "3", "--dropout", "0.1", *SMALL]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(["train", texts[1], "--out", a, "--steps", "8", *opts]).exit_code == 0
    assert run(["train", texts[1], "--out", b, "--steps", "4", *opts]).exit_code == 0
    res = run(["train", "--resume", b, "--steps", "8", "-q"])
    assert res.exit_code == 0, res.output
    pa, pb = params_of(os.path.join(a, "last.npz")), params_of(os.path.join(b, "last.npz"))
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    assert meta_of(os.path.join(b, "last.npz"))["origin"] == meta_of(os.path.join(a, "last.npz"))["origin"]


def test_vocab_shares_one_vocabulary_and_resumes(parent, texts, tmp_path):
    """Two models over one vocabulary, given as a run directory, as its tokens.json and as a
    hand-written JSON file: each has exactly that vocabulary, and resumes."""
    want = meta_of(os.path.join(parent, "best.npz"))["vocab"]
    assert json.load(open(os.path.join(parent, "tokens.json")))["tokens"] == want
    hand = tmp_path / "vocab.json"
    hand.write_text(Vocab.from_tokens(want).to_json(), encoding="utf-8")
    for i, source in enumerate([parent, os.path.join(parent, "tokens.json"), str(hand)]):
        out = str(tmp_path / f"v{i}")
        res = run(["train", texts[1], "--out", out, "--vocab", source, "--unknown", "unk", "--hidden", "8",
                   "--steps", "3", *SMALL])
        assert res.exit_code == 0, res.output
        meta = meta_of(os.path.join(out, "last.npz"))
        assert meta["vocab"] == want and meta["hidden"] == 8
        assert meta["vocab_from"]["kind"] == ("json" if i else "checkpoint")
        assert meta["vocab_from"]["as_unk"] == NEW_CHARS
    res = run(["train", "--resume", str(tmp_path / "v2"), "--steps", "5", "-q"])
    assert res.exit_code == 0, res.output
    assert meta_of(str(tmp_path / "v2" / "last.npz"))["step"] == 5
    # a vocabulary that holds every character of the text: no --unknown needed
    out = str(tmp_path / "same")
    assert run(["train", texts[0], "--out", out, "--vocab", str(hand), "--hidden", "8", "--steps", "2",
                *SMALL]).exit_code == 0
    assert meta_of(os.path.join(out, "best.npz"))["vocab"] == want


@pytest.mark.parametrize("extra,needle", [
    (["--hidden", "32"], "--hidden 32 contradicts"),
    (["--layers", "3"], "--layers 3 contradicts"),
    (["--cell", "gru"], "--cell gru contradicts"),
    (["--max-vocab", "10"], "--max-vocab does not apply"),
    (["--forget-bias", "2"], "--forget-bias"),
    (["--vocab", "x.json"], "do not combine"),
])
def test_options_that_contradict_the_model_are_refused(parent, texts, tmp_path, extra, needle):
    out = str(tmp_path / "ft")
    line = one_line_error(run(["train", texts[0], "--out", out, "--init-from", parent, "--steps", "2", *extra,
                               *SMALL]), 2)
    assert needle in line
    assert not os.path.exists(out)


def test_size_options_that_agree_with_the_model_are_accepted(parent, texts, tmp_path):
    out = str(tmp_path / "ft")
    res = run(["train", texts[0], "--out", out, "--init-from", parent, "--hidden", "16", "--layers", "2",
               "--cell", "lstm", "--steps", "1", *SMALL])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args,needle", [
    (["--unknown", "unk"], "--unknown applies only with --init-from or --vocab"),
    (["--unknown", "error"], "--unknown applies only with --init-from or --vocab"),
    (["--vocab", "PARENT", "--unknown", "extend"], "--unknown extend applies only to --init-from"),
    (["--vocab", "PARENT", "--max-vocab", "5"], "--max-vocab does not apply with --vocab"),
    (["--vocab", "PARENT"], "--unknown unk to read them as <UNK>"),
    (["--unknown", "bogus"], "Invalid value for '--unknown'"),
])
def test_usage_errors_of_vocab_and_unknown(parent, texts, tmp_path, args, needle):
    args = [parent if a == "PARENT" else a for a in args]
    res = run(["train", texts[1], "--out", str(tmp_path / "x"), "--steps", "1", *args, *SMALL])
    assert res.exit_code == 2 and needle in res.output, res.output


def _bad_files(tmp_path, parent):
    d = tmp_path
    (d / "text.txt").write_text("just some text\n", encoding="utf-8")
    (d / "garbage.npz").write_bytes(b"PK\x03\x04" + os.urandom(200))
    np.savez(d / "foreign.npz", weights=np.zeros(3, np.float32))
    raw = bytearray(open(os.path.join(parent, "best.npz"), "rb").read())
    (d / "truncated.npz").write_bytes(bytes(raw[: len(raw) // 2]))
    (d / "empty_run").mkdir()
    (d / "list.json").write_text('["<START>", "<END>", "<UNK>", "a"]', encoding="utf-8")
    (d / "order.json").write_text('{"tokens": ["<START>", "<END>", "<UNK>", "b", "a"]}', encoding="utf-8")
    (d / "nochars.json").write_text('{"tokens": ["<START>", "<END>", "<UNK>"]}', encoding="utf-8")
    (d / "multi.json").write_text('{"tokens": ["<START>", "<END>", "<UNK>", "ab"]}', encoding="utf-8")
    (d / "latin1.json").write_bytes(b'{"tokens": ["\xe9"]}')
    (d / "deep.json").write_text("[" * 100000 + "]" * 100000, encoding="utf-8")
    return d


@pytest.mark.parametrize("option", ["--init-from", "--vocab"])
@pytest.mark.parametrize("name", ["missing.npz", "text.txt", "garbage.npz", "foreign.npz", "truncated.npz",
                                  "empty_run", "list.json", "order.json", "nochars.json", "multi.json",
                                  "latin1.json", "deep.json"])
def test_bad_model_or_vocabulary_file_is_a_one_line_error(parent, texts, tmp_path, option, name):
    d = _bad_files(tmp_path, parent)
    out = str(tmp_path / "out")
    line = one_line_error(run(["train", texts[0], "--out", out, option, str(d / name), "--steps", "1", *SMALL]), 1)
    assert name in line
    assert not os.path.exists(out)


def test_resume_refuses_the_new_options(parent, texts, tmp_path):
    out = str(tmp_path / "ft")
    assert run(["train", texts[0], "--out", out, "--init-from", parent, "--steps", "1", *SMALL]).exit_code == 0
    res = run(["train", "--resume", out, "--init-from", parent])
    assert res.exit_code == 2 and "--init-from" in res.output


def test_help_shows_the_new_options_with_examples():
    res = run(["train", "--help"])
    text = " ".join(res.output.split())
    for opt in ("--init-from MODEL", "--vocab MODEL|FILE", "--unknown [error|unk|extend]"):
        assert opt in text
    assert "--init-from runs/shakespeare --unknown extend" in text and "--vocab runs/a --unknown unk" in text


def test_fine_tune_in_a_real_process(parent, texts, tmp_path):
    out = str(tmp_path / "ft")
    cmd = [sys.executable, "-m", "charrnn", "train", texts[1], "--out", out, "--init-from", parent, "--steps", "2",
           "--batch", "4", "--seq", "16", "--threads", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    p = subprocess.run(cmd + ["--unknown", "extend"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and "starting from" in p.stderr and f"added {len(NEW_CHARS)} character(s)" in p.stderr
    s = subprocess.run([sys.executable, "-m", "charrnn", "sample", "--model", out, "--length", "40", "--seed", "1",
                        "-q"], capture_output=True, text=True, timeout=300)
    assert s.returncode == 0 and len(s.stdout) == 41  # 40 characters and the newline


def test_a_fifo_as_vocabulary_is_refused_without_blocking(texts, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    line = one_line_error(run(["train", texts[0], "--out", str(tmp_path / "o"), "--vocab", fifo, "--steps", "1",
                               *SMALL]), 1)
    assert "not a regular file" in line


def test_a_token_description_from_before_it_listed_the_vocabulary_is_updated_not_rebuilt(parent, texts, tmp_path):
    out = str(tmp_path / "run")
    assert run(["train", texts[0], "--out", out, "--hidden", "8", "--steps", "2", *SMALL]).exit_code == 0
    desc = os.path.join(out, "tokens.json")
    meta = json.load(open(desc))
    tokens = meta.pop("tokens")
    json.dump(meta, open(desc, "w"))  # as charrnn wrote it before
    before = os.stat(os.path.join(out, "tokens.npy"))
    assert run(["train", "--resume", out, "--steps", "3", "-q"]).exit_code == 0
    after = os.stat(os.path.join(out, "tokens.npy"))
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)  # kept, not built again
    assert json.load(open(desc))["tokens"] == tokens == meta_of(os.path.join(out, "last.npz"))["vocab"]
