"""`charrnn viz FILE`: what a model learned, as one self-contained HTML page (or `--ansi`, coloured
text for a terminal).

The page shows the text coloured by the model's surprisal at each character (-log2 p, bits), the
model's top guesses at a character on hover, tap or keyboard focus, and, for any hidden unit
(layer, index), the text coloured by that unit's activation after it read each character (an
LSTM's cell state tanh(c) by default, or h; a GRU's or RNN's h), with a
ranked list of units worth a look. Units are ranked by how well their activation follows a simple
feature of the text: the largest absolute Pearson correlation, over this text, with any of
    in quotes     inside a pair of double quotes (a " toggles it; a newline does not end it)
    in brackets   inside ( ), [ ] or { } (the nesting depth is above 0)
    line position characters since the last newline
    word start    a letter or digit that follows something else
(the features of Karpathy, Johnson and Fei-Fei's "Visualizing and understanding recurrent
networks", 2015, where single LSTM cells tracked quotes, brackets and line length).

Each character is one <span class="c ..." data-logprob="..."> (natural log, the number
`charrnn eval --per-char` gives), so tools and tests can read the page; in document mode each
<END> is a <span class="e"> marker. The page fetches nothing: style, script and data are inline.

Not here: the scoring itself (perchar.py), writing files (outfile.py).
"""

from __future__ import annotations

import base64
import html
import math
import string

import numpy as np

from charrnn import __version__
from charrnn.config import ACTIVATIONS
from charrnn.data import encode_stream
from charrnn.errors import DataError, UsageError
from charrnn.export_html import script_json
from charrnn.perchar import PerCharScorer, iter_positions
from charrnn.vocab import START_ID

MAX_CHARS = 20000  # characters one page shows: 20,000 spans open in well under a second
# activations kept in the page, one byte each: every unit while chars x units stays within this
# (8 MB, about 11 MB of base64 text, decoded only when a unit is picked); past it the best-ranked
# units that fit, and the page says so
MAX_ACTIVATION_BYTES = 8_000_000
RANKED = 30  # units in the ranked list
FEATURES = ("in quotes", "in brackets", "line position", "word start")
BUCKETS = 10  # surprisal colours: 0-1, 1-2, ... 9+ bits


class Analysis:
    """Everything the page shows about a text: positions (perchar.Position), hidden (N, L, H)
    float32 activations after each position's character, the ranked units."""

    def __init__(self, positions, hidden, score, ranked, chars, activation="h"):
        self.activation = activation  # "h" or "cell" (tanh(c))
        self.positions = positions
        self.hidden = hidden
        self.score = score
        self.ranked = ranked  # [(layer, unit, feature name, r)], best first
        self.chars = chars  # the characters of the text ("<END>" markers in document mode)


def analyse(model, vocab, text: str, docs: str | None = None, top: int = 5, max_chars: int = MAX_CHARS,
            activation: str | None = None) -> Analysis:
    """Score `text` and keep the activations: `activation` "cell" (an LSTM's tanh(c), the
    default for LSTMs: its units track counts such as brackets and line length more clearly than
    h, 0.65 against 0.56 for the best unit of the model in docs/inspect-and-export.md) or "h"."""
    activation = activation or ("cell" if model.cfg.cell == "lstm" else "h")
    if activation not in ACTIVATIONS:
        raise UsageError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
    if activation == "cell" and model.cfg.cell != "lstm":
        raise UsageError(f"--activation cell is the LSTM's cell state; a {model.cfg.cell.upper()} has only h")
    if len(text) > max_chars:
        raise DataError(f"text too long for a page: {len(text):,} characters, the limit is {max_chars:,} "
                        f"(give the first part, e.g. head -c {max_chars} FILE > part.txt)")
    scorer = PerCharScorer(model, vocab, top, keep_hidden=activation)
    positions = list(iter_positions(scorer, [text], docs))
    tokens = encode_stream(vocab, text, docs, unknown="unk", end=docs is not None)
    state = scorer.state  # Model.step's state after every input but the last token: read it too
    if len(tokens):
        model.step(tokens[-1:], state)
        scorer.hidden.append(scorer.hidden_now())
    after = np.array(scorer.hidden, dtype=np.float32)  # (tokens, L, H): state after reading token i
    targets = np.flatnonzero(tokens[1:] != START_ID) + 1  # the token index of each scored position
    hidden = after[targets] if len(targets) else np.zeros((0,) + after.shape[1:], np.float32)  # (N, L, H)
    chars = [p.char for p in positions]
    ranked = rank_units(hidden, features(chars))
    return Analysis(positions, hidden, scorer.score, ranked, chars, activation)


def features(chars) -> np.ndarray:
    """(N, 4) float64: FEATURES at each character, as the state after reading it sees them."""
    N = len(chars)
    f = np.zeros((N, len(FEATURES)))
    quote, depth, col, prev_word = False, 0, 0, False
    for i, ch in enumerate(chars):
        if ch == "<END>":  # a document ends: start afresh
            quote, depth, col, prev_word = False, 0, 0, False
            continue
        if ch == '"':
            quote = not quote
        if ch in "([{":
            depth += 1
        elif ch in ")]}" and depth > 0:
            depth -= 1
        col = 0 if ch == "\n" else col + 1
        word = ch.isalnum()
        f[i] = (quote, depth > 0, col, word and not prev_word)
        prev_word = word
    return f


def rank_units(hidden: np.ndarray, feats: np.ndarray, n: int = RANKED):
    """[(layer, unit, feature, r)] for the n units whose activation correlates best (|Pearson r|)
    with one of the features; features constant over the text are left out."""
    N = hidden.shape[0]
    if N < 3:
        return []
    A = hidden.reshape(N, -1).astype(np.float64)  # (N, L*H)
    A = A - A.mean(axis=0)
    F = feats - feats.mean(axis=0)
    a_norm = np.sqrt((A * A).sum(axis=0))
    f_norm = np.sqrt((F * F).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        R = (A.T @ F) / np.outer(a_norm, f_norm)  # (L*H, 4)
    R[~np.isfinite(R)] = 0.0
    best = np.abs(R).argmax(axis=1)
    strength = np.abs(R)[np.arange(len(R)), best]
    H = hidden.shape[2]
    out = []
    for u in np.argsort(-strength, kind="stable")[:n]:
        if strength[u] == 0:
            break
        out.append((int(u // H), int(u % H), FEATURES[best[u]], float(R[u, best[u]])))
    return out


def _bucket(logprob: float) -> int:
    bits = -logprob / math.log(2) if math.isfinite(logprob) else 99.0
    return min(BUCKETS - 1, max(0, int(bits)))


def _units_in_page(a: Analysis) -> list[int]:
    """Flat unit indices (layer * H + unit) whose activations the page carries: every unit within
    MAX_ACTIVATION_BYTES, else the ranked ones first and then in order, as many as fit."""
    N, L, H = a.hidden.shape
    fit = max(1, MAX_ACTIVATION_BYTES // max(N, 1))
    if L * H <= fit:
        return list(range(L * H))
    chosen = [l * H + u for l, u, _, _ in a.ranked]
    rest = [u for u in range(L * H) if u not in set(chosen)]
    return sorted((chosen + rest)[:fit])


def _activations(a: Analysis, units) -> dict:
    """unit -> [lo, hi, base64 of one byte per character]: activation = lo + q * (hi - lo) / 255."""
    N, L, H = a.hidden.shape
    flat = a.hidden.reshape(N, L * H)
    out = {}
    for u in units:
        col = flat[:, u].astype(np.float64)
        lo, hi = (float(col.min()), float(col.max())) if N else (0.0, 0.0)
        span = hi - lo if hi > lo else 1.0
        q = np.round((col - lo) / span * 255).astype(np.uint8)
        out[str(u)] = [lo, hi, base64.b64encode(q.tobytes()).decode("ascii")]
    return out


def page(model, a: Analysis, title: str) -> str:
    cfg = model.cfg
    N, L, H = a.hidden.shape
    spans = []
    for i, p in enumerate(a.positions):
        lp = f"{p.logprob:.6f}" if math.isfinite(p.logprob) else "-inf"
        if p.char == "<END>":
            spans.append(f'<span class="e s{_bucket(p.logprob)}" data-logprob="{lp}">\u23ce\n</span>')
        else:
            spans.append(f'<span class="c s{_bucket(p.logprob)}" data-logprob="{lp}">{html.escape(p.char)}</span>')
    units = _units_in_page(a)
    data = {"L": L, "H": H, "N": N, "guesses": [[p.rank, [[c, float(f"{q:.4g}")] for c, q in p.top]] for p in a.positions],
            "ranked": [list(r) for r in a.ranked], "units": _activations(a, units), "allUnits": len(units) == L * H}
    s = a.score
    shown = "the cell state tanh(c)" if a.activation == "cell" else "the hidden state h"
    card = (f"{cfg.cell.upper()} {L}x{H}; {s.tokens:,} characters, {s.bits:.3f} bits/char "
            f"({s.nats:.4f} nats); units show {shown}; charrnn {__version__}")
    note = "" if data["allUnits"] else (f" This page carries {len(units):,} of the {L * H:,} units (the ranked ones "
                                        f"first): a longer text leaves room for fewer.")
    return PAGE.substitute(title=html.escape(title), card=html.escape(card), text="".join(spans),
                           data=script_json(data), note=html.escape(note), maxlayer=L - 1, maxunit=H - 1,
                           script=SCRIPT, css=_CSS_BUCKETS + "\n" + _CSS_ACT, legend_s=_legend_s(),
                           legend_a=_legend_a())


def ansi(a: Analysis) -> str:
    """The text with each character's background coloured by its surprisal (24-bit colour)."""
    out = []
    for p in a.positions:
        r, g, b = COLOURS[_bucket(p.logprob)]
        ch = "\u23ce\n" if p.char == "<END>" else p.char
        if ch == "\n":
            out.append("\x1b[0m\n")
            continue
        out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{ch}")
    out.append("\x1b[0m\n")
    return "".join(out)


# surprisal 0..9+ bits: from white through yellow to red
COLOURS = [(255, 255, 255), (255, 247, 220), (255, 236, 179), (254, 217, 118), (254, 178, 76), (253, 141, 60),
           (252, 78, 42), (227, 26, 28), (189, 0, 38), (128, 0, 38)]
_CSS_BUCKETS = "\n".join(f".s{i} {{ background: rgb{c}; {'color: #fff;' if i >= 7 else ''} }}"
                         for i, c in enumerate(COLOURS))
# activation, low to high: blue, white, red (11 steps)
ACT = [(33, 102, 172), (67, 147, 195), (146, 197, 222), (209, 229, 240), (240, 244, 247), (255, 255, 255),
       (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43), (127, 0, 31)]
_CSS_ACT = "\n".join(f".a{i} {{ background: rgb{c}; {'color: #fff;' if i in (0, 1, 9, 10) else ''} }}"
                     for i, c in enumerate(ACT))

SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = id => document.getElementById(id);
const box = $("text"), info = $("info");
const spans = Array.from(box.children);
const surprisal = spans.map(s => s.className);  // the classes the page was written with
let unit = null, act = null, cur = -1;
function decode(u) {
  const e = D.units[u]; if (!e) return null;
  const s = atob(e[2]), a = new Float32Array(s.length), k = (e[1] - e[0]) / 255;
  for (let i = 0; i < s.length; i++) a[i] = e[0] + s.charCodeAt(i) * k;
  return a;
}
function showSurprisal() {
  unit = null; act = null;
  for (let i = 0; i < spans.length; i++) spans[i].className = surprisal[i];
  $("legend-s").hidden = false; $("legend-a").hidden = true; $("mode").textContent = "surprisal";
  mark();
}
function showUnit(layer, index) {
  const u = layer * D.H + index;
  if (!(layer >= 0 && layer < D.L && index >= 0 && index < D.H)) { $("unit-msg").textContent = "no such unit"; return; }
  const a = decode(u);
  if (!a) { $("unit-msg").textContent = "unit " + layer + ":" + index + " is not in this page"; return; }
  $("unit-msg").textContent = ""; unit = u; act = a;
  // colour by activation: 11 steps between the unit's extremes over this text (tanh units: -1..1)
  const e = D.units[u], lo = Math.min(e[0], -1e-9), hi = Math.max(e[1], 1e-9);
  for (let i = 0; i < spans.length; i++) {
    const v = a[i], t = v < 0 ? 5 - Math.round(5 * v / lo) : 5 + Math.round(5 * v / hi);
    spans[i].className = (spans[i].classList.contains("e") ? "e a" : "c a") + Math.max(0, Math.min(10, t));
  }
  $("legend-s").hidden = true; $("legend-a").hidden = false;
  $("mode").textContent = "unit " + layer + ":" + index + " (activation " + e[0].toFixed(2) + " to " + e[1].toFixed(2) + ")";
  $("layer").value = layer; $("index").value = index;
  mark();
}
function esc(c) { return c === "\n" ? "\u21b5" : c === " " ? "\u2423" : c === "\t" ? "\u21e5" : c; }
function describe(i) {
  if (i < 0 || i >= spans.length) return;
  const s = spans[i], lp = Number(s.dataset.logprob), g = D.guesses[i];
  const ch = s.classList.contains("e") ? "<END>" : s.textContent;
  let h = "<b>" + escHtml(esc(ch)) + "</b> at " + i + ": p = " + Math.exp(lp).toPrecision(3) +
          ", " + (-lp / Math.LN2).toFixed(2) + " bits, rank " + g[0];
  if (act) h += "; unit " + Math.floor(unit / D.H) + ":" + (unit % D.H) + " = " + act[i].toFixed(3);
  h += "<br>guesses: " + g[1].map(([c, p]) => "<code>" + escHtml(esc(c)) + "</code> " + (100 * p).toFixed(1) + "%").join(", ");
  info.innerHTML = h;
}
function escHtml(t) { return t.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
function mark() { if (cur >= 0) { spans[cur].classList.add("cur"); describe(cur); } }
function moveTo(i) {
  if (!spans.length) return;
  if (cur >= 0) spans[cur].classList.remove("cur");
  cur = Math.max(0, Math.min(spans.length - 1, i));
  mark(); spans[cur].scrollIntoView({block: "nearest"});
}
box.addEventListener("mouseover", e => { const i = spans.indexOf(e.target); if (i >= 0) describe(i); });
box.addEventListener("click", e => { const i = spans.indexOf(e.target); if (i >= 0) moveTo(i); });
box.addEventListener("keydown", e => {
  const step = {ArrowRight: 1, ArrowLeft: -1, ArrowDown: 60, ArrowUp: -60, PageDown: 600, PageUp: -600}[e.key];
  if (step) { moveTo(cur < 0 ? 0 : cur + step); e.preventDefault(); }
  else if (e.key === "Home") { moveTo(0); e.preventDefault(); }
  else if (e.key === "End") { moveTo(spans.length - 1); e.preventDefault(); }
});
box.addEventListener("focus", () => { if (cur < 0) moveTo(0); });
const list = $("ranked");
D.ranked.forEach(([l, u, f, r], k) => {
  const o = document.createElement("option");
  o.value = l + ":" + u; o.textContent = (k + 1) + ". unit " + l + ":" + u + " \u2014 " + f + " (r = " + r.toFixed(2) + ")";
  list.appendChild(o);
});
if (!D.ranked.length) { const o = document.createElement("option"); o.textContent = "(text too short to rank units)"; list.appendChild(o); }
list.addEventListener("change", () => { const [l, u] = list.value.split(":").map(Number); if (!isNaN(u)) showUnit(l, u); });
$("pick").addEventListener("submit", e => { e.preventDefault(); showUnit(Number($("layer").value), Number($("index").value)); });
$("surprisal").addEventListener("click", showSurprisal);
// ?unit=LAYER:INDEX opens the page coloured by that unit, ?pos=I with character I selected (links, scripts)
const params = new URLSearchParams(location.search), q = params.get("unit"), pos = params.get("pos");
if (q && /^\d+:\d+$/.test(q)) { const [l, u] = q.split(":").map(Number); showUnit(l, u); }
if (pos && /^\d+$/.test(pos)) moveTo(Number(pos));
document.body.dataset.readyMs = performance.now().toFixed(0);
"""

PAGE = string.Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>${title}</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; padding: .8em; max-width: 70em; color: #1b1b1b; background: #fafafa; }
h1 { font-size: 1.2em; margin: 0 0 .2em; }
.card, .how { color: #555; font-size: .85em; margin: .2em 0; }
.bar { display: flex; flex-wrap: wrap; gap: .5em; align-items: center; margin: .5em 0; }
select, input, button { font: inherit; padding: .25em .4em; border: 1px solid #999; border-radius: 4px; background: #fff; }
select { max-width: 100%; }
input[type=number] { width: 5em; }
button { background: #1f5fa8; color: #fff; border-color: #1f5fa8; cursor: pointer; }
:focus-visible { outline: 3px solid #f0a500; }
#text { white-space: pre-wrap; word-wrap: break-word; font: 14px/1.6 ui-monospace, SFMono-Regular, Menlo, monospace;
        background: #fff; border: 1px solid #ccc; border-radius: 4px; padding: .6em; }
#text span.cur { outline: 2px solid #000; }
.e { color: #888; }
#info { position: sticky; bottom: 0; background: #fffbe6; border: 1px solid #e0c97f; border-radius: 4px; padding: .4em .6em;
        min-height: 2.8em; font-size: .9em; margin-top: .5em; }
.legend span { display: inline-block; min-width: 1.8em; text-align: center; font-size: .75em; }
${css}
@media (max-width: 600px) { body { padding: .4em; } #text { font-size: 13px; } }
</style></head>
<body>
<h1>${title}</h1>
<div class="card">${card}</div>
<div class="bar" role="group" aria-label="Colouring">
<button id="surprisal" type="button">Surprisal</button>
<label>Ranked units <select id="ranked"><option value="">choose a unit\u2026</option></select></label>
<form id="pick" class="bar" style="margin:0">
<label>Layer <input id="layer" type="number" min="0" max="${maxlayer}" value="0"></label>
<label>Unit <input id="index" type="number" min="0" max="${maxunit}" value="0"></label>
<button type="submit">Show unit</button> <span id="unit-msg" role="status"></span>
</form>
</div>
<div class="how">Colouring: <b id="mode">surprisal</b>.
<span class="legend" id="legend-s">bits: ${legend_s}</span><span class="legend" id="legend-a" hidden>activation: low ${legend_a} high</span><br>
Units are ranked by the largest absolute correlation (Pearson r, over this text) between the unit's activation
after reading a character and one of: inside double quotes, inside brackets, position in the line, start of a word.${note}
Keys: focus the text (Tab), then arrows move character by character (up and down by 60), Home, End.</div>
<div id="text" tabindex="0" aria-label="the text, one element per character">${text}</div>
<div id="info" role="status" aria-live="polite">Hover, tap or move to a character to see the model's guesses.</div>
<script type="application/json" id="data">${data}</script>
<script>${script}</script>
</body></html>
""")


def _legend_s() -> str:
    return "".join(f'<span class="s{i}">{i}{"+" if i == BUCKETS - 1 else ""}</span>' for i in range(BUCKETS))


def _legend_a() -> str:
    return "".join(f'<span class="a{i}">&nbsp;</span>' for i in range(len(ACT)))
