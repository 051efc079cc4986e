"""Progress on stderr: a tqdm bar on a terminal, plain log lines otherwise, nothing with -q.
Reporter for a training run's steps and messages, Tally for a count of work done (eval).

Not here: what is reported (train.py and the commands decide), or the samples and scores on
stdout (cli/).
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


class _Progress:
    """What the progress of a run and of a count share: stderr unless told otherwise, silence when
    quiet or when there is no stderr, a tqdm bar on a terminal and plain lines off one, at most one
    every LOG_EVERY_S seconds, and a bar whose failures never stop the work."""

    LOG_EVERY_S = 30  # plain log lines (not a terminal): one every this many seconds

    def __init__(self, quiet: bool, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bar = None
        if quiet or self.stream is None:
            self.quiet = True

    def _start_bar(self, **kw):
        """A tqdm bar on the stream when it is a terminal (and not quiet); else plain lines."""
        if not self.quiet and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(file=self.stream, **kw)

    def _line_due(self, last: float) -> bool:
        return time.monotonic() - last >= self.LOG_EVERY_S

    def close(self):
        if self.bar is not None:
            try:
                self.bar.close()
            except (OSError, ValueError):
                pass
            self.bar = None


class Reporter(_Progress):
    """Messages and a progress line for one run."""

    def __init__(self, quiet: bool, total_steps: int | None, start_step: int, stream=None):
        super().__init__(quiet, stream)
        self.last_line = 0.0
        self._start_bar(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=True,
                        smoothing=0.1)

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
        elif self._line_due(self.last_line):
            self.last_line = time.monotonic()
            self.message("step " + str(step) + " " + " ".join(f"{k}={v}" for k, v in info.items()))


class Tally(_Progress):
    """Progress of work of unknown size, counted as it is done (eval's characters): a bar named
    `name` counting `unit`s on a terminal; off one, the line `line(count, count per second)` every
    LOG_EVERY_S seconds from the start, so work that ends sooner says nothing."""

    def __init__(self, quiet: bool, name: str, unit: str, line, stream=None):
        super().__init__(quiet, stream)
        self.line = line
        self.count = 0
        self.t_start = self.last_line = time.monotonic()
        self._start_bar(total=None, unit=unit, unit_scale=True, leave=False, desc=name, mininterval=0.5, delay=1.0)

    def add(self, n: int):
        self.count += n
        if self.quiet:
            return
        if self.bar is not None:
            try:
                self.bar.update(n)
            except (OSError, ValueError):
                pass
        elif self._line_due(self.last_line):
            self.last_line = now = time.monotonic()
            note(False, self.line(self.count, self.count / max(now - self.t_start, 1e-9)), self.stream)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False
