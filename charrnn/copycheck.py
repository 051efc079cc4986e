"""The copy check of `charrnn sample`: how much of a sample the model copied verbatim from its
training text.

For a sample s of m characters and the training text T:
    longest_copy  the length of the longest substring of s that occurs in T
    copied_frac   the share of s's characters that lie inside a substring of s of at least
                  `copy_min` characters that occurs in T (0 for an empty sample)

The index is a suffix array of T's token ids (T is the run's tokens.npy, its training part, or a
corpus file encoded with the model's vocabulary; <START> and <END> markers in it match no
sample character, so no copy spans a document boundary).
Build: the suffixes are sorted by their first w tokens packed into one 64-bit key (w = 8 for a
vocabulary of up to 255 tokens) with an LSD radix sort, then each group of suffixes that still
tie is sorted by its next w tokens, and so on, until no two suffixes tie or MAX_DEPTH tokens are
compared; only tied suffixes are looked at again, so most of the text is done after one pass.
Memory at its peak: 24 bytes a token while the radix sort runs, then 5 (uint8 ids, int32 array).
A sample is matched position by position: the range of suffixes that start with s[i:i+l] is
narrowed one token at a time by binary search, so the matching statistics cost O(m * match * log n).

Copies longer than MAX_DEPTH tokens are still found (the first MAX_DEPTH tokens place a suffix;
the rest is compared directly), but among several such suffixes only one is followed, so the
length reported past MAX_DEPTH is a lower bound.

Not here: reading the run directory (checkpoint.py, data/tokenfile.py), the CLI (cli/sample.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from charrnn.kernels import jit

MAX_DEPTH = 1 << 16  # tokens a suffix is sorted by at most (65,536: longer than any sample printed whole)
COPY_MIN = 20  # default --copy-min: about four English words; a model that learned the language
# but not the text rarely reproduces 20 characters of it verbatim outside stock phrases, while
# memorised passages run to hundreds (see docs/inspect-and-export.md)


@jit.helper
def _key(s, i, w, bits):
    """The w tokens of s from position i packed into one integer, each as id + 1 in `bits` bits
    (0 past the end of s, so a shorter suffix sorts first)."""
    n = s.shape[0]
    k = np.uint64(0)
    for j in range(w):
        v = np.uint64(s[i + j] + 1) if i + j < n else np.uint64(0)
        k = (k << np.uint64(bits)) | v
    return k


@jit.kernel
def _pack(s, keys, w, bits):
    for i in range(s.shape[0]):
        keys[i] = _key(s, i, w, bits)
    return 0


@jit.kernel
def _radix_argsort(keys, order, keys2, order2, nbits):
    """order (n,) int32: the positions of keys (n,) uint64 in ascending order (LSD radix sort, 16
    bits a pass, stable); keys2 and order2 are work arrays of the same shapes. keys is scrambled."""
    n = keys.shape[0]
    for i in range(n):
        order[i] = i
    cnt = np.zeros(65537, dtype=np.int64)
    shift = 0
    while shift < nbits:
        cnt[:] = 0
        for i in range(n):
            cnt[((keys[i] >> np.uint64(shift)) & np.uint64(0xFFFF)) + np.uint64(1)] += 1
        for d in range(1, 65537):
            cnt[d] += cnt[d - 1]
        for i in range(n):
            d = (keys[i] >> np.uint64(shift)) & np.uint64(0xFFFF)
            t = cnt[d]
            cnt[d] = t + 1
            keys2[t] = keys[i]
            order2[t] = order[i]
        keys[:] = keys2
        order[:] = order2
        shift += 16
    return 0


@jit.kernel
def _refine(s, sa, keys, w, bits, max_depth):
    """sa (n,) sorted by each suffix's first w tokens, keys (n,) uint64 its packed first w tokens
    in sa's order: refine the groups of equal keys by the next w tokens, and the next, until every
    group is one suffix or max_depth tokens are compared. Returns the levels taken."""
    n = sa.shape[0]
    # the groups (runs of equal keys) of two or more suffixes: [ga[g], gb[g])
    ga = np.empty(n // 2 + 1, dtype=np.int64)
    gb = np.empty(n // 2 + 1, dtype=np.int64)
    ng = 0
    a = 0
    for t in range(1, n + 1):
        if t == n or keys[t] != keys[a]:
            if t - a >= 2:
                ga[ng] = a
                gb[ng] = t
                ng += 1
            a = t
    depth = w
    levels = 0
    while ng > 0 and depth < max_depth:
        levels += 1
        out = 0  # the next level's groups are written over this level's, never ahead of them
        for g in range(ng):
            a, b = ga[g], gb[g]
            m = b - a
            sub = np.empty(m, dtype=np.uint64)
            for t in range(m):
                sub[t] = _key(s, sa[a + t] + depth, w, bits)
            o = np.argsort(sub, kind="mergesort")
            members = sa[a:b].copy()
            for t in range(m):
                sa[a + t] = members[o[t]]
            # the new runs of equal keys inside this group
            r = 0
            for t in range(1, m + 1):
                if t == m or sub[o[t]] != sub[o[r]]:
                    if t - r >= 2:
                        ga[out] = a + r
                        gb[out] = a + t
                        out += 1
                    r = t
        ng = out
        depth += w
    return levels


@jit.kernel
def _matching_statistics(text, sa, q, ms, max_depth):
    """ms[i] = the length of the longest prefix of q[i:] that occurs in text, for every i."""
    n = text.shape[0]
    m = q.shape[0]
    for i in range(m):
        lo, hi, l = 0, n, 0
        while i + l < m and lo < hi and l < max_depth:
            c = q[i + l]
            # first suffix in [lo, hi) whose token at offset l is >= c (a suffix too short sorts first)
            a, b = lo, hi
            while a < b:
                mid = (a + b) // 2
                p = sa[mid] + l
                if p < n and text[p] >= c:
                    b = mid
                else:
                    a = mid + 1
            first = a
            a, b = first, hi
            while a < b:
                mid = (a + b) // 2
                p = sa[mid] + l
                if p < n and text[p] > c:
                    b = mid
                else:
                    a = mid + 1
            if first == a:
                break
            lo, hi = first, a
            l += 1
        if l >= max_depth and lo < hi:  # past the sorted depth: follow one suffix directly
            p = sa[lo]
            while i + l < m and p + l < n and text[p + l] == q[i + l]:
                l += 1
        ms[i] = l
    return 0


class CopyIndex:
    """A suffix array over a training text's token ids (any int dtype; negative ids are not allowed)."""

    def __init__(self, ids: np.ndarray, max_depth: int = MAX_DEPTH):
        t0 = time.perf_counter()
        ids = np.asarray(ids)
        n = len(ids)
        if n >= 2**31 - 2:
            raise ValueError("a copy index holds at most 2**31 - 3 tokens")
        if ids.dtype.kind not in "iu" or (n and int(ids.min()) < 0):
            raise ValueError("token ids must be integers >= 0")
        # kept in its own dtype (a run's tokens.npy is uint8 for up to 256 tokens): 1 byte a token, not 4
        self.text = np.ascontiguousarray(ids if ids.dtype in (np.uint8, np.uint16) else ids.astype(np.int32))
        self.sa = np.empty(n, dtype=np.int32)
        self.max_depth = int(max_depth)
        self.rounds = 0
        self.depth = self.max_depth
        if n:
            V = int(self.text.max()) + 2  # ids + 1, and 0 past the end
            bits = 8 if V <= 256 else 16 if V <= 65536 else 32
            w = 64 // bits  # tokens a key holds
            keys = np.empty(n, dtype=np.uint64)
            _pack(self.text, keys, w, bits)
            order2 = np.empty(n, dtype=np.int32)
            keys2 = np.empty(n, dtype=np.uint64)
            _radix_argsort(keys, self.sa, keys2, order2, 64)  # keys come back sorted
            del keys2, order2
            self.rounds = int(_refine(self.text, self.sa, keys, w, bits, self.max_depth))
            del keys
            self.depth = w * -(-self.max_depth // w)  # the suffixes are in order of this many first tokens
        self.build_s = time.perf_counter() - t0

    def __len__(self) -> int:
        return len(self.text)

    def matching_statistics(self, q) -> np.ndarray:
        """(m,) int64: for each position of the token ids q, the longest match starting there."""
        q = np.ascontiguousarray(q, dtype=np.int32)
        ms = np.zeros(len(q), dtype=np.int64)
        if len(q) and len(self.text):
            _matching_statistics(self.text, self.sa, q, ms, self.depth)
        return ms


@dataclass
class Copies:
    longest_copy: int  # characters
    copied_frac: float  # share of the sample's characters inside copies of at least copy_min

    def to_dict(self) -> dict:
        return {"longest_copy": self.longest_copy, "copied_frac": self.copied_frac}


def check(index: CopyIndex, ids, copy_min: int = COPY_MIN) -> Copies:
    """The copy check of one sample, given as token ids."""
    ms = index.matching_statistics(ids)
    m = len(ms)
    if m == 0:
        return Copies(0, 0.0)
    # characters covered by [i, i + ms[i]) for the i with ms[i] >= copy_min: a running cover end
    covered = 0
    end = 0
    for i in np.flatnonzero(ms >= copy_min).tolist():
        stop = i + int(ms[i])
        if stop > end:
            covered += stop - max(i, end)
            end = stop
    return Copies(int(ms.max()), covered / m)


def training_ids(run_dir: str, vocab) -> np.ndarray | None:
    """The training part of a run's token file (memory-mapped), or None when there is none, or
    when it was written over another vocabulary than the model's (then its ids mean other characters)."""
    from charrnn.data import TOKENS_FILE, read_token_file

    tokens = read_token_file(os.path.join(run_dir, TOKENS_FILE))
    if tokens is None or tokens.meta.get("tokens") != list(vocab.tokens):
        return None
    return tokens.train
