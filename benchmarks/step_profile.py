"""Where a training step's time goes, float32 against bf16: matrix products, everything else
(element-wise gate work, softmax, conversions outside the products, bookkeeping) and, with two
threads, waiting (barriers and imbalance).

For each configuration and precision, on one thread:
  step      the whole forward and backward of a (T, B) batch (Model.forward_backward)
  products  the same step's matrix products alone, replayed with the kernels' own product
            functions (kernels/bptt.py: times_t, times, t_times, rec_pack, rec_times) at the same
            shapes: for bf16 that includes rounding and packing their operands
  other     step - products
and on two threads the step again: waiting ~ step(2 threads) - step(1 thread) / 2, the time lost
to the split (an ideal split would halve it). Effective GFLOP/s count the products as PyTorch
computes them (train_throughput.step_flops), against the machine's float32 FMA peak and AMX's
bfloat16 peak at the clock /proc/cpuinfo reports (a nominal figure: turbo changes it).

    python benchmarks/step_profile.py                   # configs A, B, C, LSTM
    python benchmarks/step_profile.py --configs B --cell gru --reps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba
import numpy as np

from benchmarks.train_throughput import CONFIGS, step_flops
from charrnn import threads
from charrnn.kernels import bptt, gemm16
from charrnn.kernels.layout import decoder_weights, layer_weights
from charrnn.model import Model, ModelConfig

V = 68


@numba.njit(nogil=True)
def _products(prec, scr, net, L, H, G, T, B, tb_h, tb_gh, tb_v, dh, hp, gW, gWd):
    """The matrix products of one step of a (T, B) batch, in the order bptt._forward_backward
    makes them (one thread: all streams, all units)."""
    gemm16.tiles_on(prec, 0)
    for k in range(L):
        W_ih, W_hh, _, _ = layer_weights(net.theta, net, k, G)
        if k > 0:
            bptt.times_t(prec, 0, tb_h, W_ih, tb_gh)
        bptt.rec_pack(prec, scr, 0, W_hh, G, H, B, 0, H, False)
        for t in range(T):
            bptt.rec_times(prec, scr, 0, tb_h[t * B : (t + 1) * B], W_hh, G, H, B, 0, H, False, hp)
    Wd, _ = decoder_weights(net.theta, net)
    bptt.times_t(prec, 0, tb_h, Wd, tb_v)
    bptt.t_times(prec, 0, tb_v, tb_h, gWd)
    bptt.times(prec, 0, tb_v, Wd, tb_h)
    for k in range(L - 1, -1, -1):
        W_ih, W_hh, _, _ = layer_weights(net.theta, net, k, G)
        bptt.rec_pack(prec, scr, 0, W_hh, G, H, B, 0, H, True)
        for t in range(T):
            bptt.rec_times(prec, scr, 0, tb_gh[t * B : (t + 1) * B], W_hh, G, H, B, 0, H, True, dh)
        bptt.t_times(prec, 0, tb_gh, tb_h, gW)
        if k > 0:
            bptt.t_times(prec, 0, tb_gh, tb_h, gW)
            bptt.times(prec, 0, tb_gh, W_ih, tb_h)
    gemm16.tiles_off(prec)


def _best(fn, reps):
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def _clock_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return mhz[0] / 1000 if mhz else float("nan")
    except OSError:
        return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="A,B,C")
    ap.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    have = gemm16.backends()
    precs = ["fp32"] + ([have[0]] if have else [])
    ghz = _clock_ghz()
    cores = 2
    print(f"# {args.cell}, V {V}, clock {ghz:.2f} GHz (nominal), bf16 backend {have[0] if have else 'none'}; "
          f"peaks on {cores} cores: float32 FMA {cores * 64 * ghz:.0f} GFLOP/s, AMX bf16 {cores * 1024 * ghz:.0f}")
    print(f"{'cfg':4s} {'prec':5s} {'step 1T ms':>10s} {'products':>9s} {'other':>7s} {'step 2T':>8s} {'waiting':>8s} "
          f"{'GFLOP/s 2T':>10s} {'prod GFLOP/s 1T':>15s}")
    for name in args.configs.split(","):
        L, H, B, T = CONFIGS[name]
        G = {"lstm": 4, "gru": 3}[args.cell]
        m = Model(ModelConfig(cell=args.cell, layers=L, hidden=H, vocab_size=V)).init(0)
        rng = np.random.default_rng(0)
        x = rng.integers(3, V, size=(T, B)).astype(np.int32)
        y = rng.integers(3, V, size=(T, B)).astype(np.int32)
        h, c = m.zero_state(B)
        flops = step_flops(L, H, B, T, G)
        for prec in precs:
            res = {}
            for n in (1, 2):
                threads.set_threads(n)
                res[n] = _best(lambda: m.forward_backward(x, y, h, c, precision=prec), args.reps)[0]
            threads.set_threads(1)
            ws = bptt.Workspace(args.cell, G, m._net, T, B, 1, True, False, np.float32, prec)
            f32 = np.float32
            tb_h, tb_gh, tb_v = (rng.standard_normal((T * B, w)).astype(f32) * 0.1 for w in (H, G * H, V))
            dh, hp = np.zeros((B, H), f32), np.zeros((B, G * H), f32)
            gW, gWd = np.zeros((G * H, H), f32), np.zeros((V, H), f32)
            prod = _best(lambda: _products(ws.prec, ws.scratch, m._net, L, H, G, T, B, tb_h, tb_gh, tb_v, dh, hp,
                                           gW, gWd), args.reps)[0]
            one, two = res[1], res[2]
            print(f"{name:4s} {prec:5s} {one * 1e3:10.2f} {prod * 1e3:9.2f} {(one - prod) * 1e3:7.2f} {two * 1e3:8.2f} "
                  f"{(two - one / 2) * 1e3:8.2f} {flops / two / 1e9:10.1f} {flops / prod / 1e9:15.1f}", flush=True)


if __name__ == "__main__":
    main()
