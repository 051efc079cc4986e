"""Checkpoints: the .npz format of DESIGN.md (version 1), atomic writes, strict validation on load,
and finding a run's checkpoint from a path or from ./runs.

A checkpoint is read with allow_pickle=False, so it can never run code. Everything a user can get
wrong (a missing, truncated, foreign or newer file) is a CheckpointError with a one-line message.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from charrnn import __version__
from charrnn.errors import CheckpointError
from charrnn.model import Model, ModelConfig, param_shapes
from charrnn.vocab import Vocab

FORMAT = "charrnn"
VERSION = 1


@dataclass
class Checkpoint:
    """What a checkpoint holds: the model, its vocabulary, the meta dictionary and any extra arrays
    (optimizer moments under optim.*, the carried training state under train.*)."""

    model: Model
    vocab: Vocab
    meta: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    path: str | None = None


# ------------------------------------------------------------------------------ writing
def write_npz_atomic(path: str, arrays: dict) -> None:
    """Write arrays to `path` through a temporary file in the same directory and os.replace, so a
    crash or a full disk leaves either the old file or the new one, never a truncated one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f"could not write {path}: {e.strerror or e}") from None
        raise


def save(path: str, model: Model, vocab: Vocab, meta: dict, extra: dict | None = None,
         dropout: float | None = None) -> None:
    """Save a model (float32 on disk as trained), its vocabulary, `meta` and extra arrays.
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
    for name, arr in (extra or {}).items():
        if name in arrays:
            raise ValueError(f"extra array name {name!r} collides with a checkpoint key")
        arrays[name] = arr
    write_npz_atomic(path, arrays)


# ------------------------------------------------------------------------------ reading
def load(path: str, dtype=np.float32, with_arrays: bool = False) -> Checkpoint:
    """Load and validate a checkpoint file; raise CheckpointError with a one-line reason otherwise."""
    name = path
    if os.path.isdir(path):
        raise CheckpointError(f"{name}: is a directory; expected a .npz checkpoint")
    if not os.path.exists(path):
        raise CheckpointError(f"{name}: no such checkpoint")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read: {e.strerror or e}") from None
    if magic != b"PK\x03\x04":
        what = "empty file" if not magic else "not a NumPy .npz archive"
        raise CheckpointError(f"{name}: not a charrnn checkpoint ({what})")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "meta" not in keys:
                raise CheckpointError(f"{name}: not a charrnn checkpoint (no meta record)")
            meta_raw = z["meta"]
            wanted = [k for k in z.files if k != "meta" and (with_arrays or not k.startswith(("optim.", "train.")))]
            data = {k: z[k] for k in wanted}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, zlib.error) as e:
        raise CheckpointError(f"{name}: corrupt or truncated checkpoint ({type(e).__name__})") from None
    try:
        meta = json.loads(str(meta_raw[()]))
    except (ValueError, TypeError):
        raise CheckpointError(f"{name}: corrupt checkpoint (unreadable meta record)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{name}: not a charrnn checkpoint (format {meta.get('format') if isinstance(meta, dict) else '?'!r})")
    version = meta.get("version")
    if not isinstance(version, int):
        raise CheckpointError(f"{name}: corrupt checkpoint (no format version)")
    if version > VERSION:
        raise CheckpointError(
            f"{name}: written by a newer charrnn (format version {version}, this is {__version__} reading "
            f"version {VERSION}); upgrade charrnn"
        )
    try:
        vocab = Vocab.from_tokens(meta["vocab"])
        cfg = ModelConfig(
            cell=meta["cell"],
            layers=int(meta["layers"]),
            hidden=int(meta["hidden"]),
            vocab_size=vocab.size,
            nonlinearity=meta.get("nonlinearity", "tanh"),
            dropout=float(meta.get("dropout", 0.0)),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: corrupt checkpoint meta ({e})") from None
    model = Model(cfg, dtype=dtype)
    for pname, shape in param_shapes(cfg).items():
        arr = data.get(pname)
        if arr is None:
            raise CheckpointError(f"{name}: corrupt checkpoint (missing {pname})")
        if arr.shape != shape or arr.dtype.kind != "f":
            raise CheckpointError(f"{name}: corrupt checkpoint ({pname} has shape {arr.shape}, expected {shape})")
        if not np.all(np.isfinite(arr)):
            raise CheckpointError(f"{name}: corrupt checkpoint ({pname} holds non-finite values)")
        model.params[pname][...] = arr
    extra = {k: v for k, v in data.items() if k.startswith(("optim.", "train."))}
    return Checkpoint(model=model, vocab=vocab, meta=meta, arrays=extra, path=path)


# ------------------------------------------------------------------------------ finding runs
def resolve(model_path: str | None, runs_dir: str = "runs") -> tuple[str, bool]:
    """The checkpoint file to use: a file as given, a run directory's best.npz (or last.npz if no
    best yet), or with no path the most recently written run under ./runs.

    Returns (path, guessed) where guessed says the path was not given explicitly.
    """
    if model_path is not None:
        if os.path.isdir(model_path):
            for fname in ("best.npz", "last.npz"):
                cand = os.path.join(model_path, fname)
                if os.path.exists(cand):
                    return cand, False
            raise CheckpointError(f"{model_path}: no best.npz or last.npz in this directory; is it a charrnn run?")
        if not os.path.exists(model_path):
            raise CheckpointError(f"{model_path}: no such checkpoint")
        return model_path, False
    best = None
    if os.path.isdir(runs_dir):
        for entry in os.scandir(runs_dir):
            if not entry.is_dir():
                continue
            for fname in ("best.npz", "last.npz"):
                cand = os.path.join(entry.path, fname)
                try:
                    mtime = os.stat(cand).st_mtime
                except OSError:
                    continue
                if best is None or mtime > best[0]:
                    best = (mtime, cand)
                break
    if best is None:
        raise CheckpointError(f"no trained model found under ./{runs_dir}; train one with 'charrnn train FILE' or pass --model")
    return best[1], True
