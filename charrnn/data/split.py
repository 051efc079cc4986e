"""The contiguous train/validation split: where validation begins, and the sizes of the two streams.

Stream mode cuts at round(N * (1 - val_frac)); document mode moves that cut forward to the end of
the next document separator, found while the text streams past, so no document is cut in two.

Not here: writing the streams (tokenfile.py), reading the text (reading.py, corpus.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from charrnn.data.corpus import Corpus
from charrnn.data.documents import BLANK_SEPARATOR, document_pieces, split_documents
from charrnn.errors import DataError


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



def check_layout(layout: Layout, batch: int, seq: int):
    """The one-line errors of a training text too small for the run."""
    if layout.n_train < 2:
        raise DataError("the training text is empty after removing the validation split")
    if layout.n_train - 1 < batch * seq:
        raise DataError(
            f"the corpus is too small for one batch: {layout.n_train - 1} training tokens, but --batch {batch} "
            f"x --seq {seq} needs {batch * seq}; use a smaller --batch/--seq or a larger text"
        )

