"""One rank's `charrnn train` under mpiexec (started by the launcher, or by hand across machines:
`mpiexec -n N -hosts a,b charrnn train FILE ...`), and the exit policy of the ranks: rank 0
reports what every worker raised alike, and its status is the run's; the others end quietly, and
report only what is theirs alone.

Not here: the launcher (launcher.py), the collectives (workers.py), building the trainers
(replicate.py).
"""

from __future__ import annotations

import os
import sys
import time

from charrnn.errors import CharrnnError
from charrnn.parallel.common import world_rank
from charrnn.parallel.replicate import build
from charrnn.parallel.workers import LocalError, Quiet, Workers


def run(make, quiet: bool) -> dict | None:
    """train(), with the exit policy of the ranks: a worker other than rank 0 ends with status 0
    on an error every worker raised alike (mpiexec ends a job whose process fails, and rank 0 may
    still be saying why) and on an interrupt before training (every worker got the signal; rank 0
    says so); the status rank 0 already reported (Quiet) is every worker's. Returns rank 0's
    result, None on the others."""
    from charrnn.signals import SignalExit

    try:
        return train(make, quiet)
    except CharrnnError as e:
        if world_rank() != 0 and not isinstance(e, LocalError):
            sys.exit(0)
        if isinstance(e, Quiet):
            sys.exit(e.exit_code)
        raise
    except (KeyboardInterrupt, SignalExit):
        if world_rank() != 0:
            sys.exit(0)
        raise


def train(make, quiet: bool) -> dict | None:
    """`charrnn train` as one of the ranks of an MPI job. `make(quiet)` sets the run up (new or
    resumed: a setup.Prepared) on rank 0, which alone owns the run directory; the other workers
    are built from what rank 0 sends (the run record, parameters, optimizer moments and carried
    state), on rank 0's token file where their host sees it, else on one their host encodes from
    its own copy of the corpus, checked against rank 0's hash (replicate.host_tokens). Returns rank 0's
    result (None on the others)."""
    workers = Workers()
    ok = False
    if workers.root and not quiet:  # to read mpiexec's banner by, should one of them die
        sys.stderr.write(f"charrnn: {workers.size} workers: "
                         + ", ".join(f"{r} {p['host']}:{p['pid']}" for r, p in enumerate(workers.peers)) + "\n")
    try:
        trainer = build(workers, make, quiet)
        try:
            result = trainer.run()
        except CharrnnError as e:
            ok = not isinstance(e, LocalError)  # raised alike on every worker (interrupts, a diverged loss)
            raise
        ok = True
        return result if workers.root else None
    except workers.MPI.Exception as e:
        # a worker is gone: say which (once), and end now, past every exit handler (MPI's own
        # would abort with its error stack, or wait for the dead)
        error = workers.lost(e)
        if not isinstance(error, Quiet):
            try:  # a stderr that fails loses the line, never the exit
                os.write(2, f"charrnn: error: {error}\n".encode("utf-8", "replace"))
            except OSError:
                pass
            time.sleep(0.5)  # mpiexec forwards what is in the pipe only while the process lives
        os._exit(1)
    finally:
        workers.close(ok)
