"""What a hostile user tried, as tests: the cases of issue 26 (each failed on main at 1075d91) and
the checks of the classes behind them (docs/robustness.md): output encoding, bounded inputs, the
files of a run directory, broken streams, shell-safe printed commands, MPI with streamed input.

The fuzz tests that drive the whole command line with random options and mangled files are in
tests/test_hostile_fuzz.py."""

import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from charrnn import checkpoint, data as data_mod
from charrnn.errors import DataError
from tests import hostile
from tests.common import ROOT, run
from tests.common import sh as text_sh

TINY = ["--hidden", "16", "--batch", "8", "--seq", "16", "--threads", "1", "-q"]
# characters outside ASCII and Latin-1, so that a locale's encoding cannot write the samples
WIDE = "é€ü—ñ"


sh = functools.partial(text_sh, text=False, timeout=120)  # `python -m charrnn ARGS` in a subprocess, bytes in and out


def assert_manners(res, codes=(0,)):
    """An exit status among `codes`, no traceback, and an error (if any) in one line."""
    err = res.stderr.decode("utf-8", "replace") if isinstance(res.stderr, bytes) else res.stderr
    assert res.returncode in codes, err
    assert "Traceback" not in err, err
    if res.returncode not in (0,):
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1, err


@pytest.fixture(scope="module")
def wide_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    with open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8") as f:
        text = f.read()[:20000]
    p = d / "wide.txt"
    p.write_text(text + (WIDE + " ") * 300 + "\n", encoding="utf-8")
    return str(p)


@pytest.fixture(scope="module")
def wide_run(wide_corpus, tmp_path_factory):
    """A small run whose vocabulary holds characters no ASCII or Latin-1 stream can write."""
    out = str(tmp_path_factory.mktemp("wrun") / "run")
    res = run(["train", wide_corpus, "--out", out, "--steps", "6", *TINY])
    assert res.exit_code == 0, res.output
    return out


def _fresh_run(corpus, out, steps=6, extra=()):
    res = run(["train", corpus, "--out", str(out), "--steps", str(steps), "--eval-every", "3", *TINY, *extra])
    assert res.exit_code == 0, res.output
    return str(out)


# ================================================================ 1. output encoding
def _surrogate_checkpoint(src, dst):
    """A copy of checkpoint `src` whose last vocabulary character is the lone surrogate U+D800 (code
    points stay in order, so only the surrogate is wrong)."""
    meta = json.loads(str(np.load(src, allow_pickle=False)["meta"][()]))
    vocab = meta["vocab"]
    assert ord(vocab[-1]) < 0xD800
    return hostile.with_meta(src, dst, {"vocab": vocab[:-1] + ["\ud800"]})


def test_a_vocabulary_with_a_lone_surrogate_is_refused_wherever_it_comes_in(wide_run, wide_corpus, tmp_path):
    # --vocab as a JSON file (issue 26, case 1)
    vfile = tmp_path / "v.json"
    chars = sorted(set(open(wide_corpus, encoding="utf-8").read()))
    vfile.write_text(json.dumps({"tokens": ["<START>", "<END>", "<UNK>", *chars, "\ud800"]}), encoding="utf-8")
    res = run(["train", wide_corpus, "--vocab", str(vfile), "--unknown", "unk", "--out", str(tmp_path / "v"),
               "--steps", "2", *TINY])
    assert res.exit_code == 1 and "surrogate" in res.output and not (tmp_path / "v").exists(), res.output
    # a corpus whose --encoding decodes an escape to a surrogate
    esc = tmp_path / "esc.txt"
    esc.write_bytes(b"abc \\ud800 def\n" * 200)
    res = run(["train", str(esc), "--encoding", "unicode_escape", "--out", str(tmp_path / "e"), "--steps", "2", *TINY])
    assert res.exit_code == 1 and "U+D800" in res.output and "surrogate" in res.output, res.output
    assert not (tmp_path / "e").exists()
    # a checkpoint that declares one: refused by every command that loads it, in one line
    bad = _surrogate_checkpoint(os.path.join(wide_run, "best.npz"), str(tmp_path / "bad.npz"))
    for args in (["sample", "--model", bad, "--length", "5"], ["sample", "--model", bad, "--format", "jsonl",
                 "--length", "5"], ["info", bad, "--json"], ["eval", wide_corpus, "--model", bad]):
        res = sh(args)
        assert_manners(res, (1,))
        assert b"surrogate" in res.stderr, (args, res.stderr)
    res = run(["train", wide_corpus, "--init-from", bad, "--out", str(tmp_path / "i"), "--steps", "2", "-q"])
    assert res.exit_code == 1 and "surrogate" in res.output and not (tmp_path / "i").exists()


LOCALES = [{"PYTHONIOENCODING": "ascii"}, {"PYTHONIOENCODING": "latin-1"},
           {"PYTHONUTF8": "0", "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "LANG": "C"}]


@pytest.mark.parametrize("env", LOCALES, ids=["ascii", "latin-1", "C-locale"])
def test_every_command_writes_utf8_whatever_the_locale(wide_run, wide_corpus, tmp_path, env):
    """Issue 26, case 1: a stdout that is not UTF-8 ended sample and info in a traceback. The rule:
    stdout and stderr carry UTF-8, in every command and format."""
    for fmt in ("text", "jsonl"):
        res = sh(["sample", "--model", wide_run, "--prime", WIDE, "--length", "20", "--seed", "3", "--format", fmt],
                 env=env)
        assert_manners(res)
        text = res.stdout.decode("utf-8")  # strict: UTF-8 or a failure
        assert (text if fmt == "text" else json.loads(text)["prime"]).startswith(WIDE)
    res = sh(["sample", "--model", wide_run, "--prime", WIDE, "--beam", "2", "--length", "5"], env=env)
    assert_manners(res)
    assert res.stdout.decode("utf-8").startswith(WIDE)
    for args in (["info", wide_run], ["info", wide_run, "--json"]):
        res = sh(args, env=env)
        assert_manners(res)
        out = res.stdout.decode("utf-8")
        assert "é" in out or "\\u00e9" in out
    res = sh(["eval", wide_corpus, "--model", wide_run, "--json"], env=env)
    assert_manners(res)
    json.loads(res.stdout.decode("utf-8"))
    # an error naming a character outside the vocabulary, on stderr
    res = sh(["sample", "--model", wide_run, "--prime", "日本", "--length", "5"], env=env)
    assert_manners(res, (2,))
    res.stderr.decode("utf-8")


def test_a_file_name_that_is_not_utf8_is_printed_as_the_bytes_that_name_it(wide_run, wide_corpus, tmp_path):
    name = os.path.join(os.fsencode(str(tmp_path)), b"caf\xe9.txt")
    shutil.copy(wide_corpus, name)
    res = subprocess.run([sys.executable, "-m", "charrnn", "eval", name, "--model", wide_run],
                         capture_output=True, timeout=120)
    assert_manners(res)
    assert res.stdout.startswith(name + b":")  # the bytes that open the file again


# ================================================================ 2. MPI: streamed corpora
def _mpi():
    from charrnn import parallel

    if not parallel.have_mpi4py() or not os.access(parallel.mpiexec_path(), os.X_OK):
        pytest.skip("needs mpi4py and mpiexec")


def test_workers_read_a_corpus_on_stdin_beyond_what_mpiexec_forwards(tmp_path):
    """Issue 26, case 2: `cat corpus | charrnn train - --workers 2` died beyond ~300 KB."""
    _mpi()
    with open(os.path.join(ROOT, "corpora", "markov.txt"), "rb") as f:
        text = f.read()
    big = text * 4  # 1.2 MB
    out = tmp_path / "run"
    res = sh(["train", "-", "--workers", "2", "--steps", "3", "--out", str(out), *TINY], input=big, timeout=300)
    assert_manners(res)
    meta = json.loads((out / "tokens.json").read_text())
    assert meta["chars"] == len(big.decode("utf-8")) and meta["sha256"] == json.loads(
        str(np.load(out / "last.npz")["meta"][()]))["corpus"]["sha256"]
    assert json.loads(str(np.load(out / "last.npz")["meta"][()]))["corpus"]["paths"] == ["-"]


def test_workers_read_a_fifo_once(tmp_path):
    _mpi()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with open(os.path.join(ROOT, "corpora", "markov.txt"), "rb") as f:
        text = f.read()[:100000]

    def feed():
        with open(fifo, "wb") as w:
            w.write(text)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    res = sh(["train", str(fifo), "--workers", "2", "--steps", "3", "--out", str(tmp_path / "run"), *TINY],
             timeout=300)
    assert_manners(res)
    assert json.loads((tmp_path / "run" / "tokens.json").read_text())["chars"] == len(text)


def test_workers_spool_within_max_input(tmp_path):
    _mpi()
    res = sh(["train", "-", "--workers", "2", "--steps", "3", "--max-input", "64K", "--out", str(tmp_path / "r"),
              *TINY], input=b"abc\n" * 50000, timeout=120)
    assert_manners(res, (1,))
    assert b"--max-input" in res.stderr and not (tmp_path / "r").exists()


# ================================================================ 3. bounded inputs
def test_an_endless_prime_stops_at_its_limit_quickly(wide_run):
    """Issue 26, case 3: `yes | charrnn sample --prime-file -` grew to 4.3 GB, then named
    --max-input, which sample lacks."""
    t0 = time.monotonic()
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        res = subprocess.run([sys.executable, "-m", "charrnn", "sample", "--model", wide_run, "--prime-file", "-",
                              "--length", "20"], stdin=yes.stdout, capture_output=True, timeout=60)
    finally:
        yes.kill()
        yes.wait()
    assert_manners(res, (1,))
    err = res.stderr.decode()
    assert "--max-input" not in err and "1M" in err and time.monotonic() - t0 < 30
    assert "1M bytes" in sh(["sample", "--help"]).stdout.decode()


def test_a_prime_file_at_the_limit_is_accepted(wide_run, tmp_path):
    from charrnn.config import PRIME_MAX_BYTES

    p = tmp_path / "prime.txt"
    p.write_text("a" * (PRIME_MAX_BYTES + 1))
    res = run(["sample", "--model", wide_run, "--prime-file", str(p), "--length", "1"])
    assert res.exit_code == 1 and "1M" in res.output


def test_impossible_sizes_are_refused_before_any_work(wide_corpus, tmp_path):
    """Issue 26, case 5: --layers 1000000 took 42 s and 1 GB before its usage error; --help said x>=1."""
    t0 = time.monotonic()
    res = run(["train", wide_corpus, "--layers", "1000000", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "1<=x<=256" in res.output and time.monotonic() - t0 < 5
    res = run(["train", wide_corpus, "--batch", str(2**20 + 1), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "1<=x<=1048576" in res.output
    t0 = time.monotonic()  # a model too large for any checkpoint, refused before the corpus is read
    res = run(["train", "/dev/zero", "--layers", "256", "--hidden", "65536", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "at most" in res.output and time.monotonic() - t0 < 5
    assert not (tmp_path / "x").exists()
    helptext = run(["train", "--help"]).output
    assert "1<=x<=256" in helptext and "1<=x<=1048576" in helptext


def test_a_single_document_longer_than_the_limit_is_refused(tmp_path, monkeypatch):
    """Issue 26, case 5: the check counted only the text carried across read chunks, so a document
    that ended just after a chunk's start got through (17 Mi characters with --docs line)."""
    monkeypatch.setattr(data_mod.documents, "MAX_DOCUMENT_CHARS", 1000)
    p = tmp_path / "c.txt"
    p.write_text("x" * 1200 + "\nshort\n", encoding="utf-8")  # 800 carried, then 400 more and a newline
    with pytest.raises(DataError, match="a document of more than 1,000 characters"):
        data_mod.read_corpus([str(p)], docs="line", chunk_bytes=800)
    p.write_text("x" * 1200 + "\n\nshort\n", encoding="utf-8")
    with pytest.raises(DataError, match="a document of more than 1,000 characters"):
        data_mod.read_corpus([str(p)], docs="blank", chunk_bytes=800)
    p.write_text(("y" * 900 + "\n") * 5, encoding="utf-8")  # under the limit, across chunk ends: fine
    c = data_mod.read_corpus([str(p)], docs="line", chunk_bytes=800)
    assert c.doc_count == 5
    c.close()


def test_a_17_mi_character_document_is_refused_by_the_command(tmp_path):
    p = tmp_path / "one.txt"
    with open(p, "wb") as f:
        f.write(b"ab" * (17 * 2**20 // 2) + b"\n")
    res = run(["train", str(p), "--docs", "line", "--out", str(tmp_path / "r"), "--steps", "1", *TINY])
    assert res.exit_code == 1 and "16,777,216" in res.output and not (tmp_path / "r").exists()


# ================================================================ 4. the files of a run directory
def test_a_token_file_damaged_in_range_is_rebuilt_and_said(wide_corpus, tmp_path):
    """Issue 26, case 4: tokens.npy damaged with ids still in range was trained on as it was."""
    out = _fresh_run(wide_corpus, tmp_path / "r")
    path = os.path.join(out, "tokens.npy")
    good = open(path, "rb").read()
    a = np.load(path, mmap_mode="r+")
    a[100:5000] = 5
    a.flush()
    del a
    res = sh(["train", "--resume", out, "--steps", "9"])
    assert_manners(res)
    assert b"rebuilding" in res.stderr and b"checksum" in res.stderr
    assert open(path, "rb").read() == good
    res = sh(["train", "--resume", out, "--steps", "12"])  # intact now: used as it is, nothing said
    assert_manners(res)
    assert b"rebuilding" not in res.stderr


def test_a_token_file_without_a_checksum_is_rebuilt(wide_corpus, tmp_path):
    out = _fresh_run(wide_corpus, tmp_path / "r")
    meta_path = os.path.join(out, "tokens.json")
    meta = json.load(open(meta_path))
    del meta["ids_sha256"]
    json.dump(meta, open(meta_path, "w"))
    res = sh(["train", "--resume", out, "--steps", "9"])
    assert_manners(res)
    assert b"no checksum" in res.stderr and "ids_sha256" in json.load(open(meta_path))


def test_a_partial_last_line_of_metrics_does_not_swallow_the_next_record(wide_corpus, tmp_path):
    """Issue 26, case 4: the next record was glued onto a partial last line, lost to every reader."""
    out = _fresh_run(wide_corpus, tmp_path / "r")
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "val_lo')  # what a crash or a full disk leaves
    assert run(["train", "--resume", out, "--steps", "9", "-q"]).exit_code == 0
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert lines[-2] == '{"step": 7, "val_lo'
    assert json.loads(lines[-1])["step"] == 9
    res = run(["info", out, "--json"])
    assert res.exit_code == 0
    metrics = json.loads(res.output.splitlines()[-1])["metrics"]
    assert metrics["skipped"] == 1 and metrics["points"][-1]["step"] == 9


def test_another_runs_last_checkpoint_is_refused(wide_corpus, tmp_path):
    """Issue 26, case 4: a 2x64 run's last.npz copied into a 2x32 run was resumed without a word."""
    a = _fresh_run(wide_corpus, tmp_path / "a")
    b = _fresh_run(wide_corpus, tmp_path / "b", extra=["--hidden", "24"])
    shutil.copy(os.path.join(b, "last.npz"), os.path.join(a, "last.npz"))
    before = open(os.path.join(a, "metrics.jsonl")).read()
    res = run(["train", "--resume", a, "--steps", "9"])
    assert res.exit_code == 1 and "belongs to run" in res.output and "copied or moved" in res.output
    assert open(os.path.join(a, "metrics.jsonl")).read() == before


def test_runs_from_before_identities_are_checked_against_their_best_checkpoint(wide_corpus, tmp_path):
    a = _fresh_run(wide_corpus, tmp_path / "a")
    b = _fresh_run(wide_corpus, tmp_path / "b", extra=["--hidden", "24"])
    for d in (a, b):  # as an older charrnn left them: no run.json, no run_id in the checkpoints
        os.remove(os.path.join(d, "run.json"))
        for name in ("last.npz", "best.npz"):
            p = os.path.join(d, name)
            hostile.with_meta(p, p + ".x", {"run_id": None})
            os.replace(p + ".x", p)
    shutil.copy(os.path.join(a, "last.npz"), tmp_path / "a_last.npz")
    shutil.copy(os.path.join(b, "last.npz"), os.path.join(a, "last.npz"))
    res = run(["train", "--resume", a, "--steps", "9"])
    assert res.exit_code == 1 and "different runs" in res.output
    shutil.copy(tmp_path / "a_last.npz", os.path.join(a, "last.npz"))
    assert run(["train", "--resume", a, "--steps", "9", "-q"]).exit_code == 0
    run_id = json.load(open(os.path.join(a, "run.json")))["run_id"]  # given one with its first save
    assert json.loads(str(np.load(os.path.join(a, "last.npz"))["meta"][()]))["run_id"] == run_id
    # a lost run.json with checkpoints that carry the id: their best.npz vouches, run.json comes back
    os.remove(os.path.join(a, "run.json"))
    assert run(["train", "--resume", a, "--steps", "12", "-q"]).exit_code == 0
    assert json.load(open(os.path.join(a, "run.json")))["run_id"] == run_id


@pytest.mark.parametrize("name", ["metrics.jsonl", "tokens.json", "tokens.npy", "run.json"])
def test_a_fifo_in_a_run_directory_never_blocks_resume(wide_corpus, tmp_path, name):
    out = _fresh_run(wide_corpus, tmp_path / "r")
    os.remove(os.path.join(out, name))
    os.mkfifo(os.path.join(out, name))
    res = sh(["train", "--resume", out, "--steps", "9"], timeout=60)  # main blocked here for ever
    if name.startswith("tokens"):
        assert_manners(res)  # derived files: rebuilt, and said
        assert b"rebuilding" in res.stderr
    else:
        assert_manners(res, (1,))
        assert b"FIFO" in res.stderr


def test_a_metrics_log_that_is_a_link_is_not_written_through(wide_corpus, tmp_path):
    out = _fresh_run(wide_corpus, tmp_path / "r")
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    os.remove(os.path.join(out, "metrics.jsonl"))
    os.symlink(target, os.path.join(out, "metrics.jsonl"))
    res = run(["train", "--resume", out, "--steps", "9"])
    assert res.exit_code == 1 and "symbolic link" in res.output
    assert target.read_text() == "precious\n"


def test_resume_asks_for_room_for_one_checkpoint_not_three(wide_corpus, tmp_path, monkeypatch):
    """Issue 26, case 6: after a full disk, resume asked for three times last.npz, in whole MiB."""
    out = _fresh_run(wide_corpus, tmp_path / "r")
    size = os.path.getsize(os.path.join(out, "last.npz"))
    import charrnn.setup as setup_mod

    usage = shutil.disk_usage(out)
    monkeypatch.setattr(setup_mod.shutil, "disk_usage", lambda p: usage._replace(free=int(size * 1.5)))
    assert run(["train", "--resume", out, "--steps", "9", "-q"]).exit_code == 0
    monkeypatch.setattr(setup_mod.shutil, "disk_usage", lambda p: usage._replace(free=size // 2))
    res = run(["train", "--resume", out, "--steps", "12"])
    assert res.exit_code == 1
    free, need = f"{size / 2 / 1024:.1f} KiB", f"{size / 1024:.1f} KiB"
    assert f"{free} free, checkpoints need about {need}" in res.output and free != need


# ================================================================ 5. options ignored or refused late
def test_resume_with_out_is_refused(wide_corpus, tmp_path):
    """Issue 26, case 5: --resume DIR --out OTHER exited 0, wrote into DIR and ignored --out."""
    out = _fresh_run(wide_corpus, tmp_path / "r")
    before = os.path.getmtime(os.path.join(out, "last.npz"))
    res = run(["train", "--resume", out, "--out", str(tmp_path / "other"), "--steps", "9"])
    assert res.exit_code == 2 and "--out" in res.output
    assert not (tmp_path / "other").exists() and os.path.getmtime(os.path.join(out, "last.npz")) == before


def test_resuming_a_live_run_does_not_suggest_another_out(wide_corpus, tmp_path):
    from charrnn.rundir import RunDir

    out = _fresh_run(wide_corpus, tmp_path / "r")
    held = RunDir.lock(out)  # another open file description: the lock conflicts, as another process's
    try:
        res = run(["train", "--resume", out, "--steps", "9"])
    finally:
        held.release()
    assert res.exit_code == 1 and "in use" in res.output and "--out" not in res.output


# ================================================================ 6. messages that point the right way
def test_install_hints_name_what_works_here():
    """Issue 26, case 6: `pip install 'charrnn-cli[plot]'` named a distribution not published."""
    import tomllib

    from charrnn import DISTRIBUTION, info, parallel

    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    for hint, extra in ((info.PLOT_HINT, "plot"), (parallel.INSTALL_HINT, "mpi")):
        words = shlex.split(hint)
        assert DISTRIBUTION not in hint and words[:4] == [sys.executable, "-m", "pip", "install"]
        assert words[4:] == extras[extra]


def test_printed_commands_are_shell_safe(wide_corpus, tmp_path):
    out = tmp_path / "a b;touch pwned"
    res = sh(["train", wide_corpus, "--out", str(out), "--steps", "2", *TINY[:-1]], cwd=tmp_path)
    assert_manners(res)
    line = [ln for ln in res.stderr.decode().splitlines() if ln.startswith("sample from it:")][0]
    assert shlex.split(line.split(":", 1)[1]) == ["charrnn", "sample", "--model", str(out)]
    res = run(["train", wide_corpus, "--out", str(out), "--steps", "2", *TINY])
    assert res.exit_code == 2
    hint = res.output.split("continue it with ")[1].split(" or choose")[0]
    assert shlex.split(hint) == ["--resume", str(out)]
    assert not (tmp_path / "pwned").exists()


# ================================================================ 7. broken streams: one policy
def test_a_full_stderr_never_stops_the_work(wide_run, wide_corpus, tmp_path):
    """Issue 26, case 7: `sample 2>/dev/full >out.txt` exited 1 with out.txt empty; train exited 1
    after saving everything. Diagnostics that cannot be written never stop the work."""
    full = open("/dev/full", "wb")
    try:
        res = subprocess.run([sys.executable, "-m", "charrnn", "sample", "--model", wide_run, "--length", "30",
                              "--seed", "1"], stdout=subprocess.PIPE, stderr=full, timeout=120)
        assert res.returncode == 0 and len(res.stdout.decode()) >= 30
        out = tmp_path / "r"
        res = subprocess.run([sys.executable, "-m", "charrnn", "train", wide_corpus, "--out", str(out), "--steps",
                              "3", *TINY[:-1]], stderr=full, timeout=120)
        assert res.returncode == 0 and (out / "best.npz").exists()
        res = subprocess.run([sys.executable, "-m", "charrnn", "sample", "--model", "/nonexistent"], stderr=full,
                             stdout=subprocess.PIPE, timeout=60)
        assert res.returncode == 1  # the work failed: its status says so though the message is lost
    finally:
        full.close()


def test_a_closed_stderr_gives_no_file_its_number(wide_corpus, tmp_path):
    out = tmp_path / "r"
    res = subprocess.run([sys.executable, "-m", "charrnn", "train", wide_corpus, "--out", str(out), "--steps", "3",
                          *TINY[:-1]], stderr=subprocess.DEVNULL, stdout=subprocess.PIPE, timeout=120,
                         preexec_fn=lambda: os.close(2))
    assert res.returncode == 0 and (out / "best.npz").exists()
    log = (out / "metrics.jsonl").read_text()
    assert all(json.loads(line) for line in log.splitlines())  # nothing meant for stderr landed in a file
    assert json.load(open(out / "run.json"))["format"] == "charrnn-run"


@pytest.mark.parametrize("how", ["closed", "full"])
def test_output_that_cannot_be_written_fails_the_same_way_for_every_command(wide_run, how):
    """--help >&- exited 0 while --help >/dev/full exited 1: requested output that cannot be
    written is a failure, exit status 1, however the stream is broken."""
    for args in (["--help"], ["sample", "--help"], ["--version"], ["info", wide_run],
                 ["sample", "--model", wide_run, "--length", "5"]):
        if how == "closed":
            res = subprocess.run([sys.executable, "-m", "charrnn", *args], stderr=subprocess.PIPE, timeout=120,
                                 preexec_fn=lambda: os.close(1))
        else:
            with open("/dev/full", "wb") as full:
                res = subprocess.run([sys.executable, "-m", "charrnn", *args], stdout=full, stderr=subprocess.PIPE,
                                     timeout=120)
        assert_manners(res, (1,))
        assert b"cannot write" in res.stderr, (args, res.stderr)


def test_a_reader_that_goes_away_still_ends_quietly(wide_run):
    p = subprocess.Popen([sys.executable, "-m", "charrnn", "sample", "--model", wide_run, "--length", "0", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 0 and err == b""


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


@pytest.mark.parametrize("victim", ["proxy", "mpiexec"])
def test_the_launcher_says_what_died(wide_corpus, tmp_path, victim):
    """Issue 26, case 6: killing the hydra_pmi_proxy of a 2-worker run let the workers train to the
    end of their budget, then blamed "a worker"; killing mpiexec was blamed on a worker too."""
    _mpi()
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "charrnn", "train", wide_corpus, "--workers", "2", "--steps",
                          "1000000", "--eval-every", "50", "--out", str(out), *TINY[:-1]],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.npz").exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert (out / "last.npz").exists()
        mpiexec = _children(p.pid)[0]
        target = mpiexec if victim == "mpiexec" else _children(mpiexec)[0]
        os.kill(target, signal.SIGKILL)
        t0 = time.monotonic()
        rc = p.wait(timeout=90)
        assert time.monotonic() - t0 < 30  # not the rest of a million steps
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read().decode()
    assert rc == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    who = "the process manager (hydra_pmi_proxy" if victim == "proxy" else "mpiexec (process"
    assert last.startswith(f"charrnn: error: {who}") and "worker" not in last.split(";")[0], last
    checkpoint.load(str(out / "last.npz"))  # intact


# ================================================================ found by trying (docs/robustness.md)
def test_an_error_is_one_line_whatever_a_file_name_holds(wide_run):
    res = sh(["eval", "a\nb\x1b[31m\u2028c", "--model", wide_run, "-q"])
    assert_manners(res, (1,))
    assert res.stderr.decode() == "charrnn: error: a\\nb\\x1b[31m\\u2028c: no such file\n"


def test_an_empty_token_file_is_rebuilt_not_aborted(wide_corpus, tmp_path):
    """Found by the fuzz test: np.load of an empty tokens.npy raises EOFError, which Click turned
    into a bare "Aborted!" with exit status 1 and no message."""
    out = _fresh_run(wide_corpus, tmp_path / "r")
    open(os.path.join(out, "tokens.npy"), "wb").close()
    res = sh(["train", "--resume", out, "--steps", "9"])
    assert_manners(res)
    assert b"rebuilding" in res.stderr and b"Aborted" not in res.stderr


def test_a_hostile_metrics_log_is_read_within_bounds(wide_corpus, tmp_path):
    """A line nested 50,000 deep ended `info` in a RecursionError traceback on main; a line that
    never ends (a file of zeros) was read whole into memory."""
    from charrnn import info

    out = _fresh_run(wide_corpus, tmp_path / "r")
    log = os.path.join(out, "metrics.jsonl")
    good = open(log).read()
    with open(log, "w") as f:
        f.write("[" * 50000 + "\n")
        f.write("0" * (info.MAX_METRICS_LINE * 3) + "\n")
        f.write(good)
    res = sh(["info", out, "--json"])
    assert_manners(res)
    card = json.loads(res.stdout)
    assert card["metrics"]["skipped"] == 2 and card["metrics"]["records"] == len(good.splitlines())
    assert b"not JSON" in res.stderr and b"longer than 65,536 bytes" in res.stderr


def test_a_lock_file_that_is_not_a_file_is_named(wide_corpus, tmp_path):
    out = _fresh_run(wide_corpus, tmp_path / "r")
    os.remove(os.path.join(out, ".lock"))
    os.mkdir(os.path.join(out, ".lock"))
    res = run(["train", "--resume", out, "--steps", "9"])
    assert res.exit_code == 1 and ".lock is a directory" in res.output


def test_samples_held_in_memory_are_bounded(wide_run):
    """Found by the fuzz test: `--format jsonl --length 18446744073709551616` (or --num 2, or
    --beam) held a sample that never ended in memory until the machine ran out."""
    from charrnn.config import SAMPLE_HELD_MAX

    for extra in (["--format", "jsonl"], ["--num", "2"], ["--beam", "2"]):
        t0 = time.monotonic()
        res = run(["sample", "--model", wide_run, "--length", str(2**64), *extra])
        assert res.exit_code == 2 and f"{SAMPLE_HELD_MAX:,}" in res.output and time.monotonic() - t0 < 10
    res = run(["sample", "--model", wide_run, "--length", str(SAMPLE_HELD_MAX // 4), "--num", "4", "--seed", "1",
               "--format", "jsonl", "--stop", "e", "-q"])  # at the bound: accepted (the stop ends it early)
    assert res.exit_code == 0 and len(res.output.splitlines()) == 4


def test_a_numba_setting_that_would_crash_its_import_is_a_usage_error(wide_run):
    for value in ("0", "-1"):
        res = sh(["sample", "--model", wide_run, "--length", "5"], env={"NUMBA_NUM_THREADS": value})
        assert_manners(res, (2,))
        assert b"NUMBA_NUM_THREADS" in res.stderr


def test_a_npy_header_left_open_is_a_corrupt_checkpoint(wide_run, tmp_path):
    """Found by the fuzz test: numpy tokenizes a .npy header, and one whose closing brace is gone
    ended every command that loads the checkpoint in a tokenize.TokenError traceback."""
    data = open(os.path.join(wide_run, "best.npz"), "rb").read()
    i = data.find(b"}", data.find(b"{'descr'"))
    bad = tmp_path / "open.npz"
    bad.write_bytes(data[: i - 1] + b"((" + data[i + 1 :])
    for args in (["sample", "--model", str(bad), "--length", "5"], ["info", str(bad)]):
        res = sh(args)
        assert_manners(res, (1,))
        assert b"corrupt or truncated checkpoint (bad .npy header)" in res.stderr


@pytest.mark.parametrize("encoding", ["undefined", "punycode"])
def test_a_codec_that_fails_without_a_decode_error_is_one_line(wide_run, tmp_path, encoding):
    """Found by trying every codec Python has on a few texts (847 cases): `--encoding undefined`
    and `--encoding punycode` raise a plain UnicodeError, which ended eval and train in a traceback."""
    p = tmp_path / "t.txt"
    p.write_bytes(b"hello world\n" * 10)
    res = sh(["eval", str(p), "--model", wide_run, "--encoding", encoding])
    assert_manners(res, (1,))
    assert f"cannot be decoded as {encoding}".encode() in res.stderr
    res = run(["train", str(p), "--encoding", encoding, "--out", str(tmp_path / "r"), "--steps", "1", *TINY])
    assert res.exit_code == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("size, why", [("1e400", "is not a finite size"), ("nan", "is not a finite size"),
                                       ("0.5", "at least 1 byte"), ("-3", "above 0")])
def test_a_size_that_cannot_be_a_limit_says_why(size, why):
    """`--max-input 1e400` said "a size must be above 0"; `--max-input 0.5` was a limit of 0 bytes
    whose error then suggested `--max-input 0`."""
    res = run(["eval", "x.txt", "--max-input", size])
    assert res.exit_code == 2 and why in res.output


def test_workers_with_a_full_stderr_train_and_succeed(wide_corpus, tmp_path):
    """The launcher relays the workers' output; a relay whose write failed used to die and leave
    the pipe undrained (the workers block once it fills). It drains and drops now."""
    _mpi()
    out = tmp_path / "r"
    with open("/dev/full", "wb") as full:
        res = subprocess.run([sys.executable, "-m", "charrnn", "train", wide_corpus, "--workers", "2", "--steps", "20",
                              "--eval-every", "5", "--out", str(out), *TINY[:-1]], stderr=full, timeout=300)
    assert res.returncode == 0 and (out / "best.npz").exists()


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, b"terminated"), (signal.SIGINT, 130, b"interrupted")])
def test_sample_says_it_was_stopped_and_exits_with_the_signals_status(wide_run, sig, code, word):
    """Found by sending random signals at random moments (24 tries, then 50): SIGTERM killed
    sample and eval silently (status -15 to a parent), and a SIGINT that came as the interpreter
    shut down ended it by SIGINT although its work was done."""
    p = subprocess.Popen([sys.executable, "-m", "charrnn", "sample", "--model", wide_run, "--length", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(200)  # sampling has begun
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code and err.strip().endswith(b"charrnn: " + word) and b"Traceback" not in err


def test_the_command_printed_after_an_interrupt_is_shell_safe(wide_corpus, tmp_path):
    out = tmp_path / "it's a run"
    p = subprocess.Popen([sys.executable, "-m", "charrnn", "train", wide_corpus, "--out", str(out), "--steps",
                          "1000000", *TINY], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "run.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1].decode()
    assert p.returncode == 130, err
    hint = err.split("(continue with: ")[1].rsplit(")", 1)[0]
    assert shlex.split(hint) == ["charrnn", "train", "--resume", str(out)]


@pytest.mark.parametrize("name", ["tokens.json.tmp", ".charrnn-write-test", "run.json.tmp"])
def test_a_fifo_under_a_temporary_files_name_never_blocks(wide_corpus, tmp_path, name):
    """Found by trying: the run's fixed-name temporary and probe files were opened for writing
    as they were, so a FIFO under one of those names blocked --resume for ever."""
    out = _fresh_run(wide_corpus, tmp_path / "r")
    os.remove(os.path.join(out, "tokens.json"))  # so that it is written again
    os.remove(os.path.join(out, "run.json"))
    os.mkfifo(os.path.join(out, name))
    res = sh(["train", "--resume", out, "--steps", "9", "-q"], timeout=60)
    assert_manners(res)
    assert not os.path.exists(os.path.join(out, name))  # replaced, used, and gone


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_a_new_run_never_adds_to_a_log_that_is_not_its_own(wide_corpus, tmp_path, kind):
    """Found by trying: --out a directory holding a metrics.jsonl and no checkpoint started a new
    run that appended its records to that log (or, for a FIFO, failed at its first validation)."""
    out = tmp_path / "r"
    out.mkdir()
    log = out / "metrics.jsonl"
    if kind == "fifo":
        os.mkfifo(log)
    else:
        log.write_text('{"step": 100, "val_loss": 1.0}\n')
    res = run(["train", wide_corpus, "--out", str(out), "--steps", "4", *TINY])
    assert res.exit_code == 2 and "metrics.jsonl exists" in res.output
    assert sorted(os.listdir(out)) == ["metrics.jsonl"]
