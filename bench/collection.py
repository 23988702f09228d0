"""python -m bench.collection: ``fuse_collection`` against the ways around it, on antibodies of many lengths.

Each case's antibodies (their two embeddings of one length, drawn uniformly from a range) are fused,
round-robin in one process: by a loop of per-antibody ``fuse_representations`` calls, by
``fuse_collection`` (batches cut by the backend's ``call_flops``), and by ``fuse_collection`` with
``call_flops`` unlimited (any 64 consecutive antibodies in a batch: the CLI's rule before 2026-11-29),
with more ``call_flops`` values on request (``--join-flops``). Prints JSON: each way's median
milliseconds, the batches it ran, and the largest difference of its outputs from the loop's, relative
to the largest output. CPU backends take NumPy inputs; on a GPU (``--device gpu``) the inputs are torch
tensors there.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from crossattn_gpu import CrossAttention
from crossattn_gpu.ragged import length_batches

from .timing import time_calls

#: name -> (antibodies, shortest, longest, D, H)
CASES = {
    "esm": (64, 100, 130, 1280, 8),  # ESM-2 width, antibody chains
    "wide": (256, 30, 400, 128, 4),  # a wide spread of lengths
    "short": (1000, 8, 14, 64, 2),  # many tiny calls: the seed demo's size
    "varied": (1000, 10, 300, 32, 2),
}
BATCH_SIZE = 64


def measure(case: tuple, backend: str, dtype: str, device: str, repeats: int, join_flops: list[float]) -> dict:
    count, shortest, longest, width, heads = case
    rng = np.random.default_rng(0)
    lengths = rng.integers(shortest, longest + 1, size=count)
    pairs = [[rng.standard_normal((n, width)).astype(np.float32) for n in lengths] for _ in range(2)]
    if device == "gpu":
        import torch

        pairs = [[torch.from_numpy(x).to("cuda", getattr(torch, dtype)) for x in side] for side in pairs]
    else:
        pairs = [[x.astype(dtype) for x in side] for side in pairs]
    model = CrossAttention(width, heads, seed=0, backend=backend)
    options = dict(need_weights=False, need_similarity=False)

    def loop(_):
        return [model.fuse_representations(xs, xt, **options) for xs, xt in zip(*pairs)]

    def collection(flops):
        def run(_):
            model._backend.call_flops = flops
            try:
                return model.fuse_collection(*pairs, batch_size=BATCH_SIZE)
            finally:
                del model._backend.call_flops  # the backend class's own again
        return run

    default = model._backend.call_flops
    ways = {"loop": (loop, count), "fuse_collection": (collection(default), None)}
    for flops in [float("inf"), *join_flops]:
        ways[f"call_flops={flops:g}"] = (collection(flops), None)
    by_length = {i: int(n) for i, n in enumerate(lengths)}
    times = {name: [] for name in ways}
    for _ in range(repeats):
        for name, (run, _) in ways.items():
            times[name] += time_calls(run, [None], device, repeats=1, warmup=0 if times[name] else 1)
    reference = [_host(r["bidirectional_fusion"]) for r in loop(None)]
    scale = max(float(np.abs(r).max()) for r in reference)
    result = {"case": dict(zip(("antibodies", "shortest", "longest", "width", "heads"), case)), "backend": model.backend,
              "dtype": dtype, "default_call_flops": default, "ways": {}}
    for name, (run, batches) in ways.items():
        flops = default if name == "fuse_collection" else float(name.split("=")[1]) if "=" in name else None
        if batches is None:
            batches = len(length_batches(list(by_length), by_length, by_length, BATCH_SIZE, width=width, heads=heads,
                                         join_flops=flops))
        got = [_host(r["bidirectional_fusion"]) for r in run(None)]
        difference = max(float(np.abs(g - r).max()) for g, r in zip(got, reference)) / scale
        result["ways"][name] = {"median_ms": statistics.median(times[name]) * 1e3, "calls": batches,
                                "max_relative_difference": difference}
    return result


def _host(x) -> np.ndarray:
    return x.float().cpu().numpy() if hasattr(x, "cpu") else np.asarray(x, dtype=np.float64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.collection", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="esm,wide,short,varied", help=f"of {', '.join(CASES)}")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float64", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each way once a round)")
    parser.add_argument("--join-flops", default="", help="more call_flops values to time, comma-separated")
    args = parser.parse_args(argv)
    extra = [float(v) for v in args.join_flops.split(",") if v]
    results = [measure(CASES[name], args.backend, args.dtype, args.device, args.repeats, extra)
               for name in args.cases.split(",")]
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
