"""charrnn export (charrnn/export_onnx.py, charrnn/export_html.py): the ONNX step graph against
charrnn's own step and against the float64 numpy reference (logits to 1e-5 for every cell), a
greedy continuation through onnxruntime and through the HTML page in headless Chromium, each
character for character what `charrnn sample --temp 0 --no-prime-echo` prints; one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn.cli import cli
from charrnn.vocab import END_ID, START_ID, UNK_ID
from tests import browser
from tests import reference as ref
from tests.inspect_helpers import make_checkpoint

CELLS = [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]
IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
PRIME = 'She said "he'


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def cli_greedy(model, prime, length):
    res = run(["sample", "--model", str(model), "--temp", "0", "--no-prime-echo", "--prime", prime,
               "--length", str(length), "-q"])
    assert res.exit_code == 0, res.output
    return res.stdout.rstrip("\n")


def onnx_session(tmp_path, model):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    res = run(["export", str(model), "--format", "onnx", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("cell,nonlin", CELLS, ids=IDS)
def test_onnx_logits_match_charrnn_and_the_numpy_reference(tmp_path, cell, nonlin):
    m, v = make_checkpoint(tmp_path / "m.npz", cell, layers=2, hidden=24, nonlinearity=nonlin, scale=1.0)
    sess = onnx_session(tmp_path, tmp_path / "m.npz")
    names = [i.name for i in sess.get_inputs()]
    assert names == (["token", "h0", "c0"] if cell == "lstm" else ["token", "h0"])
    assert [o.name for o in sess.get_outputs()] == (["logits", "h1", "c1"] if cell == "lstm" else ["logits", "h1"])
    B = 3
    rng = np.random.default_rng(1)
    state = m.new_state(B)
    state.h[:] = rng.normal(0, 0.5, state.h.shape)
    if cell == "lstm":
        state.c[:] = rng.normal(0, 0.5, state.c.shape)
    h, c = state.h.copy(), state.c.copy()
    params = {k: a.astype(np.float64) for k, a in m.params.items()}
    for t in range(12):
        tok = rng.integers(0, v.size, B)
        feeds = {"token": tok.astype(np.int64), "h0": h}
        if cell == "lstm":
            feeds["c0"] = c
        # the reference: one step of the float64 numpy forward from the same state
        _, ref_logits, ref_h, ref_c, _ = ref.forward(cell, params, tok[None], tok[None], h.astype(np.float64),
                                                     c.astype(np.float64) if cell == "lstm" else None,
                                                     nonlinearity=nonlin)
        out = sess.run(None, feeds)
        mine = m.step(tok, state)
        assert out[0].shape == (B, v.size) and out[0].dtype == np.float32
        np.testing.assert_allclose(out[0], mine, rtol=0, atol=1e-5)
        np.testing.assert_allclose(out[0], ref_logits[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(out[1], ref_h, rtol=0, atol=1e-5)
        h = out[1]
        if cell == "lstm":
            np.testing.assert_allclose(out[2], ref_c, rtol=0, atol=1e-5)
            c = out[2]


@pytest.mark.parametrize("cell,nonlin", CELLS, ids=IDS)
def test_onnx_greedy_continuation_is_charrnns(tmp_path, cell, nonlin):
    model = tmp_path / "m.npz"
    make_checkpoint(model, cell, nonlinearity=nonlin, seed=3)
    sess = onnx_session(tmp_path, model)
    meta = sess.get_modelmeta().custom_metadata_map
    vocab = json.loads(meta["charrnn.vocab"])
    ids = {t: i for i, t in enumerate(vocab)}
    L, H = int(meta["charrnn.layers"]), int(meta["charrnn.hidden"])
    state = {"h0": np.zeros((L, 1, H), np.float32)}
    if cell == "lstm":
        state["c0"] = np.zeros((L, 1, H), np.float32)
    text, tok = [], START_ID
    for ch in list(PRIME) + [None] * 120:
        logits, *new = sess.run(None, {"token": np.array([tok], np.int64), **state})
        state = dict(zip(state, new))
        if ch is not None:
            tok = ids[ch]
            continue
        logits[0, [START_ID, END_ID, UNK_ID]] = -np.inf  # a stream model never writes these
        tok = int(np.argmax(logits[0]))
        text.append(vocab[tok])
    assert "".join(text) == cli_greedy(model, PRIME, 120)


@pytest.mark.parametrize("cell,nonlin", CELLS, ids=IDS)
def test_html_sampler_greedy_continuation_is_charrnns(tmp_path, cell, nonlin):
    model = tmp_path / "m.npz"
    make_checkpoint(model, cell, nonlinearity=nonlin, seed=3)
    page = tmp_path / "sampler.html"
    res = run(["export", str(model), "--format", "html", "-o", str(page), "-q"])
    assert res.exit_code == 0, res.output
    from urllib.parse import quote

    dom, errors = browser.dump_dom(browser.file_url(page, f"prime={quote(PRIME)}&temp=0&length=150&autorun=1"))
    assert errors == []
    assert 'data-done="1"' in dom
    assert browser.element_text(dom, "output") == cli_greedy(model, PRIME, 150)


def test_html_sampler_documents_stop_at_end_and_seeds_repeat(tmp_path):
    """A document model's sample ends at <END>; at temp > 0 the same seed gives the same text."""
    model = tmp_path / "m.npz"
    make_checkpoint(model, "gru", docs="line", seed=5, scale=1.0)
    page = tmp_path / "sampler.html"
    run(["export", str(model), "--format", "html", "-o", str(page), "-q"])
    texts = []
    for seed in (7, 7, 8):
        dom, errors = browser.dump_dom(browser.file_url(page, f"temp=1&seed={seed}&length=400&autorun=1"))
        assert errors == [] and 'data-done="1"' in dom
        texts.append(browser.element_text(dom, "output"))
    assert texts[0] == texts[1] != texts[2]
    # near-uniform weights (scale 1) make <END> likely within 400 draws; a stopped sample is shorter
    assert any(len(t) < 400 for t in texts)


def test_html_sampler_screenshot_is_not_blank(tmp_path):
    model = tmp_path / "m.npz"
    make_checkpoint(model, "lstm")
    page = tmp_path / "sampler.html"
    run(["export", str(model), "--format", "html", "-o", str(page), "-q"])
    png = tmp_path / "shot.png"
    errors = browser.screenshot(browser.file_url(page, "prime=The&temp=0.5&length=300&autorun=1"), str(png))
    assert errors == []
    assert browser.distinct_colours(str(png)) > 20


def test_export_errors_are_one_line(tmp_path):
    model = tmp_path / "m.npz"
    make_checkpoint(model)
    hostile = tmp_path / "evil.npz"
    hostile.write_bytes(b"PK\x03\x04 not really a zip")
    cases = [
        (["export", str(tmp_path / "none.npz"), "--format", "html"], 1, "no such checkpoint"),
        (["export", str(hostile), "--format", "onnx", "-o", str(tmp_path / "x.onnx")], 1, "evil.npz"),
        (["export", str(model), "--format", "html", "-o", str(tmp_path / "no" / "dir.html")], 1, "no such directory"),
        (["export", str(model), "--format", "html", "-o", str(tmp_path)], 1, "is a directory"),
        (["export", str(model), "--format", "pdf"], 2, "pdf"),
    ]
    for args, code, want in cases:
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == code, (args, res.output)
        assert want in res.output and res.output.strip().count("\n") == (0 if code == 1 else res.output.strip().count("\n"))
    assert not os.path.exists(tmp_path / "x.onnx")


def test_export_to_stdout(tmp_path):
    model = tmp_path / "m.npz"
    make_checkpoint(model, "rnn")
    res = subprocess.run([sys.executable, "-m", "charrnn", "export", str(model), "--format", "html", "-q"],
                         capture_output=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith(b"<!DOCTYPE html>") and res.stderr == b""


def test_onnx_without_the_onnx_package_is_a_one_line_error(tmp_path, monkeypatch):
    model = tmp_path / "m.npz"
    make_checkpoint(model)
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    res = CliRunner().invoke(cli, ["export", str(model), "--format", "onnx", "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and "charrnn-cli[export]" in res.output


def test_the_docs_onnxruntime_sampler_runs(tmp_path):
    """docs/inspect-and-export.md's twenty lines of onnxruntime, run as printed (TEMP set to 0):
    the greedy text is charrnn's."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "inspect-and-export.md").read_text()
    code = re.search(r"<!-- onnx-sample -->\s*```python\n(.*?)\n```", doc, re.S).group(1)
    model = tmp_path / "m.npz"
    make_checkpoint(model, "gru", seed=6)
    onnx_session(tmp_path, model)  # writes tmp_path / "m.onnx"
    line = 'MODEL, PRIME, TEMP, LENGTH = "model.onnx", "def ", 0.8, 300'
    assert line in code
    code = code.replace(line, f'MODEL, PRIME, TEMP, LENGTH = {str(tmp_path / "m.onnx")!r}, {PRIME!r}, 0, 80')
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == PRIME + cli_greedy(model, PRIME, 80) + "\n"


def test_html_page_is_named_after_the_run_or_the_file(tmp_path):
    """A run's best.npz or last.npz (rundir.CHECKPOINTS) names the page after its run directory;
    any other checkpoint after its file."""
    import shutil

    make_checkpoint(tmp_path / "m.npz")
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    shutil.copy(tmp_path / "m.npz", run_dir / "last.npz")
    for model, name in ((tmp_path / "m.npz", "m.npz"), (run_dir, "my-run"), (run_dir / "last.npz", "my-run")):
        res = run(["export", str(model), "--format", "html", "-q"])
        assert res.exit_code == 0 and f"<title>charrnn sampler: {name}</title>" in res.stdout, res.output
