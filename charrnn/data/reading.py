"""Reading text in bounded memory: files and `-` (stdin) decoded in chunks, with the input limit.

What it does: strict UTF-8 (or another --encoding) decoded chunk by chunk, binary detection (a NUL),
the BOM removed and CRLF / lone CR turned into \\n exactly as decoding the whole file would, errors
that name byte offsets, the --max-input limit (InputTooLarge), and `Source`: corpus files in order,
readable as often as needed (stdin and pipes are copied to an anonymous temporary file on the first
reading; a worker that `charrnn train --workers N` started reads the launcher's copy instead).
Memory is a few chunks, never the text.

Not here: what the text is cut into (documents.py), what a reading of it tells (corpus.py), models
or the command line.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import stat
import sys
import tempfile

from charrnn.config import DEFAULT_MAX_INPUT, format_size
from charrnn.errors import DataError

# bytes read at a time: a few 16 MiB chunks are all the memory a corpus takes, and numpy's calls on
# them stay long (peak memory by corpus size: benchmarks/results/big_corpus.txt)
CHUNK_BYTES = 1 << 24


def input_name(path: str) -> str:
    """The name messages give an input: the path, or <stdin> for `-`."""
    return "<stdin>" if path == "-" else path


def open_input(path: str):
    """A binary file object for `path`, with one-line errors for the usual mistakes."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a text file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _read(f, n: int, name: str) -> bytes:
    try:
        return f.read(n)
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, not a text file") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None


def _decoder(encoding: str | None):
    """(incremental decoder, whether it is UTF-8): the strict decoder of a text encoding."""
    try:
        info = codecs.lookup(encoding or "utf-8")
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}") from None
    if not getattr(info, "_is_text_encoding", True):  # rot13, base64 ...: not bytes -> text
        raise DataError(f"unknown encoding {encoding!r}")
    return info.incrementaldecoder("strict"), info.name in ("utf-8", "utf-8-sig")


def _native_decoder(dec):
    """The machine-order decoder standing in for a BOM-less UTF-16/32 stream, or None."""
    name = type(dec).__module__.rsplit(".", 1)[-1].replace("_", "-")
    if name not in ("utf-16", "utf-32"):
        return None
    return codecs.getincrementaldecoder(f"{name}-{'le' if sys.byteorder == 'little' else 'be'}")("strict")


class InputTooLarge(DataError):
    """More input than the reading's limit allows (--max-input, or a fixed limit of the caller's)."""


class ByteLimit:
    """The bytes a reading may still take (--max-input): an endless pipe stops here, not in swap."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.used = 0

    def take(self, n: int, name: str):
        self.used += n
        if self.limit is not None and self.used > self.limit:
            raise InputTooLarge(
                f"{name}: input larger than the --max-input limit of {format_size(self.limit)}; "
                f"if it really is text, raise the limit, e.g. --max-input {format_size(self.limit * 4)}"
            )


def _text_chunks(f, name: str, encoding: str | None, chunk_bytes: int, limit: ByteLimit, spool=None):
    """The normalised text of one open binary file, chunk by chunk: strict decoding, binary
    detection, the BOM removed and CRLF / lone CR turned into \\n, exactly as decoding the whole
    file at once would (a \\r at the end of a chunk waits for the next one; an incremental decoder
    carries a character split across chunks). Errors name byte offsets in the file. Raw bytes are
    copied to `spool` when given (stdin's first pass)."""
    dec, is_utf8 = _decoder(encoding)
    offset = 0  # bytes of this file before the current chunk
    pos = 0  # characters decoded before the current chunk (before normalisation)
    first = True
    cr = False  # a \r held back from the end of the previous chunk
    while True:
        data = _read(f, chunk_bytes, name)
        final = not data
        limit.take(len(data), name)
        if spool is not None and data:
            try:
                spool.write(data)
            except OSError as e:
                raise DataError(f"{name}: cannot keep a copy for the second reading in {tempfile.gettempdir()}: "
                                f"{e.strerror or e} (set TMPDIR to a place with room, or give a file)") from None
        if is_utf8:
            nul = data.find(b"\x00")
            if nul >= 0:
                raise DataError(f"{name}: looks like a binary file (NUL byte at offset {offset + nul}), not text")
        try:
            held = dec.getstate()[0]  # bytes of a character begun in the previous chunk
            pending = len(held)
        except (AttributeError, TypeError, IndexError):
            held, pending = b"", 0
        try:
            try:
                text = dec.decode(data, final)
            except UnicodeDecodeError:
                raise
            except UnicodeError:
                # Python's incremental UTF-16/32 decoders refuse a stream without a BOM, which
                # bytes.decode reads in the machine's byte order: do as bytes.decode does
                dec = _native_decoder(dec)
                if dec is None:
                    raise
                text = dec.decode(held + data, final)
        except UnicodeDecodeError as e:
            # e.start counts from the bytes the codec looked at: those held from the previous
            # chunk and this one's, less any BOM the codec stripped (utf-8-sig)
            seen = held + data
            start = offset - pending + e.start + (len(seen) - len(e.object) if seen.endswith(e.object) else 0)
            bad = e.object[e.start : e.start + 1].hex()
            hint = "if the file is in another encoding, pass --encoding" if is_utf8 else ""
            raise DataError(
                f"{name}: not valid {e.encoding.upper()} at byte offset {start} (byte 0x{bad})", hint
            ) from None
        except (ValueError, TypeError) as e:  # a codec that fails otherwise (undefined, punycode ...)
            raise DataError(f"{name}: cannot be decoded as {encoding}: {str(e) or type(e).__name__}") from None
        if not is_utf8:
            nul = text.find("\x00")
            if nul >= 0:
                raise DataError(f"{name}: looks like a binary file (NUL character at position {pos + nul}), not text")
        offset += len(data)
        pos += len(text)
        if first and text:
            first = False
            if text[0] == "\ufeff":
                text = text[1:]
        if cr:
            text = "\r" + text
            cr = False
        if not final and text.endswith("\r"):
            text, cr = text[:-1], True  # it may be the \r of a \r\n split across chunks
        if "\r" in text:
            # Universal newlines, as Python's text mode: CRLF and lone CR both become \n.
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if text:
            yield text
        if final:
            return


def _spooled() -> dict:
    """{corpus path: the launcher's copy of it} in a worker that `charrnn train --workers N` started
    (parallel.SPOOL_VARIABLE); empty elsewhere."""
    value = os.environ.get("CHARRNN_SPOOLED_INPUT")
    if not value:
        return {}
    try:
        copies = json.loads(value)
    except (ValueError, RecursionError):
        return {}
    return {k: v for k, v in copies.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(copies, dict) else {}


class Source:
    """Corpus files in order (`-` for stdin, at most once), readable as often as needed.

    Every reading is chunked and bounded by `max_input` bytes in all. The first reading of stdin,
    or of any file that is not a regular one (a pipe, a FIFO, `<(command)`, a device), copies its
    bytes into an anonymous temporary file (unlinked from the start, so it goes away on any exit),
    which later readings read instead; `reread=False` says one reading is all (eval), and nothing
    is copied. close() releases the copies."""

    def __init__(self, paths, encoding: str | None = None, max_input: int | None = DEFAULT_MAX_INPUT,
                 chunk_bytes: int = CHUNK_BYTES, reread: bool = True):
        paths = list(paths)
        if not paths:
            raise DataError("no corpus given")
        if paths.count("-") > 1:
            raise DataError("stdin ('-') can be given only once")
        self.paths = tuple(paths)
        self.encoding = encoding
        self.max_input = max_input
        self.chunk_bytes = max(1, int(chunk_bytes))
        self.reread = reread
        self._spools = {}  # index in paths -> the complete copy of a stream read once

    def chunks(self):
        """Normalised text of every file in order, in chunks; an empty file is an error."""
        limit = ByteLimit(self.max_input)
        for i, path in enumerate(self.paths):
            name = input_name(path)
            seen = False
            for text in self._file_chunks(i, path, name, limit):
                seen = True
                yield text
            if not seen:
                raise DataError(f"{name}: is empty")

    def _file_chunks(self, i, path, name, limit):
        args = (name, self.encoding, self.chunk_bytes, limit)
        spool = self._spools.get(i)
        if spool is not None:  # a stream read once already: its copy
            spool.seek(0)
            yield from _text_chunks(spool, *args)
            return
        copy = _spooled().get(path)
        if copy is not None:  # a data-parallel worker: the launcher's copy of a stream (parallel.launch)
            f = open_input(copy)
        elif path == "-" and sys.stdin is None:
            raise DataError("<stdin>: is closed")
        else:
            f = sys.stdin.buffer if path == "-" else open_input(path)
        path = path if copy is None else copy
        try:
            if not self.reread or (path != "-" and stat.S_ISREG(os.fstat(f.fileno()).st_mode)):
                yield from _text_chunks(f, *args)
                return
            spool = tempfile.TemporaryFile(prefix="charrnn-input-")
            try:
                yield from _text_chunks(f, *args, spool=spool)
            except BaseException:
                spool.close()
                raise
            self._spools[i] = spool  # only a complete copy
        finally:
            if path != "-":
                f.close()

    def close(self):
        for spool in self._spools.values():
            spool.close()
        self._spools = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def decode_text(data: bytes, name: str, encoding: str | None = None) -> str:
    """Bytes to normalised text, through the same chunked decoder (one chunk): strict decoding,
    binary detection (a NUL byte under UTF-8), BOM removed, newlines normalised to \\n."""
    return "".join(_text_chunks(io.BytesIO(data), name, encoding, max(len(data), 1), ByteLimit(None)))


def read_text(path: str, encoding: str | None = None, max_input: int | None = DEFAULT_MAX_INPUT) -> str:
    """One small file (or stdin) as normalised text, whole; an empty file is an error."""
    with Source([path], encoding, max_input) as src:
        return "".join(src.chunks())
