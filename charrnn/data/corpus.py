"""Pass 1: one reading of the corpus, and what it tells (`Corpus`).

What it does: the corpus read once in chunks, concatenated in order as `cat` would: the hash of the
normalised text (resume checks it), its length, its vocabulary (of the documents, in document
mode), the document counts and, in document mode, marks that bound the training tokens before any
cut. The text itself is never kept: `Corpus.text_chunks()` reads it again.

Not here: decoding (reading.py), the split (split.py), the token file (tokenfile.py), capping the
vocabulary (vocab.capped_vocab).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from charrnn.config import DEFAULT_MAX_INPUT
from charrnn.data.documents import DOC_MODES, document_pieces, split_documents
from charrnn.data.reading import CHUNK_BYTES, Source
from charrnn.errors import DataError
from charrnn.vocab import CharSet, Vocab, describe_chars


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
