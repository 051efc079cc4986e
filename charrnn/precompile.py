"""Compiling early: the kernels a run will need compile (or load from the disk cache) in a background
thread while the corpus is read and encoded, so that no training step or validation waits for the
compiler and a first run costs the compile time once, overlapped with its reading.

Not here: the kernels and their cache (kernels/), when a run starts (setup.py).
"""

from __future__ import annotations

import threading

import numpy as np

from charrnn.config import TrainConfig
from charrnn.model import Model, ModelConfig
from charrnn.optim import make_optimizer
from charrnn import signals
from charrnn.errors import Interrupted
from charrnn.rundir import holds_run
from charrnn.step import train_step

THREAD_NAME = "charrnn-precompile"  # the background thread's name
_started: list[threading.Thread] = []


def compiling() -> bool:
    """Whether a background compile of this process is still at work (the CLI then exits at once
    instead of shutting the interpreter down under it: cli/app.py)."""
    return any(t.is_alive() for t in _started)


class Precompile:
    """Compile (or load from the cache) the kernels a run of `cell` will need, in a background
    thread, while the corpus is read and encoded: the forward/backward and the dropout masks, the
    optimizer's updates, and the scorer of validation (the kernels' types do not depend on the
    sizes, so a tiny model stands in).
    A daemon thread: a run that stops early (a bad corpus) does not wait for it, and the cache
    writes are atomic. wait() before training, so that nothing compiles during timed steps."""

    def __init__(self, cfg: TrainConfig, cell: str, precisions=("fp32",)):
        self._args = (cfg, cell, tuple(precisions))
        self.compiled = False  # whether anything had to compile (not only load from the cache)
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        _started[:] = [t for t in _started if t.is_alive()]  # only the ones still at work are of interest
        _started.append(self._thread)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether it is still at work after having had to compile something."""
        return self.compiled and self._thread.is_alive()

    def _run(self):
        from charrnn.kernels.jit import compile_notice

        with compile_notice(lambda: setattr(self, "compiled", True)):
            self._compile()

    def _compile(self):
        cfg, cell, precisions = self._args
        try:
            model = Model(ModelConfig(cell=cell, layers=2, hidden=8, vocab_size=4, nonlinearity=cfg.nonlinearity))
            for p in precisions:  # only what the run will use: each is a kernel of its own
                # None: chosen later, and likely above 0
                model.warm_up(dropout=cfg.dropout != 0, weight_drop=cfg.weight_drop is None or cfg.weight_drop > 0,
                              precision=p)
            model.precision = precisions[-1]
            opt = make_optimizer(cfg.optimizer, model.n_params, model.dtype, 1e-3)
            x = np.zeros((2, 2), np.int32)
            train_step(model, opt, x, x, *model.zero_state(2), None, 1e-3, cfg.clip, cfg.clip_mode,
                       avg=np.zeros(model.n_params, model.dtype), rate=1.0)
            # validation's scorer (a model above Model.PIPE_MAX_H units compiles more in warm_up)
            h, c = model.zero_state(1)
            model.score(np.zeros(2, np.int32), np.zeros(2, np.int32), h, c)
        except Exception:  # noqa: BLE001 - the run itself will compile, and report any error, in its own time
            pass

    def wait(self):
        """Until it is done; in short slices, so that signal handlers run meanwhile."""
        while self._thread.is_alive():
            self._thread.join(0.1)


def warm_up(model: Model, precompile: Precompile | None, cfg: TrainConfig, fitted, rep, out: str, then=None):
    """Compile (or load) the kernels of the run's training steps and of its validation before its
    clock starts: not counted against --minutes; an interrupt here has nothing to save
    (Interrupted, with what is left of the run in `out`). The background compile first: this
    thread waits for it in short slices, so an interrupt is seen at once (a compile in this thread
    would hold it for many seconds). `then()`: more work before training (measuring the
    precision), under the same rule."""
    from charrnn.kernels.jit import compile_notice

    said = []

    def notice():
        if not said:
            said.append(True)
            rep.message("charrnn: compiling for this machine (first run only; about 20 s) ...")

    with compile_notice(notice):
        if precompile is not None and precompile.busy:
            notice()
        try:
            if precompile is not None:
                precompile.wait()
            model.warm_up(dropout=cfg.dropout > 0 or fitted.dropout_pending,
                          weight_drop=cfg.weight_drop > 0 or (fitted.dropout_pending and fitted.weight_drop_open),
                          precision=fitted.precision)
            # validation's scorer, the one this model's size takes (a bf16 run's validation above
            # Model.PIPE_MAX_H units is float32's batch kernel), so that no validation compiles
            h, c = model.zero_state(1)
            model.score(np.zeros(2, np.int32), np.zeros(2, np.int32), h, c)
            if then is not None:
                then()
        except (KeyboardInterrupt, signals.SignalExit) as e:
            rep.close()
            signum = getattr(e, "signum", 2)
            saved = f"; the run in {out} is as it was" if holds_run(out) else "; nothing to save"
            raise Interrupted(f"stopped by {signals.name_of(signum)} before training started{saved}",
                              signals.EXIT_CODES.get(signum, 130)) from None
