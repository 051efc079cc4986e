"""The beam search as charrnn/beam.py ran it before its loop was compiled (1075d91..90fb523): one
Model.step (BLAS) per position from Python, the log-softmax, top-K, stop automaton and
back-pointers in numpy. The compiled search (kernels/search.py) must find the same hypotheses.
Kept verbatim but for the names; the rules are beam.py's docstring."""

import numpy as np

from charrnn.beam import Hypothesis, StopMatcher, _argmax_allowed, _settle, banned_ids, best_distinct, log_softmax, top_flat
from charrnn.errors import CharrnnError, UsageError
from charrnn.vocab import END_ID, START_ID, Vocab


class _NumpyTrail:
    """Back-pointers: for each position, every candidate kept (its parent at the position before,
    its token, and that token's log-probability), so a settled sequence is rebuilt at the end."""

    def __init__(self):
        self.parent, self.token, self.lp = [], [], []

    def add(self, parent, token, lp):
        self.parent.append(parent)
        self.token.append(token)
        self.lp.append(lp)

    def path(self, t: int, i: int):
        """(tokens, log-probabilities) of candidate i at position t, from the first position."""
        toks, lps = [], []
        while t >= 0:
            toks.append(int(self.token[t][i]))
            lps.append(float(self.lp[t][i]))
            i = int(self.parent[t][i])
            t -= 1
        return toks[::-1], lps[::-1]


def beam_search_numpy(model, vocab: Vocab, prime_ids, width: int, length: int, num: int = 1,
                documents: bool = False, stop: str | None = None) -> list[Hypothesis]:
    """The `num` best distinct sequences a beam of `width` finds after the prime (token ids, no
    <START>), best first, each at most `length` tokens. See the module's docstring for the rules."""
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
    greedy_on = width > 1  # a beam of one is greedy decoding already
    n = 1  # live beam hypotheses: the first n streams; the greedy stream, while on, is the last
    state = state.take([0, 0] if greedy_on else [0])
    tok = np.full(n + greedy_on, tokens[-1], dtype=np.int32)
    score = np.zeros(n)  # (n,) total log-probability of each live hypothesis
    matched = np.zeros(n, dtype=np.int32)  # (n,) its stop-string automaton state
    slots = width  # hypotheses still to settle
    trail = _NumpyTrail()
    settled = []  # (position, candidate index, end)
    rows = np.zeros(1, dtype=np.int64)  # the candidates of the previous position that the live rows are
    g_toks, g_lps, g_matched, g_end = [], [], 0, None
    live = np.zeros(0, dtype=np.int64)
    t = -1
    for t in range(length):
        logits = model.step(tok, state)  # (n + greedy, V)
        lp = log_softmax(logits)
        # ---- the beam: the best `slots` of the n x V continuations
        cand = score[:, None] + lp[:n]  # (n, V)
        cand[:, banned] = -np.inf
        if n == 1 and slots == 1:
            # one row: rank by its logits (the same order as score + log-probability, without
            # the rounding of either), so a beam of one is exactly greedy decoding
            cand = np.where(banned, -np.inf, logits[:1].astype(np.float64))
        pick = top_flat(cand, slots) if n else np.zeros(0, dtype=np.int64)
        if pick.size == 0 and n > 0:
            raise CharrnnError("the model's outputs are not finite numbers; is the checkpoint damaged?")
        parent, token = np.divmod(pick, V)
        tlp = lp[parent, token]
        trail.add(rows[parent], token, tlp)
        ended = token == END_ID
        if matcher is not None:
            matched = matcher.advance(matched[parent], token)
            stopped = matched == stop_len
        else:
            stopped = np.zeros(pick.size, dtype=np.bool_)
        for i in np.flatnonzero(ended | stopped):
            settled.append((t, int(i), "end" if ended[i] else "stop"))
        live = np.flatnonzero(~(ended | stopped))
        slots -= pick.size - live.size
        keep = [parent[live]]
        # ---- the greedy stream: the argmax, as --temp 0 draws it
        if greedy_on:
            gt = _argmax_allowed(logits[n], banned)
            g_toks.append(gt)
            g_lps.append(float(lp[n, gt]))
            if matcher is not None:
                g_matched = int(matcher.table[g_matched, gt])
            if gt == END_ID:
                g_end = "end"
            elif matcher is not None and g_matched == stop_len:
                g_end = "stop"
            if g_end is None:
                keep.append(np.array([n]))
            else:
                greedy_on = False
        n = live.size
        if n == 0 and not greedy_on:
            break
        state = state.take(np.concatenate(keep))
        tok = np.concatenate([token[live], [g_toks[-1]] if greedy_on else []]).astype(np.int32)
        score = (score[parent] + tlp)[live]
        if matcher is not None:
            matched = matched[live]
        rows = live
    for i in live:  # still going after `length` positions
        settled.append((t, int(i), "length"))
    found = [_settle(vocab, *trail.path(pt, i), end, stop_len) for pt, i, end in settled]
    if g_toks:
        found.append(_settle(vocab, g_toks, g_lps, g_end or "length", stop_len, greedy=True))
    return best_distinct(found, num)
