"""Chunks on worker threads: same results as serial, errors propagate, BLAS limit restored."""

import os
import threading
import warnings

import numpy as np
import pytest

from concurrency import assert_a_forked_child_gets, overlapping_results
from crossattn_gpu import CrossAttention, _threads
from crossattn_gpu.backends import numpy_backend


def test_parallel_and_serial_results_are_identical(monkeypatch):
    pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(0)
    model = CrossAttention(16, 2, seed=0, backend="numpy")
    seq, struct = rng.standard_normal((9, 7, 16)), rng.standard_normal((9, 5, 16))
    monkeypatch.setattr(numpy_backend, "SCORE_CHUNK_ELEMENTS", 2 * 7 * 5)  # one example per chunk
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    parallel = model.fuse_representations(seq, struct, bidirectional=False)
    monkeypatch.setattr(_threads, "parallel_available", lambda: False)
    serial = model.fuse_representations(seq, struct, bidirectional=False)
    for key in ("fused_sequential", "fused_structural"):
        np.testing.assert_array_equal(parallel[key], serial[key])


def _blas_threads(threadpoolctl) -> list[int]:
    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads():
    """BLAS on 2 threads during the test, whatever an earlier test left (a limit of 1 left by a bug would
    otherwise be what a test finds before its call and again after it)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads(threadpoolctl)
        assert before and set(before) == {2}
        yield before


def test_worker_errors_propagate_and_blas_threads_are_restored(monkeypatch, two_blas_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    before = two_blas_threads

    def work(chunk):
        if chunk == 3:
            raise ValueError("chunk 3 failed")

    with pytest.raises(ValueError, match="chunk 3 failed"):
        _threads.run_in_parallel(work, list(range(5)))
    assert _blas_threads(threadpoolctl) == before


@pytest.mark.parametrize("setting,raised", [("raise", FloatingPointError), ("ignore", None)])
def test_workers_take_the_calling_threads_floating_point_settings(monkeypatch, setting, raised):
    pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    worker_threads = set()

    def overflow(chunk):
        worker_threads.add(threading.get_ident())
        np.full(4, 1e38, np.float32) * np.float32(10)

    with warnings.catch_warnings(), np.errstate(over=setting):
        warnings.simplefilter("error")  # a RuntimeWarning would fail the call
        if raised is None:
            _threads.run_in_parallel(overflow, list(range(8)))
        else:
            with pytest.raises(raised, match="overflow"):
                _threads.run_in_parallel(overflow, list(range(8)))
    assert threading.get_ident() not in worker_threads  # the settings reached other threads


def test_every_chunk_runs_once():
    done = []
    _threads.run_in_parallel(done.append, list(range(20)))
    assert sorted(done) == list(range(20))


@pytest.mark.parametrize("cores,chunks", [(1, 3), (2, 1)])
def test_one_core_or_one_chunk_runs_in_the_calling_thread(monkeypatch, cores, chunks):
    """No hand-off to a worker where nothing would run beside it."""
    monkeypatch.setattr(_threads, "cpu_count", lambda: cores)
    assert _threads.parallel_available() is (cores > 1 and _threads._blas_controller() is not None)
    callers = set()
    _threads.run_in_parallel(lambda chunk: callers.add(threading.get_ident()), list(range(chunks)))
    assert callers == {threading.get_ident()}


def test_nested_calls_run_inside_the_worker(monkeypatch):
    """A chunk that runs chunks of its own runs them in its own thread: no worker waits on the pool."""
    pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    seen = []

    def outer(chunk):
        here = threading.current_thread().name
        _threads.run_in_parallel(lambda inner: seen.append((chunk, inner, here == threading.current_thread().name)),
                                 [0, 1, 2])

    _threads.run_in_parallel(outer, list(range(6)))
    assert sorted(seen) == [(c, i, True) for c in range(6) for i in range(3)]


def test_workers_run_a_single_threaded_blas_whichever_thread_calls(monkeypatch, two_blas_threads):
    """threadpoolctl 3.8 ignored limits set from any thread but the first to set one: calls from a
    second thread ran their workers on a BLAS with every core's threads."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    before = two_blas_threads
    seen = {}

    def call(caller):
        _threads.run_in_parallel(lambda chunk: seen.setdefault(caller, []).append(_blas_threads(threadpoolctl)),
                                 [0, 1, 2, 3])

    call("main")
    for name in ("thread", "another thread"):
        thread = threading.Thread(target=call, args=(name,))
        thread.start()
        thread.join()
    call("main again")
    assert seen == {caller: [[1] * len(before)] * 4 for caller in ("main", "thread", "another thread", "main again")}
    assert _blas_threads(threadpoolctl) == before


def test_overlapping_calls_from_threads_give_a_lone_calls_results_and_restore_blas(monkeypatch, two_blas_threads):
    """Each call once took a limit of its own: the first to finish lifted it under the others' workers,
    and the last restored the limit it had found (1 thread) for good."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    rng = np.random.default_rng(1)
    model = CrossAttention(64, 4, seed=0, backend="numpy")
    seq, struct = rng.standard_normal((32, 96, 64), np.float32), rng.standard_normal((32, 96, 64), np.float32)
    alone = model.fuse_representations(seq, struct)["bidirectional_fusion"]
    before = two_blas_threads
    assert _blas_threads(threadpoolctl) == before
    for result in overlapping_results(lambda: model.fuse_representations(seq, struct)["bidirectional_fusion"]):
        np.testing.assert_array_equal(result, alone)
    assert _blas_threads(threadpoolctl) == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_fuses_with_a_pool_of_its_own(monkeypatch):
    """The parent's workers do not exist in a forked child; the child once queued its chunks for them
    and waited for ever (multiprocessing's default start on Linux, PyTorch's DataLoader workers)."""
    pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    rng = np.random.default_rng(2)
    model = CrossAttention(32, 2, seed=0, backend="numpy")
    seq, struct = rng.standard_normal((16, 64, 32)), rng.standard_normal((16, 64, 32))
    in_parent = model.fuse_representations(seq, struct)["bidirectional_fusion"]  # starts the parent's pool
    assert_a_forked_child_gets(lambda: model.fuse_representations(seq, struct)["bidirectional_fusion"], in_parent)


def test_after_a_chunk_fails_no_other_chunk_starts_or_is_still_running(monkeypatch):
    """The failed call's remaining chunks once kept the workers busy after the error reached the caller."""
    import time

    pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    started, finished, lock = [], [], threading.Lock()

    def work(chunk):
        with lock:
            started.append(chunk)
        if chunk == 0:
            raise ValueError("chunk 0 failed")
        time.sleep(0.05)
        with lock:
            finished.append(chunk)

    with pytest.raises(ValueError, match="chunk 0 failed"):
        _threads.run_in_parallel(work, list(range(40)))
    with lock:
        started_then, finished_then = sorted(started), sorted(finished)
    assert len(started_then) < 40  # the rest were cancelled
    assert finished_then == [c for c in started_then if c != 0]  # nothing still running
    time.sleep(0.2)
    assert sorted(started) == started_then  # and nothing started later


@pytest.mark.parametrize("files,quota", [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 CPUs, rounded up
    ({"cpu.max": "max 100000\n"}, None),  # v2 without a quota
    ({"cfs_quota_us": "50000\n", "cfs_period_us": "100000\n"}, 1),  # v1
    ({"cfs_quota_us": "-1\n", "cfs_period_us": "100000\n"}, None),  # v1 without a quota
    ({"cfs_quota_us": "50000\n", "cfs_period_us": "0\n"}, None),  # a period of 0: no quota, not a division by 0
    ({"cpu.max": "0 100000\n", "cfs_quota_us": "250000\n", "cfs_period_us": "100000\n"}, 3),  # v2's 0: v1's
    ({}, None),  # no cgroup files
])
def test_a_cgroup_cpu_quota_caps_the_workers(tmp_path, monkeypatch, files, quota):
    """A container's --cpus sets a quota that CPU affinity does not show."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(_threads, "CGROUP_CPU_FILES", ((str(tmp_path / "cpu.max"), None),
                                                       (str(tmp_path / "cfs_quota_us"), str(tmp_path / "cfs_period_us"))))
    _threads.cgroup_cpu_quota.cache_clear()
    try:
        assert _threads.cgroup_cpu_quota() == quota
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert _threads.cpu_count() == (cores if quota is None else min(cores, quota))
    finally:
        _threads.cgroup_cpu_quota.cache_clear()
