"""Chunks on worker threads: same results as serial, errors propagate, BLAS limit restored."""

import numpy as np
import pytest

from crossattn_gpu import CrossAttention, _threads
from crossattn_gpu.backends import numpy_backend


def test_parallel_and_serial_results_are_identical(monkeypatch):
    pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(0)
    model = CrossAttention(16, 2, seed=0)
    seq, struct = rng.standard_normal((9, 7, 16)), rng.standard_normal((9, 5, 16))
    monkeypatch.setattr(numpy_backend, "SCORE_CHUNK_ELEMENTS", 2 * 7 * 5)  # one example per chunk
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    parallel = model.fuse_representations(seq, struct, bidirectional=False)
    monkeypatch.setattr(_threads, "parallel_available", lambda: False)
    serial = model.fuse_representations(seq, struct, bidirectional=False)
    for key in ("fused_sequential", "fused_structural"):
        np.testing.assert_array_equal(parallel[key], serial[key])


def test_worker_errors_propagate_and_blas_threads_are_restored(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]

    def work(chunk):
        if chunk == 3:
            raise ValueError("chunk 3 failed")

    with pytest.raises(ValueError, match="chunk 3 failed"):
        _threads.run_in_parallel(work, list(range(5)))
    after = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    assert before == after


def test_every_chunk_runs_once():
    done = []
    _threads.run_in_parallel(done.append, list(range(20)))
    assert sorted(done) == list(range(20))


def test_nested_calls_run_inside_the_worker(monkeypatch):
    """A chunk that runs chunks of its own runs them in its own thread: no worker waits on the pool."""
    import threading

    pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    seen = []

    def outer(chunk):
        here = threading.current_thread().name
        _threads.run_in_parallel(lambda inner: seen.append((chunk, inner, here == threading.current_thread().name)),
                                 [0, 1, 2])

    _threads.run_in_parallel(outer, list(range(6)))
    assert sorted(seen) == [(c, i, True) for c in range(6) for i in range(3)]
