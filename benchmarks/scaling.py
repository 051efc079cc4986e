"""Data-parallel scaling of `charrnn train`: workers x threads against one process using every
core as threads, in one run; and quality against time, 1 against 2 workers at the same global batch.

Throughput: each configuration is a whole `charrnn train` command (a subprocess, so every side
pays its own start-up, which is not timed: the number is the chars/s charrnn reports over its
training steps, validation excluded), run in interleaved rounds (A B C A B C ...); medians are
reported with the ratio to the reference (1 worker, every core as threads, the same --batch),
the all-reduce and agreement cost per step that rank 0 reports, and the CPU time other processes
took during each run (from /proc/stat less our children's own; a run with more than 10% of the
machine taken is flagged: two threads on two cores collapse under any other load).

Configurations are WxT (W workers of T threads) or WxT@B (at --batch B), and iN@B: N independent
single-thread processes at once, each at --batch B (their chars/s summed), the data-parallel
ceiling. Nothing here depends on the machine: on a 16-core host

    python benchmarks/scaling.py --batch 512 --hidden 256 --configs 1x16,16x1,8x2,4x4,1x16@32,i16@32 --quality-minutes 0

Here (2 cores): python benchmarks/scaling.py   (1x2, 2x1 and 1x1 at --batch 32, 2x256 LSTM, 3 rounds,
then 2 minutes each of 1 and 2 workers on tiny Shakespeare). Writes nothing into the checkout.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from tinyshakespeare import corpus as tinyshakespeare  # $CHARRNN_CORPUS, ../shared/corpora, or a download

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = tinyshakespeare() or ""


def _busy_jiffies():
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return sum(vals) - vals[3] - vals[4]


def _tree_cpu(roots, seen: dict):
    """CPU seconds of the processes under `roots` so far, kept per process in `seen` (the last
    reading before each ends): mpiexec reaps its workers without adding them to our children's time."""
    parent, cpu = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            pid = int(stat.split("/")[2])
            parent[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            pass
    todo = list(roots)
    while todo:
        p = todo.pop()
        if p in cpu:
            seen[p] = cpu[p]
        todo += [c for c, pp in parent.items() if pp == p]


def parse_config(text: str, batch: int):
    """'2x1' -> (2 workers, 1 thread, batch); '1x16@32'; 'i16@32' -> 16 independent processes."""
    m = re.fullmatch(r"i(\d+)(?:@(\d+))?", text)
    if m:
        return ("independent", int(m.group(1)), 1, int(m.group(2) or batch))
    m = re.fullmatch(r"(\d+)x(\d+)(?:@(\d+))?", text)
    if not m:
        raise SystemExit(f"bad configuration {text!r}: use WxT, WxT@B or iN@B")
    return ("workers", int(m.group(1)), int(m.group(2)), int(m.group(3) or batch))


def train_cmd(corpus, out, workers, threads, batch, args, steps):
    cmd = [sys.executable, "-m", "charrnn", "train", corpus, "--out", out, "--steps", str(steps), "--batch", str(batch),
           "--seq", str(args.seq), "--hidden", str(args.hidden), "--layers", str(args.layers), "--cell", args.cell,
           "--seq-warmup", "0", "--dropout", "0", "--eval-every", "1000000", "--val-chars", "2000",
           "--threads", str(threads)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    return cmd


def run_throughput(config, corpus, args, scratch):
    """One measurement: chars/s over the training steps (summed over independent processes), the
    collectives' cost per step, and the share of the machine other processes took."""
    kind, n, threads, batch = config
    j0, t0 = _busy_jiffies(), time.monotonic()
    count = n if kind == "independent" else 1
    procs = []
    for i in range(count):
        out = tempfile.mkdtemp(dir=scratch)
        shutil.rmtree(out)
        procs.append(subprocess.Popen(train_cmd(corpus, out, 1 if kind == "independent" else n, threads, batch, args,
                                                args.steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, cwd=scratch))
    seen = {}
    while any(p.poll() is None for p in procs):
        _tree_cpu([p.pid for p in procs], seen)
        time.sleep(0.2)
    outputs = [p.communicate()[1] for p in procs]
    wall = time.monotonic() - t0
    other = (_busy_jiffies() - j0) / os.sysconf("SC_CLK_TCK") - sum(seen.values())
    cps, reduce_ms, agree_ms = 0.0, None, None
    for p, err in zip(procs, outputs):
        if p.returncode != 0:
            raise SystemExit(f"charrnn failed ({p.returncode}):\n{err}")
        cps += float(re.search(r"done: .* ([\d,]+) chars/s", err).group(1).replace(",", ""))
        m = re.search(r"all-reduce ([\d.]+) ms/step, agreement ([\d.]+) ms/step", err)
        if m:
            reduce_ms, agree_ms = float(m.group(1)), float(m.group(2))
    cores = os.cpu_count() or 1
    return {"chars_per_s": cps, "reduce_ms": reduce_ms, "agree_ms": agree_ms,
            "other_cpu": max(0.0, other) / (wall * cores)}


_COLLECTIVES = """
import statistics, sys, time
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
grad, ctl = np.ones(int(sys.argv[1]), np.float32), np.zeros(4)
reduce_s, agree_s = [], []
for i in range(60):
    comm.Barrier()  # every worker arrives together: the transfer alone, no waiting for a slower one
    t0 = time.perf_counter()
    comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)
    grad *= np.float32(0.5)
    t1 = time.perf_counter()
    comm.Allreduce(MPI.IN_PLACE, ctl, op=MPI.SUM)
    t2 = time.perf_counter()
    if i >= 10:
        reduce_s.append(t1 - t0)
        agree_s.append(t2 - t1)
if comm.rank == 0:
    print(1000 * statistics.median(reduce_s), 1000 * statistics.median(agree_s))
"""


def collective_cost(workers: int, n_params: int):
    """The all-reduce of an n_params float32 gradient (with its 1/N scaling) and the 4-number
    agreement, with every worker arriving together: ms per step (medians of 50)."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    res = subprocess.run([mpiexec, "-n", str(workers), sys.executable, "-c", _COLLECTIVES, str(n_params)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return tuple(float(x) for x in res.stdout.split())


def quality(corpus, args, scratch):
    """1 against 2 workers at the same global batch, --quality-minutes each: validation loss
    against characters and against time (metrics.jsonl)."""
    curves = {}
    for workers in (1, 2):
        out = os.path.join(scratch, f"quality-{workers}")
        threads = max(1, (os.cpu_count() or 1) // workers)
        cmd = [sys.executable, "-m", "charrnn", "train", corpus, "--out", out, "--minutes", str(args.quality_minutes),
               "--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.quality_hidden), "--cell",
               args.cell, "--dropout", "0.1", "--schedule", "constant", "--eval-every", str(args.quality_eval_every),
               "--threads", str(threads), "-q"]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=scratch)
        if res.returncode != 0:
            raise SystemExit(f"charrnn failed ({res.returncode}):\n{res.stderr}")
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            curves[workers] = [json.loads(line) for line in f]
    print(f"\nquality on {os.path.basename(corpus)}: 2x{args.quality_hidden} {args.cell}, batch {args.batch}x{args.seq}, "
          f"dropout 0.1, constant rate, {args.quality_minutes:g} min each")
    print(f"{'step':>6} {'chars':>10} | {'1 worker: s':>12} {'val':>7} | {'2 workers: s':>12} {'val':>7} | {'diff':>8}")
    by_step = {row["step"]: row for row in curves[2]}
    for row in curves[1]:
        other = by_step.get(row["step"])
        chars = row["step"] * args.batch * args.seq
        if other is None:
            print(f"{row['step']:>6} {chars:>10,} | {row['elapsed_s']:>12.1f} {row['val_loss']:>7.4f} |")
            continue
        print(f"{row['step']:>6} {chars:>10,} | {row['elapsed_s']:>12.1f} {row['val_loss']:>7.4f} | "
              f"{other['elapsed_s']:>12.1f} {other['val_loss']:>7.4f} | {other['val_loss'] - row['val_loss']:>+8.5f}")
    for row in curves[2]:
        if row["step"] > curves[1][-1]["step"]:
            print(f"{row['step']:>6} {row['step'] * args.batch * args.seq:>10,} | {'':>12} {'':>7} | "
                  f"{row['elapsed_s']:>12.1f} {row['val_loss']:>7.4f} |")
    for w in (1, 2):
        last = curves[w][-1]
        print(f"{w} worker(s): {last['step']} steps in {last['elapsed_s']:.0f} s, final val {last['val_loss']:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = os.cpu_count() or 1
    ap.add_argument("--configs", default=f"1x{cores},{cores}x1" + (",1x1" if cores == 2 else ""),
                    help="comma-separated WxT[@B] or iN@B; the first is the reference")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--cell", default="lstm")
    ap.add_argument("--steps", type=int, default=120, help="training steps per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--corpus", default=SHAKESPEARE if os.path.exists(SHAKESPEARE) else
                    os.path.join(ROOT, "corpora", "markov.txt"))
    ap.add_argument("--quality-minutes", type=float, default=2.0, help="each side; 0: skip the quality comparison")
    ap.add_argument("--quality-hidden", type=int, default=128)
    ap.add_argument("--quality-eval-every", type=int, default=100)
    args = ap.parse_args()
    configs = [(text, parse_config(text, args.batch)) for text in args.configs.split(",")]
    scratch = tempfile.mkdtemp(prefix="charrnn-scaling-")
    try:
        cpu = "?"
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
                ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
        except (OSError, StopIteration):
            pass
        print(f"charrnn train scaling, {time.strftime('%Y-%m-%d')}, {cpu}, {cores} cores; {args.layers}x{args.hidden} "
              f"{args.cell}, --seq {args.seq}, {args.steps} steps per run, {args.rounds} interleaved rounds, "
              f"corpus {os.path.basename(args.corpus)}")
        if args.rounds > 0:
            # compile (or load) the kernels once, untimed
            subprocess.run(train_cmd(args.corpus, os.path.join(scratch, "warm"), 1, 1, 8, args, 2), cwd=scratch,
                           capture_output=True)
        results = {text: [] for text, _ in configs}
        for r in range(args.rounds):
            for text, config in configs:
                m = run_throughput(config, args.corpus, args, scratch)
                results[text].append(m)
                flag = "  (busy: discard?)" if m["other_cpu"] > 0.10 else ""
                extra = (f", all-reduce {m['reduce_ms']:.2f} ms/step, agreement {m['agree_ms']:.3f} ms/step"
                         if m["reduce_ms"] is not None else "")
                print(f"round {r + 1} {text:>10}: {m['chars_per_s']:>10,.0f} chars/s{extra}, other processes "
                      f"{100 * m['other_cpu']:.0f}% of the machine{flag}", flush=True)
        if args.rounds > 0:
            ref_text = configs[0][0]
            ref = statistics.median(m["chars_per_s"] for m in results[ref_text])
            print(f"\nmedians over {args.rounds} rounds (ratio to {ref_text}, the reference):")
            for text, config in configs:
                ms = results[text]
                med = statistics.median(m["chars_per_s"] for m in ms)
                red = [m["reduce_ms"] for m in ms if m["reduce_ms"] is not None]
                agr = [m["agree_ms"] for m in ms if m["agree_ms"] is not None]
                pairs = ""
                if text != ref_text:
                    ratios = [m["chars_per_s"] / r["chars_per_s"] for m, r in zip(ms, results[ref_text])]
                    pairs = f"; per round {', '.join(f'{x:.2f}' for x in ratios)}"
                what = (f"{config[1]} independent processes @{config[3]}" if config[0] == "independent" else
                        f"{config[1]} worker(s) x {config[2]} thread(s) @{config[3]}")
                col = f", all-reduce {statistics.median(red):.2f} ms/step, agreement {statistics.median(agr):.3f} ms/step" if red else ""
                print(f"  {text:>10} ({what}): {med:>10,.0f} chars/s  {med / ref:.3f}x{pairs}{col}")
        sys.path.insert(0, ROOT)
        from charrnn.model import approx_params

        n = approx_params(args.cell, args.layers, args.hidden, 68)
        for workers in sorted({c[1] for _, c in configs if c[0] == "workers" and c[1] > 1}):
            cost = collective_cost(workers, n)
            if cost:
                print(f"collectives alone, {workers} workers, every worker arriving together: all-reduce of "
                      f"{n:,} float32 ({4 * n / 2**20:.1f} MiB) {cost[0]:.2f} ms, agreement {cost[1]:.3f} ms "
                      "(the per-step figures above include waiting for the slowest worker)")
        if args.quality_minutes > 0:
            quality(args.corpus, args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
