"""Gigabyte corpora: peak resident memory and time to the first training step of `charrnn train`
on a big text (tiny Shakespeare repeated), in a child process.

Prints the text's size, the child's peak resident set size ("Maximum resident set size": mapped
token-file pages included) in MB and in bytes per byte of text, the seconds from the start of the
process to its first training step, and the seconds in all. Kernels are loaded from Numba's cache
(a small warm-up run fills it first), so the numbers measure reading, encoding and set-up only.

    python benchmarks/big_corpus.py --mb 1000                   # this checkout
    python benchmarks/big_corpus.py --mb 200 --code /path/to/other   # another checkout, on PYTHONPATH

The text is written under /tmp (or --text PATH, reused if it exists) and deleted afterwards
unless --keep or --text is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from tinyshakespeare import required as corpus_path  # --source, $CHARRNN_CORPUS, ../shared/corpora, or a download

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child: charrnn train through its CLI, with train_step wrapped to note when the first step starts.
CHILD = r"""
import json, sys, threading, time
from charrnn import train
from charrnn.cli import cli

marker, args = sys.argv[1], sys.argv[2:]
real = train.train_step

def step(*a, **k):
    if threading.current_thread() is threading.main_thread() and not step.seen:  # not the precompile's
        step.seen = True
        with open(marker, "w") as f:
            f.write(json.dumps({"first_step": time.time()}))
    return real(*a, **k)

step.seen = False
train.train_step = step
cli(["train", *args], prog_name="charrnn")
"""


def make_text(path: str, source: str, mb: float):
    """`source` repeated until the file holds about `mb` megabytes (10^6 bytes)."""
    with open(source, "rb") as f:
        data = f.read()
    want = int(mb * 1e6)
    with open(path, "wb") as f:
        written = 0
        while written < want:
            f.write(data)
            written += len(data)


def run_child(env, text: str, out: str, extra) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        marker = os.path.join(tmp, "first_step.json")
        t0 = time.time()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        # cwd: a folder without a charrnn/ in it, so PYTHONPATH (--code) decides which code runs
        res = subprocess.run([sys.executable, "-c", CHILD, marker, text, "--out", out, *extra], env=env,
                             capture_output=True, text=True, cwd=tmp)
        t1 = time.time()
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if res.returncode != 0:
            raise SystemExit(f"charrnn train failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        first = json.load(open(marker))["first_step"] if os.path.exists(marker) else None
    return {"peak_kb": peak_kb, "peak_kb_before": before, "first_step_s": None if first is None else first - t0,
            "total_s": t1 - t0, "stderr": res.stderr}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=1000, help="size of the text in megabytes (10^6 bytes)")
    ap.add_argument("--source", default=None, help="the text to repeat")
    ap.add_argument("--text", default=None, help="use (or make) this text file, and keep it")
    ap.add_argument("--keep", action="store_true", help="keep the text made under /tmp")
    ap.add_argument("--code", default=None, help="a checkout to benchmark instead of this one (put on PYTHONPATH)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--val-frac", default="0.0001")
    args = ap.parse_args()
    args.source = corpus_path(args.source)

    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.code or ROOT))
    work = tempfile.mkdtemp(prefix="charrnn-big-", dir="/tmp")
    text = args.text or os.path.join(work, "big.txt")
    try:
        if not os.path.exists(text):
            make_text(text, args.source, args.mb)
        size = os.path.getsize(text)
        opts = ["--steps", str(args.steps), "--val-frac", args.val_frac, "--hidden", str(args.hidden), "-q"]
        # fill (or load) Numba's cache with a small run first: the big run measures the data path
        small = os.path.join(work, "small.txt")
        make_text(small, args.source, 0.2)
        run_child(env, small, os.path.join(work, "warm"), opts)
        # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: the big run must be the largest
        r = run_child(env, text, os.path.join(work, "run"), opts)
        if r["peak_kb"] <= r["peak_kb_before"]:
            print("note: the big run's peak did not exceed the warm-up run's; the peak shown is the warm-up's")
        peak = r["peak_kb"] * 1024
        print(f"code: {args.code or ROOT}")
        print(f"text: {size:,} bytes ({size / 1e9:.3f} GB)")
        print(f"peak resident memory: {peak / 2**20:,.0f} MiB = {peak / size:.2f} bytes per byte of text")
        fs = r["first_step_s"]
        print(f"time to the first training step: {'-' if fs is None else f'{fs:.1f}'} s; in all {r['total_s']:.1f} s")
    finally:
        if args.text or args.keep:
            shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)
            shutil.rmtree(os.path.join(work, "warm"), ignore_errors=True)
            if args.keep and not args.text:
                print(f"kept {text}")
            else:
                shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
