"""Checkpoints (charrnn/checkpoint.py): the .npz format of DESIGN.md round trip, strict validation
of everything a user can get wrong, atomic writes, finding a run, and checkpoints written before
the kernels were restructured (tests/data/pre_restructure_*: same logits, samples and scores, and
a resumed run that ends where the old code's uninterrupted run ended)."""

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn import checkpoint
from charrnn.errors import CheckpointError
from charrnn.model import Model, ModelConfig, param_shapes
from charrnn.vocab import Vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


def small(cell="lstm"):
    vocab = Vocab.from_text("hello world")
    model = Model(ModelConfig(cell=cell, layers=2, hidden=6, vocab_size=vocab.size, dropout=0.1)).init(3)
    return model, vocab


def write(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def arrays_of(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_round_trip(tmp_path, cell):
    model, vocab = small(cell)
    path = str(tmp_path / "m.npz")
    extra = {"optim.m.decoder.bias": np.arange(vocab.size, dtype=np.float32), "train.h": np.ones((2, 3, 6), np.float32)}
    checkpoint.save(path, model, vocab, {"step": 7, "anything": [1, "two"]}, extra)
    ck = checkpoint.load(path)
    assert ck.vocab == vocab and ck.model.cfg == model.cfg and ck.meta["step"] == 7 and ck.meta["anything"] == [1, "two"]
    assert ck.meta["format"] == "charrnn" and ck.meta["version"] == 1 and ck.meta["vocab"] == list(vocab.tokens)
    np.testing.assert_array_equal(ck.model.theta, model.theta)
    assert ck.arrays == {}  # optimizer and training state only on request
    full = checkpoint.load(path, with_arrays=True)
    assert set(full.arrays) == set(extra) and np.array_equal(full.arrays["train.h"], extra["train.h"])
    # the parameters under PyTorch's names and shapes, readable without charrnn
    raw = arrays_of(path)
    for name, shape in param_shapes(model.cfg).items():
        assert raw[name].shape == shape and raw[name].dtype == np.float32
    assert checkpoint.load(path).meta["dropout"] == 0.1
    checkpoint.save(path, model, vocab, {}, dropout=0.35)  # a run that fitted its dropout says so
    assert checkpoint.load(path).meta["dropout"] == 0.35
    with pytest.raises(ValueError):
        checkpoint.save(path, model, vocab, {}, {"decoder.bias": np.zeros(3)})  # an extra may not shadow a parameter


def _corrupt_cases(good, tmp_path):
    arrays = arrays_of(good)
    meta = json.loads(str(arrays["meta"][()]))
    cases = {}

    def case(name, needle, **change):
        a = dict(arrays)
        m = dict(meta)
        for k, v in change.items():
            if k == "meta":
                m.update(v)
            elif v is None:
                a.pop(k)
            else:
                a[k] = v
        a["meta"] = np.array(json.dumps(m))
        p = tmp_path / f"{name}.npz"
        write(p, a)
        cases[str(p)] = needle

    case("newer", "newer charrnn", meta={"version": 99})
    case("foreign_format", "not a charrnn checkpoint", meta={"format": "other"})
    case("no_version", "no format version", meta={"version": "1"})
    case("missing_param", "missing decoder.bias", **{"decoder.bias": None})
    case("bad_shape", "has shape", **{"decoder.weight": np.zeros((2, 2), np.float32)})
    case("nan", "non-finite", **{"decoder.bias": np.full(arrays["decoder.bias"].shape, np.nan, np.float32)})
    case("bad_meta", "corrupt checkpoint meta", meta={"cell": "transformer"})
    nometa = tmp_path / "nometa.npz"
    write(nometa, {k: v for k, v in arrays.items() if k != "meta"})
    cases[str(nometa)] = "no meta record"
    unreadable = tmp_path / "unreadable.npz"
    write(unreadable, dict(arrays, meta=np.array("{not json")))
    cases[str(unreadable)] = "unreadable meta record"
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(open(good, "rb").read()[:2000])
    cases[str(trunc)] = "corrupt or truncated"
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    cases[str(empty)] = "empty file"
    text = tmp_path / "text.npz"
    text.write_text("hello")
    cases[str(text)] = "not a NumPy .npz archive"
    cases[str(tmp_path / "missing.npz")] = "no such checkpoint"
    cases[str(tmp_path)] = "is a directory"
    return cases


def test_every_bad_checkpoint_is_one_checkpoint_error(tmp_path):
    model, vocab = small()
    good = str(tmp_path / "good.npz")
    checkpoint.save(good, model, vocab, {})
    for path, needle in _corrupt_cases(good, tmp_path).items():
        with pytest.raises(CheckpointError) as e:
            checkpoint.load(path)
        msg = str(e.value)
        assert needle in msg and "\n" not in msg, (path, msg)
    checkpoint.load(good)  # and the good one still loads


def test_pickled_member_is_refused_without_running_it(tmp_path):
    model, vocab = small()
    good = str(tmp_path / "good.npz")
    checkpoint.save(good, model, vocab, {})
    arrays = arrays_of(good)
    arrays["evil"] = np.array([object()], dtype=object)
    p = tmp_path / "pickled.npz"
    write(p, arrays)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(str(p))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    model, vocab = small()
    path = str(tmp_path / "m.npz")
    checkpoint.save(path, model, vocab, {"step": 1})
    before = open(path, "rb").read()

    def full_disk(f, **arrays):
        f.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device"):
        checkpoint.save(path, model, vocab, {"step": 2})
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["m.npz"]


def test_resolve_finds_a_file_a_run_or_the_latest_run(tmp_path):
    model, vocab = small()
    runs = tmp_path / "runs"
    for name in ("old", "new"):
        (runs / name).mkdir(parents=True)
    checkpoint.save(str(runs / "old" / "last.npz"), model, vocab, {})
    os.utime(runs / "old" / "last.npz", (1, 1))
    checkpoint.save(str(runs / "new" / "best.npz"), model, vocab, {})
    checkpoint.save(str(runs / "new" / "last.npz"), model, vocab, {})
    assert checkpoint.resolve(str(runs / "new")) == (str(runs / "new" / "best.npz"), False)
    assert checkpoint.resolve(str(runs / "old")) == (str(runs / "old" / "last.npz"), False)
    assert checkpoint.resolve(None, runs_dir=str(runs)) == (str(runs / "new" / "best.npz"), True)
    with pytest.raises(CheckpointError, match="no best.npz or last.npz"):
        checkpoint.resolve(str(tmp_path))
    with pytest.raises(CheckpointError, match="no trained model"):
        checkpoint.resolve(None, runs_dir=str(tmp_path / "none"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.resolve(str(tmp_path / "x.npz"))


# ----------------------------------------------------------------------------- written before the restructure
def _old():
    with open(os.path.join(DATA, "pre_restructure.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_checkpoints_from_before_the_restructure_give_the_same_numbers(name):
    """Logits to 1e-6, the same greedy sample and the same score as the code that wrote them."""
    from charrnn.evaluate import score_text
    from charrnn.generate import SampleOptions, sample_chunks

    old = _old()
    want = old["runs"][name]
    ck = checkpoint.load(os.path.join(DATA, f"pre_restructure_{name}.npz"))
    m, v = ck.model, ck.vocab
    ids = v.encode(old["probe"], unknown="unk")
    state = m.new_state(1)
    got = [m.step(np.array([t], dtype=np.int32), state)[0] for t in np.concatenate([[0], ids[:-1]])]
    np.testing.assert_allclose(np.array(got), np.array(want["logits"]), rtol=0, atol=1e-6)
    greedy = "".join(t for _, t, _ in sample_chunks(m, v, SampleOptions(temp=0.0, length=60, prime="the ", seed=1)))
    assert greedy == want["greedy"]
    assert abs(score_text(m, v, old["probe"]).nll - want["score"]) < 1e-5


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_runs_from_before_the_restructure_resume_exactly(tmp_path, name):
    """A run stopped after 4 of 8 steps by the old code, resumed by this code, ends with the
    weights the old code's uninterrupted 8-step run ended with (to float32 rounding: see below;
    test_train proves resume bit-exact within one version); and its checkpoint now records
    the config and the fitted values apart."""
    from charrnn.cli import cli

    corpus = tmp_path / "markov.txt"
    with open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8") as f:
        corpus.write_text(f.read()[:12000], encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    arrays = arrays_of(os.path.join(DATA, f"pre_restructure_{name}.npz"))
    meta = json.loads(str(arrays["meta"][()]))
    assert "config" not in meta and "fitted" not in meta  # the old format
    meta["corpus"]["paths"] = [str(corpus)]  # where the corpus is on this machine
    arrays["meta"] = np.array(json.dumps(meta))
    write(run / "last.npz", arrays)
    res = CliRunner().invoke(cli, ["train", "--resume", str(run), "--steps", "8", "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got = arrays_of(str(run / "last.npz"))
    with np.load(os.path.join(DATA, "pre_restructure_final.npz")) as z:
        want = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(name + "/")}
    assert want
    for k, v in want.items():
        # the same arithmetic but for the softmax's exp, a float32 polynomial since the hardening
        # issue (libm's expf before): weights agree to float32 rounding (7.5e-9 at most measured)
        np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-7, err_msg=k)
    new_meta = json.loads(str(got["meta"][()]))
    assert new_meta["step"] == 8 and set(new_meta) >= {"config", "fitted", "train"}
    assert new_meta["fitted"]["cell"] == name


def test_new_checkpoints_record_the_config_as_given_and_the_fitted_values_apart(tmp_path):
    from charrnn.cli import cli

    corpus = tmp_path / "markov.txt"
    with open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8") as f:
        corpus.write_text(f.read()[:12000], encoding="utf-8")
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", str(corpus), "--out", str(out), "--steps", "3", "--batch", "8", "--seq", "16",
                                   "--threads", "1", "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    meta = json.loads(str(arrays_of(str(out / "last.npz"))["meta"][()]))
    assert meta["config"]["cell"] is None and meta["config"]["hidden"] is None and meta["config"]["dropout"] is None
    assert meta["config"]["steps"] == 3
    assert (meta["fitted"]["cell"], meta["fitted"]["hidden"], meta["fitted"]["dropout"]) == ("lstm", 64, 0.0)
    assert (meta["train"]["cell"], meta["train"]["hidden"]) == ("lstm", 64)  # the two combined, for readers
    assert meta["cell"] == "lstm" and meta["hidden"] == 64
    shutil.rmtree(out)
