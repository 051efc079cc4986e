"""Checkpoints (charrnn/checkpoint.py): the .npz format of docs/formats.md round trip, strict validation
of everything a user can get wrong, atomic writes, finding a run, and checkpoints written before
the kernels were restructured (tests/data/pre_restructure_*: same logits, samples and scores, and
a resumed run that ends where the old code's uninterrupted run ended)."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn import checkpoint
from charrnn.errors import CheckpointError
from charrnn.model import Model, ModelConfig, param_shapes
from charrnn.vocab import Vocab

from tests import hostile
from tests.common import ROOT

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


class Trap:
    """Unpickling this creates a file: the proof that a pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_member_is_refused_without_running_it(tmp_path):
    model, vocab = small()
    good = str(tmp_path / "good.npz")
    checkpoint.save(good, model, vocab, {})
    trap = tmp_path / "ran"
    for name, needle in (("evil", "unknown member evil"), ("decoder.bias", "decoder.bias has dtype object")):
        arrays = arrays_of(good)
        arrays[name] = np.array([Trap(str(trap))] * 11, dtype=object)
        p = tmp_path / "pickled.npz"
        write(p, arrays)
        with pytest.raises(CheckpointError, match=needle):
            checkpoint.load(str(p), with_arrays=True)
        assert not trap.exists()


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
    ck = checkpoint.load(str(out / "last.npz"), with_arrays=True)  # every member train.py writes is known
    names = set(param_shapes(ck.model.cfg))
    assert set(ck.arrays) == ({"train.h", "train.c"} | {f"optim.{b}.{n}" for b in ("m", "v") for n in names}
                              | {f"avg.{n}" for n in names})  # the averaged weights (--average ema, the default)
    shutil.rmtree(out)


# ----------------------------------------------------------------------------- hostile files
# Each is refused with a one-line CheckpointError naming the file, in well under a second and without
# allocating what it declares (tracemalloc sees numpy's and zlib's buffers).
FAST_S = 1.0
SMALL_PEAK = 16 * hostile.MiB


@pytest.fixture
def good(tmp_path):
    model, vocab = small()
    path = str(tmp_path / "good.npz")
    checkpoint.save(path, model, vocab, {"step": 1})
    return path


def refused(path, needle, **kw):
    """Assert `path` is refused fast, small and in one line that names it and says `needle`."""
    err, seconds, peak = hostile.refusal(checkpoint.load, str(path), **kw)
    assert isinstance(err, CheckpointError), (path, repr(err))
    msg = str(err)
    assert needle in msg and "\n" not in msg and str(path) in msg, msg
    assert seconds < FAST_S, (msg, seconds)
    assert peak < SMALL_PEAK, (msg, peak)
    return msg


BOMB = 200 * hostile.MiB  # of zeros: deflates to ~200 KB


def test_an_extra_member_that_is_a_zip_bomb_is_refused_unread(good, tmp_path):
    p = tmp_path / "bomb.npz"
    shutil.copy(good, p)
    hostile.add_member(p, "junk", np.float32, (BOMB // 4,), BOMB)
    assert hostile.size(p) < BOMB // 100
    refused(p, "unknown member junk")
    refused(p, "unknown member junk", with_arrays=True)


def test_a_parameter_that_is_a_zip_bomb_is_refused_unread(good, tmp_path):
    p = tmp_path / "bomb.npz"
    hostile.drop_member(good, p, "decoder.bias")
    hostile.add_member(p, "decoder.bias", np.float32, (BOMB // 4,), BOMB)
    assert "has shape (52428800,), expected (11,)" in refused(p, "decoder.bias")
    # the right header, with 200 MB of data behind it: the zip's declared size gives it away
    q = tmp_path / "bomb2.npz"
    hostile.drop_member(good, q, "decoder.bias")
    hostile.add_member(q, "decoder.bias", np.float32, (11,), BOMB)
    refused(q, "decoder.bias holds")
    # and the same in optimizer state, which sample and eval never read
    r = tmp_path / "bomb3.npz"
    shutil.copy(good, r)
    hostile.add_member(r, "optim.m.decoder.bias", np.float32, (11,), BOMB)
    refused(r, "optim.m.decoder.bias holds")
    refused(r, "optim.m.decoder.bias holds", with_arrays=True)


def test_declared_sizes_are_checked_before_anything_is_allocated(good, tmp_path):
    p = tmp_path / "huge.npz"
    hostile.drop_member(good, p, "decoder.weight")
    hostile.add_member(p, "decoder.weight", np.float32, (10**6, 10**6), 64)  # 10^12 elements
    refused(p, "decoder.weight has shape (1000000, 1000000), expected (11, 6)")
    q = tmp_path / "lie.npz"  # a zip directory that agrees with the header's 4 TB: the shape still disagrees
    hostile.drop_member(good, q, "decoder.weight")
    hostile.add_member(q, "decoder.weight", np.float32, (10**6, 10**6), 64, declare=128 + 4 * 10**12)
    refused(q, "decoder.weight has shape")
    r = tmp_path / "hugestate.npz"  # B is free, but not without bound
    shutil.copy(good, r)
    hostile.add_member(r, "train.h", np.float32, (2, 10**9, 6), 64)
    refused(r, "train.h has shape (2, 1000000000, 6), expected (2, B, 6)", with_arrays=True)


@pytest.mark.parametrize("change,needle", [
    ({"layers": 10**6}, "layers 1000000 is beyond the limit"),
    ({"hidden": 10**9}, "hidden 1000000000 is beyond the limit"),
    ({"hidden": 1e9}, "hidden must be a positive integer"),
    ({"layers": True}, "layers must be a positive integer"),
    ({"layers": "2"}, "layers must be a positive integer"),
    ({"layers": 0}, "layers must be a positive integer"),
    ({"hidden": -6}, "hidden must be a positive integer"),
    ({"hidden": 2**40, "layers": 1}, "beyond the limit"),
    ({"layers": 256, "hidden": 4096}, "parameters, beyond the limit"),
    ({"version": True}, "no format version"),
    ({"version": 0}, "format version 0"),
    ({"vocab": "abc"}, "vocab must be a list of tokens"),
    ({"vocab": ["<START>", "<END>", "<UNK>", 7]}, "vocab must be a list of tokens"),
    ({"dropout": "x"}, "dropout must be a number"),
    ({"cell": ["lstm"]}, "cell"),
    ({"deep": json.loads("[" * 100 + "]" * 100)}, "nests deeper than"),
])
def test_meta_records_that_declare_absurd_models_are_corrupt_files(good, tmp_path, change, needle):
    refused(hostile.with_meta(good, tmp_path / "m.npz", change), needle)


def test_meta_records_that_are_not_json_objects(good, tmp_path):
    cases = {
        "deep": (np.array("[" * 200000 + "]" * 200000), "nests"),
        "list": (np.array("[1, 2]"), "not a charrnn checkpoint"),
        "number": (np.array(7), "meta record is not text"),
        "vector": (np.array(["{}", "{}"]), "meta record is not text"),
        "bytes": (np.array(b"{}"), "meta record is not text"),
        "bigint": (np.array('{"layers": ' + "9" * 5000 + "}"), "unreadable meta record"),
    }
    for name, (raw, needle) in cases.items():
        refused(hostile.with_meta(good, tmp_path / f"{name}.npz", raw=raw), needle)


def test_the_meta_record_and_the_vocabulary_have_limits(good, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_META_BYTES", 4000)
    refused(hostile.with_meta(good, tmp_path / "long.npz", {"pad": "x" * 2000}), "meta record of")
    monkeypatch.setattr(checkpoint, "MAX_VOCAB", 8)
    refused(good, "vocab of 11 tokens is beyond the limit of 8")


def test_the_limits_refuse_no_model_anyone_could_train():
    """The largest vocabulary there can be (every code point) fits the meta record; a 4x2048 LSTM
    fits the parameter limit."""
    tokens = ["<START>", "<END>", "<UNK>"] + [chr(i) for i in range(0x110000)]
    assert len(tokens) == checkpoint.MAX_VOCAB
    assert 4 * len(json.dumps({"vocab": tokens}, ensure_ascii=False)) < checkpoint.MAX_META_BYTES / 1.3
    cfg = ModelConfig("lstm", 4, 2048, 1000)
    assert sum(int(np.prod(s)) for s in param_shapes(cfg).values()) < checkpoint.MAX_PARAMS
    assert checkpoint.MAX_LAYERS >= 100 and checkpoint.MAX_HIDDEN >= 16384 and checkpoint.MAX_STREAMS >= 4096


@pytest.mark.parametrize("name,arr", [
    ("junk", np.zeros(3, np.float32)),
    ("decoder.bias2", np.zeros(11, np.float32)),
    ("rnn.weight_ih_l2", np.zeros((24, 6), np.float32)),  # a layer the meta does not declare
    ("optim.m.nosuch", np.zeros(3, np.float32)),
    ("train.x", np.zeros((2, 3, 6), np.float32)),
    ("avg.decoder.bias2", np.zeros(11, np.float32)),  # averaged weights of no parameter
    ("avg.optim.m.decoder.bias", np.zeros(11, np.float32)),
    ("avg", np.zeros(11, np.float32)),
    ("evil", np.array([object()], dtype=object)),  # a pickle, never run
])
def test_unknown_members_are_refused(good, tmp_path, name, arr):
    arrays = arrays_of(good)
    arrays[name] = arr
    p = tmp_path / "u.npz"
    write(p, arrays)
    refused(p, f"unknown member {name}")


@pytest.mark.parametrize("name,arr,needle", [
    ("decoder.weight", np.zeros((11, 6), np.int64), "decoder.weight has dtype int64, expected a float type"),
    ("decoder.bias", np.array([object()] * 11, dtype=object), "decoder.bias has dtype object, expected a float type"),
    ("decoder.bias", np.zeros(11, "U3"), "decoder.bias has dtype <U3, expected a float type"),
    ("optim.m.decoder.bias", np.zeros(10, np.float32), "optim.m.decoder.bias has shape (10,), expected (11,)"),
    ("optim.m.decoder.bias", np.zeros(11, np.int32), "optim.m.decoder.bias has dtype int32"),
    ("avg.decoder.bias", np.zeros(10, np.float32), "avg.decoder.bias has shape (10,), expected (11,)"),
    ("avg.rnn.weight_hh_l0", np.zeros((24, 6), np.int16), "avg.rnn.weight_hh_l0 has dtype int16"),
    ("train.h", np.zeros((3, 4, 6), np.float32), "train.h has shape (3, 4, 6), expected (2, B, 6)"),
    ("train.h", np.zeros((2, 0, 6), np.float32), "train.h has shape (2, 0, 6)"),
])
def test_members_whose_dtype_or_shape_disagree_with_the_meta_are_refused(good, tmp_path, name, arr, needle):
    arrays = arrays_of(good)
    arrays[name] = arr
    p = tmp_path / "d.npz"
    write(p, arrays)
    refused(p, needle, with_arrays=True)


def test_carried_states_must_agree(good, tmp_path):
    arrays = arrays_of(good)
    arrays["train.h"] = np.zeros((2, 4, 6), np.float32)
    arrays["train.c"] = np.zeros((2, 5, 6), np.float32)
    p = tmp_path / "s.npz"
    write(p, arrays)
    refused(p, "train.c has shape (2, 5, 6), expected (2, 4, 6)", with_arrays=True)


def test_zip_tricks_are_refused(good, tmp_path):
    dup = tmp_path / "dup.npz"
    shutil.copy(good, dup)
    with pytest.warns(UserWarning):
        hostile.add_member(dup, "decoder.bias", np.float32, (11,), 44)
    refused(dup, "member decoder.bias twice")
    noext = tmp_path / "noext.npz"
    shutil.copy(good, noext)
    with zipfile.ZipFile(noext, "a") as zf:
        zf.writestr("decoder.bias", b"")
    refused(noext, "unknown member decoder.bias")
    bz = tmp_path / "bz.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bz, "w", compression=zipfile.ZIP_BZIP2) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    refused(bz, "unsupported compression")
    many = tmp_path / "many.npz"
    shutil.copy(good, many)
    with zipfile.ZipFile(many, "a") as zf:
        for i in range(2000):
            zf.writestr(f"optim.b{i}.decoder.bias.npy", b"")
    refused(many, "members")
    odd = tmp_path / "odd.npz"
    arrays = arrays_of(good)
    arrays["x\nTraceback"] = np.zeros(1)
    write(odd, arrays)
    refused(odd, "unknown member x\\nTraceback")


def test_a_zip_directory_of_a_hundred_thousand_members_is_refused_unparsed(tmp_path):
    p = tmp_path / "crowded.npz"
    hostile.crowded_directory(p, 100000)
    assert hostile.size(p) < 8 * hostile.MiB
    refused(p, "zip directory of")


def test_compressed_checkpoints_still_load(good, tmp_path):
    """np.savez_compressed's deflated members are as good as np.savez's stored ones."""
    arrays = arrays_of(good)
    p = tmp_path / "z.npz"
    np.savez_compressed(p, **arrays)
    np.testing.assert_array_equal(checkpoint.load(str(p)).model.theta, checkpoint.load(good).model.theta)


def test_save_writes_only_members_load_accepts(good, tmp_path):
    model, vocab = small()
    with pytest.raises(ValueError, match="not a checkpoint member"):
        checkpoint.save(str(tmp_path / "x.npz"), model, vocab, {}, {"junk": np.zeros(3)})
    with pytest.raises(ValueError, match="not a checkpoint member"):
        checkpoint.save(str(tmp_path / "x.npz"), model, vocab, {}, {"optim.m.decoder.bias": np.zeros(5)})
    assert not os.path.exists(tmp_path / "x.npz")


def test_the_registry_takes_a_new_member_family_in_one_line(good, tmp_path, monkeypatch):
    """The coming averaged weights: one more Member, and avg.<param> loads with the arrays."""
    model, vocab = small()
    p = str(tmp_path / "avg.npz")
    avg = {f"avg.{k}": np.ones(s, np.float32) for k, s in param_shapes(model.cfg).items()}
    monkeypatch.setattr(checkpoint, "MEMBERS", checkpoint.MEMBERS + (checkpoint.Member(r"avg\.(?P<param>.+)", checkpoint.like_param),))
    checkpoint.save(p, model, vocab, {}, avg)
    assert set(checkpoint.load(p, with_arrays=True).arrays) == set(avg)
    assert checkpoint.load(p).arrays == {}


# ----------------------------------------------------------------------------- files that are not files
def _blocks(fn, *args, seconds=5.0):
    """Run fn in a thread; return (finished, exception) after at most `seconds`."""
    out = {}

    def go():
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["err"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive(), out.get("err")


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = str(tmp_path / "best.npz")
    os.mkfifo(fifo)
    try:
        for fn in (checkpoint.load, checkpoint.resolve):
            finished, err = _blocks(fn, fifo)
            assert finished, f"{fn.__name__} blocked on a FIFO"
            assert isinstance(err, CheckpointError) and "not a regular file" in str(err) and fifo in str(err)
        finished, err = _blocks(checkpoint.resolve, str(tmp_path))  # a run directory whose best.npz is a FIFO
        assert finished and isinstance(err, CheckpointError) and "not a regular file" in str(err)
    finally:
        try:  # let a blocked reader (the old code) go
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def test_devices_sockets_and_directories_are_refused(tmp_path):
    sock_path = str(tmp_path / "s.npz")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(sock_path)
    try:
        for path, needle in (("/dev/zero", "not a regular file"), ("/dev/null", "not a regular file"),
                             (sock_path, "not a regular file"), (str(tmp_path), "is a directory")):
            for fn in (checkpoint.load, checkpoint.resolve):
                if fn is checkpoint.resolve and path == str(tmp_path):
                    continue  # a directory is a run for resolve
                finished, err = _blocks(fn, path)
                assert finished and isinstance(err, CheckpointError) and needle in str(err), (fn, path, err)
    finally:
        sock.close()


def test_resolve_skips_runs_whose_checkpoint_is_not_a_file(tmp_path):
    model, vocab = small()
    runs = tmp_path / "runs"
    (runs / "fifo").mkdir(parents=True)
    (runs / "real").mkdir()
    checkpoint.save(str(runs / "real" / "best.npz"), model, vocab, {})
    os.utime(runs / "real" / "best.npz", (1, 1))
    os.mkfifo(runs / "fifo" / "best.npz")
    assert checkpoint.resolve(None, runs_dir=str(runs)) == (str(runs / "real" / "best.npz"), True)


# ----------------------------------------------------------------------------- every failed write is one line
@pytest.mark.parametrize("errno_,text", [(errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only file system"),
                                          (errno.EDQUOT, "quota")])
def test_a_temporary_file_that_cannot_be_made_is_a_checkpoint_error(tmp_path, monkeypatch, errno_, text):
    model, vocab = small()

    def no(*a, **k):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(tempfile, "mkstemp", no)
    path = str(tmp_path / "m.npz")
    with pytest.raises(CheckpointError) as e:
        checkpoint.save(path, model, vocab, {})
    assert text.lower() in str(e.value).lower() and path in str(e.value) and "\n" not in str(e.value)


def test_a_deleted_run_directory_is_a_checkpoint_error(tmp_path):
    model, vocab = small()
    run = tmp_path / "run"
    run.mkdir()
    run.rmdir()
    with pytest.raises(CheckpointError, match="could not write .*No such file"):
        checkpoint.save(str(run / "last.npz"), model, vocab, {})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_a_checkpoint_error(tmp_path):
    model, vocab = small()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="could not write .*Permission denied"):
            checkpoint.save(str(ro / "last.npz"), model, vocab, {})
    finally:
        ro.chmod(0o700)


def test_a_failed_replace_is_a_checkpoint_error_and_leaves_no_temporary(tmp_path, monkeypatch):
    model, vocab = small()

    def busy(src, dst):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(CheckpointError, match="could not write"):
        checkpoint.save(str(tmp_path / "m.npz"), model, vocab, {})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- stale temporaries
def test_remove_stale_temps_removes_what_a_killed_write_leaves_and_nothing_else(tmp_path, monkeypatch):
    model, vocab = small()
    made = []
    real = tempfile.mkstemp

    def record(*a, **k):
        fd, name = real(*a, **k)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", record)
    for name in ("best.npz", "last.npz"):
        checkpoint.save(str(tmp_path / name), model, vocab, {})
    monkeypatch.undo()
    for name in made:  # as a SIGKILL between mkstemp and os.replace leaves them
        assert not os.path.exists(name)
        open(name, "wb").close()
    keep = [".best.npz.tmp", ".best.npz.abc.tmp", ".best.npz.abcdefgh.tmp.keep", "x.best.npz.abcdefgh.tmp",
            ".other.npz.abcdefgh.tmp", ".best.npz.ABCDEFGH.tmp", ".best.npz.abcdefghi.tmp", "metrics.jsonl",
            "best.npz", "last.npz"]
    for name in keep:
        if not os.path.exists(tmp_path / name):
            (tmp_path / name).write_bytes(b"")
    (tmp_path / ".last.npz.zzzzzzzz.tmp").mkdir()  # not a file this module made
    os.symlink(tmp_path / "best.npz", tmp_path / ".last.npz.yyyyyyyy.tmp")
    removed = checkpoint.remove_stale_temps(str(tmp_path))
    assert sorted(removed) == sorted(made) and len(made) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [".last.npz.zzzzzzzz.tmp", ".last.npz.yyyyyyyy.tmp"])
    assert checkpoint.remove_stale_temps(str(tmp_path)) == []
    with pytest.raises(CheckpointError, match="cannot clean up"):
        checkpoint.remove_stale_temps(str(tmp_path / "gone"))


def test_training_checkpoints_load_with_every_member(tmp_path):
    """What train.py saves (optimizer moments, carried state) and the fixtures from before the
    restructure all pass the member registry."""
    for name in ("lstm", "gru", "rnn"):
        ck = checkpoint.load(os.path.join(DATA, f"pre_restructure_{name}.npz"), with_arrays=True)
        assert {k.split(".")[0] for k in ck.arrays} == {"optim", "train"} and ck.arrays["train.h"].shape == (2, 8, 16)


# ----------------------------------------------------------------------------- the same files through the CLI
def _hostile_models(tmp_path):
    """A good checkpoint and the hostile files of the issue made from it, by name."""
    model, vocab = small()
    good = str(tmp_path / "good.npz")
    checkpoint.save(good, model, vocab, {})
    files = {}
    files["extra bomb"] = str(tmp_path / "bomb.npz")
    shutil.copy(good, files["extra bomb"])
    hostile.add_member(files["extra bomb"], "junk", np.float32, (BOMB // 4,), BOMB)
    files["bias bomb"] = str(tmp_path / "bias.npz")
    hostile.drop_member(good, files["bias bomb"], "decoder.bias")
    hostile.add_member(files["bias bomb"], "decoder.bias", np.float32, (BOMB // 4,), BOMB)
    files["layers 10**6"] = hostile.with_meta(good, tmp_path / "layers.npz", {"layers": 10**6})
    files["fifo"] = str(tmp_path / "fifo.npz")
    os.mkfifo(files["fifo"])
    return good, files


def test_the_cli_refuses_hostile_models_in_one_line(tmp_path):
    """sample and eval: exit 1, one line on stderr naming the file, no traceback, fast."""
    from charrnn.cli import cli

    good, files = _hostile_models(tmp_path)
    text = os.path.join(ROOT, "corpora", "markov.txt")
    for what, path in files.items():
        for cmd in (["sample", "--length", "5"], ["eval", text]):
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", "charrnn", *cmd, "--model", path], capture_output=True,
                                 text=True, timeout=60)
            wall = time.perf_counter() - t0
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 1 and res.stdout == "", (what, cmd, res.stderr)
            assert len(lines) == 1 and lines[0].startswith("charrnn: error: ") and path in lines[0], (what, lines)
            assert "Traceback" not in res.stderr
            assert wall < 30, (what, wall)  # the interpreter's start and imports; the refusal itself is timed below
            # in process, without the interpreter's start: the refusal itself
            t0 = time.perf_counter()
            res = CliRunner().invoke(cli, [*cmd, "--model", path])
            assert time.perf_counter() - t0 < FAST_S and res.exit_code == 1, (what, cmd, res.output)
    res = subprocess.run([sys.executable, "-m", "charrnn", "sample", "--length", "5", "--model", good],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr  # the good one still samples


def test_averaged_weights_are_members_shaped_like_their_parameters(good, tmp_path):
    """avg.<param> (a run's averaged weights, last.npz with --average) loads, on request, beside the
    raw weights that the model itself gets."""
    arrays = arrays_of(good)
    avg = {f"avg.{k}": np.full(v.shape, 0.5, np.float32) for k, v in arrays.items() if k != "meta"}
    arrays.update(avg)
    p = tmp_path / "avg.npz"
    write(p, arrays)
    ck = checkpoint.load(str(p), with_arrays=True)
    assert set(avg) <= set(ck.arrays)
    for k, v in avg.items():
        np.testing.assert_array_equal(ck.arrays[k], v)
        assert not np.array_equal(ck.model.params[k[4:]], v)  # the model holds the raw weights
