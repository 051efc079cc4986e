"""Numba decorator options, defined once for every kernel.

- cache=True: a second run loads machine code from __pycache__ instead of recompiling.
- nogil=True: kernels release the GIL.
- error_model="numpy": float division by zero gives inf/nan instead of a Python exception check,
  which would stop LLVM from vectorising the gate loops.
- fastmath: only the flags that keep NaN and Inf meaningful (no "nnan"/"ninf"): NaN detection of
  the loss and -inf masking in top-k sampling must keep working.
"""

FASTMATH = {"nsz", "arcp", "contract", "reassoc", "afn"}

JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath=FASTMATH)
JIT_PARALLEL = dict(JIT, parallel=True)
