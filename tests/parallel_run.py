"""A float64 training run at library level, in memory, for the equivalence test of
tests/test_parallel.py: imported there for the single process, and run under `mpiexec -n N python
tests/parallel_run.py CORPUS OUT DEST [regularised]` for the workers, each of which saves its final
parameters to DEST.<rank>.npy (checkpoints are float32; these are the float64 parameters themselves),
followed by its averaged weights when there are some."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from charrnn.config import TrainConfig
from charrnn.setup import new_run
from charrnn.train import Trainer

# dropout and the --seq-warmup curriculum on (T grows from 8 to 12 over the first 10 steps)
CONFIG = dict(cell="lstm", layers=2, hidden=16, dropout=0.3, batch=8, seq=12, seq_warmup=10, steps=14,
              eval_every=1000, threads=1, seed=7, lr=1e-2, warmup=0, average="off")
# and with weight drop, locked dropout and an exponential average of the weights
REGULARISED = dict(CONFIG, weight_drop=0.25, dropout_mode="locked", average="ema", avg_decay=0.8)


def make(corpus: str, out: str, regularised: bool = False):
    """The run set up in float64 (its model, optimizer and carried state)."""
    cfg = TrainConfig(**(REGULARISED if regularised else CONFIG))
    return new_run([corpus], cfg, out, quiet=True, dtype=np.float64)


def weights(tr: Trainer) -> np.ndarray:
    """The parameters, then the averaged weights if any."""
    return tr.model.theta.copy() if tr.averager is None else np.concatenate([tr.model.theta, tr.averager.avg])


def main(corpus: str, out: str, dest: str, regularised: str = ""):
    from charrnn import parallel

    workers = parallel.Workers()
    tr = parallel.build(workers, lambda quiet: make(corpus, out, regularised == "regularised"), True)
    tr.run()
    np.save(f"{dest}.{workers.rank}.npy", weights(tr))
    workers.close(True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
