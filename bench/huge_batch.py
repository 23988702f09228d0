"""python -m bench.huge_batch: a batch past the device backends' memory bound, in blocks and at once.

``device_common.DEVICE_BLOCK_ELEMENTS`` makes the Triton and CuPy backends fuse a batch whose
projections pass 2**30 elements per input in blocks of whole examples, one after another. This times
one such call (default: 2048 W3-shaped antibodies, L = 256, D = 1280, H = 8, bfloat16: 11 blocks) in
blocks and with the bound lifted (one block), with the peak device memory of each and the largest
difference between their outputs, and prints the result as JSON. Without a GPU it runs under Triton's
interpreter on the CPU (for the tests, with tiny shapes and ``--bound``), where times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from crossattn_gpu import CrossAttention
from crossattn_gpu.backends import device_common
from crossattn_gpu.backends.triton_backend import interpreter_mode

from .timing import time_calls

NO_BOUND = 1 << 62


def measure(batch: int, length: int, width: int, heads: int, dtype: str, bound: int, repeats: int) -> dict:
    on_gpu = torch.cuda.is_available() and not interpreter_mode()
    device = "cuda" if on_gpu else "cpu"
    model = CrossAttention(width, heads, seed=0, backend="triton")
    generator = torch.Generator(device=device).manual_seed(0)
    pair = [torch.randn(batch, length, width, device=device, generator=generator).to(getattr(torch, dtype))
            for _ in range(2)]
    kwargs = dict(need_similarity=False, bidirectional=False)
    weights = device_common.DeviceFoldedWeights(heads=heads, width=width, query_value=None, magnitudes=None)
    results, outputs = {"batch": batch, "length": length, "width": width, "heads": heads, "dtype": dtype}, {}
    before = device_common.DEVICE_BLOCK_ELEMENTS
    try:
        for name, elements in (("blocks", bound), ("one_block", NO_BOUND)):
            device_common.DEVICE_BLOCK_ELEMENTS = elements
            blocks = len(device_common.DeviceFusion._example_blocks(batch, length, weights))
            outputs[name] = model.fuse_representations(*pair, **kwargs)["fused_sequential"].float()  # warm-up
            peak = None
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            seconds = time_calls(lambda _: model.fuse_representations(*pair, **kwargs), [None], device,
                                 repeats=repeats, warmup=0)
            if on_gpu:
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            results[name] = {"count": blocks, "median_ms": statistics.median(seconds) * 1e3, "peak_mib": peak}
    finally:
        device_common.DEVICE_BLOCK_ELEMENTS = before
    scale = float(outputs["one_block"].abs().max())
    results["max_relative_difference"] = float((outputs["blocks"] - outputs["one_block"]).abs().max()) / scale
    results["device"] = torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)"
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.huge_batch", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--bound", type=int, default=device_common.DEVICE_BLOCK_ELEMENTS,
                        help="projection elements per input that a block may hold (default: the library's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls each way")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.batch, args.length, args.width, args.heads, args.dtype, args.bound, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
