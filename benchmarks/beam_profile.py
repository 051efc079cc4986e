"""Where a position of `sample --beam K` goes, and why two threads do not halve it: a 2x256 LSTM
with random weights (V = 68), K + 1 streams (the beam and the greedy stream beside it).

Three parts, all timed as the best of several rounds on this process's warm kernels:

1. The search: microseconds per position, from two searches of different lengths (their
   difference, so the start and the read-out cancel), on one thread, and on two splitting the
   units or the streams (kernels/search.py; split_streams chooses between them).
2. One thread's share of a position with two threads (block 0 of the units, kernels/search.py's
   layer_block for every layer), alone in a loop on one thread:
     products      its matrix products only (gemm.mm_packed on its panels)
     layers        the products with the gathers, bias folds and the cell's element-wise work
     + decode      and the decoder and the log-softmax of every stream
   The sum of one thread's share (layers + half the decode) and the serial parts is what a
   position would take if the two threads lost nothing to each other; the search takes more
   (benchmarks/results/beam_throughput.txt says how much, and what was ruled out).
3. The serial parts: the decoder, the log-softmax, the top-K of beam.py's rules and the reorder
   of the state by parents (one thread runs the last two while the others wait).

With --precision bf16 the search and the share run on bfloat16 products (`sample --precision
bf16`); the products line is float32's only.

    python benchmarks/beam_profile.py [--width 16] [--hidden 256] [--precision fp32|bf16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np
from numba import njit

from charrnn import threads
from charrnn.beam import beam_search
from charrnn.kernels import gemm16, search
from charrnn.kernels.gemm import mm_packed
from charrnn.kernels.jit import HELPER
from charrnn.kernels.layout import thread_rows
from charrnn.kernels.mathf import rows
from charrnn.model import Model, ModelConfig, State
from charrnn.vocab import Vocab

V = 68
ROUNDS = 25  # this machine's timings wander by 20-30% between rounds; the best of many is stable


def best_us(f, reps: int, rounds: int = 7) -> float:
    """Best time of one call of f over `rounds` rounds of `reps` calls, in microseconds."""
    b = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            f()
        b = min(b, (time.perf_counter() - t) / reps)
    return b * 1e6


@njit(**HELPER)
def _products(net, pk, wk, nb, p, G, reps):
    H = net.H
    Hp = pk.ub[p + 1] - pk.ub[p]
    for _ in range(reps):
        for k in range(net.L):
            hp = thread_rows(wk.hp, p, nb, G * Hp)
            if k > 0:
                gp = thread_rows(wk.gp, p, nb, G * Hp)
                mm_packed(rows(wk.hs[k - 1, 1], 0, nb), pk.wih[p][(k - 1) * pk.chunk : k * pk.chunk], gp, H)
            mm_packed(rows(wk.hs[k, 0], 0, nb), pk.whh[p][k * pk.chunk : (k + 1) * pk.chunk], hp, H)


@njit(**HELPER)
def _share(prec, cell, net, pk, wk, tok, nb, p, decode, lp, reps):
    gemm16.tiles_on(prec, 0)
    for _ in range(reps):
        for k in range(net.L):
            search.layer_block(prec, cell, net, pk, wk, tok, 0, nb, k, p, pk.ub[p], pk.ub[p + 1])
        if decode:
            search.decode(prec, net, pk, wk, 0, 0, nb)
            for r in range(nb):
                search.log_softmax_row(wk.logits[r], lp[r])
    gemm16.tiles_off(prec)


@njit(**HELPER)
def _decode_lsm(prec, net, pk, wk, nb, lp, which, reps):
    gemm16.tiles_on(prec, 0)
    for _ in range(reps):
        if which == 0:
            search.decode(prec, net, pk, wk, 0, 0, nb)
        else:
            for r in range(nb):
                search.log_softmax_row(wk.logits[r], lp[r])
    gemm16.tiles_off(prec)


@njit(**HELPER)
def _topk(lp, score, top_v, top_i, reps):
    K, V = top_v.shape[0], lp.shape[1]
    for _ in range(reps):
        cnt = 0
        for r in range(lp.shape[0] - 1):
            for v in range(V):
                x = score[r] + lp[r, v]
                if x > -np.inf:
                    cnt = search.top_insert(top_v, top_i, cnt, K, x, r * V + v)


@njit(**HELPER)
def _reorder(wk, keep, nb, L, reps):
    for _ in range(reps):
        for k in range(L):
            for j in range(nb):
                wk.hs[k, 0, j, :] = wk.hs[k, 1, keep[j], :]
                wk.cs[k, 0, j, :] = wk.cs[k, 1, keep[j], :]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=16, help="beam width K")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--threads", type=int, default=2, help="threads of part 1's two splits (default 2)")
    args = ap.parse_args()
    K, H, prec = args.width, args.hidden, args.precision
    nb = K + 1
    vocab = Vocab([chr(32 + i) for i in range(V - 3)])
    m = Model(ModelConfig(layers=2, hidden=H, vocab_size=V)).init(0)
    prime = vocab.encode("THE ")
    print(f"# 2x{H} LSTM, V = {V}, --beam {K} ({nb} streams), {prec} products")

    print("1. the search, microseconds per position")
    auto = "streams" if search.split_streams(search.panel_bytes(m._backend(prec), m.cfg.G, m.cfg.layers, H, 4), nb) else "units"
    nt = args.threads
    for n, split in ((1, None), (nt, "units"), (nt, "streams")):
        threads.set_threads(n)
        m.SEARCH_SPLIT = split
        beam_search(m, vocab, prime, K, 20, precision=prec)
        a = best_us(lambda: beam_search(m, vocab, prime, K, 400, precision=prec), 1, 5)
        b = best_us(lambda: beam_search(m, vocab, prime, K, 2400, precision=prec), 1, 5)
        what = "1 thread " if split is None else f"{n} threads, {split} split{' (the default)' if split == auto else ''}"
        print(f"   {what:38s} {(b - a) / 2000:7.1f} us")
    m.SEARCH_SPLIT = None
    threads.set_threads(1)

    ps = m.packed_steps(blocks=2, precision=prec)
    state = State(*m.zero_state(nb))
    tok = (np.arange(nb, dtype=np.int32) % (V - 3)) + 3
    ps.step(tok, state)
    wk, pk = ps._work[nb], ps.packed
    lp = np.zeros((nb, V))
    Hp = int(pk.ub[1] - pk.ub[0])
    G = m.cfg.G
    flops = 2 * nb * H * G * Hp * (2 * m.cfg.layers - 1)
    print(f"2. one thread's share of a position with two threads (block 0: {Hp} units)")
    if prec == "fp32":
        _products(m._net, pk, wk, nb, 0, G, 1)
        t = best_us(lambda: _products(m._net, pk, wk, nb, 0, G, 20), 4, ROUNDS) / 20
        print(f"   products        {t:7.1f} us  ({flops / t / 1e3:.0f} GFLOP/s)")
    base = (ps.prec, m.cell, m._net, pk, wk, tok, nb, 0)
    for name, dec in [("layers", False), ("+ decode", True)]:
        _share(*base, dec, lp, 1)
        t = best_us(lambda: _share(*base, dec, lp, 20), 4, ROUNDS) / 20
        print(f"   {name:15s} {t:7.1f} us")

    print("3. serial parts (one thread)")
    for name, which in [("decode", 0), ("log-softmax", 1)]:
        _decode_lsm(ps.prec, m._net, pk, wk, nb, lp, which, 1)
        print(f"   {name:15s} {best_us(lambda: _decode_lsm(ps.prec, m._net, pk, wk, nb, lp, which, 50), 4) / 50:7.1f} us"
              f"  (all {nb} streams)")
    score = np.random.default_rng(0).standard_normal(nb) * 0.1
    top_v, top_i = np.zeros(K), np.zeros(K, dtype=np.int64)
    _topk(lp, score, top_v, top_i, 1)
    print(f"   top-{K:<11d} {best_us(lambda: _topk(lp, score, top_v, top_i, 50), 4) / 50:7.1f} us  (of {K * V} candidates)")
    keep = np.arange(nb)[::-1].copy()
    _reorder(wk, keep, nb, m.cfg.layers, 1)
    print(f"   reorder         {best_us(lambda: _reorder(wk, keep, nb, m.cfg.layers, 50), 4) / 50:7.1f} us")


if __name__ == "__main__":
    main()
