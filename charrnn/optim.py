"""Gradient clipping, optimizers (Adam, RMSprop, SGD) and learning-rate schedules over flat buffers.

Each public function checks dtypes, shapes and contiguity, then calls one compiled loop in
charrnn/kernels/optim.py. Optimizer state is a few flat buffers the size of the parameters, exposed
by `state_buffers()` and restored by `load_state()` so a checkpoint can resume exactly. Schedules are
pure functions of the step, so a resumed run gets the same learning rate.

Not here: when to clip or step (train.py), how state is written to disk (checkpoint.py).
"""

from __future__ import annotations

import math

import numpy as np

from charrnn.config import AVERAGES, DECAY_SCHEDULES, SCHEDULES
from charrnn.kernels.optim import _adam, _clip_value, _rmsprop, _scale, _sgd, _sumsq

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_flat(name, a, size=None, dtype=None):
    if not isinstance(a, np.ndarray) or a.ndim != 1 or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous 1-D numpy array")
    if a.dtype not in DTYPES or (dtype is not None and a.dtype != dtype):
        raise ValueError(f"{name} must be {dtype or 'float32 or float64'}, got {a.dtype}")
    if size is not None and a.size != size:
        raise ValueError(f"{name} must have {size} elements, got {a.size}")
    if not a.flags.writeable:
        raise ValueError(f"{name} must be writeable")


def _check_scalar(name, x, lo=0.0, lo_open=False, hi=None, hi_open=False):
    x = float(x)
    bad = not math.isfinite(x) or (x <= lo if lo_open else x < lo)
    if hi is not None:
        bad = bad or (x >= hi if hi_open else x > hi)
    if bad:
        lb, rb = "(" if lo_open else "[", ")" if hi_open or hi is None else "]"
        raise ValueError(f"{name} must be in {lb}{lo}, {'inf' if hi is None else hi}{rb}, got {x}")
    return x


# ----------------------------------------------------------------------------- clipping
def grad_norm(grad: np.ndarray) -> float:
    """Global L2 norm of a flat gradient, accumulated in float64."""
    _check_flat("grad", grad)
    return math.sqrt(_sumsq(grad))


def clip_grad_norm(grad: np.ndarray, max_norm: float) -> float:
    """Scale `grad` in place so its L2 norm is at most `max_norm`; return the norm before clipping.

    PyTorch's clip_grad_norm_: scale = max_norm / (norm + 1e-6), applied only when < 1. A non-finite
    norm is returned as is and the gradient is left untouched, for the caller to detect.
    """
    max_norm = _check_scalar("max_norm", max_norm, lo_open=True)
    norm = grad_norm(grad)
    if not math.isfinite(norm):
        return norm
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        _scale(grad, scale)
    return norm


def clip_grad_value(grad: np.ndarray, c: float) -> None:
    """Clamp every element of `grad` to [-c, c] in place (NaN stays NaN)."""
    _check_flat("grad", grad)
    _clip_value(grad, _check_scalar("clip value", c, lo_open=True))


# ----------------------------------------------------------------------------- optimizers
class Optimizer:
    """Base class: a step count `t` (updates done so far) and named flat state buffers."""

    name = ""

    def __init__(self, size: int, dtype, lr: float):
        if int(size) != size or size < 0:
            raise ValueError(f"size must be a non-negative integer, got {size}")
        self.size = int(size)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPES:
            raise ValueError("dtype must be float32 or float64")
        self.lr = _check_scalar("lr", lr)
        self.t = 0
        self._no_avg = np.zeros(0, dtype=self.dtype)  # made once: nothing is allocated per step
        self._buffers: dict[str, np.ndarray] = {}

    def _new_buffer(self, name):
        self._buffers[name] = np.zeros(self.size, dtype=self.dtype)
        return self._buffers[name]

    def step(self, theta: np.ndarray, grad: np.ndarray, lr: float | None = None, avg: np.ndarray | None = None,
             rate: float = 0.0) -> None:
        """One update of `theta` in place from `grad` (left unchanged) at learning rate `lr`
        (default: the constructor's); in the same pass, an average of the weights `avg` (if
        given) moves `rate` of the way to the new theta: avg += rate * (theta - avg)."""
        _check_flat("theta", theta, self.size, self.dtype)
        _check_flat("grad", grad, self.size, self.dtype)
        if np.shares_memory(theta, grad):
            raise ValueError("theta and grad must not overlap")
        if avg is None:
            avg = self._no_avg  # the kernels take an empty average as "none"
        else:
            _check_flat("avg", avg, self.size, self.dtype)
            if np.shares_memory(avg, theta) or np.shares_memory(avg, grad):
                raise ValueError("avg must not overlap theta or grad")
        rate = _check_scalar("rate", rate, hi=1.0)
        lr = self.lr if lr is None else _check_scalar("lr", lr)
        self.t += 1
        self._update(theta, grad, lr, avg, rate)

    def _update(self, theta, grad, lr, avg, rate):  # pragma: no cover - abstract
        raise NotImplementedError

    def state_buffers(self) -> dict[str, np.ndarray]:
        """The optimizer's own flat state buffers (live, not copies), by name."""
        return dict(self._buffers)

    def load_state(self, buffers: dict, t: int) -> None:
        """Copy saved state buffers in and set the step count; validates names, shapes and dtypes."""
        if set(buffers) != set(self._buffers):
            raise ValueError(f"{self.name} state needs buffers {sorted(self._buffers)}, got {sorted(buffers)}")
        if isinstance(t, bool) or int(t) != t or t < 0:
            raise ValueError(f"step count must be a non-negative integer, got {t}")
        for name, a in buffers.items():
            a = np.asarray(a)
            if a.shape != (self.size,) or a.dtype != self.dtype:
                raise ValueError(
                    f"state buffer {name!r} must be {self.dtype} of shape ({self.size},), got {a.dtype} {a.shape}"
                )
        for name, a in buffers.items():
            np.copyto(self._buffers[name], a)
        self.t = int(t)

    def hparams(self) -> dict:
        """Hyper-parameters as a JSON-able dict (with the name), enough for make_optimizer."""
        return {"name": self.name, "lr": self.lr}


class Adam(Optimizer):
    """torch.optim.Adam (no amsgrad; weight_decay is L2 added to the gradient)."""

    name = "adam"

    def __init__(self, size, dtype, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(size, dtype, lr)
        b1, b2 = betas
        self.beta1 = _check_scalar("beta1", b1, hi=1.0, hi_open=True)
        self.beta2 = _check_scalar("beta2", b2, hi=1.0, hi_open=True)
        self.eps = _check_scalar("eps", eps)
        self.weight_decay = _check_scalar("weight_decay", weight_decay)
        self.m = self._new_buffer("m")
        self.v = self._new_buffer("v")

    def _update(self, theta, grad, lr, avg, rate):
        _adam(theta, grad, self.m, self.v, lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.t, avg, rate)

    def hparams(self):
        return dict(super().hparams(), betas=[self.beta1, self.beta2], eps=self.eps, weight_decay=self.weight_decay)


class RMSprop(Optimizer):
    """torch.optim.RMSprop (no momentum, not centred). alpha 0.95 as in char-rnn."""

    name = "rmsprop"

    def __init__(self, size, dtype, lr=2e-3, alpha=0.95, eps=1e-8):
        super().__init__(size, dtype, lr)
        self.alpha = _check_scalar("alpha", alpha, hi=1.0)
        self.eps = _check_scalar("eps", eps)
        self.sq = self._new_buffer("sq")

    def _update(self, theta, grad, lr, avg, rate):
        _rmsprop(theta, grad, self.sq, lr, self.alpha, self.eps, avg, rate)

    def hparams(self):
        return dict(super().hparams(), alpha=self.alpha, eps=self.eps)


class SGD(Optimizer):
    """torch.optim.SGD (dampening 0, not Nesterov). With momentum 0 there is no state buffer."""

    name = "sgd"

    def __init__(self, size, dtype, lr=0.05, momentum=0.9):
        super().__init__(size, dtype, lr)
        self.momentum = _check_scalar("momentum", momentum)
        self.buf = self._new_buffer("buf") if self.momentum != 0.0 else np.zeros(0, dtype=self.dtype)

    def _update(self, theta, grad, lr, avg, rate):
        _sgd(theta, grad, self.buf, lr, self.momentum, self.t, avg, rate)

    def hparams(self):
        return dict(super().hparams(), momentum=self.momentum)


OPTIMIZERS = {"adam": Adam, "rmsprop": RMSprop, "sgd": SGD}  # config.OPTIMIZERS names them (tests/test_config.py)


def make_optimizer(name: str, size: int, dtype, lr: float, **kw) -> Optimizer:
    """An optimizer by name ("adam", "rmsprop", "sgd"); `kw` are its other hyper-parameters."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](size, dtype, lr=lr, **kw)


# ----------------------------------------------------------------------------- weight averaging
class Averager:
    """An average of the weights along training, the model a run validates and keeps as best.npz.

      ema     an exponential moving average: after update number n (1-based) the average moves
              rate(n) = max(1 - decay, 10 / (9 + n)) of the way to the new weights, so it starts
              as the weights themselves and spans about the last tenth of the updates so far,
              at most about 1 / (1 - decay) of them
      polyak  the plain mean of the weights after every update from `start` on (the beginning of
              the learning rate's decay); before it, the weights themselves

    The rate is a pure function of the update number and `start`, so a resumed run (which restores
    `avg`) continues exactly. The update itself is fused into the optimizer's pass (Optimizer.step).
    """

    def __init__(self, kind: str, size: int, dtype, decay: float = 0.999):
        if kind not in AVERAGES[1:]:
            raise ValueError(f"average must be one of {AVERAGES[1:]}, got {kind!r}")
        self.kind = kind
        self.decay = _check_scalar("decay", decay, hi=1.0, hi_open=True)
        self.avg = np.zeros(int(size), dtype=np.dtype(dtype))

    def rate(self, n: int, start: int = 0) -> float:
        """The share of the new weights in the average after update number n (n >= 1)."""
        n = _check_int("update number", n, 1)
        if self.kind == "ema":
            return max(1.0 - self.decay, 10.0 / (9.0 + n))
        return 1.0 if n <= start else 1.0 / (n - start)


# ----------------------------------------------------------------------------- schedules
KINDS = tuple(s for s in SCHEDULES if s != "auto")  # "auto" is fitted (budget.py) to one of these first
WSD_DECAY_FRAC = 0.2  # the final part of a "wsd" schedule that decays linearly


class Schedule:
    """Learning rate as a pure function of `step`, the number of updates done before this one (0-based,
    i.e. the optimizer's `t` before it steps).

    All kinds first warm up linearly: lr * (step + 1) / warmup for step < warmup. After that:
      constant  lr
      step      lr * decay_factor ** ((step - warmup) // decay_every)  (char-rnn's learning_rate_decay)
      cosine    from lr down to lr * min_lr_frac over decay_steps steps, then flat at lr * min_lr_frac
      wsd       "warm-up, stable, decay": lr for the first 80% of decay_steps, then linearly down to
                lr * min_lr_frac at decay_steps, then flat there
    """

    def __init__(self, kind="constant", lr=2e-3, warmup=0, decay_every=1000, decay_factor=0.97,
                 decay_steps=None, min_lr_frac=0.1):
        if kind not in KINDS:
            raise ValueError(f"schedule must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.lr = _check_scalar("lr", lr)
        self.warmup = _check_int("warmup", warmup, 0)
        self.decay_every = _check_int("decay_every", decay_every, 1)
        self.decay_factor = _check_scalar("decay_factor", decay_factor, lo_open=True)
        self.min_lr_frac = _check_scalar("min_lr_frac", min_lr_frac, hi=1.0)
        if kind in DECAY_SCHEDULES and decay_steps is None:
            raise ValueError(f"a {kind} schedule needs decay_steps")
        self.decay_steps = None if decay_steps is None else _check_int("decay_steps", decay_steps, 1)

    def lr_at(self, step: int) -> float:
        """The learning rate for the update made after `step` updates (step >= 0)."""
        step = _check_int("step", step, 0)
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        s = step - self.warmup
        if self.kind == "step":
            return self.lr * self.decay_factor ** (s // self.decay_every)
        if self.kind == "cosine":
            lo = self.lr * self.min_lr_frac
            if s >= self.decay_steps:
                return lo
            return lo + 0.5 * (1.0 + math.cos(math.pi * s / self.decay_steps)) * (self.lr - lo)
        if self.kind == "wsd":
            lo = self.lr * self.min_lr_frac
            d0 = self.wsd_stable_steps()
            if s <= d0:
                return self.lr
            if s >= self.decay_steps:
                return lo
            return self.lr + (lo - self.lr) * (s - d0) / (self.decay_steps - d0)
        return self.lr

    def wsd_stable_steps(self) -> float:
        """Steps after warm-up that a "wsd" schedule holds its peak rate before decaying."""
        return self.decay_steps * (1.0 - WSD_DECAY_FRAC)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "lr": self.lr, "warmup": self.warmup, "decay_every": self.decay_every,
            "decay_factor": self.decay_factor, "decay_steps": self.decay_steps, "min_lr_frac": self.min_lr_frac,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        unknown = set(d) - set(cls().to_dict())
        if unknown:
            raise ValueError(f"unknown schedule fields {sorted(unknown)}")
        return cls(**d)

    def __eq__(self, other):
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"Schedule({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


def _check_int(name, x, lo):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {x!r}")
    return int(x)
