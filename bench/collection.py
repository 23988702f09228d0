"""python -m bench.collection: ``fuse_collection`` against the ways around it, on antibodies of many lengths.

Each case's antibodies (their two embeddings of one length, drawn uniformly from a range) are fused by
a loop of per-antibody ``fuse_representations`` calls, by ``fuse_collection`` (batches cut by the
backend's ``call_flops``), and by ``fuse_collection`` with ``call_flops`` unlimited (any 64
consecutive antibodies in a batch: the CLI's rule before 2026-11-29), with more ``call_flops`` values
on request (``--join-flops``). On the CPU each way runs in a process of its own, the ways alternating
over ``--rounds``: NumPy's OpenBLAS threads spin on after a way's GEMMs and slow the next way's in the
same process (batches of 4 examples measured 1.2-1.6x slower per example than 2-D calls when the
two alternated in one process, 1.7x faster each alone). On a GPU they run round-robin in this process.
Prints JSON: each way's median milliseconds, the calls it made, and the largest difference of its
outputs from the loop's, relative to the largest output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

from crossattn_gpu import CrossAttention
from crossattn_gpu.ragged import length_batches
from crossattn_gpu.weights import host_values

from .timing import time_calls

#: name -> (antibodies, shortest, longest, D, H)
CASES = {
    "esm": (64, 100, 130, 1280, 8),  # ESM-2 width, antibody chains
    "wide": (256, 30, 400, 128, 4),  # a wide spread of lengths
    "short": (1000, 8, 14, 64, 2),  # many tiny calls: the seed demo's size
    "varied": (1000, 10, 300, 32, 2),
    "fv": (2000, 105, 135, 128, 4),  # an Fv screen: many antibodies, few distinct lengths
}
BATCH_SIZE = 64
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where ``-m bench.collection`` imports


class Case:
    """One case's model and antibodies (NumPy arrays, or torch tensors on the GPU)."""

    def __init__(self, name: str, backend: str, dtype: str, device: str):
        self.name = name
        self.count, shortest, longest, self.width, self.heads = CASES[name]
        rng = np.random.default_rng(0)
        self.lengths = rng.integers(shortest, longest + 1, size=self.count)
        pairs = [[rng.standard_normal((n, self.width)).astype(np.float32) for n in self.lengths] for _ in range(2)]
        if device == "gpu":
            import torch

            self.pairs = [[torch.from_numpy(x).to("cuda", getattr(torch, dtype)) for x in side] for side in pairs]
        else:
            self.pairs = [[x.astype(dtype) for x in side] for side in pairs]
        self.model = CrossAttention(self.width, self.heads, seed=0, backend=backend)

    def ways(self, extra_flops: list[float]) -> dict:
        """Way name -> the ``call_flops`` its batches are cut by (None: the loop of calls)."""
        ways = {"loop": None, "fuse_collection": self.model._backend.call_flops, "call_flops=inf": float("inf")}
        ways.update({f"call_flops={flops:g}": flops for flops in extra_flops})
        return ways

    def run(self, flops):
        options = dict(need_weights=False, need_similarity=False)
        if flops is None:
            return [self.model.fuse_representations(xs, xt, **options) for xs, xt in zip(*self.pairs)]
        self.model._backend.call_flops = flops
        try:
            return self.model.fuse_collection(*self.pairs, batch_size=BATCH_SIZE)
        finally:
            del self.model._backend.call_flops  # the backend class's own again

    def calls(self, flops) -> int:
        if flops is None:
            return self.count
        by_length = {i: int(n) for i, n in enumerate(self.lengths)}
        return len(length_batches(list(by_length), by_length, by_length, BATCH_SIZE, width=self.width,
                                  heads=self.heads, join_flops=flops))


def time_in_process(case: Case, ways: dict, device: str, repeats: int) -> dict:
    """Seconds of each way's calls, the ways round-robin (each warmed up once first)."""
    times = {name: [] for name in ways}
    for _ in range(repeats):
        for name, flops in ways.items():
            times[name] += time_calls(lambda _: case.run(flops), [None], device, repeats=1,
                                      warmup=0 if times[name] else 1)
    return times


def time_in_processes(argv: list[str], case: str, ways: list[str], rounds: int, repeats: int) -> dict:
    """Seconds of each way's calls, each way in a process of its own, the ways alternating over rounds."""
    times = {name: [] for name in ways}
    for _ in range(rounds):
        for name in ways:
            child = [sys.executable, "-m", "bench.collection", *argv, "--cases", case, "--ways", name,
                     "--in-process", "--repeats", str(repeats), "--times-only"]
            done = subprocess.run(child, capture_output=True, text=True, check=True, cwd=_ROOT)
            times[name] += json.loads(done.stdout)[name]
    return times


def describe(case: Case, ways: dict, times: dict) -> dict:
    """The case's result: per way, its median, its calls, and its outputs' difference from the loop's."""
    def outputs(flops):
        return [np.asarray(host_values(r["bidirectional_fusion"], "output"), dtype=np.float64) for r in case.run(flops)]

    reference = outputs(None)
    scale = max(float(np.abs(r).max()) for r in reference)
    result = {"case": dict(zip(("antibodies", "shortest", "longest", "width", "heads"), CASES[case.name])),
              "backend": case.model.backend, "default_call_flops": ways["fuse_collection"], "ways": {}}
    for name, flops in ways.items():
        difference = max(float(np.abs(g - r).max()) for g, r in zip(outputs(flops), reference)) / scale
        result["ways"][name] = {"median_ms": statistics.median(times[name]) * 1e3, "calls": case.calls(flops),
                                "max_relative_difference": difference}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.collection", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="esm,wide,short,varied", help=f"of {', '.join(CASES)}")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float64", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--join-flops", default="", help="more call_flops values to time, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="CPU: rounds of one process per way")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each way per process")
    parser.add_argument("--ways", default=None, help="only these ways, comma-separated (default: all)")
    parser.add_argument("--in-process", action="store_true", help="every way in this process (default on a GPU)")
    parser.add_argument("--times-only", action="store_true", help=argparse.SUPPRESS)  # a child's answer
    args = parser.parse_args(argv)
    extra = [float(v) for v in args.join_flops.split(",") if v]
    shared = ["--backend", args.backend, "--dtype", args.dtype, "--device", args.device, "--join-flops", args.join_flops]
    results = []
    for name in args.cases.split(","):
        case = Case(name, args.backend, args.dtype, args.device)
        ways = case.ways(extra)
        if args.ways:
            ways = {way: ways[way] for way in args.ways.split(",")}
        if args.in_process or args.device == "gpu":
            times = time_in_process(case, ways, args.device, args.repeats)
        else:
            times = time_in_processes(shared, name, list(ways), args.rounds, args.repeats)
        if args.times_only:
            print(json.dumps(times))
            return 0
        results.append(describe(case, ways, times))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
