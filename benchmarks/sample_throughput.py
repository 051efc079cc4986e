"""Sampling and scoring throughput of charrnn against PyTorch, side by side in one run.

- single-stream sampling: charrnn's compiled generation loop (default settings) against PyTorch's
  own step-by-step loop (nn.LSTM + nn.Linear + softmax + multinomial, one character at a time),
  at PyTorch's best setting (1 thread, oneDNN off) and its default (2 threads, oneDNN on);
- 64-stream sampling: the same with 64 streams in lock step;
- eval: scoring a 100k-character text as docs/design.md defines it (one stream from a zero state)
  against PyTorch's forward over the same text (nn.LSTM over the whole sequence in one call).

Sizes: 2x128, 2x256, 2x512 LSTMs, V = 68. Interleaved rounds, medians.

    python benchmarks/sample_throughput.py [--rounds 3] [--sizes 128,256,512]
    python benchmarks/sample_throughput.py --baseline /path/to/other/checkout   # before/after, interleaved
    python benchmarks/sample_throughput.py --baseline PATH --no-torch --modes single,batch64 --sizes 256
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


def charrnn_side(H, streams, seconds, mode):
    import numpy as np

    from charrnn import threads
    from charrnn.evaluate import score_tokens
    from charrnn.generate import SampleOptions, sample_chunks
    from charrnn.model import Model, ModelConfig
    from charrnn.vocab import Vocab

    threads.set_threads(None)
    chars = [chr(32 + i) for i in range(V - 3)]
    vocab = Vocab(chars)
    m = Model(ModelConfig(layers=2, hidden=H, vocab_size=V)).init(0)
    if mode == "eval":
        rng = np.random.default_rng(0)
        tokens = np.concatenate([[0], rng.integers(3, V, 100_000)]).astype(np.int32)
        score_tokens(m, tokens[:1000])
        t0 = time.perf_counter()
        score_tokens(m, tokens)
        return 100_000 / (time.perf_counter() - t0)
    opts = SampleOptions(temp=1.0, length=0 if streams == 1 else 10**9, num=streams, seed=1)
    it = sample_chunks(m, vocab, opts, documents=False, target_s=0.05)
    n = 0
    t0 = None
    for _b, text, _fin in it:
        if t0 is None:
            t0 = time.perf_counter()  # start the clock after the first chunk (compilation, warm-up)
            continue
        n += len(text)
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def torch_side(H, streams, seconds, mode, setting):
    import torch

    if setting == "best":
        torch.set_num_threads(1)
        torch.backends.mkldnn.enabled = False
    else:
        torch.set_num_threads(2)
    torch.manual_seed(0)
    rnn = torch.nn.LSTM(V, H, 2)
    dec = torch.nn.Linear(H, V)
    with torch.no_grad():
        if mode == "eval":
            x = torch.nn.functional.one_hot(torch.randint(3, V, (100_001,)), V).float().reshape(-1, 1, V)
            y = torch.randint(3, V, (100_001,))
            rnn(x[:1000])
            t0 = time.perf_counter()
            out, _ = rnn(x)
            torch.nn.functional.cross_entropy(dec(out.reshape(-1, H)), y, reduction="sum")
            return 100_000 / (time.perf_counter() - t0)
        state = (torch.zeros(2, streams, H), torch.zeros(2, streams, H))
        tok = torch.zeros(streams, dtype=torch.long)
        eye = torch.eye(V)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            out, state = rnn(eye[tok].reshape(1, streams, V), state)
            p = torch.softmax(dec(out[0]), dim=-1)
            tok = torch.multinomial(p, 1).reshape(streams)
            n += streams
        return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="128,256,512")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--modes", default="single,batch64,eval")
    ap.add_argument("--baseline", default=None, metavar="PATH",
                    help="another checkout of charrnn, measured as a side of its own (before/after)")
    ap.add_argument("--no-torch", action="store_true", help="charrnn's sides only (with --baseline: before/after)")
    ap.add_argument("--worker", nargs=4, metavar=("SIDE", "H", "MODE", "SETTING"))
    args = ap.parse_args()
    if args.worker:
        side, H, mode, setting = args.worker
        streams = 64 if mode == "batch64" else 1
        emode = "eval" if mode == "eval" else "sample"
        if side == "charrnn":
            r = charrnn_side(int(H), streams, args.seconds, emode)
        else:
            r = torch_side(int(H), streams, args.seconds, emode, setting)
        print(json.dumps({"chars_per_s": r}))
        return
    try:
        import torch  # noqa: F401

        have_torch = not args.no_torch
    except ImportError:
        have_torch = False
    res = {}
    for r in range(args.rounds):
        for mode in args.modes.split(","):
            for H in args.sizes.split(","):
                runs = [("charrnn", "default")]
                if args.baseline:
                    runs.append(("charrnn", "baseline"))
                if have_torch:
                    runs += [("torch", "best"), ("torch", "default")]
                for side, setting in runs:
                    env = dict(os.environ)
                    if setting == "baseline":
                        env["PYTHONPATH"] = os.path.abspath(args.baseline)
                    out = subprocess.run([sys.executable, __file__, "--worker", side, H, mode, setting,
                                          "--seconds", str(args.seconds)], capture_output=True, text=True, env=env,
                                         cwd=os.path.dirname(os.path.abspath(__file__)))
                    if out.returncode != 0:
                        print(out.stderr, file=sys.stderr)
                        raise SystemExit("worker failed")
                    v = json.loads(out.stdout.strip().splitlines()[-1])["chars_per_s"]
                    res.setdefault((mode, H, side, setting), []).append(v)
                    print(f"round {r} {mode:8s} 2x{H:4s} {side:8s} {setting:8s} {v:12,.0f} chars/s", flush=True)
    print()
    print(f"{'mode':8s} {'size':6s} {'charrnn':>12s} {'torch best':>12s} {'torch dflt':>12s} {'ratio vs best':>14s}")
    for mode in args.modes.split(","):
        for H in args.sizes.split(","):
            c = statistics.median(res[(mode, H, "charrnn", "default")])
            tb = statistics.median(res[(mode, H, "torch", "best")]) if have_torch else float("nan")
            td = statistics.median(res[(mode, H, "torch", "default")]) if have_torch else float("nan")
            best = max(tb, td)
            line = f"{mode:8s} 2x{H:4s} {c:12,.0f} {tb:12,.0f} {td:12,.0f} {c / best:14.2f}"
            if args.baseline:
                base = statistics.median(res[(mode, H, "charrnn", "baseline")])
                line += f"   baseline {base:12,.0f}, this checkout {c / base:.2f}x"
            print(line)


if __name__ == "__main__":
    main()
