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
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn import checkpoint
from charrnn.cli import cli
from charrnn.data import split_text
from charrnn.evaluate import score_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--hidden", "24", "--layers", "2", "--batch", "8", "--seq", "16", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    p = d / "markov.txt"
    with open(os.path.join(ROOT, "corpora", "markov.txt"), encoding="utf-8") as f:
        p.write_text(f.read()[:12000], encoding="utf-8")
    return str(p)


def run(args, cwd=None):
    runner = CliRunner()
    old = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        res = runner.invoke(cli, args, catch_exceptions=False)
    finally:
        os.chdir(old)
    return res


def params_of(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def meta_of(path):
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"][()]))


def test_resumed_run_equals_uninterrupted_run(corpus, tmp_path):
    opts = SMALL + ["--dropout", "0.2", "--eval-every", "7", "--seq-warmup", "10"]
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


def test_same_seed_same_model_and_different_seed_differs(corpus, tmp_path):
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = str(tmp_path / name)
        assert run(["train", corpus, "--out", out, "--steps", "12", "--seed", str(seed), *SMALL]).exit_code == 0
        outs.append(params_of(os.path.join(out, "best.npz")))
    for k in outs[0]:
        np.testing.assert_array_equal(outs[0][k], outs[1][k])
    assert any(not np.array_equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_validation_loss_equals_eval_of_the_held_out_text(corpus, tmp_path):
    out = str(tmp_path / "run")
    assert run(["train", corpus, "--out", out, "--steps", "15", *SMALL]).exit_code == 0
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


@pytest.mark.parametrize("seq_warmup,step", [(0, 0), (100, 0), (100, 40), (100, 150)])
def test_budget_fit_follows_the_seq_curriculum(seq_warmup, step):
    """A --minutes run fits its schedule from the measured time per character; with --seq-warmup
    the early steps are shorter, so more of them fit. Checked against counting step by step."""
    from dataclasses import replace
    from types import SimpleNamespace

    from charrnn.config import TrainConfig
    from charrnn.train import Trainer, seq_len_at

    cfg = replace(TrainConfig(), batch=3, seq=64, seq_warmup=seq_warmup)
    per_char, seconds = 1e-3, 25.0
    n, t = 0, 0.0
    while t + per_char * seq_len_at(cfg, step + n) * cfg.batch <= seconds:
        t += per_char * seq_len_at(cfg, step + n) * cfg.batch
        n += 1
    got = Trainer._steps_in(SimpleNamespace(cfg=cfg), seconds, 0.0, per_char * cfg.batch, step)
    assert abs(got - n) <= 1  # the closed form past the curriculum may round differently
    if seq_warmup and step < seq_warmup:
        assert got > seconds / (per_char * cfg.seq * cfg.batch) + 5  # more than full-length steps would give


def test_step_times_separate_fixed_and_per_length_costs():
    """Steps of growing length (as under --seq-warmup) give back the fixed and the per-time-step
    cost; steps of one length give the exact time per step at that length."""
    from charrnn.train import StepTimes

    rng = np.random.default_rng(0)
    st = StepTimes()
    for T in range(8, 64):
        st.add(T, (0.02 + 0.001 * T) * rng.uniform(0.97, 1.03))
    a, b = st.cost()
    assert abs(a - 0.02) < 0.004 and abs(b - 0.001) < 0.0001
    st = StepTimes()
    for _ in range(50):
        st.add(64, 0.1)
    a, b = st.cost()
    assert abs(a + 64 * b - 0.1) < 1e-12


def _fit_harness(cfg, **attrs):
    """A stand-in Trainer at step 30 of a --minutes run, with the real budget-fit methods bound."""
    from types import SimpleNamespace

    from charrnn.train import Trainer

    tr = SimpleNamespace(cfg=cfg, state=SimpleNamespace(step=30), _fitted=False, _fit_open=True, **attrs)
    for name in ("_steps_in", "_fit_budget", "_fix_auto_schedule", "_make_schedule", "_fit_dropout"):
        setattr(tr, name, getattr(Trainer, name).__get__(tr))
    return tr


def test_budget_fit_is_refined_until_the_decay():
    """A --minutes run's first fit comes from short curriculum steps; refits from later steps move
    the schedule's end, and stop once the decay has begun."""
    from types import SimpleNamespace

    from charrnn.config import TrainConfig
    from dataclasses import replace

    from charrnn.train import REFIT_EVERY, StepTimes, Trainer

    cfg = replace(TrainConfig(), batch=4, seq=64, seq_warmup=100, warmup=10, schedule="auto")
    tr = _fit_harness(cfg, eval_every=100, _auto_eval=False)
    msgs = []
    rep = SimpleNamespace(message=msgs.append)
    times = StepTimes()
    a, b = 0.05, 0.001  # a step costs 0.05 s plus 1 ms per time step
    for T in range(9, 14):  # what the first 30 steps look like: short, and all about as long
        times.add(T, a + b * T)
    tr._fit_budget(rep, times, 300.0, 290.0, 0.0)
    first = cfg.decay_steps
    assert cfg.schedule == "wsd" and tr._fitted and tr._fit_open and len(msgs) == 1
    for T in range(14, 65):
        times.add(T, a + b * T)
    tr.state.step = 30 + REFIT_EVERY
    tr._fit_budget(rep, times, 300.0, 280.0, 0.0)
    # per character the short steps looked ~3.4x dearer than full ones, so the refit finds more steps
    assert cfg.decay_steps > 1.5 * first
    want = 30 + REFIT_EVERY + Trainer._steps_in(tr, 280.0 * 0.92, a, b, 30 + REFIT_EVERY) - cfg.warmup
    assert abs(cfg.decay_steps - want) <= 2
    tr.state.step = cfg.warmup + int(cfg.decay_steps * 0.8)  # the decay begins: no more refits
    tr._fit_budget(rep, times, 300.0, 10.0, 0.0)
    assert not tr._fit_open


@pytest.mark.parametrize("budget,chars,cell,hidden,dropout,fit", [
    ({"minutes": 5}, 1_000_000, "gru", 256, 0.1, True),  # short budgets: a small, fast GRU that sees more data
    ({"minutes": 30}, 1_000_000, "lstm", 512, 0.45, True),  # longer ones: an LSTM of 512 units ...
    ({"minutes": 30}, 400_000, "lstm", 256, 0.4, True),  # ... halved while over 4 parameters per character
    ({"minutes": 30, "epochs": 2}, 1_000_000, "lstm", 512, 0.1, True),  # until fitted: --epochs ends it sooner
    ({}, 1_000_000, "lstm", 256, 0.15, False),  # no budget: 10 epochs
    ({"epochs": 40}, 1_000_000, "lstm", 256, 0.5, False),  # more epochs, more dropout
    ({"steps": 2000}, 1_000_000, "lstm", 256, 0.0, False),  # 4 epochs of batch 32 x seq 64: none
    ({}, 5_000_000, "lstm", 512, 0.1, False),
    ({}, 20_000, "lstm", 64, 0.0, False),  # tiny corpora: halved down to 64 units, no dropout
])
def test_choose_size_follows_the_budget_and_the_corpus(budget, chars, cell, hidden, dropout, fit):
    """The choices for typical corpora and budgets; the dropout is provisional (`fit`) where a
    --minutes run refits it once it knows its speed."""
    from charrnn.config import TrainConfig
    from charrnn.train import _approx_params, choose_size

    cfg = choose_size(replace(TrainConfig(), **budget), chars)
    assert (cfg.cell, cfg.hidden, cfg.dropout, cfg.dropout_fit) == (cell, hidden, dropout, fit)
    assert _approx_params(cfg.cell, cfg.layers, cfg.hidden) <= 4 * chars or cfg.hidden <= 64
    for fixed_cell in ("lstm", "gru", "rnn"):  # what the user set is kept, and never refitted
        fixed = choose_size(replace(TrainConfig(), **budget, cell=fixed_cell, hidden=100, dropout=0.3), chars)
        assert (fixed.cell, fixed.hidden, fixed.dropout, fixed.dropout_fit) == (fixed_cell, 100, 0.3, False)


@settings(max_examples=200, deadline=None)
@given(st.integers(1_000, 10_000_000), st.integers(50_000, 10_000_000), st.floats(0.01, 1000.0),
       st.floats(1.01, 10.0))
def test_dropout_grows_with_epochs_and_parameters_per_character(params, chars, epochs, more):
    """dropout_for is a rate in [0, 0.5] on a 0.05 grid that never falls when the model sees more
    epochs or has more parameters, or when the text is shorter."""
    from charrnn.train import dropout_for

    d = dropout_for(params, chars, epochs)
    assert 0.0 <= d <= 0.5 and abs(d * 20 - round(d * 20)) < 1e-9
    assert dropout_for(params, chars, epochs * more) >= d
    assert dropout_for(int(params * more), chars, epochs) >= d
    assert dropout_for(params, max(1, int(chars / more)), epochs) >= d


def test_dropout_passes_through_its_measured_anchors():
    """The two measured points: 10 epochs of a 2x256 GRU, 12-15 of a 2x512 LSTM on ~1 MB."""
    from charrnn.train import DROPOUT_HIGH, DROPOUT_LOW, dropout_for

    for x, d in (DROPOUT_LOW, DROPOUT_HIGH):
        assert dropout_for(1_000_000, 1_000_000, x) == d
        assert dropout_for(500_000, 2_000_000, 4 * x) == d
    assert dropout_for(1_000_000, 1_000_000, DROPOUT_LOW[0] / 10) == 0.0
    assert dropout_for(1_000_000, 1_000_000, DROPOUT_HIGH[0] * 10) == 0.5


@pytest.mark.parametrize("budget_s,epochs_cap", [(300.0, None), (1200.0, None), (1200.0, 3.0)])
def test_budget_fit_chooses_the_dropout_once(budget_s, epochs_cap):
    """A --minutes run that left --dropout open refits it from the epochs its budget allows, once
    the curriculum's steps have their full length, and only once; the model's masks follow it."""
    from types import SimpleNamespace

    from charrnn.config import TrainConfig
    from charrnn.model import ModelConfig
    from charrnn.train import StepTimes, chars_in, dropout_for

    cfg = replace(TrainConfig(), batch=32, seq=64, seq_warmup=300, warmup=100, schedule="auto", cell="gru",
                  hidden=256, dropout=0.1, dropout_fit=True, minutes=budget_s / 60, epochs=epochs_cap)
    model = SimpleNamespace(n_params=700_000, cfg=ModelConfig(cell="gru", hidden=256, vocab_size=68, dropout=0.1))
    tr = _fit_harness(cfg, eval_every=500, _auto_eval=True, model=model, stream=SimpleNamespace(n_tokens=1_000_000))
    msgs = []
    rep = SimpleNamespace(message=msgs.append)
    times = StepTimes()
    for _ in range(50):
        times.add(64, 0.06)  # 32 x 64 characters in 0.06 s: ~34k characters per second
    tr._fit_budget(rep, times, budget_s, budget_s - 1.0, 0.0)  # step 30: still in the curriculum
    assert cfg.dropout_fit and cfg.dropout == 0.1
    tr.state.step = 330
    tr._fit_budget(rep, times, budget_s, budget_s - 10.0, 0.0)
    assert not cfg.dropout_fit
    total = cfg.warmup + cfg.decay_steps  # the fitted schedule's end: the steps the budget allows
    epochs = chars_in(cfg, total) / 1_000_000
    full = budget_s * 32 * 64 / 0.06 / 1e6  # the epochs of the whole budget without validation
    assert 0.85 * full < epochs < full
    want = dropout_for(700_000, 1_000_000, min(epochs, epochs_cap or math.inf))
    assert cfg.dropout == model.cfg.dropout == want
    if epochs_cap:  # --epochs ends the run first
        assert want == dropout_for(700_000, 1_000_000, epochs_cap)
    elif budget_s > 300:  # a longer budget, more epochs: more dropout than the 5-minute one
        assert want > dropout_for(700_000, 1_000_000, 10.0)
    assert any("dropout" in m and "epochs" in m for m in msgs)
    tr.state.step = 380
    cfg.dropout = 0.123
    tr._fit_budget(rep, times, budget_s, budget_s - 20.0, 0.0)
    assert cfg.dropout == 0.123  # once fitted, never again


def _fake_rule(params, chars, epochs):
    """A stand-in for dropout_for: 0 for choose_size's provisional 10 epochs, 0.3 once fitted."""
    return 0.0 if epochs == 10.0 else 0.3


def test_minutes_run_fits_its_dropout_and_schedule(tmp_path, monkeypatch):
    """End to end: a --minutes run that left --dropout open starts without dropout (the stand-in
    rule's provisional 0), turns it on when it fits it, says so, and stores it: the checkpoint's
    model and config both carry the fitted rate and the flag is cleared."""
    import charrnn.train

    monkeypatch.setattr(charrnn.train, "dropout_for", _fake_rule)
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
    assert len(fitted) == 1 and fitted[0].startswith("dropout 0.3: about ") and "epochs fit in the budget" in fitted[0]
    meta = meta_of(os.path.join(out, "last.npz"))
    assert meta["train"]["dropout"] == meta["dropout"] == 0.3
    assert not meta["train"]["dropout_fit"] and meta["train"]["schedule"] == "wsd"


def test_resume_with_steps_fits_a_dropout_left_open(corpus, tmp_path, monkeypatch):
    """A --minutes run stopped before its dropout fit and resumed with --steps fits it from the
    steps, before its first step, and keeps it from then on."""
    import charrnn.train

    monkeypatch.setattr(charrnn.train, "dropout_for", _fake_rule)
    real_choose = charrnn.train.choose_size
    # what a --minutes run saves before its fit: the provisional rate, still to be fitted
    monkeypatch.setattr(charrnn.train, "choose_size",
                        lambda cfg, n: replace(real_choose(cfg, n), dropout=0.0, dropout_fit=True))
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(charrnn.train.Trainer, "_fit_dropout", lambda self, rep, total: None)  # stopped before it
        assert run(["train", corpus, "--out", out, "--steps", "3", *SMALL]).exit_code == 0
    assert meta_of(os.path.join(out, "last.npz"))["train"]["dropout_fit"]
    res = run(["train", "--resume", out, "--steps", "6"])
    assert res.exit_code == 0, res.output
    assert "dropout 0.3: about " in res.stderr
    meta = meta_of(os.path.join(out, "last.npz"))
    assert meta["train"]["dropout"] == meta["dropout"] == 0.3 and not meta["train"]["dropout_fit"]


def test_planned_epochs():
    from charrnn.config import TrainConfig
    from charrnn.train import DEFAULT_EPOCHS, chars_in, planned_epochs, seq_len_at

    cfg = replace(TrainConfig(), batch=4, seq=10, seq_warmup=0)
    assert planned_epochs(cfg, 1000) == DEFAULT_EPOCHS
    assert planned_epochs(replace(cfg, epochs=3.5), 1000) == 3.5
    assert planned_epochs(replace(cfg, steps=50), 1000) == 2.0  # 50 x 4 x 10 characters
    assert planned_epochs(replace(cfg, steps=50, epochs=1.5), 1000) == 1.5  # the first budget to end
    assert planned_epochs(replace(cfg, minutes=1, epochs=1.5), 1000) is None  # known once measured
    # under the --seq-warmup curriculum the first steps are shorter: counted step by step
    cur = replace(cfg, seq=64, seq_warmup=100)
    for steps in (1, 99, 100, 101, 250):
        assert chars_in(cur, steps) == 4 * sum(seq_len_at(cur, s) for s in range(steps))
    assert planned_epochs(replace(cur, steps=250), 10_000) == chars_in(cur, 250) / 10_000


