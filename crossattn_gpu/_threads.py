"""Run independent chunks of CPU work on one thread per core.

NumPy releases the GIL in matmul and in ufuncs, so threads give real parallelism. Each worker must
then use a single-threaded BLAS, or BLAS's own threads oversubscribe the cores (measured on a
2-core CPU: attention 76 ms serial with 2 BLAS threads, 48 ms on 2 workers with 1 BLAS thread each,
152 ms on 2 workers with 2 BLAS threads each). Capping BLAS threads needs ``threadpoolctl``; without
it the chunks run serially in the calling thread (``pip install 'crossattn_gpu[cpu]'``).

Safe to call from several threads at once, and in a forked child (``multiprocessing``'s default on
Linux before Python 3.14, PyTorch's DataLoader workers): every call in flight shares one BLAS limit,
and a child starts a pool of its own.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

_worker = threading.local()


def cpu_count() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a container's
    ``--cpus``, which affinity does not show: one worker per core of a 64-core host under a 2-CPU quota
    would be 64 workers throttled onto 2 CPUs)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return cores if quota is None else min(cores, quota)


#: (quota, period) files of this process's cgroup as a container sees it: v2 (``cpu.max`` holds both),
#: then v1's cpu controller.
CGROUP_CPU_FILES = (("/sys/fs/cgroup/cpu.max", None),
                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


@lru_cache(maxsize=1)
def cgroup_cpu_quota() -> int | None:
    """CPUs a cgroup quota allows, rounded up (at least 1); None without a quota. Read once a process:
    ``cpu_count`` runs in every call."""
    for quota_file, period_file in CGROUP_CPU_FILES:
        try:
            with open(quota_file) as f:
                fields = f.read().split()
            if period_file is not None:
                with open(period_file) as f:
                    fields += f.read().split()
            quota, period = int(fields[0]), int(fields[1])
        except (OSError, IndexError, ValueError):  # absent, or "max" (no quota)
            continue
        if quota > 0 and period > 0:  # v1 writes -1 for no quota
            return max(1, -(-quota // period))
    return None


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    # Kept for the life of the process: starting threads costs ~3 ms each on a small VM.
    return ThreadPoolExecutor(cpu_count(), thread_name_prefix="crossattn_gpu")


@lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _release_openblas_control() -> None:
    """Let the next thread set OpenBLAS's limit.

    threadpoolctl 3.8 lets only the first thread that sets a limit on a pthreads OpenBLAS set the
    next one, and silently ignores the others, until that thread leaves a ``with`` block. Our limit
    is set by whichever call comes first and lifted by whichever leaves last, under our own lock, so
    it drops that claim each time; kept, it made a call from another thread run its workers on 2 BLAS
    threads each (measured on this 2-core CPU: other results in the last bits, oversubscribed cores).
    """
    from threadpoolctl import OpenBLASController

    clear = getattr(OpenBLASController, "clear_controlling_thread", None)  # threadpoolctl < 3.8: none
    if clear is not None:
        clear(force=True)


class _SharedBlasLimit:
    """A limit of one BLAS thread, held while any call's chunks run.

    A limit per call would not do: threadpoolctl's limit restores what it found on entry, so of two
    overlapping calls the first to finish lifted the limit under the other's workers, and the other
    then restored its own limit for good (measured: three threads of four calls each left OpenBLAS
    at 1 thread).
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.holders = 0
        self.limiter = None  # threadpoolctl's limiter while holders > 0

    @contextmanager
    def held(self):
        with self.lock:
            if self.holders == 0:
                _release_openblas_control()
                self.limiter = _blas_controller().limit(limits=1, user_api="blas")
            self.holders += 1
        try:
            yield
        finally:
            with self.lock:
                self.holders -= 1
                if self.holders == 0:
                    _release_openblas_control()
                    self.limiter.restore_original_limits()
                    _release_openblas_control()
                    self.limiter = None


_blas_limit = _SharedBlasLimit()


def parallel_available() -> bool:
    """True when chunks can run on several threads (several cores and threadpoolctl installed)."""
    return cpu_count() > 1 and _blas_controller() is not None


def run_in_parallel(work, chunks: list) -> None:
    """Call ``work(chunk)`` for every chunk, on up to one thread per core; results go via side effects.

    Workers run under the calling thread's NumPy floating-point settings (``np.errstate``: each thread
    has its own). Called from inside a worker, it runs the chunks there, one after another: the outer
    call already keeps every core busy, and a worker waiting on the pool it belongs to could deadlock it.
    """
    if len(chunks) < 2 or not parallel_available() or getattr(_worker, "busy", False):
        for chunk in chunks:
            work(chunk)
        return
    with _blas_limit.held():
        errors = np.geterr()
        futures = [_pool().submit(_as_worker, work, chunk, errors) for chunk in chunks]
        try:
            for future in futures:
                future.result()  # re-raises a worker's exception here
        except BaseException:  # a chunk's error, or Ctrl-C
            # Chunks not started never run, and those running finish before the limit is lifted: the
            # caller's next call would otherwise queue behind them, on BLAS threads they oversubscribe.
            for future in futures:
                future.cancel()
            wait(futures)
            raise


def _as_worker(work, chunk, errors: dict) -> None:
    _worker.busy = True  # only this module's pool runs this
    with np.errstate(**errors):
        work(chunk)


def _after_fork_in_child() -> None:
    """A forked child has only the thread that forked: it gets a pool and a BLAS limit of its own.

    A limit held by a call in flight in another of the parent's threads stays on in the child (its
    BLAS keeps 1 thread): lifting it here would call threadpoolctl, whose lock that thread may have
    held at the fork.
    """
    global _blas_limit
    _pool.cache_clear()  # the parent's workers are not in the child: its chunks would wait for ever
    _blas_limit = _SharedBlasLimit()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
