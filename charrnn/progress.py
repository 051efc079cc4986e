"""Progress on stderr: a tqdm bar on a terminal, plain log lines otherwise, nothing with -q.

Not here: what is reported (train.py decides), or the samples and scores on stdout (cli.py).
"""

from __future__ import annotations

import sys
import time


def remaining(step, total, t_steps, steps_here, budget_s, t_start) -> str:
    """Estimated time left, as m:ss, from the step budget or the time budget."""
    left = None
    if total is not None and steps_here:
        left = (total - step) * t_steps / steps_here
    if budget_s is not None:
        b = budget_s - (time.monotonic() - t_start)
        left = b if left is None else min(left, b)
    if left is None:
        return "?"
    left = max(0, int(left))
    return f"{left // 60}:{left % 60:02d}"


def note(quiet: bool, text: str, stream=None):
    """One line on stderr unless -q. Progress is optional: a closed or failing stderr loses the
    line, never the run (and a closed one must not send it to stdout, as print(file=None) would)."""
    stream = stream or sys.stderr
    if quiet or stream is None:
        return
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):
        pass


class Reporter:
    """Messages and a progress line for one run."""

    LOG_EVERY_S = 30  # plain log lines (not a terminal): one every this many seconds

    def __init__(self, quiet: bool, total_steps: int | None, start_step: int, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bar = None
        self.last_line = 0.0
        if quiet or self.stream is None:
            self.quiet = True
            return
        if _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step",
                            dynamic_ncols=True, leave=True, smoothing=0.1)

    def message(self, text: str):
        if self.quiet:
            return
        if self.bar is not None:
            try:
                self.bar.write(text, file=self.stream)
            except (OSError, ValueError):
                pass
        else:
            note(False, text, self.stream)

    def progress(self, step: int, info: dict):
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(info, refresh=False)
            try:
                self.bar.refresh()
            except (OSError, ValueError):
                pass
        elif time.monotonic() - self.last_line >= self.LOG_EVERY_S:
            self.last_line = time.monotonic()
            self.message("step " + str(step) + " " + " ".join(f"{k}={v}" for k, v in info.items()))

    def close(self):
        if self.bar is not None:
            try:
                self.bar.close()
            except (OSError, ValueError):
                pass
            self.bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False
