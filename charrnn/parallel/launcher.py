"""The launcher: `charrnn train --workers N` runs itself again as N MPI processes under the
virtualenv's own mpiexec, relays their output, forwards Ctrl-C and SIGTERM once, and, when a
worker or mpiexec's process manager dies, says which in one line and ends the rest.

Not here: what a worker does (rank.py), the team's collectives (workers.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from charrnn.errors import CharrnnError, UsageError
from charrnn.parallel.common import (INSTALL_HINT, LAUNCH_DIR_VARIABLE, alive, ended, have_mpi4py, mpiexec_path,
                                     saved_note, worker_name)

# lines of mpiexec's own (not the workers') that the launcher keeps off the terminal: its notes on
# forwarding Ctrl-C, and the banner about a worker that ended badly, which it reports in one line
_HYDRA_NOISE = (b"[mpiexec@", b"====", b"=   ", b"YOUR APPLICATION TERMINATED", b"This typically refers",
                b"Please see the FAQ", b"Abort(")
_MPI_STACK = re.compile(rb"^[A-Za-z_]+\(\d+\)\.*: ")  # the lines of MPI's error stack under an Abort(...) line

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
    if not have_mpi4py() or not os.access(mpiexec, os.X_OK):
        missing = "mpi4py" if not have_mpi4py() else f"mpiexec (looked for {mpiexec})"
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
        return alive(pid) if not os.path.isdir("/proc") else False


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


def _run_dir(rendezvous: str) -> str | None:
    """The run directory rank 0 named in the rendezvous directory (None before it did)."""
    try:
        with open(os.path.join(rendezvous, "out"), encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _saved_note(rendezvous: str) -> str:
    """'; the last checkpoint, RUN/last.npz, is intact' when the run has one."""
    return saved_note(_run_dir(rendezvous))


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
            who = worker_name(first_dead, *pid_of[first_dead])
    if pid:
        rank, host = ranks.get(int(pid.group(1)), (None, pid.group(2)))
        who = worker_name(rank, pid.group(1), host) if rank is not None else f"process {pid.group(1)}"
    return ended(who, _run_dir(rendezvous), how)


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
