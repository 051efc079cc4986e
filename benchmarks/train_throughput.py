"""Training-step throughput of charrnn's compiled core against PyTorch, side by side.

A full step of an LSTM (or a GRU with --cell gru): forward, backward, global-norm clipping, Adam
update, hidden state carried. For each configuration (layers x hidden / batch x steps, V = 68 as
tiny Shakespeare plus 3 special tokens) each side runs in its own subprocess (so peak RSS is its
own), interleaved charrnn, charrnn-bf16, torch, torch-fused, torch-bf16, charrnn, ... and the medians
are reported with the ratios, effective GFLOP/s and peak RSS. charrnn-bf16 is --precision bf16's step
(bfloat16 products, float32 sums: charrnn/precision.py); torch-bf16 is PyTorch's fused Adam with the
forward under torch.autocast("cpu", dtype=torch.bfloat16), its fastest CPU setting where the CPU
has bfloat16 products; the bf16 line compares charrnn's bf16 with the faster of torch-fused and
torch-bf16 measured in the same run. The CPU time other processes used during each timed part is
measured (from /proc/stat) and a measurement is flagged when the machine was busy, since two
threads on two cores collapse under any other load.

    python benchmarks/train_throughput.py                 # all configs, 3 rounds
    python benchmarks/train_throughput.py --configs A,B --rounds 5 --seconds 8
    python benchmarks/train_throughput.py --cell gru      # GRUs (what a --minutes run trains)
    python benchmarks/train_throughput.py --baseline /path/to/other/checkout   # before/after, interleaved
                                             # (float32, and bf16 too when charrnn-bf16 is a side)
    python benchmarks/train_throughput.py --configs 2x640/32x64,2x768/48x64 --sides charrnn-bf16@streams,charrnn-bf16@units
                                             # any size; a side@units or side@streams forces the threads' split
    python benchmarks/train_throughput.py --vocab 50004 --configs B --sides charrnn   # a CJK-sized vocabulary
    python benchmarks/train_throughput.py --cell gru --configs B --weight-drop 0.2 --average   # regularised steps

With --weight-drop P every step draws a new DropConnect mask for every layer's weight_hh (charrnn:
Model.weight_masks, as train.py does; torch: AWD-LSTM's way, the module run through
torch.func.functional_call on weight_hh * mask); with --average the optimizer's pass also moves an
exponential average of the weights (charrnn only: torch's step is left as is, so the ratio shows
the whole cost). The side "charrnn-reg" is charrnn with those options while "charrnn" runs without
them, so one invocation interleaves the two (the cost measured side by side):

    python benchmarks/train_throughput.py --cell gru --configs B --sides charrnn,charrnn-reg --weight-drop 0.3 --average
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/train_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {  # name: (layers, hidden, batch, seq)
    "A": (2, 128, 50, 50),
    "B": (2, 256, 32, 64),
    "C": (2, 512, 50, 50),
    "D": (3, 512, 64, 100),
    "E": (2, 768, 32, 64),  # what --minutes 30 trains on tiny Shakespeare here (LSTM, bf16)
}
V = 68


def step_flops(L, H, B, T, G=4):
    """Effective FLOPs of one training step, one-hot input counted as a dense product (as PyTorch
    computes it): forward matrix products, and twice that for backward."""
    fwd = 0
    for k in range(L):
        In = V if k == 0 else H
        fwd += 2 * G * H * (In + H)
    fwd += 2 * V * H
    return 3 * fwd * B * T


def _busy_jiffies():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + vals[4]
    return sum(vals) - idle


def _own_cpu():
    t = os.times()
    return t.user + t.system


def config(name):
    """(layers, hidden, batch, seq) of a CONFIGS name, or of a spec such as 2x640/32x64."""
    if name in CONFIGS:
        return CONFIGS[name]
    try:
        (L, H), (B, T) = (map(int, part.split("x")) for part in name.split("/"))
    except ValueError:
        raise SystemExit(f"config {name!r}: a name of {sorted(CONFIGS)} or LAYERSxHIDDEN/BATCHxSEQ") from None
    return L, H, B, T


def force_split(split):
    """Make every training batch in this process split its threads by `split` (units or streams),
    whatever kernels/bptt.py's plan would choose."""
    from charrnn.kernels import bptt

    if split == "units":
        bptt.UNITS_SPLIT_MIN_H = 0
        bptt.MIN_STREAMS_PER_THREAD = bptt.MIN_STREAMS_PER_THREAD_PAST_L2 = 10**9
    elif split == "streams":
        bptt.MIN_STREAMS_PER_THREAD = bptt.MIN_STREAMS_PER_THREAD_PAST_L2 = 0
    else:
        raise SystemExit(f"side @{split}: @units or @streams")


def worker(side, name, seconds, threads, cell, weight_drop=0.0, average=False):
    L, H, B, T = config(name)
    side, _, split = side.partition("@")
    if split:
        force_split(split)
    G = {"lstm": 4, "gru": 3}[cell]
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(3, V, size=(T, B)).astype(np.int32)
    y = rng.integers(3, V, size=(T, B)).astype(np.int32)
    if side in ("charrnn", "charrnn-bf16"):  # this checkout, or with --baseline another one on PYTHONPATH
        from charrnn import threads as th
        from charrnn.model import Model, ModelConfig
        from charrnn.optim import clip_grad_norm, make_optimizer

        th.set_threads(threads)
        m = Model(ModelConfig(cell=cell, layers=L, hidden=H, vocab_size=V)).init(0)
        opt = make_optimizer("adam", m.n_params, m.dtype, 2e-3)
        h, c = m.zero_state(B)
        wm = None
        avg = m.theta.copy() if average else None
        count = [0]

        def step():
            nonlocal h, c, wm
            count[0] += 1
            if weight_drop > 0:
                wm = m.weight_masks(0, count[0], weight_drop, out=wm)
            if side == "charrnn-bf16":
                out = m.forward_backward(x, y, h, c, weight_masks=wm, precision="bf16")
            else:
                out = m.forward_backward(x, y, h, c, weight_masks=wm)
            clip_grad_norm(out["grad"], 5.0)
            if average:
                opt.step(m.theta, out["grad"], 2e-3, avg=avg, rate=0.001)
            else:
                opt.step(m.theta, out["grad"], 2e-3)
            h, c = out["h"], out["c"]
    else:  # "torch" (its default, foreach Adam), "torch-fused" (fused Adam), "torch-bf16" (fused + bf16 autocast)
        import torch

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        rnn = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(V, H, L)
        dec = torch.nn.Linear(H, V)
        params = list(rnn.parameters()) + list(dec.parameters())
        opt = torch.optim.Adam(params, lr=2e-3, fused=side in ("torch-fused", "torch-bf16"))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=side == "torch-bf16")
        xt = torch.nn.functional.one_hot(torch.from_numpy(x).long(), V).float()
        yt = torch.from_numpy(y).long().reshape(-1)
        state = (torch.zeros(L, B, H), torch.zeros(L, B, H)) if cell == "lstm" else torch.zeros(L, B, H)

        hh = {n: p for n, p in rnn.named_parameters() if n.startswith("weight_hh")}

        def step():
            nonlocal state
            opt.zero_grad(set_to_none=True)
            with autocast:
                if weight_drop > 0:
                    run_with = dict(rnn.named_parameters())
                    for n, p in hh.items():
                        run_with[n] = torch.nn.functional.dropout(p, weight_drop, training=True)
                    out, st = torch.func.functional_call(rnn, run_with, (xt, state))
                else:
                    out, st = rnn(xt, state)
                logits = dec(out)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), yt)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            state = tuple(s.detach().float() for s in st) if cell == "lstm" else st.detach().float()

    t_first = time.perf_counter()
    step()  # compile / first call
    first = time.perf_counter() - t_first
    for _ in range(2):
        step()
    n = 0
    j0, c0 = _busy_jiffies(), _own_cpu()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        step()
        n += 1
    dt = time.perf_counter() - t0
    j1, c1 = _busy_jiffies(), _own_cpu()
    hz = os.sysconf("SC_CLK_TCK")
    others = max(0.0, (j1 - j0) / hz - (c1 - c0))
    print(json.dumps({
        "side": side, "config": name, "chars_per_s": n * B * T / dt, "steps": n, "first_call_s": first,
        "gflops": step_flops(L, H, B, T, G) * n / dt / 1e9,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "other_cpu_frac": others / dt,
    }))


def main():
    global V
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="A,B,C,D")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sides", default="charrnn,charrnn-bf16,torch,torch-fused,torch-bf16",
                    help="charrnn-bf16: --precision bf16's step; torch: PyTorch's default (foreach) Adam; "
                         "torch-fused: fused=True; torch-bf16: fused Adam under torch.autocast('cpu', bfloat16)")
    ap.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    ap.add_argument("--baseline", default=None, metavar="PATH",
                    help="another checkout of charrnn, measured as a side of its own (before/after)")
    ap.add_argument("--vocab", type=int, default=68, metavar="V",
                    help="vocabulary size, special tokens included (PyTorch's one-hot input is a dense V-wide "
                         "product: compare with it only for small V)")
    ap.add_argument("--weight-drop", type=float, default=0.0, metavar="P")
    ap.add_argument("--average", action="store_true")
    ap.add_argument("--worker", nargs=2, metavar=("SIDE", "CONFIG"))
    args = ap.parse_args()
    V = args.vocab
    if args.worker:
        worker(args.worker[0], args.worker[1], args.seconds, args.threads, args.cell, args.weight_drop, args.average)
        return
    for name in args.configs.split(","):
        config(name)  # a bad name stops here, not in a worker
    sides = args.sides.split(",")
    if args.baseline:  # the other checkout's float32 step, and its bf16 step beside ours
        sides.insert(1, "baseline")
        if "charrnn-bf16" in sides:
            sides.insert(sides.index("charrnn-bf16") + 1, "baseline-bf16")
    if any(s.startswith("torch") for s in sides):
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch not importable: charrnn only", file=sys.stderr)
            sides = [s for s in sides if not s.startswith("torch")]
    env_note = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    print(f"# {args.cell}, V {V}, env {env_note}, threads {args.threads}, {args.rounds} rounds x {args.seconds}s, "
          f"weight drop {args.weight_drop:g}, average {args.average}", flush=True)
    results = {}
    for r in range(args.rounds):
        for name in args.configs.split(","):
            for side in sides:
                env = dict(os.environ)
                if side.startswith("baseline"):
                    env["PYTHONPATH"] = os.path.abspath(args.baseline)
                worker_side = {"baseline": "charrnn", "charrnn-reg": "charrnn", "baseline-bf16": "charrnn-bf16"}.get(side, side)
                # with a charrnn-reg side, the plain charrnn side runs without the regularisers
                reg = side != "charrnn" or "charrnn-reg" not in sides
                wd, av = (args.weight_drop, args.average) if reg else (0.0, False)
                out = subprocess.run([sys.executable, __file__, "--worker", worker_side, name, "--seconds",
                                      str(args.seconds), "--threads", str(args.threads), "--cell", args.cell,
                                      "--vocab", str(V), "--weight-drop", str(wd)]
                                     + (["--average"] if av else []),
                                     capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    raise SystemExit(f"worker {side} {name} failed")
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                flag = "  BUSY" if rec["other_cpu_frac"] > 0.1 else ""
                print(f"round {r} {name} {side:11s} {rec['chars_per_s']:>10,.0f} chars/s {rec['gflops']:6.1f} GFLOP/s "
                      f"rss {rec['peak_rss_mib']:6.0f} MiB  others {rec['other_cpu_frac']:.2f}{flag}", flush=True)
                results.setdefault((name, side), []).append(rec)
    print()
    print(f"{'cfg':4s} {'charrnn chars/s':>16s} {'torch chars/s':>14s} {'ratio':>6s} {'fused chars/s':>14s} {'ratio':>6s} "
          f"{'GFLOP/s':>8s} {'rss MiB':>8s} {'torch rss':>9s}")
    for name in args.configs.split(","):
        def med(side, key="chars_per_s"):
            rs = results.get((name, side), [])
            return statistics.median(x[key] for x in rs) if rs else float("nan")

        def peak(side):
            rs = results.get((name, side), [])
            return max(x["peak_rss_mib"] for x in rs) if rs else float("nan")

        cm, tm, fm = med("charrnn"), med("torch"), med("torch-fused")
        print(f"{name:4s} {cm:16,.0f} {tm:14,.0f} {cm / tm:6.2f} {fm:14,.0f} {cm / fm:6.2f} {med('charrnn', 'gflops'):8.1f} "
              f"{peak('charrnn'):8.0f} {peak('torch'):9.0f}")
        if "charrnn-bf16" in sides or "torch-bf16" in sides:
            bm, tb = med("charrnn-bf16"), med("torch-bf16")
            best = max((v for v in (fm, tb) if v == v), default=float("nan"))  # PyTorch's fastest measured here
            print(f"{'':4s} charrnn bf16 {bm:,.0f} chars/s ({med('charrnn-bf16', 'gflops'):.1f} GFLOP/s, "
                  f"{peak('charrnn-bf16'):.0f} MiB): {bm / cm:.2f}x charrnn fp32; torch bf16 autocast {tb:,.0f} "
                  f"({tb / fm:.2f}x torch-fused); charrnn bf16 / PyTorch's fastest {bm / best:.2f}x")
        if "charrnn-reg" in sides:
            rm = med("charrnn-reg")
            print(f"{'':4s} with --weight-drop {args.weight_drop:g}{' and --average' if args.average else ''}: "
                  f"{rm:,.0f} chars/s, {rm / cm:.3f}x the plain step; {rm / fm:.2f}x torch-fused")
        for side in sides:
            if "@" in side:
                print(f"{'':4s} {side} {med(side):,.0f} chars/s")
        for side in sides:
            if side.endswith("@units") and side.replace("@units", "@streams") in sides:
                print(f"{'':4s} {side.replace('@units', '')}: units / streams {med(side) / med(side.replace('@units', '@streams')):.2f}x")
        if args.baseline:
            bm = med("baseline")
            print(f"{'':4s} baseline {bm:,.0f} chars/s, {peak('baseline'):.0f} MiB: this checkout {cm / bm:.2f}x")
            if "baseline-bf16" in sides:
                bb = med("baseline-bf16")
                print(f"{'':4s} baseline bf16 {bb:,.0f} chars/s: this checkout's bf16 {med('charrnn-bf16') / bb:.2f}x")

if __name__ == "__main__":
    main()
