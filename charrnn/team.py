"""The worker contract: what the training loop (train.Trainer) may ask of the processes that train
one model together. `Team` is the protocol; `Solo` is the single process; the MPI workers
(parallel.workers.Workers) are the other implementation, and tests/fake_team.py a team of threads.

Every worker runs the same loop on its own streams, [b0, b1) of the batch, and they meet at these
points, in the same order on every worker:

- `reduce(grad, loss)`, inside each step (train.train_step): the gradient and the loss summed over
  the workers and divided by their number, in place. It only combines numbers: every worker then
  clips and steps on the same values, so whether a step was finite is decided alike everywhere.
- `agree(signal, time_up)`, called by the loop before every step and once when it ends: the
  verdict on stopping. The signal is the strongest any worker received (SIGTERM over SIGINT); the
  time budget is rank 0's clock. Every worker gets the same verdict and stops at the same step.
- `on_root(fn)`: what only one process does (validation, writing the run directory, fitting the
  budget); rank 0 runs it, every worker gets its result, or its failure.
- `check_same`, `gather_state`: the parameters compared, the carried state collected for a save.

Not here: the loop (train.py), MPI (parallel/).
"""

from __future__ import annotations

import signal as _signal
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Verdict:
    """What the workers agreed on: the signal that stops the run (None: none) and whether the time
    budget is used."""

    signal: int | None = None
    time_up: bool = False


def strongest(signals) -> int | None:
    """The signal a team stops for, of those its workers received: SIGTERM over SIGINT."""
    got = set(signals)
    return _signal.SIGTERM if _signal.SIGTERM in got else (_signal.SIGINT if _signal.SIGINT in got else None)


class Team(Protocol):
    rank: int
    size: int
    root: bool  # rank 0: validates, writes the run directory, fits the budget
    b0: int  # this worker's streams are [b0, b1) of the batch
    b1: int | None

    def reduce(self, grad, loss: float) -> float:
        """Sum the gradient over the workers in place and scale it by 1/size; the mean loss."""

    def agree(self, signal: int | None, time_up: bool) -> Verdict:
        """The verdict on stopping, from what each worker saw (see the module's docstring)."""

    def check_same(self, step: int, theta, force: bool = False) -> None:
        """Fail on every worker if the parameters differ anywhere (every so often, or now)."""

    def on_root(self, fn):
        """fn() on rank 0 while the others wait; its result (or failure) on every worker."""

    def gather_state(self, h, c):
        """The carried state of every stream on rank 0, from each worker's own streams."""

    def writing(self):
        """A context around a checkpoint write (a worker found dead meanwhile is reported after)."""

    def validating(self):
        """A context around rank 0's validation (the others yield their cores)."""

    def report(self) -> str | None:
        """Rank 0's line on the cost of working together, at the end of a run."""


class Solo:
    """The single process: one worker owning every stream, nothing to combine, its own verdict."""

    rank, size, root = 0, 1, True
    b0, b1 = 0, None  # every stream is this process's

    @staticmethod
    def reduce(grad, loss: float) -> float:
        return loss

    @staticmethod
    def agree(signal: int | None, time_up: bool) -> Verdict:
        return Verdict(signal, time_up)  # what this process saw is what it decides

    def check_same(self, step: int, theta, force: bool = False):
        pass

    def on_root(self, fn):
        return fn()

    def gather_state(self, h, c):
        return h, c

    def writing(self):
        return nullcontext()

    def validating(self):
        return nullcontext()

    def report(self):
        return None
