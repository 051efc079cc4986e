"""The arithmetic of training's matrix products: float32, or bfloat16 operands with float32 sums.

    --precision fp32   every product in float32 (the reference; bit-exact with earlier versions)
    --precision bf16   the products of the forward and backward passes (input, recurrent, decoder,
                       weight gradients) round their operands to bfloat16 and sum in float32;
                       weights, optimizer state, gates, cell state, loss and softmax stay float32
    --precision auto   bf16 where the CPU multiplies bfloat16 faster, else fp32

Only training steps use it: validation, `eval`, sampling and every score the tool reports run in
float32, and checkpoints hold float32 weights whatever trained them (the meta record says which).

The CPU decides what bf16 can run on (kernels/gemm16.py): AMX tiles (Intel since Sapphire Rapids)
or AVX512_BF16 dot products (AMD Zen 4, Intel since Cooper Lake). auto takes AMX when it is there
and the model has at least AUTO_MIN_HIDDEN units a layer: its products run 4-10x the float32 rate
(benchmarks/results/bf16_throughput.txt). With AVX512_BF16 alone, auto times a few steps of both
on the run's own batch before the clock starts and keeps the faster. Without either, bf16 and auto
train in float32, and a bf16 that was asked for says so.

Not here: the kernels (kernels/gemm16.py, kernels/bptt.py), the option (cli/train.py, config.py).
"""

from __future__ import annotations

import time

from charrnn.config import PRECISIONS as CHOICES

AUTO_TRIES = 3  # timed forward-backward passes of each precision when auto must measure
# auto keeps float32 below this many units per layer: at 2x64 and 1x32 AMX steps ran as fast as
# float32, not faster (benchmarks/results/bf16_throughput.txt), so rounding would buy nothing
AUTO_MIN_HIDDEN = 128
# How many times float32's characters per second a bf16 run on AMX trains at, for sizing a --minutes
# run's model (budget.choose_size): measured 2.0x, 2.6x and 2.8x for 2x128, 2x256 and 2x512 LSTMs,
# 1.8x, 2.5x and 2.7x for GRUs (benchmarks/results/bf16_throughput.txt). The AVX512_BF16 backend has no
# measurement, so auto times it on the first batch, after the model is sized: as for float32.
AMX_SPEEDUP = 2.5


def backend() -> str | None:
    """The bfloat16 backend this CPU would use ("amx" or "dot"), or None."""
    from charrnn.kernels import gemm16

    have = gemm16.backends()
    return have[0] if have else None


def choose(requested: str, hidden: int | None = None) -> tuple[str, str | None]:
    """(precision, note) for a run that asked for `requested` with `hidden` units per layer (None:
    not known yet), without timing anything: precision is "fp32", "bf16", or "measure" (auto on a
    CPU with AVX512_BF16 only: measure() decides once the model is built); note is a line for
    stderr, or None."""
    if requested not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}, not {requested!r}")
    if requested == "fp32" or (requested == "auto" and hidden is not None and hidden < AUTO_MIN_HIDDEN):
        return "fp32", None
    b = backend()
    if b is None:
        if requested == "bf16":
            return "fp32", "note: this CPU has no bfloat16 products (AVX512_BF16 or AMX); training in float32"
        return "fp32", None
    if requested == "bf16" or b == "amx":
        return "bf16", None
    return "measure", None


def speedup(chosen: str) -> float:
    """How many times float32's speed a run of the `chosen` precision (choose's answer) is sized
    for: what a --minutes budget buys in characters (budget.choose_size)."""
    return AMX_SPEEDUP if chosen == "bf16" and backend() == "amx" else 1.0


def measure(model, x, y, masks=None) -> str:
    """"bf16" or "fp32", whichever runs a forward-backward of this batch faster (best of
    AUTO_TRIES each, interleaved, after one untimed pass of each)."""
    h, c = model.zero_state(x.shape[1])
    best = {}
    for p in ("fp32", "bf16", "fp32", "bf16"):  # the first two compile and warm the buffers
        model.forward_backward(x, y, h, c, masks=masks, precision=p)
    for _ in range(AUTO_TRIES):
        for p in ("fp32", "bf16"):
            t = time.perf_counter()
            model.forward_backward(x, y, h, c, masks=masks, precision=p)
            best[p] = min(best.get(p, float("inf")), time.perf_counter() - t)
    return "bf16" if best["bf16"] < best["fp32"] else "fp32"


def describe(precision: str) -> str:
    """How a run's products are computed, for its first stderr line."""
    if precision == "bf16":
        b = backend()
        return f"bf16 products ({'AMX' if b == 'amx' else 'AVX512_BF16'})"
    return "float32"
