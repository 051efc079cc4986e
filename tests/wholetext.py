"""The whole-text data pipeline as it was before corpora were read in chunks: the slow, obvious
reference the chunked one (charrnn/data/) must agree with exactly. Everything here holds the
whole text in memory; nothing here is used by the package."""

import codecs
import hashlib
import re
from dataclasses import dataclass

import numpy as np

from charrnn.data import encode_stream, split_documents
from charrnn.errors import DataError
from charrnn.vocab import Vocab

_BLANK_SPLIT = re.compile(r"\n[ \t]*\n")


def decode_whole(data: bytes, name: str, encoding: str | None = None) -> str:
    """Bytes to text in one call: strict decoding, binary detection, BOM removed, newlines to \\n."""
    enc = (encoding or "utf-8").lower().replace("_", "-")
    is_utf8 = enc in ("utf-8", "utf8", "utf-8-sig")
    if is_utf8:
        nul = data.find(b"\x00")
        if nul >= 0:
            raise DataError(f"{name}: looks like a binary file (NUL byte at offset {nul}), not text")
    try:
        text = data.decode(encoding or "utf-8", errors="strict")
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as e:
        start = e.start
        if enc == "utf-8-sig" and data.startswith(codecs.BOM_UTF8) and e.object is not data:
            # bytes.decode("utf-8-sig") counts offsets after the BOM it strips: the whole-text code
            # reported them 3 bytes early; the chunked decoder (and this reference) report the file's
            start += 3
        bad = data[start : start + 1].hex()
        hint = "; if the file is in another encoding, pass --encoding" if is_utf8 else ""
        raise DataError(
            f"{name}: not valid {e.encoding.upper()} at byte offset {start} (byte 0x{bad}){hint}"
        ) from None
    if not is_utf8:
        nul = text.find("\x00")
        if nul >= 0:
            raise DataError(f"{name}: looks like a binary file (NUL character at position {nul}), not text")
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def corpus_text(files: list[bytes], encoding: str | None = None) -> tuple[str, str]:
    """(text, sha256) of files given as bytes, concatenated; an empty file is an error."""
    texts = []
    for i, data in enumerate(files):
        text = decode_whole(data, f"f{i}", encoding)
        if not text:
            raise DataError(f"f{i}: is empty")
        texts.append(text)
    text = "".join(texts)
    return text, hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def corpus_vocab(text: str, docs: str | None) -> Vocab:
    if docs is None:
        return Vocab(sorted(set(text)))
    return Vocab(sorted(set("".join(split_documents(text, docs)))))


@dataclass(frozen=True)
class Split:
    train_text: str
    val_text: str


def split_text(text: str, val_frac: float, docs: str | None) -> Split:
    """A contiguous split: the last `val_frac` of the text is held out; in document mode the cut
    moves forward to the next document boundary."""
    if not 0.0 <= val_frac < 1.0:
        raise ValueError("val_frac must be in [0, 1)")
    if val_frac == 0.0:
        return Split(text, "")
    cut = int(round(len(text) * (1.0 - val_frac)))
    if docs is not None:
        sep = re.compile(r"\n") if docs == "line" else _BLANK_SPLIT
        start = max(cut - 1, 0) if docs == "line" else _blank_scan_start(text, cut)
        for m in sep.finditer(text, start):
            if m.end() >= cut:
                cut = m.end()
                break
        else:
            cut = len(text)
    return Split(text[:cut], text[cut:])


def _blank_scan_start(text: str, cut: int) -> int:
    i = cut
    while i > 0 and text[i - 1] in " \t\n":
        i -= 1
    return i


def train_val_ids(text: str, vocab: Vocab, docs: str | None, val_frac: float, dtype):
    """(train ids, validation ids or None) as the trainer built them from the whole text."""
    split = split_text(text, val_frac, docs)
    train = encode_stream(vocab, split.train_text, docs, end=not split.val_text, dtype=dtype)
    val = encode_stream(vocab, split.val_text, docs, end=docs is not None, dtype=dtype) if split.val_text else None
    return train, val


class GridBatches:
    """The batch layout as a copied (S + 1, B) grid: grid[t, b] = ids[b*S + t]."""

    def __init__(self, ids, batch: int):
        self.S = (len(ids) - 1) // batch
        self.grid = np.empty((self.S + 1, batch), dtype=np.asarray(ids).dtype)
        for b in range(batch):
            self.grid[:, b] = ids[b * self.S : b * self.S + self.S + 1]

    def get(self, p: int, T: int):
        end = min(p + T, self.S)
        return self.grid[p:end].astype(np.int32), self.grid[p + 1 : end + 1].astype(np.int32)
