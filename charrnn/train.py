"""The training loop: truncated BPTT over B contiguous streams, around train_step; validation,
checkpoints, resume, interrupts and non-finite-loss recovery.

Not here: the maths (model.py, kernels/), the sizing and budget policy (budget.py), progress and
signals (progress.py, signals.py), file formats (checkpoint.py), option parsing (cli.py).

Exact resume: everything the next step depends on is a function of what last.npz holds — the
parameters, optimizer moments and step count, the data position and carried hidden state, the
learning-rate scale, the fitted values (Fitted) and the seed (dropout masks are a hash of seed and
step). Evaluations and the sequence-length curriculum are functions of the step. So an
interrupted and resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import numpy as np

from charrnn import budget, checkpoint, finetune, precision, signals, threads
from charrnn.budget import AUTO_MEASURE_STEPS, REFIT_EVERY, StepTimes, seq_len_at
from charrnn.config import Fitted, TrainConfig, effective
from charrnn.data import (TOKENS_FILE, BatchStream, TokenFile, build_token_file, capped_vocab, check_sizes,
                          compact_dtype, open_token_file, read_corpus, remove_stale_token_temps, total_tokens)
from charrnn.errors import CharrnnError, DataError, Interrupted, TrainingError, UsageError
from charrnn.evaluate import Cancelled, score_tokens
from charrnn.kernels.jit import compile_notice
from charrnn.model import Model, ModelConfig, approx_params
from charrnn.optim import (WSD_DECAY_FRAC, Averager, Optimizer, Schedule, clip_grad_norm, clip_grad_value, grad_norm,
                           make_optimizer)
from charrnn.progress import Reporter, note, remaining
from charrnn.rundir import (RunDir, append_line, check_run_files, holds_run, new_identity, open_new,
                            read_identity)
from charrnn.signals import Signals
from charrnn.vocab import Vocab

MAX_BAD_STEPS = 5  # consecutive non-finite steps before giving up
LARGE_VOCAB = 2000  # tokens: above this a note says what the decoder costs (40% of a 2x256 LSTM step at 2,003)


# ---------------------------------------------------------------------------------- one step
@dataclass
class StepResult:
    loss: float  # mean loss of the batch (over every worker's streams, with a reduction)
    norm: float  # the gradient's global norm before clipping
    finite: bool  # False: the step was not applied (non-finite loss or gradient)
    h: np.ndarray  # the state after the batch, to carry into the next one
    c: np.ndarray


def no_reduction(grad: np.ndarray, loss: float) -> float:
    """The gradient reduction of a single process: nothing to combine."""
    return loss


def train_step(model: Model, opt: Optimizer, x, y, h, c, masks, lr: float, clip: float, clip_mode: str,
               reduce=no_reduction, weight_masks=None, avg=None, rate: float = 0.0) -> StepResult:
    """One update: forward and backward over the batch (with output dropout `masks` and weight
    drop `weight_masks`, either None), the gradient reduction (`reduce(grad, loss)` combines the
    gradient in place and returns the combined loss: data-parallel workers plug an all-reduce in
    here), clipping, and the optimizer step, which a non-finite loss or gradient skips (the
    caller decides what to do about it). The step moves the average of the weights `avg`, if
    given, `rate` of the way to the new weights, in the optimizer's own pass."""
    out = model.forward_backward(x, y, h, c, masks=masks, weight_masks=weight_masks, precision=model.precision)
    grad = out["grad"]
    loss = reduce(grad, out["loss"])
    if clip > 0 and clip_mode == "value":
        clip_grad_value(grad, clip)
        norm = grad_norm(grad)
    elif clip > 0:
        norm = clip_grad_norm(grad, clip)
    else:
        norm = grad_norm(grad)
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        opt.step(model.theta, grad, lr, avg=avg, rate=rate)
    return StepResult(loss, norm, finite, out["h"], out["c"])


class Solo:
    """The single process's side of the interface that data-parallel workers implement
    (parallel.Workers): one worker owning every stream, nothing to combine or agree on. The loop
    calls these at the points where workers must meet, so it reads the same either way."""

    rank, size, root = 0, 1, True
    b0, b1 = 0, None  # every stream is this process's

    def watch(self, poll):
        pass

    reduce = staticmethod(no_reduction)

    def agreed(self, signum, time_up: bool):
        return signum, time_up  # what this process saw is what it decides

    def check_same(self, step: int, theta, force: bool = False):
        pass

    def on_root(self, fn):
        return fn()

    def gather_state(self, h, c):
        return h, c

    def writing(self):
        return nullcontext()

    def validating(self):
        return nullcontext()

    def report(self):
        return None


# ---------------------------------------------------------------------------------- compiling early
class Precompile:
    """Compile (or load from the cache) the kernels a run of `cell` will need, in a background
    thread, while the corpus is read and encoded: the forward/backward and the dropout masks, the
    optimizer's updates, and the scorer of validation when it will serve (two threads or more and
    two layers or more; the kernels' types do not depend on the sizes, so a tiny model stands in).
    A daemon thread: a run that stops early (a bad corpus) does not wait for it, and the cache
    writes are atomic. wait() before training, so that nothing compiles during timed steps."""

    def __init__(self, cfg: TrainConfig, cell: str, threads_n: int, precisions=("fp32",)):
        self._args = (cfg, cell, threads_n, tuple(precisions))
        self.compiled = False  # whether anything had to compile (not only load from the cache)
        self._thread = threading.Thread(target=self._run, name="charrnn-precompile", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether it is still at work after having had to compile something."""
        return self.compiled and self._thread.is_alive()

    def _run(self):
        from charrnn.kernels.jit import compile_notice

        with compile_notice(lambda: setattr(self, "compiled", True)):
            self._compile()

    def _compile(self):
        cfg, cell, threads_n, precisions = self._args
        try:
            model = Model(ModelConfig(cell=cell, layers=2, hidden=8, vocab_size=4, nonlinearity=cfg.nonlinearity))
            for p in precisions:  # only what the run will use: each is a kernel of its own
                # None: chosen later, and likely above 0
                model.warm_up(dropout=cfg.dropout != 0, weight_drop=cfg.weight_drop is None or cfg.weight_drop > 0,
                              precision=p)
            model.precision = precisions[-1]
            opt = make_optimizer(cfg.optimizer, model.n_params, model.dtype, 1e-3)
            x = np.zeros((2, 2), np.int32)
            train_step(model, opt, x, x, *model.zero_state(2), None, 1e-3, cfg.clip, cfg.clip_mode,
                       avg=np.zeros(model.n_params, model.dtype), rate=1.0)
            if "fp32" not in precisions and (threads_n < 2 or cfg.layers < 2):
                h, c = model.zero_state(2)  # validation scores in float32 by the batch kernel
                model.forward_backward(x, x, h, c, backward=False)
            if threads_n >= 2 and cfg.layers >= 2:
                h, c = model.zero_state(1)
                model.score(np.zeros(2, np.int32), np.zeros(2, np.int32), h, c)
        except Exception:  # noqa: BLE001 - the run itself will compile, and report any error, in its own time
            pass

    def wait(self):
        """Until it is done; in short slices, so that signal handlers run meanwhile."""
        while self._thread.is_alive():
            self._thread.join(0.1)


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
    eval_due: bool = False  # an interrupt cut this step's validation short: the resumed run does it first
    train_loss: float | None = None  # the smoothed training loss when saved (metrics go on from it on resume)
    chars_per_s: float = 0.0  # the speed when saved


def _check_loadable(mcfg: ModelConfig, batch: int):
    """Refuse, before allocating it, a model whose checkpoint no charrnn would load (checkpoint.py's
    limits on corrupt files, far above anything trainable on a CPU)."""
    n = approx_params(mcfg.cell, mcfg.layers, mcfg.hidden, mcfg.vocab_size)
    if mcfg.layers > checkpoint.MAX_LAYERS or mcfg.hidden > checkpoint.MAX_HIDDEN or n > checkpoint.MAX_PARAMS:
        raise UsageError(f"a {mcfg.layers}x{mcfg.hidden} {mcfg.cell} has {n:,} parameters; charrnn's checkpoints hold "
                         f"at most {checkpoint.MAX_LAYERS} layers of {checkpoint.MAX_HIDDEN} units and "
                         f"{checkpoint.MAX_PARAMS:,} parameters")
    if batch > checkpoint.MAX_STREAMS:
        raise UsageError(f"--batch {batch} is above the {checkpoint.MAX_STREAMS:,} streams a checkpoint can carry")


def decoder_share(mcfg: ModelConfig) -> float:
    """The decoder's share of a step's multiply-adds: V x H against the recurrent layers' G*H x
    (H + H) each (layer 0's input is a gather, not a product)."""
    G, H, V, L = mcfg.G, mcfg.hidden, mcfg.vocab_size, mcfg.layers
    recurrent = G * H * H + (L - 1) * G * H * 2 * H
    return V * H / (V * H + recurrent)


def _vocab_notes(corpus, capped, mcfg: ModelConfig) -> list[str]:
    """What the vocabulary costs: characters that became <UNK>, and a decoder that dominates."""
    lines = []
    if capped is not None:
        lines.append(f"note: kept the {capped.vocab.size - 3:,} most frequent of {len(corpus.vocab.chars):,} characters "
                     f"(--max-vocab); the other {capped.dropped:,} ({capped.dropped_chars:,} occurrences, "
                     f"{capped.dropped_chars / max(capped.chars, 1):.3%} of the text) are <UNK>")
    share = decoder_share(mcfg)
    if mcfg.vocab_size > LARGE_VOCAB:
        lines.append(f"note: a vocabulary of {mcfg.vocab_size:,} tokens: the decoder is {share:.0%} of each step's "
                     "arithmetic; a smaller --max-vocab trains faster")
    return lines


def _check_out_dir(out: str, need_bytes: int):
    """Prove the (locked) run directory is writable and has room for its checkpoints, before any
    training: a read-only or full filesystem is found now, not after the first hour."""
    probe = os.path.join(out, ".charrnn-write-test")
    try:
        with open_new(probe) as f:
            f.write(b"ok")
        os.unlink(probe)
        free = shutil.disk_usage(out).free
    except OSError as e:
        raise CharrnnError(f"output directory {out} is not writable: {e.strerror or e}") from None
    if free < need_bytes:
        raise CharrnnError(f"not enough disk space in {out}: {_mib(free)} free, checkpoints need about "
                           f"{_mib(need_bytes)}")


def _check_foreign_log(path: str):
    """A new run's directory must not hold a metrics.jsonl already: with no checkpoint beside it,
    it is no run to continue, and a new run would add its records to another's log."""
    log = os.path.join(path, "metrics.jsonl")
    if os.path.lexists(log) and not os.path.isdir(log):  # a directory there holds no one's records (the
        # run fails at its first validation, in one line, its checkpoint saved: test_train)
        raise UsageError(f"{log} exists but {path} holds no checkpoint: a new run would add its lines to "
                         "another's; move it away or choose another --out")


def _mib(n: int) -> str:
    """Bytes in MiB, precise enough that two different sizes never read the same."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _check_identity(run_dir: str, path: str, meta: dict) -> str | None:
    """The identity of the run in `run_dir`, after checking that its last.npz (at `path`, with
    `meta`) is its own: the run id recorded in run.json when the run started must be the
    checkpoint's. Without run.json (a run from before identities, or one that lost it) best.npz
    is the witness: the same run id, or without ids the same corpus, model and seed; run.json is
    then written again. Refuses another run's checkpoint copied in. None: the run has no identity
    yet and gets one with its next save (Trainer._save_last)."""
    recorded = read_identity(run_dir)
    carried = meta.get("run_id")
    if recorded is not None:
        if carried == recorded:
            return recorded
        theirs = f"run {carried}" if carried else "a run that recorded no identity"
        raise CharrnnError(f"{path} belongs to {theirs}, but {run_dir} holds run {recorded}: it was copied or moved "
                           "in from elsewhere; put the run's own last.npz back (or resume the other run in its own "
                           "directory)")
    best = os.path.join(run_dir, "best.npz")
    if os.path.lexists(best):
        try:
            other = checkpoint.load(best).meta
        except CharrnnError:
            other = None  # a damaged best.npz says nothing about last.npz; the run rewrites it
        if other is not None:
            ids = (other.get("run_id"), carried)
            differ = ids[0] != ids[1] if all(ids) else _lineage_key(other) != _lineage_key(meta)
            if differ:
                raise CharrnnError(f"{path} and {best} are from different runs (their identity, corpus, model or "
                                   "seed differ): one was copied in from elsewhere; put the run's own last.npz back")
    if carried:
        return new_identity(run_dir, carried)  # run.json lost: restored
    return None


def _lineage_key(meta: dict):
    """What two checkpoints of one run share whatever their step: corpus, model shape, seed."""
    train = meta.get("train") or {}
    return ((meta.get("corpus") or {}).get("sha256"), meta.get("cell"), meta.get("layers"), meta.get("hidden"),
            meta.get("vocab"), train.get("seed"))


def _load_flat(ck, path: str, prefix: str, flat: np.ndarray, what: str):
    """Fill a flat buffer in the parameters' layout (optimizer moments, averaged weights) from the
    checkpoint members `prefix` + each parameter's name; a missing or misshapen one refuses resume."""
    view = Model(ck.model.cfg, dtype=flat.dtype, theta=flat).params
    for pname in view.views:
        arr = ck.arrays.get(f"{prefix}{pname}")
        if arr is None or arr.shape != view[pname].shape:
            raise CharrnnError(f"{path}: cannot resume: {what} {prefix}{pname} missing or wrong")
        view[pname][...] = arr


def vocab_itemsize(vocab: Vocab) -> int:
    """Bytes per token in the token file."""
    return np.dtype(compact_dtype(vocab.size)).itemsize


class Trainer:
    """One training run. Build with `Trainer.new(...)` or `Trainer.resume(...)`, then `run()`.

    `given` is the configuration as the user gave it, `fitted` what the run chose or fitted where
    an option was left open, and `cfg` the two combined: what the loop follows."""

    lineage = None  # {"origin": ...} or {"vocab_from": ...}: where a run started from (finetune.record), into its meta
    run_id = None  # the run's identity (rundir.RUN_FILE), carried by every checkpoint it writes

    def __init__(self, given: TrainConfig, fitted: Fitted, corpus, vocab: Vocab, model: Model, out: str, quiet: bool,
                 state: RunState, opt, extra_minutes: float | None, tokens: TokenFile):
        self.given = given
        self.fitted = fitted
        self.corpus = corpus
        self.vocab = vocab
        self.model = model
        model.precision = fitted.precision  # the training step's products (precision.py)
        self.precision_pending = False  # --precision auto still to be measured on the first batch (new())
        self.out = out
        self.quiet = quiet
        self.state = state
        self.opt = opt
        self.extra_minutes = extra_minutes
        cfg = self.cfg
        # ---- data: batches and validation read the memory-mapped token file (data.py)
        self.tokens = tokens
        self.stream = BatchStream(tokens.train, cfg.batch)
        self.val_tokens = tokens.val  # None when nothing is held out
        self.bpe = self.stream.batches_per_epoch(cfg.seq)
        self.eval_every = cfg.eval_every or int(min(2000, max(200, self.bpe)))
        self.h, self.c = model.zero_state(cfg.batch)
        # the average of the weights the run validates and keeps as best (--average); its first
        # update has rate 1, so a new run's buffer needs no initial value
        self.averager = None if cfg.average == "off" else Averager(cfg.average, model.n_params, model.dtype,
                                                                   cfg.avg_decay)
        self.metrics_path = os.path.join(out, "metrics.jsonl") if out is not None else None
        self.precompile = None  # a Precompile started by new()
        self.workers = Solo()  # or parallel.Workers: this process's share of the streams, and the meeting points
        self.threads_default = None  # threads when --threads is left open (None: every core)
        self.rundir = None  # the locked run directory (RunDir), from new() / resume()
        self._saved_step = None  # the step last.npz was last written at, by this process
        self._evaluated_step = None  # the step last validated, by this process

    def _own(self, rundir: RunDir):
        """Take the locked run directory; stale temporary files of killed runs go (under the lock)."""
        self.rundir = rundir
        self.out = rundir.path
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        checkpoint.remove_stale_temps(self.out)

    def close(self):
        """Give the run directory back: removed if this run made it and saved nothing, unlocked."""
        if self.rundir is not None:
            self.rundir.discard_if_unused()
            self.rundir = None

    @property
    def fitted(self) -> Fitted:
        return self._fitted

    @fitted.setter
    def fitted(self, value: Fitted):
        """Set what the run fitted, and with it the config the loop follows and its schedule."""
        self._fitted = value
        self.cfg = cfg = effective(self.given, value)  # the user's, with the fitted values filled in
        # "auto" runs as constant until a --minutes run fits it
        self.schedule = Schedule("constant" if cfg.schedule == "auto" else cfg.schedule, cfg.lr, warmup=cfg.warmup,
                                 decay_every=cfg.decay_every, decay_factor=cfg.decay_factor,
                                 decay_steps=cfg.decay_steps)

    # ------------------------------------------------------------------ construction
    @classmethod
    def new(cls, paths, cfg: TrainConfig, out: str | None, quiet: bool = False, runs_dir: str = "runs",
            explicit=()):
        """A new run. With cfg.init_from or cfg.vocab it starts from that checkpoint or vocabulary
        (finetune.py); `explicit` names the options the user gave (the command line's), which must
        then agree with the model (finetune.adopt)."""
        base = finetune.load_base(cfg)  # None for an ordinary run
        cfg = finetune.adopt(cfg, base, explicit)
        if cfg.hidden is not None:  # a size no checkpoint holds is refused before the corpus is read
            _check_loadable(ModelConfig(cell=budget.chosen_cell(cfg), layers=cfg.layers, hidden=cfg.hidden,
                                        vocab_size=4, nonlinearity=cfg.nonlinearity), cfg.batch)
        chosen, prec_note = precision.choose(cfg.precision, cfg.hidden, cfg.minutes)
        early = Precompile(cfg, budget.chosen_cell(cfg), threads.set_threads(cfg.threads),
                           ("fp32", "bf16") if chosen == "measure" else (chosen,))
        if prec_note:
            note(quiet, prec_note)
        corpus = read_corpus(paths, cfg.encoding, cfg.docs, cfg.max_input)  # one reading: hash, counts, vocabulary
        try:
            return cls._new(paths, cfg, out, quiet, runs_dir, early, corpus, base)
        finally:
            corpus.close()  # stdin's spool

    @classmethod
    def _new(cls, paths, cfg: TrainConfig, out: str | None, quiet: bool, runs_dir: str, early, corpus, base=None):
        if cfg.docs is not None and corpus.doc_count == 0:
            raise DataError("the corpus holds no documents")
        plan = None
        if base is None:
            capped = capped_vocab(corpus, cfg.max_vocab)
            vocab = corpus.vocab if capped is None else capped.vocab
        else:  # the vocabulary is given: the text's other characters as --unknown says
            capped = None
            plan = finetune.plan_vocab(base, corpus.vocab.chars, cfg.unknown, base.what)
            vocab = plan.vocab
        n_train = int(corpus.chars * (1 - cfg.val_frac))
        fitted = budget.choose_size(cfg, n_train)
        chosen, _ = precision.choose(cfg.precision, fitted.hidden, cfg.minutes)
        fitted = replace(fitted, precision="fp32" if chosen == "measure" else chosen)
        mcfg = ModelConfig(cell=fitted.cell, layers=cfg.layers, hidden=fitted.hidden, vocab_size=vocab.size,
                           nonlinearity=cfg.nonlinearity, dropout=fitted.dropout)
        _check_loadable(mcfg, cfg.batch)
        if base is not None and base.model is not None:  # fine-tuning: the parent's weights, a fresh optimizer
            model = finetune.transplant(base.model, base.vocab, vocab, mcfg, cfg.seed)
        else:
            model = Model(mcfg).init(cfg.seed, forget_bias=cfg.forget_bias)  # only a cell with a forget gate has one
        if out is not None and holds_run(out):  # said before the corpus is encoded; checked again under the lock
            RunDir.lock(out).release()  # a live run there is named first
            raise UsageError(f"{out} already holds a run; continue it with --resume {shlex.quote(out)} or choose "
                             "another --out")
        if out is not None:
            _check_foreign_log(out)
        opt = make_optimizer(cfg.optimizer, model.n_params, model.dtype, cfg.lr)
        # everything that can reject the input happens before the directory exists
        check_sizes(corpus, cfg.val_frac, cfg.batch, cfg.seq)
        token_bytes = total_tokens(corpus, cfg.val_frac) * vocab_itemsize(vocab)
        rundir = RunDir.claim_new(out) if out is not None else RunDir.claim_default(os.path.join(runs_dir, corpus.name))
        try:
            _check_foreign_log(rundir.path)  # again, under the lock
            _check_out_dir(rundir.path, need_bytes=4 * model.n_params * 4 * 3 + token_bytes)
            remove_stale_token_temps(rundir.path)
            tokens = build_token_file(corpus, vocab, cfg.val_frac, os.path.join(rundir.path, TOKENS_FILE))
            trainer = cls(cfg, fitted, corpus, vocab, model, rundir.path, quiet, RunState(), opt, None, tokens)
            trainer._own(rundir)
            trainer.run_id = new_identity(rundir.path)
        except BaseException:
            rundir.discard_if_unused()
            raise
        n_val = 0 if trainer.val_tokens is None else len(trainer.val_tokens) - 1
        trainer.fitted = replace(trainer.fitted, val_chars=budget.val_chars_for(cfg, n_val))
        trainer.precision_pending = chosen == "measure"
        trainer.precompile = early
        if base is not None:
            trainer.lineage = finetune.record(base, plan, cfg.unknown)
            for line in plan.notes + [finetune.docs_note(base, cfg.docs)]:
                if line:
                    note(quiet, line)
            if plan.missing and cfg.unknown == "unk":
                n_unk = finetune.count_unk(trainer.tokens.ids)
                note(quiet, f"note: {n_unk:,} of the text's {corpus.chars:,} characters ({n_unk / max(corpus.chars, 1):.3%}) "
                            "are <UNK>")
        for line in _vocab_notes(corpus, capped, mcfg):
            note(quiet, line)
        if model.n_params > 2 * n_train:
            note(quiet, f"warning: the model has {model.n_params:,} parameters for {n_train:,} training characters; "
                        "expect overfitting (consider a smaller --hidden or --layers, or more --dropout)")
        return trainer

    @classmethod
    def resume(cls, run_dir: str, steps=None, epochs=None, minutes=None, quiet=False, threads_n=None):
        path = os.path.join(run_dir, "last.npz")
        if not os.path.isdir(run_dir):
            raise CharrnnError(f"{run_dir}: no such run directory")
        rundir = RunDir.lock(run_dir, resuming=True)  # a live run keeps it: refused now, before any work
        try:
            if not os.path.lexists(path):
                raise CharrnnError(f"{run_dir}: no last.npz to resume from")
            check_run_files(run_dir)
            # a save writes the new last.npz beside the old one, then replaces it: room for one more copy
            _check_out_dir(run_dir, need_bytes=os.path.getsize(path))
            tr = cls._resume(rundir, path, steps, epochs, minutes, quiet, threads_n)
        except BaseException:
            rundir.release()
            raise
        return tr

    @classmethod
    def _resume(cls, rundir: RunDir, path: str, steps, epochs, minutes, quiet, threads_n):
        run_dir = rundir.path
        ck = checkpoint.load(path, with_arrays=True)
        meta = ck.meta
        run_id = _check_identity(run_dir, path, meta)
        try:
            if "config" in meta and "fitted" in meta:
                given = TrainConfig.from_dict(meta["config"])
                fitted = Fitted.from_dict(meta["fitted"])
            else:  # written before the given and fitted values were kept apart
                given = TrainConfig.from_dict(meta["train"])
                fitted = Fitted.from_effective(given, pending=meta["train"].get("dropout_fit", False))
            rs = RunState(**meta["run"])
            paths = meta["corpus"]["paths"]
            sha = meta["corpus"]["sha256"]
        except (KeyError, TypeError) as e:
            raise CharrnnError(f"{path}: cannot resume: checkpoint lacks training state ({e})") from None
        except UsageError as e:  # options this version no longer accepts (a range tightened since)
            raise CharrnnError(f"{path}: cannot resume: the run's recorded options are out of range: {e}") from None
        recorded = meta.get("config", meta.get("train", {}))
        if "max_vocab" not in recorded:
            given = replace(given, max_vocab=None)  # a run from before --max-vocab kept every character
        if "weight_drop" not in recorded:  # a run from before these options trained without them
            given = replace(given, weight_drop=0.0, dropout_mode="step", average="off")
        if "-" in paths:
            raise CharrnnError("cannot resume a run trained on stdin: the corpus cannot be read again")
        if fitted.precision == "bf16" and precision.backend() is None:
            note(quiet, "note: the run trained with bf16 products, which this CPU does not have; it goes on in "
                        "float32")
            fitted = replace(fitted, precision="fp32")
        early = Precompile(effective(given, fitted), ck.model.cfg.cell,
                           threads.set_threads(threads_n if threads_n is not None else given.threads),
                           (fitted.precision,))
        corpus = read_corpus(paths, given.encoding, given.docs, given.max_input)  # in chunks, as a new run
        try:
            if corpus.sha256 != sha:
                raise CharrnnError(f"cannot resume: the corpus {', '.join(paths)} changed since the run started")
            if given.init_from is not None or given.vocab is not None:
                # a given vocabulary (fine-tuned, extended, shared): the one the run recorded
                finetune.check_resume_vocab(corpus.vocab.chars, ck.vocab, given.unknown, path)
            else:
                capped = capped_vocab(corpus, given.max_vocab)
                if (corpus.vocab if capped is None else capped.vocab) != ck.vocab:
                    raise CharrnnError("cannot resume: the corpus's characters differ from the checkpoint's vocabulary")
            # the run's token file if it matches; else (a run from before token files, or a damaged one) build it
            token_path = os.path.join(run_dir, TOKENS_FILE)
            remove_stale_token_temps(run_dir)
            why = []
            tokens = open_token_file(token_path, corpus, ck.vocab, given.val_frac, notes=why)
            for line in why:
                note(quiet, line)
            if tokens is None:
                tokens = build_token_file(corpus, ck.vocab, given.val_frac, token_path)
        finally:
            corpus.close()
        if steps is not None or epochs is not None:
            # a new budget replaces the old one, the default budget included
            given = replace(given, steps=steps, epochs=epochs, minutes=None)
            fitted = replace(fitted, epochs=None)
        if threads_n is not None:
            given = replace(given, threads=threads_n)
        opt = make_optimizer(given.optimizer, ck.model.n_params, ck.model.dtype, given.lr)
        bufs = {}
        for key in opt.state_buffers():
            bufs[key] = np.zeros(ck.model.n_params, dtype=ck.model.dtype)
            _load_flat(ck, path, f"optim.{key}.", bufs[key], "optimizer state")
        opt.load_state(bufs, int(meta["optimizer"]["t"]))
        tr = cls(given, fitted, corpus, ck.vocab, ck.model, run_dir, quiet, rs, opt, minutes, tokens)
        tr.precompile = early
        tr.run_id = run_id
        tr.lineage = {k: meta[k] for k in ("origin", "vocab_from") if k in meta} or None
        tr._own(rundir)
        h, c = ck.arrays.get("train.h"), ck.arrays.get("train.c")
        if h is None or c is None or h.shape != tr.h.shape:
            raise CharrnnError(f"{path}: cannot resume: carried training state missing")
        tr.h[...] = h
        tr.c[...] = c
        if tr.averager is not None:
            _load_flat(ck, path, "avg.", tr.averager.avg, "averaged weights")
        if rs.pos >= tr.stream.S:
            raise CharrnnError(f"{path}: cannot resume: data position beyond the corpus")
        return tr

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        cfg = self.cfg
        return {
            "config": self.given.to_dict(),  # as the user gave it
            "fitted": self.fitted.to_dict(),  # what the run chose or fitted
            "train": dict(cfg.to_dict(), dropout_fit=self.fitted.dropout_pending),  # the two combined
            "run": self.state.__dict__.copy(),
            "step": self.state.step,
            "epoch": self.state.epoch,
            "best_val": None if math.isinf(self.state.best_val) else self.state.best_val,
            "optimizer": {"name": self.opt.name, "hparams": self.opt.hparams(), "t": self.opt.t},
            "schedule": self.schedule.to_dict(),
            "rng": {"seed": cfg.seed, "dropout": "splitmix64(seed, step, element)"},
            "data": {"pos": self.state.pos, "streams": cfg.batch, "stream_len": self.stream.S},
            "corpus": {"paths": [os.path.abspath(p) if p != "-" else "-" for p in self.corpus.paths],
                       "sha256": self.corpus.sha256, "chars": self.corpus.chars, "docs": cfg.docs},
            "dtype": str(self.model.dtype),
            "run_id": self.run_id,  # the run's identity (run.json): resume refuses another run's last.npz
            **(self.lineage or {}),  # where the run started from: origin (--init-from), vocab_from (--vocab)
        }

    def _save_last(self, h=None, c=None):
        """last.npz, with the carried state of every stream (h, c (L, B, H); this process's own by default)."""
        extra = {"train.h": self.h if h is None else h, "train.c": self.c if c is None else c}
        flats = {f"optim.{key}.": flat for key, flat in self.opt.state_buffers().items()}
        if self.averager is not None:
            flats["avg."] = self.averager.avg  # the raw weights stay under rnn.* / decoder.*, for resume
        for prefix, flat in flats.items():
            fp = Model(self.model.cfg, dtype=self.model.dtype, theta=flat).params
            for pname, arr in fp.items():
                extra[f"{prefix}{pname}"] = arr
        with self.workers.writing():
            if self.run_id is None:  # a run from before identities, resumed: its identity, before the checkpoint
                self.run_id = new_identity(self.out)
            checkpoint.save(os.path.join(self.out, "last.npz"), self.model, self.vocab, self._meta(), extra,
                            dropout=self.fitted.dropout)
        self._saved_step = self.state.step

    def _save_best(self):
        """best.npz: the model validation scored (the average of the weights, with --average)."""
        with self.workers.writing(), self._averaged():
            checkpoint.save(os.path.join(self.out, "best.npz"), self.model, self.vocab, self._meta(),
                            dropout=self.fitted.dropout)

    # ------------------------------------------------------------------ validation
    def validate(self, stop=None) -> float | None:
        """Mean loss over the held-out positions the run scores (the first Fitted.val_chars of the
        split, or all of it), by docs/design.md's definition, of the averaged weights with --average;
        None without a split. Cancelled as soon as `stop()` says so (it is asked between spans of
        the scorer)."""
        if self.val_tokens is None or len(self.val_tokens) < 2:
            return None
        n = self.fitted.val_chars
        tokens = self.val_tokens if n is None else self.val_tokens[: n + 1]
        with self._averaged():
            return score_tokens(self.model, tokens, stop=stop).nats

    # ------------------------------------------------------------------ the loop
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
        return int(math.ceil(epochs * self.bpe))

    def _budget_seconds(self) -> float | None:
        if self.extra_minutes is not None:
            return self.extra_minutes * 60
        if self.given.minutes is not None:
            return max(0.0, self.given.minutes * 60 - self.state.elapsed)
        return None

    def run(self) -> dict:
        st, model = self.state, self.model
        n_threads = threads.set_threads(self.given.threads if self.given.threads is not None else self.threads_default)
        budget_s = self._budget_seconds()
        if self.cfg.steps is None and self.cfg.epochs is None and budget_s is None:
            self.fitted = replace(self.fitted, epochs=budget.DEFAULT_EPOCHS)  # the documented default budget
        cfg = self.cfg
        auto_eval = cfg.eval_every is None and budget_s is not None and cfg.steps is None and cfg.epochs is None
        total = cfg.steps if cfg.steps is not None else (self._epoch_steps(cfg.epochs) if cfg.epochs is not None else None)
        rep = Reporter(self.quiet, total, st.step)
        rep.message(
            f"charrnn: {cfg.cell} {cfg.layers}x{cfg.hidden} dropout {cfg.dropout:g}"
            f"{f' weight drop {cfg.weight_drop:g}' if cfg.weight_drop else ''}"
            f"{' (until fitted to the budget)' if self.fitted.dropout_pending else ''}, {model.n_params:,} parameters, "
            f"vocabulary {self.vocab.size}, {self.stream.n_tokens:,} training tokens, batch {cfg.batch}x{cfg.seq}, "
            f"{n_threads} thread(s){f' x {self.workers.size} workers' if self.workers.size > 1 else ''}, "
            f"{'precision measured next' if self.precision_pending else precision.describe(self.fitted.precision)}"
            f" -> {self.out}"
        )
        said = []

        def notice():
            if not said:
                said.append(True)
                rep.message("charrnn: compiling for this machine (first run only; about 20 s) ...")

        try:
            with compile_notice(notice):
                if self.precompile is not None and self.precompile.busy:
                    notice()
                try:
                    # compile (or load) the training kernels before the clock starts: not counted
                    # against --minutes; an interrupt here has nothing to save. The background
                    # compile first: this thread waits for it in short slices, so an interrupt is
                    # seen at once (a compile in this thread would hold it for many seconds)
                    if self.precompile is not None:
                        self.precompile.wait()
                    self.model.warm_up(dropout=cfg.dropout > 0 or self.fitted.dropout_pending,
                                       weight_drop=cfg.weight_drop > 0 or (self.fitted.dropout_pending
                                                                           and self.fitted.weight_drop_open),
                                       precision=self.fitted.precision)
                    if self.precision_pending:
                        self._measure_precision(rep)
                except (KeyboardInterrupt, signals.SignalExit) as e:
                    rep.close()
                    signum = getattr(e, "signum", 2)
                    saved = f"; the run in {self.out} is as it was" if holds_run(self.out) else "; nothing to save"
                    raise Interrupted(f"stopped by {signals.name_of(signum)} before training started{saved}",
                                      signals.EXIT_CODES.get(signum, 130)) from None
                return self._run(rep, budget_s, auto_eval, total)
        finally:
            rep.close()
            self.close()

    def _measure_precision(self, rep: Reporter):
        """--precision auto where the CPU has bfloat16 dot products but no AMX: time both on this
        run's own first batch (before the clock starts) and keep the faster (precision.measure)."""
        x, y = self.stream.get(0, self.cfg.seq, self.workers.b0, self.workers.b1)
        chosen = self.workers.on_root(lambda: precision.measure(self.model, x, y))  # one choice for every worker
        self.fitted = replace(self.fitted, precision=chosen)
        self.model.precision = chosen
        self.precision_pending = False
        rep.message(f"charrnn: {precision.describe(chosen)} (measured faster on the first batch)")

    def _run(self, rep: Reporter, budget_s: float | None, auto_eval: bool, total: int | None) -> dict:
        st, model, cfg = self.state, self.model, self.cfg
        if self.fitted.dropout_pending and budget_s is None:
            # a --minutes run stopped before its dropout fit, resumed with --steps / --epochs: the
            # budget is known now
            self.fitted, line = budget.dropout_at_end(cfg, self.fitted, total, model.n_params, self.stream.n_tokens)
            rep.message(line)
        fit = budget.Fit(self.fitted, self.eval_every, budget_s is not None and (
            auto_eval or self.fitted.schedule == "auto" or self.fitted.dropout_pending), False)
        masks = wmasks = None
        smooth = st.train_loss  # the smoothed loss goes on where the saved run left it
        self._snapshot()
        elapsed0 = st.elapsed
        t_start = time.monotonic()
        t_report = 0.0
        t_steps = 0.0  # seconds spent in training steps (excluding evaluation) in this process
        chars_done = 0
        steps_here = 0
        times = StepTimes()
        eval_cost = 0.0
        bad = 0
        stop = None
        workers = self.workers
        received = None  # the signal that stops the run (agreed by all workers)
        with Signals() as sig:
            interrupted = lambda: sig.received is not None  # noqa: E731 - asked between spans of a validation
            time_up = lambda: budget_s is not None and time.monotonic() - t_start + eval_cost >= budget_s  # noqa: E731
            try:
                workers.watch(lambda: (sig.received, time_up()))
                if st.eval_due:  # the validation an interrupt cut short, before the resumed run goes on
                    self._evaluate(rep, smooth, st.chars_per_s, t_start, elapsed0, stop=interrupted)
                while True:
                    received, out_of_time = workers.agreed(sig.received, time_up())
                    stop = self._stop_reason(out_of_time)
                    if stop or received is not None:
                        break
                    cfg = self.cfg
                    t0 = time.perf_counter()
                    T = min(seq_len_at(cfg, st.step), self.stream.S - st.pos)
                    x, y = self.stream.get(st.pos, T, workers.b0, workers.b1)  # (T, B/N): this worker's streams
                    if cfg.dropout > 0:  # the whole batch's masks, this worker's streams of them
                        masks = model.dropout_masks(T, x.shape[1], cfg.seed, st.step, out=masks, p=cfg.dropout,
                                                    B_all=cfg.batch, b0=workers.b0,
                                                    locked=cfg.dropout_mode == "locked")
                    if cfg.weight_drop > 0:  # one mask for the whole batch: every worker draws the same
                        wmasks = model.weight_masks(cfg.seed, st.step, cfg.weight_drop, out=wmasks)
                    av = self.averager
                    res = train_step(model, self.opt, x, y, self.h, self.c, masks if cfg.dropout > 0 else None,
                                     self.schedule.lr_at(st.step) * st.lr_scale, cfg.clip, cfg.clip_mode,
                                     reduce=workers.reduce, weight_masks=wmasks if cfg.weight_drop > 0 else None,
                                     avg=None if av is None else av.avg,
                                     rate=0.0 if av is None else av.rate(st.step + 1, self._averaging_start()))
                    if res.finite:
                        bad = 0
                        self.h, self.c = res.h, res.c
                        smooth = res.loss if smooth is None else 0.98 * smooth + 0.02 * res.loss
                    else:
                        bad += 1
                        st.lr_scale *= 0.5
                        self.h[...] = 0
                        self.c[...] = 0
                        if not np.all(np.isfinite(model.theta)):
                            self._restore()
                        rep.message(f"warning: non-finite loss at step {st.step}; step discarded, learning rate halved")
                        if bad >= MAX_BAD_STEPS:
                            saved = (f"The last good checkpoint is in {self.out}" if holds_run(self.out)
                                     else "No checkpoint had been saved yet")
                            raise TrainingError(
                                f"the loss stayed non-finite for {bad} steps; stopped. {saved}; try a lower --lr "
                                "or --clip"
                            )
                    st.step += 1
                    workers.check_same(st.step, model.theta)
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
                                               "left": remaining(st.step, total, t_steps, steps_here, budget_s, t_start)})
                    if steps_here > 5:  # the first steps may include compilation
                        times.add(T, dt)
                    if (budget_s is not None and fit.open and steps_here >= AUTO_MEASURE_STEPS
                            and (steps_here - AUTO_MEASURE_STEPS) % REFIT_EVERY == 0):
                        # fitted on rank 0's clock and shared: workers that each fitted their own
                        # timings would follow different schedules and drift apart
                        fit, lines = workers.on_root(lambda: budget.refit(
                            cfg, fit, st.step, times, budget_s, budget_s - (time.monotonic() - t_start), eval_cost,
                            auto_eval, model.n_params, self.stream.n_tokens))
                        self.fitted, self.eval_every = fit.fitted, fit.eval_every
                        for line in lines:
                            rep.message(line)
                    if st.step % self.eval_every == 0:
                        te = time.monotonic()
                        stop = self._evaluate(rep, smooth, cps, t_start, elapsed0, stop=interrupted)
                        eval_cost = time.monotonic() - te
                        if stop:
                            break
                if received is None and self._evaluated_step != st.step and (
                        st.step % self.eval_every != 0 or st.step == 0):
                    # the final validation, unless the last step was just validated
                    self._evaluate(rep, smooth, chars_done / t_steps if t_steps else 0.0, t_start, elapsed0,
                                   stop=interrupted)
            except Cancelled:
                pass  # an interrupt arrived during a validation: saved below, the validation marked due
            except KeyboardInterrupt:
                rep.close()
                raise Interrupted("interrupted twice; stopped without saving the last steps", 130) from None
            received = workers.agreed(sig.received, False)[0]
            if received is not None:
                st.elapsed = elapsed0 + time.monotonic() - t_start
                st.train_loss, st.chars_per_s = smooth, (chars_done / t_steps if t_steps else st.chars_per_s)
                if not np.all(np.isfinite(model.theta)):
                    self._restore()
                if self._saved_step != st.step or st.eval_due:
                    rep.message("interrupted: saving the run ...")
                    h, c = workers.gather_state(self.h, self.c)
                    workers.on_root(lambda: self._save_last(h, c))
                    self._saved_step = st.step
                rep.close()
                raise Interrupted(f"stopped by {signals.name_of(received)} at step {st.step}; saved "
                                  f"{os.path.join(self.out, 'last.npz')} (continue with: charrnn train --resume "
                                  f"{shlex.quote(self.out)})", signals.EXIT_CODES.get(received, 130))
        rep.close()
        line = workers.report()
        if line:
            rep.message(line)
        st.elapsed = elapsed0 + time.monotonic() - t_start
        return {"stop": stop, "step": st.step, "best_val": st.best_val, "out": self.out,
                "chars_per_s": chars_done / t_steps if t_steps else 0.0}

    def _snapshot(self):
        """Remember the current parameters, optimizer state and average as the last good ones."""
        self._good = (self.model.theta.copy(), {k: v.copy() for k, v in self.opt.state_buffers().items()}, self.opt.t,
                      None if self.averager is None else self.averager.avg.copy())

    def _restore(self):
        theta, bufs, t, avg = self._good
        self.model.theta[...] = theta
        self.opt.load_state({k: v.copy() for k, v in bufs.items()}, t)
        if avg is not None:
            self.averager.avg[...] = avg

    def _averaging_start(self) -> int:
        """The update after which a Polyak average begins: where the learning rate starts to decay
        (a wsd schedule's decay; otherwise the end of the warm-up). A function of the fitted
        schedule, which is final before the decay begins, so a resumed run averages the same."""
        cfg = self.cfg
        if cfg.schedule == "wsd" and cfg.decay_steps is not None:
            return cfg.warmup + int(cfg.decay_steps * (1.0 - WSD_DECAY_FRAC))
        return cfg.warmup

    @contextmanager
    def _averaged(self):
        """The model's weights are the average's inside (validation, best.npz), the raw ones after."""
        if self.averager is None:
            yield
            return
        theta = self.model.theta
        raw = theta.copy()
        theta[...] = self.averager.avg
        try:
            yield
        finally:
            theta[...] = raw

    def _evaluate(self, rep: Reporter, smooth, cps, t_start, elapsed0, stop=None) -> str | None:
        """Validate, save last.npz (and best.npz when better) and append to metrics.jsonl; the stop
        reason when patience ran out. Raises Cancelled, with the validation marked due in the run
        state, when `stop()` interrupts it."""
        st = self.state
        st.elapsed = elapsed0 + time.monotonic() - t_start
        st.train_loss, st.chars_per_s = smooth, cps
        if not np.all(np.isfinite(self.model.theta)):
            self._restore()
        self._snapshot()
        self.workers.check_same(st.step, self.model.theta, force=True)
        h, c = self.workers.gather_state(self.h, self.c)  # every stream's, on rank 0
        try:
            # rank 0 validates and writes; the others wait for its verdict (the exact single-stream
            # number: scoring split among workers would start chunks from a zero state)
            reason, state = self.workers.on_root(lambda: self._validate_and_record(rep, smooth, cps, h, c, stop))
        except Cancelled:
            st.eval_due = True
            raise
        self.state.__dict__.update(state)
        self._evaluated_step = self._saved_step = st.step  # on every worker: they decide alike from here
        return reason

    def _validate_and_record(self, rep: Reporter, smooth, cps, h, c, stop) -> tuple[str | None, dict]:
        st = self.state
        with self.workers.validating():
            val = self.validate(stop=stop)
        st.eval_due = False
        improved = val is not None and val < st.best_val
        if improved:
            st.best_val, st.best_step, st.bad_evals = val, st.step, 0
        elif val is not None:
            st.bad_evals += 1
        if val is None:
            st.best_step = st.step  # no validation: the latest model is the best we know
        self._save_last(h, c)
        if improved or val is None:
            self._save_best()
        line = {"step": st.step, "epoch": round(st.step / self.bpe, 4), "train_loss": smooth,
                "val_loss": val, "val_bits": None if val is None else val / math.log(2),
                "chars_per_s": round(cps, 1), "elapsed_s": round(st.elapsed, 2)}
        try:
            with self.workers.writing():
                append_line(self.metrics_path, json.dumps(line) + "\n")
        except OSError as e:
            raise CharrnnError(f"could not write {self.metrics_path}: {e.strerror or e} "
                               f"(checkpoints up to step {st.step} are saved)") from None
        if val is not None:
            rep.message(f"step {st.step}: val {val:.4f} nats/char ({val / math.log(2):.4f} bits/char)"
                        + (" *best*" if improved else ""))
        if self.cfg.patience is not None and st.bad_evals >= self.cfg.patience:
            return f"no improvement in {self.cfg.patience} validations", st.__dict__.copy()
        return None, st.__dict__.copy()
