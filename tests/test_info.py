"""charrnn info: the model card of a checkpoint or run directory (text and --json), the loss curve as
text, the --plot figure and its optional extra, and bad input."""

import hashlib
import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn import DISTRIBUTION, checkpoint
from charrnn import info as card_info
from charrnn.cli import cli
from tests.common import ROOT, run

TINY = ["--layers", "1", "--hidden", "16", "--batch", "4", "--seq", "16", "--seq-warmup", "0", "--threads", "1", "-q"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sh(args, cwd=None):
    return subprocess.run([sys.executable, "-m", "charrnn", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("info_corpus")
    path = d / "words.txt"
    rng = np.random.default_rng(5)
    words = ["the", "cat", "sat", "on", "2", "mats;", "it", "ran", "home.", "9", "x+y", "café"]
    path.write_text("\n".join(" ".join(rng.choice(words, 7)) for _ in range(600)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    """A run of 30 steps validated every 10 (three records in metrics.jsonl)."""
    out = tmp_path_factory.mktemp("info_run") / "run"
    res = run(["train", str(corpus), "--out", str(out), "--steps", "30", "--eval-every", "10", "--lr", "0.01", *TINY])
    assert res.exit_code == 0, res.output
    return str(out)


def metrics_of(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------ the card
def test_card_of_a_run_shows_model_vocabulary_corpus_options_and_best(trained_run, corpus):
    res = sh(["info", trained_run])
    assert res.returncode == 0 and res.stderr == ""
    text = res.stdout
    assert "lstm, 1 layer x 16 units" in text
    with np.load(os.path.join(trained_run, "best.npz")) as z:  # the parameter count, counted here
        n_params = sum(z[k].size for k in z.files if k != "meta")
    assert f"parameters   {n_params:,}" in text
    chars = set(corpus.read_text(encoding="utf-8"))
    letters = sum(c.isalpha() for c in chars)
    digits = sum(c.isdigit() for c in chars)
    spaces = sum(c.isspace() for c in chars)
    assert f"{len(chars) + 3} tokens: {letters} letters, {digits} digits, {spaces} whitespace, 2 punctuation, 1 other" in text  # ; . and +
    assert "<START> <END> <UNK>" in text
    assert hashlib.sha256(corpus.read_bytes()).hexdigest() in text
    assert f"{len(corpus.read_text(encoding='utf-8')):,} characters" in text
    options = next(line for line in text.splitlines() if line.strip().startswith("options"))
    for given in ("--layers 1", "--hidden 16", "--steps 30", "--eval-every 10", "--lr 0.01"):
        assert given in options
    assert "--optimizer" not in options and "--clip " not in options  # defaults are left out
    assert "cell lstm" in next(line for line in text.splitlines() if line.strip().startswith("fitted"))
    best = min(metrics_of(trained_run), key=lambda r: r["val_loss"])
    assert (f"{best['val_loss']:.4f} nats/char ({best['val_loss'] / math.log(2):.4f} bits/char) "
            f"at step {best['step']}") in text
    assert "30 steps" in text
    assert "loss curve" in text and "nats/char" in text and "step" in text and "minutes" in text


def test_json_card_keys_and_values(trained_run):
    res = run(["info", trained_run, "--json"])
    assert res.exit_code == 0
    c = json.loads(res.output)
    assert {"path", "run", "model", "vocab", "corpus", "options", "training", "best", "metrics"} <= set(c)
    assert c["path"] == os.path.join(trained_run, "best.npz") and c["run"] == trained_run
    assert c["model"]["cell"] == "lstm" and c["model"]["layers"] == 1 and c["model"]["hidden"] == 16
    assert c["model"]["averaged_weights"] is False  # best.npz holds the average under the usual names
    assert c["model"]["weights"] == "the ema average of the weights (--average ema)"
    last = json.loads(run(["info", os.path.join(trained_run, "last.npz"), "--json"]).output)
    assert last["model"]["averaged_weights"] is True and last["model"]["weights"].startswith("raw (the ema average")
    recs = metrics_of(trained_run)
    best = min(recs, key=lambda r: r["val_loss"])
    assert c["best"]["val_loss"] == pytest.approx(best["val_loss"]) and c["best"]["step"] == best["step"]
    assert c["best"]["val_bits"] == pytest.approx(best["val_loss"] / math.log(2))
    assert c["training"]["step"] == 30 and c["training"]["seconds"] >= 0
    assert c["training"]["epochs"] == pytest.approx(recs[-1]["epoch"], abs=1e-3)  # as training counted them
    assert c["options"]["non_default"]["hidden"] == 16 and "optimizer" not in c["options"]["non_default"]
    assert c["options"]["given"]["cell"] is None and c["options"]["fitted"]["cell"] == "lstm"
    assert c["metrics"]["records"] == len(recs) == 3 and c["metrics"]["skipped"] == 0
    assert [p["step"] for p in c["metrics"]["points"]] == [10, 20, 30]
    meta = checkpoint.load(c["path"]).meta
    assert c["vocab"]["size"] == len(meta["vocab"]) and c["corpus"]["sha256"] == meta["corpus"]["sha256"]
    # a checkpoint file alone (here inside its run, so the curve comes along)
    c2 = json.loads(run(["info", os.path.join(trained_run, "last.npz"), "--json"]).output)
    assert c2["path"].endswith("last.npz") and c2["training"]["step"] == 30 and "metrics" in c2


def test_checkpoint_outside_a_run_has_no_curve(trained_run, tmp_path):
    lone = tmp_path / "model.npz"
    lone.write_bytes(open(os.path.join(trained_run, "best.npz"), "rb").read())
    res = run(["info", str(lone)])
    assert res.exit_code == 0 and "lstm, 1 layer x 16 units" in res.output and "loss curve" not in res.output
    c = json.loads(run(["info", str(lone), "--json"]).output)
    assert c["run"] is None and "metrics" not in c


def test_origin_and_vocab_from_are_shown_whatever_they_hold(trained_run, tmp_path):
    ck = checkpoint.load(os.path.join(trained_run, "best.npz"))
    meta = dict(ck.meta, origin={"init_from": "/models/shakespeare/best.npz", "sha256": "ab" * 32, "step": 5000},
                vocab_from="/models/shared-vocab.json")
    path = tmp_path / "tuned.npz"
    checkpoint.save(str(path), ck.model, ck.vocab, meta)
    text = run(["info", str(path)]).output
    assert "fine-tuned from" in text and "/models/shakespeare/best.npz" in text and "ab" * 32 in text
    assert "vocabulary from" in text and "/models/shared-vocab.json" in text
    c = json.loads(run(["info", str(path), "--json"]).output)
    assert c["origin"]["step"] == 5000 and c["vocab_from"] == "/models/shared-vocab.json"


def test_checkpoint_from_before_options_were_split(tmp_path):
    """A checkpoint whose meta holds only the combined options ("train") still gets a card."""
    text = run(["info", os.path.join(ROOT, "tests", "data", "pre_restructure_lstm.npz")]).output
    assert "lstm, 2 layers x 16 units, dropout 0.2" in text
    assert "--hidden 16" in text and "--steps 4" in text and "3.1368 nats/char" in text


def test_averaged_weights_are_noticed_from_the_archive(tmp_path):
    plain, averaged = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(plain, meta=np.array("{}"), **{"decoder.bias": np.zeros(3)})
    np.savez(averaged, meta=np.array("{}"), **{"decoder.bias": np.zeros(3), "avg.decoder.bias": np.zeros(3)})
    assert card_info._has_averaged_weights(str(plain)) is False
    assert card_info._has_averaged_weights(str(averaged)) is True


def test_vocab_summary_counts_each_kind():
    s = card_info.vocab_summary(["<START>", "<END>", "<UNK>", "\n", " ", "!", "+", "3", "A", "é", "٣", "\x07"])
    assert (s["letters"], s["digits"], s["whitespace"], s["punctuation"], s["other"]) == (2, 2, 2, 1, 2)
    assert s["specials"] == ["<START>", "<END>", "<UNK>"] and s["size"] == 12 and s["characters"] == 9


# ------------------------------------------------------------------------------ the text curve
def metrics(*records, skipped=()):
    return card_info.Metrics(path="m.jsonl", records=list(records), skipped=list(skipped))


def rec(step, val, train=None, elapsed=None):
    return {"step": step, "val_loss": val, "train_loss": train, "elapsed_s": elapsed}


def star_rows(lines):
    """The row of each column's '*' in the plot's grid, by column."""
    grid = [ln.split("|", 1)[1] for ln in lines if "|" in ln]
    return {x: r for r, row in enumerate(grid) for x, ch in enumerate(row) if ch == "*"}


def test_curve_with_no_points():
    assert "no losses recorded" in card_info.curve(metrics())[0]
    assert "no losses recorded" in card_info.curve(metrics(rec(10, None), rec(20, float("nan"))))[0]


def test_curve_with_one_point():
    lines = card_info.curve(metrics(rec(100, 2.5, elapsed=60)))
    assert list(star_rows(lines)) == [0] and any("one validation" in ln for ln in lines)
    assert any("2.500" in ln for ln in lines)


def test_curve_falls_from_left_to_right_and_labels_its_axes():
    recs = [rec(100 * i, 3.0 - 0.1 * i, 3.1 - 0.1 * i, 30.0 * i) for i in range(1, 21)]
    lines = card_info.curve(metrics(*recs), width=40, height=8)
    rows = star_rows(lines)
    assert rows[0] == 0 and rows[39] == 7  # highest loss at the top left, lowest at the bottom right
    cols = sorted(rows)
    assert all(rows[a] <= rows[b] for a, b in zip(cols, cols[1:]))  # never rising
    assert "3.000" in lines[1] and lines[8].strip().startswith("1.000")  # nats/char: training's max, the min
    assert any(ln.strip().startswith("step") and "100" in ln and "2,000" in ln for ln in lines)
    assert any(ln.strip().startswith("minutes") and " 0.5 " in ln and "10.0" in ln for ln in lines)
    assert all(len(ln) <= 9 + 1 + 40 for ln in lines[1:-2])


def test_curve_skips_missing_and_nan_values_and_handles_a_flat_curve():
    lines = card_info.curve(metrics(rec(1, 2.0), rec(2, None), rec(3, float("nan")), rec(4, 2.0)), width=10)
    assert sorted(star_rows(lines)) == [0, 9]
    assert len(set(star_rows(lines).values())) == 1  # flat: one row


def test_curve_without_validation_shows_training_loss():
    lines = card_info.curve(metrics(rec(1, None, 3.0), rec(2, None, 2.0)))
    assert "no validation losses" in lines[0] and not star_rows(lines)
    assert sum(ln.count(".") for ln in lines[1:-3]) >= 2


def test_corrupt_metrics_lines_are_skipped_with_a_note(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    os.mkdir(run_dir)
    for name in ("best.npz", "last.npz"):
        (run_dir / name).write_bytes(open(os.path.join(trained_run, name), "rb").read())
    good = open(os.path.join(trained_run, "metrics.jsonl")).read().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([good[0], "{not json", "[1, 2]", '{"step": "x"}', good[1],
                                                      '{"step": 25, "val_loss": NaN, "train_loss": null}',
                                                      good[2][: len(good[2]) // 2]]) + "\n")
    res = sh(["info", str(run_dir)])
    assert res.returncode == 0 and "loss curve" in res.stdout
    notes = res.stderr.strip().splitlines()
    assert len(notes) == 4 and "line 2 skipped (not JSON)" in notes[0] and "line 3" in notes[1]
    assert "1 more lines skipped" in notes[3]
    c = json.loads(sh(["info", str(run_dir), "--json", "-q"]).stdout)
    assert c["metrics"]["records"] == 3 and c["metrics"]["skipped"] == 4
    assert c["metrics"]["points"][2]["val_loss"] is None  # NaN written as null
    assert sh(["info", str(run_dir), "-q"]).stderr == ""


# ------------------------------------------------------------------------------ --plot
def test_plot_writes_a_png_that_reads_back(trained_run, tmp_path):
    mpl_image = pytest.importorskip("matplotlib.image")
    out = tmp_path / "curve.png"
    res = sh(["info", trained_run, "--plot", str(out)])
    assert res.returncode == 0, res.stderr
    assert "loss curve" in res.stdout and f"wrote {out}" in res.stderr
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    img = mpl_image.imread(str(out))
    assert img.ndim == 3 and img.shape[0] >= 400 and img.shape[1] >= 1000
    assert float(img[..., :3].std()) > 0.05  # not a blank page
    res = run(["info", trained_run, "--json", "--plot", str(tmp_path / "b.png")])
    assert res.exit_code == 0 and json.loads(res.output.splitlines()[-1])["model"]["hidden"] == 16


def test_plot_without_matplotlib_says_what_to_install(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # every `import matplotlib` now fails
    out = tmp_path / "curve.png"
    res = CliRunner().invoke(cli, ["info", trained_run, "--plot", str(out)])
    assert res.exit_code == 1 and not out.exists()
    # the command that works here, for this Python: the extra's distribution is not on the index
    hint = f"{shlex.quote(sys.executable)} -m pip install 'matplotlib>=3.6'"
    assert res.output.strip() == f"charrnn: error: --plot needs matplotlib, which is not installed: {hint}"
    assert DISTRIBUTION not in res.output


def test_plot_needs_a_run_and_a_known_format(trained_run, tmp_path):
    pytest.importorskip("matplotlib")
    lone = tmp_path / "model.npz"
    lone.write_bytes(open(os.path.join(trained_run, "best.npz"), "rb").read())
    res = sh(["info", str(lone), "--plot", str(tmp_path / "c.png")])
    assert res.returncode == 2 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
    assert "needs a run directory" in res.stderr
    res = sh(["info", trained_run, "--plot", str(tmp_path / "c.xyz")])
    assert res.returncode == 2 and ".png" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = sh(["info", trained_run, "--plot", str(tmp_path / "no" / "such" / "dir.png")])
    assert res.returncode == 1 and "cannot write" in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_one_line_errors(trained_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(open(os.path.join(trained_run, "best.npz"), "rb").read()[:1500])
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    cases = {str(tmp_path / "missing.npz"): "no such checkpoint", str(empty): "no best.npz or last.npz",
             str(text): "not a charrnn checkpoint", str(trunc): "corrupt", str(foreign): "not a charrnn checkpoint"}
    for path, why in cases.items():
        res = sh(["info", path])
        assert res.returncode == 1 and res.stdout == "", (path, res)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0] and "Traceback" not in res.stderr, (path, res.stderr)
    res = run(["info"])
    assert res.exit_code == 2  # MODEL|RUN is required


def test_help_has_an_example():
    res = run(["info", "--help"])
    assert res.exit_code == 0 and "Example: charrnn info" in res.output and "--plot" in res.output


def test_a_full_stdout_is_a_one_line_error(trained_run):
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "charrnn", "info", trained_run], stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip() == "charrnn: error: cannot write to stdout: No space left on device"
