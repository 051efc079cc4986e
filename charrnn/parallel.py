"""Data-parallel training over MPI (the optional extra `charrnn[mpi]`: mpi4py and the mpich wheel).

N worker processes train one model. Worker r owns streams [r*B/N, (r+1)*B/N) of the single
process's B-stream layout; every step each runs forward/backward on its streams, one in-place
Allreduce sums the flat gradient (a second one of 4 numbers carries the loss and the flags that
end a run), and every worker then clips and steps the optimizer on the same numbers, so the
parameters stay identical everywhere (checked: a checksum every CHECK_EVERY steps). What only one
process may do (validation, the run directory, fitting the budget) rank 0 does and broadcasts;
the decisions that end a run are agreed at every step, so all stop at the same step. A worker that
dies is named in one line: by the launcher from mpiexec's report, by a surviving worker from a
failed MPI call, or by a worker's watchdog over the processes of its machine.

- `launch`: `charrnn train --workers N` re-runs itself under the virtualenv's own mpiexec.
- `Workers`: one rank's view of the team, plugged into train.Trainer (the same interface as
  train.Solo, the single process).
- `train`: the `charrnn train` of one rank under mpiexec (started by `launch`, or by hand across
  machines: `mpiexec -n N -hosts a,b charrnn train FILE ...`).

Nothing here is imported, and mpi4py is never imported, unless workers are used: the CLI asks
`world_size()`, which reads mpiexec's environment variables only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager

import numpy as np

from charrnn import __version__, pip_hint
from charrnn.errors import CharrnnError, TrainingError, UsageError

INSTALL_HINT = pip_hint("mpi4py>=4", "mpich")  # what the [mpi] extra holds
# the environment variables by which process managers tell a process the size of its MPI job
# (MPICH's hydra and Intel MPI: PMI_SIZE; Open MPI: OMPI_COMM_WORLD_SIZE; PMIx launchers: PMIX_SIZE)
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
CHECK_EVERY = 100  # steps between comparisons of the workers' parameter checksums
WATCH_EVERY_S = 0.25  # how often a worker looks at the other workers of its machine
GRACE_S = 2.0  # a worker that ended may have ended with the run: time for this one to end too
LAUNCH_DIR_VARIABLE = "CHARRNN_LAUNCH_DIR"  # set by `launch`: where its workers leave their rank and process id
# lines of mpiexec's own (not the workers') that the launcher keeps off the terminal: its notes on
# forwarding Ctrl-C, and the banner about a worker that ended badly, which it reports in one line
_HYDRA_NOISE = (b"[mpiexec@", b"====", b"=   ", b"YOUR APPLICATION TERMINATED", b"This typically refers",
                b"Please see the FAQ", b"Abort(")
_MPI_STACK = re.compile(rb"^[A-Za-z_]+\(\d+\)\.*: ")  # the lines of MPI's error stack under an Abort(...) line


# ---------------------------------------------------------------------------------- detection
def world_size() -> int:
    """The number of processes of the MPI job this process belongs to (1 when not under mpiexec),
    from the launcher's environment: nothing is imported."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name)
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                pass
    return 1


def world_rank() -> int:
    """This process's rank in its MPI job (0 when not under mpiexec), from the environment."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        value = os.environ.get(name)
        if value:
            try:
                return int(value)
            except ValueError:
                pass
    return 0


def mpiexec_path() -> str:
    """The mpiexec of the mpich wheel: beside the running interpreter (the virtualenv's bin/), not
    on PATH, so a console script run without activating its virtualenv still finds it."""
    return os.path.join(os.path.dirname(sys.executable), "mpiexec")


def _have_mpi4py() -> bool:
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


# ---------------------------------------------------------------------------------- the launcher
# after a forwarded SIGINT / SIGTERM, the workers have this long to save and end before the
# launcher ends them (a checkpoint of 2**28 parameters and its optimizer state writes in seconds)
STOP_GRACE_S = 120.0
SPOOL_VARIABLE = "CHARRNN_SPOOLED_INPUT"  # set by `launch`: {corpus path: its copy} for stdin, pipes and FIFOs
SPOOL_CHUNK = 1 << 20


def _spool_streams(corpus, max_input: int | None, directory: str) -> dict:
    """Copy each corpus input that can be read only once (stdin, a pipe, a FIFO, `<(command)`, a
    device) into a file in `directory`, once, within --max-input, and return {path: copy}. The
    workers read the copies under the names given (mpiexec forwards stdin to one worker, through a
    pipe that gave out beyond a few hundred KB, and a FIFO can be read once)."""
    import stat

    from charrnn.data import ByteLimit, input_name, open_input
    from charrnn.errors import DataError

    limit = ByteLimit(max_input)
    copies = {}
    for i, path in enumerate(corpus):
        if path in copies:
            continue
        if path == "-":
            if sys.stdin is None:
                raise DataError("<stdin>: is closed")
            src, close = sys.stdin.buffer, False
        else:
            try:
                mode = os.stat(path).st_mode
            except OSError:
                continue  # the workers say what is wrong with it, as a single process would
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                continue
            src, close = open_input(path), True
        dest = os.path.join(directory, f"input{i}")
        name = input_name(path)
        try:
            with open(dest, "wb") as out:
                while True:
                    try:
                        data = src.read(SPOOL_CHUNK)
                    except OSError as e:
                        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None
                    if not data:
                        break
                    limit.take(len(data), name)
                    try:
                        out.write(data)
                    except OSError as e:
                        raise DataError(f"{name}: cannot keep a copy for the workers in {directory}: "
                                        f"{e.strerror or e} (set TMPDIR to a place with room, or give a file)") from None
        finally:
            if close:
                src.close()
        copies[path] = dest
    return copies


def launch(workers: int, argv: list[str], batch: int | None, corpus=(), max_input: int | None = None) -> int:
    """Run `charrnn <argv>` as `workers` MPI processes on this machine; returns the exit status.

    The workers run in a session of their own, so a Ctrl-C at the terminal reaches this process
    only, and it is forwarded once, through mpiexec (which hands SIGINT and SIGTERM on to every
    worker): each then stops at the same step, rank 0 saves last.npz, and the run exits 130 / 143.
    If this process dies, mpiexec gets SIGTERM (the same path). When a worker dies (SIGKILL, a
    crash), mpiexec ends the others at once (its automatic clean-up) and names the process; the
    workers have told this process their ranks and process ids (LAUNCH_DIR_VARIABLE), so it says
    which worker it was, in one line."""
    if batch is not None and batch % workers:
        raise UsageError(f"--batch {batch} must be a multiple of --workers {workers} (every worker takes the same "
                         "number of streams)")
    mpiexec = mpiexec_path()
    if not _have_mpi4py() or not os.access(mpiexec, os.X_OK):
        missing = "mpi4py" if not _have_mpi4py() else f"mpiexec (looked for {mpiexec})"
        raise CharrnnError(f"--workers needs MPI, and {missing} is not installed: {INSTALL_HINT}")
    import shutil
    import tempfile

    rendezvous = tempfile.mkdtemp(prefix="charrnn-workers-")
    try:
        env = dict(os.environ, **{LAUNCH_DIR_VARIABLE: rendezvous})
        copies = _spool_streams(corpus, max_input, rendezvous)
        if copies:
            env[SPOOL_VARIABLE] = json.dumps(copies)
        return _launch([mpiexec, "-n", str(workers), sys.executable, "-m", "charrnn", *argv], env, rendezvous)
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)


def _launch(cmd, env, rendezvous) -> int:
    # stdin is never the workers' (a corpus on it was spooled): mpiexec must not forward it
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_term_with_parent)
    received = []

    def forward(signum, frame):
        received.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    # mpiexec's own lines, kept off the terminal (which process ended badly, and how), and whether
    # a worker has said what went wrong itself
    seen = {"notes": [], "error": False, "first_dead": None, "manager": None}
    relays = [threading.Thread(target=_relay, args=(pipe, dest, seen), daemon=True)
              for pipe, dest in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    relays.append(threading.Thread(target=_watch_workers, args=(proc, rendezvous, seen), daemon=True))
    for t in relays:
        t.start()
    hung = False
    try:
        deadline = None
        while True:
            try:
                rc = proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and deadline is None:
                deadline = time.monotonic() + STOP_GRACE_S
            if deadline is not None and time.monotonic() > deadline and not hung:
                # the workers were told to stop and have not: one stuck in a collective its peer left
                # (a signal that reached them in different phases). End them; the last save stands.
                hung = True
                _stop_workers(rendezvous, wait_s=0, sig=signal.SIGKILL)
                proc.kill()
        for t in relays:
            t.join(5)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc != 0 or received or hung:
        _discard_unsaved(rendezvous)
    if hung:
        _say(f"the workers did not stop within {STOP_GRACE_S:.0f} s of {_signal_name(received[0])}; ended them"
             f"{_saved_note(rendezvous)}")
        return 143 if signal.SIGTERM in received else 130
    if rc < 0 and not received:  # mpiexec itself was killed: its workers may live on, orphaned
        stopped = _stop_workers(rendezvous)
        _say(f"mpiexec (process {proc.pid}) ended unexpectedly ({_signal_name(-rc)}); "
             + ("the workers were stopped" if stopped else "the workers ended with it") + _saved_note(rendezvous))
        return 1
    if rc < 0:
        rc = 128 - rc
    if seen["manager"] is not None and not received:
        _say(f"the process manager (hydra_pmi_proxy, process {seen['manager']}) ended unexpectedly; the workers were "
             f"stopped{_saved_note(rendezvous)}")
        return 1
    if received:
        return rc if rc in (130, 143) else (143 if signal.SIGTERM in received else 130)
    if rc in (0, 2) or (rc in (1, 130, 143) and (seen["error"] or not seen["notes"])):
        return rc  # the workers ended as they meant to, and said why
    if not seen["error"]:  # a worker ended badly, and mpiexec ended the others before they could say so
        _say(_who_died(seen["notes"], rendezvous, seen["first_dead"]))
    return 1


def _discard_unsaved(rendezvous: str):
    """Remove the run directory rank 0 created if the job ended before anything was saved in it
    (rank 0, ended by mpiexec, could not): taken under its lock, as a run gives it back."""
    from charrnn.rundir import Busy, RunDir, holds_run

    try:
        with open(os.path.join(rendezvous, "created"), encoding="utf-8") as f:
            path = f.read().strip()
    except OSError:
        return
    if not path or not os.path.isdir(path) or holds_run(path):
        return
    try:
        rd = RunDir.lock(path)
    except (Busy, CharrnnError):
        return  # a live process holds it: not ours to remove
    rd.created = True
    rd.discard_if_unused()


def _watch_workers(proc, rendezvous: str, seen: dict):
    """Note which worker ended first while others still ran (mpiexec names it too, most times);
    and a process manager (mpiexec's child, hydra_pmi_proxy) that ended while every worker still
    ran: then the workers would train on to the end of their budget with nobody to report to, so
    they are told to stop (SIGTERM: they save and end together) and seen["manager"] names it."""
    managers = set()
    while proc.poll() is None:
        managers |= _children(proc.pid)
        # the managers first: a worker ends before its manager, so workers all running after a
        # manager was seen gone means the manager went first (not a run that ended as it should)
        gone = [m for m in managers if not _running(m)]
        pids = _rank_pids(rendezvous)
        dead = [r for pid, (r, _) in pids.items() if not _running(pid)]
        if dead and len(dead) < len(pids) and seen["first_dead"] is None:
            seen["first_dead"] = min(dead)
        if (gone and seen["manager"] is None and seen["first_dead"] is None and pids and not dead
                and proc.poll() is None):
            seen["manager"] = min(gone)
            _stop_workers(rendezvous, wait_s=0)
        time.sleep(0.02)


def _children(pid: int) -> set:
    """The process ids of `pid`'s children (Linux /proc; empty elsewhere)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return {int(x) for x in f.read().split()}
    except (OSError, ValueError):
        return set()


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed child its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return _alive(pid) if not os.path.isdir("/proc") else False


def _stop_workers(rendezvous: str, wait_s: float = 60.0, sig=signal.SIGTERM) -> bool:
    """SIGTERM (or `sig`) to every worker still running (they agree on a step, rank 0 saves
    last.npz, and they end), then wait up to `wait_s` for them to end; whether any was running."""
    pids = [pid for pid in _rank_pids(rendezvous) if _running(pid)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + wait_s
    while wait_s and any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(pids)


def _signal_name(signum: int) -> str:
    try:
        return f"{signal.Signals(signum).name}, signal {signum}"
    except ValueError:
        return f"signal {signum}"


def _say(text: str):
    """The launcher's one error line (a failing stderr loses it; the exit status still says it)."""
    try:
        sys.stderr.write(f"charrnn: error: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _saved_note(rendezvous: str) -> str:
    """'; the last checkpoint, RUN/last.npz, is intact' when the run has one."""
    try:
        with open(os.path.join(rendezvous, "out"), encoding="utf-8") as f:
            last = os.path.join(f.read().strip(), "last.npz")
    except OSError:
        return ""
    return f"; the last checkpoint, {last}, is intact" if os.path.exists(last) else ""


def _rank_pids(rendezvous: str) -> dict:
    """{pid: (rank, host)} from the notes the workers left."""
    ranks = {}
    for name in os.listdir(rendezvous):
        if name.startswith("rank"):
            try:
                with open(os.path.join(rendezvous, name), encoding="utf-8") as f:
                    pid, host = f.read().split()[:2]
                ranks[int(pid)] = (int(name[4:]), host)
            except (OSError, ValueError):
                pass
    return ranks


def _who_died(notes: list[str], rendezvous: str, first_dead: int | None = None) -> str:
    """The one line on a worker that ended badly, from mpiexec's notes and the workers' own."""
    ranks = _rank_pids(rendezvous)
    text = "\n".join(notes)
    pid = re.search(r"PID (\d+) RUNNING AT (\S+)", text)
    how = re.search(r"EXIT STRING: (.+)", text)
    code = re.search(r"EXIT CODE: (\d+)", text)
    how = (f" ({how.group(1).strip().replace(' (', ', ').rstrip(')')})" if how  # "Killed (signal 9)" -> (Killed, signal 9)
           else f" (exit status {code.group(1)})" if code else "")
    who = "a worker"
    if first_dead is not None:
        pid_of = {r: (p, host) for p, (r, host) in ranks.items()}
        if first_dead in pid_of:
            who = f"worker {first_dead} (process {pid_of[first_dead][0]} on {pid_of[first_dead][1]})"
    if pid:
        rank, host = ranks.get(int(pid.group(1)), (None, pid.group(2)))
        who = f"worker {rank} (process {pid.group(1)} on {host})" if rank is not None else f"process {pid.group(1)}"
    return f"{who} ended unexpectedly{how}; all workers stopped{_saved_note(rendezvous)}"


def _term_with_parent():
    """In mpiexec's process, before it starts: SIGTERM when the launcher dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - elsewhere the workers simply outlive a killed launcher
        pass


def _relay(pipe, dest, seen: dict):
    """Copy the workers' output (through mpiexec) to ours as it comes; mpiexec's own lines (its
    notes on forwarding Ctrl-C, its banner about a process that ended badly) go to seen["notes"]."""
    out = dest.buffer if hasattr(dest, "buffer") else None
    broken = False
    for line in iter(pipe.readline, b""):
        if (line.startswith(_HYDRA_NOISE) or _MPI_STACK.match(line)
                or (dest is sys.stdout and not line.strip())):  # training writes no stdout
            seen["notes"].append(line.decode("utf-8", "replace").rstrip())
            continue
        if line.startswith(b"charrnn: error"):
            seen["error"] = True
        if broken:
            continue  # drained all the same, so the workers never block on a full pipe
        try:
            if out is not None:
                out.write(line)
                out.flush()
            else:
                dest.write(line.decode("utf-8", "replace"))
        except (OSError, ValueError):  # our own stdout or stderr failed: the run goes on (docs/robustness.md)
            broken = True
    pipe.close()


# ---------------------------------------------------------------------------------- one rank
def _machine() -> str:
    """This machine's identity: processes that share it can see each other's process ids."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _alive(pid: int) -> bool:
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


class Quiet(CharrnnError):
    """The error rank 0 has already reported: the other workers end with its exit status, silently."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code


class Workers:
    """This process's place in the team of MPI workers, and the collective operations the training
    loop needs (train.Solo is the single process's version of the same interface)."""

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
        self._tell_launcher(f"rank{self.rank}", f"{os.getpid()} {self.host}")
        self.peers = self.comm.allgather(me)
        self.b0 = self.b1 = 0  # this worker's streams, set by set_batch
        self.out = None  # the run directory, for messages
        self.t_reduce = self.t_control = self.t_wait = 0.0  # seconds in the all-reduce, the agreement, waiting for rank 0
        self.n_reduce = self.n_wait = 0
        self._ctl = np.zeros(4, dtype=np.float64)  # loss, SIGINT seen, SIGTERM seen, rank 0's time is up
        self._poll = lambda: (None, False)
        self.agreed_signal = None
        self.agreed_time_up = False
        self._writing = threading.Lock()
        self._closing = threading.Event()
        versions = {p["version"] for p in self.peers}
        if len(versions) > 1:
            detail = ", ".join(f"rank {r} on {p['host']}: {p['version']}" for r, p in enumerate(self.peers))
            raise CharrnnError(f"the workers run different versions ({detail}); install the same charrnn, numba and "
                               "numpy on every host")
        self._watchdog = threading.Thread(target=self._watch, name="charrnn-watchdog", daemon=True)
        self._watchdog.start()

    def _tell_launcher(self, name: str, text: str):
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
            self._tell_launcher("out", os.path.abspath(out))

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
    def watch(self, poll):
        """Agree now on the signals received and on rank 0's clock (`poll()` -> (signal or None,
        time up)), and from now on at every reduce."""
        self._poll = poll
        self._agree(0.0)

    def reduce(self, grad: np.ndarray, loss: float) -> float:
        """train_step's reduction: sum the flat gradient over the workers in place (one Allreduce)
        and scale it by 1/N. Each worker's kernel returns the gradient of the mean loss over its
        T*B/N positions; the mean over all T*B is the mean of the N equal-sized means, so the sum
        over workers divided by N is exactly the single process's gradient (and the same for the
        loss). The loss travels with the flags that decide whether the run stops (_agree)."""
        t0 = time.perf_counter()
        self.comm.Allreduce(self.MPI.IN_PLACE, grad, op=self.MPI.SUM)
        grad *= grad.dtype.type(1.0 / self.size)
        t1 = time.perf_counter()
        loss = self._agree(loss)
        self.t_reduce += t1 - t0
        self.t_control += time.perf_counter() - t1
        self.n_reduce += 1
        return loss

    def _agree(self, loss: float) -> float:
        signum, time_up = self._poll()
        ctl = self._ctl
        ctl[0] = loss
        ctl[1] = 1.0 if signum == signal.SIGINT else 0.0
        ctl[2] = 1.0 if signum == signal.SIGTERM else 0.0
        ctl[3] = 1.0 if (self.root and time_up) else 0.0  # rank 0's clock decides a time budget
        self.comm.Allreduce(self.MPI.IN_PLACE, ctl, op=self.MPI.SUM)
        self.agreed_signal = signal.SIGTERM if ctl[2] > 0 else (signal.SIGINT if ctl[1] > 0 else None)
        self.agreed_time_up = bool(ctl[3] > 0)
        return float(ctl[0] / self.size)

    def agreed(self, signum, time_up: bool):
        """The signal and time verdict all the workers agreed on at the last reduce."""
        return self.agreed_signal, self.agreed_time_up

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
            except Cancelled:
                result = ("cancelled", self._poll()[0])  # the signal that cut it short
                self.agreed_signal = result[1]  # every worker stops for it now
                self._finish_root(result)
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
            self.agreed_signal = value
            raise Cancelled()
        if kind == "error":
            raise Quiet(value)
        return value

    def _finish_root(self, result):
        self.comm.Ibarrier().Wait()
        self.comm.bcast(result, root=0)

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
        dead = [r for r, pid in mates if not _alive(pid)]
        if self.rank != min([r for r, pid in mates if _alive(pid)] + [self.rank]):
            return Quiet(1)
        last = os.path.join(self.out or "", "last.npz")
        saved = f"; the last checkpoint, {last}, is intact" if self.out and os.path.exists(last) else ""
        if dead:
            p = self.peers[dead[0]]
            return LocalError(f"worker {dead[0]} (process {p['pid']} on {p['host']}) ended unexpectedly; all workers "
                              f"stopped{saved}")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return LocalError(f"lost contact with another worker (MPI: {first}); all workers stopped{saved}")

    def _watch(self):
        """Look at the other workers on this machine every WATCH_EVERY_S; if one has died (killed,
        crashed), the lowest surviving rank says which, and every worker here ends: the others
        would wait for it forever. Workers on other machines are mpiexec's to clean up."""
        me = self.peers[self.rank]["machine"]
        mates = [(r, p["pid"]) for r, p in enumerate(self.peers) if p["machine"] == me and r != self.rank]
        if not mates:
            return
        while not self._closing.wait(WATCH_EVERY_S):
            dead = [r for r, pid in mates if not _alive(pid)]
            if not dead:
                continue
            if self._closing.wait(GRACE_S):  # it ended with the run, as this one is about to
                return
            self._writing.acquire(timeout=60)  # let a checkpoint write finish: it stays whole
            living = [r for r, pid in mates if _alive(pid)] + [self.rank]
            if self.rank == min(living):
                p = self.peers[dead[0]]
                last = os.path.join(self.out or "", "last.npz")
                saved = f"; the last checkpoint, {last}, is intact" if self.out and os.path.exists(last) else ""
                message = (f"charrnn: error: worker {dead[0]} (process {p['pid']} on {p['host']}) ended unexpectedly; "
                           f"all workers stopped{saved}\n")
                os.write(2, message.encode("utf-8", "replace"))
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


# ---------------------------------------------------------------------------------- a rank's run
class LocalError(CharrnnError):
    """A failure of this worker alone (not rank 0's, which every worker shares): it says which."""


def train(make, quiet: bool) -> dict | None:
    """`charrnn train` as one of the ranks of an MPI job. `make(quiet)` builds the Trainer (new or
    resumed) on rank 0, which alone owns the run directory; the other workers are built from what
    rank 0 sends (the configuration, vocabulary, run state, parameters, optimizer moments and
    carried state) and read the corpus themselves, checked against rank 0's hash. Returns rank 0's
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


def build(workers: Workers, make, quiet: bool):
    """Every worker's Trainer: rank 0's from `make`, the others' from what rank 0 sends, each on
    the token file of its host (host_tokens); then rank 0's arrays on all. Collective. Whatever
    stops it (an interrupt between rank 0's make and training included), rank 0 gives its run
    directory back: removed when the run made it and saved nothing in it."""
    made = []
    try:
        return _build(workers, make, quiet, made)
    except BaseException:
        for trainer in made:
            trainer.close()
        raise


def _build(workers: Workers, make, quiet: bool, made: list):
    trainer = None
    if workers.root:
        try:
            trainer = make(quiet)
            made.append(trainer)
            if trainer.rundir is not None and trainer.rundir.created:  # the launcher's to remove if we die unsaved
                workers._tell_launcher("created", os.path.abspath(trainer.out))
            try:
                workers.set_batch(trainer.cfg.batch)
            except BaseException:
                trainer.close()
                raise
            spec = _spec(trainer)
        except BaseException as e:
            workers.share(("error", getattr(e, "exit_code", 1)))
            raise
        workers.share(("ok", spec))
    else:
        kind, spec = workers.share(None)
        if kind == "error":
            raise Quiet(spec)
    error = None
    try:
        if not workers.root:
            workers.set_batch(spec["given"]["batch"])
        path = host_tokens(workers, spec)
        if not workers.root:
            trainer = _follow(spec, path)
    except CharrnnError as e:
        error = e
    # every worker says whether it is ready; one that is not has said why
    failed = workers.comm.allgather(0 if error is None else error.exit_code)
    if any(failed):
        if workers.root:
            trainer.close()
        if error is not None and not isinstance(error, Quiet):
            raise LocalError(f"worker {workers.rank} on {workers.host}: {error}") from None
        raise Quiet(max(failed))
    _share_arrays(workers, trainer)
    trainer.workers = workers
    workers.set_out(trainer.out)
    trainer.threads_default = threads_per_worker(workers.local_size)
    return trainer


def _spec(trainer) -> dict:
    """What the other workers need to become rank 0's trainer, but its arrays."""
    return {"given": trainer.given.to_dict(), "fitted": trainer.fitted.to_dict(), "vocab": trainer.vocab.to_json(),
            "model": trainer.model.cfg.to_dict(), "dtype": str(trainer.model.dtype),
            "state": trainer.state.__dict__.copy(), "out": trainer.out, "extra_minutes": trainer.extra_minutes,
            "corpus": {"paths": list(trainer.corpus.paths), "sha256": trainer.corpus.sha256,
                       "chars": trainer.corpus.chars},
            "tokens": {"path": os.path.abspath(trainer.tokens.path), "meta": trainer.tokens.meta}}


# Where a host other than rank 0's keeps its copy of the token file: this directory if set (a
# node-local disk), else the run directory's own file if the host sees it (a shared filesystem),
# else the temporary directory. Copies are kept by content (corpus hash, vocabulary, split), so a
# later run on the same corpus maps the one already there.
TOKEN_DIR_VARIABLE = "CHARRNN_TOKEN_DIR"


def host_tokens(workers: Workers, spec: dict) -> str:
    """The path of the token file this worker maps: on rank 0's host, the run directory's
    tokens.npy (rank 0 wrote it); on another host, the one its first worker found or built
    (_host_copy). Collective within each host: its workers map one file, so the corpus is in
    memory once per machine (the page cache's pages, shared)."""
    if workers.local_rank == 0:
        try:
            path = spec["tokens"]["path"] if workers.root else _host_copy(spec)
        except BaseException:
            workers.host_comm.bcast(None, root=0)
            raise
        workers.host_comm.bcast(path, root=0)
        return path
    path = workers.host_comm.bcast(None, root=0)
    if path is None:
        raise Quiet(1)  # this host's first worker failed, and said why
    return path


def _host_copy(spec: dict) -> str:
    """The token file of a host that is not rank 0's: rank 0's own (a shared filesystem), one built
    earlier, or a new one, encoded from this host's copy of the corpus after checking its hash."""
    import hashlib
    import json
    import tempfile

    from charrnn.config import TrainConfig
    from charrnn.data import TOKENS_FILE, build_token_file, map_token_file, read_corpus
    from charrnn.vocab import Vocab

    meta = spec["tokens"]["meta"]
    base = os.environ.get(TOKEN_DIR_VARIABLE)
    if not base and map_token_file(spec["tokens"]["path"], meta) is not None:
        return spec["tokens"]["path"]
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    directory = os.path.join(base or os.path.join(tempfile.gettempdir(), f"charrnn-tokens-{os.getuid()}"), key)
    path = os.path.join(directory, TOKENS_FILE)
    if map_token_file(path, meta) is not None:
        return path
    given = TrainConfig.from_dict(spec["given"])
    corpus = read_corpus(spec["corpus"]["paths"], given.encoding, given.docs, given.max_input)
    try:
        if corpus.sha256 != spec["corpus"]["sha256"]:
            raise CharrnnError(f"the corpus {', '.join(spec['corpus']['paths'])} is not rank 0's (its hash differs); "
                               "every host needs the same corpus at the same path")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise CharrnnError(f"cannot make {directory} for this host's token file: {e.strerror or e} (set "
                               f"{TOKEN_DIR_VARIABLE})") from None
        tokens = build_token_file(corpus, Vocab.from_json(spec["vocab"]), given.val_frac, path)
    finally:
        corpus.close()
    if tokens.meta != meta:
        raise CharrnnError(f"this host's token file {path} differs from rank 0's (another charrnn version?)")
    return path


def _follow(spec: dict, path: str):
    """A trainer like rank 0's, for a worker that writes nothing, on the token file at `path`."""
    from types import SimpleNamespace

    import platform

    from charrnn import precision
    from charrnn.config import Fitted, TrainConfig
    from charrnn.data import map_token_file
    from charrnn.model import Model, ModelConfig
    from charrnn.optim import make_optimizer
    from charrnn.train import RunState, Trainer
    from charrnn.vocab import Vocab

    tokens = map_token_file(path, spec["tokens"]["meta"])
    if tokens is None:
        raise CharrnnError(f"cannot map the token file {path} (missing, or not rank 0's)")
    given, fitted = TrainConfig.from_dict(spec["given"]), Fitted.from_dict(spec["fitted"])
    if fitted.precision == "bf16" and precision.backend() is None:  # every worker computes as rank 0 does
        raise CharrnnError(f"this worker's CPU ({platform.node()}) has no bfloat16 products, and rank 0 chose "
                           "bf16: give --precision fp32")
    model = Model(ModelConfig(**spec["model"]), dtype=np.dtype(spec["dtype"]))
    opt = make_optimizer(given.optimizer, model.n_params, model.dtype, given.lr)
    corpus = SimpleNamespace(**spec["corpus"])  # what rank 0 read; only rank 0 writes it into checkpoints
    return Trainer(given, fitted, corpus, Vocab.from_json(spec["vocab"]), model, spec["out"], True,
                   RunState(**spec["state"]), opt, spec["extra_minutes"], tokens)


def _share_arrays(workers: Workers, trainer):
    """Rank 0's parameters, optimizer moments, step count and averaged weights on every worker, and
    each worker's streams of the carried state."""
    workers.share_array(trainer.model.theta)
    bufs = trainer.opt.state_buffers()
    for key in sorted(bufs):
        workers.share_array(bufs[key])
    t = workers.share(trainer.opt.t)
    trainer.opt.load_state(bufs, t)
    if trainer.averager is not None:
        workers.share_array(trainer.averager.avg)
    h_all, c_all = (trainer.h, trainer.c) if workers.root else (None, None)
    trainer.h, trainer.c = trainer.model.zero_state(workers.b1 - workers.b0)
    workers.scatter_state(h_all, c_all, trainer.h, trainer.c)
