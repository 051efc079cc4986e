"""Data-parallel training over MPI (the optional extra `charrnn[mpi]`: mpi4py and the mpich wheel).

N worker processes train one model. Worker r owns streams [r*B/N, (r+1)*B/N) of the single
process's B-stream layout; every step each runs forward/backward on its streams, an in-place
Allreduce sums the flat gradient (and another the loss), and every worker then clips and steps the
optimizer on the same numbers, so the parameters stay identical everywhere (checked: a checksum
every CHECK_EVERY steps). What only one process may do (validation, the run directory, fitting the
budget) rank 0 does and broadcasts; before every step the workers agree on stopping (a signal, the
time budget), so all stop at the same step. The contract is team.Team's. A worker that dies is
named in one line: by the launcher from mpiexec's report, by a surviving worker from a failed MPI
call, or by a worker's watchdog over the processes of its machine.

- common.py: is this process a worker (`world_size`), the mpiexec to use, the line on a dead worker.
- launcher.py: `charrnn train --workers N` re-runs itself under the virtualenv's own mpiexec.
- workers.py: `Workers`, one rank's place in the team (team.Team over MPI), and its faults.
- replicate.py: rank 0's run replicated to the other workers, from its run record.
- rank.py: the `charrnn train` of one rank, and the exit policy of the ranks.

Nothing here is imported, and mpi4py is never imported, unless workers are used: the CLI asks
`world_size()`, which reads mpiexec's environment variables only.
"""

from __future__ import annotations

from charrnn.parallel.common import (INSTALL_HINT, LAUNCH_DIR_VARIABLE, SIZE_VARIABLES, have_mpi4py, mpiexec_path,
                                     world_rank, world_size)
from charrnn.parallel.launcher import SPOOL_VARIABLE, STOP_GRACE_S, launch
from charrnn.parallel.rank import run, train
from charrnn.parallel.replicate import TOKEN_DIR_VARIABLE, build
from charrnn.parallel.workers import CHECK_EVERY, LocalError, Quiet, Workers, threads_per_worker

__all__ = ["INSTALL_HINT", "LAUNCH_DIR_VARIABLE", "SIZE_VARIABLES", "have_mpi4py", "mpiexec_path", "world_rank",
           "world_size", "SPOOL_VARIABLE", "STOP_GRACE_S", "launch", "run", "train", "TOKEN_DIR_VARIABLE", "build",
           "CHECK_EVERY", "LocalError", "Quiet", "Workers", "threads_per_worker"]
