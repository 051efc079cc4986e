"""`charrnn sample --stop STRING`, `--prime-file PATH` and `--format text|jsonl`: stop strings while
streaming (held-back text, several samples, documents), the prime read from a file or stdin, the
JSON lines (keys, log-probabilities against the numpy reference, jq), and their usage errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from charrnn import checkpoint
from charrnn.generate import SampleOptions, _cut, held_back, sample_pieces
from tests.common import ROOT, run, sh
from tests.common import SMALL_CLI as SMALL
from tests.test_beam import ref_total, tiny


@pytest.fixture(scope="module")
def stream_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("extras")
    corpus = d / "markov.txt"
    corpus.write_text(open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8").read()[:20000])
    res = run(["train", str(corpus), "--out", str(d / "run"), "--steps", "40", *SMALL])
    assert res.exit_code == 0, res.output
    return str(d / "run")


@pytest.fixture(scope="module")
def docs_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("extras_docs")
    corpus = d / "arith.txt"
    corpus.write_text(open(os.path.join(ROOT, "corpora", "arithmetic.txt"), encoding="utf-8").read()[:20000])
    res = run(["train", str(corpus), "--docs", "line", "--out", str(d / "run"), "--steps", "60", *SMALL])
    assert res.exit_code == 0, res.output
    return str(d / "run")


# ----------------------------------------------------------------------------- --stop, the library
def pieces(m, vocab, documents=False, **kw):
    opts = SampleOptions(**{"seed": 5, "length": 300, **kw})
    return list(sample_pieces(m, vocab, opts, documents=documents, target_s=1e-6))  # small chunks


def texts(ps, num):
    out = ["" for _ in range(num)]
    ends = [None] * num
    for p in ps:
        assert ends[p.stream] is None  # nothing after a sample's last piece
        out[p.stream] += p.text
        ends[p.stream] = p.end
    return out, ends


def test_stop_cuts_a_sample_at_the_first_occurrence():
    m, vocab = tiny("abcde \n", seed=1, sharp=1.0)
    full = texts(pieces(m, vocab), 1)[0][0]
    stop = full[100:103]
    first = full.find(stop)
    assert 0 <= first <= 100
    out, ends = texts(pieces(m, vocab, stop=stop), 1)
    assert out[0] == full[:first] and ends[0] == "stop"  # the same draws up to the stop, which is not printed
    # a string that never occurs: the whole sample, ended by its length
    out, ends = texts(pieces(m, vocab, stop="\n\n\n\n\n\n\n\n"), 1)
    assert ends == ["length"] and len(out[0]) == 300 and (out[0] == full or "\n\n\n" in full)


def test_stop_streams_what_cannot_start_the_string():
    """Printed in many pieces, none of them containing the string, together the text before it."""
    m, vocab = tiny("abcdefg", seed=2, sharp=0.5)
    full = texts(pieces(m, vocab, length=300), 1)[0][0]
    p = next(p for p in range(80, 290) if full.find(full[p : p + 3]) == p)  # a string first seen late
    stop = full[p : p + 3]
    ps = pieces(m, vocab, stop=stop, length=300)
    shown = ""
    for piece in ps:
        shown += piece.text
        assert stop not in shown
    assert shown == full[:p] and ps[-1].end == "stop"
    assert len(ps) > 3  # streamed in several pieces


@settings(max_examples=300, deadline=None)
@given(text=hs.text("abc", max_size=12), stop=hs.text("abc", min_size=1, max_size=4), ending=hs.booleans())
def test_cut_against_brute_force(text, stop, ending):
    shown, held, end = _cut(text, stop, "length" if ending else None)
    i = text.find(stop)
    if i >= 0:
        assert (shown, held, end) == (text[:i], "", "stop")
        return
    assert shown + held == text and end == ("length" if ending else None)
    if ending:
        assert held == ""
    else:  # held back: the longest suffix that is a proper prefix of stop
        assert held == next((text[len(text) - k :] for k in range(min(len(stop) - 1, len(text)), 0, -1)
                             if stop.startswith(text[len(text) - k :])), "")
        assert held_back(text, stop) == len(held)


def test_stop_with_several_samples_and_documents():
    m, vocab = tiny("abc", seed=3, sharp=1.0)
    out, ends = texts(pieces(m, vocab, num=6, stop="cc", length=200), 6)
    assert all("cc" not in t for t in out)
    assert set(ends) <= {"stop", "length"} and "stop" in ends
    for t, e in zip(out, ends):
        assert (e == "length") == (len(t) == 200)
    m.params["decoder.bias"][1] += 1.0  # <END> likely: documents end by it, or by the stop string
    out, ends = texts(pieces(m, vocab, documents=True, num=8, stop="ab", length=100), 8)
    assert all("ab" not in t for t in out) and {"end", "stop"} <= set(ends)


# ----------------------------------------------------------------------------- the command line
def test_cli_stop_text_and_subprocess(stream_model):
    full = run(["sample", "--model", stream_model, "--length", "200", "--seed", "4", "-q"]).output[:-1]
    stop = full[120:122]
    res = sh(["sample", "--model", stream_model, "--length", "200", "--seed", "4", "--stop", stop, "-q"])
    assert res.returncode == 0 and res.stdout == full[: full.find(stop)] + "\n"
    free = run(["sample", "--model", stream_model, "--length", "60", "--num", "4", "--seed", "4", "-q"]).output
    assert len(free.split("\n")) > 5  # the samples hold newlines of their own
    res = run(["sample", "--model", stream_model, "--length", "60", "--num", "4", "--seed", "4", "--stop", "\n", "-q"])
    lines = res.output.split("\n")
    assert res.exit_code == 0 and len(lines) == 5 and lines[-1] == ""  # each cut at its first newline
    res = run(["sample", "--model", stream_model, "--stop", "", "-q"])
    assert res.exit_code == 2 and "--stop" in res.output


def test_cli_stop_with_beam(stream_model):
    plain = run(["sample", "--model", stream_model, "--beam", "3", "--length", "60", "-q"]).output[:-1]
    stop = plain[30:32]
    res = run(["sample", "--model", stream_model, "--beam", "3", "--length", "60", "--stop", stop, "--format", "jsonl",
               "-q"])
    row = json.loads(res.output)
    assert stop not in row["text"] and row["end"] == "stop"


def test_cli_stop_unknown_characters_is_a_note(stream_model):
    res = sh(["sample", "--model", stream_model, "--length", "20", "--stop", "€€", "--seed", "1"])
    assert res.returncode == 0 and "never stops" in res.stderr and len(res.stdout) == 21


def test_cli_prime_file_file_and_stdin(stream_model, tmp_path):
    f = tmp_path / "prime.txt"
    f.write_text("the cat\n")
    want = run(["sample", "--model", stream_model, "--prime", "the cat\n", "--length", "40", "--seed", "2", "-q"])
    assert want.output.startswith("the cat\n")
    res = run(["sample", "--model", stream_model, "--prime-file", str(f), "--length", "40", "--seed", "2", "-q"])
    assert res.exit_code == 0 and res.output == want.output
    res = sh(["sample", "--model", stream_model, "--prime-file", "-", "--length", "40", "--seed", "2", "-q"],
             input="the cat\n")
    assert res.returncode == 0 and res.stdout == want.output
    f.write_bytes(b"the cat\r\n")  # newlines normalised as in corpora
    res = run(["sample", "--model", stream_model, "--prime-file", str(f), "--length", "40", "--seed", "2", "-q"])
    assert res.output == want.output


@pytest.mark.parametrize("case", ["both", "missing", "invalid", "empty", "binary", "unknown"])
def test_cli_prime_file_errors(stream_model, tmp_path, case):
    f = tmp_path / "p.txt"
    content = {"both": b"the", "invalid": b"th\xff\xfee", "empty": b"", "binary": b"a\x00b", "unknown": "QZ€".encode()}
    if case != "missing":
        f.write_bytes(content[case])
    args = ["sample", "--model", stream_model, "--prime-file", str(f), "--length", "5", "-q"]
    if case == "both":
        args += ["--prime", "x"]
    res = sh(args)
    code = {"both": 2, "unknown": 2}.get(case, 1)
    assert res.returncode == code and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("charrnn: error: ")
    assert "Traceback" not in res.stderr
    assert {"invalid": "UTF-8", "empty": "empty", "missing": "no such file", "binary": "binary",
            "both": "--prime-file", "unknown": "--prime-file"}[case] in res.stderr


def test_undecodable_prime_file_and_corpus_name_no_encoding_option(stream_model, tmp_path):
    """The reader's error carries its advice (--encoding, which train and eval have) apart from
    the reason (DataError.hint, .reason): sample, which has no --encoding, reports the reason
    alone for --prime-file and --corpus, without cutting the reader's message text."""
    from charrnn.data import read_text
    from charrnn.errors import DataError

    f = tmp_path / "latin1.txt"
    f.write_bytes(b"caf\xe9 cr\xe8me\n")
    with pytest.raises(DataError) as err:
        read_text(str(f))
    reason = f"{f}: not valid UTF-8 at byte offset 3 (byte 0xe9)"
    assert (err.value.reason, err.value.hint) == (reason, "if the file is in another encoding, pass --encoding")
    assert str(err.value) == f"{reason}; if the file is in another encoding, pass --encoding"
    res = run(["sample", "--model", stream_model, "--prime-file", str(f), "--length", "5", "-q"])
    assert res.exit_code == 1 and res.stderr == f"charrnn: error: --prime-file: {reason}\n"
    res = run(["sample", "--model", stream_model, "--corpus", str(f), "--copy-report", "--length", "5", "-q"])
    assert res.exit_code == 1 and res.stderr == f"charrnn: error: --corpus: {reason}\n"


def test_cli_prime_not_utf8_is_a_usage_error(stream_model):
    res = subprocess.run([sys.executable.encode(), b"-m", b"charrnn", b"sample", b"--model", stream_model.encode(),
                          b"--prime", b"a\xffb", b"--unknown", b"skip", b"-q"], capture_output=True, timeout=180)
    assert res.returncode == 2 and b"UTF-8" in res.stderr and b"Traceback" not in res.stderr


# ----------------------------------------------------------------------------- --format jsonl
def test_jsonl_sampling_records_and_logprob(stream_model):
    res = run(["sample", "--model", stream_model, "--num", "3", "--length", "30", "--prime", "the ", "--seed", "9",
               "--format", "jsonl", "-q"])
    assert res.exit_code == 0
    rows = [json.loads(line) for line in res.output.splitlines()]
    text = run(["sample", "--model", stream_model, "--num", "3", "--length", "30", "--prime", "the ", "--seed", "9",
                "--no-prime-echo", "-q"]).output
    assert "".join(r["text"] + "\n" for r in rows) == text  # the same samples as the text format
    ck = checkpoint.load(os.path.join(stream_model, "best.npz"))
    prime = ck.vocab.encode("the ")
    for r in rows:
        # a run directory holds its tokens.npy: the copy check (tests/test_copycheck.py) adds two keys
        assert set(r) == {"text", "prime", "seed", "temp", "logprob", "end", "longest_copy", "copied_frac"}
        assert r["prime"] == "the " and r["seed"] == 9 and r["temp"] == 1.0 and r["end"] == "length"
        assert abs(r["logprob"] - ref_total(ck.model, prime, ck.vocab.encode(r["text"]))) < 1e-3


def test_jsonl_reports_the_random_seed_it_used(stream_model):
    row = json.loads(run(["sample", "--model", stream_model, "--length", "25", "--format", "jsonl", "-q"]).output)
    again = run(["sample", "--model", stream_model, "--length", "25", "--seed", str(row["seed"]), "-q"]).output
    assert again == row["text"] + "\n"


def test_jsonl_documents_and_stop(docs_model):
    res = run(["sample", "--model", docs_model, "--num", "6", "--seed", "3", "--stop", "=", "--format", "jsonl",
               "--length", "200", "-q"])
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert len(rows) == 6 and {r["end"] for r in rows} <= {"end", "stop"}
    assert all("=" not in r["text"] for r in rows)
    one = run(["sample", "--model", docs_model, "--seed", "3", "--format", "jsonl", "--length", "0", "-q"])
    assert json.loads(one.output)["end"] == "end"  # a document model's sample ends at <END>


def test_samples_that_end_out_of_order_print_and_report_in_sample_order(docs_model):
    """Document samples end at <END>, in any order; text and jsonl both print them in sample order
    (generate.in_order), and --copy-report reports each one after it is printed, in sample order,
    with the numbers the jsonl record of the same sample has."""
    args = ["sample", "--model", docs_model, "--num", "6", "--seed", "5", "--length", "200", "--copy-min", "3", "--prime", "1"]
    rows = [json.loads(line) for line in run([*args, "--format", "jsonl", "-q"]).output.splitlines()]
    res = run([*args, "--copy-report"])
    assert res.exit_code == 0
    assert res.stdout == "".join("1" + r["text"] + "\n" for r in rows)
    reports = [line for line in res.stderr.splitlines() if line.startswith("charrnn: sample ")]
    assert reports == [f"charrnn: sample {i}: longest copy {r['longest_copy']} characters, "
                       f"{100 * r['copied_frac']:.1f}% in copies" for i, r in enumerate(rows, 1)]


def test_jsonl_endless_stream_sample_is_refused(stream_model):
    res = run(["sample", "--model", stream_model, "--length", "0", "--format", "jsonl"])
    assert res.exit_code == 2 and "--length" in res.output
    res = run(["sample", "--model", stream_model, "--format", "yaml"])
    assert res.exit_code == 2 and "--format" in res.output


@pytest.mark.skipif(shutil.which("jq") is None, reason="needs jq")
def test_jsonl_through_jq(stream_model):
    cmd = (f"{sys.executable} -m charrnn sample --model {stream_model} --num 4 --length 40 --seed 1 --format jsonl "
           f"-q | jq -r .end")
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and res.stdout.split() == ["length"] * 4


@pytest.mark.parametrize("extra", [["--format", "jsonl", "--num", "50"], ["--stop", "zz", "--length", "0"]])
def test_closed_pipe_ends_quietly(stream_model, extra):
    cmd = (f"{sys.executable} -m charrnn sample --model {stream_model} --length 400 --seed 1 {' '.join(extra)} "
           "| head -c 10; echo; echo status=${PIPESTATUS[0]}")
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=180)
    assert "status=0" in res.stdout and "Traceback" not in res.stderr and "Error" not in res.stderr


def test_help_shows_the_new_options_with_examples():
    out = run(["sample", "--help"]).output
    for opt in ("--beam", "--stop", "--prime-file", "--format"):
        assert opt in out
    assert out.count("Example:") >= 5
    assert "not streamed" in out
