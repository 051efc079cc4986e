"""Setting a run up, apart from running it: a new run (`new_run`) or the continuation of one
(`resume_run`). Each checks everything that can refuse the input before a run directory exists or
changes, reads the corpus once, and returns a `Prepared`: the run record (run.py) and the objects
the loop (train.Trainer) needs.

Not here: the loop itself (train.py), the meta record's format (run.py), the sizing and budget
policy (budget.py), fine-tuning's rules (finetune.py), the token file (data).
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass, replace

import numpy as np

from charrnn import budget, checkpoint, finetune, precision, threads
from charrnn.config import TrainConfig
from charrnn.data import (TOKENS_FILE, BatchStream, TokenFile, build_token_file, capped_vocab, check_sizes, compact_dtype,
                          open_token_file, read_corpus, remove_stale_token_temps, total_tokens)
from charrnn.errors import CharrnnError, DataError, UsageError
from charrnn.model import Model, ModelConfig, approx_params
from charrnn.optim import make_optimizer
from charrnn.precompile import Precompile
from charrnn.progress import note
from charrnn.rundir import RunDir, check_run_files, holds_run, new_identity, open_new, read_identity
from charrnn.run import CorpusRef, Run, optimizer_steps

LARGE_VOCAB = 2000  # tokens: above this a note says what the decoder costs (decoder_share: 40% of a 2x256 LSTM step at 2,003)


@dataclass
class Prepared:
    """A run set up and ready for the loop: the record, and the objects built from it."""

    record: Run
    model: Model  # the parameters (initialised, fine-tuned from a parent, or resumed)
    opt: object  # optim.Optimizer, its moments and step count loaded on resume
    tokens: TokenFile  # the memory-mapped token file (data)
    out: str  # the run directory
    rundir: RunDir | None = None  # locked by this process (None on the workers that write nothing)
    carried: tuple | None = None  # (h, c) (L, B, H): the state carried into the next batch (resume)
    averaged: np.ndarray | None = None  # the average of the weights so far (resume with --average)
    extra_minutes: float | None = None  # resume --minutes: this process's budget
    precompile: Precompile | None = None  # the kernels compiling in the background meanwhile
    precision_pending: bool = False  # --precision auto to be measured on the first batch

    def close(self):
        """Give the run directory back: removed if this run made it and saved nothing, unlocked."""
        if self.rundir is not None:
            self.rundir.discard_if_unused()
            self.rundir = None


# ---------------------------------------------------------------------------------- a new run
def new_run(paths, cfg: TrainConfig, out: str | None, quiet: bool = False, runs_dir: str = "runs", explicit=(),
            dtype=np.float32) -> Prepared:
    """A new run on the corpus at `paths`. With cfg.init_from or cfg.vocab it starts from that
    checkpoint or vocabulary (finetune.py); `explicit` names the options the user gave (the command
    line's), which must then agree with the model (finetune.adopt). `dtype`: of the parameters,
    optimizer and state (float64 for the tests that compare runs exactly)."""
    base = finetune.load_base(cfg)  # None for an ordinary run
    cfg = finetune.adopt(cfg, base, explicit)
    # the precision before the size is known, and the speed a time budget is sized for (choose_size)
    chosen, prec_note = precision.choose(cfg.precision, cfg.hidden)
    speed = precision.speedup(chosen)
    if cfg.hidden is not None:  # a size no checkpoint holds is refused before the corpus is read
        check_loadable(ModelConfig(cell=budget.chosen_cell(cfg, speed), layers=cfg.layers, hidden=cfg.hidden,
                                   vocab_size=4, nonlinearity=cfg.nonlinearity), cfg.batch)
    threads.set_threads(cfg.threads)
    early = Precompile(cfg, budget.chosen_cell(cfg, speed), ("fp32", "bf16") if chosen == "measure" else (chosen,))
    if prec_note:
        note(quiet, prec_note)
    corpus = read_corpus(paths, cfg.encoding, cfg.docs, cfg.max_input)  # one reading: hash, counts, vocabulary
    try:
        prep = _new(cfg, out, quiet, runs_dir, corpus, base, np.dtype(dtype), speed)
    finally:
        corpus.close()  # stdin's spool
    prep.precompile = early
    return prep


def _new(cfg: TrainConfig, out: str | None, quiet: bool, runs_dir: str, corpus, base, dtype, speed: float) -> Prepared:
    if cfg.docs is not None and corpus.doc_count == 0:
        raise DataError("the corpus holds no documents")
    vocab, capped, plan = _choose_vocab(cfg, corpus, base)
    n_train = int(corpus.chars * (1 - cfg.val_frac))
    fitted = budget.choose_size(cfg, n_train, speed)
    chosen, _ = precision.choose(cfg.precision, fitted.hidden)
    fitted = replace(fitted, precision="fp32" if chosen == "measure" else chosen)
    mcfg = ModelConfig(cell=fitted.cell, layers=cfg.layers, hidden=fitted.hidden, vocab_size=vocab.size,
                       nonlinearity=cfg.nonlinearity, dropout=fitted.dropout)
    check_loadable(mcfg, cfg.batch)
    model = _initial_model(cfg, mcfg, base, vocab, dtype)
    if out is not None:  # said before the corpus is encoded; checked again under the lock
        _check_not_a_run(out)
        _check_foreign_log(out)
    opt = make_optimizer(cfg.optimizer, model.n_params, model.dtype, cfg.lr)
    # everything that can reject the input happens before the directory exists
    check_sizes(corpus, cfg.val_frac, cfg.batch, cfg.seq)
    token_bytes = total_tokens(corpus, cfg.val_frac) * np.dtype(compact_dtype(vocab.size)).itemsize
    rundir = RunDir.claim_new(out) if out is not None else RunDir.claim_default(os.path.join(runs_dir, corpus.name))
    try:
        _check_foreign_log(rundir.path)  # again, under the lock
        _check_out_dir(rundir.path, need_bytes=4 * model.n_params * 4 * 3 + token_bytes)
        checkpoint.remove_stale_temps(rundir.path)
        remove_stale_token_temps(rundir.path)
        tokens = build_token_file(corpus, vocab, cfg.val_frac, os.path.join(rundir.path, TOKENS_FILE))
        run_id = new_identity(rundir.path)
    except BaseException:
        rundir.discard_if_unused()
        raise
    n_val = 0 if tokens.val is None else len(tokens.val) - 1
    fitted = replace(fitted, val_chars=budget.val_chars_for(cfg, n_val))
    lineage = finetune.record(base, plan, cfg.unknown) if base is not None else None
    run = Run(cfg, fitted, vocab, mcfg, CorpusRef.of(corpus), lineage=lineage, run_id=run_id, dtype=str(model.dtype))
    _new_run_notes(quiet, cfg, corpus, capped, plan, base, tokens, mcfg, model.n_params, n_train)
    return Prepared(run, model, opt, tokens, rundir.path, rundir, precision_pending=chosen == "measure")


def _choose_vocab(cfg: TrainConfig, corpus, base):
    """The run's vocabulary: the corpus's (capped by --max-vocab), or the given one with the text's
    other characters as --unknown says. Returns (vocab, capped or None, finetune plan or None)."""
    if base is None:
        capped = capped_vocab(corpus, cfg.max_vocab)
        return (corpus.vocab if capped is None else capped.vocab), capped, None
    plan = finetune.plan_vocab(base, corpus.vocab.chars, cfg.unknown, base.what)
    return plan.vocab, None, plan


def _initial_model(cfg: TrainConfig, mcfg: ModelConfig, base, vocab, dtype) -> Model:
    """Fine-tuning: the parent's weights; else a new initialisation (drawn in float32, whatever
    `dtype` the run computes in, so a float64 run starts where the float32 one does)."""
    if base is not None and base.model is not None:
        model = finetune.transplant(base.model, base.vocab, vocab, mcfg, cfg.seed)
    else:
        model = Model(mcfg).init(cfg.seed, forget_bias=cfg.forget_bias)  # only a cell with a forget gate has one
    if model.dtype != dtype:
        model = Model(mcfg, dtype=dtype, theta=model.theta.astype(dtype))
    return model


def _new_run_notes(quiet, cfg, corpus, capped, plan, base, tokens, mcfg, n_params: int, n_train: int):
    """What a new run says before it starts: where it started from, the vocabulary's cost, a model
    too large for its text."""
    if base is not None:
        for line in plan.notes + [finetune.docs_note(base, cfg.docs)]:
            if line:
                note(quiet, line)
        if plan.missing and cfg.unknown == "unk":
            n_unk = finetune.count_unk(tokens.ids)
            note(quiet, f"note: {n_unk:,} of the text's {corpus.chars:,} characters ({n_unk / max(corpus.chars, 1):.3%}) "
                        "are <UNK>")
    for line in _vocab_notes(corpus, capped, mcfg):
        note(quiet, line)
    if n_params > 2 * n_train:
        note(quiet, f"warning: the model has {n_params:,} parameters for {n_train:,} training characters; "
                    "expect overfitting (consider a smaller --hidden or --layers, or more --dropout)")


# ---------------------------------------------------------------------------------- resuming
def resume_run(run_dir: str, steps=None, epochs=None, minutes=None, quiet=False, threads_n=None) -> Prepared:
    """The run in `run_dir`, from its last.npz, to continue exactly where it stopped; `steps`,
    `epochs` (a new budget replacing the old) and `minutes` (more time), and `threads_n`, are what
    may change."""
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
        return _resume(rundir, path, steps, epochs, minutes, quiet, threads_n)
    except BaseException:
        rundir.release()
        raise


def _resume(rundir: RunDir, path: str, steps, epochs, minutes, quiet, threads_n) -> Prepared:
    run_dir = rundir.path
    ck = checkpoint.load(path, with_arrays=True)
    identity = _check_identity(run_dir, path, ck.meta)
    run = Run.from_meta(ck.meta, ck.vocab, ck.model.cfg, path)
    run.run_id = identity
    if "-" in run.corpus.paths:
        raise CharrnnError("cannot resume a run trained on stdin: the corpus cannot be read again")
    if run.fitted.precision == "bf16" and precision.backend() is None:
        note(quiet, "note: the run trained with bf16 products, which this CPU does not have; it goes on in float32")
        run.fitted = replace(run.fitted, precision="fp32")
    threads.set_threads(threads_n if threads_n is not None else run.given.threads)
    early = Precompile(run.config, ck.model.cfg.cell, (run.fitted.precision,))
    tokens = _resumed_tokens(run, run_dir, ck.vocab, quiet)
    if steps is not None or epochs is not None:
        # a new budget replaces the old one, the default budget included
        run.given = replace(run.given, steps=steps, epochs=epochs, minutes=None)
        run.fitted = replace(run.fitted, epochs=None)
    if threads_n is not None:
        run.given = replace(run.given, threads=threads_n)
    opt = run.make_optimizer(ck.model.n_params, ck.model.dtype)
    bufs = {key: _load_flat(ck, path, f"optim.{key}.", np.zeros(ck.model.n_params, ck.model.dtype),
                            "optimizer state") for key in opt.state_buffers()}
    opt.load_state(bufs, optimizer_steps(ck.meta, path))
    h, c = ck.arrays.get("train.h"), ck.arrays.get("train.c")
    mcfg = ck.model.cfg
    if h is None or c is None or h.shape != (mcfg.layers, run.config.batch, mcfg.hidden):
        raise CharrnnError(f"{path}: cannot resume: carried training state missing")
    averaged = None
    if run.config.average != "off":
        averaged = _load_flat(ck, path, "avg.", np.zeros(ck.model.n_params, ck.model.dtype), "averaged weights")
    checkpoint.remove_stale_temps(run_dir)
    if run.state.pos >= BatchStream(tokens.train, run.config.batch).S:
        raise CharrnnError(f"{path}: cannot resume: data position beyond the corpus")
    return Prepared(run, ck.model, opt, tokens, run_dir, rundir, (h, c), averaged, minutes, early)


def _resumed_tokens(run: Run, run_dir: str, vocab, quiet: bool) -> TokenFile:
    """The run's token file if it matches the corpus, read again (and checked: it must not have
    changed); else (a run from before token files, or a damaged one) built again."""
    given, paths = run.given, list(run.corpus.paths)
    corpus = read_corpus(paths, given.encoding, given.docs, given.max_input)  # in chunks, as a new run
    try:
        if corpus.sha256 != run.corpus.sha256:
            raise CharrnnError(f"cannot resume: the corpus {', '.join(paths)} changed since the run started")
        if given.init_from is not None or given.vocab is not None:
            # a given vocabulary (fine-tuned, extended, shared): the one the run recorded
            finetune.check_resume_vocab(corpus.vocab.chars, vocab, given.unknown, os.path.join(run_dir, "last.npz"))
        else:
            capped = capped_vocab(corpus, given.max_vocab)
            if (corpus.vocab if capped is None else capped.vocab) != vocab:
                raise CharrnnError("cannot resume: the corpus's characters differ from the checkpoint's vocabulary")
        token_path = os.path.join(run_dir, TOKENS_FILE)
        remove_stale_token_temps(run_dir)
        why = []
        tokens = open_token_file(token_path, corpus, vocab, given.val_frac, notes=why)
        for line in why:
            note(quiet, line)
        if tokens is None:
            tokens = build_token_file(corpus, vocab, given.val_frac, token_path)
    finally:
        corpus.close()
    return tokens


def _load_flat(ck, path: str, prefix: str, flat: np.ndarray, what: str) -> np.ndarray:
    """Fill a flat buffer in the parameters' layout (optimizer moments, averaged weights) from the
    checkpoint members `prefix` + each parameter's name; a missing or misshapen one refuses resume."""
    view = Model(ck.model.cfg, dtype=flat.dtype, theta=flat).params
    for pname in view.views:
        arr = ck.arrays.get(f"{prefix}{pname}")
        if arr is None or arr.shape != view[pname].shape:
            raise CharrnnError(f"{path}: cannot resume: {what} {prefix}{pname} missing or wrong")
        view[pname][...] = arr
    return flat


# ---------------------------------------------------------------------------------- checks
def check_loadable(mcfg: ModelConfig, batch: int):
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


def _check_not_a_run(out: str):
    """--out must not hold a run already (a live one there is named first)."""
    if holds_run(out):
        RunDir.lock(out).release()
        raise UsageError(f"{out} already holds a run; continue it with --resume {shlex.quote(out)} or choose "
                         "another --out")


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
    yet and gets one with its next save (Keeper.save_last)."""
    from charrnn.run import Recorded

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
            differ = ids[0] != ids[1] if all(ids) else Recorded(other).lineage_key() != Recorded(meta).lineage_key()
            if differ:
                raise CharrnnError(f"{path} and {best} are from different runs (their identity, corpus, model or "
                                   "seed differ): one was copied in from elsewhere; put the run's own last.npz back")
    if carried:
        return new_identity(run_dir, carried)  # run.json lost: restored
    return None
