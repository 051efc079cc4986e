"""Beam search over characters: the most probable continuations of a prime under the model's own
probabilities (temperature 1), for `charrnn sample --beam K`.

Each position is one step of every live hypothesis (K streams, plus one greedy stream), one
log-softmax and one top-K over the (K, V) scores, and a reordering of the state by the parents of
the survivors, all compiled (kernels/search.py; tests/beam_reference.py is the numpy search it
replaced). Sequences are rebuilt from back-pointers once the search ends, so nothing is printed
before then. The step's products are float32, or with `--precision bf16` bfloat16 operands with
float32 sums: faster where the CPU has them, and the texts found may differ.

What a hypothesis is, and how hypotheses compare:
- It ends at <END> (a model trained with --docs), at the first occurrence of a stop string (the
  string is not part of its text), or after `length` tokens (<END> and the stop string's
  characters count as tokens, as in sampling).
- It is ranked by its mean log-probability per token, over the tokens it consumed: its characters
  plus its terminator (<END>, or the stop string's characters); a hypothesis cut at `length` pays
  for no terminator. Hypotheses of one length (a stream model without --stop, where every one runs
  `length` characters) are therefore ranked by their total log-probability, the plain beam search
  objective; between lengths the mean keeps short documents from winning only by being short.
- A hypothesis that ends leaves the beam and takes one of its K slots: the search goes on with
  the others and ends when every slot is settled or after `length` positions.
- The greedy continuation (the argmax at every step, as `--temp 0` samples it) runs beside the
  beam as one more stream and competes in the final ranking, so the best sequence returned is never
  ranked below greedy decoding. With K = 1 the beam is greedy decoding itself and runs alone.

Not here: sampling (generate.py) and output (cli/sample.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charrnn.errors import CharrnnError, UsageError
from charrnn.kernels import search
from charrnn.vocab import END_ID, START_ID, UNK_ID, Vocab


@dataclass
class Hypothesis:
    """A settled sequence."""

    ids: np.ndarray  # token ids of its text: no <END>, no stop string
    text: str
    logprob: float  # log p(text | <START> prime), nats, temperature 1: its characters only
    score: float  # the ranking objective: mean log-probability per token consumed (text + terminator)
    tokens: int  # tokens consumed: its characters and its terminator
    end: str  # why it ended: length | end | stop
    greedy: bool = False  # from the greedy stream (kept over a beam hypothesis of the same text and score)


class StopMatcher:
    """A string matcher over token ids (the automaton of Knuth, Morris and Pratt): state j means the
    generated text ends with the first j characters of the stop string, m = len(stop) that it has
    just appeared. Advancing every hypothesis is one gather, table[state, token]."""

    def __init__(self, vocab: Vocab, stop: str):
        if not stop:
            raise UsageError("the stop string must not be empty")
        self.m = m = len(stop)
        V = vocab.size
        self.table = np.zeros((m + 1, V), dtype=np.int32)
        if any(ch not in vocab for ch in stop):
            return  # the model cannot produce it: every state stays 0
        pat = [vocab.id_of(ch) for ch in stop]
        self.table[0, pat[0]] = 1
        x = 0  # the state the automaton would be in after the pattern less its first character
        for j in range(1, m + 1):
            self.table[j] = self.table[x]  # a mismatch falls back as the shorter match would
            if j < m:
                self.table[j, pat[j]] = j + 1
                x = self.table[x, pat[j]]

    def advance(self, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return self.table[states, tokens]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64: (n, V) -> (n, V)."""
    z = logits.astype(np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return z - (m + np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)))


def top_flat(scores: np.ndarray, k: int) -> np.ndarray:
    """The flat indices of the k largest finite entries of `scores`, best first, ties in index
    order (fewer when fewer are finite)."""
    flat = scores.ravel()
    ok = np.flatnonzero(flat > -np.inf)  # NaN and -inf are never chosen
    if k >= ok.size:
        return ok[np.lexsort((ok, -flat[ok]))]
    if k == 1:
        return ok[[int(np.argmax(flat[ok]))]]  # the first of tied maxima
    part = ok[np.argpartition(-flat[ok], k - 1)[:k]]
    return part[np.lexsort((part, -flat[part]))]


def banned_ids(V: int, documents: bool) -> np.ndarray:
    """Tokens a hypothesis never takes: <START>, <UNK>, and <END> of a stream model (as sampling)."""
    banned = np.zeros(V, dtype=np.bool_)
    banned[[START_ID, UNK_ID]] = True
    banned[END_ID] = not documents
    return banned


class _Trail:
    """Back-pointers (the search record's): for each position, every candidate kept (its parent at
    the position before, its token, and that token's log-probability), so a settled sequence is
    rebuilt at the end."""

    def __init__(self, sr):
        self.parent, self.token, self.lp = sr.parent, sr.token, sr.tlp

    def path(self, t: int, i: int):
        """(tokens, log-probabilities) of candidate i at position t, from the first position."""
        toks, lps = [], []
        while t >= 0:
            toks.append(int(self.token[t, i]))
            lps.append(float(self.lp[t, i]))
            i = int(self.parent[t, i])
            t -= 1
        return toks[::-1], lps[::-1]


def _settle(vocab, toks, lps, end, stop_len, greedy=False) -> Hypothesis:
    """A Hypothesis from its consumed tokens: the text drops the terminator (<END>, or the stop
    string's characters), the score counts it."""
    cut = len(toks) - (1 if end == "end" else stop_len if end == "stop" else 0)
    ids = np.asarray(toks[:cut], dtype=np.int32)
    total = float(np.sum(lps))
    return Hypothesis(ids=ids, text=vocab.decode(ids), logprob=float(np.sum(lps[:cut])),
                      score=total / max(len(toks), 1), tokens=len(toks), end=end, greedy=greedy)


def beam_search(model, vocab: Vocab, prime_ids, width: int, length: int, num: int = 1,
                documents: bool = False, stop: str | None = None, precision: str = "fp32") -> list[Hypothesis]:
    """The `num` best distinct sequences a beam of `width` finds after the prime (token ids, no
    <START>), best first, each at most `length` tokens. See the module's docstring for the rules.
    `precision` "bf16": the search's products in bfloat16 with float32 sums (Model.run_search)."""
    if width < 1 or length < 1 or not 1 <= num <= width:
        raise UsageError(f"beam search needs width >= 1, length >= 1 and 1 <= num <= width "
                         f"(got width {width}, length {length}, num {num})")
    V = vocab.size
    if model.cfg.vocab_size != V:
        raise ValueError("the model and the vocabulary differ in size")
    banned = banned_ids(V, documents)
    matcher = StopMatcher(vocab, stop) if stop else None
    stop_len = matcher.m if matcher else 0

    tokens = np.concatenate([[START_ID], np.asarray(prime_ids, dtype=np.int32)]).astype(np.int32)
    state = model.new_state(1)
    if len(tokens) > 1:
        model.feed(tokens[:-1], state.h, state.c)
    table = matcher.table if matcher is not None else np.zeros((1, V), dtype=np.int32)
    sr = search.search_buffers(width, length, V, banned, table, width > 1, int(tokens[-1]))
    model.run_search(sr, state.h, state.c, END_ID, precision)  # every position, compiled (kernels/search.py)
    if sr.info[search.I_ERROR]:
        raise CharrnnError("the model's outputs are not finite numbers; is the checkpoint damaged?")
    trail = _Trail(sr)
    ends = {search.END_LENGTH: "length", search.END_END: "end", search.END_STOP: "stop"}
    found = [_settle(vocab, *trail.path(int(pt), int(i)), ends[int(e)], stop_len)
             for pt, i, e in sr.settled[: sr.info[search.I_SETTLED]]]
    g = int(sr.info[search.I_GTOKS])
    if g:
        g_end = ends.get(int(sr.info[search.I_GEND]), "length")
        found.append(_settle(vocab, sr.g_toks[:g].tolist(), sr.g_lps[:g].tolist(), g_end, stop_len, greedy=True))
    return best_distinct(found, num)


def _argmax_allowed(logits_row: np.ndarray, banned: np.ndarray) -> int:
    """The first allowed token of the largest logit (NaN never wins), as the sampler's greedy draw."""
    z = np.where(banned | np.isnan(logits_row), -np.inf, logits_row.astype(np.float64))
    return int(np.argmax(z))


def best_distinct(found: list[Hypothesis], num: int) -> list[Hypothesis]:
    """The `num` best hypotheses of distinct texts, by score; on a tie the greedy sequence first
    (then the order found)."""
    order = sorted(range(len(found)), key=lambda i: (-found[i].score, not found[i].greedy, i))
    out, seen = [], set()
    for i in order:
        h = found[i]
        if h.text in seen:
            continue
        seen.add(h.text)
        out.append(h)
        if len(out) == num:
            break
    return out
