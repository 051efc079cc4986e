"""`charrnn train`: its options, and the run: one process, or this process's part of an MPI job.

The options declare their ranges from config.TRAIN_BOUNDS and their defaults from config.DEFAULTS;
TrainConfig checks the same again, so a library caller gets the command line's errors.
"""

from __future__ import annotations

import functools
import os
import shlex
import sys

import click

from charrnn.cli.exits import handle_errors
from charrnn.cli.options import (count_or_all, finite, flag, ints, max_input_option, quiet_option, seed_option,
                                 threads_option, val_chars)
from charrnn.config import (AVERAGES, CELLS, CLIP_MODES, DEFAULTS, DOC_MODES, DROPOUT_MODES, NONLINEARITIES, OPTIMIZERS,
                            PRECISIONS, RESUME_OPTIONS, SCHEDULES, TRAIN_BOUNDS, UNKNOWN_MODES, spelled)

EPILOG_TRAIN = "Example: charrnn train corpora/markov.txt --minutes 2"


@click.command(epilog=EPILOG_TRAIN)
@click.argument("corpus", nargs=-1, type=str)
@click.option("--out", type=str, default=None, metavar="DIR", help="Run directory. Default: runs/<corpus file stem> (a new one if that holds a run).")
@click.option("--resume", type=str, default=None, metavar="DIR", help="Continue the run in DIR from its last.npz (corpus and options come from it).")
@click.option("--cell", type=click.Choice(CELLS), default=DEFAULTS.cell,
              help="Recurrent cell (default: lstm; gru for --minutes 10 or less, where it learns faster).")
@click.option("--nonlinearity", type=click.Choice(NONLINEARITIES), default=DEFAULTS.nonlinearity, help="For --cell rnn.")
@click.option("--layers", type=ints(TRAIN_BOUNDS["layers"]), default=DEFAULTS.layers, help="Stacked recurrent layers.")
@click.option("--hidden", type=ints(TRAIN_BOUNDS["hidden"]), default=None, help="Units per layer. Default: chosen from the corpus size and time budget.")
@click.option("--dropout", type=finite(TRAIN_BOUNDS["dropout"]), default=None, help="Dropout on each layer's output. Default: from the epochs the budget allows and the parameters per character (fitted once a --minutes run knows its speed).")
@click.option("--dropout-mode", type=click.Choice(DROPOUT_MODES), default=DEFAULTS.dropout_mode,
              help="step: a new dropout mask at every time step; locked: one mask per stream for the whole batch "
                   "(variational dropout).")
@click.option("--weight-drop", type=finite(TRAIN_BOUNDS["weight_drop"]), default=DEFAULTS.weight_drop, metavar="P",
              help="DropConnect on every layer's hidden-to-hidden weights, one mask per batch (e.g. --weight-drop 0.2). "
                   "Default: 0.3 when the budget lets the model see each character often enough to memorise it "
                   "(then with --dropout at most 0.2), else 0.")
@click.option("--average", type=click.Choice(AVERAGES), default=DEFAULTS.average,
              help="Validate, and keep as best.npz, an average of the weights: ema (exponential moving average) or "
                   "polyak (the mean from the start of the learning rate's decay).")
@click.option("--avg-decay", type=finite(TRAIN_BOUNDS["avg_decay"]), default=DEFAULTS.avg_decay, metavar="D",
              help="--average ema: the average spans at most about 1/(1-D) updates.")
@click.option("--batch", type=ints(TRAIN_BOUNDS["batch"]), default=DEFAULTS.batch, help="Parallel streams per step (B).")
@click.option("--seq", type=ints(TRAIN_BOUNDS["seq"]), default=DEFAULTS.seq, help="Backprop-through-time steps per update (T).")
@click.option("--seq-warmup", type=ints(TRAIN_BOUNDS["seq_warmup"]), default=DEFAULTS.seq_warmup, metavar="STEPS", help="Grow T from 8 to --seq over this many steps (0: off).")
@click.option("--lr", type=finite(TRAIN_BOUNDS["lr"]), default=DEFAULTS.lr, help="Peak learning rate.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=DEFAULTS.optimizer, help="Optimizer.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=DEFAULTS.schedule,
              help="Learning-rate schedule. auto: wsd fitted to a --minutes budget, else constant. cosine and wsd "
                   "(constant, then a linear decay over the last 20%) need --decay-steps.")
@click.option("--warmup", type=ints(TRAIN_BOUNDS["warmup"]), default=DEFAULTS.warmup, metavar="STEPS", help="Linear learning-rate warm-up.")
@click.option("--decay-every", type=ints(TRAIN_BOUNDS["decay_every"]), default=DEFAULTS.decay_every, metavar="STEPS", help="Step schedule: decay interval.")
@click.option("--decay-factor", type=finite(TRAIN_BOUNDS["decay_factor"]), default=DEFAULTS.decay_factor, help="Step schedule: decay factor.")
@click.option("--decay-steps", type=ints(TRAIN_BOUNDS["decay_steps"]), default=None, metavar="STEPS", help="Length of a cosine or wsd schedule.")
@click.option("--clip", type=finite(TRAIN_BOUNDS["clip"]), default=DEFAULTS.clip, help="Gradient clipping threshold (0: off).")
@click.option("--clip-mode", type=click.Choice(CLIP_MODES), default=DEFAULTS.clip_mode, help="Clip the global norm, or each value.")
@click.option("--epochs", type=finite(TRAIN_BOUNDS["epochs"]), default=None, help="Stop after this many passes over the text (default 10 if no budget is given).")
@click.option("--minutes", type=finite(TRAIN_BOUNDS["minutes"]), default=None, help="Stop after this much wall-clock time (with --resume: additional time).")
@click.option("--steps", type=ints(TRAIN_BOUNDS["steps"]), default=None, help="Stop after this many updates in total.")
@click.option("--val-frac", type=finite(TRAIN_BOUNDS["val_frac"]), default=DEFAULTS.val_frac, help="Fraction of the text (its end) held out for validation.")
@click.option("--val-chars", type=str, default=None, metavar="N|all", callback=lambda ctx, p, v: val_chars(v),
              help="Held-out characters scored at each validation, from the start of the split "
                   "(default: all of it up to 200,000; charrnn eval scores any text whole).")
@click.option("--max-vocab", type=str, default=str(DEFAULTS.max_vocab), metavar="N|all",
              callback=lambda ctx, p, v: count_or_all(v, "characters"),
              help="Keep the N most frequent characters, the rest become <UNK> (the decoder's work grows "
                   "with the vocabulary).")
@click.option("--docs", type=click.Choice(DOC_MODES), default=None, help="Documents: one per line, or separated by blank lines.")
@click.option("--eval-every", type=ints(TRAIN_BOUNDS["eval_every"]), default=None, metavar="STEPS", help="Steps between validations (default: about once per epoch, 200-2000).")
@click.option("--patience", type=ints(TRAIN_BOUNDS["patience"]), default=None, help="Stop after this many validations without improvement.")
@click.option("--forget-bias", type=finite(TRAIN_BOUNDS["forget_bias"]), default=DEFAULTS.forget_bias,
              help="LSTM forget-gate bias at initialisation (the gate saturates long before 100).")
@click.option("--encoding", type=str, default=None, help="Text encoding of the corpus (default: strict UTF-8).")
@click.option("--init-from", type=str, default=None, metavar="MODEL",
              help="Fine-tune: start from MODEL's weights, cell, size and vocabulary (a checkpoint, or a run directory "
                   "meaning its best.npz) with a fresh optimizer and schedule; options that contradict its size are "
                   "refused. E.g. charrnn train new.txt --init-from runs/shakespeare --unknown extend --minutes 5")
@click.option("--vocab", type=str, default=None, metavar="MODEL|FILE",
              help="Train a new model over a given vocabulary, so models share it and their scores compare: a "
                   "checkpoint, a run directory, or a JSON file such as a run's tokens.json. "
                   "E.g. charrnn train b.txt --vocab runs/a --unknown unk")
@click.option("--unknown", type=click.Choice(UNKNOWN_MODES), default=DEFAULTS.unknown,
              help="With --init-from or --vocab, characters of the text outside that vocabulary: error lists them "
                   "and stops (nothing changes a vocabulary unasked), unk reads them as <UNK>, extend adds them to "
                   "the model (--init-from only). E.g. --init-from runs/a --unknown extend")
@seed_option(DEFAULTS.seed, "Seed for initialisation and dropout.")
@max_input_option
@threads_option
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULTS.precision,
              help="The training step's matrix products: fp32, or bf16 (bfloat16 operands, float32 sums; weights, "
                   "optimizer, cell state and loss stay float32) where the CPU has AMX or AVX512_BF16. auto: bf16 "
                   "where it is faster (AMX; with AVX512_BF16 alone, timed on the first batch), else fp32. "
                   "A --minutes budget sizes its model for the speed (bf16 on AMX trains ~2.5x faster). "
                   "Validation, eval and sampling are float32 whatever trains the model.")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train with N worker processes over MPI (needs charrnn[mpi]); --batch is split among them and "
                   "--threads counts per worker (default: the cores divided among the workers).")
@quiet_option
@handle_errors
def train(corpus, out, resume, quiet, workers, **opts):
    """Train a model on CORPUS (one or more text files; - for stdin)."""
    # interruptible from the start (handle_errors' signals.Raising); the run defers signals once it
    # has something to save
    _train(corpus, out, resume, quiet, workers, **opts)


def _train(corpus, out, resume, quiet, workers, **opts):
    from charrnn import parallel
    from charrnn.errors import UsageError

    size = parallel.world_size()  # > 1: this is one of the workers of an MPI job (nothing imported to know)
    if size == 1 and workers is not None and workers > 1:
        sys.exit(parallel.launch(workers, sys.argv[1:], None if resume else opts["batch"], corpus, opts["max_input"]))
    if size > 1 and workers is not None and workers != size:
        raise UsageError(f"--workers {workers}, but mpiexec started {size} processes")
    make = functools.partial(_set_up, corpus, out, resume, opts=opts)
    if size == 1:
        from charrnn.train import Trainer

        result = Trainer(make(quiet), quiet).run()
    else:
        result = parallel.run(make, quiet)  # None on the workers other than rank 0
        if result is None:
            return
    _report(result, quiet)


def _set_up(corpus, out, resume, quiet, opts):
    """The run to train (setup.Prepared): resumed from --resume DIR, or new on CORPUS."""
    from charrnn.config import TrainConfig
    from charrnn.errors import UsageError
    from charrnn.setup import new_run, resume_run

    if resume:
        if corpus:
            raise UsageError("--resume takes the corpus from the run; do not give CORPUS too")
        if out is not None:
            raise UsageError("--resume continues the run in its own directory: drop --out (to start a new run "
                             "from it elsewhere, copy the directory first)")
        ctx = click.get_current_context()
        changed = [k for k in opts if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
                   and k not in RESUME_OPTIONS]
        if changed:
            raise UsageError(f"with --resume only {spelled((flag(k) for k in RESUME_OPTIONS), 'and')} may be given "
                             f"(options come from the run): {', '.join(flag(k) for k in changed)}")
        return resume_run(resume, steps=opts["steps"], epochs=opts["epochs"], minutes=opts["minutes"], quiet=quiet,
                          threads_n=opts["threads"])
    else:
        if not corpus:
            raise UsageError("give a corpus file (or - for stdin), or --resume DIR")
        cfg = TrainConfig(**opts)
        ctx = click.get_current_context()
        explicit = [k for k in opts if ctx.get_parameter_source(k) not in (None, click.core.ParameterSource.DEFAULT)]
    return new_run(corpus, cfg, out, quiet=quiet, explicit=explicit)


def _report(result: dict, quiet: bool):
    if not quiet:
        import math

        best = result["best_val"]
        click.echo(f"done: {result['stop'] or 'finished'} after {result['step']} steps, "
                   f"{result['chars_per_s']:,.0f} chars/s", err=True)
        if math.isfinite(best):
            click.echo(f"best validation loss {best:.4f} nats/char ({best / math.log(2):.4f} bits/char)", err=True)
        click.echo(f"model: {os.path.join(result['out'], 'best.npz')}", err=True)
        click.echo(f"sample from it: charrnn sample --model {shlex.quote(result['out'])}", err=True)
