"""Thread control: how many threads Numba uses, and keeping BLAS single-threaded.

charrnn parallelises over chunks of streams itself (one chunk per Numba thread, each making its own
BLAS calls), so the BLAS library that Numba's np.dot calls (SciPy's bundled OpenBLAS) must run one
thread per call: two levels of threading on two cores only fight. This module is not a kernel.
"""

from __future__ import annotations

import ctypes
import glob
import os

_SYMBOLS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)
_blas_done = False


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


def set_threads(n: int | None) -> int:
    """Use n threads (None: every core available); returns the number actually used."""
    import numba

    n = available_cores() if n is None else int(n)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    single_thread_blas()
    return n


def get_threads() -> int:
    import numba

    return numba.get_num_threads()
