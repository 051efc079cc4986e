"""The whole command line driven with random option values and mangled files (hypothesis),
asserting the manners of docs/robustness.md whatever comes in: no traceback, an exit status in
{0, 1, 2, 130, 143}, errors in one line, nothing left behind. In-process (CliRunner), so a few
hundred commands fit in about a minute; the cases found this way that needed a fix have a test
of their own in tests/test_hostile_cli.py."""

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charrnn.cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden", "16", "--batch", "8", "--seq", "16", "--threads", "1"]
CODES = {0, 1, 2, 130, 143}
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True)


def check(res, allowed=CODES):
    """The manners: no exception but SystemExit (a traceback), a known exit status, one error line."""
    exc = res.exception
    assert exc is None or isinstance(exc, SystemExit), f"{type(exc).__name__}: {exc}\n{res.output}"
    assert res.exit_code in allowed, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith(("charrnn: error", "Error:"))]
    if res.exit_code in (1, 2):
        assert len(errors) == 1, res.output
    else:
        assert not errors, res.output
    assert "Traceback" not in res.output


def invoke(args, input=None):
    return CliRunner().invoke(cli, args, input=input, catch_exceptions=True)


def listing(path):
    return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getsize(os.path.join(d, f)))
                  for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small run and its corpus, in a directory the fuzzing must leave as it found it."""
    d = tmp_path_factory.mktemp("fuzz")
    with open(os.path.join(ROOT, "corpora", "arithmetic.txt"), encoding="utf-8") as f:
        text = f.read()[:8000]
    corpus = d / "c.txt"
    corpus.write_text(text + "é€\n", encoding="utf-8")
    run = d / "run"
    res = invoke(["train", str(corpus), "--out", str(run), "--steps", "4", "--docs", "line", *TINY, "-q"])
    assert res.exit_code == 0, res.output
    return {"dir": d, "corpus": str(corpus), "run": str(run)}


# ------------------------------------------------------------------ option values
JUNK = st.sampled_from(["", "-1", "0", "1e309", "nan", "inf", "-inf", "0x10", "1_000", "1,5", "abc", "--", "-",
                        "18446744073709551616", "99999999999999999999999", " 3", "\x00", "\ud800", "é"])


def number(lo, hi, junk=JUNK):
    """Mostly in range (so commands get past Click and do work), sometimes junk."""
    valid = st.integers(lo, hi).map(str)
    return st.one_of(valid, valid, valid, junk)


def real(lo, hi):
    valid = st.floats(lo, hi, allow_nan=False).map(repr)
    return st.one_of(valid, valid, valid, JUNK)


def options(table):
    """A list of command-line words: some of the options in `table` with values from its strategies."""
    return st.lists(st.sampled_from(sorted(table)), max_size=5, unique=True).flatmap(
        lambda names: st.tuples(*[table[n].map(lambda v, n=n: [n] if v is None else [n, v]) for n in names])
    ).map(lambda groups: [w for g in groups for w in g])


FLAG = st.just(None)
TEXT = st.text(max_size=12)
SAMPLE = {
    "--temp": real(-1, 5), "--top-k": number(-2, 50), "--top-p": real(-0.5, 1.5), # --length 0 or 2**64 is an endless sample, as asked: into a CliRunner's memory, not tested here
    "--length": number(1, 40, JUNK.filter(lambda v: not v.strip().isdigit())),
    "--num": number(0, 4), "--prime": TEXT, "--stop": TEXT, "--beam": number(-1, 5),
    "--format": st.sampled_from(["text", "jsonl", "xml"]), "--seed": number(-5, 2**64 + 5),
    "--unknown": st.sampled_from(["error", "skip", "unk", "extend"]), "--no-prime-echo": FLAG, "-q": FLAG,
    "--threads": number(0, 3), "--prime-file": st.sampled_from(["/nonexistent", "/dev/null", "/", "-"]),
}
EVAL = {"--json": FLAG, "--docs": st.sampled_from(["line", "blank", "none", "paragraph"]),
        "--encoding": st.sampled_from(["utf-8", "latin-1", "utf-16", "rot13", "nope", "unicode_escape", "undefined",
                                        "punycode", "idna", "utf-7", "cp037", "hz", "utf-32-be", "raw_unicode_escape"]),
        "--max-input": st.sampled_from(["1", "10", "1K", "0", "-3", "1e3", "big", "4G"]), "-q": FLAG,
        "--threads": number(0, 3)}
TRAIN = {
    "--layers": number(0, 3), "--hidden": number(0, 24), "--batch": number(0, 9), "--seq": number(0, 20),
    "--steps": number(0, 3), "--lr": real(-1, 1), "--dropout": real(-0.5, 1.5), "--val-frac": real(-0.5, 1.2),
    "--cell": st.sampled_from(["lstm", "gru", "rnn", "transformer"]), "--docs": st.sampled_from(["line", "blank", "x"]),
    "--clip": real(-1, 10), "--seed": number(-1, 2**64 + 1), "--max-vocab": st.sampled_from(["1", "3", "all", "0", "x"]),
    "--val-chars": st.sampled_from(["1", "all", "0", "-2", "x"]), "--eval-every": number(0, 3),
    "--schedule": st.sampled_from(["cosine", "wsd", "step", "constant", "auto"]), "--decay-steps": number(0, 5),
    "--weight-drop": real(-0.2, 1.2), "--average": st.sampled_from(["off", "ema", "polyak", "median"]),
    "--max-input": st.sampled_from(["1", "100", "1K", "4G", "0"]), "--encoding": st.sampled_from(["utf-8", "nope"]),
    "--minutes": real(-1, 0.01), "--epochs": real(-1, 0.05), "--unknown": st.sampled_from(["unk", "extend"]),
    "--patience": number(0, 2), "--warmup": number(-1, 5), "--seq-warmup": number(-1, 5),
}


@settings(FUZZ, max_examples=600)
@given(args=options(SAMPLE))
def test_sample_with_random_options(world, args):
    before = listing(world["dir"])
    res = invoke(["sample", "--model", world["run"], "--length", "20", *args], input="a prime\n")
    check(res)
    assert listing(world["dir"]) == before


@settings(FUZZ, max_examples=400)
@given(args=options(EVAL), text=st.binary(max_size=300))
def test_eval_with_random_options_and_bytes(world, tmp_path, args, text):
    p = tmp_path / "t.txt"
    p.write_bytes(text)
    res = invoke(["eval", str(p), "--model", world["run"], *args])
    check(res)


@settings(FUZZ, max_examples=600)
@given(args=options(TRAIN))
def test_train_with_random_options_leaves_nothing_when_it_fails(world, tmp_path_factory, args):
    scratch = tmp_path_factory.mktemp("train")
    out = scratch / "out"
    res = invoke(["train", world["corpus"], "--out", str(out), "--steps", "2", *TINY, "-q", *args])
    check(res)
    if res.exit_code != 0:
        assert not out.exists(), res.output
    else:
        assert (out / "last.npz").exists() and (out / "run.json").exists()
    assert not [f for f in os.listdir(scratch) if f != "out"]
    shutil.rmtree(scratch)


# ------------------------------------------------------------------ mangled files
def mangle(data: bytes, cuts):
    """`data` after a list of edits: (offset fraction, kind, payload)."""
    b = bytearray(data)
    for frac, kind, payload in cuts:
        i = int(frac * len(b))
        if kind == "truncate":
            del b[i:]
        elif kind == "flip":
            b[i : i + len(payload)] = payload
        else:
            b[i:i] = payload
    return bytes(b)


EDITS = st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["truncate", "flip", "insert"]), st.binary(min_size=1, max_size=16)),
                 min_size=1, max_size=3)


@settings(FUZZ, max_examples=800)
@given(edits=EDITS, command=st.sampled_from(["sample", "info", "eval", "init-from"]))
def test_a_mangled_checkpoint_is_refused_in_one_line(world, tmp_path_factory, edits, command):
    d = tmp_path_factory.mktemp("ck")
    p = d / "m.npz"
    p.write_bytes(mangle(open(os.path.join(world["run"], "best.npz"), "rb").read(), edits))
    args = {"sample": ["sample", "--model", str(p), "--length", "10", "--seed", "1"], "info": ["info", str(p), "--json"],
            "eval": ["eval", world["corpus"], "--model", str(p)],
            "init-from": ["train", world["corpus"], "--init-from", str(p), "--out", str(d / "o"), "--steps", "1",
                          "--threads", "1", "-q"]}[command]
    check(invoke(args), {0, 1, 2})
    assert sorted(os.listdir(d)) in (["m.npz"], ["m.npz", "o"])
    shutil.rmtree(d)


RUN_FILES = ["last.npz", "best.npz", "metrics.jsonl", "tokens.json", "tokens.npy", "run.json"]


@settings(FUZZ, max_examples=300)
@given(name=st.sampled_from(RUN_FILES), edits=EDITS, command=st.sampled_from(["resume", "info", "sample"]))
def test_a_mangled_run_directory_is_refused_or_repaired(world, tmp_path_factory, name, edits, command):
    d = tmp_path_factory.mktemp("rd")
    run = d / "run"
    shutil.copytree(world["run"], run)
    p = run / name
    p.write_bytes(mangle(p.read_bytes(), edits))
    args = {"resume": ["train", "--resume", str(run), "--steps", "6", "--threads", "1"], "info": ["info", str(run)],
            "sample": ["sample", "--model", str(run), "--length", "5"]}[command]
    res = invoke(args)
    check(res, {0, 1})
    if command == "resume" and res.exit_code == 0:  # a resumed run: its files whole again
        json.load(open(run / "tokens.json"))
        assert json.loads(str(np.load(run / "last.npz")["meta"][()]))["step"] == 6
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
    shutil.rmtree(d)


TOKENS = st.lists(st.one_of(st.characters(), st.sampled_from(["<START>", "<END>", "<UNK>", "ab", "", "\ud800"])),
                  max_size=12)


@settings(FUZZ, max_examples=400)
@given(text=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(lambda t: t.encode("utf-8", "replace"))),
       tokens=st.one_of(st.none(), TOKENS, st.just(0)), args=options({k: TRAIN[k] for k in ("--docs", "--val-frac",
                                                                                             "--encoding", "--max-vocab")}))
def test_train_on_random_text_and_vocabularies(world, tmp_path_factory, text, tokens, args):
    d = tmp_path_factory.mktemp("tv")
    corpus = d / "c.txt"
    corpus.write_bytes(text)
    extra = []
    if tokens is not None:
        v = d / "v.json"
        v.write_text(json.dumps({"tokens": ["<START>", "<END>", "<UNK>", *tokens]} if tokens != 0 else tokens))
        extra = ["--vocab", str(v), "--unknown", "unk"]
    res = invoke(["train", str(corpus), "--out", str(d / "o"), "--steps", "1", "--hidden", "8", "--batch", "1",
                  "--seq", "4", "--threads", "1", "-q", *extra, *args])
    check(res, {0, 1, 2})
    if res.exit_code != 0:
        assert not (d / "o").exists()
    shutil.rmtree(d)


@settings(FUZZ, max_examples=300)
@given(prime=st.binary(max_size=200), args=options({k: SAMPLE[k] for k in ("--unknown", "--format", "--beam",
                                                                            "--no-prime-echo", "--stop")}))
def test_sample_with_a_random_prime_file(world, tmp_path, prime, args):
    p = tmp_path / "prime.txt"
    p.write_bytes(prime)
    res = invoke(["sample", "--model", world["run"], "--prime-file", str(p), "--length", "10", "--seed", "2", *args])
    check(res)
    res = invoke(["sample", "--model", world["run"], "--prime-file", "-", "--length", "10", "--seed", "2", *args],
                 input=prime)
    check(res)
