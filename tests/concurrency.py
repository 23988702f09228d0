"""Calling a model the ways a pipeline does: from several threads at once, and in a forked child."""

from __future__ import annotations

import multiprocessing
import os
import threading
import warnings

import numpy as np
import pytest


def overlapping_results(call, threads: int = 3, calls_each: int = 3) -> list:
    """The results of ``call()`` made ``calls_each`` times by each of ``threads`` threads started together."""
    results, start = [], threading.Barrier(threads)

    def calls():
        start.wait()
        for _ in range(calls_each):
            results.append(call())

    workers = [threading.Thread(target=calls) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(results) == threads * calls_each
    return results


def assert_a_forked_child_gets(call, want, timeout: float = 60) -> None:
    """``call()`` in a forked child returns ``want`` bit for bit, within ``timeout`` seconds."""

    def in_child():
        os._exit(0 if np.array_equal(call(), want) else 3)

    child = multiprocessing.get_context("fork").Process(target=in_child)
    with warnings.catch_warnings():  # Python 3.12 on: forking a process that has threads is what is tested
        warnings.filterwarnings("ignore", "This process .* is multi-threaded, use of fork", DeprecationWarning)
        child.start()
    child.join(timeout=timeout)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"the forked child's fusion did not finish in {timeout:.0f} s")
    assert child.exitcode == 0, "the forked child's fusion differs from the parent's"
