"""`charrnn export MODEL --format html`: one self-contained page that samples from the model in a
browser. The weights are inline (float32, base64), the LSTM / GRU / RNN step and the softmax are a
few dozen lines of script below, and nothing is fetched from the network.

The page computes in float64 (JavaScript's numbers) from the float32 weights, where charrnn
computes in float32: logits agree to about 1e-6, so a greedy continuation (temperature 0) is
charrnn's character for character unless two guesses tie to that precision. At a temperature
above 0 the page draws with its own seeded generator (mulberry32), so a seed repeats the page's
sample, not the command line's.

Query parameters, for scripts: prime, temp, seed, length, autorun=1 (generate at once). The text
generated (prime excluded) is written into the element with id "output"; when it is complete the
body gets data-done="1".

Not here: the model's maths in Python (model.py), the ONNX export (export_onnx.py).
"""

from __future__ import annotations

import base64
import html
import json

import numpy as np

from charrnn import __version__

MAX_LENGTH = 100000  # characters one click generates at most


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def script_json(obj) -> str:
    """JSON that can sit inside a <script> element: no "</" (which would end it) and no "<!--"."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def model_json(model, vocab, documents: bool) -> dict:
    cfg = model.cfg
    layers = []
    for k in range(cfg.layers):
        layers.append({n: _b64(model.params[f"rnn.{n}_l{k}"]) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
    return {"cell": cfg.cell, "nonlinearity": cfg.nonlinearity, "L": cfg.layers, "H": cfg.hidden, "V": cfg.vocab_size,
            "G": cfg.G, "vocab": list(vocab.tokens), "documents": documents, "layers": layers,
            "decoder_weight": _b64(model.params["decoder.weight"]), "decoder_bias": _b64(model.params["decoder.bias"])}


# The step: PyTorch's equations (DESIGN.md), gates i f g o (LSTM), r z n (GRU).
STEP_JS = r"""
function f64(b64) {
  const s = atob(b64), u = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
  return Float64Array.from(new Float32Array(u.buffer));
}
function makeNet(M) {
  const net = {cell: M.cell, relu: M.nonlinearity === "relu", L: M.L, H: M.H, V: M.V, G: M.G,
               layers: M.layers.map(p => ({Wih: f64(p.weight_ih), Whh: f64(p.weight_hh), bih: f64(p.bias_ih), bhh: f64(p.bias_hh)})),
               Dw: f64(M.decoder_weight), Db: f64(M.decoder_bias)};
  net.gi = new Float64Array(M.G * M.H); net.gh = new Float64Array(M.G * M.H);
  return net;
}
function zeroState(net) {
  const z = () => Array.from({length: net.L}, () => new Float64Array(net.H));
  return {h: z(), c: z()};
}
const sig = a => 1 / (1 + Math.exp(-a));
// One time step: reads token id `tok`, updates state S in place, returns the logits (V).
function step(net, S, tok) {
  const {H, V, G} = net, GH = G * H, gi = net.gi, gh = net.gh;
  let x = null;
  for (let k = 0; k < net.L; k++) {
    const P = net.layers[k], h = S.h[k], c = S.c[k];
    for (let r = 0; r < GH; r++) {
      let a = P.bih[r];
      if (k === 0) a += P.Wih[r * V + tok];  // the one-hot input selects a column
      else { const o = r * H; for (let j = 0; j < H; j++) a += P.Wih[o + j] * x[j]; }
      let b = P.bhh[r]; const o = r * H;
      for (let j = 0; j < H; j++) b += P.Whh[o + j] * h[j];
      gi[r] = a; gh[r] = b;
    }
    const hn = new Float64Array(H);
    for (let j = 0; j < H; j++) {
      if (net.cell === "lstm") {
        const i = sig(gi[j] + gh[j]), f = sig(gi[H + j] + gh[H + j]);
        const g = Math.tanh(gi[2 * H + j] + gh[2 * H + j]), o = sig(gi[3 * H + j] + gh[3 * H + j]);
        c[j] = f * c[j] + i * g; hn[j] = o * Math.tanh(c[j]);
      } else if (net.cell === "gru") {
        const r = sig(gi[j] + gh[j]), z = sig(gi[H + j] + gh[H + j]);
        const n = Math.tanh(gi[2 * H + j] + r * gh[2 * H + j]);
        hn[j] = (1 - z) * n + z * h[j];
      } else {
        const a = gi[j] + gh[j]; hn[j] = net.relu ? Math.max(a, 0) : Math.tanh(a);
      }
    }
    S.h[k] = hn; x = hn;
  }
  const logits = new Float64Array(V);
  for (let v = 0; v < V; v++) { let a = net.Db[v]; const o = v * H; for (let j = 0; j < H; j++) a += net.Dw[o + j] * x[j]; logits[v] = a; }
  return logits;
}
"""

SAMPLER_JS = r"""
const M = JSON.parse(document.getElementById("model").textContent);
const net = makeNet(M), ids = new Map(M.vocab.map((t, i) => [t, i]));
const START = 0, END = 1, UNK = 2;
function mulberry32(a) { return function () { a |= 0; a = a + 0x6D2B79F5 | 0; let t = Math.imul(a ^ a >>> 15, 1 | a);
  t = t + Math.imul(t ^ t >>> 7, 61 | t) ^ t; return ((t ^ t >>> 14) >>> 0) / 4294967296; }; }
// Draw the next token: argmax at temp 0 (the first of equal maxima), else softmax(logits / temp);
// <START> and <UNK> never, <END> only for a model trained on documents (it ends the sample).
function draw(logits, temp, rand) {
  const ok = v => v !== START && v !== UNK && (v !== END || M.documents);
  let best = -1;
  for (let v = 0; v < M.V; v++) if (ok(v) && (best < 0 || logits[v] > logits[best])) best = v;
  if (temp === 0) return best;
  let total = 0; const p = new Float64Array(M.V);
  for (let v = 0; v < M.V; v++) if (ok(v)) { p[v] = Math.exp((logits[v] - logits[best]) / temp); total += p[v]; }
  let u = rand() * total;
  for (let v = 0; v < M.V; v++) { if (!ok(v)) continue; u -= p[v]; if (u < 0) return v; }
  return best;
}
const $ = id => document.getElementById(id);
let job = 0;
function generate() {
  const prime = $("prime").value, temp = Math.max(0, Number($("temp").value) || 0);
  const length = Math.min(MAX_LENGTH, Math.max(1, Math.floor(Number($("length").value) || 1)));
  const seed = Math.floor(Number($("seed").value) || 0), rand = mulberry32(seed), me = ++job;
  const S = zeroState(net), out = $("output");
  out.textContent = ""; document.body.dataset.done = "0";
  let unknown = 0, logits = step(net, S, START);
  for (const ch of prime) { let id = ids.get(ch); if (id === undefined || id < 3) { id = UNK; unknown++; } logits = step(net, S, id); }
  $("status").textContent = unknown ? unknown + " character(s) of the prime are not in the model's vocabulary: read as <UNK>." : "";
  let n = 0, text = "";
  function chunk() {
    if (me !== job) return;
    const t0 = performance.now();
    while (n < length && performance.now() - t0 < 40) {
      const v = draw(logits, temp, rand);
      if (v === END) { n = length; break; }
      text += M.vocab[v]; n++;
      logits = step(net, S, v);
    }
    out.textContent = text;
    if (n < length) setTimeout(chunk, 0); else { document.body.dataset.done = "1"; $("status").textContent += " Done."; }
  }
  chunk();
}
const q = new URLSearchParams(location.search);
for (const k of ["prime", "temp", "seed", "length"]) if (q.has(k)) $(k).value = q.get(k);
$("go").addEventListener("click", generate);
$("form").addEventListener("submit", e => { e.preventDefault(); generate(); });
if (q.get("autorun") === "1") generate();
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font: 16px/1.45 system-ui, sans-serif; margin: 0 auto; padding: 1em; max-width: 60em; color: #1b1b1b; background: #fafafa; }}
h1 {{ font-size: 1.25em; margin: 0 0 .3em; }}
.card {{ color: #555; font-size: .9em; margin-bottom: 1em; }}
form {{ display: grid; gap: .6em; grid-template-columns: repeat(auto-fit, minmax(9em, 1fr)); align-items: end; }}
label {{ display: flex; flex-direction: column; font-size: .85em; color: #333; }}
textarea, input, button {{ font: inherit; padding: .35em .5em; border: 1px solid #999; border-radius: 4px; }}
textarea {{ grid-column: 1 / -1; min-height: 4em; font-family: ui-monospace, monospace; }}
button {{ background: #1f5fa8; color: #fff; border-color: #1f5fa8; cursor: pointer; }}
button:focus, input:focus, textarea:focus {{ outline: 3px solid #f0a500; }}
#output {{ white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, monospace; background: #fff;
          border: 1px solid #ccc; border-radius: 4px; padding: .75em; min-height: 8em; margin-top: 1em; }}
#status {{ font-size: .85em; color: #555; min-height: 1.2em; }}
</style></head>
<body>
<h1>{title}</h1>
<div class="card">{card}</div>
<form id="form">
<label style="grid-column: 1 / -1">Prime (text the model reads first)<textarea id="prime">{prime}</textarea></label>
<label>Temperature (0: greedy)<input id="temp" type="number" min="0" max="5" step="0.05" value="0.8"></label>
<label>Seed<input id="seed" type="number" min="0" step="1" value="1"></label>
<label>Length<input id="length" type="number" min="1" max="{max_length}" step="1" value="500"></label>
<button id="go" type="button">Generate</button>
</form>
<div id="status" role="status"></div>
<div id="output" aria-live="polite" tabindex="0"></div>
<script type="application/json" id="model">{model}</script>
<script>
const MAX_LENGTH = {max_length};
{step}
{sampler}
</script>
</body></html>
"""


def page(model, vocab, meta: dict, name: str) -> str:
    """The sampler page, as text."""
    cfg = model.cfg
    from charrnn.run import Recorded

    documents = Recorded(meta).docs is not None
    card = (f"{cfg.cell.upper()} {cfg.layers}x{cfg.hidden}, {vocab.size - 3} characters, "
            f"{model.n_params:,} parameters; exported by charrnn {__version__}. Runs in this page, offline.")
    return PAGE.format(title=html.escape(f"charrnn sampler: {name}"), card=html.escape(card), prime="",
                       max_length=MAX_LENGTH, model=script_json(model_json(model, vocab, documents)),
                       step=STEP_JS, sampler=SAMPLER_JS)
