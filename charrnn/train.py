"""The training loop: truncated BPTT over B contiguous streams, validation, checkpoints, resume,
interrupts, non-finite-loss recovery, progress on stderr.

Not here: the maths (kernels), file formats (checkpoint.py), option parsing (cli.py).

Exact resume: everything the next step depends on is a function of what last.npz holds — the
parameters, optimizer moments and step count, the data position and carried hidden state, the
learning-rate scale, and the seed (dropout masks are a hash of seed and step). Evaluations and the
sequence-length curriculum are functions of the step. So an interrupted and resumed run ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from charrnn import checkpoint, threads
from charrnn.config import TrainConfig
from charrnn.data import BatchStream, compact_dtype, corpus_vocab, encode_stream, read_corpus, split_text
from charrnn.errors import CharrnnError, DataError, Interrupted, TrainingError, UsageError
from charrnn.evaluate import score_tokens
from charrnn.model import GATES, Model, ModelConfig, core_is_compiled
from charrnn.optim import Schedule, clip_grad_norm, clip_grad_value, grad_norm, make_optimizer
from charrnn.vocab import Vocab

MAX_BAD_STEPS = 5  # consecutive non-finite steps before giving up
SHORT_BUDGET_MINUTES = 10  # --minutes up to this: a 2x256 GRU by default (choose_size)
DEFAULT_EPOCHS = 10.0  # the budget of a run given none
# (epochs x parameters per character, dropout): the measured anchors of dropout_for
DROPOUT_LOW = (6.6, 0.1)  # 2x256 GRU, 5 minutes (10 epochs): 0.1 beat 0.05 and 0.15
# 2x512 LSTM, 30 minutes (12-15 epochs, x = 42-51): 0.5 gave 1.446 and 1.449, 0.45 1.465; 2x384, 26 epochs: 0.4 beat 0.25
DROPOUT_HIGH = (40.0, 0.5)
MIN_SEQ = 8  # first BPTT length of the --seq-warmup curriculum
AUTO_MEASURE_STEPS = 30  # steps timed before a --minutes run fits its schedule and validation interval
REFIT_EVERY = 50  # steps between refits of that fit, until the schedule's decay begins


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


# ---------------------------------------------------------------------------------- model sizing
def choose_size(cfg: TrainConfig, n_train_chars: int) -> TrainConfig:
    """Fill in the cell, hidden and dropout when the user left them open.

    The rule comes from measurements on tiny Shakespeare (benchmarks/quality_curve.py, README):
    a model should have about as many parameters as the text has characters or fewer, and with a
    short time budget a smaller model that sees more data wins. In a short budget a GRU wins: in
    5 minutes 2x256 reached 1.459 / 1.467 nats/char (two seeds) against 1.482-1.487 for the LSTM
    (three runs). It has 3 gates to the LSTM's 4, so it runs ~25% faster, and it learns faster
    from the start (1.61 against 1.82 after the first minute); in 10 minutes it still wins, 1.467
    against 1.501. In 30 minutes the 2x512 LSTM (dropout 0.5) wins: 1.479 against the GRU's 1.511
    after 17-18 minutes.

    Dropout comes from dropout_for: from the epochs of --epochs or --steps (10 without a budget),
    or, for --minutes, provisionally from 10 epochs until the run has measured its speed and
    refits it (`dropout_fit`, Trainer._fit_dropout).
    """
    short = cfg.minutes is not None and cfg.minutes <= SHORT_BUDGET_MINUTES
    cfg = replace(cfg, cell=cfg.cell or ("gru" if short else "lstm"))
    hidden = cfg.hidden
    n = max(n_train_chars, 1)
    if hidden is None:
        if short:
            hidden, cap = 256, 2
        elif cfg.minutes is not None or n_train_chars >= 2_000_000:
            # longer budgets: 512 units, up to 4 parameters per character. In 30 minutes on tiny
            # Shakespeare: 1.449 nats/char with dropout 0.5 (what dropout_for gives for its 15
            # epochs), against 1.476 for 2x384 with 0.4, which saw 26 epochs and overfit from minute 12
            hidden, cap = 512, 4
        else:
            hidden, cap = 256, 2
        # never far more parameters than characters on small corpora
        while hidden > 64 and _approx_params(cfg.cell, cfg.layers, hidden) > cap * n:
            hidden //= 2
    fit = False
    dropout = cfg.dropout
    if dropout is None and n_train_chars < 50_000:
        dropout = 0.0  # tiny corpora: a run is over in a few hundred steps, long before it could overfit
    elif dropout is None:
        epochs = planned_epochs(cfg, n)
        fit = epochs is None  # a --minutes run: refit once its speed is measured (Trainer._fit_budget)
        if fit:  # until then: as for the default budget, or for --epochs / --steps if they end it sooner
            cap = epoch_cap(cfg, n)
            epochs = DEFAULT_EPOCHS if cap is None else min(cap, DEFAULT_EPOCHS)
        dropout = dropout_for(_approx_params(cfg.cell, cfg.layers, hidden), n, epochs)
    return replace(cfg, hidden=hidden, dropout=dropout, dropout_fit=fit)


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


def chars_in(cfg: TrainConfig, steps: int) -> int:
    """Characters read by steps 0 .. steps-1 (the --seq-warmup curriculum, then --seq), all streams."""
    warm = min(steps, max(cfg.seq_warmup, 0))
    return (sum(seq_len_at(cfg, s) for s in range(warm)) + (steps - warm) * cfg.seq) * cfg.batch


def dropout_for(params: int, n_train_chars: int, epochs: float) -> float:
    """Dropout for a model of `params` parameters that sees `epochs` passes over a text of
    `n_train_chars`: it grows with the logarithm of epochs x parameters per character, the exposure
    that decides how far the model can memorise its text. Through two measured points on tiny
    Shakespeare (benchmarks/results, README): DROPOUT_LOW, a 2x256 GRU seeing 10 epochs in 5
    minutes; DROPOUT_HIGH, a 2x512 LSTM seeing 12-15 epochs in 30 minutes. Rounded to 0.05; 0 to 0.5.
    """
    x = max(epochs, 1e-9) * params / max(n_train_chars, 1)
    (x0, d0), (x1, d1) = DROPOUT_LOW, DROPOUT_HIGH
    d = d0 + (d1 - d0) * math.log(x / x0) / math.log(x1 / x0)
    return round(min(max(d, 0.0), 0.5) * 20) / 20


def _approx_params(cell: str, layers: int, hidden: int, V: int = 100) -> int:
    G = GATES[cell]
    return G * hidden * (V + hidden + 2) + (layers - 1) * G * hidden * (2 * hidden + 2) + V * (hidden + 1)


def seq_len_at(cfg: TrainConfig, step: int) -> int:
    """The BPTT length used at `step` (the curriculum grows it linearly over seq_warmup steps)."""
    if cfg.seq_warmup <= 0 or step >= cfg.seq_warmup:
        return cfg.seq
    lo = min(MIN_SEQ, cfg.seq)
    return int(lo + (cfg.seq - lo) * step / cfg.seq_warmup)


# ---------------------------------------------------------------------------------- reporting
def _remaining(step, total, t_steps, steps_here, budget_s, t_start) -> str:
    """Estimated time left, as m:ss, from the step budget or the time budget."""
    left = None
    if total is not None and steps_here:
        left = (total - step) * t_steps / steps_here
    if budget_s is not None:
        b = budget_s - (time.monotonic() - t_start)
        left = b if left is None else min(left, b)
    if left is None:
        return "?"
    left = max(0, int(left))
    return f"{left // 60}:{left % 60:02d}"



class Reporter:
    """Progress on stderr: a tqdm bar on a terminal, plain log lines otherwise, nothing with -q."""

    def __init__(self, quiet: bool, total_steps: int | None, start_step: int, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bar = None
        self.last_line = 0.0
        if quiet:
            return
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step",
                            dynamic_ncols=True, leave=True, smoothing=0.1)

    def message(self, text: str):
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def progress(self, step: int, info: dict):
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(info, refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self.last_line >= 30:
            self.last_line = time.monotonic()
            self.message("step " + str(step) + " " + " ".join(f"{k}={v}" for k, v in info.items()))

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Signals:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second SIGINT exits at once."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. tests calling train() from a thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            # second Ctrl-C: stop now; checkpoints are written atomically, so nothing is corrupted
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ---------------------------------------------------------------------------------- the run
@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    pos: int = 0
    lr_scale: float = 1.0
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    elapsed: float = 0.0  # training seconds before this process (resume)


def _check_out_dir(out: str, need_bytes: int):
    """Make the run directory and prove it is writable and has room, before any training."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CharrnnError(f"cannot create output directory {out}: {e.strerror or e}") from None
    if not os.path.isdir(out):
        raise CharrnnError(f"output path {out} exists and is not a directory")
    probe = os.path.join(out, ".charrnn-write-test")
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as e:
        raise CharrnnError(f"output directory {out} is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(out).free
    if free < need_bytes:
        raise CharrnnError(
            f"not enough disk space in {out}: {free // 2**20} MiB free, checkpoints need about {need_bytes // 2**20} MiB"
        )


def default_out_dir(corpus_name: str, runs_dir: str = "runs") -> str:
    """runs/<stem>, or runs/<stem>-2, -3 ... if that already holds a run (never overwrite one)."""
    base = os.path.join(runs_dir, corpus_name)
    cand, n = base, 1
    while os.path.exists(os.path.join(cand, "last.npz")) or os.path.exists(os.path.join(cand, "best.npz")):
        n += 1
        cand = f"{base}-{n}"
    return cand


class Trainer:
    """One training run. Build with `Trainer.new(...)` or `Trainer.resume(...)`, then `run()`."""

    def __init__(self, cfg: TrainConfig, corpus, vocab: Vocab, model: Model, out: str, quiet: bool,
                 state: RunState, opt, extra_minutes: float | None):
        self.cfg = cfg
        self.corpus = corpus
        self.vocab = vocab
        self.model = model
        self.out = out
        self.quiet = quiet
        self.state = state
        self.opt = opt
        self.extra_minutes = extra_minutes
        split = split_text(corpus.text, cfg.val_frac, cfg.docs)
        dtype = compact_dtype(vocab.size)
        train_ids = encode_stream(vocab, split.train_text, cfg.docs, end=not split.val_text, dtype=dtype)
        if len(train_ids) < 2:
            raise DataError("the training text is empty after removing the validation split")
        if len(train_ids) - 1 < cfg.batch * cfg.seq:
            raise DataError(
                f"the corpus is too small for one batch: {len(train_ids) - 1} training tokens, but --batch {cfg.batch} "
                f"x --seq {cfg.seq} needs {cfg.batch * cfg.seq}; use a smaller --batch/--seq or a larger text"
            )
        self.stream = BatchStream(train_ids, cfg.batch)
        self.val_tokens = (
            encode_stream(vocab, split.val_text, cfg.docs, end=cfg.docs is not None) if split.val_text else None
        )
        # "auto" runs as constant (with warm-up) until a time-budgeted run has measured its speed;
        # then it becomes "wsd" over the expected number of steps, stored in the config, so
        # from there on the schedule is a function of the step alone and resume stays exact
        self.schedule = self._make_schedule()
        self.bpe = self.stream.batches_per_epoch(cfg.seq)
        self.eval_every = cfg.eval_every or int(min(2000, max(200, self.bpe)))
        self._auto_eval = False
        self._fit_open = False  # a --minutes run still refining its fit (_fit_budget)
        self._fitted = False  # the schedule is one _fit_budget fitted, in this process
        self.h, self.c = model.zero_state(cfg.batch)
        self.metrics_path = os.path.join(out, "metrics.jsonl")

    # ------------------------------------------------------------------ construction
    @classmethod
    def new(cls, paths, cfg: TrainConfig, out: str | None, quiet: bool = False, runs_dir: str = "runs"):
        corpus = read_corpus(paths, cfg.encoding)
        if cfg.docs is not None and not any(p.strip() for p in corpus.text.split("\n")):
            raise DataError("the corpus holds no documents")
        vocab = corpus_vocab(corpus.text, cfg.docs)
        n_train = int(len(corpus.text) * (1 - cfg.val_frac))
        cfg = choose_size(cfg, n_train)
        mcfg = ModelConfig(cell=cfg.cell, layers=cfg.layers, hidden=cfg.hidden, vocab_size=vocab.size,
                           nonlinearity=cfg.nonlinearity, dropout=cfg.dropout)
        model = Model(mcfg).init(cfg.seed, forget_bias=cfg.forget_bias if cfg.cell == "lstm" else 0.0)
        if out is None:
            out = default_out_dir(corpus.name, runs_dir)
        elif os.path.exists(os.path.join(out, "last.npz")) or os.path.exists(os.path.join(out, "best.npz")):
            raise UsageError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        opt = make_optimizer(cfg.optimizer, model.n_params, model.dtype, cfg.lr)
        # everything that can reject the input happens in the constructor, before the directory exists
        trainer = cls(cfg, corpus, vocab, model, out, quiet, RunState(), opt, None)
        _check_out_dir(out, need_bytes=4 * model.n_params * 4 * 3)
        if model.n_params > 2 * n_train and not quiet:
            print(f"warning: the model has {model.n_params:,} parameters for {n_train:,} training characters; "
                  "expect overfitting (consider a smaller --hidden or --layers, or more --dropout)", file=sys.stderr)
        return trainer

    @classmethod
    def resume(cls, run_dir: str, steps=None, epochs=None, minutes=None, quiet=False, threads_n=None):
        path = os.path.join(run_dir, "last.npz")
        if not os.path.exists(path):
            raise CharrnnError(f"{run_dir}: no last.npz to resume from")
        ck = checkpoint.load(path, with_arrays=True)
        meta = ck.meta
        try:
            cfg = TrainConfig.from_dict(meta["train"])
            rs = RunState(**meta["run"])
            paths = meta["corpus"]["paths"]
            sha = meta["corpus"]["sha256"]
        except (KeyError, TypeError) as e:
            raise CharrnnError(f"{path}: cannot resume: checkpoint lacks training state ({e})") from None
        if "-" in paths:
            raise CharrnnError("cannot resume a run trained on stdin: the corpus cannot be read again")
        corpus = read_corpus(paths, cfg.encoding)
        if corpus.sha256 != sha:
            raise CharrnnError(f"cannot resume: the corpus {', '.join(paths)} changed since the run started")
        if corpus_vocab(corpus.text, cfg.docs) != ck.vocab:
            raise CharrnnError("cannot resume: the corpus's characters differ from the checkpoint's vocabulary")
        if steps is not None or epochs is not None:
            cfg = replace(cfg, steps=steps, epochs=epochs, minutes=None)
        if threads_n is not None:
            cfg = replace(cfg, threads=threads_n)
        opt = make_optimizer(cfg.optimizer, ck.model.n_params, ck.model.dtype, cfg.lr)
        bufs = {}
        for key in opt.state_buffers():
            flat = np.zeros(ck.model.n_params, dtype=ck.model.dtype)
            view = Model(ck.model.cfg, theta=flat).params
            for pname in view.views:
                arr = ck.arrays.get(f"optim.{key}.{pname}")
                if arr is None or arr.shape != view[pname].shape:
                    raise CharrnnError(f"{path}: cannot resume: optimizer state optim.{key}.{pname} missing or wrong")
                view[pname][...] = arr
            bufs[key] = flat
        opt.load_state(bufs, int(meta["optimizer"]["t"]))
        tr = cls(cfg, corpus, ck.vocab, ck.model, run_dir, quiet, rs, opt, minutes)
        h, c = ck.arrays.get("train.h"), ck.arrays.get("train.c")
        if h is None or c is None or h.shape != tr.h.shape:
            raise CharrnnError(f"{path}: cannot resume: carried training state missing")
        tr.h[...] = h
        tr.c[...] = c
        if rs.pos >= tr.stream.S:
            raise CharrnnError(f"{path}: cannot resume: data position beyond the corpus")
        return tr

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        return {
            "train": self.cfg.to_dict(),
            "run": self.state.__dict__.copy(),
            "step": self.state.step,
            "epoch": self.state.epoch,
            "best_val": None if math.isinf(self.state.best_val) else self.state.best_val,
            "optimizer": {"name": self.opt.name, "hparams": self.opt.hparams(), "t": self.opt.t},
            "schedule": self.schedule.to_dict(),
            "rng": {"seed": self.cfg.seed, "dropout": "splitmix64(seed, step, element)"},
            "data": {"pos": self.state.pos, "streams": self.cfg.batch, "stream_len": self.stream.S},
            "corpus": {"paths": [os.path.abspath(p) if p != "-" else "-" for p in self.corpus.paths],
                       "sha256": self.corpus.sha256, "chars": len(self.corpus.text), "docs": self.cfg.docs},
            "dtype": str(self.model.dtype),
        }

    def _save_last(self):
        extra = {"train.h": self.h, "train.c": self.c}
        for key, flat in self.opt.state_buffers().items():
            fp = Model(self.model.cfg, dtype=self.model.dtype, theta=flat).params
            for pname, arr in fp.items():
                extra[f"optim.{key}.{pname}"] = arr
        checkpoint.save(os.path.join(self.out, "last.npz"), self.model, self.vocab, self._meta(), extra)

    def _save_best(self):
        checkpoint.save(os.path.join(self.out, "best.npz"), self.model, self.vocab, self._meta())

    # ------------------------------------------------------------------ validation
    def validate(self) -> float | None:
        if self.val_tokens is None or len(self.val_tokens) < 2:
            return None
        return score_tokens(self.model, self.val_tokens).nats

    # ------------------------------------------------------------------ the loop
    def _stop_reason(self, t_start: float, budget_s: float | None, eval_cost: float) -> str | None:
        cfg, st = self.cfg, self.state
        if cfg.steps is not None and st.step >= cfg.steps:
            return f"reached {cfg.steps} steps"
        if cfg.epochs is not None and st.step >= self._epoch_steps(cfg.epochs):
            return f"reached {cfg.epochs:g} epochs"
        if budget_s is not None and time.monotonic() - t_start + eval_cost >= budget_s:
            return "time budget used"
        return None

    def _epoch_steps(self, epochs: float) -> int:
        return int(math.ceil(epochs * self.bpe))

    def run(self) -> dict:
        cfg, st, model = self.cfg, self.state, self.model
        n_threads = threads.set_threads(cfg.threads)
        budget_s = None
        if self.extra_minutes is not None:
            budget_s = self.extra_minutes * 60
        elif cfg.minutes is not None:
            budget_s = max(0.0, cfg.minutes * 60 - st.elapsed)
        if cfg.steps is None and cfg.epochs is None and budget_s is None:
            cfg.epochs = DEFAULT_EPOCHS  # the documented default budget
        self._auto_eval = cfg.eval_every is None and budget_s is not None and cfg.steps is None and cfg.epochs is None
        total = cfg.steps if cfg.steps is not None else (self._epoch_steps(cfg.epochs) if cfg.epochs is not None else None)
        rep = Reporter(self.quiet, total, st.step)
        rep.message(
            f"charrnn: {cfg.cell} {cfg.layers}x{cfg.hidden} dropout {cfg.dropout:g}{' (until fitted to the budget)' if cfg.dropout_fit else ''}, "
            f"{model.n_params:,} parameters, "
            f"vocabulary {self.vocab.size}, {self.stream.n_tokens:,} training tokens, batch {cfg.batch}x{cfg.seq}, "
            f"{n_threads} thread(s) -> {self.out}"
        )
        if not core_is_compiled("_forward_backward"):
            rep.message("charrnn: compiling the core for this machine (first run only; about a minute) ...")
        model.warm_up()  # compilation is not counted against --minutes
        if cfg.dropout_fit and budget_s is None:
            # a --minutes run stopped before its dropout fit, resumed with --steps / --epochs: the
            # budget is known now
            self._fit_dropout(rep, total)
        if cfg.dropout_fit and cfg.dropout == 0:
            model.dropout_masks(1, 1, 0, 0)  # the fit may turn dropout on: load its kernel now, untimed
        masks = None
        smooth = None
        self._snapshot()
        self._elapsed0 = st.elapsed
        t_start = time.monotonic()
        t_report = 0.0
        t_steps = 0.0  # seconds spent in training steps (excluding evaluation) in this process
        chars_done = 0
        steps_here = 0
        times = StepTimes()
        self._fit_open = budget_s is not None and (self._auto_eval or cfg.schedule == "auto" or cfg.dropout_fit)
        self._fitted = False
        eval_cost = 0.0
        bad = 0
        stop = None
        with _Signals() as sig:
            try:
                while True:
                    stop = self._stop_reason(t_start, budget_s, eval_cost)
                    if stop:
                        break
                    if sig.received is not None:
                        break
                    t0 = time.perf_counter()
                    T = min(seq_len_at(cfg, st.step), self.stream.S - st.pos)
                    x, y = self.stream.get(st.pos, T)
                    if cfg.dropout > 0:
                        masks = model.dropout_masks(T, cfg.batch, cfg.seed, st.step, out=masks)
                    out = model.forward_backward(x, y, self.h, self.c, masks=masks if cfg.dropout > 0 else None)
                    loss = out["loss"]
                    grad = out["grad"]
                    if cfg.clip > 0 and cfg.clip_mode == "value":
                        clip_grad_value(grad, cfg.clip)
                        norm = grad_norm(grad)
                    elif cfg.clip > 0:
                        norm = clip_grad_norm(grad, cfg.clip)
                    else:
                        norm = grad_norm(grad)
                    if not (math.isfinite(loss) and math.isfinite(norm)):
                        bad += 1
                        st.lr_scale *= 0.5
                        self.h[...] = 0
                        self.c[...] = 0
                        if not np.all(np.isfinite(model.theta)):
                            self._restore()
                        rep.message(f"warning: non-finite loss at step {st.step}; step discarded, learning rate halved")
                        if bad >= MAX_BAD_STEPS:
                            raise TrainingError(
                                f"the loss stayed non-finite for {bad} steps; stopped. The last good checkpoint is "
                                f"in {self.out}; try a lower --lr or --clip"
                            )
                    else:
                        bad = 0
                        self.opt.step(model.theta, grad, self.schedule.lr_at(st.step) * st.lr_scale)
                        self.h, self.c = out["h"], out["c"]
                        smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
                    st.step += 1
                    st.pos += T
                    if st.pos >= self.stream.S:
                        st.pos = 0
                        st.epoch += 1
                        self.h[...] = 0
                        self.c[...] = 0
                    dt = time.perf_counter() - t0
                    t_steps += dt
                    chars_done += T * cfg.batch
                    steps_here += 1
                    cps = chars_done / t_steps if t_steps > 0 else 0.0
                    if time.monotonic() - t_report > 0.5:
                        t_report = time.monotonic()
                        rep.progress(st.step, {"epoch": f"{st.step / self.bpe:.2f}", "loss": f"{smooth:.3f}" if smooth else "-",
                                           "val": f"{st.best_val:.3f}" if math.isfinite(st.best_val) else "-",
                                           "chars/s": f"{cps:,.0f}",
                                           "left": _remaining(st.step, total, t_steps, steps_here, budget_s, t_start)})
                    if steps_here > 5:  # the first steps may include compilation
                        times.add(T, dt)
                    if (budget_s is not None and self._fit_open and steps_here >= AUTO_MEASURE_STEPS
                            and (steps_here - AUTO_MEASURE_STEPS) % REFIT_EVERY == 0):
                        self._fit_budget(rep, times, budget_s, budget_s - (time.monotonic() - t_start), eval_cost)
                    if st.step % self.eval_every == 0:
                        te = time.monotonic()
                        stop = self._evaluate(rep, smooth, cps, t_start)
                        eval_cost = time.monotonic() - te
                        if stop:
                            break
            except KeyboardInterrupt:
                rep.close()
                raise Interrupted("interrupted twice; stopped without saving the last steps", 130) from None
            if sig.received is not None:
                st.elapsed = self._elapsed0 + time.monotonic() - t_start
                if not np.all(np.isfinite(model.theta)):
                    self._restore()
                rep.message("interrupted: saving the run ...")
                self._save_last()
                rep.close()
                code = 143 if sig.received == signal.SIGTERM else 130
                name = "SIGTERM" if code == 143 else "Ctrl-C"
                raise Interrupted(f"stopped by {name} at step {st.step}; saved {os.path.join(self.out, 'last.npz')} "
                                  f"(continue with: charrnn train --resume {self.out})", code)
        if st.step % self.eval_every != 0 or st.step == 0:
            self._evaluate(rep, smooth, chars_done / t_steps if t_steps else 0.0, t_start)
        rep.close()
        st.elapsed = self._elapsed0 + time.monotonic() - t_start
        return {"stop": stop, "step": st.step, "best_val": st.best_val, "out": self.out,
                "chars_per_s": chars_done / t_steps if t_steps else 0.0}

    def _steps_in(self, seconds: float, a: float, b: float, step: int) -> int:
        """How many steps from `step` on fit in `seconds` at a + b*T seconds per step of length T,
        following the --seq-warmup curriculum."""
        cfg = self.cfg
        n, t = 0, 0.0
        while step + n < cfg.seq_warmup:
            dt = a + b * seq_len_at(cfg, step + n)
            if t + dt > seconds:
                return max(1, n)
            t += dt
            n += 1
        n += int((seconds - t) / (a + b * cfg.seq))
        return max(1, n)

    def _fit_budget(self, rep, times: StepTimes, budget_s: float, left_s: float, eval_cost: float):
        """Fit a --minutes run to its budget from the steps timed so far: the validation interval
        (without --eval-every) and the "auto" schedule. Called after AUTO_MEASURE_STEPS steps, then
        every REFIT_EVERY steps until the fitted schedule's decay begins (the rate is constant
        until then, so refits change nothing already done): the first estimate comes from short
        steps, later ones from steps of the full length."""
        cfg, step = self.cfg, self.state.step
        a, b = times.cost()
        per_step = a + b * cfg.seq
        if self._auto_eval and step < cfg.seq_warmup + REFIT_EVERY:
            # validate about every max(1 min, budget/8); validation's cost counts against the budget.
            # Set once the steps have their full length, so validations stay evenly spaced
            self.eval_every = max(50, int(max(60.0, budget_s / 8) / per_step) // 50 * 50)
        if eval_cost > 0:
            n = self._steps_in(left_s, a, b, step)
            left_s -= (n / self.eval_every + 1) * eval_cost
        else:
            left_s *= 0.92  # no validation measured yet
        steps_left = self._steps_in(max(0.0, left_s), a, b, step)
        if cfg.schedule == "auto" or self._fitted:
            first = not self._fitted
            self._fix_auto_schedule(step, steps_left)
            decay_from = cfg.warmup + int(self.schedule.wsd_stable_steps())
            if first:
                rep.message(f"schedule: {cfg.lr:g} until about step {decay_from}, then a linear decay to step "
                            f"{cfg.warmup + cfg.decay_steps} (fitted to the time budget; refined until the decay begins)")
            if step + REFIT_EVERY >= decay_from:
                self._fit_open = False
                if not first:
                    rep.message(f"schedule: decaying from step {decay_from} to {cfg.warmup + cfg.decay_steps}")
        elif step >= cfg.seq_warmup + 2 * REFIT_EVERY:
            self._fit_open = False  # the validation interval, once steps have their full length
        # once the steps have their full length, or now if the run ends (or the fit closes) before
        if cfg.dropout_fit and (step >= cfg.seq_warmup or not self._fit_open
                                or step + steps_left < cfg.seq_warmup + REFIT_EVERY):
            self._fit_dropout(rep, step + steps_left)

    def _fit_dropout(self, rep, total_steps: int):
        """Choose the dropout of a --minutes run (left open by the user) from the epochs its budget
        allows, once the steps have their full length and the speed is known (choose_size's rate
        ran until now). Set once and kept in the config, so a resumed run keeps it."""
        cfg, n = self.cfg, self.stream.n_tokens
        epochs = chars_in(cfg, total_steps) / n
        cap = epoch_cap(cfg, n)
        if cap is not None:
            epochs = min(epochs, cap)
        cfg.dropout, cfg.dropout_fit = dropout_for(self.model.n_params, n, epochs), False
        self.model.cfg = replace(self.model.cfg, dropout=cfg.dropout)
        rep.message(f"dropout {cfg.dropout:g}: about {epochs:.{0 if epochs >= 10 else 1}f} epochs fit in the budget")

    def _fix_auto_schedule(self, step: int, steps_left: float):
        """Turn the "auto" schedule into a "wsd" one (constant, then a linear decay over the last
        20%) that ends when the time budget should end, or move the end of the one fitted before.
        Measured on tiny Shakespeare in 5 minutes: a cosine over the whole budget lost to a
        constant rate (1.667 vs 1.599 nats/char): the model is far from converged and every early
        step at a lower rate is lost progress."""
        cfg = self.cfg
        total = step + max(1, int(steps_left))
        decay = max(1, total - cfg.warmup)
        cfg.schedule, cfg.decay_steps = "wsd", decay
        self._fitted = True
        self.schedule = self._make_schedule()

    def _make_schedule(self) -> Schedule:
        """The schedule the config describes ("auto" is constant until _fix_auto_schedule)."""
        cfg = self.cfg
        return Schedule("constant" if cfg.schedule == "auto" else cfg.schedule, cfg.lr, warmup=cfg.warmup,
                        decay_every=cfg.decay_every, decay_factor=cfg.decay_factor, decay_steps=cfg.decay_steps)

    def _snapshot(self):
        """Remember the current parameters and optimizer state as the last good ones."""
        self._good = (self.model.theta.copy(), {k: v.copy() for k, v in self.opt.state_buffers().items()}, self.opt.t)

    def _restore(self):
        theta, bufs, t = self._good
        self.model.theta[...] = theta
        self.opt.load_state({k: v.copy() for k, v in bufs.items()}, t)

    def _evaluate(self, rep: Reporter, smooth, cps, t_start) -> str | None:
        st = self.state
        st.elapsed = self._elapsed0 + time.monotonic() - t_start
        if not np.all(np.isfinite(self.model.theta)):
            self._restore()
        self._snapshot()
        val = self.validate()
        improved = val is not None and val < st.best_val
        if improved:
            st.best_val, st.best_step, st.bad_evals = val, st.step, 0
        elif val is not None:
            st.bad_evals += 1
        if val is None:
            st.best_step = st.step  # no validation: the latest model is the best we know
        self._save_last()
        if improved or val is None:
            self._save_best()
        line = {"step": st.step, "epoch": round(st.step / self.bpe, 4), "train_loss": smooth,
                "val_loss": val, "val_bits": None if val is None else val / math.log(2),
                "chars_per_s": round(cps, 1), "elapsed_s": round(st.elapsed, 2)}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        if val is not None:
            rep.message(f"step {st.step}: val {val:.4f} nats/char ({val / math.log(2):.4f} bits/char)"
                        + (" *best*" if improved else ""))
        if self.cfg.patience is not None and st.bad_evals >= self.cfg.patience:
            return f"no improvement in {self.cfg.patience} validations"
        return None
