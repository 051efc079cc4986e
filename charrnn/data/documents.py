"""Documents (--docs line | blank) and the token streams a model sees.

What it does: splitting a text into documents, re-cutting a stream of text chunks into pieces that
end at document separators (with a bound on a document's length, so memory stays bounded), and
encoding text as ids: <START> text [<END>] in stream mode, <START> doc <END> per document.

Not here: reading files (reading.py), where validation begins (split.py), the token file
(tokenfile.py).
"""

from __future__ import annotations

import re

import numpy as np

from charrnn.config import DOC_MODES  # --docs: one document per line, or per block between blank lines
from charrnn.errors import DataError
from charrnn.vocab import END_ID, START_ID, Vocab

BLANK_SEPARATOR = re.compile(r"\n[ \t]*\n")  # --docs blank: a blank line (spaces and tabs allowed) between documents
# --docs: the longest document (characters) held whole; a text without separators is not documents
MAX_DOCUMENT_CHARS = 1 << 24


def split_documents(text: str, docs: str) -> list[str]:
    """The documents of a text: one per line (`line`) or per blank-line-separated block (`blank`).

    Empty documents are dropped.
    """
    if docs == "line":
        parts = text.split("\n")
    elif docs == "blank":
        parts = [p.strip("\n") for p in BLANK_SEPARATOR.split(text)]
    else:
        raise ValueError(f"docs must be one of {DOC_MODES}, not {docs!r}")
    return [p for p in parts if p.strip()]


def _could_end_separator(chunk: str, docs: str) -> bool:
    """Whether a document separator may end inside `chunk` (possibly begun before it)."""
    if docs == "line":
        return "\n" in chunk
    # a blank-line separator ends at a \n: inside the chunk, or begun before it when the chunk
    # starts with spaces/tabs and a \n
    return BLANK_SEPARATOR.search(chunk) is not None or re.match(r"[ \t]*\n", chunk) is not None


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
        first = buf.find("\n") if docs == "line" else BLANK_SEPARATOR.search(buf)
        first = (first if docs == "line" else first.start() if first else len(buf))
        if carried and first > max_doc:
            raise too_long()
        if len(chunk) > max_doc:  # a caller's chunks longer than the limit: every document of it counts
            pieces = buf.split("\n") if docs == "line" else BLANK_SEPARATOR.split(buf)
            if max(map(len, pieces[:-1]), default=0) > max_doc:
                raise too_long()
        if docs == "line":
            end = buf.rfind("\n") + 1
        else:
            # the last separator's end: matches found scanning from a separator's end are the
            # whole text's (the pattern has no look-behind), and a separator begun at the very end
            # of buf is not matched yet, so it stays in the carry
            end = 0
            for m in BLANK_SEPARATOR.finditer(buf):
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
    return encode_documents(vocab, split_documents(text, docs), unknown, dtype)


def encode_documents(vocab: Vocab, documents: list[str], unknown: str, dtype):
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

