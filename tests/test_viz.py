"""charrnn viz (charrnn/viz.py): the page in headless Chromium (no console errors, a screenshot
that is not blank, one element per character carrying the score `eval --per-char` gives, a unit
picked by query parameter recolours the text, 20,000 characters load fast), the unit ranking on
activations built to follow a feature, --ansi, and one-line errors."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn import viz
from charrnn.cli import cli
from tests import browser
from tests.inspect_helpers import TEXT, make_checkpoint

SPAN = re.compile(r'<span class="(c|e) ([as]\d+)[^"]*" data-logprob="([^"]+)">(.*?)</span>', re.S)


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def spans(dom):
    import html

    return [(kind, cls, float(lp), html.unescape(ch)) for kind, cls, lp, ch in SPAN.findall(dom)]


@pytest.fixture
def made(tmp_path):
    model = tmp_path / "m.npz"
    make_checkpoint(model, "lstm", hidden=16)
    f = tmp_path / "t.txt"
    f.write_text(TEXT * 2 + "<b>&amp; ünïcødé</b>\n")  # markup and non-ASCII must come through as text
    page = tmp_path / "page.html"
    res = run(["viz", str(f), "--model", str(model), "-o", str(page), "-q"])
    assert res.exit_code == 0, res.output
    return model, f, page


def test_page_holds_one_element_per_character_with_its_score(made):
    model, f, page = made
    dom, errors = browser.dump_dom(browser.file_url(page))
    assert errors == []
    got = spans(dom)
    text = f.read_text()
    assert len(got) == len(text) and all(k == "c" for k, *_ in got)
    assert "".join(ch for *_, ch in got) == text
    per_char = [json.loads(ln) for ln in run(["eval", str(f), "--model", str(model), "--per-char", "-q"]).stdout.splitlines()]
    assert [lp for _, _, lp, _ in got] == pytest.approx([d["logprob"] for d in per_char], abs=1e-6)
    assert int(re.search(r'data-ready-ms="(\d+)"', dom).group(1)) >= 0
    assert 'id="ranked"' in dom and dom.count("<option") > 1  # the ranked units are listed


def test_a_unit_recolours_the_text_and_a_screenshot_is_not_blank(made, tmp_path):
    _, _, page = made
    dom, errors = browser.dump_dom(browser.file_url(page, "unit=1:3"))
    assert errors == []
    classes = {cls for _, cls, _, _ in spans(dom)}
    assert classes and all(c.startswith("a") for c in classes) and len(classes) > 2
    assert "unit 1:3" in browser.element_text(dom, "mode")
    png = tmp_path / "shot.png"
    assert browser.screenshot(browser.file_url(page), str(png)) == []
    assert browser.distinct_colours(str(png)) > 20


def test_twenty_thousand_characters_load_fast(tmp_path):
    model = tmp_path / "m.npz"
    make_checkpoint(model, "gru", hidden=16)
    f = tmp_path / "long.txt"
    f.write_text((TEXT * 200)[: viz.MAX_CHARS])
    page = tmp_path / "page.html"
    assert run(["viz", str(f), "--model", str(model), "-o", str(page), "-q"]).exit_code == 0
    dom, errors = browser.dump_dom(browser.file_url(page), budget_ms=0)
    assert errors == [] and len(spans(dom)) == viz.MAX_CHARS
    # on a quiet machine about half a second; generous here, as CI shares its cores
    assert int(re.search(r'data-ready-ms="(\d+)"', dom).group(1)) < 5000


def test_ranking_finds_a_unit_built_to_follow_quotes():
    chars = list('a "bc" d (e) "fg" h\nij "k" l')
    feats = viz.features(chars)
    assert feats[:, 0].tolist()[:7] == [0, 0, 1, 1, 1, 0, 0]  # in quotes: the opening quote in, the closing out
    rng = np.random.default_rng(0)
    hidden = rng.normal(0, 0.1, (len(chars), 2, 8)).astype(np.float32)
    hidden[:, 1, 5] = feats[:, 0] * 0.9 - 0.4 + rng.normal(0, 0.01, len(chars))
    hidden[:, 0, 2] = -feats[:, 2] / 10  # line position, sign flipped
    ranked = viz.rank_units(hidden, feats)
    best = {r[:3]: r[3] for r in ranked[:2]}
    assert set(best) == {(1, 5, "in quotes"), (0, 2, "line position")}
    assert best[(1, 5, "in quotes")] > 0.99 and best[(0, 2, "line position")] < -0.99
    assert all(abs(r[3]) < 0.9 for r in ranked[2:])


def test_document_mode_marks_each_end(tmp_path):
    model = tmp_path / "m.npz"
    make_checkpoint(model, "rnn", docs="line")
    f = tmp_path / "d.txt"
    f.write_text("the cat\nsat on\n")
    page = tmp_path / "p.html"
    assert run(["viz", str(f), "--model", str(model), "-o", str(page), "-q"]).exit_code == 0
    kinds = [k for k, *_ in spans(page.read_text())]
    assert kinds == ["c"] * 7 + ["e"] + ["c"] * 6 + ["e"]


def test_ansi(made):
    model, f, _ = made
    res = run(["viz", str(f), "--model", str(model), "--ansi", "-q"])
    assert res.exit_code == 0 and "\x1b[48;2;" in res.stdout
    assert re.sub(r"\x1b\[[0-9;]*m", "", res.stdout) == f.read_text() + "\n"


def test_viz_errors_are_one_line(made, tmp_path):
    model, f, _ = made
    long = tmp_path / "long.txt"
    long.write_text("x" * (viz.MAX_CHARS + 1))
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\x00\x01\x02binary")
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"caf\xe9 au lait")
    cases = [
        ([str(long)], "limit is 20,000"),
        ([str(binary)], "binary"),
        ([str(bad_utf8)], "UTF-8"),
        ([str(f), "-o", str(tmp_path / "missing" / "p.html")], "no such directory"),
    ]
    for args, want in cases:
        res = CliRunner().invoke(cli, ["viz", *args, "--model", str(model), "-q"])
        assert res.exit_code == 1 and want in res.output and res.output.count("\n") == 1, (args, res.output)
    res = CliRunner().invoke(cli, ["viz", str(f), "--model", str(tmp_path / "nope.npz")])
    assert res.exit_code == 1 and "no such checkpoint" in res.output


def test_keyboard_moves_through_the_characters(made, tmp_path):
    """Keys sent to the text (focus, arrows, End, Home) move the selected character and show its
    guesses: a script appended to a copy of the page presses them in the browser."""
    _, f, page = made
    presses = """<script>
const t = document.getElementById("text"), keys = ["ArrowRight", "ArrowRight", "ArrowRight", "ArrowLeft"];
t.focus();
// a page without the window's focus (headless) may not fire the focus event for focus(): send it
// too (the page's handler selects the first character only when none is selected)
t.dispatchEvent(new FocusEvent("focus"));
const seen = [];
for (const k of keys.concat(["End", "ArrowLeft", "Home", "ArrowDown"])) {
  t.dispatchEvent(new KeyboardEvent("keydown", {key: k, bubbles: true}));
  seen.push(Array.from(t.children).findIndex(s => s.classList.contains("cur")));
}
document.body.dataset.seen = seen.join(",");
</script></body>"""
    driven = tmp_path / "driven.html"
    driven.write_text(page.read_text().replace("</body>", presses))
    dom, errors = browser.dump_dom(browser.file_url(driven))
    assert errors == []
    n = len(f.read_text())
    assert re.search(r'data-seen="([^"]+)"', dom).group(1) == f"1,2,3,2,{n - 1},{n - 2},0,60"
    assert "guesses:" in browser.element_text(dom, "info")


def test_pages_reach_for_nothing_outside(made, tmp_path):
    model, _, page = made
    sampler = tmp_path / "s.html"
    run(["export", str(model), "--format", "html", "-o", str(sampler), "-q"])
    for p in (page, sampler):
        text = p.read_text()
        assert not re.search(r"\s(src|href|action)=", text) and "http" not in text.lower().replace("http-equiv", "")
        assert "default-src 'none'" in text


@pytest.mark.parametrize("activation", ["cell", "h"])
def test_activations_are_the_state_after_each_character(tmp_path, activation):
    """An LSTM's units show tanh(c) by default, or h: the state after the character was read,
    taken here by stepping the model by hand."""
    m, v = make_checkpoint(tmp_path / "m.npz", "lstm", hidden=8)
    text = TEXT[:50]
    a = viz.analyse(m, v, text, activation=None if activation == "cell" else "h")
    assert a.activation == activation and a.hidden.shape == (len(text), 2, 8)
    state = m.new_state(1)
    m.step(np.array([0]), state)  # <START>
    for i, ch in enumerate(text):
        m.step(v.encode(ch), state)
        want = np.tanh(state.c[:, 0]) if activation == "cell" else state.h[:, 0]
        np.testing.assert_allclose(a.hidden[i], want, atol=1e-6)


def test_a_gru_has_no_cell_state(tmp_path):
    model = tmp_path / "m.npz"
    make_checkpoint(model, "gru")
    f = tmp_path / "t.txt"
    f.write_text("the cat")
    res = CliRunner().invoke(cli, ["viz", str(f), "--model", str(model), "--activation", "cell", "-q"])
    assert res.exit_code == 2 and "only h" in res.output


def test_viz_text_longer_than_it_reads_is_too_long(tmp_path):
    """viz reads at most 4 bytes a character of the limit (data.InputTooLarge past that): a longer
    text is one line naming the limit, not the reader's --max-input advice, which viz lacks."""
    model = tmp_path / "m.npz"
    make_checkpoint(model, "lstm", hidden=16)
    huge = tmp_path / "huge.txt"
    huge.write_text("x" * (4 * viz.MAX_CHARS + 5))
    res = CliRunner().invoke(cli, ["viz", str(huge), "--model", str(model), "-q"])
    assert res.exit_code == 1 and res.output == (
        f"charrnn: error: {huge}: text too long for a page: more than 20,000 characters, the limit is 20,000 "
        f"(show a part, e.g. head -c 20000 {huge} > part.txt)\n")
