"""The worker contract (charrnn/team.py) without MPI: a team of two workers in one process
(tests/fake_team.py, threads meeting at a barrier) trains what one process trains, and the
agreement paths hold: a signal that reaches one worker stops every worker at the same step, the
time budget is rank 0's clock alone, and a non-finite loss on one worker discards the step on
every worker. The same contract over MPI: tests/test_parallel.py."""

import os
import signal

import numpy as np
import pytest

from charrnn.config import TrainConfig
from charrnn.errors import Interrupted
from charrnn.parallel.replicate import follow, spec_of
from charrnn.setup import new_run
from charrnn.team import Solo, Verdict, strongest
from charrnn.train import Trainer
from tests.common import meta_of
from tests.fake_team import run_team

CONFIG = dict(cell="lstm", layers=2, hidden=16, dropout=0.3, batch=8, seq=12, seq_warmup=10, steps=12,
              eval_every=1000, threads=1, seed=7, lr=1e-2, warmup=0)


def team_of_two(corpus, out, dtype=np.float64, **kw):
    """Rank 0's run set up in `out`, and rank 1's built from its record, as parallel.replicate does."""
    cfg = TrainConfig(**dict(CONFIG, **kw))
    root = new_run([corpus], cfg, out, quiet=True, dtype=dtype)
    other = follow(spec_of(root), root.tokens.path)
    other.model.theta[...] = root.model.theta  # a new run: the parameters are rank 0's, the moments zero
    return [root, other]


def test_strongest_signal_and_the_solo_verdict():
    assert strongest([None, signal.SIGINT]) == signal.SIGINT
    assert strongest([signal.SIGINT, signal.SIGTERM, None]) == signal.SIGTERM
    assert strongest([None, None]) is None
    assert Solo.agree(signal.SIGINT, True) == Verdict(signal.SIGINT, True)


def test_a_team_of_two_trains_what_one_process_trains(corpus, tmp_path, restore_threads):
    """float64, dropout and the --seq-warmup curriculum on: the two workers' parameters are the
    same bit for bit at every step (FakeTeam.check_same) and equal the single process's to 1e-10."""
    single = Trainer(new_run([corpus], TrainConfig(**CONFIG), str(tmp_path / "one"), quiet=True, dtype=np.float64),
                     quiet=True)
    theta0 = single.model.theta.copy()
    single.run()
    (t0, r0), (t1, r1) = run_team(team_of_two(corpus, str(tmp_path / "two")))
    assert isinstance(r0, dict) and isinstance(r1, dict), (r0, r1)
    assert r0["step"] == r1["step"] == 12
    np.testing.assert_array_equal(t0.model.theta, t1.model.theta)
    assert np.max(np.abs(single.model.theta - theta0)) > 1e-2  # it trained: the comparison means something
    assert np.max(np.abs(t0.model.theta - single.model.theta)) <= 1e-10


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_on_one_worker_stops_every_worker_at_the_same_step(corpus, tmp_path, restore_threads, signum, code):
    out = str(tmp_path / "run")
    (t0, r0), (t1, r1) = run_team(team_of_two(corpus, out), [None, {"signal": (5, signum)}])
    for r in (r0, r1):
        assert isinstance(r, Interrupted) and r.exit_code == code, r
        assert "at step 5" in str(r)
    assert t0.state.step == t1.state.step == 5
    assert t0.team.agreements == t1.team.agreements
    assert meta_of(os.path.join(out, "last.npz"))["step"] == 5  # rank 0 saved, once, where they stopped


def test_the_time_budget_is_rank_0s_clock(corpus, tmp_path, restore_threads):
    """A worker other than rank 0 whose clock says the time is up does not end the run; rank 0's
    does, on every worker at the same step."""
    (_, r0), (_, r1) = run_team(team_of_two(corpus, str(tmp_path / "a")), [None, {"time_up": True}])
    assert r0["stop"] == "reached 12 steps" and r0["step"] == r1["step"] == 12
    (_, r0), (_, r1) = run_team(team_of_two(corpus, str(tmp_path / "b")), [{"time_up": True}, None])
    assert r0["stop"] == r1["stop"] == "time budget used" and r0["step"] == r1["step"] == 0


def test_a_non_finite_loss_on_one_worker_discards_the_step_everywhere(corpus, tmp_path, restore_threads):
    (t0, r0), (t1, r1) = run_team(team_of_two(corpus, str(tmp_path / "run")), [None, {"nan_at": 3}])
    assert r0["step"] == r1["step"] == 12
    assert t0.state.lr_scale == t1.state.lr_scale == 0.5  # the step was discarded, and the rate halved, on both
    np.testing.assert_array_equal(t0.model.theta, t1.model.theta)
