"""Fine-tuning against training from scratch: does `charrnn train NEW --init-from MODEL` learn a
new text faster than a fresh model given the same steps?

1. Trains a base model on the first 800,000 characters of tiny Shakespeare.
2. For each new text, trains two models with the same options (cell, size, dropout, learning
   rate, schedule, seed, steps): one with --init-from the base (--unknown extend, so characters the
   base never saw are added), one fresh. Prints both validation curves (the last 10% of the new
   text, held out by charrnn as always), and the loss the base itself scores on that held-out text
   before any fine-tuning (charrnn eval; characters it lacks count as <UNK>, so that number flatters
   it a little where the text has new characters).

New texts (there is no other English corpus on this machine, so both are named for what they are):
- "shakespeare-rest": the remaining 315k characters of tiny Shakespeare: the same author, plays
  the base never saw (in-domain);
- "stdlib-docstrings": English prose by other authors in another register, the docstrings of the
  Python standard library's top-level modules (ast.get_docstring of every module, class and
  function, in file order, blank-line separated, the first 400,000 characters), taken from the
  interpreter running this script, so its version is printed with the text's hash; it holds
  characters Shakespeare lacks (digits, brackets, backquotes ...).

The fine-tuned model's vocabulary is the base's plus the added characters, the fresh model's the
new text's own: both score every held-out character, so nats/char compare (the extra tokens cost
the fine-tuned model, if anything). Runs one after another, never two at once.

    chrt -i 0 python benchmarks/finetune.py [--base-steps 3000] [--steps 800] [--hidden 128]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

from tinyshakespeare import required as corpus_path  # --corpus, $CHARRNN_CORPUS, ../shared/corpora, or a download
BASE_CHARS = 800_000
DOC_CHARS = 400_000


def docstrings_text(limit: int = DOC_CHARS) -> str:
    """The docstrings of the standard library's top-level modules, in name and file order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for name in sorted(os.listdir(stdlib)):
        if not name.endswith(".py"):
            continue
        try:
            with open(os.path.join(stdlib, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    parts.append(doc.strip())
                    total += len(doc) + 2
        if total >= limit:
            break
    return "\n\n".join(parts)[:limit] + "\n"


def train(args: list[str], out: str) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "charrnn", "train", *args, "--out", out, "-q"]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr}")
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    return rows, time.monotonic() - t0


def held_out(path: str, val_frac: float = 0.1) -> str:
    """The held-out end of a text as charrnn splits it (stream mode: the last round(N * val_frac))."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text[int(round(len(text) * (1 - val_frac))):]


def eval_loss(model: str, path: str) -> float:
    res = subprocess.run([sys.executable, "-m", "charrnn", "eval", path, "--model", model, "--json", "-q"],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout)["nats_per_char"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--base-steps", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    args = ap.parse_args()
    args.corpus = corpus_path(args.corpus)
    root = args.out or tempfile.mkdtemp(prefix="charrnn-finetune-")
    os.makedirs(root, exist_ok=True)
    with open(args.corpus, encoding="utf-8") as f:
        shakespeare = f.read()
    texts = {"shakespeare-rest": shakespeare[BASE_CHARS:], "stdlib-docstrings": docstrings_text()}
    paths = {}
    for name, text in [("base", shakespeare[:BASE_CHARS]), *texts.items()]:
        paths[name] = os.path.join(root, f"{name}.txt")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.write(text)
    common = ["--cell", "lstm", "--layers", "2", "--hidden", str(args.hidden), "--dropout", "0", "--batch", "32",
              "--seq", "64", "--seed", "1234", "--threads", str(args.threads)]
    print(f"# python {sys.version.split()[0]}, {os.cpu_count()} cores; 2x{args.hidden} LSTM, dropout 0, batch 32x64, "
          f"lr 3e-3 (100 warm-up steps), --seq-warmup 300, seed 1234; runs in {root}")
    base = os.path.join(root, "base")
    rows, secs = train([paths["base"], "--steps", str(args.base_steps), "--eval-every", str(args.base_steps), *common],
                       base)
    print(f"base: first {BASE_CHARS:,} characters of tiny Shakespeare, {args.base_steps} steps "
          f"({rows[-1]['epoch']:.2f} epochs, {secs:.0f} s): val {rows[-1]['val_loss']:.4f} nats/char")
    for name, text in texts.items():
        print(f"\nnew text {name}: {len(text):,} characters, {len(set(text))} distinct, "
              f"{len(set(text) - set(shakespeare[:BASE_CHARS]))} of them not in the base's vocabulary, "
              f"sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")
        val = os.path.join(root, f"{name}.val.txt")
        with open(val, "w", encoding="utf-8") as f:
            f.write(held_out(paths[name]))
        print(f"  the base before fine-tuning scores its held-out 10% at {eval_loss(base, val):.4f} nats/char")
        curves = {}
        for kind, extra in (("fine-tuned", ["--init-from", base, "--unknown", "extend"]), ("fresh", [])):
            rows, secs = train([paths[name], "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                                *common, *extra], os.path.join(root, f"{name}-{kind}"))
            curves[kind] = ({r["step"]: r["val_loss"] for r in rows}, secs)
        print(f"  {'step':>6}  {'fine-tuned':>10}  {'fresh':>10}  {'difference':>10}")
        for step in sorted(curves["fresh"][0]):
            a, b = curves["fine-tuned"][0][step], curves["fresh"][0][step]
            print(f"  {step:6d}  {a:10.4f}  {b:10.4f}  {a - b:+10.4f}")
        fresh_best = min(curves["fresh"][0].values())
        first = min((s for s, v in curves["fine-tuned"][0].items() if v <= fresh_best), default=None)
        print(f"  the fresh model's best in {args.steps} steps ({fresh_best:.4f}) was reached by the fine-tuned one "
              + (f"at step {first}" if first is not None else "never")
              + f"; wall seconds: fine-tuned {curves['fine-tuned'][1]:.0f}, fresh {curves['fresh'][1]:.0f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
