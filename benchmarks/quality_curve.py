"""Validation loss against wall-clock minutes for `charrnn train` runs on tiny Shakespeare.

Runs each configuration (extra `charrnn train` options) with a time budget, one after another
(never two at once: two-thread runs collapse under load), and prints the curve from each run's
metrics.jsonl: minutes, step, epoch, validation nats/char. The default split holds out the last
10% of the text.

    python benchmarks/quality_curve.py --minutes 5 -- "" "--hidden 384" "--dropout 0.1 --lr 3e-3"

With --steps N instead, each run stops after N updates: a comparison at equal steps, which does not
depend on the machine's speed or load (give the schedule and model explicitly, for example
"--cell gru --hidden 256 --schedule wsd --decay-steps 4100" with --steps 4200, what a quiet 5-minute
run fits).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

from tinyshakespeare import required as corpus_path  # --corpus, $CHARRNN_CORPUS, ../shared/corpora, or a download


def run(opts: str, minutes: float, corpus: str, out_root: str, steps: int | None = None):
    out = tempfile.mkdtemp(prefix="run-", dir=out_root)
    os.rmdir(out)
    budget = ["--steps", str(steps)] if steps else ["--minutes", str(minutes)]
    cmd = [sys.executable, "-m", "charrnn", "train", corpus, *budget, "--out", out, "-q", *shlex.split(opts)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return None
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    with open(os.path.join(out, "best.npz"), "rb"):
        pass
    return out, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=None, help="a budget of updates instead of minutes")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    ap.add_argument("configs", nargs="*", default=[""], help="extra charrnn train options per run")
    args = ap.parse_args()
    args.corpus = corpus_path(args.corpus)
    out_root = args.out or tempfile.mkdtemp(prefix="charrnn-quality-")
    os.makedirs(out_root, exist_ok=True)
    for opts in args.configs:
        r = run(opts, args.minutes, args.corpus, out_root, args.steps)
        if r is None:
            print(f"[{opts or 'defaults'}] failed")
            continue
        out, rows = r
        best = min(x["val_loss"] for x in rows)
        budget = f"--steps {args.steps}" if args.steps else f"--minutes {args.minutes:g}"
        print(f"[{opts or 'defaults'}] {budget}: best val {best:.4f} nats/char ({out})")
        for x in rows:
            print(f"   {x['elapsed_s'] / 60:6.2f} min  step {x['step']:6d}  epoch {x['epoch']:6.2f}  val {x['val_loss']:.4f}"
                  f"  train {x['train_loss']:.4f}  {x['chars_per_s']:9,.0f} chars/s")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
