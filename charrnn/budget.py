"""Sizing and budget policy, as pure functions: what a run chooses when the user left an option
open, and how a --minutes run fits itself to its time.

- choose_size: the cell, the hidden size and the dropout, from the corpus and the budget.
- dropout_for: dropout from the epochs the budget allows and the parameters per character;
  regularise: with it, weight drop once the model sees each character often enough.
- StepTimes, steps_in, refit: a --minutes run measures its steps and fits its learning-rate
  schedule, its dropout and its validation interval to the time it has.

Everything here takes the configuration as given (charrnn/config.py's TrainConfig) and returns
Fitted values; nothing here changes a config, touches a model or prints. The measurements behind
each constant are cited beside it (benchmarks/results, docs/defaults.md).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from charrnn.config import Fitted, TrainConfig
from charrnn.model import approx_params
from charrnn.optim import WSD_DECAY_FRAC

# The sizes of a --minutes run, by its budget in float32 minutes: --minutes times the speed of the
# run's products against float32 (precision.speedup; 2.5 for bf16 on AMX), since the sizes were
# measured by what a budget buys in characters
SHORT_BUDGET_MINUTES = 10  # up to this: a 2x256 GRU (choose_size)
MID_BUDGET_MINUTES = 20  # up to this: a 2x384 GRU; beyond it a 2x512 LSTM
LONG_BUDGET_MINUTES = 40  # beyond this: a 2x768 LSTM, where the text allows 8 parameters a character
DEFAULT_EPOCHS = 10.0  # the budget of a run given none
# (epochs x parameters per character, dropout): the measured anchors of dropout_for
DROPOUT_LOW = (6.6, 0.1)  # 2x256 GRU, 5 minutes (10 epochs): 0.1 beat 0.05 and 0.15
# 2x384 GRU, 5 minutes of bf16 (17 epochs, x = 26): 0.3 gave 1.4458, 0.4 1.4507 (quality_bf16.txt); and on
# the line from DROPOUT_LOW to here, a 2x256 GRU's 10 minutes (19 epochs, x = 13): 0.2 beat 0.25 (quality_5min.txt)
DROPOUT_MID = (26.0, 0.3)
# 2x512 LSTM, 30 minutes (12-15 epochs, x = 42-51): 0.5 gave 1.446 and 1.449, 0.45 1.465; 2x384, 26 epochs: 0.4 beat 0.25
DROPOUT_HIGH = (40.0, 0.5)
NO_DROPOUT_BELOW = 50_000  # training characters: tiny corpora, a run is over long before it could overfit
# Weight drop from this exposure (epochs x parameters per character) on, with the output dropout
# capped: where a model would memorise its text, dropping recurrent weights regularises better than
# more output dropout; below it, weight drop only slows learning. Measured (equal updates,
# benchmarks/results/quality_regularisers.txt): tiny Shakespeare at 6 (a 5-minute 2x256 GRU), 0.2
# cost 0.016-0.024 nats/char; corpora/markov.txt at 36 (a 2x128 GRU, 59 epochs), 0.3 with dropout
# 0.2 gave 1.323 against 1.383 with the rule's dropout 0.5 alone (the text's entropy is 1.253).
# Tiny Shakespeare at 26 (a 2x384 GRU, 17 epochs in 5 minutes of bf16): 0.3 with dropout 0.2 gave
# 1.4626 against 1.4458 with dropout 0.3 alone (benchmarks/results/quality_bf16.txt), so the
# threshold lies between 26 and 36
WEIGHT_DROP_FROM = 30.0
WEIGHT_DROP = 0.3
DROPOUT_WITH_WEIGHT_DROP = 0.2
MIN_SEQ = 8  # first BPTT length of the --seq-warmup curriculum
AUTO_MEASURE_STEPS = 30  # steps timed before a --minutes run fits its schedule and validation interval
REFIT_EVERY = 50  # steps between refits of that fit, until the schedule's decay begins
# Held-out characters a run scores by default. Validation scores one stream (matrix-vector work),
# training 32 (matrix-matrix), so validation is slower per character than training (docs/defaults.md).
# On a large corpus a run validates every 2000 steps of 32x64 = 4.1M characters, so 200k held-out
# characters cost about 10% of its time. Tiny Shakespeare's 111k stay whole.
DEFAULT_VAL_CHARS = 200_000


# ---------------------------------------------------------------------------------- model sizing
def choose_size(cfg: TrainConfig, n_train_chars: int, speed: float = 1.0) -> Fitted:
    """The cell, hidden size and dropout of a new run, where the user left them open. `speed`: how
    many times float32's speed the run's products run at (precision.speedup), so that a --minutes
    budget is sized by the characters it buys.

    The rule comes from measurements on tiny Shakespeare (benchmarks/quality_curve.py, docs/defaults.md):
    a model should have about as many parameters as the text has characters or fewer, and with a
    short time budget a smaller model that sees more data wins. In a short budget a GRU wins: in
    5 minutes 2x256 reached 1.459 / 1.467 nats/char (two seeds) against 1.482-1.487 for the LSTM
    (three runs). It has 3 gates to the LSTM's 4, so it runs ~25% faster, and it learns faster
    from the start (1.61 against 1.82 after the first minute); in 10 minutes it still wins, 1.467
    against 1.501. In 5 minutes of bf16 (12.5 float32 minutes, 17 epochs of a 2x384 GRU or 42 of a
    2x256) 2x384 wins: 1.4458 against 1.4652, and 1.4531 for a 2x512 GRU (10 epochs). In 30
    minutes the 2x512 LSTM (dropout 0.5) wins: 1.479 against the GRU's 1.511 after 17-18 minutes.

    Dropout and weight drop come from regularise: from the epochs of --epochs or --steps (10
    without a budget), or, for --minutes, provisionally from 10 epochs until the run has measured
    its speed and refits them (Fitted.dropout_pending, refit).
    """
    minutes = float32_minutes(cfg, speed)
    cell = chosen_cell(cfg, speed)
    hidden = cfg.hidden
    n = max(n_train_chars, 1)
    if hidden is None:
        if minutes is not None and minutes <= SHORT_BUDGET_MINUTES:
            hidden, cap = 256, 2
        elif minutes is not None and minutes <= MID_BUDGET_MINUTES:
            hidden, cap = 384, 2
        elif (minutes is not None and minutes > LONG_BUDGET_MINUTES
              and approx_params(cell, cfg.layers, 768) <= 8 * n):
            # 30 minutes of bf16 (75 float32 minutes): a 2x512 LSTM would see ~44 epochs, a 2x768
            # the ~20 at which the 2x512 LSTM did best in 30 float32 minutes (1.4224 / 1.4176). The
            # 2x768 reached 1.4101 / 1.4230 (quality_30min.txt), best near epoch 10-13: it overfits after
            # that with the weight drop and dropout regularise() gives it
            hidden, cap = 768, 8
        elif minutes is not None or n_train_chars >= 2_000_000:
            # longer budgets: 512 units, up to 4 parameters per character. In 30 minutes on tiny
            # Shakespeare: 1.449 nats/char with dropout 0.5 (what dropout_for gives for its 15
            # epochs), against 1.476 for 2x384 with 0.4, which saw 26 epochs and overfit from minute 12
            hidden, cap = 512, 4
        else:
            hidden, cap = 256, 2
        # never far more parameters than characters on small corpora
        while hidden > 64 and approx_params(cell, cfg.layers, hidden) > cap * n:
            hidden //= 2
    has_budget = cfg.steps is not None or cfg.epochs is not None or cfg.minutes is not None
    fitted = Fitted(cell=cell, hidden=hidden, dropout=cfg.dropout or 0.0, schedule=cfg.schedule,
                    decay_steps=cfg.decay_steps, epochs=None if has_budget else DEFAULT_EPOCHS,
                    weight_drop=cfg.weight_drop or 0.0, dropout_open=cfg.dropout is None,
                    weight_drop_open=cfg.weight_drop is None)
    if n_train_chars < NO_DROPOUT_BELOW or not (fitted.dropout_open or fitted.weight_drop_open):
        return fitted  # what was left open stays 0: tiny corpora never reach overfitting
    epochs = planned_epochs(cfg, n)
    pending = epochs is None  # a --minutes run: refit once its speed is measured (refit)
    if pending:  # until then: as for the default budget, or for --epochs / --steps if they end it sooner
        cap = epoch_cap(cfg, n)
        epochs = DEFAULT_EPOCHS if cap is None else min(cap, DEFAULT_EPOCHS)
    return replace(regularise(fitted, approx_params(cell, cfg.layers, hidden), n, epochs), dropout_pending=pending)


def val_chars_for(cfg: TrainConfig, n_val_positions: int) -> int | None:
    """How many held-out positions a new run scores at each validation, from the start of the
    split: --val-chars N, all of them ("all"), or DEFAULT_VAL_CHARS; None when that is the whole
    split (so a run on an ordinary corpus records no cap at all)."""
    if cfg.val_chars == "all":
        return None
    cap = DEFAULT_VAL_CHARS if cfg.val_chars is None else int(cfg.val_chars)
    return None if cap >= n_val_positions else cap


def chosen_cell(cfg: TrainConfig, speed: float = 1.0) -> str:
    """The cell of a new run: the user's, or a GRU for a --minutes budget of MID_BUDGET_MINUTES
    float32 minutes or less (choose_size). Known before the corpus is read, so its kernels can
    compile meanwhile."""
    minutes = float32_minutes(cfg, speed)
    return cfg.cell or ("gru" if minutes is not None and minutes <= MID_BUDGET_MINUTES else "lstm")


def float32_minutes(cfg: TrainConfig, speed: float) -> float | None:
    """A --minutes budget as the float32 minutes that buy as many characters (None: no budget)."""
    return None if cfg.minutes is None else cfg.minutes * speed


def planned_epochs(cfg: TrainConfig, n_train_chars: int) -> float | None:
    """The passes over the text that --epochs or --steps allow (the smaller, if both), the default
    budget's 10 without any, or None when a --minutes budget decides (known only once measured)."""
    if cfg.minutes is not None:
        return None
    cap = epoch_cap(cfg, n_train_chars)
    return DEFAULT_EPOCHS if cap is None else cap


def epoch_cap(cfg: TrainConfig, n_train_chars: int) -> float | None:
    """The passes over the text after which --epochs or --steps end the run (the sooner), or None."""
    epochs = []
    if cfg.epochs is not None:
        epochs.append(cfg.epochs)
    if cfg.steps is not None:
        epochs.append(chars_in(cfg, cfg.steps) / max(n_train_chars, 1))
    return min(epochs) if epochs else None


def seq_len_at(cfg: TrainConfig, step: int) -> int:
    """The BPTT length used at `step` (the curriculum grows it linearly over seq_warmup steps)."""
    if cfg.seq_warmup <= 0 or step >= cfg.seq_warmup:
        return cfg.seq
    lo = min(MIN_SEQ, cfg.seq)
    return int(lo + (cfg.seq - lo) * step / cfg.seq_warmup)


def chars_in(cfg: TrainConfig, steps: int) -> int:
    """Characters read by steps 0 .. steps-1 (the --seq-warmup curriculum, then --seq), all streams."""
    warm = min(steps, max(cfg.seq_warmup, 0))
    return (sum(seq_len_at(cfg, s) for s in range(warm)) + (steps - warm) * cfg.seq) * cfg.batch


def dropout_for(params: int, n_train_chars: int, epochs: float) -> float:
    """Dropout for a model of `params` parameters that sees `epochs` passes over a text of
    `n_train_chars`: it grows with the logarithm of epochs x parameters per character, the exposure
    that decides how far the model can memorise its text. Piecewise linear in that logarithm through
    three measured points on tiny Shakespeare (benchmarks/results, docs/defaults.md): DROPOUT_LOW, a
    2x256 GRU seeing 10 epochs in 5 minutes; DROPOUT_MID, a 2x384 GRU seeing 17 epochs in 5 minutes
    of bf16; DROPOUT_HIGH, a 2x512 LSTM seeing 12-15 epochs in 30 minutes. Rounded to 0.05; 0 to 0.5.
    """
    x = max(epochs, 1e-9) * params / max(n_train_chars, 1)
    (x0, d0), (x1, d1) = (DROPOUT_LOW, DROPOUT_MID) if x < DROPOUT_MID[0] else (DROPOUT_MID, DROPOUT_HIGH)
    d = d0 + (d1 - d0) * math.log(x / x0) / math.log(x1 / x0)
    return round(min(max(d, 0.0), 0.5) * 20) / 20


# ---------------------------------------------------------------------------------- time budgets
class StepTimes:
    """Recent training steps' durations, to fit a --minutes run to its budget.

    A step of BPTT length T takes about a + b*T seconds: `a` is what every step costs whatever its
    length (the optimizer update, packing the recurrent weights, the loop), b the cost per time
    step. Under --seq-warmup the first steps are short, so a time per character measured on them
    alone counts `a` as if it grew with T and predicts far too few steps (measured: 2,535 predicted,
    4,273 run in a 5-minute run). With lengths spread enough, a and b come from least squares;
    otherwise (all steps of one length) the time per character is exact for that length.
    """

    WINDOW = 200

    def __init__(self):
        self._times = deque(maxlen=self.WINDOW)

    def add(self, T: int, seconds: float):
        self._times.append((T, seconds))

    def cost(self) -> tuple[float, float]:
        """(a, b): seconds per step of length T ~ a + b*T."""
        T = np.array([t for t, _ in self._times], dtype=np.float64)
        d = np.array([s for _, s in self._times], dtype=np.float64)
        if len(T) >= 10 and T.max() - T.min() >= 8:
            b, a = np.polyfit(T, d, 1)
            if a >= 0 and b > 0:
                return float(a), float(b)
        return 0.0, float(d.sum() / max(T.sum(), 1.0))


def steps_in(cfg: TrainConfig, seconds: float, a: float, b: float, step: int) -> int:
    """How many steps from `step` on fit in `seconds` at a + b*T seconds per step of length T,
    following the --seq-warmup curriculum."""
    n, t = 0, 0.0
    while step + n < cfg.seq_warmup:
        dt = a + b * seq_len_at(cfg, step + n)
        if t + dt > seconds:
            return max(1, n)
        t += dt
        n += 1
    n += int((seconds - t) / (a + b * cfg.seq))
    return max(1, n)


def wsd_schedule(cfg: TrainConfig, fitted: Fitted, step: int, steps_left: float) -> Fitted:
    """The "auto" schedule fitted to a time budget: "wsd" (constant, then a linear decay over the
    last 20%) ending when the budget should end. Measured on tiny Shakespeare in 5 minutes: a
    cosine over the whole budget lost to a constant rate (1.667 vs 1.599 nats/char): the model is
    far from converged and every early step at a lower rate is lost progress."""
    total = step + max(1, int(steps_left))
    return replace(fitted, schedule="wsd", decay_steps=max(1, total - cfg.warmup))


def regularise(fitted: Fitted, params: int, n_train_chars: int, epochs: float) -> Fitted:
    """The dropout and weight drop, where the user left them open, of a model of `params`
    parameters that sees `epochs` passes over a text of `n_train_chars`: weight drop WEIGHT_DROP
    from an exposure (epochs x parameters per character) of WEIGHT_DROP_FROM on, and then the
    output dropout of dropout_for capped at DROPOUT_WITH_WEIGHT_DROP; below it, dropout_for alone.
    A weight drop the user gave caps a fitted dropout the same way."""
    x = max(epochs, 1e-9) * params / max(n_train_chars, 1)
    wd = fitted.weight_drop
    if fitted.weight_drop_open:
        wd = WEIGHT_DROP if x >= WEIGHT_DROP_FROM else 0.0
    d = fitted.dropout
    if fitted.dropout_open:
        d = dropout_for(params, n_train_chars, epochs)
        if wd > 0:
            d = min(d, DROPOUT_WITH_WEIGHT_DROP)
    return replace(fitted, dropout=d, weight_drop=wd)


def fitted_dropout(fitted: Fitted, params: int, n_train_chars: int, epochs: float) -> tuple[Fitted, str]:
    """A --minutes run's dropout and weight drop (what was left open of them), chosen once from the
    epochs its budget allows; and what to say."""
    f = replace(regularise(fitted, params, n_train_chars, epochs), dropout_pending=False)
    wd = f", weight drop {f.weight_drop:g}" if f.weight_drop_open or f.weight_drop else ""
    return f, f"dropout {f.dropout:g}{wd}: about {epochs:.{0 if epochs >= 10 else 1}f} epochs fit in the budget"


@dataclass(frozen=True)
class Fit:
    """Where a --minutes run's fit stands: the fitted values, the validation interval, whether it
    is still being refined, and whether this process has fitted the schedule."""

    fitted: Fitted
    eval_every: int
    open: bool
    schedule_fitted: bool


def refit(cfg: TrainConfig, fit: Fit, step: int, times: StepTimes, budget_s: float, left_s: float,
          eval_cost: float, auto_eval: bool, params: int, n_train_chars: int) -> tuple[Fit, list[str]]:
    """Fit a --minutes run to its budget from the steps timed so far: the validation interval
    (when --eval-every was left open), the "auto" schedule and a dropout left open. Called after
    AUTO_MEASURE_STEPS steps, then every REFIT_EVERY steps until the fitted schedule's decay begins
    (the rate is constant until then, so refits change nothing already done): the first estimate
    comes from short steps, later ones from steps of the full length. `cfg` is the run's effective
    config. Returns the new state of the fit and the lines to report."""
    fitted, eval_every, still_open, sched = fit.fitted, fit.eval_every, fit.open, fit.schedule_fitted
    messages = []
    a, b = times.cost()
    per_step = a + b * cfg.seq
    if auto_eval and step < cfg.seq_warmup + REFIT_EVERY:
        # validate about every max(1 min, budget/8); validation's cost counts against the budget.
        # Set once the steps have their full length, so validations stay evenly spaced
        eval_every = max(50, int(max(60.0, budget_s / 8) / per_step) // 50 * 50)
    if eval_cost > 0:
        n = steps_in(cfg, left_s, a, b, step)
        left_s -= (n / eval_every + 1) * eval_cost
    else:
        left_s *= 0.92  # no validation measured yet
    steps_left = steps_in(cfg, max(0.0, left_s), a, b, step)
    if fitted.schedule == "auto" or sched:
        first = not sched
        fitted, sched = wsd_schedule(cfg, fitted, step, steps_left), True
        decay_from = cfg.warmup + int(fitted.decay_steps * (1.0 - WSD_DECAY_FRAC))
        if first:
            messages.append(f"schedule: {cfg.lr:g} until about step {decay_from}, then a linear decay to step "
                            f"{cfg.warmup + fitted.decay_steps} (fitted to the time budget; refined until the decay begins)")
        if step + REFIT_EVERY >= decay_from:
            still_open = False
            if not first:
                messages.append(f"schedule: decaying from step {decay_from} to {cfg.warmup + fitted.decay_steps}")
    elif step >= cfg.seq_warmup + 2 * REFIT_EVERY:
        still_open = False  # the validation interval, once steps have their full length
    # once the steps have their full length, or now if the run ends (or the fit closes) before
    if fitted.dropout_pending and (step >= cfg.seq_warmup or not still_open
                                   or step + steps_left < cfg.seq_warmup + REFIT_EVERY):
        fitted, line = dropout_at_end(cfg, fitted, step + steps_left, params, n_train_chars)
        messages.append(line)
    return Fit(fitted, eval_every, still_open, sched), messages


def dropout_at_end(cfg: TrainConfig, fitted: Fitted, total_steps: int, params: int, n_train_chars: int):
    """The dropout of a run that will end after `total_steps` (and no later than --epochs or
    --steps allow): (fitted, the line to report)."""
    epochs = chars_in(cfg, total_steps) / n_train_chars
    cap = epoch_cap(cfg, n_train_chars)
    if cap is not None:
        epochs = min(epochs, cap)
    return fitted_dropout(fitted, params, n_train_chars, epochs)
