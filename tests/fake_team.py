"""A team of workers in one process, without MPI: each worker is a thread running its own Trainer,
and the team's collectives (charrnn/team.py's contract) meet at a barrier. One worker computes at a
time (a baton passed at every meeting), so the kernels never run side by side.

`script` lets a test put words in a worker's mouth at the meetings where the contract is decided:
a signal it received from some step on, a clock that says its time is up, a non-finite loss at a
step. The verdicts are then the team's own, as parallel.workers.Workers computes them over MPI.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import numpy as np

from charrnn.team import Verdict, strongest


class Hub:
    """What the workers' threads share: the meeting point and the baton."""

    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n, timeout=120)
        self.baton = threading.Lock()
        self.slots = [None] * n

    def gather(self, rank: int, value):
        """Every worker's `value`, on every worker, in rank order (a collective)."""
        self.slots[rank] = value
        self.baton.release()
        try:
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()  # everyone has read the slots before they are written again
        finally:
            self.baton.acquire()
        return out


class FakeTeam:
    """One worker of a Hub's team (team.Team). `script`: {"signal": (step, signum)} this worker
    receives the signal from that step on; {"time_up": True} its clock always says the time is up;
    {"nan_at": step} its loss is NaN at that step."""

    def __init__(self, hub: Hub, rank: int, batch: int, script: dict | None = None):
        self.hub, self.rank, self.size = hub, rank, hub.n
        self.root = rank == 0
        per = batch // hub.n
        self.b0, self.b1 = rank * per, (rank + 1) * per
        self.script = script or {}
        self.step = 0  # the step of the last agreement
        self.agreements = 0

    def reduce(self, grad: np.ndarray, loss: float) -> float:
        if self.script.get("nan_at") == self.step:
            loss = float("nan")
        parts = self.hub.gather(self.rank, (grad.copy(), loss))
        total = parts[0][0].copy()
        for g, _ in parts[1:]:
            total += g
        grad[...] = total * grad.dtype.type(1.0 / self.size)
        return float(sum(x for _, x in parts) / self.size)

    def agree(self, signum, time_up: bool) -> Verdict:
        self.agreements += 1
        at = self.script.get("signal")
        if at is not None and self.step >= at[0]:
            signum = at[1]
        if self.script.get("time_up"):
            time_up = True
        seen = self.hub.gather(self.rank, (signum, bool(time_up) and self.root))
        return Verdict(strongest(s for s, _ in seen if s is not None), any(t for _, t in seen))

    def check_same(self, step: int, theta, force: bool = False):
        self.step = step
        thetas = self.hub.gather(self.rank, theta.copy())
        if any(not np.array_equal(t, thetas[0]) for t in thetas[1:]):
            raise AssertionError(f"the workers' parameters differ at step {step}")

    def on_root(self, fn):
        from charrnn.evaluate import Cancelled

        result = ("ok", None)
        if self.root:
            try:
                result = ("ok", fn())
            except Cancelled:
                result = ("cancelled", None)
        result = self.hub.gather(self.rank, result)[0]
        if result[0] == "cancelled":
            raise Cancelled()
        return result[1]

    def gather_state(self, h, c):
        parts = self.hub.gather(self.rank, (h.copy(), c.copy()))
        if not self.root:
            return None, None
        return (np.ascontiguousarray(np.concatenate([p[0] for p in parts], axis=1)),
                np.ascontiguousarray(np.concatenate([p[1] for p in parts], axis=1)))

    def writing(self):
        return nullcontext()

    def validating(self):
        return nullcontext()

    def report(self):
        return None


def run_team(preps, scripts=None, quiet=True):
    """Train the set-up runs `preps` (rank 0's first) as a team of len(preps) threads; returns
    [(trainer, result or the exception it raised)] in rank order."""
    from charrnn.train import Trainer

    n = len(preps)
    hub = Hub(n)
    scripts = scripts or [None] * n
    trainers = [Trainer(p, quiet, team=FakeTeam(hub, r, p.record.config.batch, scripts[r])) for r, p in enumerate(preps)]
    outcome = [None] * n

    def work(r):
        hub.baton.acquire()
        try:
            outcome[r] = trainers[r].run()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome[r] = e
        finally:
            hub.baton.release()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return list(zip(trainers, outcome))
