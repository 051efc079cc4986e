"""Sampling from a trained model: priming, temperature / top-k / top-p, several samples as parallel
streams, and handing text back in chunks so the caller can stream it.

The generation loop itself is compiled (kernels/sample.py, through Model.generate); this module
decides what to feed it and turns token ids back into text. It does no I/O of its own.

Special tokens (<START>, <UNK>, and <END> of a stream model) are banned in the draw, so they are
never drawn; should one come back anyway, that is a bug in the sampler, and _chunks raises
SamplerBug instead of printing the token's spelling as if it were text.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from charrnn.config import SAMPLE_BOUNDS, check_bounds
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

    def validate(self) -> None:
        """Raise UsageError unless every option is in its range (config.SAMPLE_BOUNDS): the
        command line checks the same, this keeps library callers from a NaN temperature."""
        check_bounds(self, SAMPLE_BOUNDS)
        if self.unknown not in ("error", "skip", "unk"):
            raise UsageError(f"unknown must be error, skip or unk, got {self.unknown!r}")


class SamplerBug(RuntimeError):
    """The sampler drew a token it was told never to draw (a special token): a bug, not bad input."""


def random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


def sample_chunks(model, vocab: Vocab, opts: SampleOptions, documents: bool = False, target_s: float = 0.05):
    """An iterator of (stream index, text, finished) pieces as samples are generated.

    All `num` samples advance in lock step; each chunk of steps takes about `target_s` seconds so
    output can be flushed promptly. A sample ends after `length` characters or, for a model trained
    on documents, at <END>; a stream model (which saw <END> at most once) never draws it. Bad
    options and unknown prime characters raise here, before anything is generated.
    """
    opts.validate()
    if opts.length == 0 and opts.num > 1:
        raise UsageError("--length 0 (unbounded) works with a single sample (--num 1)")
    prime_ids = vocab.encode(opts.prime, unknown=opts.unknown) if opts.prime else np.zeros(0, np.int32)
    return _chunks(model, vocab, opts, prime_ids, documents, target_s)


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
            col = drawn[:, b]
            ids = col[(col >= 0)]
            ended = bool((ids == END_ID).any())
            ids = ids[ids != END_ID]
            produced[b] += len(ids) + (1 if ended else 0)
            finished = ended or (opts.length > 0 and produced[b] >= opts.length)
            if finished:
                done[b] = True
            text = "".join(table[i] for i in ids.tolist())
            if text or finished:
                yield b, text, finished
        # aim each call at target_s so output is flushed at least ~10 times a second
        if dt > 0:
            steps = int(min(4096, max(1, steps * min(4.0, target_s / dt))))
