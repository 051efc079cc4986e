"""The standard streams of the `charrnn` command: how text leaves, and what a broken stream does.

One rule for every command and format (docs/robustness.md):
- Output encoding. stdout and stderr carry UTF-8 whatever the locale, PYTHONIOENCODING or
  terminal says (models are UTF-8 text, and a vocabulary holds Unicode scalar values only). The
  undecodable bytes of a file name given on the command line go back out as the same bytes, so a
  printed path is the one that works; any other character UTF-8 cannot hold (a lone surrogate
  from a hostile file) is written as a \\uXXXX escape instead of ending the command.
- Broken streams. Diagnostics (stderr: notes, progress, errors) that cannot be written never stop
  the work: after the first failure stderr is pointed at /dev/null and the command goes on, its
  exit status saying whether the work succeeded. Results (stdout) that cannot be written are a
  failure (exit status 1), except a reader that went away (`| head`), which ends the command
  quietly with 0. A closed standard descriptor (`>&-`, `2>&-`, `<&-`) is occupied by /dev/null
  at start, so no file the run opens can take its number and receive stray writes.

Not here: what the commands write (cli/); the checks of a results stream (cli/exits.py, ResultsOut).
"""

from __future__ import annotations

import codecs
import errno
import os
import sys

ERRORS = "charrnn-out"  # the codec error handler of both streams


def _escape_unencodable(exc):
    """Encode-error handler: an undecodable byte kept as a surrogate (U+DC80..U+DCFF, Python's
    surrogateescape) goes out as that byte; any other character as a \\uXXXX escape."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for ch in exc.object[exc.start : exc.end]:
        cp = ord(ch)
        out += bytes([cp - 0xDC00]) if 0xDC80 <= cp <= 0xDCFF else f"\\u{cp:04x}".encode("ascii")
    return bytes(out), exc.end


codecs.register_error(ERRORS, _escape_unencodable)


class ClosedStdout:
    """sys.stdout when the shell closed it (`>&-`): every write fails with EBADF, so asking for
    output (a result, --help) is a one-line error and exit status 1, as with a failing stdout."""

    closed_by_shell = True
    encoding = "utf-8"

    def write(self, text):
        raise OSError(errno.EBADF, "Bad file descriptor (stdout is closed)")

    def flush(self):
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "stdout is closed")


class Diagnostics:
    """sys.stderr: the real stream, except that a write or flush that fails (a full disk, a
    closed pipe, EIO) is swallowed, stderr's descriptor pointed at /dev/null, and every later
    write dropped. Anything else (isatty, encoding, fileno) is the real stream's."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    def write(self, text):
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._break()
        return len(text)

    def flush(self):
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._break()

    def _break(self):
        self.broken = True
        try:
            _onto_devnull(self._stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _onto_devnull(fd: int, flags: int = os.O_WRONLY):
    devnull = os.open(os.devnull, flags)
    try:
        if devnull != fd:
            os.dup2(devnull, fd)
    finally:
        if devnull != fd:
            os.close(devnull)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _utf8(stream):
    """The text stream re-encoding as UTF-8 with this module's error handler (a no-op for a
    stream that cannot be reconfigured, such as a test's)."""
    try:
        stream.reconfigure(encoding="utf-8", errors=ERRORS)
    except (AttributeError, ValueError, OSError):
        pass
    return stream


def setup():
    """Apply the rules above to this process's standard streams; called once by cli.main()."""
    for fd in (0, 1, 2):  # occupied, so the next file opened cannot become "stderr"
        if _closed(fd):
            try:
                _onto_devnull(fd, os.O_RDWR)
            except OSError:
                pass
    sys.stdout = ClosedStdout() if sys.stdout is None else _utf8(sys.stdout)
    if sys.stderr is not None and not isinstance(sys.stderr, Diagnostics):
        sys.stderr = Diagnostics(_utf8(sys.stderr))
    elif sys.stderr is None:
        sys.stderr = Diagnostics(open(os.devnull, "w", encoding="utf-8"))
