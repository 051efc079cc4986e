"""Interrupts: SIGINT and SIGTERM ask a run to stop at the next safe point; a second SIGINT stops
at once (KeyboardInterrupt). Checkpoints are written atomically, so nothing is ever half-written.

Not here: what a run saves when it stops (train.py).
"""

from __future__ import annotations

import signal


class Signals:
    """While active, SIGINT/SIGTERM set `received` (the signal number) instead of stopping the
    process; the loop checks it between steps. A second SIGINT raises KeyboardInterrupt."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. tests calling train() from a thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    @property
    def exit_code(self) -> int:
        """The conventional status after the signal received: 130 (SIGINT) or 143 (SIGTERM)."""
        return 143 if self.received == signal.SIGTERM else 130

    @property
    def name(self) -> str:
        return "SIGTERM" if self.received == signal.SIGTERM else "Ctrl-C"
