"""Per-character scores: what the model expected at every position of a text, for
`charrnn eval --per-char` and the page of `charrnn viz` (which adds the hidden states, viz.py).

Each scored position gets its character, its log-probability (natural log), its rank among the
model's guesses (1: the model's first guess) and the model's top guesses with their probabilities.

The positions and log-probabilities are evaluate.py's, to the bit: the text is fed as eval feeds
it (stream mode <START> c1..cN from a zero state; document mode <START> doc <END> per document,
the <START> after an <END> not scored), in the same spans of evaluate.SPAN positions, through
the same Model.score kernel. So the lines of a file sum to eval's total (up to the order of the
float additions). The guesses and ranks come from Model.step run beside it over the same tokens
(float32 logits, softmax in float64): they agree with the log-probabilities to float32 rounding.

Not here: reading files (data.Source) or writing JSON (cli/eval.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charrnn.data import document_pieces, split_documents
from charrnn.evaluate import StreamScorer
from charrnn.vocab import END_ID, START_ID, UNK_ID, Vocab



@dataclass
class Position:
    """One scored position. `char` is the text's own character (<END> at a document's end), even
    when the model read it as <UNK> (`unk` True)."""

    char: str
    logprob: float  # natural log of the model's probability of this position's token
    rank: int  # 1 + the number of tokens the model found strictly more probable
    top: list  # [[token, probability], ...], most probable first
    unk: bool = False

    def to_dict(self) -> dict:
        lp = self.logprob if np.isfinite(self.logprob) else None  # JSON has no -Infinity
        d = {"char": self.char, "logprob": lp, "rank": self.rank, "top": self.top}
        if self.unk:
            d["unk"] = True
        return d


class PerCharScorer(StreamScorer):
    """evaluate.StreamScorer that also hands out a Position for every scored position. Feed it
    tokens with the text's characters beside them (None where a position holds a special token);
    `positions()` drains what the spans scored so far."""

    def __init__(self, model, vocab: Vocab, top: int = 5, progress=None, keep_hidden: str | None = None):
        super().__init__(model, progress)
        # keep_hidden (charrnn viz): "h" keeps each layer's h after every input token, "cell" an
        # LSTM's tanh(c) (the cell state squashed to -1..1, as in Karpathy's figures); (L, H) per token
        if keep_hidden not in (None, "h", "cell"):
            raise ValueError("keep_hidden must be None, 'h' or 'cell'")
        self.keep = keep_hidden
        self.hidden: list | None = [] if keep_hidden else None
        self.vocab = vocab
        self.top = max(0, min(int(top), vocab.size))
        self.state = model.new_state(1)  # Model.step's own state, fed the same tokens as the scorer's
        self.rest_chars: list = []
        self._off = 0
        self.out: list[Position] = []
        self.score = None  # the evaluate.Score, once iter_positions has scored the whole text

    def feed_chars(self, tokens: np.ndarray, chars: list):
        if len(tokens) != len(chars):
            raise ValueError("one character (or None) per token")
        # aligned with self.rest + tokens from _off on; each span moves _off past its inputs
        self.rest_chars = self.rest_chars[self._off :] + list(chars)
        self._off = 0
        self.feed(tokens)

    def hidden_now(self) -> np.ndarray:
        """(L, H) the kept activation of Model.step's state as it stands."""
        if self.keep == "cell":
            return np.tanh(self.state.c[:, 0, :])
        return self.state.h[:, 0, :].copy()

    def positions(self) -> list[Position]:
        out, self.out = self.out, []
        return out

    def _span(self, tokens: np.ndarray):
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)  # (n + 1,): inputs tokens[:-1], targets tokens[1:]
        n = len(tokens) - 1
        o = self._off
        chars = self.rest_chars[o + 1 : o + n + 1]  # the targets' characters (rest_chars[o]: the first input's)
        self._off = o + n
        logits = np.empty((n, self.model.cfg.vocab_size), dtype=np.float64)  # (n, V)
        for t in range(n):
            logits[t] = self.model.step(tokens[t : t + 1], self.state)[0]
            if self.hidden is not None:
                self.hidden.append(self.hidden_now())
        # the positions and numbers evaluate.StreamScorer._span counts, from the same kernel
        y = tokens[1:]
        nll = self.model.score(tokens[:-1], y, self.h, self.c)  # carries (h, c) in place
        keep = y != START_ID
        self.total += float(nll[keep].sum())
        self.scored += int(keep.sum())
        self.unk += int((y[keep] == UNK_ID).sum())
        logp = logits - logits.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))  # (n, V) log-softmax
        k = self.top
        rows = np.flatnonzero(keep)
        ranks = 1 + (logp[rows] > logp[rows, y[rows]][:, None]).sum(axis=1)  # (n_kept,)
        if k:
            # the k best of each row (argpartition), then in order: best first, ties by id
            part = np.argpartition(-logp[rows], k - 1, axis=1)[:, :k] if k < logp.shape[1] else \
                np.broadcast_to(np.arange(logp.shape[1]), (len(rows), logp.shape[1]))
            vals = np.take_along_axis(logp[rows], part, axis=1)
            order = np.take_along_axis(part, np.lexsort((part, -vals), axis=1), axis=1)  # (n_kept, k)
            probs = np.exp(np.take_along_axis(logp[rows], order, axis=1)).tolist()
            order = order.tolist()
        table = self.vocab.tokens
        for j, t in enumerate(rows.tolist()):
            target = int(y[t])
            rank = int(ranks[j])
            top = [[table[i], p] for i, p in zip(order[j], probs[j])] if k else []
            ch = chars[t] if t < len(chars) and chars[t] is not None else table[target]
            self.out.append(Position(ch, -float(nll[t]), rank, top, unk=target == UNK_ID))
        if self.progress is not None:
            self.progress(n)


def iter_positions(scorer: PerCharScorer, chunks, docs: str | None = None):
    """Yield a Position for every scored position of a text given as chunks of normalised text
    (data.Source.chunks()), as the spans are scored; afterwards `scorer.score` holds the
    evaluate.Score of the whole text, the number evaluate.score_chunks gives. Memory: one span
    and one chunk (a document in document mode), whatever the length of the text."""
    vocab = scorer.vocab
    if docs is None:
        scorer.feed_chars(np.array([START_ID], dtype=np.int32), [None])
        for text in chunks:
            scorer.feed_chars(vocab.encode(text, unknown="unk", dtype=np.int32), list(text))
            yield from scorer.positions()
    else:
        for piece in document_pieces(chunks, docs):
            scorer.feed_chars(*_documents(vocab, piece, docs))
            yield from scorer.positions()
    scorer.score = scorer.finish()
    yield from scorer.positions()


def _documents(vocab: Vocab, piece: str, docs: str):
    """<START> doc <END> for each document of `piece`, as data.encode_stream builds it, with the
    documents' characters beside the tokens ("<END>" at each end, None at each <START>)."""
    chars: list = []
    ids = []
    for d in split_documents(piece, docs):
        chars.append(None)
        chars.extend(d)
        chars.append("<END>")
        ids.append(np.concatenate([[START_ID], vocab.encode(d, unknown="unk", dtype=np.int32), [END_ID]]))
    tokens = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
    return tokens, chars
