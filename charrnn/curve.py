"""A run's loss curve (metrics.jsonl, as info.read_metrics reads it): as lines of text for the
terminal, and as a figure through matplotlib (the optional extra `[plot]`).

Not here: reading metrics.jsonl and the card (info.py).
"""

from __future__ import annotations

import math
import os

from charrnn import pip_hint
from charrnn.errors import CharrnnError, UsageError
from charrnn.rundir import METRICS_FILE

PLOT_HINT = pip_hint("matplotlib>=3.6")  # what the [plot] extra holds
# The terminal plot: wide enough to show a curve's shape, narrow enough for an 80-column terminal
# beside its 9-character axis labels.
CURVE_WIDTH = 60
CURVE_HEIGHT = 10


# ------------------------------------------------------------------------------ the curve as text
def curve(m, width: int = CURVE_WIDTH, height: int = CURVE_HEIGHT) -> list[str]:
    """The validation loss (*) and the training loss (.) against steps, as lines of text: a grid
    of `height` rows, nats/char on the left, steps and minutes below. Points that fall in one
    column are averaged; validation wins a cell both want."""
    val, train = m.points("val_loss"), m.points("train_loss")
    if not val and not train:
        return ["loss curve: no losses recorded in metrics.jsonl yet"]
    steps = [p[0] for p in val + train]
    s0, s1 = min(steps), max(steps)
    values = [p[1] for p in val + train]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:  # a flat curve (or one point): a band around it, so it sits mid-plot
        lo, hi = lo - 0.5, hi + 0.5
    col = lambda s: 0 if s1 == s0 else round((s - s0) / (s1 - s0) * (width - 1))  # noqa: E731
    row = lambda v: round((hi - v) / (hi - lo) * (height - 1))  # noqa: E731
    grid = [[" "] * width for _ in range(height)]
    for points, mark in ((train, "."), (val, "*")):
        by_col = {}
        for s, v, _ in points:
            by_col.setdefault(col(s), []).append(v)
        for x, vs in by_col.items():
            grid[row(sum(vs) / len(vs))][x] = mark
    label = {0: f"{hi:.3f}", height - 1: f"{lo:.3f}", (height - 1) // 2: f"{(hi + lo) / 2:.3f}"}
    title = "loss curve, nats/char (* validation, . training)"
    if not val:
        title += ": no validation losses (the run has no held-out text)"
    out = [title]
    out += [f"{label.get(r, ''):>8} |{''.join(grid[r]).rstrip()}" for r in range(height)]
    out.append(" " * 9 + "+" + "-" * width)
    out.append(_axis("step", f"{s0:,}", f"{s1:,}", width))
    t = {p[0]: p[2] for p in val + train if p[2] is not None}
    if s0 in t and s1 in t:
        digits = 2 if t[s1] < 600 else 1  # a short run's minutes still tell apart
        out.append(_axis("minutes", f"{t[s0] / 60:.{digits}f}", f"{t[s1] / 60:.{digits}f}", width))
    if len(set(steps)) == 1:
        out.append(" " * 10 + "(one validation so far)")
    return out


def _axis(name: str, left: str, right: str, width: int) -> str:
    return f"{name:>8}  {left}{right:>{max(1, width - len(left))}}"


# ------------------------------------------------------------------------------ the figure
def require_matplotlib():
    """matplotlib with the Agg backend (files only, no display needed), or a one-line error that
    says what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharrnnError(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}") from None
    return plt


def check_plot_path(path: str) -> None:
    """Refuse, before any work, a figure path whose format matplotlib cannot write."""
    plt = require_matplotlib()
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    fig = plt.figure()
    try:
        supported = fig.canvas.get_supported_filetypes()
    finally:
        plt.close(fig)
    if ext not in supported:
        raise UsageError(f"--plot {path}: give a file name ending in .png (or one of "
                         f"{', '.join('.' + e for e in sorted(supported))})")


def plot(c: dict, path: str) -> None:
    """A figure of the training and validation loss against steps (left) and minutes (right),
    nats/char on the left axis and bits/char on the right, titled with the run and model."""
    m = c.get("_metrics")
    if m is None:
        raise UsageError(f"--plot needs a run directory (its {METRICS_FILE}); {c['path']} is not in one")
    val, train = m.points("val_loss"), m.points("train_loss")
    if not val and not train:
        raise CharrnnError(f"{m.path}: no losses recorded yet; nothing to plot")
    plt = require_matplotlib()
    mo = c["model"]
    name = os.path.basename(os.path.abspath(c["run"] or c["path"]))
    title = f"{name}: {mo['cell']} {mo['layers']}x{mo['hidden']}"
    if c["best"] is not None:
        title += f", best validation {c['best']['val_loss']:.4f} nats/char"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    try:
        for ax, x_of, xlabel in ((axes[0], lambda p: p[0], "step"),
                                 (axes[1], lambda p: None if p[2] is None else p[2] / 60, "minutes")):
            for points, style, label in ((train, dict(color="tab:blue", lw=1.2), "training (smoothed)"),
                                         (val, dict(color="tab:orange", lw=1.6, marker="o", ms=3), "validation")):
                xy = [(x_of(p), p[1]) for p in points if x_of(p) is not None]
                if xy:
                    ax.plot([a for a, _ in xy], [b for _, b in xy], label=label, **style)
            b = c["best"]
            at = [p for p in val if b is not None and p[0] == b["step"] and x_of(p) is not None]
            if at:  # the checkpoint best.npz holds
                ax.plot([x_of(at[-1])], [at[-1][1]], "*", color="tab:red", ms=11, label="best")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss (nats/char)")
            ax.grid(True, alpha=0.3)
            ax.secondary_yaxis("right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2))) \
              .set_ylabel("bits/char")
            ax.legend()
        axes[0].set_title("against steps")
        axes[1].set_title("against training time")
        fig.suptitle(title)
        try:
            fig.savefig(path, dpi=120)
        except OSError as e:
            raise CharrnnError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
