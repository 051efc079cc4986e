"""Training configuration: one dataclass that feeds Click's defaults, the training loop and the
checkpoint's meta, so every default is written down once. Cheap to import (no numpy, no numba).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainConfig:
    # ---- model
    cell: str | None = None  # lstm | gru | rnn; None: lstm, or gru for --minutes 10 or less (measured, README)
    nonlinearity: str = "tanh"  # rnn only: tanh | relu
    layers: int = 2  # stacked recurrent layers
    hidden: int | None = None  # units per layer; None: sized from the corpus and the time budget
    dropout: float | None = None  # on each layer's output; None: chosen from the epochs the budget allows
    dropout_fit: bool = False  # set by choose_size: refit dropout once a --minutes run knows its speed
    forget_bias: float = 1.0  # LSTM forget-gate bias at init (1.0 is the usual choice; PyTorch's 0 trains slower)
    # ---- data
    batch: int = 32  # B parallel streams per step
    seq: int = 64  # T steps of backprop-through-time per update
    seq_warmup: int = 300  # steps over which T grows from 8 to --seq (0: off); measured, see README
    val_frac: float = 0.1  # last fraction of the text held out for validation
    docs: str | None = None  # None: one stream; line | blank: documents wrapped in <START> ... <END>
    encoding: str | None = None  # text encoding of the corpus (default strict UTF-8)
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
    # ---- budget and evaluation
    epochs: float | None = None  # stop after this many passes over the training text
    steps: int | None = None  # stop after this many updates (counted from the start of the run)
    minutes: float | None = None  # stop after this much wall-clock time (and choose a model that fits it)
    eval_every: int | None = None  # steps between validations; None: about every 2 minutes of expected time
    patience: int | None = None  # stop after this many validations without improvement
    seed: int = 1234  # one seed for initialisation and dropout
    threads: int | None = None  # Numba threads (BLAS stays single-threaded); None: every core

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


DEFAULTS = TrainConfig()
