"""Run independent chunks of CPU work on one thread per core.

NumPy releases the GIL in matmul and in ufuncs, so threads give real parallelism. Each worker must
then use a single-threaded BLAS, or BLAS's own threads oversubscribe the cores (measured on a
2-core CPU: attention 76 ms serial with 2 BLAS threads, 48 ms on 2 workers with 1 BLAS thread each,
152 ms on 2 workers with 2 BLAS threads each). Capping BLAS threads needs ``threadpoolctl``; without
it the chunks run serially in the calling thread (``pip install 'crossattn_gpu[cpu]'``).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

_worker = threading.local()


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def parallel_available() -> bool:
    """True when chunks can run on several threads (several cores and threadpoolctl installed)."""
    return cpu_count() > 1 and _blas_controller() is not None


def run_in_parallel(work, chunks: list) -> None:
    """Call ``work(chunk)`` for every chunk, on up to one thread per core; results go via side effects.

    Called from inside a worker, it runs the chunks there, one after another: the outer call already
    keeps every core busy, and a worker waiting on the pool it belongs to could deadlock it.
    """
    if len(chunks) < 2 or not parallel_available() or getattr(_worker, "busy", False):
        for chunk in chunks:
            work(chunk)
        return
    with _blas_controller().limit(limits=1, user_api="blas"):
        for future in [_pool().submit(_as_worker, work, chunk) for chunk in chunks]:
            future.result()  # re-raises a worker's exception here


def _as_worker(work, chunk) -> None:
    _worker.busy = True  # only this module's pool runs this
    work(chunk)
