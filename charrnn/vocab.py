"""The vocabulary: characters <-> integer ids, the special tokens, one-hot encoding, JSON form, and
capping a vocabulary to its most frequent characters (--max-vocab).

A token is one Unicode code point or one of the special tokens <START>, <END>, <UNK>, which have
the fixed ids 0, 1, 2. Characters follow in code-point order. This module knows nothing about
files or models: capping counts characters in the chunks a corpus gives (charrnn.data.Corpus).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from charrnn.errors import VocabError

START, END, UNK = "<START>", "<END>", "<UNK>"
SPECIALS = (START, END, UNK)
START_ID, END_ID, UNK_ID = 0, 1, 2
N_SPECIAL = len(SPECIALS)

# Encoding works on chunks so a 100 MB text never needs a 400 MB UTF-32 copy at once.
_CHUNK = 1 << 22
MAX_CODE_POINT = 0x10FFFF


def code_points(text: str) -> np.ndarray:
    """The code points of `text`: uint8 when it is ASCII (a byte copy, and the common case), else
    uint32 (surrogates pass through, so every str encodes)."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class CharSet:
    """The distinct characters of a text seen chunk by chunk: one flag per code point (1.1 MB),
    set by numpy per chunk; far faster than sorting each chunk, and the same set."""

    def __init__(self):
        self._seen = np.zeros(MAX_CODE_POINT + 1, dtype=bool)
        self._ascii = b""  # the ASCII characters seen so far, as bytes

    def add(self, cps: np.ndarray):
        self._seen[cps] = True
        self._ascii = np.flatnonzero(self._seen[:128]).astype(np.uint8).tobytes()

    def add_text(self, text: str, ascii_bytes: bytes | None = None):
        """Add the characters of `text` (`ascii_bytes`: its bytes, when it is ASCII and they are at
        hand). ASCII text first drops every byte already seen (bytes.translate, a C loop at memory
        speed): after the first chunk of a typical corpus nothing is left to scatter."""
        if ascii_bytes is None and text.isascii():
            ascii_bytes = text.encode("ascii")
        if ascii_bytes is None:
            self.add(code_points(text))
            return
        new = ascii_bytes.translate(None, self._ascii)
        if new:
            self.add(np.frombuffer(new, dtype=np.uint8))

    def chars(self) -> list[str]:
        return [chr(int(cp)) for cp in np.flatnonzero(self._seen)]

    def surrogates(self) -> list[str]:
        """The surrogate code points seen (never characters: see is_surrogate)."""
        return [chr(0xD800 + int(i)) for i in np.flatnonzero(self._seen[0xD800:0xE000])]


def is_surrogate(ch: str) -> bool:
    """Whether a one-character string is a surrogate code point (U+D800..U+DFFF): half of a UTF-16
    pair, or an undecodable byte Python kept (surrogateescape). Not a Unicode scalar value, so no
    UTF-8 output can write it; a vocabulary never holds one."""
    return 0xD800 <= ord(ch) <= 0xDFFF


def describe_chars(chars) -> str:
    """A readable list of characters for error messages: printable ones quoted, others as U+XXXX."""
    shown = []
    for ch in chars:
        if ch.isprintable() and not ch.isspace():
            shown.append(repr(ch))
        else:
            shown.append(f"U+{ord(ch):04X}")
    return ", ".join(shown)


class Vocab:
    """Characters and special tokens with fixed ids; immutable once built."""

    def __init__(self, chars):
        chars = list(chars)
        for ch in chars:
            if not isinstance(ch, str) or len(ch) != 1:
                raise ValueError(f"vocabulary entries must be single characters, got {ch!r}")
            if is_surrogate(ch):
                raise ValueError(f"vocabulary entry U+{ord(ch):04X} is a lone surrogate, not a character "
                                 "(no UTF-8 text can hold it)")
        chars = sorted(set(chars))
        self.chars = tuple(chars)
        self.tokens = SPECIALS + self.chars
        self._cps = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # sorted
        self._index = {tok: i for i, tok in enumerate(self.tokens)}
        self._tables = {}  # dtype -> dense lookup table (_table)
        self._ascii_table = None  # bytes: the uint8 table of ASCII, for bytes.translate

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        """The vocabulary of every distinct character in `text`."""
        seen = CharSet()
        for start in range(0, len(text), _CHUNK):
            seen.add_text(text[start : start + _CHUNK])
        return cls(seen.chars())

    @classmethod
    def from_tokens(cls, tokens) -> "Vocab":
        """Rebuild from the list of tokens in id order (the checkpoint form); validates it strictly."""
        tokens = list(tokens)
        if tuple(tokens[:N_SPECIAL]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {list(SPECIALS)}")
        chars = tokens[N_SPECIAL:]
        vocab = cls(chars)
        if list(vocab.chars) != chars:
            raise ValueError("vocabulary characters must be distinct single characters in code-point order")
        return vocab

    def to_json(self) -> str:
        return json.dumps({"tokens": list(self.tokens)}, ensure_ascii=True)

    @classmethod
    def from_json(cls, data: str) -> "Vocab":
        obj = json.loads(data)
        if not isinstance(obj, dict) or not isinstance(obj.get("tokens"), list):
            raise ValueError("vocabulary JSON must be an object with a 'tokens' list")
        return cls.from_tokens(obj["tokens"])

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def size(self) -> int:
        """V, the number of tokens including the special ones."""
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    def __hash__(self) -> int:
        return hash(self.tokens)

    def __repr__(self) -> str:
        return f"Vocab({len(self.chars)} characters + {N_SPECIAL} special tokens)"

    def __contains__(self, ch) -> bool:
        return ch in self._index

    def id_of(self, token: str) -> int:
        return self._index[token]

    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of `text` that are not in the vocabulary, in code-point order."""
        missing = np.zeros(0, dtype=np.uint32)
        for start in range(0, len(text), _CHUNK):
            cps = code_points(text[start : start + _CHUNK])
            _, known = self._lookup(cps)
            missing = np.union1d(missing, cps[~known])
        return [chr(int(cp)) for cp in missing]

    # ------------------------------------------------------------------ encoding
    def _table(self, dtype) -> np.ndarray:
        """A dense table indexed by code point: the id of every vocabulary character, and for any
        other code point -1 (signed dtypes) or <UNK> (unsigned). At least 257 entries, and the last
        one is never a character, so uint8 code points index it directly and larger ones clip to
        it. One gather per chunk: much faster than a binary search."""
        dtype = np.dtype(dtype)
        table = self._tables.get(dtype)
        if table is None:
            size = max(256, int(self._cps[-1]) + 1 if len(self._cps) else 0) + 1
            table = np.full(size, -1 if dtype.kind == "i" else UNK_ID, dtype=dtype)
            table[self._cps] = np.arange(N_SPECIAL, N_SPECIAL + len(self._cps))
            self._tables[dtype] = table
        return table

    def _gather(self, table: np.ndarray, cps: np.ndarray) -> np.ndarray:
        if cps.dtype != np.uint8:
            cps = np.minimum(cps, len(table) - 1)
        return table[cps]

    def _translate_ascii(self, text: str) -> np.ndarray:
        """uint8 ids of ASCII text by bytes.translate through the table's first 256 entries: a C
        loop, several times faster than a numpy gather."""
        if self._ascii_table is None:
            self._ascii_table = self._table(np.uint8)[:256].tobytes()
        return np.frombuffer(bytearray(text.encode("ascii").translate(self._ascii_table)), dtype=np.uint8)

    def _lookup(self, cps: np.ndarray):
        """(ids, known): ids of the code points (arbitrary where unknown) and a mask of known ones."""
        ids = self._gather(self._table(np.int32), cps)
        return ids, ids >= 0

    def encode(self, text: str, unknown: str = "error", dtype=np.int32) -> np.ndarray:
        """Token ids of the characters of `text` (no START/END added).

        unknown: "error" raises VocabError listing the unknown characters, "unk" maps them to
        <UNK>, "skip" drops them.
        """
        if unknown not in ("error", "unk", "skip"):
            raise ValueError(f"unknown must be 'error', 'unk' or 'skip', not {unknown!r}")
        if unknown == "error":
            missing = self.unknown_chars(text)
            if missing:
                raise VocabError(
                    f"{len(missing)} character(s) not in the model's vocabulary: {describe_chars(missing[:20])}"
                    + (" ..." if len(missing) > 20 else ""),
                    unknown=missing,
                )
        dtype = np.dtype(dtype)
        direct = unknown != "skip" and dtype.kind == "u"  # one gather: the table maps unknowns to <UNK>
        if direct and dtype == np.uint8 and text.isascii():
            return self._translate_ascii(text)  # 1 byte per character in and out: no need for chunks
        parts = []
        for start in range(0, len(text), _CHUNK):
            cps = code_points(text[start : start + _CHUNK])
            if direct:
                parts.append(self._gather(self._table(dtype), cps))
                continue
            ids, known = self._lookup(cps)
            if unknown == "skip":
                ids = ids[known]
            else:
                ids = np.where(known, ids, UNK_ID)
            parts.append(ids.astype(dtype))
        if not parts:
            return np.zeros(0, dtype=dtype)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def decode(self, ids, specials: str = "drop") -> str:
        """Text of a sequence of ids.

        specials: "drop" omits <START>/<END> and shows <UNK> as U+FFFD (the replacement character);
        "show" spells every special token out, e.g. "<END>".
        """
        ids = np.asarray(ids).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"token ids must be in [0, {self.size}), got {ids.min()}..{ids.max()}")
        if specials == "show":
            return "".join(self.tokens[i] for i in ids.tolist())
        if specials != "drop":
            raise ValueError(f"specials must be 'drop' or 'show', not {specials!r}")
        table = ["", "", "\ufffd"] + list(self.chars)
        return "".join(table[i] for i in ids.tolist())

    def one_hot(self, ids, dtype=np.float32) -> np.ndarray:
        """The real one-hot encoding: shape ids.shape + (V,), a 1 at each id."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"token ids must be in [0, {self.size})")
        out = np.zeros(ids.shape + (self.size,), dtype=dtype)
        np.put_along_axis(out, ids[..., None].astype(np.intp), 1, axis=-1)
        return out


# ---------------------------------------------------------------------------- capped vocabularies
@dataclass(frozen=True)
class Capped:
    """A vocabulary cut to the most frequent characters, and what the cut cost."""

    vocab: Vocab
    dropped: int  # distinct characters left out (they become <UNK>)
    dropped_chars: int  # their occurrences in the text
    chars: int  # characters of the text


def capped_vocab(corpus, max_vocab: int | None) -> Capped | None:
    """The vocabulary of --max-vocab for `corpus` (a charrnn.data.Corpus: its `vocab` and its
    `text_chunks()` are all that is used): the corpus's own if it has at most `max_vocab` characters
    (None: returned as is, without reading anything), else its `max_vocab` most frequent ones
    (ties: the lower code point), in code-point order as always, the rest mapped to <UNK>.

    Counting takes one more reading of the text, only for such corpora. Counts are over the whole
    text; in document mode a character is kept only if it occurs inside documents (the corpus's
    vocabulary), so separators are counted but never chosen on their own account."""
    have = corpus.vocab.chars
    if max_vocab is None or len(have) <= max_vocab:
        return None
    counts = np.zeros(MAX_CODE_POINT + 1, dtype=np.int64)
    for text in corpus.text_chunks():
        counts += np.bincount(code_points(text), minlength=MAX_CODE_POINT + 1)
    cps = np.array([ord(ch) for ch in have], dtype=np.int64)  # ascending
    # most frequent first; a stable sort on -count keeps ascending code points within a count
    keep = np.sort(cps[np.argsort(-counts[cps], kind="stable")[:max_vocab]])
    kept = int(counts[keep].sum())
    total = int(counts.sum())
    return Capped(Vocab(chr(int(cp)) for cp in keep), dropped=len(have) - max_vocab,
                  dropped_chars=int(counts[cps].sum()) - kept, chars=total)
