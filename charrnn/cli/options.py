"""What the commands share in parsing: the Click types of numeric options (ranges from config.py's
tables; floats through Finite, which also refuses NaN and inf), the options several commands take
as decorators, and small helpers over Click's context.

Not here: the rules themselves (config.py and the modules that own them), the commands.
"""

from __future__ import annotations

import math

import click

from charrnn.config import DEFAULTS, TRAIN_BOUNDS


class Finite(click.FloatRange):
    """A float option in a range, and finite. Click's FloatRange alone lets NaN through (every
    comparison with NaN is False: `--lr nan` reached the optimizer) and accepts inf; this refuses
    both as a usage error naming the option (exit 2). --help shows the range as FloatRange does."""

    def convert(self, value, param, ctx):
        x = click.types.FloatParamType.convert(self, value, param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(x, param, ctx)


def finite(bounds) -> Finite:
    """The Click type of a float option with the given config.Bounds (one table for Click and
    the library's own checks)."""
    return Finite(min=bounds.min, max=bounds.max, min_open=bounds.min_open, max_open=bounds.max_open)


def ints(bounds) -> click.IntRange:
    """The Click type of a whole-number option with the given config.Bounds, its ends closed (so
    --help shows 0<=x<=18446744073709551615, not 0<=x<18446744073709551616)."""
    lo = None if bounds.min is None else bounds.min + (1 if bounds.min_open else 0)
    hi = None if bounds.max is None else bounds.max - (1 if bounds.max_open else 0)
    return click.IntRange(min=lo, max=hi)


def seed_option(default, help):
    """--seed, shared by train and sample: a whole number in [0, 2**64), the 64 bits the
    generators are seeded with; anything else is a usage error, not an overflow later."""
    return click.option("--seed", type=ints(TRAIN_BOUNDS["seed"]), default=default, help=help)


def threads_option(f):
    return click.option("--threads", type=ints(TRAIN_BOUNDS["threads"]), default=None,
                        help="Threads for the compiled core (default: every core).")(f)


def model_option(f):
    return click.option("--model", "model_path", type=str, default=None, metavar="PATH",
                        help="A checkpoint file, or a run directory (its best.npz). Default: the most recent run under ./runs.")(f)


def max_input_option(f):
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


def quiet_option(f):
    return click.option("-q", "--quiet", is_flag=True, help="Nothing on stderr but errors.")(f)


def val_chars(value):
    """--val-chars: a positive count, or "all"."""
    if value is None or value == "all":
        return value
    return count_or_all(value, "characters")


def count_or_all(value, what: str):
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


def flag(name: str) -> str:
    """An option's name on the command line: max_vocab -> --max-vocab."""
    return "--" + name.replace("_", "-")


def given(ctx, name: str) -> bool:
    """Whether the option `name` was given (not left at its default)."""
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)


def announce_compiling(quiet: bool, what: str):
    """A context in which the first compilation of a kernel says so on stderr (first run only):
    kernels/jit.compile_notice, with the CLI's line."""
    from charrnn.kernels.jit import compile_notice

    def say():
        if not quiet:
            click.echo(f"charrnn: compiling {what} for this machine (first run only) ...", err=True)

    return compile_notice(say)


def document_mode(docs: str | None, meta: dict) -> str | None:
    """--docs of eval and viz: as given ("none": one stream), or left open, the mode the model was
    trained in (its run record)."""
    if docs is None:
        from charrnn.run import Recorded

        return Recorded(meta).docs
    return None if docs == "none" else docs
