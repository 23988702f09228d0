"""bench/collection.py: tiny cases on the NumPy backend."""

import json

import numpy as np

from bench import collection
from crossattn_gpu.backends.numpy_backend import NumpyBackend


def test_every_way_agrees_with_the_loop(capsys, monkeypatch):
    monkeypatch.setitem(collection.CASES, "tiny", (9, 1, 6, 4, 2))
    args = ["--cases", "tiny", "--backend", "numpy", "--repeats", "1", "--join-flops", "0", "--in-process"]
    assert collection.main(args) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["backend"] == "numpy" and result["case"]["antibodies"] == 9
    assert result["default_call_flops"] == NumpyBackend.call_flops
    ways = result["ways"]
    assert set(ways) == {"loop", "fuse_collection", "call_flops=inf", "call_flops=0"}
    distinct_lengths = len(set(np.random.default_rng(0).integers(1, 7, size=9).tolist()))  # the case's draw
    assert ways["loop"]["calls"] == 9 and ways["call_flops=inf"]["calls"] == 1
    assert ways["call_flops=0"]["calls"] == distinct_lengths
    for way in ways.values():
        assert way["median_ms"] > 0 and way["max_relative_difference"] <= 1e-12


def test_each_way_can_run_in_a_process_of_its_own():
    times = collection.time_in_processes(["--backend", "numpy"], "short", ["fuse_collection"], rounds=2, repeats=2)
    assert list(times) == ["fuse_collection"] and len(times["fuse_collection"]) == 4
    assert all(t > 0 for t in times["fuse_collection"])
