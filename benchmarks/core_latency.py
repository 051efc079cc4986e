"""Why the same training step runs at two speeds on these machines: the time the two cores take
to hand each other a cache line, measured beside the training speed, second after second.

Each round: 50,000 spin barriers between two threads (charrnn/kernels/sync.py; the cost of one
is about one cache-line round trip between the cores), then a training step (forward, backward,
clipping, Adam) for 0.7 s with the threads splitting the streams, then 0.7 s splitting the units
(a barrier per time step). On a 2-vCPU AMD EPYC the barrier took 55 ns in some minutes and
250-500 ns in others, within one process as well as between processes, while a single thread's
speed did not move: the host places the two vCPUs near or far from each other. The split by
streams, which meets once per phase instead of once per step, loses far less in the slow minutes.

    python benchmarks/core_latency.py [--rounds 20] [--config 2,128,50,50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--config", default="2,128,50,50", help="layers,hidden,batch,seq")
    args = ap.parse_args()
    from charrnn import threads
    from charrnn.kernels import bptt, layout
    from charrnn.kernels.jit import kernel
    from charrnn.kernels.sync import barrier
    from charrnn.model import Model, ModelConfig
    from charrnn.optim import clip_grad_norm, make_optimizer

    @kernel
    def ping(p, sync, n, reps):
        ep = 1
        for _ in range(reps):
            ep = barrier(sync, p, n, ep)

    if threads.set_threads(2) != 2:
        raise SystemExit("needs 2 cores")
    team = threads.team()
    L, H, B, T = map(int, args.config.split(","))
    V = 68
    rng = np.random.default_rng(0)
    x = rng.integers(3, V, size=(T, B)).astype(np.int32)
    y = rng.integers(3, V, size=(T, B)).astype(np.int32)
    sync = layout.new_sync(2)
    runs = {}
    for by_units in (False, True):  # a model each: a model keeps the plan of its first batch of a shape
        bptt.MIN_STREAMS_PER_THREAD = 10**9 if by_units else 1
        bptt.UNITS_SPLIT_MIN_H = 0 if by_units else 10**9
        m = Model(ModelConfig(cell="lstm", layers=L, hidden=H, vocab_size=V)).init(0)
        m.forward_backward(x, y, *m.zero_state(B))
        runs[by_units] = (m, make_optimizer("adam", m.n_params, m.dtype, 2e-3), list(m.zero_state(B)))

    def step(by_units):
        m, opt, state = runs[by_units]
        out = m.forward_backward(x, y, *state)
        clip_grad_norm(out["grad"], 5.0)
        opt.step(m.theta, out["grad"], 2e-3)
        state[:] = [out["h"], out["c"]]

    team.run(2, ping, sync, 2, 10, sync=sync)
    step(True)
    step(False)
    print(f"{'round':>5s} {'ns/barrier':>10s} {'streams kchars/s':>17s} {'units kchars/s':>15s}", flush=True)
    for r in range(args.rounds):
        t0 = time.perf_counter()
        team.run(2, ping, sync, 2, 50_000, sync=sync)
        ns = (time.perf_counter() - t0) / 50_000 * 1e9
        rates = []
        for by_units in (False, True):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.7:
                step(by_units)
                n += 1
            rates.append(n * B * T / (time.perf_counter() - t0) / 1e3)
        print(f"{r:5d} {ns:10.0f} {rates[0]:17.1f} {rates[1]:15.1f}", flush=True)


if __name__ == "__main__":
    main()
