"""The `charrnn` group and main(), the console script: Click's outcomes mapped to the exit statuses
of the command line's contract (exits.py), and what must happen before the first import of Numba
and after the work is done.
"""

from __future__ import annotations

import os
import sys

import click

from charrnn import __version__
from charrnn.cli.eval import eval_cmd
from charrnn.cli.exits import discard_stdout, fail, one_line, quiet_exit_on_broken_pipe
from charrnn.cli.export import export
from charrnn.cli.info import info
from charrnn.cli.sample import sample
from charrnn.cli.train import train
from charrnn.cli.viz import viz


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


for _command in (train, sample, eval_cmd, info, export, viz):
    cli.add_command(_command)


def main():
    """The console script `charrnn` (pyproject.toml) and `python -m charrnn`: Click, then the exit
    status of the command line's contract, whatever happens during the interpreter's shutdown."""
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
                fail("unexpected end of input", 1)
            raise KeyboardInterrupt from None
        except click.ClickException as e:
            e.show()
            return e.exit_code
        except BrokenPipeError:
            quiet_exit_on_broken_pipe()
        except OSError as e:
            # Click's own output (--help, --version, a usage error) to a full or failing stream; any
            # other OSError that gets here is a bug and keeps its traceback
            if not _raised_in_click_echo(e):
                raise
            discard_stdout()
            fail(f"cannot write output: {e.strerror or e}", 1)
    except KeyboardInterrupt:
        _say("charrnn: interrupted")
        return 130
    return 0


def _raised_in_click_echo(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is click.utils.echo.__code__:
            return True
        tb = tb.tb_next
    return False


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
        fail(f"NUMBA_NUM_THREADS={one_line(value)}: Numba needs at least 1 thread; unset it (and use --threads N)", 2)


def _exit_now_if_compiling(code):
    """Exit at once, skipping the interpreter's shutdown, while a background thread still compiles
    kernels (a run that stopped early on a cold cache: bad input, an interrupt). Shutting down
    under a compiling thread can abort inside LLVM with an assertion instead of the one-line
    message already printed; the compiler's cache writes are atomic, so nothing is lost."""
    precompile = sys.modules.get("charrnn.precompile")  # imported by a run that compiles early, else no thread
    if precompile is None or not precompile.compiling():
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    status = code if isinstance(code, int) else (0 if code is None else 1)
    os._exit(status)
