"""Scoring text with a model: mean negative log-likelihood per character, bits per character and
perplexity, exactly as DESIGN.md defines them. `charrnn eval` and training's validation both use
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

from charrnn.data import encode_stream
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


def score_tokens(model, tokens: np.ndarray, progress=None, stop=None) -> Score:
    """Score a token stream (starting with <START>) from a zero state, one stream, in spans that
    carry the state (so the result does not depend on SPAN; spans pace the progress bar, and an
    interrupt: `stop()` is asked before each span, and Cancelled raised when it says so)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    n = len(tokens) - 1
    total = 0.0
    scored = 0
    unk = 0
    if n <= 0:
        return Score(0.0, 0, 0)
    h, c = model.zero_state(1)
    for p in range(0, n, SPAN):
        if stop is not None and stop():
            raise Cancelled
        q = min(p + SPAN, n)
        y = tokens[p + 1 : q + 1]
        nll = model.score(tokens[p:q], y, h, c)
        keep = y != START_ID
        total += float(nll[keep].sum())
        scored += int(keep.sum())
        unk += int((y[keep] == UNK_ID).sum())
        if progress is not None:
            progress(q - p)
    return Score(total, scored, unk)


def score_text(model, vocab: Vocab, text: str, docs: str | None = None, progress=None) -> Score:
    tokens = encode_stream(vocab, text, docs, unknown="unk", end=docs is not None)
    return score_tokens(model, tokens, progress=progress)
