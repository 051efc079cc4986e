"""Checkpoints: the .npz format of docs/formats.md (version 1), atomic writes, strict validation on load,
and finding a run's checkpoint from a path or from ./runs.

A checkpoint is read with allow_pickle=False, so it can never run code, and it is checked before any
array is read: the file must be a regular file, its meta record small and sane, and every member one
the registry below knows, with the dtype and shape (from its .npy header) and the size (from the zip's
directory) the meta record implies. So a hostile file (a zip bomb, a header that lies, a meta record
declaring a million layers) is refused in milliseconds without allocating what it declares.
Everything a user can get wrong is a CheckpointError with a one-line message that names the file.

Not here: what a run's meta record holds (run.py), the model's layout (model.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
import tempfile
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from charrnn import __version__
from charrnn.config import MAX_LAYERS, MAX_STREAMS
from charrnn.errors import CheckpointError
from charrnn.model import CELLS, Model, ModelConfig, param_shapes
from charrnn.rundir import remove_files
from charrnn.vocab import Vocab

FORMAT = "charrnn"
VERSION = 1

# ------------------------------------------------------------------------------ sanity limits
# A meta record declaring more than these is a corrupt file, refused before anything is allocated.
# Each sits far above anything trainable on a CPU, so no real model is refused.
MAX_HIDDEN = 65536  # 16x the widest character-level RNN published (the 4096-unit mLSTM)
MAX_VOCAB = 0x110000 + 3  # every Unicode code point plus <START>, <END>, <UNK>: no text holds more
# 268M parameters, 1 GiB in float32, 80x a 2x512 LSTM (3.3M). At ~6 flops per parameter per
# character, a 100 GFLOP/s CPU would need two days for one epoch of a 10 MB corpus.
MAX_PARAMS = 2**28
# The meta record as stored, 4 bytes a character: a vocabulary of every code point is 5.6M
# characters of JSON (22 MB); the rest of a run's meta is a few KB.
MAX_META_BYTES = 32 * 2**20
MAX_META_DEPTH = 32  # a run's meta nests 3 deep (meta -> config -> paths); JSON's parser recurses
MAX_HEADER_BYTES = 10000  # numpy's own default limit on a .npy header; ours are ~128 bytes
# Members per parameter: the parameter, its optimizer moments (Adam: 2) and averaged weights, with
# room to spare. Bounds the members looked at, so a zip of a million empty members is refused
# before a name is matched.
MEMBERS_PER_PARAM = 8
# The zip's central directory (about 70 bytes a member as np.savez writes it) is parsed whole by
# zipfile before anything else: 128 bytes for each member the largest model may have, 1 MiB, which
# zipfile parses in a fraction of a second (tests/test_checkpoint.py times the refusal of larger ones).
MAX_DIRECTORY_BYTES = 128 * (MEMBERS_PER_PARAM * (4 * MAX_LAYERS + 2) + 1)


@dataclass
class Checkpoint:
    """What a checkpoint holds: the model, its vocabulary, the meta dictionary and any extra arrays
    (optimizer moments under optim.*, the carried training state under train.*)."""

    model: Model
    vocab: Vocab
    meta: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    path: str | None = None


# ------------------------------------------------------------------------------ the members
B = "B"  # in an expected shape: any number of streams in 1..MAX_STREAMS


@dataclass(frozen=True)
class Member:
    """A family of array members: names (less .npy) matching `pattern`, each expected to have the
    shape `shape(cfg, param_shapes, match)` returns (None: the name is not one of this family's).
    Parameters are loaded into the model; other members only on request (load's with_arrays)."""

    pattern: str
    shape: Callable
    param: bool = False


def like_param(cfg, shapes, m):
    """Per-parameter state (optimizer moments, averaged weights) is shaped like its parameter."""
    return shapes.get(m["param"])


def carried_state(cfg, shapes, m):
    """The recurrent state a run carries from one batch to the next: (L, B, H)."""
    return (cfg.layers, B, cfg.hidden)


# Every member a version-1 checkpoint may hold besides `meta`, all floating point; a name that no
# family claims is refused. A new kind of member is one more line here.
MEMBERS = (
    Member(r"(?P<param>.+)", like_param, param=True),  # rnn.weight_ih_l0 ... decoder.bias
    Member(r"optim\.[A-Za-z0-9_]+\.(?P<param>.+)", like_param),  # optim.<buffer>.<param>: m, v, sq, buf
    Member(r"train\.[hc]", carried_state),  # train.h, train.c
    Member(r"avg\.(?P<param>.+)", like_param),  # avg.<param>: the averaged weights of a run (last.npz; --average)
)


def _family(name: str, cfg: ModelConfig, shapes) -> tuple[Member | None, tuple | None]:
    """The family that claims member `name` and the shape it must have, or (None, None)."""
    for fam in MEMBERS:
        m = re.fullmatch(fam.pattern, name)
        if m:
            shape = fam.shape(cfg, shapes, m)
            if shape is not None:
                return fam, tuple(shape)
    return None, None


def _fits(shape: tuple, want: tuple) -> bool:
    """Does a declared shape match an expected one (B: any sane number of streams)?"""
    return len(shape) == len(want) and all(
        (type(s) is int and 1 <= s <= MAX_STREAMS) if w == B else s == w for s, w in zip(shape, want))


def _show_shape(shape: tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _shown(text: str, limit: int = 200) -> str:
    """A path or member name fit for a one-line message: control characters escaped, cut short."""
    if not text.isprintable():
        text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------ writing
def write_npz_atomic(path: str, arrays: dict) -> None:
    """Write arrays to `path` through a temporary file in the same directory and os.replace, so a
    crash or a full disk leaves either the old file or the new one, never a truncated one; any
    OSError on the way (no directory, no space, read-only) is one CheckpointError."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write {_shown(path)}: {_shown(e.strerror or str(e))}") from None
        raise


def remove_stale_temps(directory: str, names=("best.npz", "last.npz")) -> list[str]:
    """Remove the temporary files write_npz_atomic leaves when killed between writing and replacing
    (.<name>.<8 characters of tempfile's alphabet>.tmp for each checkpoint name), and nothing else;
    return their paths. Callers must hold the run directory's exclusive lock: without it, the
    temporary file of a live writer would be removed from under it."""
    pattern = re.compile(r"\.(?:%s)\.[a-z0-9_]{8}\.tmp" % "|".join(re.escape(n) for n in names))
    try:
        return remove_files(directory, pattern)
    except OSError as e:
        raise CheckpointError(f"{_shown(e.filename or directory)}: cannot clean up: {e.strerror or e}") from None


def save(path: str, model: Model, vocab: Vocab, meta: dict, extra: dict | None = None,
         dropout: float | None = None) -> None:
    """Save a model (float32 on disk as trained), its vocabulary, `meta` and extra arrays, which must
    be members the registry knows (so that load accepts every file save writes).
    `dropout`: the rate it was trained with, where a run fitted it (default: the model config's)."""
    cfg = model.cfg
    full = dict(meta)
    full.update(
        format=FORMAT,
        version=VERSION,
        charrnn_version=__version__,
        cell=cfg.cell,
        nonlinearity=cfg.nonlinearity,
        layers=cfg.layers,
        hidden=cfg.hidden,
        dropout=cfg.dropout if dropout is None else dropout,
        vocab=list(vocab.tokens),
    )
    arrays = {"meta": np.array(json.dumps(full, ensure_ascii=False))}
    for name, view in model.params.items():
        arrays[name] = view
    shapes = param_shapes(cfg)
    for name, arr in (extra or {}).items():
        if name in arrays:
            raise ValueError(f"extra array name {name!r} collides with a checkpoint key")
        fam, want = _family(name, cfg, shapes)
        if fam is None or fam.param or not _fits(np.shape(arr), want) or np.asarray(arr).dtype.kind != "f":
            raise ValueError(f"extra array {name!r} is not a checkpoint member (see checkpoint.MEMBERS)")
        arrays[name] = arr
    write_npz_atomic(path, arrays)


# ------------------------------------------------------------------------------ reading
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _not_regular(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def _open_regular(path: str):
    """Open a checkpoint for reading if it is a regular file, never opening a FIFO or a device:
    stat first; then open without blocking, in case it changed in between, and check again."""
    name = _shown(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{name}: no such checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{name}: is a directory; expected a .npz checkpoint")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{name}: not a regular file ({_not_regular(st.st_mode)}); expected a .npz checkpoint")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{name}: not a regular file; expected a .npz checkpoint")
    return os.fdopen(fd, "rb")


def _directory_size(f) -> int | None:
    """The size of the zip's central directory as its end record (or zip64 end record) declares
    it, found as zipfile finds it; None where there is none (zipfile will say what is wrong)."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    n = min(end, 22 + 65535)  # the end record, 22 bytes, then a comment of up to 64 KB
    f.seek(end - n)
    tail = f.read(n)
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) - i < 22:
        return None
    size = struct.unpack("<L", tail[i + 12 : i + 16])[0]
    if i >= 20 and tail[i - 20 : i - 16] == b"PK\x06\x07":  # a zip64 locator: its end record rules
        f.seek(struct.unpack("<Q", tail[i - 12 : i - 4])[0])
        rec = f.read(56)
        if len(rec) == 56 and rec[:4] == b"PK\x06\x06":
            size = struct.unpack("<Q", rec[40:48])[0]
    return size


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[np.dtype, tuple, int, int]:
    """A member's dtype, shape, element count and the byte size they imply (header + data), from
    its .npy header alone: only the first few KB of the member are decompressed."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_HEADER_BYTES)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        n = math.prod(shape)
        return dtype, shape, n, f.tell() + n * dtype.itemsize


class _Reader:
    """Checks members of one open archive, naming the file in every refusal."""

    def __init__(self, name: str, zf: zipfile.ZipFile):
        self.name = name
        self.zf = zf

    def refuse(self, why: str):
        raise CheckpointError(f"{self.name}: corrupt checkpoint ({why})")

    def check(self, key: str, info: zipfile.ZipInfo, want: tuple | None, limit: int):
        """Refuse a member that is encrypted, oddly compressed, of the wrong dtype or shape, beyond
        `limit` elements, or whose zip size disagrees with its header; return its header."""
        if info.flag_bits & 0x1:
            self.refuse(f"{key} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            self.refuse(f"{key} uses an unsupported compression method")
        dtype, shape, n, nbytes = _header(self.zf, info)
        if want is not None:
            if dtype.kind != "f":
                shown = _shown(dtype.str if dtype.kind == "U" else str(dtype), 60)
                self.refuse(f"{key} has dtype {shown}, expected a float type")
            if not _fits(shape, want):
                self.refuse(f"{key} has shape {_show_shape(shape)}, expected {_show_shape(want)}")
        if n > limit:
            self.refuse(f"{key} declares {n:,} elements, beyond the limit of {limit:,}")
        if info.file_size != nbytes:
            self.refuse(f"{key} holds {info.file_size:,} bytes, its header implies {nbytes:,}")
        return dtype, shape

    def read(self, info: zipfile.ZipInfo) -> np.ndarray:
        """A checked member's array: at most the bytes its header implies are decompressed."""
        with self.zf.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False, max_header_size=MAX_HEADER_BYTES)


def _depth(obj) -> int:
    """How deep JSON values nest (without recursion)."""
    deepest, todo = 0, [(obj, 1)]
    while todo:
        o, d = todo.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_META_DEPTH:
                todo.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def _count(meta: dict, key: str, limit: int) -> int:
    """A positive integer field of the meta record, at most `limit` (a bool is not an integer)."""
    v = meta.get(key)
    if type(v) is not int or v < 1:
        raise ValueError(f"{key} must be a positive integer, got {_shown(json.dumps(v), 40)}")
    if v > limit:
        raise ValueError(f"{key} {v} is beyond the limit of {limit}")
    return v


def _config(meta: dict) -> tuple[Vocab, ModelConfig]:
    """The vocabulary and model config a meta record declares, within the sanity limits."""
    tokens = meta.get("vocab")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError("vocab must be a list of tokens")
    if len(tokens) > MAX_VOCAB:
        raise ValueError(f"vocab of {len(tokens)} tokens is beyond the limit of {MAX_VOCAB}")
    layers = _count(meta, "layers", MAX_LAYERS)
    hidden = _count(meta, "hidden", MAX_HIDDEN)
    cell, nonlinearity = meta.get("cell"), meta.get("nonlinearity", "tanh")
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}")
    if not isinstance(nonlinearity, str):
        raise ValueError("nonlinearity must be a string")
    dropout = meta.get("dropout", 0.0)
    if type(dropout) not in (int, float):
        raise ValueError("dropout must be a number")
    vocab = Vocab.from_tokens(tokens)
    cfg = ModelConfig(cell=cell, layers=layers, hidden=hidden, vocab_size=vocab.size,
                      nonlinearity=nonlinearity, dropout=float(dropout))
    return vocab, cfg


def load(path: str, dtype=np.float32, with_arrays: bool = False) -> Checkpoint:
    """Load and validate a checkpoint file; raise CheckpointError with a one-line reason otherwise.
    `with_arrays`: also read the members that are not parameters (optimizer and training state)."""
    name = _shown(path)
    with _open_regular(path) as f:
        try:
            magic = f.read(4)
        except OSError as e:
            raise CheckpointError(f"{name}: cannot read: {e.strerror or e}") from None
        if magic != b"PK\x03\x04":
            what = "empty file" if not magic else "not a NumPy .npz archive"
            raise CheckpointError(f"{name}: not a charrnn checkpoint ({what})")
        try:
            size = _directory_size(f)
            if size is not None and size > MAX_DIRECTORY_BYTES:
                raise CheckpointError(f"{name}: corrupt checkpoint (a zip directory of {size:,} bytes, beyond "
                                      f"the limit of {MAX_DIRECTORY_BYTES:,})")
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                return _load(name, path, _Reader(name, zf), dtype, with_arrays)
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, zlib.error, struct.error,
                OverflowError, NotImplementedError,  # NotImplementedError: zipfile on odd zip features
                SyntaxError, tokenize.TokenError, TypeError, IndexError, RecursionError) as e:
            # the last line: numpy parses a .npy header with tokenize and ast.literal_eval, and a
            # mangled header ends there (found by tests/test_hostile_fuzz.py)
            what = {zlib.error: "zlib.error", struct.error: "struct.error",
                    tokenize.TokenError: "bad .npy header"}.get(type(e), type(e).__name__)
            raise CheckpointError(f"{name}: corrupt or truncated checkpoint ({what})") from None


def _load(name: str, path: str, rd: _Reader, dtype, with_arrays: bool) -> Checkpoint:
    """The checks of load, in order: meta record, model config and limits, every member's header;
    only then are arrays read."""
    members, foreign = {}, []
    for info in rd.zf.infolist():
        if not info.filename.endswith(".npy"):  # np.savez names every member <key>.npy
            foreign.append(info.filename)
            continue
        key = info.filename[:-4]
        if key in members:
            rd.refuse(f"member {_shown(key, 80)} twice")
        members[key] = info
    if "meta" not in members:
        raise CheckpointError(f"{name}: not a charrnn checkpoint (no meta record)")
    if foreign:
        rd.refuse(f"unknown member {_shown(foreign[0], 80)}")
    # the meta record: bounded before it is read, text, JSON, an object, not deep
    info = members.pop("meta")
    if info.file_size > MAX_META_BYTES + MAX_HEADER_BYTES:
        rd.refuse(f"meta record of {info.file_size:,} bytes, beyond the limit of {MAX_META_BYTES:,}")
    meta_dtype, meta_shape = rd.check("meta", info, None, MAX_META_BYTES)
    if meta_dtype.kind != "U" or meta_shape != ():
        rd.refuse("meta record is not text")
    if meta_dtype.itemsize > MAX_META_BYTES:
        rd.refuse(f"meta record of {meta_dtype.itemsize:,} bytes, beyond the limit of {MAX_META_BYTES:,}")
    try:
        meta = json.loads(str(rd.read(info)[()]))
    except RecursionError:
        meta = None  # refused below, outside the handler, so the message has no chained traceback
        why = f"meta record nests deeper than {MAX_META_DEPTH}"
    except (ValueError, TypeError):
        meta, why = None, "unreadable meta record"
    else:
        why = None
    if why:
        rd.refuse(why)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        what = _shown(repr(meta.get("format")), 40) if isinstance(meta, dict) else "not a JSON object"
        raise CheckpointError(f"{name}: not a charrnn checkpoint (format {what})")
    version = meta.get("version")
    if type(version) is not int:
        rd.refuse("no format version")
    if version > VERSION:
        raise CheckpointError(
            f"{name}: written by a newer charrnn (format version {version}, this is {__version__} reading "
            f"version {VERSION}); upgrade charrnn"
        )
    if version < 1:
        rd.refuse(f"format version {version}")
    if _depth(meta) > MAX_META_DEPTH:
        rd.refuse(f"meta record nests deeper than {MAX_META_DEPTH}")
    try:
        vocab, cfg = _config(meta)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: corrupt checkpoint meta ({_shown(str(e))})") from None
    shapes = param_shapes(cfg)
    n_params = sum(math.prod(s) for s in shapes.values())
    if n_params > MAX_PARAMS:
        rd.refuse(f"{cfg.layers}x{cfg.hidden} {cfg.cell} of {vocab.size} tokens declares {n_params:,} "
                  f"parameters, beyond the limit of {MAX_PARAMS:,}")
    # every member: known, then its header against the meta record, before any array is read
    if len(members) > MEMBERS_PER_PARAM * len(shapes):
        rd.refuse(f"{len(members):,} members, more than a model of {len(shapes)} parameters can have")
    wanted = {}
    carried = None
    for key, info in members.items():
        fam, want = _family(key, cfg, shapes)
        if fam is None:
            rd.refuse(f"unknown member {_shown(key, 80)}")
        _, shape = rd.check(key, info, want, MAX_PARAMS)
        if fam.shape is carried_state:  # train.h and train.c carry the same streams
            if carried is not None and shape != carried[1]:
                rd.refuse(f"{key} has shape {_show_shape(shape)}, expected {_show_shape(carried[1])}")
            carried = (key, shape)
        if fam.param or with_arrays:
            wanted[key] = (fam, info)
    for pname in shapes:
        if pname not in wanted:
            rd.refuse(f"missing {pname}")
    model = Model(cfg, dtype=dtype)
    extra = {}
    for key, (fam, info) in wanted.items():
        arr = rd.read(info)
        if fam.param:
            if not np.all(np.isfinite(arr)):
                rd.refuse(f"{key} holds non-finite values")
            model.params[key][...] = arr
        else:
            extra[key] = arr
    return Checkpoint(model=model, vocab=vocab, meta=meta, arrays=extra, path=path)


# ------------------------------------------------------------------------------ finding runs
def _mode(path: str) -> int | None:
    """The file type and mode bits of what is at `path`, None when nothing is there."""
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


def resolve(model_path: str | None, runs_dir: str = "runs") -> tuple[str, bool]:
    """The checkpoint file to use: a file as given, a run directory's best.npz (or last.npz if no
    best yet), or with no path the most recently written run under ./runs. Only regular files
    qualify: a FIFO or a device given as a model would block or never end.

    Returns (path, guessed) where guessed says the path was not given explicitly.
    """
    if model_path is not None:
        name = _shown(model_path)
        try:
            mode = os.stat(model_path).st_mode
        except FileNotFoundError:
            raise CheckpointError(f"{name}: no such checkpoint") from None
        except OSError as e:
            raise CheckpointError(f"{name}: cannot read: {e.strerror or e}") from None
        if stat.S_ISDIR(mode):
            for fname in ("best.npz", "last.npz"):
                cand = os.path.join(model_path, fname)
                cand_mode = _mode(cand)
                if cand_mode is not None and stat.S_ISREG(cand_mode):
                    return cand, False
                if cand_mode is not None:
                    raise CheckpointError(f"{_shown(cand)}: not a regular file ({_not_regular(cand_mode)}); "
                                          "expected a .npz checkpoint")
            raise CheckpointError(f"{name}: no best.npz or last.npz in this directory; is it a charrnn run?")
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{name}: not a regular file ({_not_regular(mode)}); expected a .npz checkpoint")
        return model_path, False
    best = None
    try:
        entries = list(os.scandir(runs_dir)) if os.path.isdir(runs_dir) else []
    except OSError as e:
        raise CheckpointError(f"cannot look for runs in ./{runs_dir}: {e.strerror or e}; pass --model") from None
    if entries:
        for entry in entries:
            if not entry.is_dir():
                continue
            for fname in ("best.npz", "last.npz"):
                cand = os.path.join(entry.path, fname)
                try:
                    st = os.stat(cand)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if best is None or st.st_mtime > best[0]:
                    best = (st.st_mtime, cand)
                break
    if best is None:
        raise CheckpointError(f"no trained model found under ./{runs_dir}; train one with 'charrnn train FILE' or pass --model")
    return best[1], True
