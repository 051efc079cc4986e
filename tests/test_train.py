"""charrnn train: exact resume, reproducibility, interrupts, bad input, validation = eval."""

import json
import math
import os
import signal
import subprocess
import sys
import time

from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn import checkpoint
from charrnn.cli import cli
from tests.common import ROOT, meta_of, params_of, run
from tests.common import SMALL_TRAIN as SMALL
from tests.wholetext import split_text
from charrnn.evaluate import score_text


REGULARISED = [["--average", "off"], ["--weight-drop", "0.3", "--dropout-mode", "locked", "--average", "ema", "--avg-decay", "0.9"],
               ["--weight-drop", "0.2", "--average", "polyak", "--schedule", "wsd", "--decay-steps", "20", "--warmup", "2"]]


@pytest.mark.parametrize("extra", REGULARISED, ids=["plain", "wdrop-locked-ema", "wdrop-polyak"])
def test_resumed_run_equals_uninterrupted_run(corpus, tmp_path, extra):
    opts = SMALL + ["--dropout", "0.2", "--eval-every", "7", "--seq-warmup", "10"] + extra
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(["train", corpus, "--out", a, "--steps", "24", *opts]).exit_code == 0
    assert run(["train", corpus, "--out", b, "--steps", "11", *opts]).exit_code == 0
    assert meta_of(os.path.join(b, "last.npz"))["step"] == 11
    res = run(["train", "--resume", b, "--steps", "24", "-q"])
    assert res.exit_code == 0, res.output
    pa, pb = params_of(os.path.join(a, "last.npz")), params_of(os.path.join(b, "last.npz"))
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    # and the run's position, step and carried state agree too
    ma, mb = meta_of(os.path.join(a, "last.npz")), meta_of(os.path.join(b, "last.npz"))
    assert ma["run"]["step"] == mb["run"]["step"] == 24
    assert ma["run"]["pos"] == mb["run"]["pos"]
    assert ma["run"]["best_val"] == mb["run"]["best_val"]
    ba, bb = params_of(os.path.join(a, "best.npz")), params_of(os.path.join(b, "best.npz"))
    for k in ba:
        np.testing.assert_array_equal(ba[k], bb[k], err_msg=k)
    if "off" not in extra:  # best.npz holds the average under the usual names, last.npz the raw weights too
        assert any(k.startswith("avg.") for k in pa) and not any(k.startswith("avg.") for k in ba)
        assert any(not np.array_equal(pa[k], pa["avg." + k]) for k in ba)
    else:
        assert not any(k.startswith("avg.") for k in pa)


def test_same_seed_same_model_and_different_seed_differs(corpus, tmp_path):
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = str(tmp_path / name)
        assert run(["train", corpus, "--out", out, "--steps", "12", "--seed", str(seed), *SMALL]).exit_code == 0
        outs.append(params_of(os.path.join(out, "best.npz")))
    for k in outs[0]:
        np.testing.assert_array_equal(outs[0][k], outs[1][k])
    assert any(not np.array_equal(outs[0][k], outs[2][k]) for k in outs[0])


@pytest.mark.parametrize("extra", [["--average", "off"], ["--average", "ema", "--avg-decay", "0.9", "--weight-drop", "0.3"]],
                         ids=["raw", "averaged"])
def test_validation_loss_equals_eval_of_the_held_out_text(corpus, tmp_path, extra):
    """What a run reports as its best validation loss is what `charrnn eval` of best.npz gives: with
    --average, best.npz holds the averaged weights validation scored."""
    out = str(tmp_path / "run")
    assert run(["train", corpus, "--out", out, "--steps", "15", *SMALL, *extra]).exit_code == 0
    meta = meta_of(os.path.join(out, "best.npz"))
    with open(corpus, encoding="utf-8") as f:
        text = f.read()
    val_text = split_text(text, meta["train"]["val_frac"], None).val_text
    val_file = tmp_path / "val.txt"
    val_file.write_text(val_text, encoding="utf-8")
    res = run(["eval", str(val_file), "--model", out, "--json", "-q"])
    assert res.exit_code == 0
    rec = json.loads(res.output)
    assert rec["tokens"] == len(val_text)
    assert math.isclose(rec["nats_per_char"], meta["best_val"], rel_tol=1e-9)
    ck = checkpoint.load(os.path.join(out, "best.npz"))
    assert math.isclose(score_text(ck.model, ck.vocab, val_text).nats, meta["best_val"], rel_tol=1e-9)


def test_metrics_and_checkpoints_written(corpus, tmp_path):
    out = str(tmp_path / "run")
    assert run(["train", corpus, "--out", out, "--steps", "20", "--eval-every", "5", *SMALL]).exit_code == 0
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [5, 10, 15, 20]
    for x in lines:
        assert set(x) >= {"step", "epoch", "train_loss", "val_loss", "chars_per_s", "elapsed_s"}
    best = min(x["val_loss"] for x in lines)
    assert math.isclose(meta_of(os.path.join(out, "best.npz"))["best_val"], best)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_existing_run_is_not_overwritten(corpus, tmp_path):
    out = str(tmp_path / "run")
    assert run(["train", corpus, "--out", out, "--steps", "3", *SMALL]).exit_code == 0
    before = open(os.path.join(out, "best.npz"), "rb").read()
    res = run(["train", corpus, "--out", out, "--steps", "3", *SMALL])
    assert res.exit_code == 2
    assert open(os.path.join(out, "best.npz"), "rb").read() == before
    # without --out a fresh directory is chosen
    res = run(["train", corpus, "--steps", "3", *SMALL], cwd=tmp_path)
    res2 = run(["train", corpus, "--steps", "3", *SMALL], cwd=tmp_path)
    assert res.exit_code == res2.exit_code == 0
    assert sorted(os.listdir(tmp_path / "runs")) == ["markov", "markov-2"]


@pytest.mark.parametrize(
    "content,needle",
    [(b"", "is empty"), (b"\x00\x01\x02binary", "binary"), (b"abc\xff\xfe", "not valid UTF-8 at byte offset 3"),
     (b"tiny", "too small")],
)
def test_bad_corpus_one_line_error_nothing_written(tmp_path, content, needle):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "charrnn", "train", str(p), "--out", str(out), "--steps", "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert res.stdout == ""
    assert not out.exists()


def test_directory_missing_file_and_unwritable_output(tmp_path, corpus):
    res = run(["train", str(tmp_path)])
    assert res.exit_code == 1 and "is a directory" in res.output
    res = run(["train", str(tmp_path / "nope.txt")])
    assert res.exit_code == 1 and "no such file" in res.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run(["train", corpus, "--out", str(blocker / "sub"), "--steps", "2", *SMALL])
    assert res.exit_code == 1 and "output directory" in res.output


def test_resume_refuses_changed_corpus_and_options(corpus, tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(open(corpus, encoding="utf-8").read(), encoding="utf-8")
    out = str(tmp_path / "run")
    assert run(["train", str(src), "--out", out, "--steps", "4", *SMALL]).exit_code == 0
    res = run(["train", "--resume", out, "--hidden", "64"])
    assert res.exit_code == 2 and "--hidden" in res.output
    src.write_text(src.read_text() + "more", encoding="utf-8")
    res = run(["train", "--resume", out, "--steps", "8"])
    assert res.exit_code == 1 and "changed" in res.output


def test_divergence_is_caught_and_checkpoints_stay_finite(corpus, tmp_path):
    out = str(tmp_path / "run")
    res = run(["train", corpus, "--out", out, "--steps", "40", "--cell", "rnn", "--nonlinearity", "relu",
               "--clip", "0", "--lr", "1e4", "--warmup", "0", *SMALL[:-1]])
    assert res.exit_code in (0, 1)
    if res.exit_code == 1:
        assert "non-finite" in res.output
    for name in ("best.npz", "last.npz"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            for v in params_of(path).values():
                assert np.all(np.isfinite(v))


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_resumes(corpus, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "charrnn", "train", corpus, "--out", str(out), "--steps", "100000", "--eval-every", "1000000",
         "--hidden", "24", "--batch", "8", "--seq", "16", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait until training has really started (the first progress line goes to stderr)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "step" not in line:
        line = proc.stderr.readline()
    time.sleep(0.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stdout == ""
    assert "saved" in stderr and "Traceback" not in stderr
    meta = meta_of(str(out / "last.npz"))
    assert meta["step"] > 0
    res = run(["train", "--resume", str(out), "--steps", str(meta["step"] + 3), "-q"])
    assert res.exit_code == 0
    assert meta_of(str(out / "last.npz"))["step"] == meta["step"] + 3


def _fake_rule(params, chars, epochs):
    """A stand-in for dropout_for: 0 for choose_size's provisional 10 epochs, 0.3 once fitted."""
    return 0.0 if epochs == 10.0 else 0.3


def test_minutes_run_fits_its_dropout_and_schedule(tmp_path, monkeypatch):
    """End to end: a --minutes run that left --dropout open starts without dropout (the stand-in
    rule's provisional 0), turns it on when it fits it, says so, and stores it: the checkpoint's
    model and config both carry the fitted rate and the flag is cleared."""
    import charrnn.budget

    monkeypatch.setattr(charrnn.budget, "dropout_for", _fake_rule)
    p = tmp_path / "markov.txt"
    with open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8") as f:
        p.write_text(f.read()[:120_000], encoding="utf-8")  # over 50k characters: dropout is chosen
    out = str(tmp_path / "run")
    res = run(["train", str(p), "--out", out, "--minutes", "0.1", "--seq-warmup", "0", "--hidden", "24",
               "--batch", "8", "--seq", "16", "--threads", "1"])
    assert res.exit_code == 0, res.output
    first = res.stderr.splitlines()[0]
    assert "dropout 0 (until fitted to the budget)" in first
    fitted = [line for line in res.stderr.splitlines() if line.startswith("dropout ")]
    assert len(fitted) == 1 and fitted[0].startswith("dropout 0.3, weight drop 0: about ") and "epochs fit in the budget" in fitted[0]
    meta = meta_of(os.path.join(out, "last.npz"))
    assert meta["train"]["dropout"] == meta["dropout"] == 0.3
    assert not meta["train"]["dropout_fit"] and meta["train"]["schedule"] == "wsd"


def test_resume_with_steps_fits_a_dropout_left_open(corpus, tmp_path, monkeypatch):
    """A --minutes run stopped before its dropout fit and resumed with --steps fits it from the
    steps, before its first step, and keeps it from then on."""
    import charrnn.budget

    monkeypatch.setattr(charrnn.budget, "dropout_for", _fake_rule)
    real_choose = charrnn.budget.choose_size
    # what a --minutes run saves before its fit: the provisional rate, still to be fitted
    monkeypatch.setattr(charrnn.budget, "choose_size",
                        lambda cfg, n, *speed: replace(real_choose(cfg, n, *speed), dropout=0.0, dropout_pending=True))
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(charrnn.budget, "dropout_at_end", lambda cfg, fitted, *a: (fitted, "not yet"))  # stopped before it
        assert run(["train", corpus, "--out", out, "--steps", "3", *SMALL]).exit_code == 0
    assert meta_of(os.path.join(out, "last.npz"))["train"]["dropout_fit"]
    res = run(["train", "--resume", out, "--steps", "6"])
    assert res.exit_code == 0, res.output
    assert "dropout 0.3, weight drop 0: about " in res.stderr
    meta = meta_of(os.path.join(out, "last.npz"))
    assert meta["train"]["dropout"] == meta["dropout"] == 0.3 and not meta["train"]["dropout_fit"]


# ----------------------------------------------------------------------------- train_step
def _step_problem(B=4, seed=0):
    from charrnn.model import Model, ModelConfig

    m = Model(ModelConfig(cell="lstm", layers=2, hidden=8, vocab_size=9), dtype=np.float64).init(seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.integers(0, 9, size=(6, B)).astype(np.int32)
    y = rng.integers(0, 9, size=(6, B)).astype(np.int32)
    h, c = m.zero_state(B)
    return m, x, y, h, c


def test_train_step_is_forward_backward_clip_and_update():
    from charrnn.optim import clip_grad_norm, make_optimizer
    from charrnn.step import train_step

    m, x, y, h, c = _step_problem()
    ref = type(m)(m.cfg, dtype=m.dtype, theta=m.theta.copy())
    opt, ref_opt = (make_optimizer("adam", m.n_params, m.dtype, 1e-2) for _ in range(2))
    res = train_step(m, opt, x, y, h, c, None, 1e-2, 0.1, "norm")
    out = ref.forward_backward(x, y, h, c)
    norm = clip_grad_norm(out["grad"], 0.1)
    ref_opt.step(ref.theta, out["grad"], 1e-2)
    assert res.finite and res.loss == out["loss"] and res.norm == norm and norm > 0.1  # clipping happened
    np.testing.assert_array_equal(m.theta, ref.theta)
    np.testing.assert_array_equal(res.h, out["h"])


def test_train_step_reduction_hook_combines_workers_like_one_bigger_batch():
    """The reduction hook is where data-parallel workers meet: two halves of a batch whose
    gradients are averaged through it give the step of the whole batch."""
    from charrnn.optim import make_optimizer
    from charrnn.step import train_step

    m, x, y, h, c = _step_problem(B=6)
    halves = [type(m)(m.cfg, dtype=m.dtype, theta=m.theta.copy()) for _ in range(2)]
    whole_opt = make_optimizer("adam", m.n_params, m.dtype, 1e-2)
    whole = train_step(m, whole_opt, x, y, h, c, None, 1e-2, 5.0, "norm")
    other = halves[1].forward_backward(np.ascontiguousarray(x[:, 3:]), np.ascontiguousarray(y[:, 3:]),
                                       np.ascontiguousarray(h[:, 3:]), np.ascontiguousarray(c[:, 3:]))

    def average_with_other_worker(grad, loss):
        grad += other["grad"]
        grad *= 0.5
        return 0.5 * (loss + other["loss"])

    half = train_step(halves[0], make_optimizer("adam", m.n_params, m.dtype, 1e-2), np.ascontiguousarray(x[:, :3]),
                      np.ascontiguousarray(y[:, :3]), np.ascontiguousarray(h[:, :3]), np.ascontiguousarray(c[:, :3]),
                      None, 1e-2, 5.0, "norm", reduce=average_with_other_worker)
    assert abs(half.loss - whole.loss) < 1e-12 and abs(half.norm - whole.norm) < 1e-12
    np.testing.assert_allclose(halves[0].theta, m.theta, rtol=0, atol=1e-12)


def test_train_step_skips_a_non_finite_update():
    from charrnn.optim import make_optimizer
    from charrnn.step import train_step

    m, x, y, h, c = _step_problem()
    m.params["decoder.bias"][0] = np.inf
    before = m.theta.copy()
    opt = make_optimizer("adam", m.n_params, m.dtype, 1e-2)
    res = train_step(m, opt, x, y, h, c, None, 1e-2, 5.0, "norm")
    assert not res.finite and opt.t == 0
    np.testing.assert_array_equal(m.theta, before)


PRECOMPILE = """
import json, sys, threading, time
from numba.core import event
import charrnn.train as train
from charrnn.config import TrainConfig

starts, first_step = [], []


class Record(event.Listener):
    def on_start(self, ev):
        fn = getattr(ev.data.get("dispatcher"), "py_func", None)
        starts.append((time.monotonic(), threading.current_thread().name, getattr(fn, "__name__", "?")))

    def on_end(self, ev):
        pass


real_step = train.train_step


def step(*a, **k):
    if not first_step and threading.current_thread() is threading.main_thread():  # the run's, not the precompile's
        first_step.append(time.monotonic())
    return real_step(*a, **k)


train.train_step = step
with event.install_listener("numba:compile", Record()):
    cfg = TrainConfig(cell="rnn", hidden=16, batch=4, seq=8, steps=3, seq_warmup=0, threads=2)
    tr = train.Trainer.new([sys.argv[1]], cfg, sys.argv[2], quiet=True)
    tr.run()
print(json.dumps({"early": sorted({name for t, thread, name in starts if thread == "charrnn-precompile"}),
                  "after": [name for t, thread, name in starts if t >= first_step[0]]}))
"""


def test_the_kernels_compile_while_the_corpus_loads_and_never_during_steps(corpus, tmp_path):
    """On a cold cache, Trainer.new starts compiling the training kernels in a background thread
    before it reads the corpus; by the first training step everything the run needs, the
    validation's scorer included, is compiled, so no step or validation waits for the compiler."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", PRECOMPILE, corpus, str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # the background thread compiled some of the run's kernels (which ones depends on who gets there first)
    assert {"_forward_backward", "_masks_thread", "_score", "_adam"} & set(got["early"]), got
    assert got["after"] == [], got


# ---------------------------------------------------------------------------------- interrupts at any moment
def _metrics(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


def _interrupt_at_validation(tr, at_step, sig, span_calls):
    """Make the run's validation at `at_step` receive `sig` (a real signal, to this process) while
    it scores its second span; record the scorer's calls during that validation in `span_calls`."""
    real = tr.model.score

    def score(*a, **k):
        if tr.state.step == at_step:
            span_calls.append(1)
            if len(span_calls) == 2:
                os.kill(os.getpid(), sig)
        return real(*a, **k)

    tr.model.score = score


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("at", [10, 8])
def test_interrupt_during_a_validation_stops_it_saves_and_the_resumed_run_does_it(corpus, tmp_path, monkeypatch, sig,
                                                                                  code, at):
    """At step 10 (not a multiple of --eval-every: the final validation) or 8 (an in-loop one): the
    validation stops at its next span, the run saves last.npz with the validation marked due, and
    the resumed run validates first; it then ends exactly as an uninterrupted run."""
    from charrnn import evaluate
    from charrnn.config import TrainConfig
    from charrnn.errors import Interrupted
    from charrnn.train import Trainer

    monkeypatch.setattr(evaluate, "SPAN", 64)  # many spans per validation
    cfg = TrainConfig(cell="gru", hidden=16, batch=4, seq=8, steps=10, eval_every=4, seq_warmup=0, threads=1,
                      dropout=0.1)
    ref = str(tmp_path / "ref")
    Trainer.new([corpus], cfg, ref, quiet=True).run()
    out = str(tmp_path / "run")
    tr = Trainer.new([corpus], cfg, out, quiet=True)
    calls = []
    _interrupt_at_validation(tr, at, sig, calls)
    with pytest.raises(Interrupted) as e:
        tr.run()
    assert e.value.exit_code == code and "saved" in str(e.value)
    assert len(calls) == 2  # stopped at the span after the signal, not at the end of the validation
    meta = meta_of(os.path.join(out, "last.npz"))
    assert meta["step"] == at and meta["run"]["eval_due"] is True
    assert [x["step"] for x in _metrics(out)] == [4, 8][: 1 if at == 8 else 2]
    Trainer.resume(out, quiet=True).run()
    got, want = _metrics(out), _metrics(ref)
    assert [x["step"] for x in got] == [x["step"] for x in want] == [4, 8, 10]
    for g, w in zip(got, want):  # every key of the contract but the measured times and speeds
        assert {k: v for k, v in g.items() if k not in ("elapsed_s", "chars_per_s")} == \
            {k: v for k, v in w.items() if k not in ("elapsed_s", "chars_per_s")}
        assert g["chars_per_s"] > 0
    pa, pb = params_of(os.path.join(ref, "last.npz")), params_of(os.path.join(out, "last.npz"))
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    assert meta_of(os.path.join(out, "best.npz"))["best_val"] == meta_of(os.path.join(ref, "best.npz"))["best_val"]


def test_sigterm_while_compiling_exits_cleanly_and_leaves_nothing(corpus, tmp_path):
    """On a cold cache: SIGTERM during the start-up compile ends the run at once, with one line and
    exit 143, and the directory it had made is gone."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "train", corpus, "--out", str(out), "--steps", "3",
                             "--hidden", "16", "--cell", "rnn"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = ""
    while "compiling" not in line:
        line = proc.stderr.readline()
        assert line, "no compile notice"
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 5  # not after the compile has finished (several seconds more)
    assert proc.returncode == 143, stderr
    assert "before training started" in stderr and "Traceback" not in stderr
    assert stdout == ""
    assert not out.exists()


def test_val_chars_scores_the_start_of_the_split_and_resume_keeps_it(corpus, tmp_path, monkeypatch):
    from charrnn import budget
    from charrnn.config import TrainConfig
    from charrnn.train import Trainer

    cfg = TrainConfig(cell="gru", hidden=16, batch=4, seq=8, steps=4, seq_warmup=0, threads=1)
    tr = Trainer.new([corpus], replace(cfg, val_chars=300), str(tmp_path / "a"), quiet=True)
    assert tr.fitted.val_chars == 300
    tr.run()
    ck = checkpoint.load(os.path.join(tmp_path / "a", "best.npz"))
    want = score_tokens_of(ck, tr.val_tokens[:301])
    assert math.isclose(_metrics(str(tmp_path / "a"))[-1]["val_loss"], want, rel_tol=1e-9)
    assert not math.isclose(want, score_tokens_of(ck, tr.val_tokens), rel_tol=1e-6)
    # the default caps a big split and leaves an ordinary one whole; "all" never caps
    def fitted_val_chars(c, name):
        tr = Trainer.new([corpus], c, str(tmp_path / name), quiet=True)
        tr.close()
        return tr.fitted.val_chars

    monkeypatch.setattr(budget, "DEFAULT_VAL_CHARS", 500)
    assert fitted_val_chars(cfg, "b") == 500
    assert fitted_val_chars(replace(cfg, val_chars="all"), "c") is None
    monkeypatch.setattr(budget, "DEFAULT_VAL_CHARS", 10**6)
    assert fitted_val_chars(cfg, "d") is None
    # recorded when the run starts: a resumed run scores the same characters whatever the default is now
    tr = Trainer.resume(str(tmp_path / "a"), steps=6, quiet=True)
    assert tr.fitted.val_chars == 300
    tr.close()
    res = run(["train", corpus, "--val-chars", "0", "--out", str(tmp_path / "e"), *SMALL])
    assert res.exit_code == 2 and "--val-chars" in res.output


def score_tokens_of(ck, tokens):
    from charrnn.evaluate import score_tokens

    return score_tokens(ck.model, tokens).nats


def test_unwritable_metrics_is_a_one_line_error_after_the_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").mkdir()  # cannot be opened for appending
    res = run(["train", corpus, "--out", str(out), "--steps", "3", *SMALL])
    assert res.exit_code == 1 and "could not write" in res.output and "metrics.jsonl" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert (out / "last.npz").exists()  # the checkpoint was written before the metrics line


# ----------------------------------------------------------------------------- the token file
def test_resume_reuses_the_token_file_or_builds_it(corpus, tmp_path):
    """A run keeps its corpus as tokens.npy (+ tokens.json) in its directory; --resume maps it
    again when it matches, and builds it when it is missing (a run made before token files) or
    stale; either way the run ends with the weights of an uninterrupted one."""
    opts = SMALL + ["--eval-every", "4"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(["train", corpus, "--out", a, "--steps", "12", *opts]).exit_code == 0
    assert run(["train", corpus, "--out", b, "--steps", "4", *opts]).exit_code == 0
    tok = os.path.join(b, "tokens.npy")
    ids = np.load(tok, mmap_mode="r")
    # <START> training text, then <START> validation text
    assert ids.dtype == np.uint8 and len(ids) == len(open(corpus, encoding="utf-8").read()) + 2
    del ids
    before = os.stat(tok)
    assert run(["train", "--resume", b, "--steps", "8", "-q"]).exit_code == 0
    after = os.stat(tok)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # reused, not rewritten
    os.unlink(tok)
    os.unlink(os.path.join(b, "tokens.json"))
    assert run(["train", "--resume", b, "--steps", "10", "-q"]).exit_code == 0
    assert os.path.exists(tok)
    meta = json.load(open(os.path.join(b, "tokens.json")))
    meta["n_train"] += 1  # stale: built for something else
    json.dump(meta, open(os.path.join(b, "tokens.json"), "w"))
    assert run(["train", "--resume", b, "--steps", "12", "-q"]).exit_code == 0
    assert json.load(open(os.path.join(b, "tokens.json")))["n_train"] == meta["n_train"] - 1
    pa, pb = params_of(os.path.join(a, "last.npz")), params_of(os.path.join(b, "last.npz"))
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_training_on_stdin_builds_the_same_token_file(corpus, tmp_path):
    """`charrnn train -` reads stdin once (spooled for the second reading) and trains on the
    same tokens as the file."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run(["train", corpus, "--out", a, "--steps", "2", *SMALL]).exit_code == 0
    res = CliRunner().invoke(cli, ["train", "-", "--out", b, "--steps", "2", *SMALL],
                             input=open(corpus, "rb").read(), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert open(os.path.join(a, "tokens.npy"), "rb").read() == open(os.path.join(b, "tokens.npy"), "rb").read()
    pa, pb = params_of(os.path.join(a, "last.npz")), params_of(os.path.join(b, "last.npz"))
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_max_vocab_maps_rare_characters_to_unk_says_so_and_resumes(tmp_path):
    """A text of many distinct characters (a CJK-like tail of rare ones): --max-vocab keeps the most
    frequent, the rest train as <UNK>; the run says what it cost, and resumes with the same vocabulary."""
    from charrnn.vocab import UNK_ID

    rng = np.random.default_rng(0)
    common = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年"
    rare = "".join(chr(0x4E00 + 500 + i) for i in range(300))
    text = "".join(rng.choice(list(common), size=6000)) + rare + "".join(rng.choice(list(common), size=2000))
    src = tmp_path / "zh.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "charrnn", "train", str(src), "--out", str(out), "--steps", "3",
                          "--max-vocab", "40", "--hidden", "16", "--batch", "4", "--seq", "16", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"kept the 40 most frequent of {len(set(text))} characters" in res.stderr
    ck = checkpoint.load(str(out / "last.npz"))
    assert ck.vocab.size == 43 and set(common) <= set(ck.vocab.chars)
    ids = np.load(str(out / "tokens.npy"))
    assert (ids == UNK_ID).sum() == len(set(text)) - 40  # each rare character occurs once
    res = run(["train", "--resume", str(out), "--steps", "4", "-q"])
    assert res.exit_code == 0, res.output
    res = run(["train", str(src), "--out", str(tmp_path / "all"), "--steps", "1", "--max-vocab", "all", *SMALL])
    assert res.exit_code == 0 and checkpoint.load(str(tmp_path / "all" / "last.npz")).vocab.size == len(set(text)) + 3


def test_an_early_exit_while_kernels_compile_in_the_background_is_clean(corpus, tmp_path):
    """On a cold cache, SIGTERM while the run waits for its corpus (a FIFO nobody writes yet) and
    the background thread compiles: one line, exit 143, at once, and no abort inside LLVM from
    shutting down under the compiling thread."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    fifo = tmp_path / "c.fifo"
    os.mkfifo(fifo)
    for attempt in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "charrnn", "train", str(fifo), "--out", str(tmp_path / "o"),
                                 "--steps", "1", "--hidden", "16"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(3.0 if attempt == 0 else 1.0)  # the background compile is under way
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 143, stderr
        assert stderr.strip() == "charrnn: terminated" and stdout == ""


# ---------------------------------------------------------------------------------- found in review
def test_closed_stdin_closed_stderr_and_out_of_memory_are_handled(corpus, tmp_path, monkeypatch):
    """`train - <&-`: one line, exit 1. `2>&-`: the run trains and nothing of its notes reaches
    stdout. A MemoryError anywhere: the promised one-line message."""
    res = subprocess.run(["sh", "-c", f'exec "{sys.executable}" -m charrnn train - --steps 1 <&-'],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "<stdin>: is closed" in res.stderr and "Traceback" not in res.stderr
    out = tmp_path / "quiet"
    res = subprocess.run(["sh", "-c", f'exec "{sys.executable}" -m charrnn train "{corpus}" --out "{out}" --steps 2 '
                          f'--max-vocab 20 --hidden 64 --batch 8 --seq 16 --threads 1 2>&-'],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout == ""
    assert (out / "last.npz").exists()
    from charrnn import setup

    def oom(*a, **k):
        raise MemoryError

    monkeypatch.setattr(setup, "new_run", oom)
    res = run(["train", corpus, "--steps", "1"])
    assert res.exit_code == 1 and "out of memory" in res.output


def test_a_token_file_damaged_in_place_is_built_again(corpus, tmp_path):
    out = tmp_path / "run"
    assert run(["train", corpus, "--out", str(out), "--steps", "2", *SMALL]).exit_code == 0
    tok = out / "tokens.npy"
    raw = bytearray(tok.read_bytes())
    raw[200:400] = b"\xff" * 200  # ids far outside the vocabulary; tokens.json untouched
    tok.write_bytes(bytes(raw))
    res = run(["train", "--resume", str(out), "--steps", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert int(np.load(str(tok)).max()) < checkpoint.load(str(out / "last.npz")).vocab.size
