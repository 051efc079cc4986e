"""Helpers shared by the tests: the repository's root, the small training options of the CLI
tests, `run` (charrnn in-process through Click's test runner) and `sh` (charrnn in a subprocess); for the kernels, the model and
sampling, small models on random data, the float64 reference run on a model's parameters and
thread switching; and reading a checkpoint's arrays and meta record."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn import threads
from charrnn.cli import cli
from charrnn.model import Model, ModelConfig
from tests import reference as ref

# the repository's root: a str for os.path and subprocess, and as a resolved pathlib.Path
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_PATH = pathlib.Path(__file__).resolve().parent.parent

# Small training runs for the CLI tests, one list per kind of test (each file imports its own as SMALL):
# sample and eval on a trained model (tests/test_cli.py, tests/test_sample_extras.py)
SMALL_CLI = ["--hidden", "32", "--batch", "16", "--seq", "32", "--threads", "1", "-q"]
# training, resume and run directories (tests/test_train.py, tests/test_rundir.py)
SMALL_TRAIN = ["--hidden", "24", "--layers", "2", "--batch", "8", "--seq", "16", "--threads", "1", "-q"]
# fine-tuning: the model's shape comes from --init-from (tests/test_finetune.py)
SMALL_FINETUNE = ["--batch", "4", "--seq", "16", "--threads", "1", "-q"]
# MPI workers (tests/test_parallel.py): dropout and the --seq-warmup curriculum on, as in every
# equivalence check there
SMALL_PARALLEL = ["--hidden", "24", "--layers", "2", "--batch", "8", "--seq", "16", "--seq-warmup", "6", "--dropout",
                  "0.2", "--cell", "lstm"]


def run(args, input=None, cwd=None):
    """`charrnn ARGS` in this process through Click's test runner (exceptions propagate), with
    `input` on stdin, from the directory `cwd` when given."""
    if not cwd:
        return CliRunner().invoke(cli, args, input=input, catch_exceptions=False)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, args, input=input, catch_exceptions=False)
    finally:
        os.chdir(old)


def sh(args, input=None, env=None, cwd=None, timeout=180, text=True, **kw):
    """`python -m charrnn ARGS` in a subprocess (through cli.main, as a user runs it), stdout and
    stderr captured (str, or bytes with text=False); `env` is added to this process's environment."""
    return subprocess.run([sys.executable, "-m", "charrnn", *args], input=input, capture_output=True, text=text,
                          env=dict(os.environ, **(env or {})), cwd=cwd, timeout=timeout, **kw)


CASES = [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]


def make(cell, nonlin, L, V=7, H=5, T=6, B=3, dtype=np.float64, seed=0, dropout=0.0):
    cfg = ModelConfig(cell=cell, layers=L, hidden=H, vocab_size=V, nonlinearity=nonlin, dropout=dropout)
    m = Model(cfg, dtype=dtype).init(seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.integers(0, V, size=(T, B)).astype(np.int32)
    y = rng.integers(0, V, size=(T, B)).astype(np.int32)
    h, c = m.zero_state(B)
    h[:] = rng.normal(0, 0.5, h.shape)
    c[:] = rng.normal(0, 0.5, c.shape)
    return m, x, y, h, c


def ref_params(m):
    return {name: v.astype(np.float64) for name, v in m.params.items()}


CASE_IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def two_threads():
    """Switch to 2 threads, or skip when the machine cannot give them."""
    if threads.set_threads(2) != 2:
        pytest.skip("needs 2 Numba threads")


def rel_error(a, n):
    """torch-rnn style: max |a - n| / max(|a| + |n|)  (0 when both are 0)."""
    a = np.asarray(a, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    return float(np.max(np.abs(a - n)) / max(np.max(np.abs(a) + np.abs(n)), 1e-300))


def ref_run(m, x, y, h, c, masks=None):
    """The float64 reference on the model's parameters (promoted): (loss, logits, hT, cT, grads, dh0, dc0)."""
    cell, nonlin, L = m.cfg.cell, m.cfg.nonlinearity, m.cfg.layers
    c0 = c.astype(np.float64) if cell == "lstm" else None
    rmasks = [masks[k].astype(np.float64) for k in range(L)] if masks is not None else None
    return ref.loss_and_grads(cell, ref_params(m), x, y, h.astype(np.float64), c0, rmasks, nonlin)


def ref_nll(logits, y):
    """Per-position -log p(y) (T, B) from reference logits (T, B, V)."""
    return -np.take_along_axis(ref.log_softmax(logits), y[..., None], axis=-1)[..., 0]


def grad_views(m, grad):
    return Model(m.cfg, dtype=grad.dtype, theta=grad.copy()).params


def params_of(path):
    """Every array of a checkpoint file but its meta record, by name."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def meta_of(path):
    """A checkpoint file's meta record."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"][()]))
