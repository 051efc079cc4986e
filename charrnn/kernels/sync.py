"""Atomics and spin barriers: how the threads of one parallel run meet inside a kernel.

A parallel run (charrnn/threads.py: ThreadTeam.run) starts every thread once, in one kernel call, for a
whole batch, scoring span or sampling chunk. Inside, the threads meet at barriers: once per time
step when they share a step by blocks of units, once per phase otherwise. A spin barrier costs
about 0.4 us; a parallel region per step (Numba's prange) cost several microseconds, and its
thread pool made the speed of a 2x128 model depend on the process (73k or 107k chars/s on the
same machine, fixed for a process's life). Atomics come from LLVM through the intrinsics below.

The sync array (int64, one 64-byte slot per word so that no two threads write one cache line):
  slot ABORT   set by the caller when a thread could not start; every wait then gives up, so the
               threads that did start run to the end (with meaningless numbers) instead of spinning
               forever, and the caller raises the error
  slot STOP    a flag one thread raises for all (sampling: every stream has ended)
  slot EPOCH+p thread p's count of barriers passed; each thread writes only its own
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from charrnn.kernels.jit import helper

SLOT = 8  # int64 words per slot: one cache line
ABORT, STOP, EPOCH = 0, 1, 2
SPINS_BEFORE_YIELD = 2000


def sync_words(n: int) -> int:
    """Length of the sync array for n threads."""
    return (EPOCH + n) * SLOT


@intrinsic
def atomic_load(typingctx, arr, idx):
    sig = arr.dtype(arr, idx)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, ordering="acquire", align=8)

    return sig, codegen


@intrinsic
def atomic_store(typingctx, arr, idx, val):
    sig = types.void(arr, idx, arr.dtype)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        builder.store_atomic(args[2], ptr, ordering="release", align=8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def sched_yield(typingctx):
    """Give the core away for a moment (libc's sched_yield) while waiting for another thread."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


@helper
def flag(sync, slot):
    """The value of a shared slot (ABORT, STOP)."""
    return atomic_load(sync, slot * SLOT)


@helper
def raise_flag(sync, slot, value):
    atomic_store(sync, slot * SLOT, np.int64(value))


@helper
def barrier(sync, p, n, epoch):
    """Thread p of n waits here until all n have passed barrier number `epoch`; returns epoch + 1,
    the number of the next one. Writes before the barrier are visible to every thread after it."""
    if n > 1:
        atomic_store(sync, (EPOCH + p) * SLOT, np.int64(epoch))
        for q in range(n):
            if q != p:
                i = (EPOCH + q) * SLOT
                spins = 0
                while atomic_load(sync, i) < epoch:
                    if atomic_load(sync, ABORT * SLOT) != 0:
                        return epoch + 1
                    spins += 1
                    if spins > SPINS_BEFORE_YIELD:
                        sched_yield()
    return epoch + 1
