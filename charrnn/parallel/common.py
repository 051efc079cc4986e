"""What the launcher and the workers share: the environment that tells a process it is one of the
workers of an MPI job, where the mpich wheel's mpiexec is, and the one line on a worker that ended
unexpectedly (said by the launcher, a surviving worker, or a worker's watchdog).

Nothing here imports mpi4py: the CLI asks `world_size()` of every `charrnn train`.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from charrnn import pip_hint

INSTALL_HINT = pip_hint("mpi4py>=4", "mpich")  # what the [mpi] extra holds
# the environment variables by which process managers tell a process the size of its MPI job
# (MPICH's hydra and Intel MPI: PMI_SIZE; Open MPI: OMPI_COMM_WORLD_SIZE; PMIx launchers: PMIX_SIZE)
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
LAUNCH_DIR_VARIABLE = "CHARRNN_LAUNCH_DIR"  # set by `launch`: where its workers leave their rank and process id


def _first_int(names, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value:
            try:
                return int(value)
            except ValueError:
                pass
    return default


def world_size() -> int:
    """The number of processes of the MPI job this process belongs to (1 when not under mpiexec),
    from the launcher's environment: nothing is imported."""
    return max(1, _first_int(SIZE_VARIABLES, 1))


def world_rank() -> int:
    """This process's rank in its MPI job (0 when not under mpiexec), from the environment."""
    return _first_int(RANK_VARIABLES, 0)


def mpiexec_path() -> str:
    """The mpiexec of the mpich wheel: beside the running interpreter (the virtualenv's bin/), not
    on PATH, so a console script run without activating its virtualenv still finds it."""
    return os.path.join(os.path.dirname(sys.executable), "mpiexec")


def have_mpi4py() -> bool:
    return importlib.util.find_spec("mpi4py") is not None


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except (OSError, IndexError):
        return True


# ---------------------------------------------------------------------------------- the one line
def worker_name(rank: int, pid, host: str) -> str:
    return f"worker {rank} (process {pid} on {host})"


def saved_note(out: str | None) -> str:
    """'; the last checkpoint, RUN/last.npz, is intact' when the run has one."""
    if not out:
        return ""
    last = os.path.join(out, "last.npz")
    return f"; the last checkpoint, {last}, is intact" if os.path.exists(last) else ""


def ended(who: str, out: str | None, how: str = "") -> str:
    """The line on a worker (or the process manager) that ended unexpectedly: `who`, `how` (e.g.
    ' (Killed, signal 9)'), and the last checkpoint of the run in `out`, if it has one."""
    return f"{who} ended unexpectedly{how}; all workers stopped{saved_note(out)}"
