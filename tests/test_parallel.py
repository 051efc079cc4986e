"""Data-parallel training over MPI (charrnn/parallel/): N workers compute what one process with
the same --batch computes; one run directory; resume; faults; the launcher's errors.

Skipped when mpi4py or the mpich wheel's mpiexec (beside the interpreter) is missing. The runs are
tiny (a 2x16-2x24 LSTM, a few dozen steps) so the file stays within a couple of minutes on 2 cores.
"""

import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn import checkpoint, parallel
from charrnn.kernels import gemm16
from charrnn.cli import cli
from tests.common import ROOT, meta_of, params_of
from tests.common import SMALL_PARALLEL as SMALL

MPIEXEC = parallel.mpiexec_path()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or not os.access(MPIEXEC, os.X_OK),
                                reason="needs charrnn[mpi] (mpi4py and the mpich wheel's mpiexec)")
# float32 through the CLI: 1 process against 2 workers, after 20 steps of a 2x24 LSTM. Measured:
# parameters within 2e-7 of each other (the all-reduce adds two halves where the kernel sums all
# rows at once); allowed 50x that
F32_ATOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    p = d / "markov.txt"
    with open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8") as f:
        p.write_text(f.read()[:20000], encoding="utf-8")
    return str(p)


def charrnn_cmd(*args):
    return [sys.executable, "-m", "charrnn", *args]


def run_cli(args, timeout=240, **kw):
    return subprocess.run(charrnn_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def val_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["val_loss"] for line in f]


def descendants(pid):
    """The processes below `pid` (children, their children, ...)."""
    parent = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent[int(stat.split("/")[2])] = int(fields[1])
        except (OSError, IndexError, ValueError):
            pass
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def rank_pids(launcher_pid):
    """{rank: pid} of the workers a `charrnn train --workers N` process started."""
    ranks = {}
    for pid in descendants(launcher_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"PMI_RANK" in env and b"charrnn" in cmd:
            ranks[int(env[b"PMI_RANK"])] = pid
    return ranks


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("n,regularised", [(2, False), (4, False), (2, True)], ids=["2", "4", "2-regularised"])
def test_workers_compute_what_one_process_computes_in_float64(corpus, tmp_path, restore_threads, n, regularised):
    """At library level, in memory, in float64, with dropout and --seq-warmup (and regularised:
    with weight drop, locked dropout and averaged weights): the parameters of n workers (4 streams,
    or 2, each) after 14 steps, and their average, equal the single process's to 1e-10, and are
    bit for bit the same on every worker."""
    from charrnn.train import Trainer
    from tests import parallel_run

    single = Trainer(parallel_run.make(corpus, str(tmp_path / "one"), regularised), quiet=True)
    theta0 = single.model.theta.copy()
    single.run()
    dest = str(tmp_path / "theta")
    res = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, os.path.join(ROOT, "tests", "parallel_run.py"),
                          corpus, str(tmp_path / "many"), dest, "regularised" if regularised else "plain"],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    ws = [np.load(f"{dest}.{r}.npy") for r in range(n)]
    assert ws[0].dtype == np.float64
    for w in ws[1:]:
        np.testing.assert_array_equal(w, ws[0])  # the workers never drift apart
    assert np.max(np.abs(single.model.theta - theta0)) > 1e-2  # it trained: the comparison means something
    want = parallel_run.weights(single)
    assert ws[0].shape == want.shape == ((2 if regularised else 1) * theta0.size,)
    assert np.max(np.abs(ws[0] - want)) <= 1e-10


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not gemm16.backends(), reason="this CPU has no bfloat16 products (AVX512_BF16 or AMX)"))])
def test_two_hosts_compute_what_one_process_computes_in_float32(corpus, tmp_path, precision):
    """Through the CLI in float32, the workers started by hand as on two machines (mpiexec's two
    host names for this one, no ssh): the same parameters as one process within F32_ATOL, and the
    same validation losses (rank 0 scores the one held-out stream, as a single process does). The
    second host builds its own token file in its token directory, the same as rank 0's. With
    --precision bf16 too: the workers round the same operands as one process, and only the float32
    sums of the gradient are split between them."""
    one, two, cache = str(tmp_path / "one"), str(tmp_path / "two"), tmp_path / "host-tokens"
    args = ["train", corpus, *SMALL, "--steps", "20", "--eval-every", "10", "--threads", "1", "-q",
            "--precision", precision]
    res = run_cli([*args, "--out", one])
    assert res.returncode == 0, res.stderr
    res = subprocess.run([MPIEXEC, "-launcher", "fork", "-hosts", "localhost,127.0.0.1", "-n", "2",
                          *charrnn_cmd(*args, "--out", two)], capture_output=True, text=True, timeout=240, cwd=ROOT,
                         env=dict(os.environ, **{parallel.TOKEN_DIR_VARIABLE: str(cache)}))
    assert res.returncode == 0, res.stderr
    copies = glob.glob(str(cache / "*" / "tokens.npy"))
    assert len(copies) == 1
    np.testing.assert_array_equal(np.load(copies[0]), np.load(os.path.join(two, "tokens.npy")))
    p1, p2 = params_of(os.path.join(one, "last.npz")), params_of(os.path.join(two, "last.npz"))
    assert p1.keys() == p2.keys()
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=0, atol=F32_ATOL, err_msg=k)
    v1, v2 = val_losses(one), val_losses(two)
    assert len(v1) == len(v2) == 2
    np.testing.assert_allclose(v2, v1, rtol=0, atol=F32_ATOL)
    assert meta_of(os.path.join(two, "last.npz"))["run"]["pos"] == meta_of(os.path.join(one, "last.npz"))["run"]["pos"]
    assert not os.path.exists(os.path.join(ROOT, "runs", "markov"))  # nothing written beside the one run directory


def test_parameters_that_drift_apart_stop_every_worker(tmp_path):
    """The checksum comparison fails loudly, on every worker, when one worker's parameters differ."""
    script = tmp_path / "drift.py"
    script.write_text(
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from charrnn import parallel\n"
        "from charrnn.errors import TrainingError\n"
        "w = parallel.Workers()\n"
        "theta = np.ones(1000, np.float32)\n"
        "w.check_same(100, theta)\n"
        "if w.rank == 1:\n"
        "    theta[7] = np.nextafter(theta[7], np.float32(2))\n"
        "w.check_same(101, theta)  # not due: nothing compared\n"
        "try:\n"
        "    w.check_same(200, theta)\n"
        "except TrainingError as e:\n"
        f"    open({str(tmp_path)!r} + f'/error.{{w.rank}}', 'w').write(str(e))\n"
        "w.close(True)\n")
    res = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for rank in (0, 1):
        message = (tmp_path / f"error.{rank}").read_text()
        assert message == "the workers' parameters diverged by step 200 (rank 1 differs from rank 0); stopped"


# ----------------------------------------------------------------------------- resume
def test_resume_with_the_same_workers_is_exact_and_with_another_count_equal(corpus, tmp_path):
    """2 workers stopped at step 11 and resumed with 2 workers end bit for bit where an
    uninterrupted 2-worker run ends; resumed by a single process (the data position and the
    carried state are the whole batch's), within float32 rounding of it."""
    a, b, c = (str(tmp_path / n) for n in "abc")
    base = [*SMALL, "--eval-every", "7", "-q"]
    # the mpiexec beside the interpreter, with no virtualenv on PATH (a console script run as is)
    bare = dict(os.environ, PATH="/usr/bin:/bin")
    res = run_cli(["train", corpus, "--out", a, "--steps", "24", "--workers", "2", *base], env=bare)
    assert res.returncode == 0, res.stderr
    res = run_cli(["train", corpus, "--out", b, "--steps", "11", "--workers", "2", *base])
    assert res.returncode == 0, res.stderr
    shutil.copytree(b, c)
    res = run_cli(["train", "--resume", b, "--steps", "24", "--workers", "2", "-q"])
    assert res.returncode == 0, res.stderr
    res = run_cli(["train", "--resume", c, "--steps", "24", "--threads", "1", "-q"])
    assert res.returncode == 0, res.stderr
    pa, pb, pc = (params_of(os.path.join(d, "last.npz")) for d in (a, b, c))
    for k in pa:
        np.testing.assert_array_equal(pb[k], pa[k], err_msg=k)
        np.testing.assert_allclose(pc[k], pa[k], rtol=0, atol=F32_ATOL, err_msg=k)
    ra, rb = (meta_of(os.path.join(d, "last.npz"))["run"] for d in (a, b))
    for key in ("step", "epoch", "pos", "lr_scale", "best_val", "best_step", "bad_evals"):  # not the clock's
        assert rb[key] == ra[key], key


# ----------------------------------------------------------------------------- faults
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_launcher_stops_every_worker_and_saves_once(corpus, tmp_path, sig, code):
    out = str(tmp_path / "run")
    proc = subprocess.Popen(charrnn_cmd("train", corpus, "--out", out, *SMALL, "--steps", "100000", "--eval-every",
                                        "1000000", "--workers", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines = []
    while not any(line.startswith("step ") for line in lines[-1:]):
        line = proc.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
    ranks = rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1]
    time.sleep(0.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    stderr = "".join(lines) + stderr
    assert proc.returncode == code, stderr
    assert stderr.count("interrupted: saving the run") == 1 and stderr.count("saved ") == 1, stderr
    assert "Traceback" not in stderr and "mpiexec" not in stderr
    assert meta_of(os.path.join(out, "last.npz"))["step"] > 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in ranks.values())


def test_a_killed_worker_stops_the_others_with_the_rank_named(corpus, tmp_path):
    """SIGKILL to worker 1: the other ends within seconds with one line naming it, no process is
    left, the last checkpoint loads, and the run resumes from it."""
    out = str(tmp_path / "run")
    proc = subprocess.Popen(charrnn_cmd("train", corpus, "--out", out, *SMALL, "--steps", "100000", "--eval-every",
                                        "5", "--workers", "2", "-q"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    last = os.path.join(out, "last.npz")
    wait_for(lambda: os.path.exists(last), 120, "the first checkpoint")
    ranks = rank_pids(proc.pid)
    everyone = descendants(proc.pid)
    os.kill(ranks[1], signal.SIGKILL)
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - t0 < 10
    assert proc.returncode == 1, (proc.returncode, stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("charrnn: error")]
    assert len(errors) == 1 and f"worker 1 (process {ranks[1]} " in errors[0], stderr
    assert "Traceback" not in stderr
    time.sleep(0.2)
    assert not [pid for pid in everyone if os.path.exists(f"/proc/{pid}")]
    step = checkpoint.load(last, with_arrays=True).meta["step"]
    res = run_cli(["train", "--resume", out, "--steps", str(step + 3), "--workers", "2", "-q"])
    assert res.returncode == 0, res.stderr
    assert meta_of(last)["step"] == step + 3


# ----------------------------------------------------------------------------- usage
def run_in_process(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_workers_must_divide_the_batch(corpus):
    res = run_in_process(["train", corpus, "--workers", "3", "--batch", "8"])
    assert res.exit_code == 2
    assert res.output.strip() == ("charrnn: error: --batch 8 must be a multiple of --workers 3 (every worker takes "
                                  "the same number of streams)")


@pytest.mark.parametrize("missing", ["mpi4py", "mpiexec"])
def test_workers_without_the_extra_say_what_to_install(corpus, monkeypatch, missing):
    if missing == "mpi4py":
        monkeypatch.setattr(parallel.launcher, "have_mpi4py", lambda: False)
    else:
        monkeypatch.setattr(parallel.launcher, "mpiexec_path", lambda: "/nonexistent/bin/mpiexec")
    res = run_in_process(["train", corpus, "--workers", "2"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(parallel.INSTALL_HINT) and missing in lines[0]
    assert "-m pip install 'mpi4py>=4' mpich" in lines[0]  # what the [mpi] extra holds, for this Python


def test_charrnn_without_workers_never_imports_mpi4py(corpus, tmp_path):
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from charrnn.cli import cli\n"
            "r = CliRunner().invoke(cli, ['--help'])\n"
            f"r = CliRunner().invoke(cli, ['train', {corpus!r}, '--out', {str(tmp_path / 'run')!r}, '--steps', '2', "
            "'--hidden', '8', '--batch', '4', '--seq', '8', '-q'])\n"
            "assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in sys.modules if m.startswith('mpi4py')))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
