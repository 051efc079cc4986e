"""Beam search throughput: characters of settled text per second for `sample --beam K`, K = 1, 4
and 16, on a 2x256 LSTM with random weights (V = 68); the compiled sampler (temperature 1, one
stream) beside it for scale. Each measurement runs in a fresh process after a warm-up search
(compilation and start-up excluded) and times one search of --length positions.

With --baseline PATH, another checkout of charrnn (today's main, say) is measured as a side of
its own, interleaved with this one (A B A B ...), and the table gives the ratio of the medians.
A mode with -bf16 (beam16-bf16) runs `sample --precision bf16`'s search on this side and float32
on the baseline's (which may predate the option): the ratio is bf16 against that checkout's float32.
Every measurement records the share of the machine's CPU time that other processes used while it
ran (/proc/stat less the worker's own os.times()): on two cores, two threads collapse under load,
so read the ratios together with it.

    python benchmarks/beam_throughput.py [--length 2000] [--rounds 3] [--baseline /path/to/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

V = 68
MODES = ("beam1", "beam4", "beam16", "sample1")  # and beam4-bf16, beam16-bf16


def cpu_busy():
    """(busy jiffies of the whole machine, this process's CPU seconds)."""
    with open("/proc/stat") as f:
        a = [int(x) for x in f.readline().split()[1:]]
    t = os.times()
    return sum(a) - a[3] - a[4], t.user + t.system  # idle and iowait are not busy


def worker(mode: str, H: int, length: int, nthreads: int | None) -> dict:
    from charrnn import threads
    from charrnn.beam import beam_search
    from charrnn.generate import SampleOptions, sample_pieces
    from charrnn.model import Model, ModelConfig
    from charrnn.vocab import Vocab

    threads.set_threads(nthreads)
    vocab = Vocab([chr(32 + i) for i in range(V - 3)])
    m = Model(ModelConfig(layers=2, hidden=H, vocab_size=V)).init(0)
    prime = vocab.encode("THE ")
    if mode.startswith("beam"):
        K, _, prec = mode[4:].partition("-")
        K, kw = int(K), ({"precision": prec} if prec else {})
        beam_search(m, vocab, prime, K, 20, **kw)  # compile / load the kernels, make the buffers

        def run():
            return len(beam_search(m, vocab, prime, K, length, **kw)[0].text)
    else:
        def run():
            opts = SampleOptions(temp=1.0, length=length, num=1, prime="THE ", seed=1)
            return sum(len(p.text) for p in sample_pieces(m, vocab, opts))
        run()
    b0, own0 = cpu_busy()
    t0 = time.perf_counter()
    n = run()
    wall = time.perf_counter() - t0
    b1, own1 = cpu_busy()
    ncpu = os.cpu_count() or 1
    other = max(0.0, (b1 - b0) / os.sysconf("SC_CLK_TCK") - (own1 - own0)) / (ncpu * wall)
    # per CPU-second of this process: with one thread, a rate that time slices lost to other
    # processes do not lower (cache sharing still does); with two, spinning counts as work
    return {"chars_per_s": n / wall, "other_cpu": other, "chars_per_cpu_s": n / max(own1 - own0, 1e-9)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--baseline", default=None, metavar="PATH",
                    help="another checkout of charrnn, measured interleaved with this one (before/after)")
    ap.add_argument("--threads", type=int, default=None, help="threads (default: every core)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.hidden, args.length, args.threads)))
        return
    sides = ["this"] + (["baseline"] if args.baseline else [])
    modes = args.modes.split(",")
    res = {}
    print(f"2x{args.hidden} LSTM, V = {V}, {args.length} positions per search, {args.rounds} interleaved rounds, "
          f"{args.threads or 'all'} threads", flush=True)
    for r in range(args.rounds):
        for mode in modes:
            for side in sides:
                env = dict(os.environ)
                if side == "baseline":
                    env["PYTHONPATH"] = os.path.abspath(args.baseline)
                run_mode = mode.partition("-")[0] if side == "baseline" else mode
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", run_mode, "--hidden", str(args.hidden),
                       "--length", str(args.length)] + (["--threads", str(args.threads)] if args.threads else [])
                out = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                     cwd=os.path.dirname(os.path.abspath(__file__)))
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    raise SystemExit("worker failed")
                v = json.loads(out.stdout.strip().splitlines()[-1])
                res.setdefault((mode, side), []).append(v)
                print(f"round {r} {mode:11s} {side:8s} {v['chars_per_s']:10,.0f} chars/s "
                      f"({v['chars_per_cpu_s']:10,.0f} per CPU-second)   other processes {v['other_cpu']:.0%} of the CPUs",
                      flush=True)
    print()
    width = max(8, *(len(m) for m in modes))
    head = f"{'mode':{width}s} {'this':>10s}"
    if args.baseline:
        head += f" {'baseline':>10s} {'ratio':>7s}   per CPU-second: {'this':>10s} {'baseline':>10s} {'ratio':>7s}"
    print(head + "   other CPU (median)")
    for mode in modes:
        med = {s: statistics.median(x["chars_per_s"] for x in res[(mode, s)]) for s in sides}
        cpu = {s: statistics.median(x["chars_per_cpu_s"] for x in res[(mode, s)]) for s in sides}
        other = statistics.median(x["other_cpu"] for s in sides for x in res[(mode, s)])
        line = f"{mode:{width}s} {med['this']:10,.0f}"
        if args.baseline:
            line += (f" {med['baseline']:10,.0f} {med['this'] / med['baseline']:6.2f}x   {'':16s}{cpu['this']:10,.0f} "
                     f"{cpu['baseline']:10,.0f} {cpu['this'] / cpu['baseline']:6.2f}x")
        print(line + f"   {other:.0%}")


if __name__ == "__main__":
    main()
