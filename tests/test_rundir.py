"""Run directories: one live run per directory, stale locks taken over, default names that never
collide, and the CLI's one-line errors."""

import os
import signal
import subprocess
import sys
import time

import pytest

from charrnn.errors import UsageError
from charrnn.rundir import Busy, RunDir

from tests.common import meta_of, run
from tests.common import SMALL_TRAIN as SMALL

HOLD = ("import sys, time; from charrnn.rundir import RunDir; rd = RunDir.lock(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(60)")


def _holder(path):
    """A separate process that holds the lock on `path` until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_lock_is_refused_naming_the_holder_and_a_killed_holder_lets_go(tmp_path):
    d = tmp_path / "run"
    proc = _holder(d)
    try:
        with pytest.raises(Busy, match=f"process {proc.pid}"):
            RunDir.lock(str(d))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel dropped the dead holder's lock: it is simply taken
    with RunDir.lock(str(d)) as rd:
        assert rd.path == str(d) and not rd.created
    assert os.path.isdir(d)


def test_lock_is_released_and_an_unused_new_directory_removed(tmp_path):
    d = tmp_path / "a" / "b"
    rd = RunDir.lock(str(d))
    assert rd.created and os.path.isdir(d)
    with pytest.raises(Busy):  # a second lock in the same process is refused too (separate open file)
        RunDir.lock(str(d))
    rd.discard_if_unused()
    assert not d.exists()
    # a directory that already existed stays, whatever happens
    d.mkdir(parents=True)
    RunDir.lock(str(d)).discard_if_unused()
    assert d.is_dir()


def test_new_run_refuses_a_directory_that_holds_a_run(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "last.npz").write_bytes(b"x")
    with pytest.raises(UsageError, match="already holds a run"):
        RunDir.claim_new(str(d))
    RunDir.lock(str(d)).release()  # and the refusal released its lock


def test_default_directories_skip_held_and_used_ones(tmp_path):
    base = tmp_path / "runs" / "small"
    proc = _holder(base)  # a live run that has not saved anything yet
    try:
        (tmp_path / "runs" / "small-2").mkdir()
        (tmp_path / "runs" / "small-2" / "best.npz").write_bytes(b"x")
        rd = RunDir.claim_default(str(base))
        assert rd.path == str(base) + "-3"
        rd2 = RunDir.claim_default(str(base))
        assert rd2.path == str(base) + "-4"
        rd.release()
        rd2.release()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _train_proc(args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "charrnn", "train", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, timeout=120):
    deadline = time.time() + timeout
    line = ""
    while time.time() < deadline and "step" not in line:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "training ended early"
    assert "step" in line


def test_two_runs_on_one_directory_and_resume_of_a_live_or_killed_run(corpus, tmp_path):
    out = tmp_path / "same"
    live = _train_proc([corpus, "--out", str(out), "--steps", "100000", "--eval-every", "5", "--hidden", "24",
                        "--batch", "8", "--seq", "16", "--threads", "1"])
    try:
        _wait_for_steps(live)
        res = run(["train", corpus, "--out", str(out), "--steps", "3", "--seed", "2", *SMALL])
        assert res.exit_code == 1 and f"in use by another charrnn run (process {live.pid})" in res.output
        assert len(res.output.strip().splitlines()) == 1
        res = run(["train", "--resume", str(out), "--steps", "3"])
        assert res.exit_code == 1 and f"process {live.pid}" in res.output
        while not (out / "last.npz").exists():
            time.sleep(0.1)
    finally:
        live.send_signal(signal.SIGKILL)
        live.communicate()
    # a SIGKILLed run leaves its lock file, but not the lock: --resume just works
    assert (out / ".lock").exists()
    step = meta_of(str(out / "last.npz"))["step"]
    res = run(["train", "--resume", str(out), "--steps", str(step + 2), "-q"])
    assert res.exit_code == 0, res.output
    assert meta_of(str(out / "last.npz"))["step"] == step + 2


def test_runs_started_together_take_different_default_directories(corpus, tmp_path):
    args = [corpus, "--steps", "3", *SMALL]
    procs = [_train_proc(args, cwd=tmp_path) for _ in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    assert sorted(os.listdir(tmp_path / "runs")) == ["markov", "markov-2", "markov-3"]
    for d in os.listdir(tmp_path / "runs"):  # each holds one whole run, nothing interleaved
        assert meta_of(str(tmp_path / "runs" / d / "last.npz"))["step"] == 3
        assert len((tmp_path / "runs" / d / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs mounted at a fresh directory (root only; skipped where mounting is not allowed);
    remount(ro=True) makes it read-only."""
    d = tmp_path / "fs"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def remount(ro):
        subprocess.run(["mount", "-o", "remount," + ("ro" if ro else "rw"), str(d)], check=True)

    yield d, remount
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_resume_on_a_read_only_filesystem_fails_before_training(corpus, tmp_path, tmpfs):
    fs, remount = tmpfs
    out = fs / "run"
    assert run(["train", corpus, "--out", str(out), "--steps", "3", *SMALL]).exit_code == 0
    before = (out / "last.npz").read_bytes()
    remount(ro=True)
    t0 = time.monotonic()
    res = run(["train", "--resume", str(out), "--steps", "1000"])
    assert res.exit_code == 1 and "not writable" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 10  # refused before the 1000 steps, not after them
    assert (out / "last.npz").read_bytes() == before
    res = run(["train", corpus, "--out", str(fs / "new"), "--steps", "3", *SMALL])
    assert res.exit_code == 1 and "output directory" in res.output


def test_a_run_removes_the_temporary_files_killed_writes_left_and_refuses_unloadable_models(corpus, tmp_path):
    out = tmp_path / "run"
    assert run(["train", corpus, "--out", str(out), "--steps", "2", *SMALL]).exit_code == 0
    stale = [out / ".last.npz.k3j_9xq1.tmp", out / ".best.npz.a8b7c6d5.tmp", out / ".tokens.npy.12345.tmp",
             out / "tokens.json.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = out / "notes.tmp"
    keep.write_text("mine")
    assert run(["train", "--resume", str(out), "--steps", "3", "-q"]).exit_code == 0
    assert not any(p.exists() for p in stale) and keep.exists()
    res = run(["train", corpus, "--out", str(tmp_path / "huge"), *SMALL, "--layers", "300"])
    assert res.exit_code == 2 and "1<=x<=256" in res.output and not (tmp_path / "huge").exists()
    res = run(["train", corpus, "--out", str(tmp_path / "huge"), *SMALL, "--layers", "256", "--hidden", "4096"])
    assert res.exit_code == 2 and "at most" in res.output and not (tmp_path / "huge").exists()


def test_losing_a_race_for_a_new_directory_leaves_the_winner_alone(tmp_path, monkeypatch):
    """This call makes the directory, but another run locks it first: Busy, and the directory
    and the winner's lock file stay (removing them would let a third run in beside the winner)."""
    from charrnn import rundir

    d = tmp_path / "run"
    real_make = rundir._make_dir
    procs = []

    def make_and_lose(path):
        created = real_make(path)
        procs.append(_holder(path))  # the other run takes the lock between our mkdir and our flock
        return created

    monkeypatch.setattr(rundir, "_make_dir", make_and_lose)
    try:
        with pytest.raises(Busy):
            RunDir.lock(str(d))
        assert (d / ".lock").read_text().strip() == str(procs[0].pid)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
