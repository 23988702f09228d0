"""python -m bench.gemm_route: the CuPy backend's attention in its CUDA C kernel against its GEMM route.

The CuPy backend runs attentions of at least ``cupy_backend.GEMM_MIN_SCORES`` scores (B x H x Lq x Lk) as
cuBLAS GEMMs around CuPy's softmax (``DeviceFusion._gemm_attention``) and smaller ones in its kernel: a
threshold predicted, not timed (bench/NOTES.md, 2026-12-01). This times the fusion's attention (the heads
summed, the keys shared by the heads, no mask) both ways, alternating, over sizes from W1's to W4's, and
reports the medians, their ratio and the largest difference between the two routes' outputs, as JSON and
a table: the threshold belongs where the ratio passes 1. Each call is timed from the host, a
synchronisation before and after it, as a caller sees it. Under Triton's interpreter (no GPU) it runs
the Triton backend's kernel path (the same ``DeviceFusion._attention``) on tiny shapes for the tests,
where times mean nothing.

    python -m bench.gemm_route --out gemm_route.json      # on a GPU, with CuPy
    TRITON_INTERPRET=1 python -m bench.gemm_route --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from crossattn_gpu import CrossAttention
from crossattn_gpu._optional import version_of
from crossattn_gpu.backends.device_common import DeviceFusion
from crossattn_gpu.backends.triton_backend import interpreter_mode

#: (name, B, H, L, D, dtype), by their scores: W1, four around the predicted threshold (2**20), W2, W3, W4.
SHAPES = [("W1", 1, 2, 10, 64, "float32"), ("B16 L64", 16, 4, 64, 64, "bfloat16"),
          ("B64 L64", 64, 4, 64, 64, "bfloat16"), ("B16 L128", 16, 4, 128, 128, "bfloat16"),
          ("B64 L128", 64, 4, 128, 128, "bfloat16"), ("W3", 64, 8, 256, 1280, "bfloat16"),
          ("W2", 512, 4, 256, 128, "bfloat16"), ("W2", 512, 4, 256, 128, "float32"), ("W4", 4, 4, 4096, 256, "bfloat16")]
SMOKE_SHAPES = [("tiny", 2, 2, 9, 8, "float32"), ("small", 2, 3, 33, 24, "float16")]


def versions(backend) -> dict:
    """The packages the timed code ran on, and the device."""
    if backend.name == "cupy":
        cupy = backend.cupy
        device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
        return {**{name: version_of(name) for name in ("numpy", "cupy")}, "device": device}
    torch = backend.torch
    device = torch.cuda.get_device_name() if backend.device.type == "cuda" else "cpu (Triton interpreter)"
    return {**{name: version_of(name) for name in ("numpy", "torch", "triton")}, "device": device}


def synchronizer(backend):
    """A function that waits for the backend's device to finish its queued work (none on the CPU)."""
    if backend.name == "cupy":
        return backend.cupy.cuda.Device().synchronize
    torch = backend.torch
    return torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)


def measure(backend, name: str, batch: int, heads: int, length: int, width: int, dtype: str, repeats: int) -> dict:
    """Both routes on one shape: medians of ``repeats`` rounds, each a call one way and a call the other."""
    rng = np.random.default_rng(0)
    compute = backend.compute_dtype(dtype)
    q, k, v = (backend.cast(backend.native(rng.standard_normal(shape, dtype=np.float32), "x"), compute)
               for shape in ((batch, heads, length, width), (batch, 1, length, width), (batch, heads, length, width)))
    sync = synchronizer(backend)

    def call(gemms: bool):
        backend._attends_as_gemms = lambda q, k, v: gemms
        try:
            return DeviceFusion._attention(backend, q, k, v, scale=width ** -0.5, masked=None, q_lengths=None,
                                           k_lengths=None, need_weights=False, sum_heads=True)[0]
        finally:
            del backend._attends_as_gemms

    outputs = {gemms: backend.host(backend.cast(call(gemms), backend.float32), "out") for gemms in (False, True)}
    times = {False: [], True: []}
    for _ in range(repeats):  # alternating, so that a drift of the machine touches both alike
        for gemms in (False, True):
            sync()
            start = time.perf_counter()
            call(gemms)
            sync()
            times[gemms].append(time.perf_counter() - start)
    kernel, gemms = (statistics.median(times[way]) * 1e3 for way in (False, True))
    scale = float(np.abs(outputs[False]).max())
    return {"shape": name, "batch": batch, "heads": heads, "length": length, "width": width, "dtype": dtype,
            "scores": batch * heads * length * length, "kernel_ms": kernel, "gemm_ms": gemms,
            "kernel_over_gemm": kernel / gemms,
            "max_relative_difference": float(np.abs(outputs[True] - outputs[False]).max()) / scale}


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | B | H | L | D | dtype | scores | kernel ms | GEMMs ms | kernel / GEMMs | difference |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['shape']} | {r['batch']} | {r['heads']} | {r['length']} | {r['width']} | {r['dtype']} | "
              f"{r['scores']} | {r['kernel_ms']:.4f} | {r['gemm_ms']:.4f} | {r['kernel_over_gemm']:.2f} | "
              f"{r['max_relative_difference']:.1e} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gemm_route", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the Triton backend (tests, under the interpreter)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls each way")
    args = parser.parse_args(argv)
    if args.smoke != interpreter_mode():
        raise SystemExit("bench.gemm_route times the CuPy backend on a GPU, or with --smoke the Triton backend "
                         "under TRITON_INTERPRET=1")
    backend = CrossAttention(4, 1, backend="triton" if args.smoke else "cupy")._backend
    rows = []
    for name, batch, heads, length, width, dtype in SMOKE_SHAPES if args.smoke else SHAPES:
        rows.append(measure(backend, name, batch, heads, length, width, dtype, 1 if args.smoke else args.repeats))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        if args.out:  # after every row: a run stopped at its time limit keeps what it timed
            with open(args.out, "w") as fh:
                json.dump({"backend": backend.name, "versions": versions(backend), "rows": rows}, fh, indent=1)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
