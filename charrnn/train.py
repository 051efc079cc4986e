"""The training loop: truncated BPTT over B contiguous streams, around train_step; validation,
checkpoints, interrupts and non-finite-loss recovery.

Not here: setting a run up or resuming one (setup.py), what a run is and its meta record (run.py),
the contract of the workers that train together (team.py, parallel/), the maths (model.py,
kernels/), the sizing and budget policy (budget.py), progress and signals (progress.py,
signals.py), file formats (checkpoint.py), option parsing (cli).

One step reads: the next batch and its dropout masks, train_step (forward, backward, the team's
reduction, clipping, the update), then the book-keeping; before each step the team agrees on
stopping (a signal, the time budget), and refits, validations and recovery from a non-finite loss
are methods of their own.

Exact resume: everything the next step depends on is a function of what last.npz holds — the
parameters, optimizer moments and step count, the data position and carried hidden state, the
learning-rate scale, the fitted values (Fitted) and the seed (dropout masks are a hash of seed and
step). Evaluations and the sequence-length curriculum are functions of the step. So an
interrupted and resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from dataclasses import dataclass, field, replace


from charrnn import budget, precision, signals, threads
from charrnn.budget import AUTO_MEASURE_STEPS, REFIT_EVERY, StepTimes, seq_len_at
from charrnn.config import Fitted, TrainConfig
from charrnn.data import BatchStream
from charrnn.errors import Interrupted, TrainingError
from charrnn.evaluate import Cancelled
from charrnn.keeper import Keeper
from charrnn.optim import Averager
from charrnn.precompile import warm_up
from charrnn.progress import Reporter, remaining
from charrnn.rundir import holds_run
from charrnn.run import averaging_start
from charrnn.signals import Signals
from charrnn.step import train_step
from charrnn.team import Solo, Team

MAX_BAD_STEPS = 5  # consecutive non-finite steps before giving up


# ---------------------------------------------------------------------------------- the loop
@dataclass
class Books:
    """This process's accounts of the steps it ran: speed, the smoothed loss, time against the
    budget (the run's own state, what a checkpoint keeps, is RunState)."""

    smooth: float | None  # the smoothed training loss (goes on where a saved run left it)
    elapsed0: float  # training seconds before this process
    budget_s: float | None  # this process's time budget
    t_start: float = field(default_factory=time.monotonic)
    t_steps: float = 0.0  # seconds spent in training steps (excluding evaluation) in this process
    t_report: float = 0.0  # when the progress line was last drawn
    chars: int = 0
    steps: int = 0
    bad: int = 0  # consecutive non-finite steps
    eval_cost: float = 0.0  # seconds the last validation took
    times: StepTimes = field(default_factory=StepTimes)

    def time_up(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.t_start + self.eval_cost >= self.budget_s

    def chars_per_s(self) -> float:
        return self.chars / self.t_steps if self.t_steps > 0 else 0.0

    def elapsed(self) -> float:
        return self.elapsed0 + time.monotonic() - self.t_start


class Trainer:
    """The loop of one run: build it from a run set up by setup.new_run or setup.resume_run (or
    Trainer.new / Trainer.resume, which do both), then run(). `team` is this process's place among
    the workers that train the model together (team.Team; Solo alone).

    `record.given` is the configuration as the user gave it, `record.fitted` what the run chose or
    fitted where an option was left open, and `cfg` the two combined: what the loop follows. A
    refit is an explicit call (_refit), which rebuilds `cfg` and the schedule."""

    def __init__(self, prep, quiet: bool = False, team: Team | None = None, threads_default: int | None = None):
        try:
            self._take(prep, quiet, team, threads_default)
        except BaseException:
            prep.close()  # the run directory goes back (removed if this run made it and saved nothing)
            raise

    def _take(self, prep, quiet: bool, team: Team | None, threads_default: int | None):
        self._prep = prep
        self.record = prep.record
        self.state = prep.record.state
        self.model = prep.model
        self.model.precision = self.record.fitted.precision  # the training step's products (precision.py)
        self.opt = prep.opt
        self.tokens = prep.tokens  # batches and validation read the memory-mapped token file (data)
        self.out = prep.out
        self.quiet = quiet
        self.extra_minutes = prep.extra_minutes
        self.precompile = prep.precompile
        self.precision_pending = prep.precision_pending  # --precision auto, measured on the first batch
        self.team = team if team is not None else Solo()
        self.threads_default = threads_default  # threads when --threads is left open (None: every core)
        self._refit(self.record.fitted)
        cfg = self.cfg
        self.stream = BatchStream(self.tokens.train, cfg.batch)
        self.val_tokens = self.tokens.val  # None when nothing is held out
        self.batches_per_epoch = self.stream.batches_per_epoch(cfg.seq)
        self.eval_every = cfg.eval_every or int(min(2000, max(200, self.batches_per_epoch)))
        self.h, self.c = self.model.zero_state(cfg.batch if self.team.b1 is None else self.team.b1 - self.team.b0)
        if prep.carried is not None:
            self.h[...], self.c[...] = prep.carried
        # the average of the weights the run validates and keeps as best (--average); its first
        # update has rate 1, so a new run's buffer needs no initial value
        self.averager = None if cfg.average == "off" else Averager(cfg.average, self.model.n_params,
                                                                   self.model.dtype, cfg.avg_decay)
        if self.averager is not None and prep.averaged is not None:
            self.averager.avg[...] = prep.averaged
        self.keeper = Keeper(self.record, self.model, self.opt, self.averager, self.team, self.out, self.val_tokens,
                             self.stream.S, self.batches_per_epoch)
        self._masks = self._wmasks = None  # the dropout masks' buffers, reused from step to step

    @classmethod
    def new(cls, paths, cfg: TrainConfig, out: str | None, quiet: bool = False, **kw) -> Trainer:
        """A new run, set up (setup.new_run: the same arguments) and ready to run()."""
        from charrnn.setup import new_run

        return cls(new_run(paths, cfg, out, quiet=quiet, **kw), quiet)

    @classmethod
    def resume(cls, run_dir: str, quiet: bool = False, **kw) -> Trainer:
        """The run in `run_dir`, from its last.npz (setup.resume_run: the same arguments)."""
        from charrnn.setup import resume_run

        return cls(resume_run(run_dir, quiet=quiet, **kw), quiet)

    @property
    def fitted(self) -> Fitted:
        return self.record.fitted

    @property
    def given(self) -> TrainConfig:
        return self.record.given

    @property
    def vocab(self):
        return self.record.vocab

    def _refit(self, fitted: Fitted):
        """Take new fitted values: the config the loop follows and its schedule follow them."""
        self.record.fitted = fitted
        self.cfg = self.record.config
        self.schedule = self.record.schedule()
        self.averaging_start = averaging_start(self.cfg)  # a --average polyak run's first averaged update

    def close(self):
        """Give the run directory back (setup.Prepared.close)."""
        self._prep.close()

    # ------------------------------------------------------------------ running
    def run(self) -> dict:
        n_threads = threads.set_threads(self.given.threads if self.given.threads is not None else self.threads_default)
        budget_s = self._budget_seconds()
        if self.cfg.steps is None and self.cfg.epochs is None and budget_s is None:
            self._refit(replace(self.fitted, epochs=budget.DEFAULT_EPOCHS))  # the documented default budget
        cfg = self.cfg
        auto_eval = cfg.eval_every is None and budget_s is not None and cfg.steps is None and cfg.epochs is None
        total = cfg.steps if cfg.steps is not None else (self._epoch_steps(cfg.epochs) if cfg.epochs is not None else None)
        rep = Reporter(self.quiet, total, self.state.step)
        rep.message(self._header(n_threads))
        try:
            self._warm_up(rep)
            return self._loop(rep, budget_s, auto_eval, total)
        finally:
            rep.close()
            self.close()

    def _header(self, n_threads: int) -> str:
        """The run's first line: the model, the data, the batch, threads and workers, precision."""
        cfg, team = self.cfg, self.team
        return (f"charrnn: {cfg.cell} {cfg.layers}x{cfg.hidden} dropout {cfg.dropout:g}"
                f"{f' weight drop {cfg.weight_drop:g}' if cfg.weight_drop else ''}"
                f"{' (until fitted to the budget)' if self.fitted.dropout_pending else ''}, "
                f"{self.model.n_params:,} parameters, vocabulary {self.vocab.size}, {self.stream.n_tokens:,} training "
                f"tokens, batch {cfg.batch}x{cfg.seq}, {n_threads} thread(s)"
                f"{f' x {team.size} workers' if team.size > 1 else ''}, "
                f"{'precision measured next' if self.precision_pending else precision.describe(self.fitted.precision)}"
                f" -> {self.out}")

    def _warm_up(self, rep: Reporter):
        """The kernels compiled (or loaded) before the clock starts (precompile.warm_up); then, for
        --precision auto on a CPU that must measure, the precision chosen on the first batch."""
        then = (lambda: self._measure_precision(rep)) if self.precision_pending else None
        warm_up(self.model, self.precompile, self.cfg, self.fitted, rep, self.out, then=then)

    def _measure_precision(self, rep: Reporter):
        """--precision auto where the CPU has bfloat16 dot products but no AMX: time both on this
        run's own first batch (before the clock starts) and keep the faster (precision.measure)."""
        x, y = self.stream.get(0, self.cfg.seq, self.team.b0, self.team.b1)
        chosen = self.team.on_root(lambda: precision.measure(self.model, x, y))  # one choice for every worker
        self._refit(replace(self.fitted, precision=chosen))
        self.model.precision = chosen
        self.precision_pending = False
        rep.message(f"charrnn: {precision.describe(chosen)} (measured faster on the first batch)")

    def _loop(self, rep: Reporter, budget_s: float | None, auto_eval: bool, total: int | None) -> dict:
        st, team = self.state, self.team
        if self.fitted.dropout_pending and budget_s is None:
            # a --minutes run stopped before its dropout fit, resumed with --steps / --epochs: the
            # budget is known now
            fitted, line = budget.dropout_at_end(self.cfg, self.fitted, total, self.model.n_params,
                                                 self.stream.n_tokens)
            self._refit(fitted)
            rep.message(line)
        fit = budget.Fit(self.fitted, self.eval_every, budget_s is not None and (
            auto_eval or self.fitted.schedule == "auto" or self.fitted.dropout_pending), False)
        books = Books(smooth=st.train_loss, elapsed0=st.elapsed, budget_s=budget_s)
        self.keeper.snapshot()
        with Signals() as sig:
            interrupted = lambda: sig.received is not None  # noqa: E731 - asked between spans of a validation
            try:
                if st.eval_due:  # the validation an interrupt cut short, before the resumed run goes on
                    self._validate(books, st.chars_per_s, rep, stop=interrupted)
                stop = None
                while True:
                    verdict = team.agree(sig.received, books.time_up())
                    stop = self._stop_reason(verdict.time_up)
                    if stop or verdict.signal is not None:
                        break
                    self._step(rep, books)
                    self._show_progress(rep, books, total)
                    fit = self._maybe_refit(rep, books, fit, auto_eval)
                    if st.step % self.eval_every == 0:
                        te = time.monotonic()
                        stop = self._validate(books, books.chars_per_s(), rep, stop=interrupted)
                        books.eval_cost = time.monotonic() - te
                        if stop:
                            break
                if verdict.signal is None and self.keeper.evaluated_step != st.step and (
                        st.step % self.eval_every != 0 or st.step == 0):
                    # the final validation, unless the last step was just validated
                    self._validate(books, books.chars_per_s(), rep, stop=interrupted)
            except Cancelled:
                pass  # an interrupt arrived during a validation: saved below, the validation marked due
            except KeyboardInterrupt:
                rep.close()
                raise Interrupted("interrupted twice; stopped without saving the last steps", 130) from None
            received = team.agree(sig.received, False).signal
            if received is not None:
                self._save_and_stop(rep, books, received)
        rep.close()
        line = team.report()
        if line:
            rep.message(line)
        st.elapsed = books.elapsed()
        return {"stop": stop, "step": st.step, "best_val": st.best_val, "out": self.out,
                "chars_per_s": books.chars_per_s()}

    def _step(self, rep: Reporter, books: Books):
        """One training step on the next batch, and its accounts."""
        st, cfg, team, model = self.state, self.cfg, self.team, self.model
        t0 = time.perf_counter()
        T = min(seq_len_at(cfg, st.step), self.stream.S - st.pos)
        x, y = self.stream.get(st.pos, T, team.b0, team.b1)  # (T, B/N): this worker's streams
        masks, wmasks = self._dropout_masks(T, x.shape[1])
        av = self.averager
        res = train_step(model, self.opt, x, y, self.h, self.c, masks, self.schedule.lr_at(st.step) * st.lr_scale,
                         cfg.clip, cfg.clip_mode, reduce=team.reduce, weight_masks=wmasks,
                         avg=None if av is None else av.avg,
                         rate=0.0 if av is None else av.rate(st.step + 1, self.averaging_start))
        if res.finite:
            books.bad = 0
            self.h, self.c = res.h, res.c
            books.smooth = res.loss if books.smooth is None else 0.98 * books.smooth + 0.02 * res.loss
        else:
            self._discard_step(rep, books)
        st.step += 1
        team.check_same(st.step, model.theta)
        st.pos += T
        if st.pos >= self.stream.S:  # the end of an epoch: the streams start again from zero state
            st.pos = 0
            st.epoch += 1
            self.h[...] = 0
            self.c[...] = 0
        dt = time.perf_counter() - t0
        books.t_steps += dt
        books.chars += T * cfg.batch
        books.steps += 1
        if books.steps > 5:  # the first steps may include compilation
            books.times.add(T, dt)

    def _dropout_masks(self, T: int, B: int):
        """This step's output dropout masks (this worker's streams of the whole batch's) and weight-drop
        masks (one for the whole batch: every worker draws the same), or None for each that is off."""
        cfg, step = self.cfg, self.state.step
        if cfg.dropout > 0:
            self._masks = self.model.dropout_masks(T, B, cfg.seed, step, out=self._masks, p=cfg.dropout,
                                                   B_all=cfg.batch, b0=self.team.b0,
                                                   locked=cfg.dropout_mode == "locked")
        if cfg.weight_drop > 0:
            self._wmasks = self.model.weight_masks(cfg.seed, step, cfg.weight_drop, out=self._wmasks)
        return (self._masks if cfg.dropout > 0 else None), (self._wmasks if cfg.weight_drop > 0 else None)

    def _discard_step(self, rep: Reporter, books: Books):
        """A non-finite loss or gradient: the step was not applied; halve the learning rate, start the
        streams again from zero state, go back to the last good weights if they were hit, and stop
        after MAX_BAD_STEPS in a row."""
        st = self.state
        books.bad += 1
        st.lr_scale *= 0.5
        self.h[...] = 0
        self.c[...] = 0
        self.keeper.restore_if_broken()
        rep.message(f"warning: non-finite loss at step {st.step}; step discarded, learning rate halved")
        if books.bad >= MAX_BAD_STEPS:
            saved = (f"The last good checkpoint is in {self.out}" if holds_run(self.out)
                     else "No checkpoint had been saved yet")
            raise TrainingError(f"the loss stayed non-finite for {books.bad} steps; stopped. {saved}; try a lower --lr "
                                "or --clip")

    def _show_progress(self, rep: Reporter, books: Books, total: int | None):
        if time.monotonic() - books.t_report <= 0.5:
            return
        st = self.state
        books.t_report = time.monotonic()
        smooth = books.smooth
        rep.progress(st.step, {"epoch": f"{st.step / self.batches_per_epoch:.2f}",
                               "loss": f"{smooth:.3f}" if smooth else "-",
                               "val": f"{st.best_val:.3f}" if math.isfinite(st.best_val) else "-",
                               "chars/s": f"{books.chars_per_s():,.0f}",
                               "left": remaining(st.step, total, books.t_steps, books.steps, books.budget_s,
                                                 books.t_start)})

    def _maybe_refit(self, rep: Reporter, books: Books, fit, auto_eval: bool):
        """A --minutes run fits what was left open (schedule, dropout, validation interval) to its
        measured speed, every REFIT_EVERY steps after AUTO_MEASURE_STEPS; fitted on rank 0's clock
        and shared: workers that each fitted their own timings would drift apart."""
        budget_s = books.budget_s
        if not (budget_s is not None and fit.open and books.steps >= AUTO_MEASURE_STEPS
                and (books.steps - AUTO_MEASURE_STEPS) % REFIT_EVERY == 0):
            return fit
        cfg, st = self.cfg, self.state
        fit, lines = self.team.on_root(lambda: budget.refit(
            cfg, fit, st.step, books.times, budget_s, budget_s - (time.monotonic() - books.t_start), books.eval_cost,
            auto_eval, self.model.n_params, self.stream.n_tokens))
        self._refit(fit.fitted)
        self.eval_every = fit.eval_every
        for line in lines:
            rep.message(line)
        return fit

    def _save_and_stop(self, rep: Reporter, books: Books, received: int):
        """The team agreed to stop for a signal: save the run (unless just saved) and say how to go on."""
        st, team = self.state, self.team
        st.elapsed = books.elapsed()
        st.train_loss, st.chars_per_s = books.smooth, (books.chars_per_s() if books.t_steps else st.chars_per_s)
        self.keeper.restore_if_broken()
        if self.keeper.saved_step != st.step or st.eval_due:
            rep.message("interrupted: saving the run ...")
            h, c = team.gather_state(self.h, self.c)
            team.on_root(lambda: self.keeper.save_last(h, c))
        rep.close()
        raise Interrupted(f"stopped by {signals.name_of(received)} at step {st.step}; saved "
                          f"{os.path.join(self.out, 'last.npz')} (continue with: charrnn train --resume "
                          f"{shlex.quote(self.out)})", signals.EXIT_CODES.get(received, 130))

    def _stop_reason(self, time_up: bool) -> str | None:
        cfg, st = self.cfg, self.state
        if cfg.steps is not None and st.step >= cfg.steps:
            return f"reached {cfg.steps} steps"
        if cfg.epochs is not None and st.step >= self._epoch_steps(cfg.epochs):
            return f"reached {cfg.epochs:g} epochs"
        if time_up:
            return "time budget used"
        return None

    def _epoch_steps(self, epochs: float) -> int:
        return int(math.ceil(epochs * self.batches_per_epoch))

    def _budget_seconds(self) -> float | None:
        if self.extra_minutes is not None:
            return self.extra_minutes * 60
        if self.given.minutes is not None:
            return max(0.0, self.given.minutes * 60 - self.state.elapsed)
        return None

    def _validate(self, books: Books, cps: float, rep: Reporter, stop=None) -> str | None:
        """A validation now (Keeper.validate_and_save), with the run state's time, loss and speed brought up to date."""
        st = self.state
        st.elapsed = books.elapsed()
        st.train_loss, st.chars_per_s = books.smooth, cps
        return self.keeper.validate_and_save(rep, self.h, self.c, stop)
