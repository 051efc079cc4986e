"""One rank's place in a team of MPI workers: `Workers`, team.Team's contract over MPI (the
gradient all-reduce, the agreement on stopping, rank 0's work shared, the parameters compared),
and the faults: a failed MPI call or a dead worker of this machine (a watchdog thread) named in
one line.

Not here: the launcher (launcher.py), building a rank's trainer (replicate.py), a rank's run
(rank.py). mpi4py is imported when a Workers is made, never before.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import zlib
from contextlib import contextmanager

import numpy as np

from charrnn import __version__
from charrnn.errors import CharrnnError, TrainingError, UsageError
from charrnn.parallel.common import LAUNCH_DIR_VARIABLE, alive, ended, saved_note, worker_name
from charrnn.team import Verdict, strongest

CHECK_EVERY = 100  # steps between comparisons of the workers' parameter checksums
WATCH_EVERY_S = 0.25  # how often a worker looks at the other workers of its machine
GRACE_S = 2.0  # a worker that ended may have ended with the run: time for this one to end too


def _machine() -> str:
    """This machine's identity: processes that share it can see each other's process ids."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class Quiet(CharrnnError):
    """The error rank 0 has already reported: the other workers end with its exit status, silently."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code


class LocalError(CharrnnError):
    """A failure of this worker alone (not rank 0's, which every worker shares): it says which."""


class Workers:
    """This process's place in the team of MPI workers: team.Team's collectives over MPI (team.Solo
    is the single process's version of the same contract)."""

    def __init__(self):
        import mpi4py

        # MPI_Finalize waits for the other workers; after a failure they may be gone. It is called
        # (close) only when every worker has arrived at the end together
        mpi4py.rc.finalize = False
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        # a failed operation (a worker gone) raises MPI.Exception, which says which one (lost);
        # MPI's default would abort with a page of error stack
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        host_comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        host_comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.local_rank, self.local_size = host_comm.Get_rank(), host_comm.Get_size()
        self.host_comm = host_comm
        self.host = MPI.Get_processor_name()
        import numba

        # the same code everywhere: other versions of the kernels or their compiler could round
        # differently, and the workers' parameters would drift apart
        me = {"version": f"charrnn {__version__}, numba {numba.__version__}, numpy {np.__version__}",
              "host": self.host, "machine": _machine(), "pid": os.getpid()}
        self._rendezvous = os.environ.get(LAUNCH_DIR_VARIABLE)
        self.tell_launcher(f"rank{self.rank}", f"{os.getpid()} {self.host}")
        self.peers = self.comm.allgather(me)
        self.b0 = self.b1 = 0  # this worker's streams, set by set_batch
        self.out = None  # the run directory, for messages
        self.t_reduce = self.t_control = self.t_wait = 0.0  # seconds in the all-reduce, the agreement, waiting for rank 0
        self.n_reduce = self.n_wait = 0
        self._loss = np.zeros(1, dtype=np.float64)  # the step's loss, summed over the workers
        self._ctl = np.zeros(3, dtype=np.float64)  # SIGINT seen, SIGTERM seen, rank 0's time is up
        self._writing = threading.Lock()
        self._closing = threading.Event()
        versions = {p["version"] for p in self.peers}
        if len(versions) > 1:
            detail = ", ".join(f"rank {r} on {p['host']}: {p['version']}" for r, p in enumerate(self.peers))
            raise CharrnnError(f"the workers run different versions ({detail}); install the same charrnn, numba and "
                               "numpy on every host")
        self._watchdog = threading.Thread(target=self._watch, name="charrnn-watchdog", daemon=True)
        self._watchdog.start()

    def tell_launcher(self, name: str, text: str):
        """Leave a note for `launch` (which process is which rank, where the run is), if it started us."""
        if self._rendezvous:
            try:
                with open(os.path.join(self._rendezvous, name), "w", encoding="utf-8") as f:
                    f.write(text)
            except OSError:
                pass

    def set_out(self, out: str):
        self.out = out
        if self.root:
            self.tell_launcher("out", os.path.abspath(out))

    # ------------------------------------------------------------------ streams
    @property
    def root(self) -> bool:
        return self.rank == 0

    def set_batch(self, B: int):
        """Own streams [r*B/N, (r+1)*B/N) of the B streams: a usage error unless N divides B."""
        if B % self.size:
            raise UsageError(f"--batch {B} must be a multiple of the {self.size} workers (every worker takes the same "
                             "number of streams)")
        per = B // self.size
        self.b0, self.b1 = self.rank * per, (self.rank + 1) * per

    # ------------------------------------------------------------------ every step
    def reduce(self, grad: np.ndarray, loss: float) -> float:
        """train_step's reduction: sum the flat gradient over the workers in place (one Allreduce)
        and scale it by 1/N, and the same for the loss. Each worker's kernel returns the gradient of
        the mean loss over its T*B/N positions; the mean over all T*B is the mean of the N
        equal-sized means, so the sum over workers divided by N is exactly the single process's
        gradient (and loss). Nothing is decided here: every worker clips and steps on the same
        numbers, and whether the step was finite follows from them alike everywhere."""
        t0 = time.perf_counter()
        self.comm.Allreduce(self.MPI.IN_PLACE, grad, op=self.MPI.SUM)
        grad *= grad.dtype.type(1.0 / self.size)
        self._loss[0] = loss
        self.comm.Allreduce(self.MPI.IN_PLACE, self._loss, op=self.MPI.SUM)
        self.t_reduce += time.perf_counter() - t0
        self.n_reduce += 1
        return float(self._loss[0] / self.size)

    def agree(self, signum, time_up: bool) -> Verdict:
        """The verdict on stopping (one Allreduce of 3 numbers): SIGTERM if any worker received it,
        else SIGINT if any did; the time budget as rank 0's clock says (the others' `time_up` is
        not asked: clocks differ, and a budget must end every worker at the same step)."""
        t0 = time.perf_counter()
        ctl = self._ctl
        ctl[0] = 1.0 if signum == signal.SIGINT else 0.0
        ctl[1] = 1.0 if signum == signal.SIGTERM else 0.0
        ctl[2] = 1.0 if (self.root and time_up) else 0.0
        self.comm.Allreduce(self.MPI.IN_PLACE, ctl, op=self.MPI.SUM)
        self.t_control += time.perf_counter() - t0
        seen = [s for s, flag in ((signal.SIGINT, ctl[0]), (signal.SIGTERM, ctl[1])) if flag > 0]
        return Verdict(strongest(seen), bool(ctl[2] > 0))

    def check_same(self, step: int, theta: np.ndarray, force: bool = False):
        """Fail loudly, on every worker, if the parameters are not bit for bit the same everywhere:
        every CHECK_EVERY steps (a CRC of the parameters costs about a millisecond per 4 MB), and
        whenever `force` (before each validation, so no diverged model is saved)."""
        if not force and step % CHECK_EVERY:
            return
        crc = zlib.crc32(theta.view(np.uint8))
        crcs = self.comm.allgather(crc)
        bad = [r for r, c in enumerate(crcs) if c != crcs[0]]
        if bad:
            where = f" (the checkpoints in {self.out} were saved before it)" if self.out else ""
            raise TrainingError(f"the workers' parameters diverged by step {step} (rank {bad[0]} differs from rank 0); "
                                f"stopped{where}")

    # ------------------------------------------------------------------ rank 0's work
    def on_root(self, fn):
        """Run fn() on rank 0 while the others wait (without spinning: they would steal its cores),
        and return its result on every worker. If it fails, rank 0 raises its error and the others
        raise Quiet (rank 0 reports it); a Cancelled (an interrupted validation) is raised on all."""
        from charrnn.evaluate import Cancelled

        if self.root:
            try:
                result = ("ok", fn())
            except Cancelled:  # an interrupt cut it short: every worker stops (the loop then agrees on the signal)
                self._finish_root(("cancelled", None))
                raise
            except CharrnnError as e:
                self._finish_root(("error", e.exit_code))
                raise
            except BaseException:
                self._finish_root(("error", 1))
                raise
            self._finish_root(result)
            return result[1]
        t0 = time.perf_counter()
        req = self.comm.Ibarrier()
        while not req.Test():
            time.sleep(0.002)
        kind, value = self.comm.bcast(None, root=0)
        self.t_wait += time.perf_counter() - t0
        self.n_wait += 1
        if kind == "cancelled":
            raise Cancelled()
        if kind == "error":
            raise Quiet(value)
        return value

    def _finish_root(self, result):
        self.comm.Ibarrier().Wait()
        self.comm.bcast(result, root=0)

    def allgather(self, obj) -> list:
        """Every worker's `obj`, on every worker, in rank order."""
        return self.comm.allgather(obj)

    def share(self, obj):
        """Rank 0's `obj` on every worker."""
        return self.comm.bcast(obj, root=0)

    def share_array(self, a: np.ndarray):
        """Rank 0's values of `a` into every worker's `a`, in place."""
        self.comm.Bcast(a, root=0)

    def gather_state(self, h: np.ndarray, c: np.ndarray):
        """The carried state of all B streams (L, B, H) on rank 0, from every worker's (L, B/N, H);
        None on the others."""
        out = []
        for a in (h, c):
            buf = np.empty((self.size,) + a.shape, a.dtype) if self.root else None
            self.comm.Gather(np.ascontiguousarray(a), buf, root=0)
            out.append(np.ascontiguousarray(np.concatenate(list(buf), axis=1)) if self.root else None)
        return out[0], out[1]

    def scatter_state(self, h_all, c_all, h: np.ndarray, c: np.ndarray):
        """The inverse of gather_state: rank 0's (L, B, H) state, each worker's streams into its h, c."""
        for whole, mine in ((h_all, h), (c_all, c)):
            buf = None
            if self.root:
                per = mine.shape[1]
                buf = np.ascontiguousarray(np.stack([whole[:, r * per : (r + 1) * per] for r in range(self.size)]))
            self.comm.Scatter(buf, mine, root=0)

    @contextmanager
    def validating(self):
        """Around rank 0's validation: the other workers of its machine sleep meanwhile, so it
        scores with every core of the machine (the score does not depend on the thread count),
        then goes back to its share."""
        from charrnn import threads

        n = threads.get_threads()
        threads.set_threads(None)
        try:
            yield
        finally:
            threads.set_threads(n)

    @contextmanager
    def writing(self):
        """Around a checkpoint write: a worker found dead meanwhile is reported once it is done."""
        with self._writing:
            yield

    # ------------------------------------------------------------------ faults and the end
    def lost(self, error) -> CharrnnError:
        """The error to end with when an MPI operation failed: a worker is gone. The lowest
        surviving rank of this machine names it (once); the others end quietly."""
        me = self.peers[self.rank]["machine"]
        mates = [(r, p["pid"]) for r, p in enumerate(self.peers) if p["machine"] == me and r != self.rank]
        dead = [r for r, pid in mates if not alive(pid)]
        if self.rank != min([r for r, pid in mates if alive(pid)] + [self.rank]):
            return Quiet(1)
        if dead:
            return LocalError(self._ended(dead[0]))
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return LocalError(f"lost contact with another worker (MPI: {first}); all workers stopped{saved_note(self.out)}")

    def _ended(self, rank: int) -> str:
        p = self.peers[rank]
        return ended(worker_name(rank, p["pid"], p["host"]), self.out)

    def _watch(self):
        """Look at the other workers on this machine every WATCH_EVERY_S; if one has died (killed,
        crashed), the lowest surviving rank says which, and every worker here ends: the others
        would wait for it forever. Workers on other machines are mpiexec's to clean up."""
        me = self.peers[self.rank]["machine"]
        mates = [(r, p["pid"]) for r, p in enumerate(self.peers) if p["machine"] == me and r != self.rank]
        if not mates:
            return
        while not self._closing.wait(WATCH_EVERY_S):
            dead = [r for r, pid in mates if not alive(pid)]
            if not dead:
                continue
            if self._closing.wait(GRACE_S):  # it ended with the run, as this one is about to
                return
            self._writing.acquire(timeout=60)  # let a checkpoint write finish: it stays whole
            living = [r for r, pid in mates if alive(pid)] + [self.rank]
            if self.rank == min(living):
                os.write(2, f"charrnn: error: {self._ended(dead[0])}\n".encode("utf-8", "replace"))
                time.sleep(0.5)  # mpiexec forwards what is in the pipe only while the process lives
            os._exit(1)

    def close(self, ok: bool):
        """End this worker's part: after a run that ended the same way everywhere (`ok`), wait for
        all (so none is taken for dead) and finalize MPI; after a failure, just stop watching."""
        if ok:
            req = self.comm.Ibarrier()
            while not req.Test():
                time.sleep(0.002)
            self._closing.set()
            self.MPI.Finalize()
        else:
            self._closing.set()

    def report(self) -> str | None:
        """Rank 0's line on the cost of working together: the all-reduce and the agreement per
        step, and how long the others waited for rank 0 (validation, checkpoints, fits). Collective."""
        stats = self.comm.gather((self.t_reduce, self.t_control, self.n_reduce, self.t_wait, self.n_wait), root=0)
        if not self.root:
            return None
        n = max(stats[0][2], 1)
        waits = [s[3] for s in stats[1:]]
        return (f"{self.size} workers: all-reduce {1000 * self.t_reduce / n:.2f} ms/step, agreement "
                f"{1000 * self.t_control / n:.3f} ms/step (rank 0); the others waited {max(waits):.2f} s in all for "
                f"rank 0's validations and checkpoints ({stats[1][4]} times)")


# ---------------------------------------------------------------------------------- threads
def threads_per_worker(workers_here: int) -> int:
    """--threads left open under N workers on a machine: its cores divided among them."""
    from charrnn.threads import available_cores

    return max(1, available_cores() // max(1, workers_here))
