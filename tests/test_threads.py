"""The team of threads that runs a parallel kernel (charrnn/threads.py) and the spin barrier the
threads meet at (charrnn/kernels/sync.py)."""

import threading

import numpy as np
import pytest

from charrnn import threads
from charrnn.kernels import layout
from charrnn.kernels.jit import kernel
from charrnn.kernels.sync import EPOCH, SLOT, barrier


@kernel
def _rounds(p, n, sync, log, rounds):
    """Each thread writes its id into log[r, p] in round r; after the barrier of round r it checks
    that every thread's entry of round r is there (log[r, n] counts the misses)."""
    ep = 1
    for r in range(rounds):
        log[r, p] = p + 1
        ep = barrier(sync, p, n, ep)
        for q in range(n):
            if log[r, q] != q + 1:
                log[r, n] += 1


def test_team_runs_every_thread_and_the_barrier_orders_them(restore_threads):
    n = threads.set_threads(2)
    sync = layout.new_sync(n)
    log = np.zeros((500, n + 1), dtype=np.int64)
    threads.team().run(n, _rounds, n, sync, log, 500)
    assert np.all(log[:, :n] == np.arange(1, n + 1)) and not log[:, n].any()
    # one thread: the barrier is a no-op and the caller runs it
    log[:] = 0
    threads.team().run(1, _rounds, 1, sync, log[:, :2], 500)
    assert np.all(log[:, 0] == 1)


def test_a_thread_that_fails_to_start_stops_the_others_waiting(restore_threads):
    """If one thread raises before it reaches its kernel, the others would wait at the first barrier
    forever; instead its error is raised once every thread has returned."""
    if threads.set_threads(2) != 2:
        pytest.skip("needs 2 threads")
    sync = layout.new_sync(2)
    log = np.zeros((5, 3), dtype=np.int64)

    def maybe_fail(p, *args):
        if p == 1:
            raise RuntimeError("worker could not start")
        return _rounds(p, *args)

    done = []

    def go():
        with pytest.raises(RuntimeError, match="could not start"):
            threads.team().run(2, maybe_fail, 2, sync, log, 5, sync=sync)
        done.append(True)

    t = threading.Thread(target=go)
    t.start()
    t.join(60)
    assert done, "the team hung"
    # and the team is usable again afterwards
    log[:] = 0
    sync2 = layout.new_sync(2)
    threads.team().run(2, _rounds, 2, sync2, log, 5, sync=sync2)
    assert np.all(log[:, :2] == [1, 2])


def test_thread_count_is_capped_by_the_cores(restore_threads):
    cores = threads.available_cores()
    assert threads.set_threads(10 * cores) == cores == threads.get_threads()
    assert threads.set_threads(None) == cores
    assert threads.set_threads(1) == 1 and threads.team().size == 1


def test_sync_slots_do_not_share_cache_lines():
    sync = layout.new_sync(4)
    assert sync.ctypes.data % 64 == 0 and SLOT * sync.itemsize == 64
    assert sync.shape[0] == (EPOCH + 4) * SLOT


def test_a_run_wider_than_the_team_is_refused(restore_threads):
    """A kernel planned for more threads than the team has would wait at its barriers forever."""
    n = threads.set_threads(1)
    with pytest.raises(ValueError, match="threads on a team of 1"):
        threads.team().run(n + 1, _rounds, n + 1, layout.new_sync(n + 1), np.zeros((1, n + 2), np.int64), 1)
