"""Threads: how many the compiled kernels use, the team that runs them, and keeping BLAS
single-threaded. This module is not a kernel.

A parallel kernel is one compiled function that a thread runs from start to end for its share of
the work (a batch, a scoring span, a chunk of samples), meeting the other threads at spin
barriers inside (kernels/sync.py). The ThreadTeam starts it on n threads at once: the calling thread
is thread 0 and n-1 long-lived worker threads are the rest. The kernels release the GIL, so the
threads run side by side. One start per batch and the barriers inside cost far less than a
parallel region per time step (Numba's prange on its OpenMP pool), which also made the speed of a
process a matter of luck (see kernels/sync.py; measured in benchmarks/results/core_latency.txt and
train_throughput.txt).

Each thread makes its own BLAS calls (np.dot inside the kernels goes to SciPy's OpenBLAS), so
BLAS must run one thread per call: two levels of threading on two cores only fight.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

_SYMBOLS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)
_blas_done = False
ABORT_INDEX = 0  # kernels/sync.py: slot ABORT is word 0 of the sync array


def _scipy_openblas_libs():
    import scipy

    root = os.path.dirname(os.path.dirname(scipy.__file__))
    return sorted(glob.glob(os.path.join(root, "scipy.libs", "libscipy_openblas*.so*")))


def single_thread_blas() -> bool:
    """Ask SciPy's OpenBLAS for one thread per call. Returns False if it could not be found."""
    global _blas_done
    if _blas_done:
        return True
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library Numba calls)

    for path in _scipy_openblas_libs():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SYMBOLS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                fn(1)
                _blas_done = True
                return True
    return False


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _Thread(threading.Thread):
    def __init__(self, index: int):
        super().__init__(name=f"charrnn-worker-{index}", daemon=True)
        self.go = threading.Event()
        self.done = threading.Event()
        self.job = None
        self.error = None

    def run(self):
        while True:
            self.go.wait()
            self.go.clear()
            fn, p, args, sync = self.job
            try:
                fn(p, *args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
                self.error = e
                if sync is not None:
                    sync[ABORT_INDEX] = 1  # the others give up waiting for this thread
            self.job = None
            self.done.set()


class ThreadTeam:
    """n threads that run one kernel together: run(n, fn, *args) calls fn(p, *args) for p in
    range(n) at the same time, p = 0 on the calling thread, and returns when all have returned."""

    def __init__(self, size: int):
        self.size = max(1, int(size))
        self._workers: list[_Thread] = []
        self._lock = threading.Lock()

    def resize(self, size: int):
        self.size = max(1, int(size))

    def run(self, n: int, fn, *args, sync=None):
        """Run fn(p, *args) on n <= size threads. `sync`, the sync array of the kernel's barriers
        (kernels/sync.py), is zeroed first; if a thread fails before it starts, its ABORT slot is
        raised so that the others stop waiting, and the error is raised here once all are done."""
        n = int(n)
        if not 1 <= n <= self.size:  # a kernel planned for more threads would wait at its barriers forever
            raise ValueError(f"a run of {n} threads on a team of {self.size}")
        if n == 1:
            if sync is not None:
                sync[:] = 0
            return fn(0, *args)
        with self._lock:
            while len(self._workers) < n - 1:
                w = _Thread(len(self._workers) + 1)
                w.start()
                self._workers.append(w)
            if sync is not None:
                sync[:] = 0
            workers = self._workers[: n - 1]
            for p, w in enumerate(workers, start=1):
                w.error = None
                w.done.clear()
                w.job = (fn, p, args, sync)
                w.go.set()
            error = interrupted = None
            try:
                fn(0, *args)
            except BaseException as e:  # noqa: BLE001
                error = e
                if sync is not None:
                    sync[ABORT_INDEX] = 1
            for w in workers:  # never leave a worker running: the next run reuses it
                while True:
                    try:
                        w.done.wait()
                        break
                    except KeyboardInterrupt as e:  # a second Ctrl-C: raised once all are back
                        interrupted = e
                error = error or w.error
            if error is not None:
                raise error
            if interrupted is not None:
                raise interrupted


_team = ThreadTeam(available_cores())


def team() -> ThreadTeam:
    """The process's team of threads (its size is set_threads')."""
    return _team


def set_threads(n: int | None) -> int:
    """Use n threads (None: every core available); returns the number actually used."""
    # more threads than cores would only make spinning threads wait for each other
    n = available_cores() if n is None else max(1, min(int(n), available_cores()))
    _team.resize(n)
    single_thread_blas()
    return n


def get_threads() -> int:
    return _team.size
