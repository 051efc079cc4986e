"""Reading corpora in bounded memory, the memory-mapped token file, and the B-stream batches.

What it does: files and `-` (stdin, spooled to an anonymous temporary file so it can be read twice),
read in chunks with strict UTF-8 (or another --encoding), binary detection, a size limit
(--max-input), BOM and line-ending normalisation, stream and document modes, the corpus hash and
vocabulary (pass 1), the contiguous train/validation split and the token file (pass 2), and the
batch layout over it. Memory is a few chunks, never the corpus: a 1 GB text trains from a token
file of 1 GB on disk, mapped read-only. What it does not do: anything with models or the command
line.

The chunked pipeline gives exactly what the whole-text one gave (tests/wholetext.py keeps that one
as the reference): the same hash, so runs made before still resume, the same vocabulary, the same
split and the same token ids.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import re
import stat
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

from charrnn.config import DEFAULT_MAX_INPUT, format_size
from charrnn.errors import DataError
from charrnn.rundir import open_new, remove_files
from charrnn.vocab import (END_ID, MAX_CODE_POINT, START_ID, Capped, CharSet, Vocab,  # noqa: F401 (Capped, capped_vocab: re-exported)
                           capped_vocab, describe_chars)

DOC_MODES = ("line", "blank")
_BLANK_SPLIT = re.compile(r"\n[ \t]*\n")
# --docs: the longest document (characters) held whole; a text without separators is not documents
MAX_DOCUMENT_CHARS = 1 << 24
CHUNK_BYTES = 1 << 24  # bytes read at a time: 16 MiB keeps the working set near 100 MB and numpy calls long
TOKENS_FILE = "tokens.npy"  # the token file in a run directory; its description beside it in tokens.json
TOKENS_META = "tokens.json"
TOKENS_FORMAT = ("charrnn-tokens", 1)


# ---------------------------------------------------------------------------- reading text in chunks
def _source_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


def _open(path: str):
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


class _Limit:
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


def _text_chunks(f, name: str, encoding: str | None, chunk_bytes: int, limit: _Limit, spool=None):
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
            hint = "; if the file is in another encoding, pass --encoding" if is_utf8 else ""
            raise DataError(
                f"{name}: not valid {e.encoding.upper()} at byte offset {start} (byte 0x{bad}){hint}"
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
        limit = _Limit(self.max_input)
        for i, path in enumerate(self.paths):
            name = _source_name(path)
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
            f = _open(copy)
        elif path == "-" and sys.stdin is None:
            raise DataError("<stdin>: is closed")
        else:
            f = sys.stdin.buffer if path == "-" else _open(path)
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
    return "".join(_text_chunks(io.BytesIO(data), name, encoding, max(len(data), 1), _Limit(None)))


def read_text(path: str, encoding: str | None = None, max_input: int | None = DEFAULT_MAX_INPUT) -> str:
    """One small file (or stdin) as normalised text, whole; an empty file is an error."""
    with Source([path], encoding, max_input) as src:
        return "".join(src.chunks())


# ---------------------------------------------------------------------------- documents
def split_documents(text: str, docs: str) -> list[str]:
    """The documents of a text: one per line (`line`) or per blank-line-separated block (`blank`).

    Empty documents are dropped.
    """
    if docs == "line":
        parts = text.split("\n")
    elif docs == "blank":
        parts = [p.strip("\n") for p in _BLANK_SPLIT.split(text)]
    else:
        raise ValueError(f"docs must be one of {DOC_MODES}, not {docs!r}")
    return [p for p in parts if p.strip()]


def _could_end_separator(chunk: str, docs: str) -> bool:
    """Whether a document separator may end inside `chunk` (possibly begun before it)."""
    if docs == "line":
        return "\n" in chunk
    # a blank-line separator ends at a \n: inside the chunk, or begun before it when the chunk
    # starts with spaces/tabs and a \n
    return _BLANK_SPLIT.search(chunk) is not None or re.match(r"[ \t]*\n", chunk) is not None


def document_pieces(chunks, docs: str, max_doc: int | None = None):
    """The text again, in pieces that end at document separators (the last piece: the rest), so
    split_documents of each piece gives, in order, the documents of the whole text. A document
    longer than a chunk is carried until it ends, as a list of chunks (joined once); one longer
    than `max_doc` characters (MAX_DOCUMENT_CHARS) is an error, so memory stays bounded."""
    max_doc = MAX_DOCUMENT_CHARS if max_doc is None else max_doc

    def too_long():
        sep = "newline" if docs == "line" else "blank line"
        return DataError(f"a document of more than {max_doc:,} characters (no {sep} in them): with --docs "
                         f"{docs} each document is held in memory whole; is this text really in documents?")

    carry: list[str] = []
    carried = 0
    for chunk in chunks:
        if not _could_end_separator(chunk, docs):
            carry.append(chunk)
            carried += len(chunk)
            if carried > max_doc:
                raise too_long()
            continue
        buf = "".join(carry) + chunk if carry else chunk
        # the document the carry began ends in this chunk: its whole length counts, not only the
        # carried part (a document of 17 Mi characters ending just past a chunk's start got through)
        first = buf.find("\n") if docs == "line" else _BLANK_SPLIT.search(buf)
        first = (first if docs == "line" else first.start() if first else len(buf))
        if carried and first > max_doc:
            raise too_long()
        if len(chunk) > max_doc:  # a caller's chunks longer than the limit: every document of it counts
            pieces = buf.split("\n") if docs == "line" else _BLANK_SPLIT.split(buf)
            if max(map(len, pieces[:-1]), default=0) > max_doc:
                raise too_long()
        if docs == "line":
            end = buf.rfind("\n") + 1
        else:
            # the last separator's end: matches found scanning from a separator's end are the
            # whole text's (the pattern has no look-behind), and a separator begun at the very end
            # of buf is not matched yet, so it stays in the carry
            end = 0
            for m in _BLANK_SPLIT.finditer(buf):
                end = m.end()
        if end:
            yield buf[:end]
        carry = [buf[end:]] if end < len(buf) else []
        carried = len(buf) - end
    if carry:
        yield "".join(carry)


def encode_stream(vocab: Vocab, text: str, docs: str | None, unknown: str = "unk", end: bool = True, dtype=np.int32):
    """The token stream a model sees for `text`.

    Stream mode: <START> text [<END>]. Document mode: <START> doc <END> for every document.
    """
    if docs is None:
        body = vocab.encode(text, unknown=unknown, dtype=dtype)
        parts = [np.array([START_ID], dtype=dtype), body]
        if end:
            parts.append(np.array([END_ID], dtype=dtype))
        return np.concatenate(parts)
    return _wrap_documents(vocab, split_documents(text, docs), unknown, dtype)


def _wrap_documents(vocab: Vocab, documents: list[str], unknown: str, dtype):
    """<START> doc <END> for every document, encoded in one call and the markers put in after."""
    if not documents:
        return np.zeros(0, dtype=dtype)
    if unknown == "skip":
        # lengths change when characters are dropped, so encode document by document
        encoded = [vocab.encode(d, unknown="skip", dtype=dtype) for d in documents]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        body = np.concatenate(encoded) if encoded else np.zeros(0, dtype=dtype)
    else:
        lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
        body = vocab.encode("".join(documents), unknown=unknown, dtype=dtype)
    out = np.empty(len(body) + 2 * len(lengths), dtype=dtype)
    starts = np.concatenate([[0], np.cumsum(lengths + 2)[:-1]])
    out[starts] = START_ID
    out[starts + lengths + 1] = END_ID
    mask = np.ones(len(out), dtype=bool)
    mask[starts] = False
    mask[starts + lengths + 1] = False
    out[mask] = body
    return out


def compact_dtype(vocab_size: int):
    """The smallest unsigned integer type that holds every id (memory: 100 MB of text -> 100 MB of ids)."""
    if vocab_size <= 256:
        return np.uint8
    if vocab_size <= 65536:
        return np.uint16
    return np.uint32


# ---------------------------------------------------------------------------- pass 1: the corpus
@dataclass(frozen=True)
class Corpus:
    """What one reading of the corpus tells: enough to size a run, check a resume and build the
    token file (the text itself is read again from `source` for that, never kept)."""

    paths: tuple
    sha256: str  # of the normalised text, all files concatenated: resume checks it, so a changed corpus is refused
    chars: int  # N, characters of the normalised text
    docs: str | None  # the document mode the vocabulary and counts below are for
    vocab: Vocab  # every character; in document mode only those inside documents
    doc_count: int = 0  # documents (document mode)
    doc_chars: int = 0  # characters inside documents (document mode)
    # document mode: (characters, tokens) at the end of each piece pass 1 read, ending at separators
    # (about one per chunk), so the training tokens before a cut are known to within a piece
    marks: tuple = field(default=(), compare=False, repr=False)
    source: Source | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """A short name for the run directory: the stem of the first file."""
        first = self.paths[0]
        if first == "-":
            return "stdin"
        return os.path.splitext(os.path.basename(os.path.normpath(first)))[0] or "corpus"

    def text_chunks(self):
        """The normalised text again, in chunks."""
        return self.source.chunks()

    def close(self):
        if self.source is not None:
            self.source.close()


def read_corpus(paths, encoding: str | None = None, docs: str | None = None,
                max_input: int | None = DEFAULT_MAX_INPUT, chunk_bytes: int = CHUNK_BYTES) -> Corpus:
    """Read several files (or `-`) once, concatenated in order as `cat` would, in chunks: the hash,
    the length, the vocabulary (of the documents, in document mode) and the document counts."""
    if docs is not None and docs not in DOC_MODES:
        raise ValueError(f"docs must be one of {DOC_MODES}, not {docs!r}")
    source = Source(paths, encoding, max_input, chunk_bytes)
    digest = hashlib.sha256()
    seen = CharSet()
    n = doc_count = doc_chars = 0
    marks, pos = [], 0

    def hashed(chunks):
        nonlocal n
        for text in chunks:
            digest.update(text.encode("utf-8", "surrogatepass"))
            n += len(text)
            yield text

    try:
        if docs is None:
            for text in source.chunks():
                raw = text.encode("utf-8", "surrogatepass")
                digest.update(raw)
                n += len(text)
                seen.add_text(text, raw if len(raw) == len(text) else None)  # ASCII: its UTF-8 is its bytes
        else:
            for piece in document_pieces(hashed(source.chunks()), docs):
                documents = split_documents(piece, docs)
                inside = "".join(documents)
                doc_count += len(documents)
                doc_chars += len(inside)
                seen.add_text(inside)
                pos += len(piece)
                marks.append((pos, doc_chars + 2 * doc_count))
        bad = seen.surrogates()
        if bad:  # only a non-UTF-8 --encoding (unicode_escape, raw_unicode_escape) decodes to these
            raise DataError(f"the text holds {describe_chars(bad[:5])}{' ...' if len(bad) > 5 else ''}: lone "
                            "surrogates, which are not characters and no UTF-8 output can write; fix the text "
                            f"(or its --encoding {source.encoding or 'utf-8'})")
    except BaseException:
        source.close()
        raise
    return Corpus(paths=source.paths, sha256=digest.hexdigest(), chars=n, docs=docs, vocab=Vocab(seen.chars()),
                  doc_count=doc_count, doc_chars=doc_chars, marks=tuple(marks), source=source)


# ---------------------------------------------------------------------------- the split
class _CutFinder:
    """Where validation begins in document mode, found while the text streams past: the end of
    the first document separator that ends at or after the nominal cut `c` (or N if none), as the
    whole-text split did.

    Line mode: the first \\n at or after c - 1. Blank mode: separators \\n[ \\t]*\\n pair up the
    newlines of each run of spaces, tabs and newlines (1st with 2nd, 3rd with 4th ...), so the
    state at c - 1 is only whether an odd number of that run's newlines lie before it; from there
    on, the first separator found by scanning (a separator begun in one chunk and ended in the
    next is carried as an open \\n)."""

    def __init__(self, docs: str, c: int):
        self.docs = docs
        self.start = max(c - 1, 0)  # where the search begins
        self.cut = None
        self.trail_newlines = 0  # blank mode, before start: newlines in the trailing whitespace run
        self.open = False  # blank mode, searching: an unmatched \n followed only by spaces/tabs

    def feed(self, text: str, pos: int):
        """The next chunk of the text, which begins at character `pos`."""
        if self.cut is not None or pos + len(text) <= self.start:
            if self.cut is None and self.docs == "blank":
                self._track(text)
            return
        k = max(self.start - pos, 0)
        if pos <= self.start:  # the chunk that holds the start
            if self.docs == "blank":
                self._track(text[:k])
                self.open = self.trail_newlines % 2 == 1
        self._search(text[k:], pos + k)

    def _track(self, text: str):
        body = text.rstrip(" \t\n")
        tail_nl = text.count("\n", len(body))
        self.trail_newlines = tail_nl + (self.trail_newlines if not body else 0)

    def _search(self, text: str, pos: int):
        if self.docs == "line":
            i = text.find("\n")
            if i >= 0:
                self.cut = pos + i + 1
            return
        lead = "\n" if self.open else ""
        m = _BLANK_SPLIT.search(lead + text)
        if m:
            self.cut = pos + m.end() - len(lead)
            return
        body = text.rstrip(" \t")
        if body:
            self.open = body.endswith("\n")

    def finish(self, n: int) -> int:
        if self.cut is None:
            self.cut = n
        return self.cut


def _pieces(corpus: Corpus, val_frac: float):
    """(part, text) in order, part "train" or "val": the text cut where the whole-text split cut
    it. Stream mode: at round(N * (1 - val_frac)). Document mode: moved forward to the end of the
    next document separator (_CutFinder), and every piece ends at a separator, so each encodes on
    its own."""
    if not 0.0 <= val_frac < 1.0:
        raise ValueError("val_frac must be in [0, 1)")
    n = corpus.chars
    c = n if val_frac == 0.0 else int(round(n * (1.0 - val_frac)))
    if corpus.docs is None:
        pos = 0
        for text in corpus.text_chunks():
            end = pos + len(text)
            if end <= c:
                yield "train", text
            elif pos >= c:
                yield "val", text
            else:
                yield "train", text[: c - pos]
                yield "val", text[c - pos :]
            pos = end
        return
    finder = _CutFinder(corpus.docs, c) if c < n else None
    seen = 0  # characters given to the finder

    def fed(chunks):
        nonlocal seen
        for text in chunks:
            if finder is not None:
                finder.feed(text, seen)
            seen += len(text)
            yield text
        if finder is not None:
            finder.finish(seen)  # the text has ended: before document_pieces gives its last piece

    pos = 0
    for piece in document_pieces(fed(corpus.text_chunks()), corpus.docs):
        end = pos + len(piece)
        cut = n if finder is None else finder.cut
        # cut still None: every separator seen so far ends before c, so this piece is training text
        if cut is None or cut >= end:
            yield "train", piece
        elif cut <= pos:
            yield "val", piece
        else:
            yield "train", piece[: cut - pos]
            yield "val", piece[cut - pos :]
        pos = end


@dataclass(frozen=True)
class Layout:
    """Where the two token streams lie in the token file: training ids [0, n_train), validation
    ids [n_train, n_train + n_val)."""

    n_train: int  # tokens of the training stream: <START> text [<END> without validation], or its documents
    n_val: int  # tokens of the validation stream (0: none)
    has_val: bool  # whether any text was held out (in document mode it may still hold no document)


def _nominal_cut(n: int, val_frac: float) -> int:
    if not 0.0 <= val_frac < 1.0:
        raise ValueError("val_frac must be in [0, 1)")
    return n if val_frac == 0.0 else int(round(n * (1.0 - val_frac)))


def total_tokens(corpus: Corpus, val_frac: float) -> int:
    """Tokens in the token file, both streams: known after pass 1."""
    if corpus.docs is not None:
        return corpus.doc_chars + 2 * corpus.doc_count
    _nominal_cut(corpus.chars, val_frac)  # checks val_frac
    return corpus.chars + 2  # <START> train <START> validation, or <START> train <END>


def check_sizes(corpus: Corpus, val_frac: float, batch: int, seq: int):
    """The one-line errors of a training text too small for the run, before any token is
    written. Document mode: the training tokens up to the last piece pass 1 saw end before the
    nominal cut are a lower bound; only when that bound is too small is the text read again up to
    the cut for the exact count (plan_layout)."""
    if corpus.docs is None:
        return check_layout(plan_layout(corpus, val_frac), batch, seq)
    c = _nominal_cut(corpus.chars, val_frac)
    at_least = max((tokens for end, tokens in corpus.marks if end <= c), default=0)
    if c >= corpus.chars:
        at_least = total_tokens(corpus, val_frac)
    if at_least >= 2 and at_least - 1 >= batch * seq:
        return
    check_layout(plan_layout(corpus, val_frac), batch, seq)


def plan_layout(corpus: Corpus, val_frac: float) -> Layout:
    """The sizes of the two streams, before any token is written: arithmetic in stream mode; in
    document mode a reading of the text up to where validation begins (the cut depends on it)."""
    n = corpus.chars
    c = _nominal_cut(n, val_frac)
    if corpus.docs is None:
        has_val = c < n
        return Layout(n_train=c + (1 if has_val else 2), n_val=(n - c + 1) if has_val else 0, has_val=has_val)
    total = corpus.doc_chars + 2 * corpus.doc_count
    if c >= n:
        return Layout(n_train=total, n_val=0, has_val=False)
    n_train = 0
    has_val = False
    for part, piece in _pieces(corpus, val_frac):
        if part == "val":
            has_val = True
            break
        documents = split_documents(piece, corpus.docs)
        n_train += sum(map(len, documents)) + 2 * len(documents)
    return Layout(n_train=n_train, n_val=total - n_train, has_val=has_val)


# ---------------------------------------------------------------------------- pass 2: the token file
@dataclass
class TokenFile:
    """The corpus as token ids in a memory-mapped .npy file (uint8, uint16 or uint32 by the
    vocabulary's size), opened read-only: training reads batches from `train`, validation scores
    `val`; data-parallel workers can map the same file."""

    path: str
    ids: np.ndarray  # (n_train + n_val,) the whole file, mapped
    layout: Layout
    meta: dict

    @property
    def train(self) -> np.ndarray:
        return self.ids[: self.layout.n_train]

    @property
    def val(self) -> np.ndarray | None:
        """The validation stream, or None when no text was held out."""
        return self.ids[self.layout.n_train :] if self.layout.has_val else None


def _token_meta(corpus: Corpus, vocab: Vocab, val_frac: float, layout: Layout) -> dict:
    """tokens.json: what tokens.npy holds. Its "tokens" list, the vocabulary in id order, makes it
    the vocabulary's JSON form too (Vocab.from_json reads it): `train --vocab RUN/tokens.json`."""
    return {"format": TOKENS_FORMAT[0], "version": TOKENS_FORMAT[1], "sha256": corpus.sha256, "chars": corpus.chars,
            "docs": corpus.docs, "val_frac": val_frac,
            "vocab_sha256": hashlib.sha256(vocab.to_json().encode("utf-8")).hexdigest(),
            "dtype": np.dtype(compact_dtype(vocab.size)).str, "n_train": layout.n_train, "n_val": layout.n_val,
            "has_val": layout.has_val, "tokens": list(vocab.tokens)}


def _write_token_meta(directory: str, meta: dict):
    """tokens.json, atomically (a temporary file beside it, then os.replace)."""
    meta_path = os.path.join(directory, TOKENS_META)
    with open_new(meta_path + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(meta_path + ".tmp", meta_path)


def regular_file(path: str) -> bool:
    """Whether `path` is a regular file (after links): a run directory's files are read only then,
    so a FIFO or a device put in their place is never opened (opening a FIFO blocks)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _read_small_json(path: str, limit: int):
    """The JSON object in a regular file of at most `limit` bytes; ValueError / OSError otherwise."""
    if not regular_file(path):
        raise ValueError(f"{path} is not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path} nests too deep") from None


# tokens.json lists the vocabulary: at most every code point, ~12 bytes each in its JSON form
TOKENS_META_LIMIT = 16 * (MAX_CODE_POINT + 1) + 4096
TOKENS_HASH_CHUNK = 1 << 24  # bytes of the token file hashed at a time (mapped, so nothing is copied)


def ids_digest(ids: np.ndarray) -> str:
    """The SHA-256 of a token array's bytes (tokens.json's ids_sha256): hashed a chunk at a time
    from the mapping, at the speed of the machine's SHA-256 (about 1.5 GB/s with SHA extensions)."""
    h = hashlib.sha256()
    flat = ids.reshape(-1).view(np.uint8)
    for start in range(0, len(flat), TOKENS_HASH_CHUNK):
        h.update(memoryview(np.ascontiguousarray(flat[start : start + TOKENS_HASH_CHUNK])))
    return h.hexdigest()


def _map(path: str, layout: Layout, meta: dict) -> TokenFile:
    if not regular_file(path):
        raise ValueError("token file is not a regular file")
    ids = np.load(path, mmap_mode="r", allow_pickle=False)
    if ids.ndim != 1 or ids.dtype.str != meta["dtype"] or len(ids) != layout.n_train + layout.n_val:
        raise ValueError("token file does not match its description")
    return TokenFile(path=path, ids=ids, layout=layout, meta=meta)


def map_token_file(path: str, meta: dict) -> TokenFile | None:
    """The token file at `path` if its description is `meta` (another process's TokenFile.meta:
    data-parallel workers map the file their rank 0 or their host built); None otherwise."""
    try:
        if _read_small_json(os.path.join(os.path.dirname(path), TOKENS_META), TOKENS_META_LIMIT) != meta:
            return None
        return _map(path, Layout(int(meta["n_train"]), int(meta["n_val"]), bool(meta["has_val"])), meta)
    except (OSError, ValueError, KeyError, TypeError, EOFError):  # EOFError: an empty .npy
        return None


def open_token_file(path: str, corpus: Corpus, vocab: Vocab, val_frac: float, notes: list | None = None
                    ) -> TokenFile | None:
    """The token file at `path` if it was built from this corpus, vocabulary and split, and its
    ids are the ones written (their SHA-256, recorded in tokens.json when it was built); None when
    it is missing, stale or damaged (then build it again). Why a file that exists is not used
    goes to `notes`, so the caller can say so."""
    meta_path = os.path.join(os.path.dirname(path), TOKENS_META)
    if not os.path.lexists(path) and not os.path.lexists(meta_path):
        return None  # a run from before token files, or a directory they were cleaned out of
    why = None
    try:
        meta = _read_small_json(meta_path, TOKENS_META_LIMIT)
        layout = Layout(int(meta["n_train"]), int(meta["n_val"]), bool(meta["has_val"]))
        want = _token_meta(corpus, vocab, val_frac, layout)
        recorded = meta.get("ids_sha256")
        described = {k: v for k, v in meta.items() if k != "ids_sha256"}
        # a description from before it listed the vocabulary (pinned by vocab_sha256 all the same)
        # is brought up to date once the ids check out
        upgrade = "tokens" not in described and described == {k: v for k, v in want.items() if k != "tokens"}
        if described != want and not upgrade:
            why = "it was built from another corpus, vocabulary or split"
        elif not isinstance(recorded, str):
            why = "no checksum of its ids was recorded (an older charrnn built it)"
        else:
            tokens = _map(path, layout, meta)
            if ids_digest(tokens.ids) != recorded:  # damaged in place, its description intact
                why = "its ids do not match the checksum recorded when it was built (the file was damaged)"
            else:
                if upgrade:
                    try:
                        _write_token_meta(os.path.dirname(path), dict(want, ids_sha256=recorded))
                        tokens.meta = dict(want, ids_sha256=recorded)
                    except OSError:
                        pass
                return tokens
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError) as e:  # EOFError: an empty .npy
        why = f"it cannot be read ({getattr(e, 'strerror', None) or e})"
    if notes is not None:
        notes.append(f"note: rebuilding {path}: {why}")
    return None


def build_token_file(corpus: Corpus, vocab: Vocab, val_frac: float, path: str) -> TokenFile:
    """Encode the corpus chunk by chunk into the token file at `path` (a temporary file beside it,
    then os.replace; its description, tokens.json, after it) and map it. The streams are the
    whole-text pipeline's: stream mode <START> train [<END> when nothing is held out], then
    <START> validation; document mode <START> doc <END> for every document of each part (where
    validation begins is found on the way, so the text is read once more, not twice)."""
    dtype = np.dtype(compact_dtype(vocab.size))
    total = total_tokens(corpus, val_frac)
    planned = plan_layout(corpus, val_frac) if corpus.docs is None else None
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    marker = np.array([START_ID, END_ID], dtype=dtype)
    written = {"train": 0, "val": 0}
    digest = hashlib.sha256()  # of the ids as written: resume checks it (open_token_file)
    saw_val = [False]  # document mode: whether any text was held out
    try:
        with open_new(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (total,)})

            def put(part, ids):
                view = memoryview(np.ascontiguousarray(ids))  # ids are in the file's dtype already
                f.write(view)
                digest.update(view)
                written[part] += len(ids)

            if corpus.docs is None:
                put("train", marker[:1])
                for part, text in _pieces(corpus, val_frac):
                    if part == "val" and not written["val"]:
                        put("val", marker[:1])
                    put(part, vocab.encode(text, unknown="unk", dtype=dtype))
                if not planned.has_val:
                    put("train", marker[1:])
            else:
                for part, text in _pieces(corpus, val_frac):
                    saw_val[0] = saw_val[0] or part == "val"
                    put(part, _wrap_documents(vocab, split_documents(text, corpus.docs), "unk", dtype))
            f.flush()
            os.fsync(f.fileno())
        layout = Layout(written["train"], written["val"], has_val=saw_val[0] if planned is None else planned.has_val)
        if written["train"] + written["val"] != total or planned not in (None, layout):
            raise DataError(f"the corpus {', '.join(corpus.paths)} changed while it was being read; try again")
        meta = dict(_token_meta(corpus, vocab, val_frac, layout), ids_sha256=digest.hexdigest())
        os.replace(tmp, path)
        _write_token_meta(directory, meta)
    except BaseException as e:
        for p in (tmp, os.path.join(directory, TOKENS_META) + ".tmp"):
            try:
                os.unlink(p)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise DataError(f"could not write {path}: {e.strerror or e}") from None
        raise
    return _map(path, layout, meta)


def check_layout(layout: Layout, batch: int, seq: int):
    """The one-line errors of a training text too small for the run."""
    if layout.n_train < 2:
        raise DataError("the training text is empty after removing the validation split")
    if layout.n_train - 1 < batch * seq:
        raise DataError(
            f"the corpus is too small for one batch: {layout.n_train - 1} training tokens, but --batch {batch} "
            f"x --seq {seq} needs {batch * seq}; use a smaller --batch/--seq or a larger text"
        )


# ---------------------------------------------------------------------------- batches
class BatchStream:
    """B contiguous streams through a token sequence, read T steps at a time.

    The token sequence of length N is cut into B streams of S = (N - 1) // B steps each; stream b
    holds tokens [b*S, b*S + S] (one extra for the last target). A batch at position p
    (0 <= p < S) is gathered straight from the ids, which may be a memory-mapped token file:
    x[t, b] = ids[b*S + p + t] and y[t, b] = ids[b*S + p + t + 1], so nothing the size of the
    corpus is copied. The position p is all that is needed to resume.
    """

    def __init__(self, ids: np.ndarray, batch: int):
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.ids = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
        self.B = batch
        self.S = (len(self.ids) - 1) // batch
        if self.S < 1:
            raise DataError(
                f"the training text is too small: {len(self.ids)} tokens cannot make {batch} streams of at least "
                "one step; use a smaller --batch or a larger corpus"
            )
        self._starts = np.arange(batch, dtype=np.int64) * self.S  # (B,) where each stream begins
        self.n_tokens = len(self.ids)

    def batches_per_epoch(self, T: int) -> int:
        return -(-self.S // T)

    def get(self, p: int, T: int, b0: int = 0, b1: int | None = None):
        """Inputs and targets for steps p .. p+T-1 (shorter at the end of an epoch), as int32 (T, B);
        with b0, b1: streams b0 .. b1-1 only, (T, b1-b0), gathered alone (a data-parallel worker
        reads only the pages of its own streams)."""
        if not 0 <= p < self.S:
            raise IndexError(f"position {p} outside [0, {self.S})")
        end = min(p + T, self.S)
        starts = self._starts[b0:b1]
        grid = self.ids[np.arange(p, end + 1, dtype=np.int64)[:, None] + starts[None, :]]  # (T+1, B)
        grid = grid.astype(np.int32)
        return grid[:-1], grid[1:]


def remove_stale_token_temps(directory: str) -> list[str]:
    """Remove what a killed build_token_file leaves in a run directory (.tokens.npy.<pid>.tmp and
    tokens.json.tmp), and nothing else. The caller must hold the run directory's lock: a live
    build in another process would otherwise lose its file."""
    pattern = re.compile(r"\.%s\.\d+\.tmp|%s\.tmp" % (re.escape(TOKENS_FILE), re.escape(TOKENS_META)))
    try:
        return remove_files(directory, pattern)
    except OSError as e:
        raise DataError(f"{e.filename or directory}: cannot clean up: {e.strerror or e}") from None
