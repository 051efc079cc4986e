"""Training configuration: one dataclass that feeds Click's defaults, the training loop and the
checkpoint's meta, so every default is written down once; and what a run fitted where the user
left an option open, kept apart from it. Cheap to import (no numpy, no numba).

A run's TrainConfig is frozen: it records what the user asked for (None where an option was left
open). What the run chose or fitted (budget.py: the cell and size, the dropout, the schedule, the
default budget) is a Fitted value, stored beside it in the checkpoint; effective() combines the two
into the config the loop follows.

The ranges of the numeric options live here too (Bounds, TRAIN_BOUNDS, SAMPLE_BOUNDS), and the
choices of the others (CELLS, OPTIMIZERS, SCHEDULES ...): Click declares its options from them and
TrainConfig / SampleOptions check them again, so a library caller cannot hand the loop a NaN
learning rate, or a schedule without its length, that the command line would have refused.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

PRECISIONS = ("fp32", "bf16", "auto")  # --precision (precision.py)
SEED_LIMIT = 2**64  # seeds are whole numbers in [0, 2**64): the generators keep 64 bits of state

# The choices of the options, written once: Click declares its options from them without importing
# numpy, and TrainConfig and the modules that implement them check the same lists
# (tests/test_config.py holds each to the module that implements it).
CELLS = ("lstm", "gru", "rnn")  # --cell: the cells of kernels/cells (model.CELLS)
NONLINEARITIES = ("tanh", "relu")  # --nonlinearity, of --cell rnn (model.py)
DROPOUT_MODES = ("step", "locked")  # --dropout-mode: a mask per time step, or one per stream and batch
AVERAGES = ("off", "ema", "polyak")  # --average (optim.Averager)
OPTIMIZERS = ("adam", "rmsprop", "sgd")  # --optimizer (optim.make_optimizer)
SCHEDULES = ("auto", "constant", "step", "cosine", "wsd")  # --schedule: auto, fitted by budget.py, and optim.Schedule's
DECAY_SCHEDULES = ("cosine", "wsd")  # the schedules whose length is --decay-steps
CLIP_MODES = ("norm", "value")  # --clip-mode: the gradient's global norm, or each value
DOC_MODES = ("line", "blank")  # --docs: one document per line, or documents between blank lines (data/documents.py)
UNKNOWN_MODES = ("error", "unk", "extend")  # train --unknown (finetune.py)
PRIME_UNKNOWN_MODES = ("error", "skip", "unk")  # sample --unknown: prime characters the model never saw (generate.py)
ACTIVATIONS = ("cell", "h")  # viz --activation: an LSTM's tanh(c), or the hidden state (viz.py)
# what `train --resume` may be given besides the run (every other option comes from the run)
RESUME_OPTIONS = ("steps", "epochs", "minutes", "threads", "workers")


def spelled(names, conjunction: str = "or") -> str:
    """("a", "b", "c") as "a, b or c" (or "a, b and c")."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


@dataclass(frozen=True)
class Bounds:
    """An interval of finite numbers: [min, max], either end open, either end absent. NaN and
    +-inf are never inside (a comparison with NaN is False, so a plain range test lets it in)."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    integer: bool = False  # whole numbers only (bool is not one)
    optional: bool = False  # None is allowed (an option left open)

    def problem(self, value) -> str | None:
        """Why `value` is outside, in words; None when it is inside."""
        if value is None:
            return None if self.optional else "must be given"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"must be a number, got {value!r}"
        if self.integer and not isinstance(value, numbers.Integral):
            return f"must be a whole number, got {value!r}"
        if not self.integer and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if self.min is not None and (value <= self.min if self.min_open else value < self.min):
            return f"must be {'>' if self.min_open else '>='} {self.min}, got {value!r}"
        if self.max is not None and (value >= self.max if self.max_open else value > self.max):
            return f"must be {'<' if self.max_open else '<='} {self.max}, got {value!r}"
        return None


def check_bounds(obj, table: dict) -> None:
    """Raise UsageError naming the first field of `obj` outside its Bounds in `table`."""
    from charrnn.errors import UsageError

    for name, bounds in table.items():
        why = bounds.problem(getattr(obj, name))
        if why is not None:
            raise UsageError(f"{name} {why}")


# What a checkpoint may hold (checkpoint.py refuses more when it loads one): declared here, so the
# command line refuses such a model as it parses its options, before anything is read or allocated
MAX_LAYERS = 256  # stacked RNNs use a handful (GNMT: 8); also bounds the members (4 per layer)
MAX_STREAMS = 2**20  # B of the carried state train.h/c (32768x the default --batch)

_POSITIVE = Bounds(min=0, min_open=True)
_FRACTION = Bounds(min=0, max=1, max_open=True)  # [0, 1)
_COUNT = Bounds(min=1, integer=True)
TRAIN_BOUNDS = {
    "layers": Bounds(min=1, max=MAX_LAYERS, integer=True),
    # 65536 units: a 2-layer LSTM of 69 billion parameters, already far past any memory; without a
    # cap, a hidden size of 3e9 overflowed NumPy's array sizes (a traceback, not "out of memory")
    "hidden": Bounds(min=1, max=65536, integer=True, optional=True),
    "dropout": Bounds(min=0, max=1, max_open=True, optional=True),
    # |b| <= 100: sigmoid(100) is 1 in float32 already; anything larger only risks overflow
    "forget_bias": Bounds(min=-100, max=100),
    "weight_drop": Bounds(min=0, max=1, max_open=True, optional=True),
    "avg_decay": Bounds(min=0, max=1, max_open=True),
    "batch": Bounds(min=1, max=MAX_STREAMS, integer=True),
    "seq": _COUNT,
    "seq_warmup": Bounds(min=0, integer=True),
    "val_frac": _FRACTION,
    "lr": _POSITIVE,
    "warmup": Bounds(min=0, integer=True),
    "decay_every": _COUNT,
    "decay_factor": Bounds(min=0, max=1, min_open=True),
    "decay_steps": Bounds(min=1, integer=True, optional=True),
    "clip": Bounds(min=0),
    "epochs": Bounds(min=0, min_open=True, optional=True),
    "steps": Bounds(min=1, integer=True, optional=True),
    "minutes": Bounds(min=0, min_open=True, optional=True),
    "eval_every": Bounds(min=1, integer=True, optional=True),
    "patience": Bounds(min=1, integer=True, optional=True),
    "seed": Bounds(min=0, max=SEED_LIMIT, max_open=True, integer=True),
    "max_vocab": Bounds(min=1, integer=True, optional=True),
    "threads": Bounds(min=1, integer=True, optional=True),
}
"""The range of every numeric field of TrainConfig (the command line's options declare the same)."""

SAMPLE_BOUNDS = {
    "temp": Bounds(min=0),  # 0: greedy; any positive finite value, however small or large
    "top_k": Bounds(min=0, integer=True),  # 0: off
    "top_p": Bounds(min=0, max=1, min_open=True),  # 1: off
    "length": Bounds(min=0, integer=True),  # 0: unbounded
    # all samples run at once as parallel streams: a million 2x512 LSTM states are 8 GB already
    "num": Bounds(min=1, max=1_000_000, integer=True),
    "seed": Bounds(min=0, max=SEED_LIMIT, max_open=True, integer=True, optional=True),
}
"""The ranges of generate.SampleOptions, here so the command line can declare them without numpy."""

# `sample --prime-file`: the most bytes of prime read (1 MiB: the model reads a prime one character
# at a time, about a minute for 1 MiB at a 2x512 LSTM's step rate; an endless pipe stops here)
PRIME_MAX_BYTES = 2**20

# `sample`: the characters held in memory when samples are not streamed (--format jsonl, --beam,
# --num above 1): --num x --length (x --beam) at most this (64 Mi: a few hundred MB of text)
SAMPLE_HELD_MAX = 2**26

# `sample --beam K`: each position scores K x V continuations in float64 (K = 1024 with a vocabulary
# of 10,000 is 80 MB a step) and steps K + 1 streams; wider beams only cost time
BEAM_MAX = 1024


DEFAULT_MAX_INPUT = 4 * 2**30  # bytes of corpus read at most (--max-input): 4 GiB, well above 1 GB of text


@dataclass(frozen=True)
class TrainConfig:
    # ---- model
    cell: str | None = None  # lstm | gru | rnn; None: lstm, or gru for --minutes 10 or less (measured: docs/defaults.md)
    nonlinearity: str = "tanh"  # rnn only: tanh | relu
    layers: int = 2  # stacked recurrent layers
    hidden: int | None = None  # units per layer; None: sized from the corpus and the time budget
    dropout: float | None = None  # on each layer's output; None: chosen from the epochs the budget allows
    forget_bias: float = 1.0  # LSTM forget-gate bias at init (1.0 is the usual choice; PyTorch's 0 trains slower)
    # step: a new dropout mask at every time step | locked: one per stream and batch (within noise of step)
    dropout_mode: str = "step"
    # DropConnect on every layer's hidden-to-hidden weights, one mask per batch; None: from the epochs the
    # budget allows, with the dropout (budget.regularise)
    weight_drop: float | None = None
    # off | ema | polyak: validate (and keep as best.npz) an average of the weights. ema: -0.006 and -0.007
    # nats/char in 5-minute-equivalent runs on tiny Shakespeare (benchmarks/results/quality_regularisers.txt)
    average: str = "ema"
    avg_decay: float = 0.999  # ema: the average spans at most about 1 / (1 - avg_decay) updates
    # ---- data
    batch: int = 32  # B parallel streams per step
    seq: int = 64  # T steps of backprop-through-time per update
    seq_warmup: int = 300  # steps over which T grows from 8 to --seq (0: off); measured: docs/defaults.md
    val_frac: float = 0.1  # last fraction of the text held out for validation
    val_chars: int | str | None = None  # held-out characters that training scores: N, "all", or None (the default)
    # the most frequent characters kept in the vocabulary, the rest <UNK> (None: all). The decoder's
    # work grows with V (benchmarks/results/vocab_speed.txt, docs/defaults.md)
    max_vocab: int | None = 10_000
    docs: str | None = None  # None: one stream; line | blank: documents wrapped in <START> ... <END>
    encoding: str | None = None  # text encoding of the corpus (default strict UTF-8)
    max_input: int = DEFAULT_MAX_INPUT  # bytes of corpus read at most (--max-input): /dev/zero stops here
    # ---- optimisation
    optimizer: str = "adam"  # adam | rmsprop | sgd
    lr: float = 3e-3  # peak learning rate (3e-3 beat 2e-3 in 5-minute runs, benchmarks/quality_curve.py)
    schedule: str = "auto"  # auto | constant | step | cosine | wsd; auto: wsd over a --minutes budget, else constant
    warmup: int = 100  # linear learning-rate warm-up, steps
    decay_every: int = 1000  # step schedule: multiply the rate by decay_factor every this many steps
    decay_factor: float = 0.9  # step schedule factor
    decay_steps: int | None = None  # cosine / wsd schedule length, steps
    clip: float = 5.0  # clip the gradient's global norm at this value (0: off)
    clip_mode: str = "norm"  # norm | value
    # ---- starting point (finetune.py): fine-tuning and shared vocabularies
    init_from: str | None = None  # a checkpoint or run directory whose weights, size and vocabulary the run starts from
    vocab: str | None = None  # a checkpoint, run directory or JSON vocabulary file whose vocabulary a new model uses
    # characters of the text outside that vocabulary: error (refuse, naming them), unk (read as <UNK>),
    # extend (add them, --init-from only). error: nothing changes a vocabulary unasked
    unknown: str = "error"
    # ---- budget and evaluation
    epochs: float | None = None  # stop after this many passes over the training text
    steps: int | None = None  # stop after this many updates (counted from the start of the run)
    minutes: float | None = None  # stop after this much wall-clock time (and choose a model that fits it)
    eval_every: int | None = None  # steps between validations; None: about once per epoch (200-2000 steps; a --minutes run: fitted, budget.Fit)
    patience: int | None = None  # stop after this many validations without improvement
    seed: int = 1234  # one seed for initialisation and dropout
    threads: int | None = None  # Numba threads (BLAS stays single-threaded); None: every core
    # the arithmetic of the training step's products (precision.py): fp32 | bf16 (bfloat16 operands,
    # float32 sums) | auto (bf16 where the CPU multiplies bfloat16 faster)
    precision: str = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise UsageError, with the command line's message, unless every numeric field is in its
        range (TRAIN_BOUNDS: finite, and a whole number where the loop counts with it), every
        choice one of its values (CHOICES), a cosine or wsd schedule has its length and the
        starting point fits its --unknown mode. Runs on construction, so no TrainConfig (from the
        command line, a library caller or replace()) holds a NaN, a negative seed or a schedule
        that would fail later."""
        from charrnn.errors import UsageError

        check_bounds(self, TRAIN_BOUNDS)
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed and not (value is None and name in OPEN_CHOICES):
                raise UsageError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.schedule in DECAY_SCHEDULES and self.decay_steps is None:
            raise UsageError(f"--schedule {self.schedule} needs --decay-steps (the schedule must not depend on the "
                             "budget, so runs resume exactly)")
        self._check_start()
        v = self.val_chars
        if not (v is None or v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)):
            raise UsageError(f"val_chars must be a positive number of characters or 'all', not {v!r}")

    def _check_start(self) -> None:
        """--init-from, --vocab and --unknown: one starting point at most, and a mode that fits it."""
        from charrnn.errors import UsageError

        if self.unknown not in UNKNOWN_MODES:
            raise UsageError(f"unknown must be {spelled(UNKNOWN_MODES)}, not {self.unknown!r}")
        if self.init_from is not None and self.vocab is not None:
            raise UsageError("--init-from and --vocab do not combine: --init-from brings the model's own vocabulary")
        if self.unknown == "extend" and self.vocab is not None:
            raise UsageError("--unknown extend applies only to --init-from: --vocab keeps its vocabulary as it is "
                             "(use --unknown unk or error)")
        if self.unknown != "error" and self.init_from is None and self.vocab is None:
            raise UsageError("--unknown applies only with --init-from or --vocab")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Fitted:
    """What a run chose or fitted where the user left an option open (budget.py)."""

    cell: str  # the cell: the user's, or chosen for the budget
    hidden: int  # units per layer: the user's, or sized from the corpus and the budget
    dropout: float  # the user's, or from the epochs the budget allows
    dropout_pending: bool = False  # a --minutes run refits what was left open of these once it knows its speed
    schedule: str = "auto"  # the user's, or "wsd" once fitted to a --minutes budget ("auto" until then)
    decay_steps: int | None = None  # the user's, or fitted with the schedule
    epochs: float | None = None  # the default budget (10 epochs) of a run given none
    val_chars: int | None = None  # held-out positions training scores, from the split's start; None: all of it
    weight_drop: float = 0.0  # the user's, or fitted with the dropout
    dropout_open: bool = True  # the dropout is the run's to fit (the user left --dropout open)
    weight_drop_open: bool = False  # the weight drop is the run's to fit (left open; runs before it: no)
    precision: str = "fp32"  # the training step's products: fp32 or bf16 (runs before --precision: fp32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fitted":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_effective(cls, cfg: "TrainConfig", pending: bool = False) -> "Fitted":
        """The fitted values of a checkpoint written before they were kept apart, whose training
        config held them in place of the user's choices."""
        return cls(cell=cfg.cell or "lstm", hidden=cfg.hidden or 256, dropout=cfg.dropout or 0.0,
                   dropout_pending=bool(pending), schedule=cfg.schedule, decay_steps=cfg.decay_steps, epochs=None)


def effective(cfg: TrainConfig, fitted: Fitted) -> TrainConfig:
    """The config a run follows: the user's, with what was left open filled in from `fitted`."""
    return replace(cfg, cell=fitted.cell, hidden=fitted.hidden, dropout=fitted.dropout, schedule=fitted.schedule,
                   weight_drop=cfg.weight_drop if cfg.weight_drop is not None else fitted.weight_drop,
                   decay_steps=fitted.decay_steps, epochs=cfg.epochs if cfg.epochs is not None else fitted.epochs)


CHOICES = {"cell": CELLS, "nonlinearity": NONLINEARITIES, "dropout_mode": DROPOUT_MODES, "average": AVERAGES,
           "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "clip_mode": CLIP_MODES, "docs": DOC_MODES,
           "precision": PRECISIONS}
"""The allowed values of every field of TrainConfig that is a choice (unknown: _check_start)."""
OPEN_CHOICES = ("cell", "docs")  # may also be None: the cell chosen for the budget; one stream, not documents

DEFAULTS = TrainConfig()


# ---------------------------------------------------------------------------------- input size
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """A size such as `4G`, `500M`, `1.5g`, `64KiB` or `1000000` (bytes), in bytes; units are binary
    (K = 1024). Raises ValueError with a readable message."""
    s = str(text).strip().upper().replace(" ", "")
    for suffix in ("IB", "B"):
        if s.endswith(suffix) and len(s) > len(suffix):
            s = s[: -len(suffix)]
            break
    unit = s[-1:] if s[-1:] in _UNITS and s[-1:] else ""
    number = s[: len(s) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (examples: 4G, 500M, 64K, 1000000)") from None
    if value != value or value == float("inf"):
        raise ValueError(f"{text!r} is not a finite size (examples: 4G, 500M, 64K, 1000000)")
    if not value > 0:
        raise ValueError(f"{text!r}: a size must be above 0")
    if int(value * _UNITS[unit]) < 1:  # 0.5 bytes: a limit of 0, whose error would suggest 0 again
        raise ValueError(f"{text!r}: a size must be at least 1 byte")
    return int(value * _UNITS[unit])


def format_size(n: int) -> str:
    """Bytes as the shortest exact binary size: 4G, 500M, 1536K, or plain bytes."""
    for unit in ("T", "G", "M", "K"):
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)
