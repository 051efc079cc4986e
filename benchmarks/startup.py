"""Start-up: how long a first run on a new machine waits for compilation, and a second run.

With a fresh NUMBA_CACHE_DIR (a cold start), then again with the same one (warm):
- `charrnn train tinyshakespeare.txt --steps 1 --val-frac 0.01 --cell lstm --hidden 128`: seconds
  to its first step (the "step 1" line on stderr) and in all, the final validation included;
- `charrnn sample --model RUN --length 1`: seconds to the first character on stdout, and in all.
Then, cold again, which kernels compiled and for how long (Numba's compile events, outermost
only), for the same two commands run in-process.

    python benchmarks/startup.py                         # this checkout
    python benchmarks/startup.py --code /path/to/other   # another checkout, on PYTHONPATH
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from tinyshakespeare import corpus as tinyshakespeare  # $CHARRNN_CORPUS, ../shared/corpora, or a download
CORPUS = tinyshakespeare()


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", default=None, help="a checkout to measure instead of the installed charrnn")
    ap.add_argument("--corpus", default=CORPUS)
    args = ap.parse_args()
    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = os.path.abspath(args.code)
    with tempfile.TemporaryDirectory() as d:
        env["NUMBA_CACHE_DIR"] = os.path.join(d, "cache")
        run = os.path.join(d, "run")
        train = [sys.executable, "-m", "charrnn", "train", args.corpus, "--steps", "1", "--val-frac", "0.01",
                 "--cell", "lstm", "--hidden", "128"]
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
