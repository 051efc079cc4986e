"""Sizing and budget policy (charrnn/budget.py): the choices for typical corpora and budgets, the
dropout rule and its anchors, and how a --minutes run fits its schedule, validation interval and
dropout to the time it measures."""

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn.budget import (DEFAULT_EPOCHS, DROPOUT_HIGH, DROPOUT_LOW, DROPOUT_MID, REFIT_EVERY, Fit, StepTimes,
                            chars_in, choose_size, dropout_at_end, dropout_for, planned_epochs, refit, regularise,
                            seq_len_at, steps_in)
from charrnn.budget import DROPOUT_WITH_WEIGHT_DROP, WEIGHT_DROP, WEIGHT_DROP_FROM
from charrnn.config import Fitted, TrainConfig, effective
from charrnn.model import approx_params


@pytest.mark.parametrize("seq_warmup,step", [(0, 0), (100, 0), (100, 40), (100, 150)])
def test_budget_fit_follows_the_seq_curriculum(seq_warmup, step):
    """A --minutes run fits its schedule from the measured time per character; with --seq-warmup
    the early steps are shorter, so more of them fit. Checked against counting step by step."""
    cfg = replace(TrainConfig(), batch=3, seq=64, seq_warmup=seq_warmup)
    per_char, seconds = 1e-3, 25.0
    n, t = 0, 0.0
    while t + per_char * seq_len_at(cfg, step + n) * cfg.batch <= seconds:
        t += per_char * seq_len_at(cfg, step + n) * cfg.batch
        n += 1
    got = steps_in(cfg, seconds, 0.0, per_char * cfg.batch, step)
    assert abs(got - n) <= 1  # the closed form past the curriculum may round differently
    if seq_warmup and step < seq_warmup:
        assert got > seconds / (per_char * cfg.seq * cfg.batch) + 5  # more than full-length steps would give


def test_step_times_separate_fixed_and_per_length_costs():
    """Steps of growing length (as under --seq-warmup) give back the fixed and the per-time-step
    cost; steps of one length give the exact time per step at that length."""
    rng = np.random.default_rng(0)
    times = StepTimes()
    for T in range(8, 64):
        times.add(T, (0.02 + 0.001 * T) * rng.uniform(0.97, 1.03))
    a, b = times.cost()
    assert abs(a - 0.02) < 0.004 and abs(b - 0.001) < 0.0001
    times = StepTimes()
    for _ in range(50):
        times.add(64, 0.1)
    a, b = times.cost()
    assert abs(a + 64 * b - 0.1) < 1e-12


def _start(cfg, eval_every=100, **fitted):
    """The fit of a --minutes run before its first refit, with the given config as the run's."""
    f = Fitted(cell=cfg.cell or "lstm", hidden=cfg.hidden or 64, dropout=cfg.dropout or 0.0,
               schedule=cfg.schedule, decay_steps=cfg.decay_steps, **fitted)
    return Fit(f, eval_every, True, False)


def test_budget_fit_is_refined_until_the_decay():
    """A --minutes run's first fit comes from short curriculum steps; refits from later steps move
    the schedule's end, and stop once the decay has begun."""
    cfg = replace(TrainConfig(), batch=4, seq=64, seq_warmup=100, warmup=10, schedule="auto")
    fit = _start(cfg)
    times = StepTimes()
    a, b = 0.05, 0.001  # a step costs 0.05 s plus 1 ms per time step
    for T in range(9, 14):  # what the first 30 steps look like: short, and all about as long
        times.add(T, a + b * T)
    fit, msgs = refit(effective(cfg, fit.fitted), fit, 30, times, 300.0, 290.0, 0.0, False, 10_000, 10**6)
    first = fit.fitted.decay_steps
    assert fit.fitted.schedule == "wsd" and fit.schedule_fitted and fit.open and len(msgs) == 1
    for T in range(14, 65):
        times.add(T, a + b * T)
    step = 30 + REFIT_EVERY
    run_cfg = effective(cfg, fit.fitted)
    fit, msgs = refit(run_cfg, fit, step, times, 300.0, 280.0, 0.0, False, 10_000, 10**6)
    # per character the short steps looked ~3.4x dearer than full ones, so the refit finds more steps
    assert fit.fitted.decay_steps > 1.5 * first
    want = step + steps_in(run_cfg, 280.0 * 0.92, a, b, step) - cfg.warmup
    assert abs(fit.fitted.decay_steps - want) <= 2
    step = cfg.warmup + int(fit.fitted.decay_steps * 0.8)  # the decay begins: no more refits
    fit, msgs = refit(effective(cfg, fit.fitted), fit, step, times, 300.0, 10.0, 0.0, False, 10_000, 10**6)
    assert not fit.open and any("decaying" in m for m in msgs)


def test_validation_interval_is_fitted_to_the_budget():
    """Without --eval-every a --minutes run validates about every max(1 min, budget / 8), in
    multiples of 50 steps, set while the steps reach their full length; then the fit closes."""
    cfg = replace(TrainConfig(), batch=4, seq=64, seq_warmup=0, warmup=10, schedule="constant")
    times = StepTimes()
    for _ in range(50):
        times.add(64, 0.01)  # 0.01 s per step
    fit, _ = refit(cfg, _start(cfg, eval_every=200), 30, times, 1200.0, 1190.0, 0.0, True, 10_000, 10**6)
    assert fit.eval_every == int(150 / 0.01) // 50 * 50 and fit.open  # 1200 s / 8 = 150 s of steps
    fit, _ = refit(cfg, fit, 30, times, 240.0, 230.0, 0.0, True, 10_000, 10**6)
    assert fit.eval_every == int(60 / 0.01) // 50 * 50  # at least a minute apart
    fit, _ = refit(cfg, fit, 2 * REFIT_EVERY, times, 240.0, 200.0, 0.0, False, 10_000, 10**6)
    assert not fit.open  # the interval is fixed once the steps have their full length


@pytest.mark.parametrize("budget,speed,chars,cell,hidden,dropout,wd,fit", [
    ({"minutes": 5}, 1, 1_000_000, "gru", 256, 0.1, 0.0, True),  # short budgets: a small, fast GRU that sees more data
    ({"minutes": 5}, 2.5, 1_000_000, "gru", 384, 0.2, 0.0, True),  # at bf16's speed a larger one (12.5 float32 minutes)
    ({"minutes": 15}, 1, 1_000_000, "gru", 384, 0.2, 0.0, True),  # as for that much time in float32
    ({"minutes": 30}, 1, 1_000_000, "lstm", 512, 0.2, 0.3, True),  # longer ones: an LSTM of 512 units ...
    ({"minutes": 10}, 2.5, 1_000_000, "lstm", 512, 0.2, 0.3, True),  # (25 float32 minutes)
    ({"minutes": 30}, 2.5, 1_000_000, "lstm", 768, 0.2, 0.3, True),  # 75 float32 minutes: 768 units ...
    ({"minutes": 30}, 2.5, 900_000, "lstm", 512, 0.2, 0.3, True),  # ... where the text has 8 parameters' worth
    ({"minutes": 30}, 1, 400_000, "lstm", 256, 0.3, 0.0, True),  # ... halved while over 4 parameters per character
    ({"minutes": 30, "epochs": 2}, 1, 1_000_000, "lstm", 512, 0.1, 0.0, True),  # until fitted: --epochs ends it sooner
    ({}, 1, 1_000_000, "lstm", 256, 0.15, 0.0, False),  # no budget: 10 epochs
    ({}, 2.5, 1_000_000, "lstm", 256, 0.15, 0.0, False),  # the speed sizes time budgets only
    ({"epochs": 40}, 1, 1_000_000, "lstm", 256, 0.2, 0.3, False),  # more epochs: weight drop, less output dropout
    ({"steps": 2000}, 1, 1_000_000, "lstm", 256, 0.0, 0.0, False),  # 4 epochs of batch 32 x seq 64: none
    ({}, 1, 5_000_000, "lstm", 512, 0.1, 0.0, False),
    ({}, 1, 20_000, "lstm", 64, 0.0, 0.0, False),  # tiny corpora: halved down to 64 units, no dropout
])
def test_choose_size_follows_the_budget_and_the_corpus(budget, speed, chars, cell, hidden, dropout, wd, fit):
    """The choices for typical corpora and budgets; the dropout and weight drop are provisional
    (`fit`) where a --minutes run refits them once it knows its speed. The config as given is left
    as it was."""
    given = replace(TrainConfig(), **budget)
    f = choose_size(given, chars, speed)
    assert (f.cell, f.hidden, f.dropout, f.weight_drop, f.dropout_pending) == (cell, hidden, dropout, wd, fit)
    assert approx_params(f.cell, given.layers, f.hidden) <= (8 if f.hidden == 768 else 4) * chars or f.hidden <= 64
    assert (given.cell, given.hidden, given.dropout, given.weight_drop) == (None, None, None, None)
    assert f.epochs == (None if budget else DEFAULT_EPOCHS)  # the default budget is a fitted value
    for fixed_cell in ("lstm", "gru", "rnn"):  # what the user set is kept, and never refitted
        fixed = choose_size(replace(TrainConfig(), **budget, cell=fixed_cell, hidden=100, dropout=0.3,
                                    weight_drop=0.1), chars)
        assert (fixed.cell, fixed.hidden, fixed.dropout, fixed.weight_drop, fixed.dropout_pending) == (
            fixed_cell, 100, 0.3, 0.1, False)


@pytest.mark.parametrize("x", [1.0, 6.6, WEIGHT_DROP_FROM * 0.99, WEIGHT_DROP_FROM, 40.0, 400.0])
@pytest.mark.parametrize("dropout_open,wd_open", [(True, True), (True, False), (False, True), (False, False)])
def test_regularise_adds_weight_drop_where_the_model_could_memorise_and_then_caps_the_dropout(x, dropout_open,
                                                                                              wd_open):
    params, chars = 500_000, 1_000_000
    epochs = x * chars / params
    f = Fitted("gru", 256, 0.33, weight_drop=0.07, dropout_open=dropout_open, weight_drop_open=wd_open)
    r = regularise(f, params, chars, epochs)
    want_wd = (WEIGHT_DROP if x >= WEIGHT_DROP_FROM else 0.0) if wd_open else 0.07
    assert r.weight_drop == want_wd
    rule = dropout_for(params, chars, epochs)
    want_d = (min(rule, DROPOUT_WITH_WEIGHT_DROP) if want_wd > 0 else rule) if dropout_open else 0.33
    assert r.dropout == want_d
    assert (r.dropout_open, r.weight_drop_open) == (dropout_open, wd_open)


def test_approx_params_is_the_exact_count():
    from charrnn.model import Model, ModelConfig

    for cell in ("lstm", "gru", "rnn"):
        for L, H in ((1, 8), (2, 100), (3, 17)):
            assert approx_params(cell, L, H, V=71) == Model(ModelConfig(cell, L, H, 71)).n_params


@settings(max_examples=200, deadline=None)
@given(st.integers(1_000, 10_000_000), st.integers(50_000, 10_000_000), st.floats(0.01, 1000.0),
       st.floats(1.01, 10.0))
def test_dropout_grows_with_epochs_and_parameters_per_character(params, chars, epochs, more):
    """dropout_for is a rate in [0, 0.5] on a 0.05 grid that never falls when the model sees more
    epochs or has more parameters, or when the text is shorter."""
    d = dropout_for(params, chars, epochs)
    assert 0.0 <= d <= 0.5 and abs(d * 20 - round(d * 20)) < 1e-9
    assert dropout_for(params, chars, epochs * more) >= d
    assert dropout_for(int(params * more), chars, epochs) >= d
    assert dropout_for(params, max(1, int(chars / more)), epochs) >= d


def test_dropout_passes_through_its_measured_anchors():
    """The three measured points: 10 epochs of a 2x256 GRU, 17 of a 2x384 GRU, 12-15 of a 2x512
    LSTM on ~1 MB; and between them, monotone."""
    for x, d in (DROPOUT_LOW, DROPOUT_MID, DROPOUT_HIGH):
        assert dropout_for(1_000_000, 1_000_000, x) == d
        assert dropout_for(500_000, 2_000_000, 4 * x) == d
    assert dropout_for(1_000_000, 1_000_000, DROPOUT_LOW[0] / 10) == 0.0
    assert dropout_for(1_000_000, 1_000_000, DROPOUT_HIGH[0] * 10) == 0.5
    xs = np.geomspace(DROPOUT_LOW[0], DROPOUT_HIGH[0], 200)
    assert all(np.diff([dropout_for(1_000_000, 1_000_000, x) for x in xs]) >= 0)


@pytest.mark.parametrize("budget_s,epochs_cap", [(300.0, None), (1200.0, None), (1200.0, 3.0)])
def test_budget_fit_chooses_the_dropout_once(budget_s, epochs_cap):
    """A --minutes run that left --dropout open refits it from the epochs its budget allows, once
    the curriculum's steps have their full length, and only once."""
    given = replace(TrainConfig(), batch=32, seq=64, seq_warmup=300, warmup=100, schedule="auto", cell="gru",
                    hidden=256, minutes=budget_s / 60, epochs=epochs_cap)
    fit = Fit(Fitted("gru", 256, 0.1, dropout_pending=True), 500, True, False)
    params, n = 700_000, 1_000_000
    times = StepTimes()
    for _ in range(50):
        times.add(64, 0.06)  # 32 x 64 characters in 0.06 s: ~34k characters per second
    fit, msgs = refit(effective(given, fit.fitted), fit, 30, times, budget_s, budget_s - 1.0, 0.0, True, params, n)
    assert fit.fitted.dropout_pending and fit.fitted.dropout == 0.1  # step 30: still in the curriculum
    fit, msgs = refit(effective(given, fit.fitted), fit, 330, times, budget_s, budget_s - 10.0, 0.0, True, params, n)
    assert not fit.fitted.dropout_pending
    total = given.warmup + fit.fitted.decay_steps  # the fitted schedule's end: the steps the budget allows
    epochs = chars_in(given, total) / n
    full = budget_s * 32 * 64 / 0.06 / 1e6  # the epochs of the whole budget without validation
    assert 0.85 * full < epochs < full
    want = dropout_for(params, n, min(epochs, epochs_cap or math.inf))
    assert fit.fitted.dropout == want
    if epochs_cap:  # --epochs ends the run first
        assert want == dropout_for(params, n, epochs_cap)
    elif budget_s > 300:  # a longer budget, more epochs: more dropout than the 5-minute one
        assert want > dropout_for(params, n, 10.0)
    assert any("dropout" in m and "epochs" in m for m in msgs)
    fitted_once = replace(fit.fitted, dropout=0.123)
    fit, _ = refit(effective(given, fitted_once), replace(fit, fitted=fitted_once), 380, times, budget_s,
                   budget_s - 20.0, 0.0, True, params, n)
    assert fit.fitted.dropout == 0.123  # once fitted, never again


def test_dropout_at_end_is_capped_by_the_budget_options():
    """A run that learns its length only on resume (--steps) fits its dropout from that length,
    and --epochs caps it."""
    given = replace(TrainConfig(), batch=4, seq=10, seq_warmup=0, steps=500)
    f = Fitted("lstm", 64, 0.0, dropout_pending=True)
    fitted, line = dropout_at_end(given, f, 500, 50_000, 10_000)
    assert not fitted.dropout_pending and fitted.dropout == dropout_for(50_000, 10_000, 2.0)
    assert line.startswith(f"dropout {fitted.dropout:g}: about 2.0 epochs")
    capped, _ = dropout_at_end(replace(given, epochs=1.0), f, 500, 50_000, 10_000)
    assert capped.dropout == dropout_for(50_000, 10_000, 1.0)


def test_planned_epochs():
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


def test_effective_config_fills_in_only_what_was_left_open():
    given = replace(TrainConfig(), epochs=3.0, schedule="auto")
    f = Fitted("gru", 256, 0.25, schedule="wsd", decay_steps=900, epochs=DEFAULT_EPOCHS)
    cfg = effective(given, f)
    assert (cfg.cell, cfg.hidden, cfg.dropout, cfg.schedule, cfg.decay_steps) == ("gru", 256, 0.25, "wsd", 900)
    assert cfg.epochs == 3.0  # the user's budget wins over the default one
    assert effective(replace(given, epochs=None), f).epochs == DEFAULT_EPOCHS
    assert given.cell is None and given.schedule == "auto"  # frozen: nothing rewritten
    with pytest.raises(Exception):
        given.cell = "lstm"
