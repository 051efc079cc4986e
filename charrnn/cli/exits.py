"""How a command ends: an error as one line on stderr and an exit status (1 a failed operation,
2 bad usage, 130 / 143 after SIGINT / SIGTERM), and stdout for results, whose failures are errors
too while a reader that goes away (`| head`) ends the program quietly with 0.

Not here: the exceptions themselves (charrnn/errors.py), the standard streams' encoding and what a
broken stderr does (charrnn/streams.py), what each command writes (its own module).
"""

from __future__ import annotations

import functools
import os
import sys

import click

from charrnn.errors import CharrnnError


def one_line(text: str) -> str:
    """`text` with its control characters and line separators escaped (\\n, \\x1b ...): an error is
    one line, whatever a file name holds, and cannot move a terminal's cursor."""
    import unicodedata

    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)


def fail(message: str, code: int):
    try:
        click.echo(f"charrnn: error: {one_line(message)}", err=True)  # silent when stderr is closed
    except OSError:
        pass  # stderr fails too: the exit status still says it
    sys.exit(code)


def quiet_exit_on_broken_pipe():
    """The reader went away (`| head`): stop quietly with status 0, and keep Python's final flush
    of stdout from complaining."""
    discard_stdout()
    sys.exit(0)


def discard_stdout():
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
            discard_stdout()
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
            fail(str(e), e.exit_code)
        except BrokenPipeError:
            quiet_exit_on_broken_pipe()
        except KeyboardInterrupt:
            click.echo("charrnn: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            fail("out of memory; try a smaller model, batch or text", 1)
        except BaseException as e:
            from charrnn.signals import SignalExit

            if isinstance(e, SignalExit):
                click.echo("charrnn: terminated", err=True)
                sys.exit(e.exit_code)
            raise

    return wrapper
