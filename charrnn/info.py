"""The model card (`charrnn info`): what a checkpoint or a run directory holds, in words or as JSON,
with the run's loss curve (curve.py: as text, or a figure through matplotlib).

The card reads the checkpoint through checkpoint.load, so a corrupt, foreign or hostile file gets
the same one-line refusal as `sample` and `eval`. Everything else it shows comes from the meta
record and metrics.jsonl as written, and is read defensively: a record from an older or newer
charrnn may lack a key or hold one this version does not know, and the card shows what is there
rather than failing. Nothing here prints: the command line decides what goes to stdout and stderr.

Not here: the checkpoint format (checkpoint.py), what a run records (run.py), the options'
meanings (config.py).
"""

from __future__ import annotations

import json
import math
import os
import stat
import unicodedata
import zipfile
from dataclasses import dataclass, field, fields

from charrnn.curve import PLOT_HINT, curve, plot  # noqa: F401 - the card's curve and figure (cli, tests)
from charrnn.errors import CharrnnError
from charrnn.rundir import METRICS_FILE
from charrnn.run import Recorded

# metrics.jsonl as read: a run writes one line of ~200 bytes per validation (200,000 validations are
# 40 million steps at the least --eval-every); a hostile file is read no further than this
MAX_METRICS_LINE = 64 * 2**10
MAX_METRICS_RECORDS = 200_000
MAX_SHOWN_CHARS = 120  # the vocabulary's characters are listed in full up to this many


# ------------------------------------------------------------------------------ metrics.jsonl
@dataclass
class Metrics:
    """The records of a run's metrics.jsonl that could be read, and a note for each line that
    could not (not JSON, not an object, no whole-number step)."""

    path: str | None = None
    records: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (line number, why)

    def points(self, key: str) -> list[tuple[int, float, float | None]]:
        """(step, value, elapsed seconds) for every record whose `key` is a finite number: a run
        without a validation split writes val_loss null, and a diverged one may write NaN."""
        out = []
        for r in self.records:
            v = _finite(r.get(key))
            if v is not None:
                out.append((r["step"], v, _finite(r.get("elapsed_s"))))
        return out


def read_metrics(path: str) -> Metrics:
    """Read metrics.jsonl, skipping lines that cannot be read (a line cut short by a crash, or a
    hand edit) with a note each rather than refusing the whole file."""
    m = Metrics(path=path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CharrnnError(f"{path}: not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            for n, raw in enumerate(iter(lambda: f.readline(MAX_METRICS_LINE + 1), b""), 1):
                if len(raw) > MAX_METRICS_LINE:  # a line that never ends (a file of zeros): skipped, not held
                    m.skipped.append((n, f"longer than {MAX_METRICS_LINE:,} bytes"))
                    while raw and not raw.endswith(b"\n"):
                        raw = f.readline(MAX_METRICS_LINE + 1)
                    continue
                if len(m.records) >= MAX_METRICS_RECORDS:
                    m.skipped.append((n, f"beyond the first {MAX_METRICS_RECORDS:,} records, which are all read"))
                    break
                line = raw.decode("utf-8", "replace")
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError):
                    m.skipped.append((n, "not JSON"))
                    continue
                if not isinstance(rec, dict):
                    m.skipped.append((n, "not a JSON object"))
                elif type(rec.get("step")) is not int:
                    m.skipped.append((n, "no whole-number step"))
                else:
                    m.records.append(rec)
    except OSError as e:
        raise CharrnnError(f"{path}: cannot read: {e.strerror or e}") from None
    return m


# ------------------------------------------------------------------------------ finding the files
@dataclass
class Located:
    checkpoint: str  # the checkpoint the card describes
    run_dir: str | None  # the run directory, when there is one
    metrics: str | None  # its metrics.jsonl, when there is one
    last: str | None  # its last.npz, when that is not the checkpoint described


def locate(path: str) -> Located:
    """MODEL or RUN: a run directory means its best.npz (else last.npz), as for `sample`; a
    checkpoint inside a run directory (one that holds metrics.jsonl) brings its run along."""
    from charrnn import checkpoint

    ck_path, _ = checkpoint.resolve(path)
    run_dir = os.path.dirname(ck_path) or "."
    metrics = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isdir(path) and not os.path.isfile(metrics):
        return Located(ck_path, None, None, None)
    last = os.path.join(run_dir, "last.npz")
    if not os.path.isfile(last) or os.path.samefile(last, ck_path):
        last = None
    return Located(ck_path, path if os.path.isdir(path) else run_dir,
                   metrics if os.path.isfile(metrics) else None, last)


# ------------------------------------------------------------------------------ the card
def card(path: str, notes: list | None = None) -> dict:
    """The model card of a checkpoint or run directory as a JSON-ready dict. `notes` collects what
    the caller may want to say on stderr (skipped metrics lines, an unreadable last.npz)."""
    from charrnn import checkpoint

    notes = notes if notes is not None else []
    loc = locate(path)
    ck = checkpoint.load(loc.checkpoint)
    meta = ck.meta
    progress = meta  # the latest state of the run: last.npz's meta when the card is of best.npz
    if loc.last is not None:
        try:
            progress = checkpoint.load(loc.last).meta
        except CharrnnError as e:
            notes.append(f"training progress from {loc.checkpoint}, not last.npz: {e}")
    cfg = ck.model.cfg
    averaged = _has_averaged_weights(loc.checkpoint)
    out = {
        "path": loc.checkpoint,
        "run": loc.run_dir,
        "format_version": meta.get("version"),
        "charrnn_version": meta.get("charrnn_version"),
        "model": {
            "cell": cfg.cell,
            "nonlinearity": cfg.nonlinearity,
            "layers": cfg.layers,
            "hidden": cfg.hidden,
            "dropout": cfg.dropout,
            "parameters": int(ck.model.n_params),
            "averaged_weights": averaged,
            "weights": _weights_kind(averaged, meta),
        },
        "vocab": vocab_summary(ck.vocab.tokens),
        "corpus": Recorded(meta).corpus or None,
        "options": options(meta),
        "training": training(progress),
        "best": best(progress, meta),
    }
    out.update(Recorded(meta).lineage)  # fine-tuned runs and runs over a given vocabulary
    if loc.metrics is not None:
        m = read_metrics(loc.metrics)
        for n, why in m.skipped[:3]:
            notes.append(f"{m.path}: line {n} skipped ({why})")
        if len(m.skipped) > 3:
            notes.append(f"{m.path}: {len(m.skipped) - 3} more lines skipped")
        out["metrics"] = {
            "path": m.path,
            "records": len(m.records),
            "skipped": len(m.skipped),
            "points": [{k: r.get(k) for k in ("step", "epoch", "elapsed_s", "train_loss", "val_loss")}
                       for r in m.records],
        }
        out["_metrics"] = m  # for the terminal plot and the figure; dropped from the JSON
    return out


def to_json(c: dict) -> str:
    """The card as one JSON object (NaN written as null, so jq and strict parsers read it)."""
    return json.dumps(_no_nan({k: v for k, v in c.items() if not k.startswith("_")}), ensure_ascii=False)


def _weights_kind(has_avg_members: bool, meta: dict) -> str:
    """What the checkpoint's rnn.* / decoder.* weights are: a run with --average keeps the average
    as its best.npz (under those names) and the raw weights in last.npz, with the average beside
    them as avg.*."""
    kind = Recorded(meta).part("config").get("average")
    if has_avg_members:
        return f"raw (the {kind or ''} average beside them, avg.*)".replace("the  average", "the average")
    if kind in ("ema", "polyak"):
        return f"the {kind} average of the weights (--average {kind})"
    return "raw"


def _has_averaged_weights(path: str) -> bool:
    """Does the checkpoint hold averaged weights (members avg.*)? Read from the zip's directory,
    which checkpoint.load has already checked."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.startswith("avg.") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def vocab_summary(tokens) -> dict:
    """Counts of the vocabulary's characters by kind, and its special tokens (every token longer
    than one character: <START>, <END>, <UNK> today)."""
    chars = [t for t in tokens if len(t) == 1]
    kinds = {"letters": 0, "digits": 0, "whitespace": 0, "punctuation": 0, "other": 0}
    for ch in chars:
        kinds[_kind(ch)] += 1
    return {"size": len(tokens), "characters": len(chars), **kinds,
            "specials": [t for t in tokens if len(t) != 1], "chars": "".join(chars)}


def _kind(ch: str) -> str:
    if ch.isalpha():
        return "letters"
    if ch.isdigit():
        return "digits"
    if ch.isspace():
        return "whitespace"
    if unicodedata.category(ch).startswith("P"):
        return "punctuation"
    return "other"  # symbols (+ = $), marks, control characters


def options(meta: dict) -> dict:
    """The training options as given (None where left open), as fitted (what the run chose for
    those), and the given ones that differ from this version's defaults. A checkpoint written
    before the two were kept apart has only the combined record, shown as given."""
    from charrnn.config import DEFAULTS

    rec = Recorded(meta)
    given, fitted = rec.given, rec.fitted
    defaults = {f.name: getattr(DEFAULTS, f.name) for f in fields(DEFAULTS)}
    # an option this version does not know (from a newer charrnn) counts as given when it is set
    changed = {k: v for k, v in given.items()
               if (v != defaults[k] if k in defaults else (k != "dropout_fit" and v is not None))}
    return {"given": given, "fitted": fitted, "non_default": changed, "separate": rec.separate}


def training(meta: dict) -> dict:
    """Steps, epochs (fractional: steps over the batches an epoch holds), time and speed."""
    rec = Recorded(meta)
    run, train, data = rec.state, rec.combined, rec.part("data")
    step = rec.step
    epochs = None
    seq, stream_len = train.get("seq"), data.get("stream_len")
    if type(step) is int and type(seq) is int and type(stream_len) is int and seq > 0 and stream_len > 0:
        epochs = step / -(-stream_len // seq)
    opt = rec.part("optimizer")
    sched = rec.part("schedule")
    return {"step": step if type(step) is int else None,
            "epochs": epochs, "epochs_completed": rec.epoch,
            "seconds": _finite(run.get("elapsed")), "chars_per_s": _finite(run.get("chars_per_s")),
            "optimizer": opt.get("name"), "lr": _finite(_dict(opt, "hparams").get("lr")),
            "schedule": sched.get("kind"), "batch": train.get("batch"), "seq": seq}


def best(progress: dict, meta: dict) -> dict | None:
    """The best validation loss of the run and the step it was reached at (nats and bits/char)."""
    for rec in (Recorded(progress), Recorded(meta)):
        v = _finite(rec.best_val)
        if v is not None:
            step = rec.state.get("best_step")
            return {"val_loss": v, "val_bits": v / math.log(2), "step": step if type(step) is int else None}
    return None


# ------------------------------------------------------------------------------ the card as text
def render(c: dict) -> str:
    """The card in words: a few labelled sections, the curve at the end (when there is a run)."""
    lines = [f"charrnn model card: {c['path']}"]
    add = lambda label, text: lines.append(f"  {label:<12} {text}")  # noqa: E731
    if c["run"]:
        add("run", c["run"])
    lines.append("model")
    mo = c["model"]
    cell = mo["cell"] + (f" ({mo['nonlinearity']})" if mo["cell"] == "rnn" else "")
    add("cell", f"{cell}, {mo['layers']} layer{'s' * (mo['layers'] != 1)} x {mo['hidden']} units, "
        f"dropout {mo['dropout']:g}")
    add("parameters", f"{mo['parameters']:,}" + ("; averaged weights: yes" if mo["averaged_weights"] else ""))
    add("weights", mo["weights"])
    v = c["vocab"]
    add("vocabulary", f"{v['size']:,} tokens: {v['letters']:,} letters, {v['digits']:,} digits, "
        f"{v['whitespace']:,} whitespace, {v['punctuation']:,} punctuation, {v['other']:,} other")
    add("specials", " ".join(v["specials"]) or "none")
    add("characters", _show_chars(v["chars"]))
    lines.append("corpus")
    corpus = c["corpus"] or {}
    paths = corpus.get("paths")
    if isinstance(paths, list) and paths:
        add("files", ", ".join(str(p) for p in paths))
    if type(corpus.get("chars")) is int:
        add("size", f"{corpus['chars']:,} characters")
    if corpus.get("sha256"):
        add("sha256", corpus["sha256"])
    if corpus.get("docs"):
        add("documents", f"--docs {corpus['docs']}")
    if not corpus:
        add("", "(not recorded)")
    for key in ("origin", "vocab_from"):
        if key in c:
            lines.append({"origin": "fine-tuned from", "vocab_from": "vocabulary from"}[key])
            lines.extend(_show_generic(c[key]))
    lines.append("training")
    o = c["options"]
    add("options", _show_options(o["non_default"]) or "all defaults")
    chosen = _show_fitted(o)
    if chosen:
        add("fitted", chosen)
    if o["fitted"].get("precision") == "bf16":  # how the training step multiplied (charrnn/precision.py)
        add("products", "bf16: bfloat16 operands, float32 sums (the weights are float32)")
    t = c["training"]
    if t["step"] is not None:
        parts = [f"{t['step']:,} steps"]
        if t["epochs"] is not None:
            parts.append(f"{t['epochs']:.2f} epochs")
        if t["seconds"] is not None:
            parts.append(_show_time(t["seconds"]))
        if t["chars_per_s"]:
            parts.append(f"{t['chars_per_s']:,.0f} chars/s")
        add("progress", ", ".join(parts))
    if t["optimizer"]:
        add("optimizer", f"{t['optimizer']}" + (f", lr {t['lr']:g}" if t["lr"] is not None else "")
            + (f", {t['schedule']} schedule" if t["schedule"] else ""))
    b = c["best"]
    add("best val", "none recorded" if b is None else
        f"{b['val_loss']:.4f} nats/char ({b['val_bits']:.4f} bits/char)"
        + (f" at step {b['step']:,}" if b["step"] is not None else ""))
    m = c.get("_metrics")
    if m is not None:
        lines.append("")
        lines.extend(curve(m))
    return "\n".join(lines) + "\n"


def _show_chars(chars: str) -> str:
    """The characters as one quoted line: controls and whitespace other than a space escaped."""
    def one(ch):
        if ch == " " or (ch.isprintable() and not ch.isspace()):
            return "\\\\" if ch == "\\" else ch
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch, f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    shown = "".join(one(ch) for ch in chars[:MAX_SHOWN_CHARS])
    more = f" and {len(chars) - MAX_SHOWN_CHARS:,} more" if len(chars) > MAX_SHOWN_CHARS else ""
    return f'"{shown}"{more}'


def _show_value(key: str, v) -> str:
    if key == "max_input" and type(v) is int:
        from charrnn.config import format_size

        return format_size(v)
    if v is None:
        return "all" if key in ("max_vocab", "val_chars") else "auto"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _show_options(opts: dict) -> str:
    """Options as they would be typed: --hidden 16 --steps 30 (flags as --name alone)."""
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {_show_value(k, v)}")
                    for k, v in opts.items())


def _show_fitted(o: dict) -> str:
    """What the run chose where the user left an option open (given None, or schedule auto)."""
    given, fitted = o["given"], o["fitted"]
    shown = []
    for k, v in fitted.items():
        if k == "dropout_pending" or v is None:
            continue
        if given.get(k) is None or (k == "schedule" and given.get(k) == "auto" and v != "auto"):
            shown.append(f"{k.replace('_', ' ')} {_show_value(k, v)}")
    if fitted.get("dropout_pending"):
        shown.append("(dropout still to be fitted to the budget)")
    return ", ".join(shown)


def _show_generic(value, indent: str = "  ") -> list[str]:
    """A record another part of charrnn wrote (where a fine-tuned run came from, ...), shown as
    key: value lines whatever it holds."""
    if isinstance(value, dict):
        return [f"{indent}{str(k):<12} {_show_value(str(k), v)}" for k, v in value.items()]
    return [f"{indent}{'':<12} {_show_value('', value)}"]


def _show_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.1f} min"
    return f"{int(minutes // 60)} h {minutes % 60:02.0f} min"


# ------------------------------------------------------------------------------ small helpers
def _dict(d, key) -> dict:
    """d[key] when it is a dict, else {} (a meta record from another version may lack it)."""
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, dict) else {}


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _no_nan(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj
