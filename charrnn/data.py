"""Reading corpora and cutting them into batches for truncated backprop-through-time.

What it does: files and `-` (stdin), strict UTF-8 (or another --encoding), binary detection, BOM
and line-ending normalisation, stream and document modes, a contiguous train/validation split and
the B-stream batch layout. What it does not do: anything with models or the command line.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

from charrnn.errors import DataError
from charrnn.vocab import END_ID, START_ID, Vocab

DOC_MODES = ("line", "blank")
_BLANK_SPLIT = re.compile(r"\n[ \t]*\n")


# ---------------------------------------------------------------------------- reading text
def _source_name(path: str) -> str:
    return "<stdin>" if path == "-" else path


def read_bytes(path: str) -> bytes:
    """The raw bytes of a file, or of stdin for `-`, with one-line errors for the usual mistakes."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a text file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def decode_text(data: bytes, name: str, encoding: str | None = None) -> str:
    """Bytes to text: strict decoding, binary detection, BOM removed, newlines normalised to \\n.

    With the default UTF-8, a NUL byte means binary input; otherwise the first undecodable byte is
    reported with its offset.
    """
    enc = (encoding or "utf-8").lower().replace("_", "-")
    is_utf8 = enc in ("utf-8", "utf8", "utf-8-sig")
    if is_utf8:
        nul = data.find(b"\x00")
        if nul >= 0:
            raise DataError(f"{name}: looks like a binary file (NUL byte at offset {nul}), not text")
    try:
        text = data.decode(encoding or "utf-8", errors="strict")
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 1].hex()
        hint = "; if the file is in another encoding, pass --encoding" if is_utf8 else ""
        raise DataError(
            f"{name}: not valid {e.encoding.upper()} at byte offset {e.start} (byte 0x{bad}){hint}"
        ) from None
    if not is_utf8:
        nul = text.find("\x00")
        if nul >= 0:
            raise DataError(f"{name}: looks like a binary file (NUL character at position {nul}), not text")
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        # Universal newlines, as Python's text mode: CRLF and lone CR both become \n.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def read_text(path: str, encoding: str | None = None) -> str:
    """One corpus file (or stdin) as normalised text; an empty file is an error."""
    name = _source_name(path)
    text = decode_text(read_bytes(path), name, encoding)
    if not text:
        raise DataError(f"{name}: is empty")
    return text


def read_corpus(paths, encoding: str | None = None) -> "Corpus":
    """Several files (or `-`) concatenated in order, as `cat` would."""
    paths = list(paths)
    if not paths:
        raise DataError("no corpus given")
    if paths.count("-") > 1:
        raise DataError("stdin ('-') can be given only once")
    texts = [read_text(p, encoding) for p in paths]
    text = "".join(texts)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return Corpus(text=text, paths=tuple(paths), sha256=digest)


@dataclass(frozen=True)
class Corpus:
    text: str
    paths: tuple
    sha256: str  # of the normalised text: resume checks it, so a changed corpus is refused

    @property
    def name(self) -> str:
        """A short name for the run directory: the stem of the first file."""
        first = self.paths[0]
        if first == "-":
            return "stdin"
        return os.path.splitext(os.path.basename(os.path.normpath(first)))[0] or "corpus"


# ---------------------------------------------------------------------------- documents and tokens
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
    documents = split_documents(text, docs)
    if not documents:
        return np.zeros(0, dtype=dtype)
    # Encode all documents in one call (fast), then insert the markers at the boundaries.
    if unknown == "skip":
        # lengths change when characters are dropped, so encode document by document
        encoded = [vocab.encode(d, unknown="skip", dtype=dtype) for d in documents]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        body = np.concatenate(encoded) if encoded else np.zeros(0, dtype=dtype)
    else:
        lengths = np.array([len(d) for d in documents], dtype=np.int64)
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


def corpus_vocab(text: str, docs: str | None) -> Vocab:
    """The vocabulary a model trained on `text` needs: every character, but in document mode only
    those inside documents (the separators become <START>/<END>, so line mode never emits \n)."""
    if docs is None:
        return Vocab.from_text(text)
    return Vocab.from_text("".join(split_documents(text, docs)))


def compact_dtype(vocab_size: int):
    """The smallest unsigned integer type that holds every id (memory: 100 MB of text -> 100 MB of ids)."""
    if vocab_size <= 256:
        return np.uint8
    if vocab_size <= 65536:
        return np.uint16
    return np.int32


@dataclass(frozen=True)
class Split:
    train_text: str
    val_text: str


def split_text(text: str, val_frac: float, docs: str | None) -> Split:
    """A contiguous split: the last `val_frac` of the text is held out for validation.

    In document mode the cut moves forward to the next document boundary so no document is split.
    """
    if not 0.0 <= val_frac < 1.0:
        raise ValueError("val_frac must be in [0, 1)")
    if val_frac == 0.0:
        return Split(text, "")
    cut = int(round(len(text) * (1.0 - val_frac)))
    if docs is not None:
        # move the cut to the end of the first separator that ends at or after it, using the same
        # separators as split_documents (so a cut already on a boundary stays there)
        sep = re.compile(r"\n") if docs == "line" else _BLANK_SPLIT
        start = max(cut - 1, 0) if docs == "line" else _blank_scan_start(text, cut)
        for m in sep.finditer(text, start):
            if m.end() >= cut:
                cut = m.end()
                break
        else:
            cut = len(text)
    return Split(text[:cut], text[cut:])


def _blank_scan_start(text: str, cut: int) -> int:
    """Where to start looking for a blank-line separator that may straddle `cut`: the start of the
    run of newlines, spaces and tabs that `cut` sits in (so huge texts are not scanned from 0)."""
    i = cut
    while i > 0 and text[i - 1] in " \t\n":
        i -= 1
    return i


# ---------------------------------------------------------------------------- batches
class BatchStream:
    """B contiguous streams through a token sequence, read T steps at a time.

    The token sequence of length N is cut into B streams of S = (N - 1) // B steps each; stream b
    holds tokens [b*S, b*S + S] (one extra for the last target). They are stored time-major as a
    (S + 1, B) array, so a batch's inputs `x = grid[p : p + T]` and targets `y = grid[p + 1 : p + T + 1]`
    are contiguous (T, B) slices. The position p (0 <= p < S) is all that is needed to resume.
    """

    def __init__(self, ids: np.ndarray, batch: int):
        ids = np.asarray(ids)
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.B = batch
        self.S = (len(ids) - 1) // batch
        if self.S < 1:
            raise DataError(
                f"the training text is too small: {len(ids)} tokens cannot make {batch} streams of at least "
                "one step; use a smaller --batch or a larger corpus"
            )
        S, B = self.S, batch
        # grid[t, b] = ids[b*S + t], copied stream by stream: no index array, so the only memory
        # beyond the ids themselves is the grid (same dtype, same size).
        self.grid = np.empty((S + 1, B), dtype=ids.dtype)
        for b in range(B):
            self.grid[:, b] = ids[b * S : b * S + S + 1]
        self.n_tokens = len(ids)

    def batches_per_epoch(self, T: int) -> int:
        return -(-self.S // T)

    def get(self, p: int, T: int):
        """Inputs and targets for steps p .. p+T-1 (shorter at the end of an epoch), as int32 (T, B)."""
        if not 0 <= p < self.S:
            raise IndexError(f"position {p} outside [0, {self.S})")
        end = min(p + T, self.S)
        x = self.grid[p:end].astype(np.int32)
        y = self.grid[p + 1 : end + 1].astype(np.int32)
        return x, y
