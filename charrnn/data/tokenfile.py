"""Pass 2: the token file, tokens.npy, and its description, tokens.json.

What it does: the corpus encoded chunk by chunk into a .npy file of uint8, uint16 or uint32 ids
(training ids, then validation ids), written atomically beside its description; opening it again
when it still matches the corpus, vocabulary and split (its ids checked against the recorded
SHA-256), or mapping one that another process built (data-parallel workers); cleaning up after a
killed build. The file is memory-mapped read-only: memory holds only the pages being read.

Not here: where validation begins (split.py), batches over the ids (batches.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass

import numpy as np

from charrnn.data.corpus import Corpus
from charrnn.data.split import Split, splitter
from charrnn.errors import DataError
from charrnn.rundir import open_new, remove_files
from charrnn.vocab import MAX_CODE_POINT, Vocab

TOKENS_FILE = "tokens.npy"  # the token file in a run directory; its description beside it in tokens.json
TOKENS_META = "tokens.json"
TOKENS_FORMAT = ("charrnn-tokens", 1)


def compact_dtype(vocab_size: int):
    """The smallest unsigned integer type that holds every id (memory: 100 MB of text -> 100 MB of ids)."""
    if vocab_size <= 256:
        return np.uint8
    if vocab_size <= 65536:
        return np.uint16
    return np.uint32


@dataclass
class TokenFile:
    """The corpus as token ids in a memory-mapped .npy file (uint8, uint16 or uint32 by the
    vocabulary's size), opened read-only: training reads batches from `train`, validation scores
    `val`; data-parallel workers can map the same file."""

    path: str
    ids: np.ndarray  # (n_train + n_val,) the whole file, mapped
    split: Split
    meta: dict

    @property
    def train(self) -> np.ndarray:
        return self.ids[: self.split.n_train]

    @property
    def val(self) -> np.ndarray | None:
        """The validation stream, or None when no text was held out."""
        return self.ids[self.split.n_train :] if self.split.has_val else None


def _token_meta(corpus: Corpus, vocab: Vocab, val_frac: float, split: Split) -> dict:
    """tokens.json: what tokens.npy holds. Its "tokens" list, the vocabulary in id order, makes it
    the vocabulary's JSON form too (Vocab.from_json reads it): `train --vocab RUN/tokens.json`."""
    return {"format": TOKENS_FORMAT[0], "version": TOKENS_FORMAT[1], "sha256": corpus.sha256, "chars": corpus.chars,
            "docs": corpus.docs, "val_frac": val_frac,
            "vocab_sha256": hashlib.sha256(vocab.to_json().encode("utf-8")).hexdigest(),
            "dtype": np.dtype(compact_dtype(vocab.size)).str, "n_train": split.n_train, "n_val": split.n_val,
            "has_val": split.has_val, "tokens": list(vocab.tokens)}


def _write_token_meta(directory: str, meta: dict):
    """tokens.json, atomically (a temporary file beside it, then os.replace)."""
    meta_path = os.path.join(directory, TOKENS_META)
    with open_new(meta_path + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(meta_path + ".tmp", meta_path)


def regular_file(path: str) -> bool:
    """Whether `path` is a regular file (after links): a run directory's files are read only then,
    so a FIFO or a device put in their place is never opened (opening a FIFO blocks)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _read_small_json(path: str, limit: int):
    """The JSON object in a regular file of at most `limit` bytes; ValueError / OSError otherwise."""
    if not regular_file(path):
        raise ValueError(f"{path} is not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path} nests too deep") from None


# tokens.json lists the vocabulary: at most every code point, ~12 bytes each in its JSON form
TOKENS_META_LIMIT = 16 * (MAX_CODE_POINT + 1) + 4096
TOKENS_HASH_CHUNK = 1 << 24  # bytes of the token file hashed at a time (mapped, so nothing is copied)


def ids_digest(ids: np.ndarray) -> str:
    """The SHA-256 of a token array's bytes (tokens.json's ids_sha256): hashed a chunk at a time
    from the mapping, at the speed of the machine's SHA-256 (what that costs a resume and a build:
    docs/robustness.md, "What the checksum costs")."""
    h = hashlib.sha256()
    flat = ids.reshape(-1).view(np.uint8)
    for start in range(0, len(flat), TOKENS_HASH_CHUNK):
        h.update(memoryview(np.ascontiguousarray(flat[start : start + TOKENS_HASH_CHUNK])))
    return h.hexdigest()


def _read_description(path: str) -> tuple[dict, Split]:
    """tokens.json beside the token file at `path`, and the split it describes: the one reader of
    tokens.json. OSError, ValueError, KeyError or TypeError when it cannot be read or is not a
    description."""
    meta = _read_small_json(os.path.join(os.path.dirname(path), TOKENS_META), TOKENS_META_LIMIT)
    return meta, Split(int(meta["n_train"]), int(meta["n_val"]), bool(meta["has_val"]))


def _map(path: str, split: Split, meta: dict) -> TokenFile:
    if not regular_file(path):
        raise ValueError("token file is not a regular file")
    ids = np.load(path, mmap_mode="r", allow_pickle=False)
    if ids.ndim != 1 or ids.dtype.str != meta["dtype"] or len(ids) != split.n_train + split.n_val:
        raise ValueError("token file does not match its description")
    return TokenFile(path=path, ids=ids, split=split, meta=meta)


def map_token_file(path: str, meta: dict) -> TokenFile | None:
    """The token file at `path` if its description is `meta` (another process's TokenFile.meta:
    data-parallel workers map the file their rank 0 or their host built); None otherwise."""
    try:
        described, split = _read_description(path)
        if described != meta:
            return None
        return _map(path, split, meta)
    except (OSError, ValueError, KeyError, TypeError, EOFError):  # EOFError: an empty .npy
        return None


def read_token_file(path: str) -> TokenFile | None:
    """The token file at `path` as its tokens.json describes it, whatever it was built from (the
    copy check reads a run's training ids: copycheck.training_ids); None when it is missing,
    unreadable, or not what its description says."""
    try:
        meta, split = _read_description(path)
        return _map(path, split, meta)
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


def open_token_file(path: str, corpus: Corpus, vocab: Vocab, val_frac: float, notes: list | None = None
                    ) -> TokenFile | None:
    """The token file at `path` if it was built from this corpus, vocabulary and split, and its
    ids are the ones written (their SHA-256, recorded in tokens.json when it was built); None when
    it is missing, stale or damaged (then build it again). Why a file that exists is not used
    goes to `notes`, so the caller can say so."""
    meta_path = os.path.join(os.path.dirname(path), TOKENS_META)
    if not os.path.lexists(path) and not os.path.lexists(meta_path):
        return None  # a run from before token files, or a directory they were cleaned out of
    why = None
    try:
        meta, split = _read_description(path)
        want = _token_meta(corpus, vocab, val_frac, split)
        recorded = meta.get("ids_sha256")
        described = {k: v for k, v in meta.items() if k != "ids_sha256"}
        # a description from before it listed the vocabulary (pinned by vocab_sha256 all the same)
        # is brought up to date once the ids check out
        upgrade = "tokens" not in described and described == {k: v for k, v in want.items() if k != "tokens"}
        if described != want and not upgrade:
            why = "it was built from another corpus, vocabulary or split"
        elif not isinstance(recorded, str):
            why = "no checksum of its ids was recorded (an older charrnn built it)"
        else:
            tokens = _map(path, split, meta)
            if ids_digest(tokens.ids) != recorded:  # damaged in place, its description intact
                why = "its ids do not match the checksum recorded when it was built (the file was damaged)"
            else:
                if upgrade:
                    try:
                        _write_token_meta(os.path.dirname(path), dict(want, ids_sha256=recorded))
                        tokens.meta = dict(want, ids_sha256=recorded)
                    except OSError:
                        pass
                return tokens
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError) as e:  # EOFError: an empty .npy
        why = f"it cannot be read ({getattr(e, 'strerror', None) or e})"
    if notes is not None:
        notes.append(f"note: rebuilding {path}: {why}")
    return None


def build_token_file(corpus: Corpus, vocab: Vocab, val_frac: float, path: str) -> TokenFile:
    """Encode the corpus chunk by chunk into the token file at `path` (a temporary file beside it,
    then os.replace; its description, tokens.json, after it) and map it. The streams are the
    whole-text pipeline's, as the corpus's splitter gives them (split.py): stream mode <START>
    train [<END> when nothing is held out], then <START> validation; document mode <START> doc
    <END> for every document of each part (where validation begins is found on the way, so the
    text is read once more, not twice)."""
    dtype = np.dtype(compact_dtype(vocab.size))
    parts = splitter(corpus, val_frac)
    total = parts.total_tokens()
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    written = {"train": 0, "val": 0}
    digest = hashlib.sha256()  # of the ids as written: resume checks it (open_token_file)
    saw_val = False  # whether any text was held out
    try:
        with open_new(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (total,)})
            for part, ids in parts.token_runs(vocab, dtype):
                view = memoryview(np.ascontiguousarray(ids))  # ids are in the file's dtype already
                f.write(view)
                digest.update(view)
                written[part] += len(ids)
                saw_val = saw_val or part == "val"
            f.flush()
            os.fsync(f.fileno())
        split = Split(written["train"], written["val"], has_val=saw_val)
        if written["train"] + written["val"] != total or not parts.consistent(split):
            raise DataError(f"the corpus {', '.join(corpus.paths)} changed while it was being read; try again")
        meta = dict(_token_meta(corpus, vocab, val_frac, split), ids_sha256=digest.hexdigest())
        os.replace(tmp, path)
        _write_token_meta(directory, meta)
    except BaseException as e:
        for p in (tmp, os.path.join(directory, TOKENS_META) + ".tmp"):
            try:
                os.unlink(p)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise DataError(f"could not write {path}: {e.strerror or e}") from None
        raise
    return _map(path, split, meta)


def remove_stale_token_temps(directory: str) -> list[str]:
    """Remove what a killed build_token_file leaves in a run directory (.tokens.npy.<pid>.tmp and
    tokens.json.tmp), and nothing else. The caller must hold the run directory's lock: a live
    build in another process would otherwise lose its file."""
    pattern = re.compile(r"\.%s\.\d+\.tmp|%s\.tmp" % (re.escape(TOKENS_FILE), re.escape(TOKENS_META)))
    try:
        return remove_files(directory, pattern)
    except OSError as e:
        raise DataError(f"{e.filename or directory}: cannot clean up: {e.strerror or e}") from None

