"""The run record: what a training run is, as one typed value, and the one place that turns it into
a checkpoint's meta record and back (docs/formats.md, format version 1), the migrations of older
checkpoints included.

A run is the configuration as the user gave it (`given`, stored once), what the run chose or
fitted where an option was left open (`fitted`), the vocabulary, the model's shape, the state of
the loop (`RunState`), the corpus it reads, and where it started from (`lineage`). What the loop
follows, the two configurations combined, is derived (`Run.config`), never stored apart.

Readers of a meta record: resume (`Run.from_meta`, strict: a run must continue exactly), and the
cards, samplers and scorers (`Recorded`, tolerant: any checkpoint, bare or from an older version,
has something to show). Not here: the file format itself (checkpoint.py), the run directory
(rundir.py), setting a run up (setup.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace

from charrnn.config import Fitted, TrainConfig, effective
from charrnn.errors import CharrnnError, UsageError
from charrnn.model import ModelConfig
from charrnn.optim import WSD_DECAY_FRAC, Schedule, make_optimizer
from charrnn.vocab import Vocab

DROPOUT_RNG = "splitmix64(seed, step, element)"  # how dropout masks are drawn (meta "rng"; model.py)


@dataclass
class RunState:
    """Where the loop is: everything of a run that changes as it trains, besides the arrays."""

    step: int = 0
    epoch: int = 0
    pos: int = 0
    lr_scale: float = 1.0
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    elapsed: float = 0.0  # training seconds before this process (resume)
    eval_due: bool = False  # an interrupt cut this step's validation short: the resumed run does it first
    train_loss: float | None = None  # the smoothed training loss when saved (metrics go on from it on resume)
    chars_per_s: float = 0.0  # the speed when saved

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CorpusRef:
    """The text a run trains on: its paths as given ("-" for stdin), its hash and its length."""

    paths: tuple
    sha256: str
    chars: int

    @classmethod
    def of(cls, corpus) -> CorpusRef:
        return cls(tuple(corpus.paths), corpus.sha256, corpus.chars)

    def to_meta(self, docs: str | None) -> dict:
        return {"paths": [os.path.abspath(p) if p != "-" else "-" for p in self.paths], "sha256": self.sha256,
                "chars": self.chars, "docs": docs}


@dataclass
class Run:
    """One training run (see the module's docstring)."""

    given: TrainConfig
    fitted: Fitted
    vocab: Vocab
    model: ModelConfig
    corpus: CorpusRef
    state: RunState = field(default_factory=RunState)
    lineage: dict | None = None  # {"origin": ...} (--init-from) or {"vocab_from": ...} (--vocab): finetune.record
    run_id: str | None = None  # the run's identity (rundir.RUN_FILE), carried by every checkpoint it writes
    dtype: str = "float32"  # of the parameters as trained (tests train in float64)

    @property
    def config(self) -> TrainConfig:
        """What the loop follows: the user's configuration with the fitted values filled in."""
        return effective(self.given, self.fitted)

    def schedule(self) -> Schedule:
        """The learning-rate schedule the config gives ("auto" runs as constant until a --minutes
        run fits it)."""
        cfg = self.config
        return Schedule("constant" if cfg.schedule == "auto" else cfg.schedule, cfg.lr, warmup=cfg.warmup,
                        decay_every=cfg.decay_every, decay_factor=cfg.decay_factor, decay_steps=cfg.decay_steps)


    # ------------------------------------------------------------------ the meta record
    def to_meta(self, optimizer: dict, stream_len: int) -> dict:
        """The meta record of a checkpoint of this run (checkpoint.save adds the model's shape and
        vocabulary). `optimizer` ({"name", "hparams", "t"}) is the live optimizer's own record;
        `stream_len` is the length of each of the run's streams. Format version 1 also keeps the
        combined configuration under "train", which older readers use."""
        cfg, st = self.config, self.state
        return {
            "config": self.given.to_dict(),  # as the user gave it
            "fitted": self.fitted.to_dict(),  # what the run chose or fitted
            "train": dict(cfg.to_dict(), dropout_fit=self.fitted.dropout_pending),  # derived: the two combined
            "run": st.to_dict(),
            "step": st.step,
            "epoch": st.epoch,
            "best_val": None if math.isinf(st.best_val) else st.best_val,
            "optimizer": optimizer,
            "schedule": self.schedule().to_dict(),
            "rng": {"seed": cfg.seed, "dropout": DROPOUT_RNG},
            "data": {"pos": st.pos, "streams": cfg.batch, "stream_len": stream_len},
            "corpus": self.corpus.to_meta(cfg.docs),
            "dtype": self.dtype,
            "run_id": self.run_id,
            **(self.lineage or {}),
        }

    @classmethod
    def from_meta(cls, meta: dict, vocab: Vocab, model: ModelConfig, path: str) -> Run:
        """The run a checkpoint's meta record (at `path`, for messages) describes, for resuming it:
        anything missing is a one-line CharrnnError. Older checkpoints are migrated here (_configs)."""
        try:
            given, fitted = _configs(meta)
            state = RunState(**meta["run"])
            corpus = CorpusRef(tuple(meta["corpus"]["paths"]), meta["corpus"]["sha256"], meta["corpus"].get("chars", 0))
        except (KeyError, TypeError) as e:
            raise CharrnnError(f"{path}: cannot resume: checkpoint lacks training state ({e})") from None
        except UsageError as e:  # options this version no longer accepts (a range tightened since)
            raise CharrnnError(f"{path}: cannot resume: the run's recorded options are out of range: {e}") from None
        lineage = {k: meta[k] for k in ("origin", "vocab_from") if k in meta} or None
        return cls(given, fitted, vocab, model, corpus, state, lineage, meta.get("run_id"),
                   str(meta.get("dtype", "float32")))

    def make_optimizer(self, n_params: int, dtype):
        """A fresh optimizer of the run's kind and learning rate (its moments zero)."""
        return make_optimizer(self.given.optimizer, n_params, dtype, self.given.lr)

    # ------------------------------------------------------------------ between processes
    def to_wire(self) -> dict:
        """The record as plain data (JSON types), for the other workers of an MPI job."""
        return {"given": self.given.to_dict(), "fitted": self.fitted.to_dict(), "vocab": self.vocab.to_json(),
                "model": self.model.to_dict(), "corpus": asdict(self.corpus), "state": self.state.to_dict(),
                "lineage": self.lineage, "run_id": self.run_id, "dtype": self.dtype}

    @classmethod
    def from_wire(cls, d: dict) -> Run:
        c = d["corpus"]
        return cls(TrainConfig.from_dict(d["given"]), Fitted.from_dict(d["fitted"]), Vocab.from_json(d["vocab"]),
                   ModelConfig(**d["model"]), CorpusRef(tuple(c["paths"]), c["sha256"], c["chars"]),
                   RunState(**d["state"]), d["lineage"], d["run_id"], d["dtype"])


def optimizer_steps(meta: dict, path: str) -> int:
    """The optimizer's step count a checkpoint records (the bias correction of Adam goes on from
    it), for resuming: a one-line CharrnnError when it is missing or not a count."""
    opt = meta.get("optimizer")
    t = opt.get("t") if isinstance(opt, dict) else None
    if type(t) not in (int, float) or not t >= 0 or t != int(t):
        raise CharrnnError(f"{path}: cannot resume: checkpoint lacks training state (the optimizer's step count)")
    return int(t)


def averaging_start(cfg: TrainConfig) -> int:
    """The update after which a Polyak average begins: where the learning rate starts to decay (a
    wsd schedule's decay; otherwise the end of the warm-up). A function of the fitted schedule,
    which is final before the decay begins, so a resumed run averages the same."""
    if cfg.schedule == "wsd" and cfg.decay_steps is not None:
        return cfg.warmup + int(cfg.decay_steps * (1.0 - WSD_DECAY_FRAC))
    return cfg.warmup


# ---------------------------------------------------------------------------------- migrations
def _configs(meta: dict) -> tuple[TrainConfig, Fitted]:
    """The given and fitted configurations of a meta record, older records migrated:
    - before the given and fitted values were kept apart, only "train" (the two combined) was kept;
    - before --max-vocab, a run kept every character;
    - before --weight-drop, --dropout-mode and --average, a run trained without them."""
    if "config" in meta and "fitted" in meta:
        given, fitted = TrainConfig.from_dict(meta["config"]), Fitted.from_dict(meta["fitted"])
    else:
        given = TrainConfig.from_dict(meta["train"])
        fitted = Fitted.from_effective(given, pending=meta["train"].get("dropout_fit", False))
    recorded = meta.get("config", meta.get("train", {}))
    if "max_vocab" not in recorded:
        given = replace(given, max_vocab=None)
    if "weight_drop" not in recorded:
        given = replace(given, weight_drop=0.0, dropout_mode="step", average="off")
    return given, fitted


# ---------------------------------------------------------------------------------- tolerant reading
class Recorded:
    """What any checkpoint's meta record says of its run, read tolerantly: a bare checkpoint (a
    model saved without a run), one from an older or newer charrnn, or a damaged record gives
    empty values instead of errors. For the model card, the samplers and scorers, and lineage."""

    def __init__(self, meta: dict | None):
        self.meta = meta if isinstance(meta, dict) else {}

    def part(self, key: str) -> dict:
        """meta[key] when it is a dict, else {}."""
        v = self.meta.get(key)
        return v if isinstance(v, dict) else {}

    @property
    def given(self) -> dict:
        """The options as given; a record from before they were kept apart has only the combined ones."""
        return self.part("config") or self.part("train")

    @property
    def fitted(self) -> dict:
        return self.part("fitted")

    @property
    def combined(self) -> dict:
        """The options the run followed (given and fitted combined)."""
        return self.part("train") or self.part("config")

    @property
    def separate(self) -> bool:
        """Whether the given and fitted options are kept apart (every run since they were)."""
        return "config" in self.meta

    @property
    def docs(self) -> str | None:
        """The document mode the model was trained in (None: one stream of text)."""
        return self.combined.get("docs")

    @property
    def state(self) -> dict:
        return self.part("run")

    @property
    def step(self):
        return self.meta.get("step", self.state.get("step"))

    @property
    def epoch(self):
        return self.meta.get("epoch", self.state.get("epoch"))

    @property
    def best_val(self):
        return self.meta.get("best_val")

    @property
    def corpus(self) -> dict:
        return self.part("corpus")

    @property
    def lineage(self) -> dict:
        return {k: self.meta[k] for k in ("origin", "vocab_from") if k in self.meta}

    def lineage_key(self) -> tuple:
        """What two checkpoints of one run share whatever their step: corpus, model shape, seed."""
        m = self.meta
        return (self.corpus.get("sha256"), m.get("cell"), m.get("layers"), m.get("hidden"), m.get("vocab"),
                self.combined.get("seed"))
