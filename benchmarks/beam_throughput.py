"""Beam search throughput: characters of settled text per second for `sample --beam K`, K = 1, 4
and 16, on a 2x256 LSTM with random weights (V = 68); the compiled sampler (temperature 1, one
stream) beside it for scale. One position of a beam is one Model.step over its K streams (plus the
greedy stream for K > 1), a log-softmax and a top-K over K x V scores in numpy, and a State.take.

    python benchmarks/beam_throughput.py [--length 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

V = 68


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()

    import numba

    from charrnn import threads
    from charrnn.beam import beam_search
    from charrnn.generate import SampleOptions, sample_pieces
    from charrnn.model import Model, ModelConfig
    from charrnn.vocab import Vocab

    threads.set_threads(None)
    vocab = Vocab([chr(32 + i) for i in range(V - 3)])
    m = Model(ModelConfig(layers=2, hidden=args.hidden, vocab_size=V)).init(0)
    prime = vocab.encode("THE ")
    beam_search(m, vocab, prime, 4, 10)  # compile / load the kernels
    print(f"2x{args.hidden} LSTM, V = {V}, {args.length} characters per run, median of {args.rounds} rounds, "
          f"{numba.get_num_threads()} threads")
    for K in (1, 4, 16):
        rates = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            out = beam_search(m, vocab, prime, K, args.length)
            rates.append(len(out[0].text) / (time.perf_counter() - t0))
        print(f"beam K = {K:2d}: {statistics.median(rates):9,.0f} chars/s")
    rates = []
    for _ in range(args.rounds):
        opts = SampleOptions(temp=1.0, length=args.length, num=1, prime="THE ", seed=1)
        t0 = time.perf_counter()
        n = sum(len(p.text) for p in sample_pieces(m, vocab, opts))
        rates.append(n / (time.perf_counter() - t0))
    print(f"sampling (compiled loop, 1 stream): {statistics.median(rates):9,.0f} chars/s")


if __name__ == "__main__":
    main()
