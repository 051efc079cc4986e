"""Writing a command's result to `-o FILE` or to stdout, for the commands that make one file
(`charrnn export`, `charrnn viz`): atomically (a temporary file in the same directory, then
os.replace, so a failed run leaves no half-written page), with one-line errors.

Not here: the results of sample and eval, which stream (cli.ResultsOut)."""

from __future__ import annotations

import os
import sys
import tempfile

from charrnn.errors import CharrnnError, UsageError


def check_writable(path: str | None, binary: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a directory, a missing or
    read-only directory, or (binary data, no -o) a terminal as stdout."""
    if path is None or path == "-":
        if binary and sys.stdout is not None and sys.stdout.isatty():
            raise UsageError("refusing to write a binary file to a terminal: give -o FILE (or redirect stdout)")
        return
    if os.path.isdir(path):
        raise CharrnnError(f"-o {path}: is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CharrnnError(f"-o {path}: no such directory {directory}")
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CharrnnError(f"-o {path}: cannot write here (permission denied)")


def write(path: str | None, data: bytes | str) -> None:
    """`data` to the file at `path` (atomically), or to stdout when path is None or '-'."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if path is None or path == "-":
        if sys.stdout is None:
            raise CharrnnError("cannot write to stdout: it is closed")
        try:
            sys.stdout.flush()
            sys.stdout.buffer.write(raw)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise CharrnnError(f"cannot write to stdout: {e.strerror or e}") from None
        return
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    except OSError as e:
        raise CharrnnError(f"-o {path}: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CharrnnError(f"-o {path}: cannot write: {e.strerror or e}") from None
