"""Starting a run from another: a model's weights (--init-from), a given vocabulary (--vocab), the
characters of the text outside it (--unknown error|unk|extend), and the record a run keeps of
where it came from (the meta keys "origin" and "vocab_from").

Vocabulary rows that --unknown extend adds are sorted in, never appended: a vocabulary is always
<START> <END> <UNK> and then its characters in code-point order (vocab.py, docs/design.md), so sample,
eval and PyTorch read an extended model exactly as any other. The old tokens' columns of
rnn.weight_ih_l0 and rows of decoder.weight / decoder.bias move to their new ids unchanged, so
before any training step the extended model gives every old token the same logit as its parent
(the new tokens only add logits); the new ones are drawn as Model.init draws every parameter.

Not here: the training loop (train.py), the checkpoint format (checkpoint.py), option parsing
(cli/).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field, replace

import numpy as np

from charrnn import checkpoint
from charrnn.config import UNKNOWN_MODES, TrainConfig
from charrnn.errors import CharrnnError, UsageError
from charrnn.model import Model, ModelConfig
from charrnn.run import Recorded
from charrnn.vocab import UNK_ID, Vocab, describe_chars

EXTEND_STREAM = 1  # the new rows are drawn from PCG64(SeedSequence([seed, 1])), apart from Model.init's
SHOWN_CHARS = 10  # characters named in a message before "..."
MAX_VOCAB_FILE = checkpoint.MAX_META_BYTES  # a JSON vocabulary of every code point is ~22 MB


@dataclass
class Base:
    """What a run starts from: the vocabulary (and, for --init-from, the model) of a checkpoint or
    vocabulary file, and a record of that file for the run's meta."""

    kind: str  # "init_from" (weights, size and vocabulary) or "vocab_from" (the vocabulary only)
    path: str  # the file read: a checkpoint, or a JSON vocabulary
    vocab: Vocab
    model: Model | None = None  # --init-from only
    meta: dict = field(default_factory=dict)  # the checkpoint's meta record ({} for a JSON file)
    sha256: str = ""

    @property
    def what(self) -> str:
        return "the model's vocabulary" if self.kind == "init_from" else f"the vocabulary of {self.path}"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise CharrnnError(f"{path}: cannot read: {e.strerror or e}") from None
    return digest.hexdigest()


def load_base(cfg: TrainConfig) -> Base | None:
    """The Base of --init-from or --vocab (None for neither); one-line errors for a missing,
    corrupt or foreign file."""
    if cfg.init_from is not None:
        path, _ = checkpoint.resolve(cfg.init_from)  # a run directory means its best.npz (or last.npz)
        ck = checkpoint.load(path)
        return Base("init_from", os.path.abspath(path), ck.vocab, ck.model, ck.meta, file_sha256(path))
    if cfg.vocab is not None:
        return _vocab_source(cfg.vocab)
    return None


def _vocab_source(given: str) -> Base:
    """--vocab: a checkpoint or run directory (its vocabulary), or a JSON file of the vocabulary's
    JSON form, {"tokens": ["<START>", "<END>", "<UNK>", "a", ...]} (Vocab.to_json; every run
    directory's tokens.json holds it too)."""
    try:
        mode = os.stat(given).st_mode
    except FileNotFoundError:
        raise CharrnnError(f"{given}: no such vocabulary file or checkpoint") from None
    except OSError as e:
        raise CharrnnError(f"{given}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        path, _ = checkpoint.resolve(given)
        return _checkpoint_vocab(path)
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
        raise CharrnnError(f"{given}: not a regular file; expected a checkpoint or a JSON vocabulary file")
    try:
        with open(given, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CharrnnError(f"{given}: cannot read: {e.strerror or e}") from None
    if head == b"PK\x03\x04":  # a zip: an .npz checkpoint
        return _checkpoint_vocab(checkpoint.resolve(given)[0])
    return Base("vocab_from", os.path.abspath(given), read_vocab_file(given), sha256=file_sha256(given))


def _checkpoint_vocab(path: str) -> Base:
    ck = checkpoint.load(path)
    return Base("vocab_from", os.path.abspath(path), ck.vocab, None, ck.meta, file_sha256(path))


def read_vocab_file(path: str) -> Vocab:
    """A vocabulary from its JSON form; CharrnnError with a one-line reason for anything else."""
    try:
        size = os.path.getsize(path)
        if size > MAX_VOCAB_FILE:
            raise CharrnnError(f"{path}: not a vocabulary file ({size:,} bytes, more than any vocabulary's JSON form)")
        with open(path, "rb") as f:
            data = f.read(MAX_VOCAB_FILE + 1)
    except OSError as e:
        raise CharrnnError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CharrnnError(f"{path}: not a vocabulary file (neither a checkpoint nor UTF-8 JSON)") from None
    try:
        vocab = Vocab.from_json(text)
    except RecursionError:
        vocab = None  # refused below, without a chained traceback
    except (ValueError, TypeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CharrnnError(f"{path}: not a vocabulary file ({why}); expected "
                           '{"tokens": ["<START>", "<END>", "<UNK>", "a", ...]}') from None
    if vocab is None:
        raise CharrnnError(f"{path}: not a vocabulary file (JSON nested too deep)")
    if not vocab.chars:
        raise CharrnnError(f"{path}: the vocabulary holds no characters")
    return vocab


# ---------------------------------------------------------------------------------- options
# Options that a model fixes: given explicitly with --init-from they must agree with it.
SIZE_OPTIONS = ("cell", "layers", "hidden", "nonlinearity")


def adopt(cfg: TrainConfig, base: Base | None, explicit=()) -> TrainConfig:
    """The config of a run that starts from `base`: with --init-from the model's cell, layers,
    hidden size and nonlinearity, and no --max-vocab (the vocabulary is given). An option the user
    gave (named in `explicit`, or cell / hidden set at all: None means left open) that contradicts
    the model, or that has nothing to act on, is a one-line UsageError."""
    explicit = set(explicit)
    if base is None:
        if "unknown" in explicit:
            raise UsageError("--unknown applies only with --init-from or --vocab")
        return cfg
    if "max_vocab" in explicit:
        flag = "--init-from" if base.kind == "init_from" else "--vocab"
        raise UsageError(f"--max-vocab does not apply with {flag}: the vocabulary is given")
    if base.model is None:
        return replace(cfg, max_vocab=None)
    m = base.model.cfg
    if "forget_bias" in explicit:
        raise UsageError("--forget-bias sets an initial bias; with --init-from the weights come from the model")
    shown = f"{m.cell} {m.layers}x{m.hidden}" + (f" {m.nonlinearity}" if m.cell == "rnn" else "")
    for name in SIZE_OPTIONS:
        value = getattr(cfg, name)
        if name == "nonlinearity" and m.cell != "rnn":
            continue  # only an RNN has one (a normal run ignores it for other cells too)
        given = name in explicit or (name in ("cell", "hidden") and value is not None)
        if given and value != getattr(m, name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {value} contradicts --init-from {cfg.init_from} ({shown}); leave {flag} out "
                             "to fine-tune it (the size comes from the model)")
    return replace(cfg, cell=m.cell, layers=m.layers, hidden=m.hidden, nonlinearity=m.nonlinearity, max_vocab=None)


# ---------------------------------------------------------------------------------- the vocabulary
@dataclass
class VocabPlan:
    """The vocabulary a run over `base` uses, and what it did with the text's other characters."""

    vocab: Vocab
    missing: list  # characters of the text outside the base vocabulary, in code-point order
    added: list  # those added to it (--unknown extend)
    notes: list  # lines for stderr


def plan_vocab(base: Base, text_chars, unknown: str, source: str) -> VocabPlan:
    """The run's vocabulary for a text whose distinct characters are `text_chars`: the base's,
    with the characters outside it refused (error), read as <UNK> (unk, the id every charrnn
    vocabulary has) or sorted in (extend, --init-from only). `source` names the base in messages."""
    if unknown not in UNKNOWN_MODES:
        raise UsageError(f"--unknown must be one of {', '.join(UNKNOWN_MODES)}, not {unknown!r}")
    missing = sorted(ch for ch in text_chars if ch not in base.vocab)
    start = [f"note: training over the vocabulary of {base.path} ({base.vocab.size:,} tokens)"]
    if base.kind == "init_from":
        parent = Recorded(base.meta)
        best = parent.best_val
        start = [f"note: starting from {base.path} (step {parent.meta.get('step', '?')}"
                 + (f", validation loss {best:.4f} nats/char" if isinstance(best, (int, float)) else "")
                 + "): its weights, with a fresh optimizer and learning-rate schedule"]
    if not missing:
        return VocabPlan(base.vocab, [], [], start)
    listed = _listed(missing)
    if unknown == "error":
        fixes = ("--unknown extend to add them to the model, or --unknown unk to read them as <UNK>"
                 if base.kind == "init_from" else "--unknown unk to read them as <UNK>, or a vocabulary that holds them")
        raise UsageError(f"{len(missing):,} character(s) of the text are not in {source}: {listed}; give {fixes}")
    if unknown == "unk":
        return VocabPlan(base.vocab, missing, [], start + [
            f"note: {len(missing):,} character(s) of the text are not in {source} and are read as <UNK> "
            f"(--unknown unk; sample never writes <UNK>): {listed}"])
    if base.kind != "init_from":
        raise UsageError("--unknown extend applies only to --init-from: --vocab keeps its vocabulary as it is")
    vocab = Vocab(list(base.vocab.chars) + missing)
    H = base.model.cfg.hidden
    return VocabPlan(vocab, missing, missing, start + [
        f"note: added {len(missing):,} character(s) to the model's {base.vocab.size:,} tokens (--unknown extend): "
        f"{listed}; sorted in by code point, so the old tokens' ids may shift (their weights move with them); each "
        f"new token's column of rnn.weight_ih_l0, row of decoder.weight and decoder.bias drawn uniform in "
        f"+-1/sqrt({H}) = {1 / np.sqrt(H):.4g}, as the model was initialised, from --seed"])


def _listed(chars) -> str:
    shown = describe_chars(chars[:SHOWN_CHARS])
    return shown + (f" ... ({len(chars):,} in all)" if len(chars) > SHOWN_CHARS else "")


def transplant(parent: Model, old: Vocab, new: Vocab, cfg: ModelConfig, seed: int) -> Model:
    """A model of config `cfg` (the parent's size, vocabulary `new`, which holds every token of
    `old`) with the parent's weights: each old token's column of rnn.weight_ih_l0 and row of
    decoder.weight / decoder.bias moved to its id in `new`, every other parameter copied, and the
    tokens only `new` has drawn uniform in +-1/sqrt(H), as Model.init draws (from a PCG64 stream
    of its own for `seed`: weight_ih_l0 columns, then decoder.weight rows, then decoder.bias)."""
    pc = parent.cfg
    if (cfg.cell, cfg.layers, cfg.hidden, cfg.nonlinearity) != (pc.cell, pc.layers, pc.hidden, pc.nonlinearity):
        raise ValueError("transplant keeps the parent's cell and size")
    if cfg.vocab_size != new.size or parent.cfg.vocab_size != old.size:
        raise ValueError("vocabulary sizes do not match the configs")
    idx = np.array([new.id_of(t) for t in old.tokens], dtype=np.int64)  # (V_old,) the new id of each old token
    child = Model(cfg, dtype=parent.dtype)
    for name, arr in parent.params.items():
        if name == "rnn.weight_ih_l0":
            child.params[name][:, idx] = arr  # (G*H, V): one column per token
        elif name in ("decoder.weight", "decoder.bias"):
            child.params[name][idx] = arr  # (V, H) / (V,): one row per token
        else:
            child.params[name][...] = arr
    fresh = np.setdiff1d(np.arange(new.size), idx)
    if fresh.size:
        gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, EXTEND_STREAM])))
        bound = 1.0 / np.sqrt(cfg.hidden)
        w = child.params["rnn.weight_ih_l0"]
        w[:, fresh] = gen.uniform(-bound, bound, size=(w.shape[0], fresh.size))
        child.params["decoder.weight"][fresh] = gen.uniform(-bound, bound, size=(fresh.size, cfg.hidden))
        child.params["decoder.bias"][fresh] = gen.uniform(-bound, bound, size=fresh.size)
    return child


def count_unk(ids: np.ndarray, chunk: int = 1 << 24) -> int:
    """Occurrences of <UNK> in a (memory-mapped) token stream, a chunk at a time."""
    return sum(int(np.count_nonzero(ids[i : i + chunk] == UNK_ID)) for i in range(0, len(ids), chunk))


# ---------------------------------------------------------------------------------- the record
def record(base: Base, plan: VocabPlan, unknown: str) -> dict:
    """The meta entry of a run started from `base`: "origin" (--init-from) or "vocab_from"."""
    entry = {"path" if base.kind == "vocab_from" else "init_from": base.path, "sha256": base.sha256}
    if base.kind == "init_from":
        parent = Recorded(base.meta)
        entry.update(step=parent.meta.get("step"), best_val=parent.best_val, corpus_sha256=parent.corpus.get("sha256"),
                     vocab_size=base.vocab.size)
    else:
        entry["kind"] = "checkpoint" if base.meta else "json"
    entry.update(unknown=unknown, added=list(plan.added), as_unk=list(plan.missing) if unknown == "unk" else [])
    return {base.kind: entry} if base.kind == "vocab_from" else {"origin": entry}


def check_resume_vocab(corpus_chars, vocab: Vocab, unknown: str, path: str):
    """A resumed run over a given vocabulary (--init-from, --vocab) keeps the one its checkpoint
    records; the corpus (already checked by hash) must still fit it as it did."""
    if unknown == "unk":
        return
    missing = [ch for ch in corpus_chars if ch not in vocab]
    if missing:
        raise CharrnnError(f"{path}: cannot resume: the corpus holds characters its vocabulary lacks: {_listed(missing)}")


def docs_note(base: Base, docs) -> str | None:
    """A line when the text is read in another document mode than MODEL was trained in."""
    parent = Recorded(base.meta).docs
    if base.kind != "init_from" or parent == docs:
        return None

    def mode(d):
        return f"--docs {d}" if d else "one stream (no --docs)"

    return f"note: {base.path} was trained on {mode(parent)}; this run reads the text as {mode(docs)}"
