"""The command line: `charrnn train`, `charrnn sample`, `charrnn eval`, `charrnn info`.

Thin on purpose: parse options, call the library, report. Results (samples, scores) go to stdout;
everything else (progress, notes, errors) to stderr. Errors are one line and an exit status:
1 a failed operation, 2 bad usage, 130 / 143 after SIGINT / SIGTERM. Heavy imports (numpy, numba)
happen inside the commands so `--help` stays fast.

Every numeric option is range-checked by Click from the tables in config.py (floats through
Finite, which also refuses NaN and inf), and a stdout that is closed or fails (a full disk) is a
one-line error, while a reader that goes away (`| head`) ends the program quietly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import sys

import click

from charrnn import __version__
from charrnn.config import (BEAM_MAX, DEFAULTS, PRECISIONS, PRIME_MAX_BYTES, SAMPLE_BOUNDS, SAMPLE_HELD_MAX, SEED_LIMIT,
                            TRAIN_BOUNDS, format_size)
from charrnn.errors import CharrnnError

EPILOG_TRAIN = "Example: charrnn train corpora/markov.txt --minutes 2"
EPILOG_SAMPLE = """\b
Example: charrnn sample --temp 0.8 --length 500 | head -n 20
         charrnn sample --beam 8 --length 200 --num 3
         charrnn sample --prime-file intro.txt --stop $'\\n\\n' --format jsonl | jq .logprob"""
EPILOG_EVAL = "Example: charrnn eval sonnets.txt --json"


def _one_line(text: str) -> str:
    """`text` with its control characters and line separators escaped (\\n, \\x1b ...): an error is
    one line, whatever a file name holds, and cannot move a terminal's cursor."""
    import unicodedata

    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)


def _fail(message: str, code: int):
    try:
        click.echo(f"charrnn: error: {_one_line(message)}", err=True)  # silent when stderr is closed
    except OSError:
        pass  # stderr fails too: the exit status still says it
    sys.exit(code)


def _quiet_exit_on_broken_pipe():
    """The reader went away (`| head`): stop quietly with status 0, and keep Python's final flush
    of stdout from complaining."""
    _discard_stdout()
    sys.exit(0)


def _discard_stdout():
    """Point stdout's file descriptor at /dev/null, so Python's final flush of what is still
    buffered neither fails nor complains after the real stdout went away."""
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real descriptor (a test's stream), or none at all
        pass


class ResultsOut:
    """stdout, for results (samples, scores). Closed (`>&-`, so Python has no sys.stdout) or
    failing (`> /dev/full`), it raises a CharrnnError: one line on stderr and exit status 1
    instead of a traceback. A reader that went away raises BrokenPipeError as before, which
    handle_errors turns into a quiet exit 0. Made at the start of a command, so a closed stdout
    is found before any work is done."""

    def __init__(self):
        if sys.stdout is None or getattr(sys.stdout, "closed_by_shell", False):
            raise CharrnnError("cannot write to stdout: it is closed")
        self.stream = sys.stdout

    def write(self, text: str):
        self._guard(self.stream.write, text)

    def flush(self):
        self._guard(self.stream.flush)

    @staticmethod
    def _guard(op, *args):
        try:
            op(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            _discard_stdout()
            raise CharrnnError(f"cannot write to stdout: {e.strerror or e}") from None


def handle_errors(fn):
    """Map charrnn's exceptions to a one-line message and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from charrnn.signals import Raising

        try:
            with Raising():  # SIGTERM as SIGINT: one line and its status (143), not a silent death
                return fn(*args, **kwargs)
        except CharrnnError as e:
            _fail(str(e), e.exit_code)
        except BrokenPipeError:
            _quiet_exit_on_broken_pipe()
        except KeyboardInterrupt:
            click.echo("charrnn: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            _fail("out of memory; try a smaller model, batch or text", 1)
        except BaseException as e:
            from charrnn.signals import SignalExit

            if isinstance(e, SignalExit):
                click.echo("charrnn: terminated", err=True)
                sys.exit(e.exit_code)
            raise

    return wrapper


class Finite(click.FloatRange):
    """A float option in a range, and finite. Click's FloatRange alone lets NaN through (every
    comparison with NaN is False: `--lr nan` reached the optimizer) and accepts inf; this refuses
    both as a usage error naming the option (exit 2). --help shows the range as FloatRange does."""

    def convert(self, value, param, ctx):
        x = click.types.FloatParamType.convert(self, value, param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(x, param, ctx)


def _finite(bounds) -> Finite:
    """The Click type of a float option with the given config.Bounds (one table for Click and
    the library's own checks)."""
    return Finite(min=bounds.min, max=bounds.max, min_open=bounds.min_open, max_open=bounds.max_open)


def _seed_option(default, help):
    """--seed, shared by train and sample: a whole number in [0, 2**64), the 64 bits the
    generators are seeded with; anything else is a usage error, not an overflow later."""
    return click.option("--seed", type=click.IntRange(0, SEED_LIMIT - 1), default=default, help=help)


def _threads_option(f):
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="Threads for the compiled core (default: every core).")(f)


def _model_option(f):
    return click.option("--model", "model_path", type=str, default=None, metavar="PATH",
                        help="A checkpoint file, or a run directory (its best.npz). Default: the most recent run under ./runs.")(f)


def _max_input_option(f):
    """--max-input SIZE: the most bytes read from the input, so /dev/zero or an endless pipe stops
    with an error instead of filling memory or disk."""
    from charrnn.config import format_size, parse_size

    def parse(ctx, param, value):
        try:
            return parse_size(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return click.option("--max-input", type=str, default=format_size(DEFAULTS.max_input), callback=parse,
                        metavar="SIZE", help="Read at most this many bytes of input (e.g. 500M, 4G, 16G); "
                        "more is an error.")(f)


def _quiet_option(f):
    return click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors.")(f)


def _val_chars(value):
    """--val-chars: a positive count, or "all"."""
    if value is None or value == "all":
        return value
    return _count_or_all(value, "characters")


def _count_or_all(value, what: str):
    """A positive count (1_000 and 1,000 read as 1000), or None for "all"."""
    if value is None or value == "all":
        return None
    try:
        n = int(value.replace("_", "").replace(",", ""))
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"{value!r} is neither a positive number of {what} nor 'all'")
    return n


def _compile_notice(quiet: bool, what: str):
    """A context in which the first compilation of a kernel says so on stderr (first run only)."""
    from charrnn.kernels.jit import compile_notice

    def say():
        if not quiet:
            click.echo(f"charrnn: compiling {what} for this machine (first run only) ...", err=True)

    return compile_notice(say)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="charrnn")
def cli():
    """Character-level language models (LSTM, GRU, RNN) on the command line.

    Train on a text file, then generate text in its style, or score other text.

    \b
      charrnn train shakespeare.txt
      charrnn sample --temp 0.8 | head -n 20
      charrnn eval sonnets.txt --json
    """


# ------------------------------------------------------------------------------------------ train
@cli.command(epilog=EPILOG_TRAIN)
@click.argument("corpus", nargs=-1, type=str)
@click.option("--out", type=str, default=None, metavar="DIR", help="Run directory. Default: runs/<corpus file stem> (a new one if that holds a run).")
@click.option("--resume", type=str, default=None, metavar="DIR", help="Continue the run in DIR from its last.npz (corpus and options come from it).")
@click.option("--cell", type=click.Choice(["lstm", "gru", "rnn"]), default=DEFAULTS.cell,
              help="Recurrent cell (default: lstm; gru for --minutes 10 or less, where it learns faster).")
@click.option("--nonlinearity", type=click.Choice(["tanh", "relu"]), default=DEFAULTS.nonlinearity, help="For --cell rnn.")
@click.option("--layers", type=click.IntRange(min=1, max=TRAIN_BOUNDS["layers"].max), default=DEFAULTS.layers, help="Stacked recurrent layers.")
@click.option("--hidden", type=click.IntRange(min=1, max=TRAIN_BOUNDS["hidden"].max), default=None, help="Units per layer. Default: chosen from the corpus size and time budget.")
@click.option("--dropout", type=_finite(TRAIN_BOUNDS["dropout"]), default=None, help="Dropout on each layer's output. Default: from the epochs the budget allows and the parameters per character (fitted once a --minutes run knows its speed).")
@click.option("--dropout-mode", type=click.Choice(["step", "locked"]), default=DEFAULTS.dropout_mode,
              help="step: a new dropout mask at every time step; locked: one mask per stream for the whole batch "
                   "(variational dropout).")
@click.option("--weight-drop", type=_finite(TRAIN_BOUNDS["weight_drop"]), default=DEFAULTS.weight_drop, metavar="P",
              help="DropConnect on every layer's hidden-to-hidden weights, one mask per batch (e.g. --weight-drop 0.2). "
                   "Default: 0.3 when the budget lets the model see each character often enough to memorise it "
                   "(then with --dropout at most 0.2), else 0.")
@click.option("--average", type=click.Choice(["off", "ema", "polyak"]), default=DEFAULTS.average,
              help="Validate, and keep as best.npz, an average of the weights: ema (exponential moving average) or "
                   "polyak (the mean from the start of the learning rate's decay).")
@click.option("--avg-decay", type=_finite(TRAIN_BOUNDS["avg_decay"]), default=DEFAULTS.avg_decay, metavar="D",
              help="--average ema: the average spans at most about 1/(1-D) updates.")
@click.option("--batch", type=click.IntRange(min=1, max=TRAIN_BOUNDS["batch"].max), default=DEFAULTS.batch, help="Parallel streams per step (B).")
@click.option("--seq", type=click.IntRange(min=1), default=DEFAULTS.seq, help="Backprop-through-time steps per update (T).")
@click.option("--seq-warmup", type=click.IntRange(min=0), default=DEFAULTS.seq_warmup, metavar="STEPS", help="Grow T from 8 to --seq over this many steps (0: off).")
@click.option("--lr", type=_finite(TRAIN_BOUNDS["lr"]), default=DEFAULTS.lr, help="Peak learning rate.")
@click.option("--optimizer", type=click.Choice(["adam", "rmsprop", "sgd"]), default=DEFAULTS.optimizer, help="Optimizer.")
@click.option("--schedule", type=click.Choice(["auto", "constant", "step", "cosine", "wsd"]), default=DEFAULTS.schedule,
              help="Learning-rate schedule. auto: wsd fitted to a --minutes budget, else constant. cosine and wsd "
                   "(constant, then a linear decay over the last 20%) need --decay-steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=DEFAULTS.warmup, metavar="STEPS", help="Linear learning-rate warm-up.")
@click.option("--decay-every", type=click.IntRange(min=1), default=DEFAULTS.decay_every, metavar="STEPS", help="Step schedule: decay interval.")
@click.option("--decay-factor", type=_finite(TRAIN_BOUNDS["decay_factor"]), default=DEFAULTS.decay_factor, help="Step schedule: decay factor.")
@click.option("--decay-steps", type=click.IntRange(min=1), default=None, metavar="STEPS", help="Cosine schedule length.")
@click.option("--clip", type=_finite(TRAIN_BOUNDS["clip"]), default=DEFAULTS.clip, help="Gradient clipping threshold (0: off).")
@click.option("--clip-mode", type=click.Choice(["norm", "value"]), default=DEFAULTS.clip_mode, help="Clip the global norm, or each value.")
@click.option("--epochs", type=_finite(TRAIN_BOUNDS["epochs"]), default=None, help="Stop after this many passes over the text (default 10 if no budget is given).")
@click.option("--minutes", type=_finite(TRAIN_BOUNDS["minutes"]), default=None, help="Stop after this much wall-clock time (with --resume: additional time).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Stop after this many updates in total.")
@click.option("--val-frac", type=_finite(TRAIN_BOUNDS["val_frac"]), default=DEFAULTS.val_frac, help="Fraction of the text (its end) held out for validation.")
@click.option("--val-chars", type=str, default=None, metavar="N|all", callback=lambda ctx, p, v: _val_chars(v),
              help="Held-out characters scored at each validation, from the start of the split "
                   "(default: all of it up to 200,000; charrnn eval scores any text whole).")
@click.option("--max-vocab", type=str, default=str(DEFAULTS.max_vocab), metavar="N|all",
              callback=lambda ctx, p, v: _count_or_all(v, "characters"),
              help="Keep the N most frequent characters, the rest become <UNK> (the decoder's work grows "
                   "with the vocabulary).")
@click.option("--docs", type=click.Choice(["line", "blank"]), default=None, help="Documents: one per line, or separated by blank lines.")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, metavar="STEPS", help="Steps between validations (default: about once per epoch, 200-2000).")
@click.option("--patience", type=click.IntRange(min=1), default=None, help="Stop after this many validations without improvement.")
@click.option("--forget-bias", type=_finite(TRAIN_BOUNDS["forget_bias"]), default=DEFAULTS.forget_bias,
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
@click.option("--unknown", type=click.Choice(["error", "unk", "extend"]), default=DEFAULTS.unknown,
              help="With --init-from or --vocab, characters of the text outside that vocabulary: error lists them "
                   "and stops (nothing changes a vocabulary unasked), unk reads them as <UNK>, extend adds them to "
                   "the model (--init-from only). E.g. --init-from runs/a --unknown extend")
@_seed_option(DEFAULTS.seed, "Seed for initialisation and dropout.")
@_max_input_option
@_threads_option
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default=DEFAULTS.precision,
              help="The training step's matrix products: fp32, or bf16 (bfloat16 operands, float32 sums; weights, "
                   "optimizer, cell state and loss stay float32) where the CPU has AMX or AVX512_BF16. auto: bf16 "
                   "where it is faster (AMX; with AVX512_BF16 alone, timed on the first batch), else fp32; "
                   "fp32 for --minutes budgets, whose model size is fitted to float32's speed. "
                   "Validation, eval and sampling are float32 whatever trains the model.")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train with N worker processes over MPI (needs charrnn[mpi]); --batch is split among them and "
                   "--threads counts per worker (default: the cores divided among the workers).")
@_quiet_option
@handle_errors
def train(corpus, out, resume, quiet, workers, **opts):
    """Train a model on CORPUS (one or more text files; - for stdin)."""
    from charrnn.signals import Raising

    with Raising():  # interruptible from the start; the run defers signals once it has something to save
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
                   and k not in ("steps", "epochs", "minutes", "threads", "workers")]
        if changed:
            raise UsageError("with --resume only --steps, --epochs, --minutes, --threads and --workers may be given "
                             f"(options come from the run): {', '.join('--' + k.replace('_', '-') for k in changed)}")
        return resume_run(resume, steps=opts["steps"], epochs=opts["epochs"], minutes=opts["minutes"], quiet=quiet,
                          threads_n=opts["threads"])
    else:
        if not corpus:
            raise UsageError("give a corpus file (or - for stdin), or --resume DIR")
        if opts["schedule"] in ("cosine", "wsd") and opts["decay_steps"] is None:
            raise UsageError(f"--schedule {opts['schedule']} needs --decay-steps (the schedule must not depend on the budget, so runs resume exactly)")
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


# ------------------------------------------------------------------------------------------ sample
@cli.command(epilog=EPILOG_SAMPLE)
@_model_option
@click.option("--temp", type=_finite(SAMPLE_BOUNDS["temp"]), default=1.0, help="Softmax temperature (0: greedy).")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample only from the K most likely characters.")
@click.option("--top-p", type=_finite(SAMPLE_BOUNDS["top_p"]), default=None, help="Sample from the smallest set holding probability P (nucleus).")
@click.option("--length", type=click.IntRange(min=0), default=1000,
              help="Characters per sample (0: unbounded, or until the document ends). With --format jsonl, --beam "
                   f"or --num above 1, samples are held until they end: --num x --length (x --beam) at most "
                   f"{SAMPLE_HELD_MAX:,}.")
@click.option("--num", type=click.IntRange(min=1, max=SAMPLE_BOUNDS["num"].max), default=1, help="Number of samples, separated by a newline.")
@click.option("--prime", type=str, default="", help="Text to warm the model up with; printed first.")
@click.option("--prime-file", type=str, default=None, metavar="PATH",
              help="Read the prime from a file (- for stdin): its text exactly, a final newline included, in "
                   f"UTF-8, at most {format_size(PRIME_MAX_BYTES)} bytes. Not with --prime. Example: --prime-file intro.txt")
@click.option("--no-prime-echo", is_flag=True, help="Do not print the prime text.")
@click.option("--unknown", type=click.Choice(["error", "skip", "unk"]), default="error", help="Prime characters the model never saw.")
@click.option("--stop", type=str, default=None, metavar="STRING",
              help="End a sample at the first occurrence of STRING in the generated text; STRING itself is not "
                   "printed. Example: --stop $'\\n\\n' (at a blank line)")
@click.option("--beam", type=click.IntRange(1, BEAM_MAX), default=None, metavar="K",
              help="Beam search of width K instead of sampling: the most probable text found, scored at "
                   "temperature 1 (no --temp, --top-k, --top-p or --length 0); --num N (at most K) gives the N "
                   "best. Printed when the search ends, not streamed. Example: --beam 8 --length 200")
@click.option("--format", "fmt", type=click.Choice(["text", "jsonl"]), default="text",
              help="text: the samples, one per line. jsonl: one JSON object per sample, with text, prime, seed, "
                   "temp, logprob (natural log, at temperature 1, of the text given the prime) and end (length, "
                   "end or stop). Example: --format jsonl | jq -r .text")
@click.option("--corpus", type=str, default=None, metavar="FILE",
              help="The training text, for the copy check (default: the run's tokens.npy when there is one).")
@click.option("--copy-min", type=click.IntRange(min=0), default=20, metavar="N",
              help="Copy check: jsonl records gain longest_copy (the longest span of the sample found verbatim in "
                   "the training text) and copied_frac (the share of its characters in such spans of at least N "
                   "characters). 0: no copy check.")
@click.option("--copy-report", is_flag=True, help="Text mode: each sample's copy check on stderr.")
@_seed_option(None, "Seed for identical output on every run (default: random).")
@_threads_option
@_quiet_option
@handle_errors
def sample(model_path, temp, top_k, top_p, length, num, prime, prime_file, no_prime_echo, unknown, stop, beam, fmt,
           corpus, copy_min, copy_report, seed, threads, quiet):
    """Generate text from a trained model, streamed to stdout (beam search prints each text when
    the search ends)."""
    from charrnn import checkpoint
    from charrnn import threads as th
    from charrnn.errors import UsageError, VocabError
    from charrnn.generate import SampleOptions, prime_tokens, random_seed, sample_pieces

    prime, stop = _text_argument("--prime", prime), _text_argument("--stop", stop)
    _check_sample_options(click.get_current_context(), prime, prime_file, stop, beam, length, num)
    held = _held_chars(fmt, beam, num, length)  # what is held in memory, bounded before any work
    out = ResultsOut()
    path, guessed = checkpoint.resolve(model_path)
    ck = checkpoint.load(path)
    if not quiet:
        cfg = ck.model.cfg
        click.echo(f"charrnn: sampling from {path} ({cfg.cell} {cfg.layers}x{cfg.hidden})", err=True)
    th.set_threads(threads)
    documents = (ck.meta.get("train") or {}).get("docs") is not None
    if fmt == "jsonl" and length == 0 and not documents and stop is None:
        raise UsageError("--format jsonl writes a sample when it ends, and with --length 0 a sample of a model "
                         "trained without --docs never does: give --length N or --stop STRING")
    if held and fmt == "jsonl" and length == 0:  # until the document ends or --stop, within what may be held
        length = SAMPLE_HELD_MAX // num
    if prime_file is not None:
        prime = _read_prime(prime_file)
    if stop is not None and not quiet and ck.vocab.unknown_chars(stop):
        click.echo(f"charrnn: note: --stop {stop!r} holds characters the model never writes, so it never stops a "
                   "sample", err=True)
    try:
        prime_ids = prime_tokens(ck.vocab, prime, unknown)
    except VocabError as e:
        raise UsageError(f"{'--prime-file' if prime_file is not None else '--prime'}: {e} "
                         "(use --unknown skip or --unknown unk to go on anyway)") from None
    echo = prime if (prime and not no_prime_echo) else ""
    copies = _copy_checker(ck, path, corpus, copy_min, fmt == "jsonl" or copy_report, quiet)
    if beam is not None:
        _beam(ck, prime, prime_ids, beam, length, num, documents, stop, fmt, echo, quiet, out, copies)
        return
    seed = seed if seed is not None else random_seed()  # known, so jsonl can say which
    opts = SampleOptions(temp=temp, top_k=top_k or 0, top_p=top_p if top_p is not None else 1.0,
                         length=length, num=num, prime=prime, unknown=unknown, seed=seed, stop=stop)
    pieces = sample_pieces(ck.model, ck.vocab, opts, documents=documents)
    with _compile_notice(quiet, "the sampler"):
        if fmt == "jsonl":
            record = functools.partial(_sample_record, ck.model, ck.vocab, prime, prime_ids, seed, temp, copies)
            _write_jsonl_samples(pieces, record, out)
        else:
            if copy_report and copies is not None:
                pieces = _report_copies(pieces, copies)
            _write_samples(((p.stream, p.text, p.end is not None) for p in pieces), num, echo, out)


def _copy_checker(ck, path, corpus, copy_min, wanted, quiet):
    """sample's copy check: a function text -> {longest_copy, copied_frac}, or None when it is off
    (--copy-min 0, nothing asks for it) or no training text is at hand (the run's tokens.npy, or
    --corpus FILE). Builds the suffix array once, before sampling (copycheck.py)."""
    import os

    from charrnn import copycheck
    from charrnn.errors import UsageError

    if copy_min == 0 or not wanted:
        if corpus is not None:
            raise UsageError("--corpus is for the copy check: give --format jsonl or --copy-report, and --copy-min > 0")
        return None
    if corpus is not None:
        text = _read_corpus(corpus)
        ids = ck.vocab.encode(text, unknown="unk")
        source = corpus
    else:
        run_dir = os.path.dirname(os.path.abspath(path))
        ids = copycheck.training_ids(run_dir, ck.vocab)
        if ids is None:
            if not quiet:
                click.echo("charrnn: note: no copy check: no training text at hand (the run's tokens.npy, or "
                           "--corpus FILE)", err=True)
            return None
        source = os.path.join(run_dir, "tokens.npy")
    index = copycheck.CopyIndex(ids)
    if not quiet:
        click.echo(f"charrnn: copy check against {source}: {len(index):,} tokens indexed in {index.build_s:.1f} s",
                   err=True)

    def check(text: str) -> dict:
        return copycheck.check(index, ck.vocab.encode(text, unknown="unk"), copy_min).to_dict()

    return check


def _read_corpus(path: str) -> str:
    from charrnn.data import read_text
    from charrnn.errors import DataError

    try:
        return read_text(path)
    except DataError as e:
        raise DataError(f"--corpus: {e}") from None


def _report_copies(pieces, copies):
    """Pass the pieces on; as each sample ends, its copy check on stderr."""
    texts = {}
    for p in pieces:
        texts.setdefault(p.stream, []).append(p.text)
        yield p
        if p.end is not None:
            c = copies("".join(texts.pop(p.stream)))
            click.echo(f"charrnn: sample {p.stream + 1}: longest copy {c['longest_copy']} characters, "
                       f"{100 * c['copied_frac']:.1f}% in copies", err=True)


def _given(ctx, name: str) -> bool:
    """Whether the option `name` was given (not left at its default)."""
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


def _check_sample_options(ctx, prime, prime_file, stop, beam, length, num):
    """The usage errors of `sample` that need no model: one line each, exit status 2."""
    from charrnn.errors import UsageError

    if prime_file is not None and _given(ctx, "prime"):
        raise UsageError("give --prime or --prime-file, not both")
    if stop is not None and not stop:
        raise UsageError("--stop needs a non-empty STRING")
    if beam is None:
        return
    sampling = [f"--{n.replace('_', '-')}" for n in ("temp", "top_k", "top_p") if _given(ctx, n)]
    if sampling:
        raise UsageError(f"--beam searches for the most probable text at temperature 1 and draws nothing: "
                         f"drop {', '.join(sampling)}")
    if length == 0:
        raise UsageError("--beam needs a --length of at least 1 (a beam search settles nothing until it ends)")
    if num > beam:
        raise UsageError(f"--num {num} needs --beam {num} or wider (the beam returns its N best texts)")


def _held_chars(fmt: str, beam, num: int, length: int) -> bool:
    """Whether the samples are held in memory before they are written (--format jsonl writes a
    sample when it ends, --beam when the search ends, and with --num above 1 a later sample waits
    for the ones before it); then --num x --length (x --beam) is at most SAMPLE_HELD_MAX
    characters, a usage error otherwise (--format text with one sample streams any length)."""
    from charrnn.errors import UsageError

    held = fmt == "jsonl" or beam is not None or num > 1
    if held and length * num * (beam or 1) > SAMPLE_HELD_MAX:
        what = "--format jsonl" if fmt == "jsonl" else "--beam" if beam is not None else "--num above 1"
        raise UsageError(f"with {what} samples are held in memory until they end: --num x --length"
                         f"{' x --beam' if beam else ''} may be at most {SAMPLE_HELD_MAX:,} characters "
                         f"(here {length * num * (beam or 1):,}); one --format text sample streams any --length")
    return held


def _text_argument(name: str, value):
    """A command-line argument that is text (not a path), read as UTF-8 whatever the locale: under
    a C locale Python decodes arguments as ASCII, keeping each other byte as a lone surrogate, so
    the argument's own bytes are decoded again. UsageError when they are not UTF-8 (such bytes
    would be lone surrogates, which no output can write)."""
    from charrnn.errors import UsageError

    if not value:
        return value
    try:
        return os.fsencode(value).decode("utf-8")
    except UnicodeError:
        raise UsageError(f"{name} is not valid UTF-8 text") from None


def _read_prime(path: str) -> str:
    """--prime-file: the text of a file or stdin, read as corpora are (strict UTF-8, a BOM dropped,
    CRLF as \\n); one-line errors for a missing, binary, empty or undecodable file."""
    from charrnn.config import PRIME_MAX_BYTES, format_size
    from charrnn.data import InputTooLarge, Source
    from charrnn.errors import DataError

    try:  # small chunks: an endless pipe (`yes |`) stops at the limit, not 16 MiB later
        with Source([path], None, PRIME_MAX_BYTES, chunk_bytes=1 << 16, reread=False) as src:
            return "".join(src.chunks())
    except InputTooLarge:
        size = format_size(PRIME_MAX_BYTES)
        raise DataError(f"--prime-file: more than {size} bytes, the most a prime may hold (its end may do: "
                        f"tail -c {size} FILE | charrnn sample --prime-file - ...)") from None
    except DataError as e:  # the reader's hint names train's and eval's --encoding, which sample lacks
        raise DataError(f"--prime-file: {str(e).split('; if the file is in another encoding')[0]}") from None


def _sample_record(model, vocab, prime, prime_ids, seed, temp, copies, text, end) -> dict:
    """The JSON object of one sample: its log-probability is scored once it has ended; with a
    copy check, longest_copy and copied_frac too."""
    from charrnn.generate import continuation_logprob

    logprob = continuation_logprob(model, prime_ids, vocab.encode(text))
    record = {"text": text, "prime": prime, "seed": seed, "temp": temp, "logprob": logprob, "end": end}
    if copies is not None:
        record.update(copies(text))
    return record


def _json_line(record: dict) -> str:
    """One line of JSON (a log-probability that is not finite becomes null: JSON has no -Infinity)."""
    lp = record.get("logprob")
    if lp is not None and not math.isfinite(lp):
        record = dict(record, logprob=None)
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def _write_jsonl_samples(pieces, record, out: "ResultsOut"):
    """One JSON object per sample, in sample order, each written and flushed as soon as it and
    every sample before it have ended."""
    texts = {}  # sample -> its pieces so far
    ready = {}  # sample -> (text, end): ended, waiting for the samples before it
    current = 0
    for p in pieces:
        texts.setdefault(p.stream, []).append(p.text)
        if p.end is None:
            continue
        ready[p.stream] = ("".join(texts.pop(p.stream)), p.end)
        while current in ready:
            out.write(_json_line(record(*ready.pop(current))))
            out.flush()
            current += 1


def _beam(ck, prime, prime_ids, width, length, num, documents, stop, fmt, echo, quiet, out: "ResultsOut",
          copies=None):
    """sample --beam: search, then print the texts, best first; each one's log-probability on stderr."""
    from charrnn.beam import beam_search

    with _compile_notice(quiet, "the beam search"):
        found = beam_search(ck.model, ck.vocab, prime_ids, width, length, num=num, documents=documents, stop=stop)
    for rank, h in enumerate(found, 1):
        if not quiet:
            n = len(h.ids)
            click.echo(f"charrnn: beam {rank}/{len(found)}: log-probability {h.logprob:.4f} nats, {n} "
                       f"character{'' if n == 1 else 's'}, ended by {h.end}; ranked by {h.score:.4f} nats per token",
                       err=True)
        if fmt == "jsonl":
            record = {"text": h.text, "prime": prime, "seed": None, "temp": None, "logprob": h.logprob, "end": h.end}
            out.write(_json_line(dict(record, **(copies(h.text) if copies else {}))))
        else:
            out.write(echo + h.text + "\n")
        out.flush()


def _write_samples(chunks, num: int, echo: str, out: ResultsOut):
    """Write the samples to `out` (stdout) as they come: in order, each after the prime `echo`,
    one per line. Samples advance in lock step, so later ones are buffered until their turn."""
    pending = {}  # sample -> its text so far, for samples not yet printing (nothing sized by num:
    finished = set()  # a huge --num fails as the sampler allocates its streams, not here)
    current = 0
    out.write(echo)
    out.flush()
    for b, text, fin in chunks:
        if b == current:
            out.write(text)
        else:
            pending.setdefault(b, []).append(text)
        if fin:
            finished.add(b)
        while current < num and current in finished:
            out.write("\n")
            current += 1
            if current < num:
                out.write(echo + "".join(pending.pop(current, [])))
        out.flush()


# ------------------------------------------------------------------------------------------ eval
@cli.command("eval", epilog=EPILOG_EVAL)
@click.argument("files", nargs=-1, required=True, type=str)
@_model_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file on stdout.")
@click.option("--docs", type=click.Choice(["line", "blank", "none"]), default=None,
              help="Score as documents (default: as the model was trained).")
@click.option("--encoding", type=str, default=None, help="Text encoding of the files (default: strict UTF-8).")
@click.option("--per-char", is_flag=True,
              help="One JSON object per scored character instead (char, logprob, rank, top), streamed; one FILE. "
                   "Example: charrnn eval notes.txt --per-char | jq -c 'select(.rank > 10)'")
@click.option("--top", type=click.IntRange(0, 100), default=5, metavar="N",
              help="--per-char: the model's N best guesses at each character, as [char, probability] pairs.")
@_max_input_option
@_threads_option
@_quiet_option
@handle_errors
def eval_cmd(files, model_path, as_json, docs, per_char, top, encoding, max_input, threads, quiet):
    """Score text: negative log-likelihood per character (nats), bits per character, perplexity.

    With --per-char: one line of JSON per scored position (a document's <END> too, in document
    mode): its char, logprob (natural log), rank (1: the model's first guess) and top guesses;
    the logprobs sum to -nll of the file's score."""
    from charrnn import checkpoint
    from charrnn import threads as th
    from charrnn.data import Source
    from charrnn.evaluate import score_chunks

    out = ResultsOut()
    from charrnn.errors import UsageError

    if files.count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    if per_char and (len(files) > 1 or as_json):
        raise UsageError("--per-char scores one FILE and writes its own JSON lines (no --json)")
    if not per_char and _given(click.get_current_context(), "top"):
        raise UsageError("--top goes with --per-char")
    path, guessed = checkpoint.resolve(model_path)
    ck = checkpoint.load(path)
    if not quiet:
        click.echo(f"charrnn: scoring with {path}", err=True)
    th.set_threads(threads)
    if docs is None:
        docs = (ck.meta.get("train") or {}).get("docs")
    elif docs == "none":
        docs = None
    for fname in files:
        # read in chunks of 1 MiB and scored as they come: memory does not grow with the file
        with Source([fname], encoding, max_input, chunk_bytes=1 << 20, reread=False) as source:
            progress, done = _eval_progress(fname, quiet)
            try:
                with _compile_notice(quiet, "the scorer"):
                    if per_char:
                        score = _per_char(ck, source.chunks(), docs, top, progress, out)
                    else:
                        score = score_chunks(ck.model, ck.vocab, source.chunks(), docs=docs, progress=progress)
            finally:
                done()
        name = "<stdin>" if fname == "-" else fname
        if per_char:
            if not quiet:
                click.echo(f"charrnn: {name}: {score.nats:.4f} nats/char over {score.tokens:,} positions "
                           f"(the logprobs sum to {-score.nll:.6f})", err=True)
            continue
        if as_json:
            record = {"file": name, "model": path, "docs": docs}
            record.update(score.to_dict())
            out.write(json.dumps(record) + "\n")
        else:
            out.write(f"{name}: {score.nats:.4f} nats/char, {score.bits:.4f} bits/char, perplexity {score.perplexity:.3f}, "
                      f"{score.tokens:,} {'tokens' if docs else 'chars'} scored ({score.unk:,} unknown)\n")
        out.flush()


def _per_char(ck, chunks, docs, top, progress, out: "ResultsOut"):
    """eval --per-char: the JSON lines, written as the spans are scored; returns the file's Score."""
    from charrnn.perchar import PerCharScorer, iter_positions

    scorer = PerCharScorer(ck.model, ck.vocab, top, progress)
    for p in iter_positions(scorer, chunks, docs):
        out.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
    out.flush()
    return scorer.score


# ------------------------------------------------------------------------------------------ info
EPILOG_INFO = "Example: charrnn info runs/shakespeare --plot curve.png"


@cli.command(epilog=EPILOG_INFO)
@click.argument("path", metavar="MODEL|RUN", type=str)
@click.option("--json", "as_json", is_flag=True, help="The card as one JSON object (e.g. charrnn info runs/x --json | jq .best).")
@click.option("--plot", "plot_path", type=str, default=None, metavar="FILE.png",
              help="Also write a figure of the training and validation loss against steps and minutes "
                   "(needs the [plot] extra, matplotlib), e.g. --plot curve.png.")
@_quiet_option
@handle_errors
def info(path, as_json, plot_path, quiet):
    """The model card of a checkpoint (MODEL.npz) or a run directory (RUN: its best.npz and
    metrics.jsonl): model, vocabulary, corpus, options as given and as fitted, progress, best
    validation loss, and for a run its loss curve as a small text plot."""
    from charrnn import info as card_info

    out = ResultsOut()
    if plot_path is not None:
        card_info.check_plot_path(plot_path)  # a missing extra or a bad file name before any work
    notes = []
    c = card_info.card(path, notes)
    if not quiet:
        for note in notes:
            click.echo(f"charrnn: {note}", err=True)
    if plot_path is not None:
        card_info.plot(c, plot_path)
        if not quiet:
            click.echo(f"charrnn: wrote {plot_path}", err=True)
    out.write(card_info.to_json(c) + "\n" if as_json else card_info.render(c))
    out.flush()


# ------------------------------------------------------------------------------------------ export
EPILOG_EXPORT = """\b
Example: charrnn export runs/shakespeare --format html -o sampler.html
         charrnn export runs/shakespeare --format onnx -o model.onnx   (needs charrnn-cli[export])"""


@cli.command(epilog=EPILOG_EXPORT)
@click.argument("model_path", metavar="MODEL|RUN", type=str)
@click.option("--format", "fmt", type=click.Choice(["html", "onnx"]), required=True,
              help="html: a self-contained page that samples in a browser (weights inline, no network). "
                   "onnx: a step graph (token, h0[, c0] -> logits, h1[, c1]) with ONNX's LSTM/GRU/RNN operators.")
@click.option("-o", "--output", type=str, default=None, metavar="FILE", help="Write here (default: stdout).")
@_quiet_option
@handle_errors
def export(model_path, fmt, output, quiet):
    """Take a model out of charrnn: one HTML page that samples from it in a browser, or an ONNX
    model for any ONNX runtime (docs/inspect-and-export.md shows both). Exit status 0 on success,
    1 for a failed operation (a bad checkpoint, an unwritable output, no onnx package), 2 for bad
    usage."""
    import os

    from charrnn import checkpoint, outfile

    outfile.check_writable(output, binary=fmt == "onnx")
    path, guessed = checkpoint.resolve(model_path)
    ck = checkpoint.load(path)
    if fmt == "onnx":
        from charrnn import export_onnx

        data = export_onnx.to_bytes(ck.model, ck.vocab, ck.meta)
    else:
        from charrnn import export_html

        name = os.path.basename(os.path.dirname(os.path.abspath(path))) if os.path.basename(path) in (
            "best.npz", "last.npz") else os.path.basename(path)
        data = export_html.page(ck.model, ck.vocab, ck.meta, name)
    outfile.write(output, data)
    if not quiet:
        size = len(data.encode("utf-8") if isinstance(data, str) else data)
        click.echo(f"charrnn: wrote {output or 'stdout'} ({fmt}, {size:,} bytes) from {path}", err=True)


# ------------------------------------------------------------------------------------------ viz
EPILOG_VIZ = """\b
Example: charrnn viz sonnets.txt --model runs/shakespeare -o sonnets.html
         head -c 3000 notes.txt | charrnn viz - --ansi | less -R"""


@cli.command(epilog=EPILOG_VIZ)
@click.argument("file", type=str)
@_model_option
@click.option("-o", "--output", type=str, default=None, metavar="FILE", help="Write the page here (default: stdout).")
@click.option("--ansi", is_flag=True, help="Print the text coloured by surprisal for a terminal instead of a page.")
@click.option("--docs", type=click.Choice(["line", "blank", "none"]), default=None,
              help="Score as documents (default: as the model was trained).")
@click.option("--top", type=click.IntRange(1, 20), default=5, metavar="N", help="Guesses shown per character.")
@click.option("--activation", type=click.Choice(["cell", "h"]), default=None,
              help="What a unit shows: cell, an LSTM's cell state tanh(c) (the default for LSTMs), or h, the "
                   "hidden state (the only one of a GRU or RNN).")
@click.option("--encoding", type=str, default=None, help="Text encoding of FILE (default: strict UTF-8).")
@_threads_option
@_quiet_option
@handle_errors
def viz(file, model_path, output, ansi, docs, top, activation, encoding, threads, quiet):
    """Show what a model learned on a text (up to 20,000 characters; - for stdin): one
    self-contained HTML page with the text coloured by the model's surprisal, its top guesses at
    each character, and any hidden unit's activation, with a ranked list of units that follow
    quotes, brackets, line position or word starts (docs/inspect-and-export.md). Exit status 0 on
    success, 1 for a failed operation (a bad checkpoint or text, a text too long, an unwritable
    output), 2 for bad usage."""
    import os

    from charrnn import checkpoint, outfile
    from charrnn import threads as th
    from charrnn import viz as vz
    from charrnn.data import read_text
    from charrnn.errors import DataError

    outfile.check_writable(output)
    path, guessed = checkpoint.resolve(model_path)
    ck = checkpoint.load(path)
    th.set_threads(threads)
    try:
        text = read_text(file, encoding, max_input=4 * vz.MAX_CHARS + 4)  # UTF-8: at most 4 bytes a character
    except DataError as e:
        if "--max-input" not in str(e):
            raise
        text = None
    if text is None or len(text) > vz.MAX_CHARS:
        raise DataError(f"{file}: text too long for a page: {'more than ' if text is None else ''}"
                        f"{len(text) if text else 4 * vz.MAX_CHARS:,} characters, the limit is {vz.MAX_CHARS:,} "
                        f"(show a part, e.g. head -c {vz.MAX_CHARS} {file} > part.txt)")
    if docs is None:
        docs = (ck.meta.get("train") or {}).get("docs")
    elif docs == "none":
        docs = None
    if not quiet:
        click.echo(f"charrnn: scoring {len(text):,} characters with {path}", err=True)
    with _compile_notice(quiet, "the scorer"):
        analysis = vz.analyse(ck.model, ck.vocab, text, docs, top, activation=activation)
    if ansi:
        outfile.write(output, vz.ansi(analysis))
    else:
        name = "<stdin>" if file == "-" else os.path.basename(file)
        outfile.write(output, vz.page(ck.model, analysis, f"charrnn viz: {name}"))
    if not quiet:
        s = analysis.score
        click.echo(f"charrnn: {s.bits:.3f} bits/char over {s.tokens:,} positions; wrote {output or 'stdout'}", err=True)


def _raised_in_click_echo(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is click.utils.echo.__code__:
            return True
        tb = tb.tb_next
    return False


EVAL_LOG_EVERY_S = 30.0  # eval's progress lines when stderr is not a terminal, as training's (progress.Reporter)


def _eval_progress(fname: str, quiet: bool):
    """(progress(n), done()): characters scored so far, on a tqdm bar on a terminal, else as a
    plain line on stderr every 30 s (only long inputs get one); nothing with -q."""
    import time

    if quiet:
        return None, lambda: None
    name = "<stdin>" if fname == "-" else fname
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=None, unit="char", unit_scale=True, file=sys.stderr, leave=False, desc=name,
                   mininterval=0.5, delay=1.0)
        return bar.update, bar.close
    every = EVAL_LOG_EVERY_S
    t0 = time.monotonic()
    state = {"n": 0, "last": t0}

    def progress(n: int):
        state["n"] += n
        now = time.monotonic()
        if now - state["last"] >= every:
            state["last"] = now
            click.echo(f"charrnn: scoring {name}: {state['n']:,} characters so far, "
                       f"{state['n'] / (now - t0):,.0f} chars/s", err=True)

    return progress, lambda: None


def main():
    from charrnn import streams

    streams.setup()  # UTF-8 out whatever the locale; a broken stderr never stops the work
    _check_environment()
    try:
        code = _run()
    except SystemExit as e:
        code = e.code
    _settled()
    _exit_now_if_compiling(code)
    sys.exit(code)


def _run() -> int:
    """The command line under Click, its outcomes mapped to the exit statuses of the CLI contract:
    Click's own interrupt handling (KeyboardInterrupt while parsing options, which it calls
    "Aborted!" with status 1) is replaced by charrnn's (one line, 130), and a reader that went away
    from Click's own output (--help | head) ends quietly as it does for a command's."""
    try:
        try:
            code = cli.main(prog_name="charrnn", standalone_mode=False)
            return code if isinstance(code, int) else 0
        except click.exceptions.Abort as e:
            if isinstance(e.__cause__, EOFError):  # Click turns an unexpected EOFError into Abort too
                _fail("unexpected end of input", 1)
            raise KeyboardInterrupt from None
        except click.ClickException as e:
            e.show()
            return e.exit_code
        except BrokenPipeError:
            _quiet_exit_on_broken_pipe()
        except OSError as e:
            # Click's own output (--help, --version, a usage error) to a full or failing stream; any
            # other OSError that gets here is a bug and keeps its traceback
            if not _raised_in_click_echo(e):
                raise
            _discard_stdout()
            _fail(f"cannot write output: {e.strerror or e}", 1)
    except KeyboardInterrupt:
        _say("charrnn: interrupted")
        return 130
    return 0


def _say(line: str):
    try:
        click.echo(line, err=True)
    except (OSError, ValueError):
        pass


def _settled():
    """The work is over and its exit status decided: a SIGINT or SIGTERM that arrives while the
    interpreter shuts down (Numba's and Python's exit handlers) changes nothing any more. Without
    this, a Ctrl-C just after a sample was written ended the process by SIGINT (status 130, no
    message) although the sample was complete."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):
            pass


def _check_environment():
    """Environment variables that would end the first import of Numba in a traceback (Numba
    refuses NUMBA_NUM_THREADS of 0 or less as it loads): a one-line usage error instead."""
    value = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    try:
        bad = bool(value) and int(float(value)) <= 0
    except (ValueError, OverflowError):
        bad = False  # Numba ignores what it cannot read as a number
    if bad:
        _fail(f"NUMBA_NUM_THREADS={_one_line(value)}: Numba needs at least 1 thread; unset it (and use --threads N)", 2)


def _exit_now_if_compiling(code):
    """Exit at once, skipping the interpreter's shutdown, while a background thread still compiles
    kernels (a run that stopped early on a cold cache: bad input, an interrupt). Shutting down
    under a compiling thread can abort inside LLVM with an assertion instead of the one-line
    message already printed; the compiler's cache writes are atomic, so nothing is lost."""
    import threading

    if not any(t.name == "charrnn-precompile" and t.is_alive() for t in threading.enumerate()):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    status = code if isinstance(code, int) else (0 if code is None else 1)
    os._exit(status)


if __name__ == "__main__":
    main()
