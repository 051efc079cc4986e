"""Run directories: a run owns its directory through an exclusive lock, taken when the directory is
created or resumed and released on any exit.

The lock is an advisory `flock` on `<run>/.lock`, which holds the owner's process id for error
messages. The kernel drops a flock when its holder exits for any reason, SIGKILL included, so a
lock left by a killed run is never stale: the next run or `--resume` simply takes it. (flock works
on local filesystems and on NFS, where Linux maps it onto byte-range locks.)

Not here: what a run writes into its directory (keeper.py, checkpoint.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
import shutil
import stat

from charrnn.errors import CharrnnError, UsageError

LOCK_NAME = ".lock"
CHECKPOINTS = ("last.npz", "best.npz")


class Busy(CharrnnError):
    """Another live process holds the run directory's lock."""


def holds_run(path: str) -> bool:
    """Whether a directory already holds a run (a checkpoint of one)."""
    return any(os.path.exists(os.path.join(path, name)) for name in CHECKPOINTS)


class RunDir:
    """An output directory owned by this process until release() (or its exit)."""

    def __init__(self, path: str, fd: int, created: bool):
        self.path = path
        self._fd = fd
        self.created = created  # made by this process: removed again if the run stops before saving anything

    # ------------------------------------------------------------------ taking one
    @classmethod
    def lock(cls, path: str, resuming: bool = False) -> "RunDir":
        """Create `path` if needed and lock it; Busy (naming the holder) if a live run has it."""
        created = _make_dir(path)
        fd = _try_lock(path)  # a directory this call made is left if another run locked it first: it is theirs
        if fd is None:
            holder = _holder(path)
            raise Busy(f"{path} is in use by another charrnn run ({holder}); wait for it to end"
                       + ("" if resuming else ", or choose another --out"))
        return cls(path, fd, created)

    @classmethod
    def claim_new(cls, path: str) -> "RunDir":
        """Lock `path` for a new run: refuse one that already holds a run, or that a live run holds."""
        rd = cls.lock(path)
        if holds_run(path):
            rd.release()
            raise UsageError(f"{path} already holds a run; continue it with --resume {shlex.quote(path)} or choose "
                             "another --out")
        return rd

    @classmethod
    def claim_default(cls, base: str) -> "RunDir":
        """The first of base, base-2, base-3 ... that holds no run and no live run holds, locked.

        Safe against runs started at the same moment: whichever takes a directory's lock owns it,
        and a run that finds the lock taken, or a run already saved there, moves on."""
        n = 1
        while True:
            cand = base if n == 1 else f"{base}-{n}"
            n += 1
            if holds_run(cand):
                continue
            try:
                rd = cls.lock(cand)
            except Busy:
                continue
            if holds_run(cand):  # saved between the check and the lock
                rd.release()
                continue
            return rd

    # ------------------------------------------------------------------ giving it back
    def release(self):
        """Drop the lock (also dropped by the kernel when this process exits)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None

    def discard_if_unused(self):
        """Remove the directory again if this run made it and saved no checkpoint into it (a run
        stopped before its first save), then release it. Its files go while the lock is held, the
        lock file last, and the directory only if nothing else appeared in it meanwhile."""
        if self._fd is not None and self.created and not holds_run(self.path):
            try:
                for entry in os.scandir(self.path):
                    if entry.name != LOCK_NAME:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            os.unlink(entry.path)
                os.unlink(os.path.join(self.path, LOCK_NAME))
                os.rmdir(self.path)
            except OSError:
                pass
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


# ------------------------------------------------------------------ the files of a run
RUN_FILE = "run.json"  # the run's identity, written when it starts; every checkpoint of it carries the same
RUN_FORMAT = "charrnn-run"
METRICS_FILE = "metrics.jsonl"
_KIND = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
         (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    return next((what for test, what in _KIND if test(mode)), "not a regular file")


def not_regular(path: str, follow: bool = True) -> str | None:
    """What `path` is when it exists and is not a regular file ("a FIFO" ...), else None. With
    follow=False a symbolic link is itself not regular."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)


def check_run_files(path: str):
    """Refuse a run directory whose log is not a plain file (a FIFO would block the run at its
    first validation, a link would send its lines elsewhere), before any work. Checkpoints are
    checked as they load (checkpoint.py), the token file and the identity as they are read."""
    log = os.path.join(path, METRICS_FILE)
    what = not_regular(log, follow=False)
    if what is not None:
        raise CharrnnError(f"{log} is {what}, not a regular file; move it away to resume the run")


def new_identity(path: str, run_id: str | None = None) -> str:
    """Write the identity of a run (`run_id`, or a new one) into its directory (run.json,
    atomically); return it."""
    import json
    import uuid

    run_id = run_id or uuid.uuid4().hex
    tmp = os.path.join(path, RUN_FILE + ".tmp")
    try:
        with open_new(tmp, "w") as f:
            json.dump({"format": RUN_FORMAT, "version": 1, "run_id": run_id}, f)
            f.write("\n")
        os.replace(tmp, os.path.join(path, RUN_FILE))
    except OSError as e:
        raise CharrnnError(f"could not write {os.path.join(path, RUN_FILE)}: {e.strerror or e}") from None
    return run_id


def read_identity(path: str) -> str | None:
    """The run id recorded in the directory's run.json; None when there is none (a run from before
    identities); CharrnnError when it is there but is not a plain, readable record."""
    import json

    name = os.path.join(path, RUN_FILE)
    what = not_regular(name)
    if what is not None:
        raise CharrnnError(f"{name} is {what}, not a regular file; it should hold the run's identity (move it "
                           "away, and resume checks last.npz against best.npz instead)")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CharrnnError(f"cannot read {name}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(4097)
    try:
        record = json.loads(data.decode("utf-8")) if len(data) <= 4096 else None
        run_id = record["run_id"] if record.get("format") == RUN_FORMAT else None
    except (ValueError, AttributeError, KeyError, TypeError, RecursionError):
        run_id = None
    if not isinstance(run_id, str) or not run_id:
        raise CharrnnError(f"{name} is damaged: it should hold the run's identity (remove it, and resume checks "
                           "last.npz against best.npz instead)")
    return run_id


def open_new(path: str, mode: str = "wb"):
    """A new file at `path` for a run's temporary or probe file (its name is fixed), opened with
    O_EXCL and O_NOFOLLOW after removing whatever non-directory holds the name: a FIFO or a link
    planted under that name is replaced, never opened (opening a FIFO for writing blocks)."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def append_line(path: str, line: str):
    """Append one line (ending in a newline) to a run's log: a plain file only (never a FIFO, a
    device or a link's target), and on a line of its own when the file's end is partial (what a
    crash or a full disk leaves), so the partial line stays one bad line instead of eating this one.
    OSError when it cannot be written."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"is {_kind(st.st_mode)}, not a regular file")
        data = line.encode("utf-8")
        if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def remove_files(directory: str, pattern) -> list[str]:
    """Remove the regular files of `directory` whose whole names match `pattern` (a compiled
    regular expression), and return their paths; OSError when listing or removing fails. Links
    and directories are left: what a run writes is plain files."""
    removed = []
    for entry in list(os.scandir(directory)):
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.path)
    return removed


def _make_dir(path: str) -> bool:
    """Make the directory (and its parents); whether this call created it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CharrnnError(f"output path {path} exists and is not a directory")
    try:
        os.makedirs(path)
        return True
    except FileExistsError:
        if not os.path.isdir(path):
            raise CharrnnError(f"output path {path} exists and is not a directory") from None
        return False
    except OSError as e:
        raise CharrnnError(f"cannot create output directory {path}: {e.strerror or e}") from None


def _try_lock(path: str, retries: int = 2) -> int | None:
    """An fd holding the directory's exclusive lock, with our pid written in; None if held."""
    lock_path = os.path.join(path, LOCK_NAME)
    what = not_regular(lock_path, follow=False)
    if what is not None:
        raise CharrnnError(f"{lock_path} is {what}, not charrnn's lock file; move it away")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise CharrnnError(f"output directory {path} is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise CharrnnError(f"cannot lock output directory {path}: {e.strerror or e}") from None
    try:  # a lock on a file a departing run had already unlinked protects nothing: not ours
        current = os.stat(lock_path).st_ino
    except OSError:
        current = None
    if current != os.fstat(fd).st_ino:
        os.close(fd)
        if retries > 0:  # the directory is being given up right now: take it as new
            _make_dir(path)
            return _try_lock(path, retries - 1)
        return None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        os.close(fd)
        raise CharrnnError(f"output directory {path} is not writable: {e.strerror or e}") from None
    return fd


def _holder(path: str) -> str:
    """'process N' for the lock's holder, as far as the lock file says."""
    try:
        with open(os.path.join(path, LOCK_NAME), encoding="ascii") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    return f"process {pid}" if pid > 0 else "process unknown"


