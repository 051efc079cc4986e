"""Interrupts. A run is interruptible at every moment, in one of two modes:

- `Raising`: nothing to save yet (reading the corpus, compiling): SIGINT and SIGTERM stop at once,
  as KeyboardInterrupt and SignalExit, and the CLI exits 130 / 143 with a one-line message.
- `Signals`: a run with something to save (its steps, validations, checkpoint writes): SIGINT and
  SIGTERM ask it to stop at the next safe point, which the loop and the validation check often;
  a second SIGINT stops at once (KeyboardInterrupt). Checkpoints are written atomically, so nothing
  is ever half-written either way.

Not here: what a run saves when it stops (train.py).
"""

from __future__ import annotations

import signal

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report it


class SignalExit(BaseException):
    """SIGTERM while nothing is to be saved: unwind and exit 143 (KeyboardInterrupt plays this part for SIGINT)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + int(self.signum))


def name_of(signum) -> str:
    return "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"


class _Handlers:
    """Install handlers for SIGINT and SIGTERM on entry, put the previous ones back on exit. Only
    the main thread can; elsewhere (a test calling a run from a thread) this does nothing."""

    def __init__(self):
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False

    def _handle(self, signum, frame):
        raise NotImplementedError


class Raising(_Handlers):
    """SIGINT raises KeyboardInterrupt, SIGTERM raises SignalExit: stop now, nothing to save."""

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SignalExit(signum)


class Signals(_Handlers):
    """SIGINT/SIGTERM set `received` (the signal number) instead of stopping the process; the loop
    checks it between steps, the validation between spans. A second SIGINT raises KeyboardInterrupt."""

    def __init__(self):
        super().__init__()
        self.received = None

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.received = signum
