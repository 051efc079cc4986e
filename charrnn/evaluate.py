"""Scoring text with a model: mean negative log-likelihood per character, bits per character and
perplexity, exactly as docs/design.md defines them. `charrnn eval` and training's validation both use
this module, so the two numbers agree by construction.

Definition. Stream mode: the text is fed as <START> c1 ... cN from a zero state and every c1..cN is
scored (no <END>). Document mode: the model sees <START> d1 <END> <START> d2 <END> ... as in
training, with the state carried across documents; every character and every <END> is scored, the
<START> that follows an <END> is not (it is certain by construction). Characters outside the
vocabulary are scored as <UNK> and counted separately.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from charrnn.data import document_pieces, encode_stream
from charrnn.vocab import START_ID, UNK_ID, Vocab

SPAN = 16384  # positions per call to the model; the state is carried between calls, so the result is exact


class Cancelled(Exception):
    """Scoring stopped early because its `stop` callback asked it to (an interrupt)."""


@dataclass
class Score:
    nll: float  # total negative log-likelihood, nats
    tokens: int  # positions scored (characters, plus one <END> per document in document mode)
    unk: int  # scored positions whose character is not in the vocabulary

    @property
    def nats(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def bits(self) -> float:
        return self.nats / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats) if self.tokens else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(nats_per_char=self.nats, bits_per_char=self.bits, perplexity=self.perplexity)
        return d


class StreamScorer:
    """Scores a token stream fed in pieces of any size, from a zero state, exactly as score_tokens
    scores it whole: the model sees the same spans of SPAN positions (aligned to the start of the
    stream) and the sums are taken in the same order, so the number is the same to the last bit.
    Memory: one piece and one span, whatever the length of the stream."""

    def __init__(self, model, progress=None):
        self.model = model
        self.progress = progress
        self.h, self.c = model.zero_state(1)
        self.rest = np.zeros(0, dtype=np.int32)  # tokens not yet scored as targets; the first is the next input
        self.total, self.scored, self.unk = 0.0, 0, 0

    def feed(self, tokens: np.ndarray):
        """The next tokens of the stream (the first piece starts with <START>)."""
        tokens = np.asarray(tokens)
        data = np.concatenate([self.rest, tokens.astype(np.int32)]) if len(self.rest) else tokens
        full = max(len(data) - 1, 0) // SPAN  # spans whose SPAN + 1 tokens are all here
        for k in range(full):
            self._span(data[k * SPAN : k * SPAN + SPAN + 1])
        self.rest = np.array(data[full * SPAN :], dtype=np.int32)  # a copy: `tokens` may be a mapped file

    def finish(self) -> Score:
        """The score of everything fed; the last, shorter span is scored here."""
        if len(self.rest) >= 2:
            self._span(self.rest)
            self.rest = self.rest[-1:]
        return Score(self.total, self.scored, self.unk)

    def _span(self, tokens: np.ndarray):
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)  # (n + 1,) inputs tokens[:-1], targets tokens[1:]
        y = tokens[1:]
        nll = self.model.score(tokens[:-1], y, self.h, self.c)  # carries (h, c) in place
        keep = y != START_ID
        self.total += float(nll[keep].sum())
        self.scored += int(keep.sum())
        self.unk += int((y[keep] == UNK_ID).sum())
        if self.progress is not None:
            self.progress(len(y))


def score_tokens(model, tokens: np.ndarray, progress=None, stop=None) -> Score:
    """Score a token stream (starting with <START>) from a zero state, one stream, in spans that
    carry the state (so the result does not depend on SPAN; spans pace the progress bar, and an
    interrupt: `stop()` is asked before each span, and Cancelled raised when it says so).
    `tokens` may be a memory-mapped file: it is converted span by span, never whole."""
    scorer = StreamScorer(model, progress)
    for p in range(0, len(tokens), SPAN):
        if stop is not None and stop():
            raise Cancelled
        scorer.feed(tokens[p : p + SPAN])
    return scorer.finish()


def score_text(model, vocab: Vocab, text: str, docs: str | None = None, progress=None) -> Score:
    """Score a text held whole (small texts, tests); score_chunks does the same in bounded memory."""
    tokens = encode_stream(vocab, text, docs, unknown="unk", end=docs is not None)
    return score_tokens(model, tokens, progress=progress)


def score_chunks(model, vocab: Vocab, chunks, docs: str | None = None, progress=None) -> Score:
    """Score a text given as chunks of normalised text (data.Source.chunks()), with the state
    carried across them: the same number as score_text on the joined text. Stream mode: <START>
    then each chunk's ids. Document mode: the text in pieces that end at document separators, each
    wrapped as score_text wraps its documents."""
    scorer = StreamScorer(model, progress)
    if docs is None:
        scorer.feed(np.array([START_ID], dtype=np.int32))
        for text in chunks:
            scorer.feed(vocab.encode(text, unknown="unk", dtype=np.int32))
    else:
        for piece in document_pieces(chunks, docs):
            scorer.feed(encode_stream(vocab, piece, docs, unknown="unk"))
    return scorer.finish()
