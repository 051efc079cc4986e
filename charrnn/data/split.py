"""The contiguous train/validation split: where validation begins, and the two token streams.

The text is cut once, at a nominal cut of round(N * (1 - val_frac)) characters. Each mode has one
splitter, which knows where its cut lies, the text on either side of it, the sizes of the two
streams and the ids they hold:

    StreamSplitter    stream mode: the cut is the nominal one; the streams are <START> train
                      [<END> when nothing is held out] and <START> validation
    DocumentSplitter  --docs: the cut moves forward to the end of the next document separator,
                      found while the text streams past, so no document is cut in two; the
                      streams are <START> doc <END> for every document of each side

`splitter(corpus, val_frac)` picks one by the corpus's mode; total_tokens, plan_split and
check_sizes ask it. A new document mode needs nothing here beyond the separator search of
_CutFinder.

Not here: writing the streams to disk (tokenfile.py), reading or splitting the text into documents
(reading.py, documents.py), batches (batches.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from charrnn.data.corpus import Corpus
from charrnn.data.documents import BLANK_SEPARATOR, document_pieces, encode_documents, split_documents
from charrnn.errors import DataError
from charrnn.vocab import END_ID, START_ID, Vocab


@dataclass(frozen=True)
class Split:
    """Where the two token streams lie in the token file: training ids [0, n_train), validation
    ids [n_train, n_train + n_val)."""

    n_train: int  # tokens of the training stream: <START> text [<END> without validation], or its documents
    n_val: int  # tokens of the validation stream (0: none)
    has_val: bool  # whether any text was held out (in document mode it may still hold no document)


def nominal_cut(n: int, val_frac: float) -> int:
    """Where the validation text begins in a text of `n` characters before any document rule:
    round(n * (1 - val_frac)), or n when nothing is held out."""
    if not 0.0 <= val_frac < 1.0:
        raise ValueError("val_frac must be in [0, 1)")
    return n if val_frac == 0.0 else int(round(n * (1.0 - val_frac)))


def check_split(split: Split, batch: int, seq: int):
    """The one-line errors of a training text too small for the run."""
    if split.n_train < 2:
        raise DataError("the training text is empty after removing the validation split")
    if split.n_train - 1 < batch * seq:
        raise DataError(
            f"the corpus is too small for one batch: {split.n_train - 1} training tokens, but --batch {batch} "
            f"x --seq {seq} needs {batch * seq}; use a smaller --batch/--seq or a larger text"
        )


class Splitter:
    """The split of one corpus at one val_frac: what both modes answer (StreamSplitter,
    DocumentSplitter)."""

    def __init__(self, corpus: Corpus, val_frac: float):
        self.corpus = corpus
        self.val_frac = val_frac

    @cached_property
    def cut(self) -> int:
        """The nominal cut, in characters (ValueError for a val_frac outside [0, 1))."""
        return nominal_cut(self.corpus.chars, self.val_frac)

    def pieces(self):
        """(part, text) in order, part "train" or "val": the text read again and cut where the
        whole-text split cut it."""
        raise NotImplementedError

    def total_tokens(self) -> int:
        """Tokens of both streams: known after pass 1."""
        raise NotImplementedError

    def plan(self) -> Split:
        """The sizes of the two streams, before any token is written."""
        raise NotImplementedError

    def check_sizes(self, batch: int, seq: int):
        """The one-line errors of a training text too small for the run, before any token is
        written: those of check_split(plan(), batch, seq)."""
        check_split(self.plan(), batch, seq)

    def token_runs(self, vocab: Vocab, dtype):
        """(part, ids) in the token file's order, ids of `dtype`: the training stream, then the
        validation stream, encoded a piece at a time."""
        raise NotImplementedError

    def consistent(self, split: Split) -> bool:
        """Whether a token file written as `split` (token_runs' sizes, has_val: whether a "val"
        run came) is what pass 1 implies; False: the corpus changed while it was read."""
        raise NotImplementedError


def _at_cut(text: str, pos: int, cut: int | None):
    """The text that starts at position `pos` of the corpus, as (part, text): the part before
    `cut` is training text, the part from it validation text (`cut` None: all training)."""
    end = pos + len(text)
    if cut is None or cut >= end:
        yield "train", text
    elif cut <= pos:
        yield "val", text
    else:
        yield "train", text[: cut - pos]
        yield "val", text[cut - pos :]


class StreamSplitter(Splitter):
    """Stream mode: one stream <START> text <END>, cut at the nominal cut, the training ids
    <START> train [<END> when nothing is held out], the validation ids <START> validation."""

    def pieces(self):
        c = self.cut
        pos = 0
        for text in self.corpus.text_chunks():
            yield from _at_cut(text, pos, c)
            pos += len(text)

    def total_tokens(self) -> int:
        self.cut  # checks val_frac (the document mode's count does not need it, and never checked)
        return self.corpus.chars + 2  # <START> train <START> validation, or <START> train <END>

    def plan(self) -> Split:
        """Arithmetic: the sizes follow from N and the cut."""
        n, c = self.corpus.chars, self.cut
        has_val = c < n
        return Split(n_train=c + (1 if has_val else 2), n_val=(n - c + 1) if has_val else 0, has_val=has_val)

    def token_runs(self, vocab: Vocab, dtype):
        marker = np.array([START_ID, END_ID], dtype=dtype)
        yield "train", marker[:1]
        in_val = False
        for part, text in self.pieces():
            if part == "val" and not in_val:
                yield "val", marker[:1]
                in_val = True
            yield part, vocab.encode(text, unknown="unk", dtype=dtype)
        if not self.plan().has_val:
            yield "train", marker[1:]

    def consistent(self, split: Split) -> bool:
        return split == self.plan()


class DocumentSplitter(Splitter):
    """Document mode: the cut moved forward to the end of the first document separator that ends
    at or after the nominal cut (_CutFinder); every piece ends at a separator, so each encodes on
    its own as <START> doc <END> for every document."""

    def pieces(self):
        n, c, docs = self.corpus.chars, self.cut, self.corpus.docs
        finder = _CutFinder(docs, c) if c < n else None
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
        for piece in document_pieces(fed(self.corpus.text_chunks()), docs):
            # cut still None: every separator seen so far ends before c, so this piece is training text
            yield from _at_cut(piece, pos, n if finder is None else finder.cut)
            pos += len(piece)

    def total_tokens(self) -> int:
        return self.corpus.doc_chars + 2 * self.corpus.doc_count

    def plan(self) -> Split:
        """A reading of the text up to where validation begins (the cut depends on it)."""
        total = self.total_tokens()
        if self.cut >= self.corpus.chars:
            return Split(n_train=total, n_val=0, has_val=False)
        n_train = 0
        has_val = False
        for part, piece in self.pieces():
            if part == "val":
                has_val = True
                break
            documents = split_documents(piece, self.corpus.docs)
            n_train += sum(map(len, documents)) + 2 * len(documents)
        return Split(n_train=n_train, n_val=total - n_train, has_val=has_val)

    def check_sizes(self, batch: int, seq: int):
        """The training tokens up to the last piece pass 1 saw end before the nominal cut are a
        lower bound; only when that bound is too small is the text read again up to the cut for
        the exact count (plan)."""
        c = self.cut
        at_least = max((tokens for end, tokens in self.corpus.marks if end <= c), default=0)
        if c >= self.corpus.chars:
            at_least = self.total_tokens()
        if at_least >= 2 and at_least - 1 >= batch * seq:
            return
        check_split(self.plan(), batch, seq)

    def token_runs(self, vocab: Vocab, dtype):
        for part, text in self.pieces():
            yield part, encode_documents(vocab, split_documents(text, self.corpus.docs), "unk", dtype)

    def consistent(self, split: Split) -> bool:
        return split.n_train + split.n_val == self.total_tokens()


def splitter(corpus: Corpus, val_frac: float) -> Splitter:
    """The split of `corpus` at `val_frac`, by the corpus's mode."""
    return StreamSplitter(corpus, val_frac) if corpus.docs is None else DocumentSplitter(corpus, val_frac)


def total_tokens(corpus: Corpus, val_frac: float) -> int:
    """Tokens in the token file, both streams: known after pass 1."""
    return splitter(corpus, val_frac).total_tokens()


def plan_split(corpus: Corpus, val_frac: float) -> Split:
    """The sizes of the two streams, before any token is written: arithmetic in stream mode; in
    document mode a reading of the text up to where validation begins."""
    return splitter(corpus, val_frac).plan()


def check_sizes(corpus: Corpus, val_frac: float, batch: int, seq: int):
    """The one-line errors of a training text too small for the run, before any token is
    written (in document mode, reading the text again only when pass 1's counts cannot tell)."""
    splitter(corpus, val_frac).check_sizes(batch, seq)


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
        m = BLANK_SEPARATOR.search(lead + text)
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
