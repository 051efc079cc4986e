"""What a run keeps, and its validations: the last good weights to go back to after a non-finite
step, the average of the weights (--average), the held-out score, and the run's files (last.npz,
best.npz and metrics.jsonl, docs/formats.md).

Not here: when to validate or save (the loop, train.py), the meta record (run.py), the file
format (checkpoint.py).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager

import numpy as np

from charrnn import checkpoint
from charrnn.errors import CharrnnError
from charrnn.evaluate import Cancelled, score_tokens
from charrnn.model import Model
from charrnn.rundir import append_line, new_identity


class Keeper:
    """The validations and saves of one run. `team`: rank 0 validates and writes, the other
    workers wait for its verdict (team.py)."""

    def __init__(self, record, model: Model, opt, averager, team, out: str, val_tokens, stream_len: int,
                 batches_per_epoch: int):
        self.record = record
        self.model = model
        self.opt = opt
        self.averager = averager
        self.team = team
        self.out = out
        self.val_tokens = val_tokens  # None when nothing is held out
        self.stream_len = stream_len
        self.batches_per_epoch = batches_per_epoch
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.saved_step = None  # the step last.npz was last written at, by this process
        self.evaluated_step = None  # the step last validated, by this process
        self._good = None

    # ------------------------------------------------------------------ the last good weights
    def snapshot(self):
        """Remember the current parameters, optimizer state and average as the last good ones."""
        self._good = (self.model.theta.copy(), {k: v.copy() for k, v in self.opt.state_buffers().items()}, self.opt.t,
                      None if self.averager is None else self.averager.avg.copy())

    def restore(self):
        theta, bufs, t, avg = self._good
        self.model.theta[...] = theta
        self.opt.load_state({k: v.copy() for k, v in bufs.items()}, t)
        if avg is not None:
            self.averager.avg[...] = avg

    def restore_if_broken(self):
        """Back to the last good weights if the parameters hold a non-finite value."""
        if not np.all(np.isfinite(self.model.theta)):
            self.restore()

    @contextmanager
    def averaged(self):
        """The model's weights are the average's inside (validation, best.npz), the raw ones after."""
        if self.averager is None:
            yield
            return
        theta = self.model.theta
        raw = theta.copy()
        theta[...] = self.averager.avg
        try:
            yield
        finally:
            theta[...] = raw

    # ------------------------------------------------------------------ validation
    def validate_and_save(self, rep, h, c, stop=None) -> str | None:
        """Validate, save last.npz (and best.npz when better) and append to metrics.jsonl; the stop
        reason when patience ran out. The run state's elapsed time, loss and speed are the caller's
        to set first. Raises Cancelled, with the validation marked due in the run state, when
        `stop()` interrupts it. Collective: every worker calls it at the same step."""
        st, team = self.record.state, self.team
        self.restore_if_broken()
        self.snapshot()
        team.check_same(st.step, self.model.theta, force=True)
        h, c = team.gather_state(h, c)  # every stream's, on rank 0
        try:
            # rank 0 validates and writes; the others wait for its verdict (the exact single-stream
            # number: scoring split among workers would start chunks from a zero state)
            reason, state = team.on_root(lambda: self._validate_and_record(rep, h, c, stop))
        except Cancelled:
            st.eval_due = True
            raise
        st.__dict__.update(state)
        self.evaluated_step = self.saved_step = st.step  # on every worker: they decide alike from here
        return reason

    def held_out_loss(self, stop=None) -> float | None:
        """Mean loss over the held-out positions the run scores (the first Fitted.val_chars of the
        split, or all of it), by docs/design.md's definition, of the averaged weights with --average;
        None without a split. Cancelled as soon as `stop()` says so (it is asked between spans of
        the scorer)."""
        if self.val_tokens is None or len(self.val_tokens) < 2:
            return None
        n = self.record.fitted.val_chars
        tokens = self.val_tokens if n is None else self.val_tokens[: n + 1]
        with self.averaged():
            return score_tokens(self.model, tokens, stop=stop).nats

    def _validate_and_record(self, rep, h, c, stop) -> tuple[str | None, dict]:
        st, cfg = self.record.state, self.record.config
        with self.team.validating():
            val = self.held_out_loss(stop=stop)
        st.eval_due = False
        improved = val is not None and val < st.best_val
        if improved:
            st.best_val, st.best_step, st.bad_evals = val, st.step, 0
        elif val is not None:
            st.bad_evals += 1
        if val is None:
            st.best_step = st.step  # no validation: the latest model is the best we know
        self.save_last(h, c)
        if improved or val is None:
            self.save_best()
        self._append_metrics(val)
        if val is not None:
            rep.message(f"step {st.step}: val {val:.4f} nats/char ({val / math.log(2):.4f} bits/char)"
                        + (" *best*" if improved else ""))
        if cfg.patience is not None and st.bad_evals >= cfg.patience:
            return f"no improvement in {cfg.patience} validations", st.__dict__.copy()
        return None, st.__dict__.copy()

    def _append_metrics(self, val: float | None):
        st = self.record.state
        line = {"step": st.step, "epoch": round(st.step / self.batches_per_epoch, 4), "train_loss": st.train_loss,
                "val_loss": val, "val_bits": None if val is None else val / math.log(2),
                "chars_per_s": round(st.chars_per_s, 1), "elapsed_s": round(st.elapsed, 2)}
        try:
            with self.team.writing():
                append_line(self.metrics_path, json.dumps(line) + "\n")
        except OSError as e:
            raise CharrnnError(f"could not write {self.metrics_path}: {e.strerror or e} "
                               f"(checkpoints up to step {st.step} are saved)") from None

    # ------------------------------------------------------------------ checkpoints
    def meta(self) -> dict:
        opt = {"name": self.opt.name, "hparams": self.opt.hparams(), "t": self.opt.t}
        return self.record.to_meta(opt, self.stream_len)

    def save_last(self, h, c):
        """last.npz, with the carried state of every stream (h, c: (L, B, H))."""
        extra = {"train.h": h, "train.c": c}
        flats = {f"optim.{key}.": flat for key, flat in self.opt.state_buffers().items()}
        if self.averager is not None:
            flats["avg."] = self.averager.avg  # the raw weights stay under rnn.* / decoder.*, for resume
        for prefix, flat in flats.items():
            fp = Model(self.model.cfg, dtype=self.model.dtype, theta=flat).params
            for pname, arr in fp.items():
                extra[f"{prefix}{pname}"] = arr
        with self.team.writing():
            if self.record.run_id is None:  # a run from before identities, resumed: its identity, before the checkpoint
                self.record.run_id = new_identity(self.out)
            checkpoint.save(os.path.join(self.out, "last.npz"), self.model, self.record.vocab, self.meta(), extra,
                            dropout=self.record.fitted.dropout)
        self.saved_step = self.record.state.step

    def save_best(self):
        """best.npz: the model validation scored (the average of the weights, with --average)."""
        with self.team.writing(), self.averaged():
            checkpoint.save(os.path.join(self.out, "best.npz"), self.model, self.record.vocab, self.meta(),
                            dropout=self.record.fitted.dropout)
