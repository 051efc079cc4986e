"""charrnn sample and eval through the command line: pipes, seeds, documents, bad input, exit codes."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from charrnn import __version__
from charrnn.cli import cli
from tests.common import ROOT, run, sh
from tests.common import SMALL_CLI as SMALL


@pytest.fixture(scope="module")
def stream_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    corpus = d / "markov.txt"
    corpus.write_text(open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8").read()[:40000])
    out = d / "run"
    res = run(["train", str(corpus), "--out", str(out), "--steps", "60", *SMALL])
    assert res.exit_code == 0, res.output
    return str(out)


@pytest.fixture(scope="module")
def docs_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    corpus = d / "arith.txt"
    corpus.write_text(open(os.path.join(ROOT, "corpora", "arithmetic.txt"), encoding="utf-8").read()[:30000])
    out = d / "run"
    res = run(["train", str(corpus), "--docs", "line", "--out", str(out), "--steps", "80", *SMALL])
    assert res.exit_code == 0, res.output
    return str(out)


def test_version_and_help():
    assert __version__ in run(["--version"]).output
    for cmd in ("train", "sample", "eval"):
        res = run([cmd, "--help"])
        assert res.exit_code == 0 and "Example:" in res.output
    assert "default: 1.0" in run(["sample", "--help"]).output
    res = sh(["--help"])
    assert res.returncode == 0 and "train" in res.stdout


def test_sample_is_reproducible_with_seed_and_streams_only_text(stream_model):
    a = sh(["sample", "--model", stream_model, "--seed", "7", "--length", "300"])
    b = sh(["sample", "--model", stream_model, "--seed", "7", "--length", "300"])
    c = sh(["sample", "--model", stream_model, "--seed", "8", "--length", "300"])
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout != c.stdout
    assert len(a.stdout) == 301  # 300 characters and the separating newline
    assert "sampling from" in a.stderr
    q = sh(["sample", "--model", stream_model, "--seed", "7", "--length", "300", "-q"])
    assert q.stderr == "" and q.stdout == a.stdout


def test_greedy_is_deterministic_without_seed(stream_model):
    a = run(["sample", "--model", stream_model, "--temp", "0", "--length", "100", "-q"]).output
    b = run(["sample", "--model", stream_model, "--temp", "0", "--length", "100", "-q"]).output
    assert a == b and len(a) == 101


def test_prime_echo_and_unknown_characters(stream_model):
    res = run(["sample", "--model", stream_model, "--prime", "the ", "--length", "50", "--seed", "1", "-q"])
    assert res.exit_code == 0 and res.output.startswith("the ") and len(res.output) == 4 + 50 + 1
    res = run(["sample", "--model", stream_model, "--prime", "the ", "--no-prime-echo", "--length", "50", "-q"])
    assert not res.output.startswith("the ") or len(res.output) == 51
    res = sh(["sample", "--model", stream_model, "--prime", "QZ€ the"])
    assert res.returncode == 2 and "'Q'" in res.stderr and "'€'" in res.stderr and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 2  # "sampling from ..." and the error
    res = run(["sample", "--model", stream_model, "--prime", "QZ the", "--unknown", "skip", "--length", "5", "-q"])
    assert res.exit_code == 0


@pytest.mark.parametrize("args", [["--temp", "-1"], ["--top-p", "1.5"], ["--top-k", "0"], ["--length", "-3"], ["--num", "0"]])
def test_invalid_values_are_usage_errors(stream_model, args):
    res = sh(["sample", "--model", stream_model, *args])
    assert res.returncode == 2 and res.stdout == ""


def test_docs_model_prints_whole_documents(docs_model):
    res = run(["sample", "--model", docs_model, "--num", "10", "--seed", "3", "-q"])
    assert res.exit_code == 0
    lines = res.output.split("\n")
    assert lines[-1] == "" and len(lines) == 11
    assert all("<" not in ln for ln in lines)


def test_top_k_1_equals_greedy(stream_model):
    a = run(["sample", "--model", stream_model, "--top-k", "1", "--length", "80", "--seed", "1", "-q"]).output
    b = run(["sample", "--model", stream_model, "--temp", "0", "--length", "80", "-q"]).output
    assert a == b


@pytest.mark.parametrize("pipe", ["head -c 100", "head -n 1", "wc -c"])
def test_pipes_end_quietly(stream_model, pipe):
    length = "2000" if pipe == "wc -c" else "0"
    cmd = f"{shlex_join([sys.executable, '-m', 'charrnn', 'sample', '--model', stream_model, '--length', length, '--seed', '1'])} | {pipe}; echo \"status=${{PIPESTATUS[0]}}\""
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "status=0" in res.stdout
    assert "Traceback" not in res.stderr and "Error" not in res.stderr
    if pipe == "wc -c":
        assert re.search(r"^\s*2001\s*$", res.stdout, re.M)


def shlex_join(args):
    import shlex

    return shlex.join(args)


def test_bad_checkpoints(stream_model, tmp_path):
    good = os.path.join(stream_model, "best.npz")
    cases = {}
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(open(good, "rb").read()[:2000])
    cases[str(trunc)] = "corrupt or truncated"
    text = tmp_path / "text.npz"
    text.write_text("hello")
    cases[str(text)] = "not a charrnn checkpoint"
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    cases[str(foreign)] = "not a charrnn checkpoint"
    newer = tmp_path / "newer.npz"
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"][()]))
    meta["version"] = 99
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(newer, **arrays)
    cases[str(newer)] = "newer charrnn"
    cases[str(tmp_path / "missing.npz")] = "no such checkpoint"
    for path, needle in cases.items():
        for cmd in (["sample"], ["eval", os.path.join(ROOT, "corpora", "markov.txt")]):
            res = sh([*cmd, "--model", path])
            assert res.returncode == 1, (path, res.stderr)
            assert needle in res.stderr and "Traceback" not in res.stderr
            assert len(res.stderr.strip().splitlines()) == 1
            assert res.stdout == ""


def test_no_run_found(tmp_path):
    res = sh(["sample"], cwd=tmp_path)
    assert res.returncode == 1 and "no trained model" in res.stderr


def test_default_model_is_the_latest_run(stream_model, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(stream_model, runs / "one")
    res = sh(["sample", "--length", "5"], cwd=tmp_path)
    assert res.returncode == 0 and os.path.join("runs", "one") in res.stderr


def test_eval_json_text_stdin_and_unknown(stream_model, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the cat sat. QQ\n", encoding="utf-8")
    res = run(["eval", str(f), "-", "--model", stream_model, "--json", "-q"], input="abc")
    assert res.exit_code == 0
    recs = [json.loads(x) for x in res.output.splitlines()]
    assert [r["file"] for r in recs] == [str(f), "<stdin>"]
    assert recs[0]["tokens"] == 16 and recs[0]["unk"] == 2
    assert recs[1]["tokens"] == 3 and recs[1]["unk"] == 0
    for r in recs:
        assert abs(r["bits_per_char"] - r["nats_per_char"] / np.log(2)) < 1e-12
        assert abs(r["perplexity"] - np.exp(r["nats_per_char"])) < 1e-9
    res = run(["eval", str(f), "--model", stream_model, "-q"])
    assert "nats/char" in res.output and "bits/char" in res.output and "2 unknown" in res.output


def test_eval_bad_files(stream_model, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("")
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\x00\x01\x02")
    for path, needle in ((empty, "empty"), (binary, "binary"), (tmp_path / "none.txt", "no such file")):
        res = sh(["eval", str(path), "--model", stream_model])
        assert res.returncode == 1 and needle in res.stderr and res.stdout == ""


# ------------------------------------------------------------------------------------------ option ranges
FLOAT_OPTIONS = [("train", o) for o in ("--lr", "--dropout", "--decay-factor", "--clip", "--epochs", "--minutes",
                                        "--val-frac", "--forget-bias")] + [("sample", "--temp"), ("sample", "--top-p")]


def test_every_float_option_is_finite():
    """Every float option of every command refuses NaN and inf (Finite): Click's FloatRange alone
    lets NaN through, so a new float option declared with it would fail here."""
    from click.types import FloatParamType

    from charrnn.cli import Finite

    found = set()
    for name, cmd in cli.commands.items():
        for p in cmd.params:
            if isinstance(p.type, FloatParamType):
                assert isinstance(p.type, Finite), f"{name} {p.opts[0]} is a float option that lets NaN in"
                found.add((name, p.opts[0]))
    assert set(FLOAT_OPTIONS) <= found


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("tiny") / "tiny.txt"
    f.write_text(open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8").read()[:3000])
    return str(f)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
@pytest.mark.parametrize("cmd,option", FLOAT_OPTIONS)
def test_float_options_refuse_nan_and_inf(cmd, option, value, stream_model, tmp_path):
    """NaN and inf are usage errors naming the option: `--lr nan` was a ValueError traceback,
    `--minutes nan` trained 0 steps and exited 0, `--temp nan` printed <START><START>..."""
    args = [cmd, f"{option}={value}"]
    args += ["--model", stream_model] if cmd == "sample" else [str(tmp_path / "absent.txt"), "--steps", "2"]
    res = run(args)
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}'" in res.output and "not a finite number" in res.output
    assert "<START>" not in res.output


@pytest.mark.parametrize("args", [["--forget-bias", "101"], ["--forget-bias", "-1e3"], ["--hidden", "65537"]])
def test_train_options_out_of_range(args, tmp_path):
    res = run(["train", str(tmp_path / "absent.txt"), *args])
    assert res.exit_code == 2 and f"Invalid value for '{args[0]}'" in res.output


@pytest.mark.parametrize("cmd", ["train", "sample"])
@pytest.mark.parametrize("seed", ["-1", str(2**64), "12345678901234567890123", "1.5", "seven"])
def test_seeds_are_whole_numbers_below_2_64(cmd, seed, stream_model, tiny_corpus, tmp_path):
    """`sample --seed -1` and a 23-digit seed overflowed, `train --seed -1` was a ValueError."""
    args = [cmd, "--seed", seed]
    args += ["--model", stream_model, "--length", "5"] if cmd == "sample" else [tiny_corpus, "--out", str(tmp_path / "r"), "--steps", "2", *SMALL]
    res = run(args)
    assert res.exit_code == 2, res.output
    assert "Invalid value for '--seed'" in res.output


def test_help_shows_ranges_and_defaults():
    squash = lambda s: " ".join(s.split())  # noqa: E731  (help text wraps with the terminal)
    train_help = squash(run(["train", "--help"]).output)
    for needle in ("[default: 0.003; x>0]", "[default: 1.0; -100<=x<=100]", "[default: 1234; 0<=x<=18446744073709551615]",
                   "[default: 0.9; 0<x<=1]", "[default: 0.1; 0<=x<1]", "[default: 5.0; x>=0]", "0<=x<1]"):
        assert needle in train_help, needle
    sample_help = squash(run(["sample", "--help"]).output)
    for needle in ("[default: 1.0; x>=0]", "[0<x<=1]", "[0<=x<=18446744073709551615]", "[default: 1; 1<=x<=1000000]"):
        assert needle in sample_help, needle


def test_largest_seed_samples(stream_model):
    top = str(2**64 - 1)
    a = run(["sample", "--model", stream_model, "--seed", top, "--length", "40", "-q"])
    b = run(["sample", "--model", stream_model, "--seed", top, "--length", "40", "-q"])
    assert a.exit_code == 0 and a.output == b.output and len(a.output) == 41


@pytest.mark.parametrize("args", [["--temp", "1e-38"], ["--temp", "5e-324"], ["--top-p", "1e-300"], ["--top-k", "1"],
                                  ["--temp", "0"], ["--temp", "1e38"], ["--temp", "1e300", "--top-k", "3"],
                                  ["--top-k", "99999999999999999999999"]])
def test_extreme_sampling_options_print_only_text(stream_model, args):
    """`--temp 1e-38` printed <START><START>...: special tokens never reach stdout, and a tiny
    temperature samples like --temp 0 (the model's logits do not tie)."""
    res = run(["sample", "--model", stream_model, "--length", "80", "--seed", "2", "-q", *args])
    assert res.exit_code == 0 and len(res.output) == 81 and "<" not in res.output
    if args[0] == "--temp" and float(args[1]) < 1e-30:
        assert res.output == run(["sample", "--model", stream_model, "--length", "80", "--temp", "0", "-q"]).output


# ------------------------------------------------------------------------------------------ stdout failures
def sh_shell(script, timeout=120):
    """A shell line, for redirections subprocess cannot set up (closing stdout); {charrnn} in it
    runs this Python's charrnn."""
    script = script.format(charrnn=shlex_join([sys.executable, "-m", "charrnn"]))
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=timeout)


def result_commands(model):
    return {"sample": ["sample", "--model", model, "--length", "200", "--seed", "1", "-q"],
            "eval": ["eval", os.path.join(ROOT, "corpora", "markov.txt"), "--model", model, "--json", "-q"]}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("cmd", ["sample", "eval"])
def test_full_stdout_is_a_one_line_error(stream_model, cmd):
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "charrnn", *result_commands(stream_model)[cmd]], stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr == "charrnn: error: cannot write to stdout: No space left on device\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["sample", "--help"]])
def test_click_output_to_a_full_stdout_is_a_one_line_error(args):
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "charrnn", *args], stdout=full, stderr=subprocess.PIPE, text=True,
                             timeout=120)
    assert res.returncode == 1 and res.stderr == "charrnn: error: cannot write output: No space left on device\n"


@pytest.mark.parametrize("cmd", ["sample", "eval"])
def test_closed_stdout_is_a_one_line_error(stream_model, cmd):
    args = shlex_join(result_commands(stream_model)[cmd])
    res = sh_shell(f"exec {{charrnn}} {args} >&-")
    assert res.returncode == 1, res.stderr
    assert res.stderr == "charrnn: error: cannot write to stdout: it is closed\n"
    both = sh_shell(f"exec {{charrnn}} {args} >&- 2>&-")  # nowhere to say it: the status alone
    assert both.returncode == 1 and both.stdout == "" and both.stderr == ""


def test_train_writes_nothing_to_stdout(tiny_corpus, tmp_path):
    """Progress, notes and the summary go to stderr: stdout stays empty (also with the largest seed)."""
    res = sh(["train", tiny_corpus, "--out", str(tmp_path / "r"), "--steps", "3", "--seed", str(2**64 - 1),
              "--hidden", "8", "--batch", "4", "--seq", "8", "--threads", "1"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and "done:" in res.stderr
    meta = json.loads(str(np.load(str(tmp_path / "r" / "last.npz"), allow_pickle=False)["meta"][()]))
    assert 2**64 - 1 in (meta.get("config", {}).get("seed"), meta.get("train", {}).get("seed"))


# ------------------------------------------------------------------------------------------ library config
@pytest.mark.parametrize("field,value", [
    ("lr", float("nan")), ("lr", float("inf")), ("lr", 0.0), ("dropout", float("nan")), ("dropout", 1.0),
    ("decay_factor", float("nan")), ("clip", float("nan")), ("epochs", float("inf")), ("minutes", float("nan")),
    ("val_frac", -0.1), ("forget_bias", float("nan")), ("forget_bias", 1e3), ("seed", -1), ("seed", 2**64),
    ("seed", 1.5), ("steps", 0), ("hidden", 2.5), ("batch", True), ("layers", "2"),
])
def test_train_config_refuses_what_the_command_line_refuses(field, value):
    """A library caller gets the command line's checks: TrainConfig validates on construction
    (and so on replace()), raising UsageError naming the field."""
    from dataclasses import replace

    from charrnn.config import DEFAULTS, TrainConfig
    from charrnn.errors import UsageError

    with pytest.raises(UsageError, match=field):
        TrainConfig(**{field: value})
    with pytest.raises(UsageError, match=field):
        replace(DEFAULTS, **{field: value})
    assert TrainConfig.from_dict(DEFAULTS.to_dict()) == DEFAULTS


def test_the_exit_skips_shutdown_only_while_the_early_compile_runs(monkeypatch):
    """main() exits without the interpreter's shutdown while precompile's background thread still
    compiles (precompile.compiling(), not a thread name matched here), and only then."""
    import threading
    import time

    from charrnn import precompile
    from charrnn.cli import app
    from charrnn.config import TrainConfig

    def settle():  # until no early compile of this process (an earlier test's run too) is at work
        deadline = time.monotonic() + 120
        while precompile.compiling() and time.monotonic() < deadline:
            time.sleep(0.01)

    exits = []
    monkeypatch.setattr(app.os, "_exit", exits.append)
    gate = threading.Event()
    monkeypatch.setattr(precompile.Precompile, "_run", lambda self: gate.wait(30))  # compiles nothing, holds on
    settle()
    app._exit_now_if_compiling(0)
    assert exits == []
    precompile.Precompile(TrainConfig(), "lstm")
    try:
        app._exit_now_if_compiling(3)
        assert exits == [3]
    finally:
        gate.set()
    settle()
    app._exit_now_if_compiling(0)
    assert exits == [3]
