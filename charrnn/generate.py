"""Sampling from a trained model: priming, temperature / top-k / top-p, several samples as parallel
streams, stop strings, and handing text back in chunks so the caller can stream it; and the
log-probability of a sample under the model (temperature 1), for --format jsonl.

The generation loop itself is compiled (kernels/sample.py, through Model.generate); this module
decides what to feed it and turns token ids back into text. It does no I/O of its own.

Special tokens (<START>, <UNK>, and <END> of a stream model) are banned in the draw, so they are
never drawn; should one come back anyway, that is a bug in the sampler, and _chunks raises
SamplerBug instead of printing the token's spelling as if it were text.

A stop string ends a sample at its first occurrence in the generated text (not in the prime); the
string itself is not part of the sample. While a sample streams, only its last characters that
could still be the start of the string are held back.

Beam search, the deterministic decoder, is in beam.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from charrnn.config import PRIME_UNKNOWN_MODES, SAMPLE_BOUNDS, check_bounds, spelled
from charrnn.errors import UsageError
from charrnn.vocab import END_ID, START_ID, UNK_ID, Vocab


@dataclass
class SampleOptions:
    temp: float = 1.0  # softmax temperature; 0 is greedy argmax
    top_k: int = 0  # keep only the k most likely tokens (0: off)
    top_p: float = 1.0  # keep the smallest set with this much probability (1: off)
    length: int = 1000  # characters per sample; 0: unbounded (stream models) / until <END>
    num: int = 1  # samples, generated as parallel streams
    prime: str = ""  # text to warm the state up with
    unknown: str = "error"  # prime characters outside the vocabulary: error | skip | unk
    seed: int | None = None  # None: a fresh random seed
    stop: str | None = None  # end a sample at the first occurrence of this string (not printed)

    def validate(self) -> None:
        """Raise UsageError unless every option is in its range (config.SAMPLE_BOUNDS): the
        command line checks the same, this keeps library callers from a NaN temperature."""
        check_bounds(self, SAMPLE_BOUNDS)
        if self.unknown not in PRIME_UNKNOWN_MODES:
            raise UsageError(f"unknown must be {spelled(PRIME_UNKNOWN_MODES)}, got {self.unknown!r}")
        if self.stop is not None and (not isinstance(self.stop, str) or not self.stop):
            raise UsageError(f"stop must be a non-empty string, got {self.stop!r}")


@dataclass
class Piece:
    """The next text of one sample. `end` is None while the sample goes on; its last piece says
    why it ended: "length" (--length characters), "end" (<END>, document models) or "stop"."""

    stream: int
    text: str
    end: str | None = None


class SamplerBug(RuntimeError):
    """The sampler drew a token it was told never to draw (a special token): a bug, not bad input."""


def random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


def sample_chunks(model, vocab: Vocab, opts: SampleOptions, documents: bool = False, target_s: float = 0.05):
    """An iterator of (stream index, text, finished) pieces as samples are generated: sample_pieces
    without the reason a sample ended."""
    pieces = sample_pieces(model, vocab, opts, documents, target_s)
    return ((p.stream, p.text, p.end is not None) for p in pieces)


def sample_pieces(model, vocab: Vocab, opts: SampleOptions, documents: bool = False, target_s: float = 0.05):
    """An iterator of Pieces as samples are generated.

    All `num` samples advance in lock step; each chunk of steps takes about `target_s` seconds so
    output can be flushed promptly. A sample ends after `length` characters, at the first
    occurrence of `opts.stop` or, for a model trained on documents, at <END>; a stream model
    (which saw <END> at most once) never draws it. Bad options and unknown prime characters raise
    here, before anything is generated.
    """
    opts.validate()
    if opts.length == 0 and opts.num > 1:
        raise UsageError("--length 0 (unbounded) works with a single sample (--num 1)")
    prime_ids = prime_tokens(vocab, opts.prime, opts.unknown)
    return _chunks(model, vocab, opts, prime_ids, documents, target_s)


def in_order(pieces):
    """The Pieces of samples that advance in lock step (sample_pieces), rearranged into sample
    order, for a writer that prints one sample after another: the current sample's pieces as they
    come; a later sample's held until every sample before it has ended, then handed out as one
    Piece (its text so far, and its end if it has ended). Only the samples not yet printing are
    held, and nothing is sized by their number."""
    held = {}  # sample -> its texts so far, for samples after the current one
    ended = {}  # sample -> its end, for held samples that have ended
    current = 0
    for p in pieces:
        if p.stream != current:
            held.setdefault(p.stream, []).append(p.text)
            if p.end is not None:
                ended[p.stream] = p.end
            continue
        yield p
        while p.end is not None and (current + 1) in held:
            current += 1
            p = Piece(current, "".join(held.pop(current)), ended.pop(current, None))
            yield p
        if p.end is not None:
            current += 1


def prime_tokens(vocab: Vocab, prime: str, unknown: str = "error") -> np.ndarray:
    """The token ids of a prime (no <START>); VocabError for unknown characters under "error"."""
    return vocab.encode(prime, unknown=unknown) if prime else np.zeros(0, np.int32)


def held_back(text: str, stop: str) -> int:
    """How many of the last characters of `text` (which does not contain `stop`) could be the
    start of `stop`: the longest proper prefix of `stop` that `text` ends with."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def _cut(text: str, stop: str | None, end: str | None):
    """(text to print now, text held back, end) for a sample whose new text (after what was held
    back) is `text`: cut at the first occurrence of `stop` (end "stop"); else, while the sample
    goes on, hold back its last characters that could be the start of `stop`."""
    if not stop:
        return text, "", end
    i = text.find(stop)
    if i >= 0:
        return text[:i], "", "stop"
    k = held_back(text, stop) if end is None else 0
    return text[: len(text) - k], text[len(text) - k :], end


def _chunks(model, vocab, opts, prime_ids, documents, target_s):
    from charrnn.kernels.rng import seed_state

    tokens = np.concatenate([[START_ID], prime_ids]).astype(np.int32)
    nb = opts.num
    h, c = model.zero_state(nb)
    if len(tokens) > 1:
        model.feed(tokens[:-1], h, c)
    tok = np.full(nb, tokens[-1], dtype=np.int32)
    banned = np.zeros(vocab.size, dtype=np.bool_)
    banned[START_ID] = True
    banned[UNK_ID] = True
    banned[END_ID] = not documents
    done = np.zeros(nb, dtype=np.bool_)
    over = set()  # samples whose last piece has been handed out
    held = [""] * nb  # text held back per sample: it may be the start of the stop string
    produced = np.zeros(nb, dtype=np.int64)
    state = seed_state(opts.seed if opts.seed is not None else random_seed())
    table = vocab.tokens
    top_k = min(opts.top_k, vocab.size)  # more than V keeps every id (and must fit the kernel's int64)
    steps = 16
    while not done.all():
        n = steps
        if opts.length > 0:
            n = min(n, opts.length - int(produced.max()))
        out = np.full((n, nb), -1, dtype=np.int32)
        t0 = time.perf_counter()
        taken = model.generate(tok, h, c, out, opts.temp, top_k, opts.top_p, banned, END_ID, done, state)
        dt = time.perf_counter() - t0
        drawn = out[:taken]
        if banned[drawn[drawn >= 0]].any():  # never reached: the draw skips banned ids
            bad = sorted({table[i] for i in drawn[drawn >= 0].tolist() if banned[i]})
            raise SamplerBug(f"the sampler drew {', '.join(bad)}, which it must never draw "
                             f"(temp={opts.temp!r}, top_k={opts.top_k}, top_p={opts.top_p!r})")
        for b in range(nb):
            if b in over:  # ended in an earlier chunk: its last piece is out
                continue
            col = drawn[:, b]
            ids = col[(col >= 0)]
            ended = bool((ids == END_ID).any())
            ids = ids[ids != END_ID]
            produced[b] += len(ids) + (1 if ended else 0)
            end = "end" if ended else "length" if opts.length > 0 and produced[b] >= opts.length else None
            text, held[b], end = _cut(held[b] + "".join(table[i] for i in ids.tolist()), opts.stop, end)
            if end is not None:
                done[b] = True  # the generator skips it from now on (a stop string: it did not know)
                over.add(b)
            if text or end is not None:
                yield Piece(b, text, end)
        # aim each call at target_s so output is flushed at least ~10 times a second
        if dt > 0:
            steps = int(min(4096, max(1, steps * min(4.0, target_s / dt))))


def continuation_logprob(model, prime_ids, ids) -> float:
    """log p(ids | <START> prime), nats, under the model at temperature 1: the sequence fed from
    a zero state as eval feeds a text, and only the positions after the prime summed. The sampler
    does not keep its logits, so --format jsonl scores each sample once it has ended."""
    ids = np.asarray(ids, dtype=np.int32)
    if ids.size == 0:
        return 0.0
    tokens = np.concatenate([[START_ID], np.asarray(prime_ids, dtype=np.int32), ids]).astype(np.int32)
    h, c = model.zero_state(1)
    nll = model.score(tokens[:-1], tokens[1:], h, c)
    return -float(np.sum(nll[len(tokens) - 1 - ids.size :]))
