"""Memory of data-parallel workers on a big text: each worker's proportional set size (PSS, from
/proc/PID/smaps_rollup: a page shared by k processes counts 1/k in each) and RSS (which counts
shared pages in full in every process), with 1 and with 2 workers.

The workers of a machine map one read-only token file (the run directory's tokens.npy), so the
corpus is in memory once per machine: a 1 GB text with 2 workers must not need twice the memory of
one. Each worker also reads only its own streams' pages.

    python benchmarks/worker_memory.py                # 1000 MB of tiny Shakespeare repeated
    python benchmarks/worker_memory.py --mb 200 --steps 300

The text and the runs live in a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

from tinyshakespeare import required as corpus_path  # --source, $CHARRNN_CORPUS, ../shared/corpora, or a download


def smaps(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) / 1024  # MiB
    return out


def worker_pids(root: int) -> dict:
    """{rank: pid} of the charrnn processes under `root` (itself when it is the only one)."""
    parent = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, encoding="ascii", errors="replace") as f:
                parent[int(stat.split("/")[2])] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    todo, below = [root], []
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        below += kids
        todo += kids
    ranks = {}
    for pid in below:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"PMI_RANK" in env:
            ranks[int(env[b"PMI_RANK"])] = pid
    return ranks or {0: root}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--source", default=None)
    args = ap.parse_args()
    args.source = corpus_path(args.source)
    tmp = tempfile.mkdtemp(prefix="charrnn-memory-")
    try:
        text = os.path.join(tmp, "big.txt")
        with open(args.source, "rb") as f:
            chunk = f.read()
        with open(text, "wb") as f:
            for _ in range(int(args.mb * 2**20 // len(chunk)) + 1):
                f.write(chunk)
        size = os.path.getsize(text) / 1e6
        print(f"text: {size:.0f} MB ({os.path.basename(args.source)} repeated); charrnn train --steps {args.steps} "
              "--hidden 128 --batch 32 --seq 64 --val-chars 20000; sampled after the first validation")
        for workers in (1, 2):
            out = os.path.join(tmp, f"run{workers}")
            cmd = [sys.executable, "-m", "charrnn", "train", text, "--out", out, "--steps", str(args.steps), "--hidden",
                   "128", "--batch", "32", "--seq", "64", "--val-chars", "20000", "--eval-every",
                   str(args.steps // 2), "--threads", "1"]
            if workers > 1:
                cmd += ["--workers", str(workers)]
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            samples = []
            for line in proc.stderr:
                if line.startswith(f"step {args.steps // 2}: val"):
                    samples = {r: smaps(pid) for r, pid in worker_pids(proc.pid).items()}
            proc.wait()
            if proc.returncode != 0 or not samples:
                raise SystemExit(f"charrnn failed ({proc.returncode})")
            token_mb = os.path.getsize(os.path.join(out, "tokens.npy")) / 2**20
            total = sum(s["Pss"] for s in samples.values())
            print(f"{workers} worker(s), {time.monotonic() - t0:.0f} s in all, tokens.npy {token_mb:.0f} MiB:")
            for r, s in sorted(samples.items()):
                print(f"  rank {r}: PSS {s['Pss']:.0f} MiB (of it file-backed {s.get('Pss_File', 0):.0f}), "
                      f"RSS {s['Rss']:.0f} MiB, private {s.get('Private_Clean', 0) + s.get('Private_Dirty', 0):.0f} MiB")
            print(f"  all workers together: PSS {total:.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
