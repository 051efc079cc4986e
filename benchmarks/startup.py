"""Start-up: how long a first run on a new machine waits for compilation, and a second run.

With a fresh NUMBA_CACHE_DIR (a cold start), then again with the same one (warm):
- `charrnn train tinyshakespeare.txt --steps 1 --val-frac 0.01 --cell lstm --hidden 128`: seconds
  to its first step (the "step 1" line on stderr) and in all, the final validation included;
- `charrnn sample --model RUN --length 1`: seconds to the first character on stdout, and in all.
Then, cold again, which kernels compiled and for how long (Numba's compile events, outermost
only), for the same two commands run in-process.

    python benchmarks/startup.py                         # this checkout
    python benchmarks/startup.py --code /path/to/other   # another checkout, on PYTHONPATH
    python benchmarks/startup.py --precision bf16        # the train commands with --precision bf16

With --compare, only the cold first train, once per precision named and round, alternating (fp32,
bf16, fp32, bf16, ...: load on a shared machine then slows both alike), each with a fresh
NUMBA_CACHE_DIR: its wall time to the end and the CPU time it used (user + system, which other
processes' load changes less), then the medians and their ratio to the first precision named:

    python benchmarks/startup.py --compare fp32,bf16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from tinyshakespeare import required as corpus_path  # --corpus, $CHARRNN_CORPUS, ../shared/corpora, or a download


def timed(cmd, env, marker_stream, marker, cwd):
    """Run cmd; seconds until `marker` first shows on stderr ("stderr") or any byte on stdout
    ("stdout"), and in all."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)
    first = None
    stream = p.stderr if marker_stream == "stderr" else p.stdout
    buf = b""
    while True:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(1)
        if not chunk:
            break
        buf += chunk
        if first is None and (marker is None or marker in buf):
            first = time.monotonic() - t0
    out, err = p.communicate()
    total = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {(err or b'').decode()[-2000:]}")
    return first, total


PROFILE = r"""
import json, sys, time
from numba.core import event as ev
records = []
class Rec(ev.Listener):
    def __init__(self): self.depth = 0; self.t = []
    def on_start(self, e):
        self.t.append(time.perf_counter()); self.depth += 1
    def on_end(self, e):
        self.depth -= 1; t0 = self.t.pop()
        if self.depth == 0:
            d = e.data.get("dispatcher"); f = getattr(d, "py_func", None)
            records.append([getattr(f, "__module__", "?") + "." + getattr(f, "__name__", "?"), time.perf_counter() - t0])
ev.register("numba:compile", Rec())
from click.testing import CliRunner
from charrnn.cli import cli
t0 = time.perf_counter()
res = CliRunner().invoke(cli, sys.argv[1:], catch_exceptions=False)
assert res.exit_code == 0, res.output
print(json.dumps({"wall": time.perf_counter() - t0, "kernels": records}))
"""


def compare(train, env, precisions, rounds):
    """Cold first trains, alternating the precisions; the medians of wall and CPU seconds."""
    wall, cpu = {p: [] for p in precisions}, {p: [] for p in precisions}
    for r in range(rounds):
        for p in precisions:
            with tempfile.TemporaryDirectory() as d:
                env = dict(env, NUMBA_CACHE_DIR=os.path.join(d, "cache"))
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                _, total = timed(train + ["--precision", p, "--out", os.path.join(d, "run")], env, "stderr", None, d)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
            used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            wall[p].append(total)
            cpu[p].append(used)
            load = os.getloadavg()[0]
            print(f"round {r + 1} --precision {p:5s} cold train --steps 1: {total:6.1f} s, CPU {used:6.1f} s "
                  f"(load average {load:.2f})", flush=True)
    first = precisions[0]
    for p in precisions:
        w, c = statistics.median(wall[p]), statistics.median(cpu[p])
        print(f"median --precision {p:5s}: {w:6.1f} s, CPU {c:6.1f} s; "
              f"{w / statistics.median(wall[first]):.2f}x and {c / statistics.median(cpu[first]):.2f}x {first}'s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", default=None, help="a checkout to measure instead of the installed charrnn")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--precision", default=None, help="passed to the train commands (default: train's own)")
    ap.add_argument("--compare", default=None, metavar="P1,P2",
                    help="only cold first trains, alternating these precisions (see above)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --compare")
    args = ap.parse_args()
    args.corpus = corpus_path(args.corpus)
    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = os.path.abspath(args.code)
    train = [sys.executable, "-m", "charrnn", "train", args.corpus, "--steps", "1", "--val-frac", "0.01",
             "--cell", "lstm", "--hidden", "128"]
    if args.compare:
        return compare(train, env, args.compare.split(","), args.rounds)
    if args.precision:
        train += ["--precision", args.precision]
    with tempfile.TemporaryDirectory() as d:
        env["NUMBA_CACHE_DIR"] = os.path.join(d, "cache")
        run = os.path.join(d, "run")
        sample = [sys.executable, "-m", "charrnn", "sample", "--model", run, "--length", "1"]
        for kind in ("cold", "warm"):
            out = os.path.join(d, "run") if kind == "cold" else os.path.join(d, "run-warm")
            first, total = timed(train + ["--out", out], env, "stderr", b"step 1 ", d)
            print(f"{kind} train --steps 1: first step after {first:6.1f} s, done after {total:6.1f} s", flush=True)
            first, total = timed(sample, env, "stdout", None, d)
            print(f"{kind} sample: first character after {first:6.1f} s, done after {total:6.1f} s", flush=True)
        env["NUMBA_CACHE_DIR"] = os.path.join(d, "cache2")
        for name, argv in (("train", train[3:] + ["--out", os.path.join(d, "run2"), "-q"]),
                           ("sample", ["sample", "--model", run, "--length", "1", "-q"])):
            res = subprocess.run([sys.executable, "-c", PROFILE, *argv], env=env, capture_output=True, text=True, cwd=d)
            if res.returncode != 0:
                raise SystemExit(res.stderr[-2000:])
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            kernels = sorted(rec["kernels"], key=lambda r: -r[1])
            print(f"cold {name} in-process: {rec['wall']:.1f} s, of which compiling "
                  f"{sum(t for _, t in kernels):.1f} s:")
            for k, t in kernels:
                if t >= 0.05:
                    print(f"    {t:6.2f} s  {k}")


if __name__ == "__main__":
    main()
