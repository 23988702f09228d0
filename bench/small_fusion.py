"""python -m bench.small_fusion: small examples' fusions in one launch against the multi-launch path.

The Triton backend fuses examples within ``kernels/small_fusion.py``'s ``fits`` (float32 up to 16 long,
TF32 32, 16-bit 64; heads up to 64 wide) in one launch, one program per (example, direction), up to
the backend's ``one_launch_flops``, and takes their multi-head attentions in one launch too
(``kernels/small_attention.py``, under the same bound). That wins where launches dominate (W1); with
thousands of examples the multi-launch path's cuBLAS projections may win instead. This times
``fuse_representations`` (device arrays, no similarities, as the harness calls it) and, on two of the
shapes, ``multi_head_attention`` (keys that are the values) both ways (``one_launch_flops`` infinite
and 0), alternating, over batch sizes (the FLOPs of each row say where the bound would fall), and
reports the medians, their ratio and the largest difference between the two routes' outputs, as JSON
and a table. Under Triton's interpreter (no GPU) it runs tiny shapes for the tests, where times mean
nothing.

    python -m bench.small_fusion --out small.json        # on a GPU
    TRITON_INTERPRET=1 python -m bench.small_fusion --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from crossattn_gpu import CrossAttention
from crossattn_gpu.backends.triton_backend import interpreter_mode

from .timing import time_calls

#: (operation, L, D, H, dtype): W1's shape, the longest examples each dtype takes in one launch, many
#: heads; the multi-head attention on W1's shape and the longest 16-bit one.
SHAPES = [("fusion", 10, 64, 2, "float32"), ("fusion", 16, 64, 8, "float32"), ("fusion", 64, 64, 4, "bfloat16"),
          ("fusion", 32, 32, 16, "bfloat16"), ("attention", 10, 64, 2, "float32"), ("attention", 64, 64, 4, "bfloat16")]
BATCHES = [1, 16, 256, 4096]
SMOKE_SHAPES = [("fusion", 10, 16, 2, "float32"), ("attention", 10, 16, 2, "float32")]
SMOKE_BATCHES = [1, 3]


def measure(operation: str, length: int, width: int, heads: int, dtype: str, batch: int, repeats: int,
            device: str) -> dict:
    model = CrossAttention(width, heads, seed=0, backend="triton")
    generator = torch.Generator(device=device).manual_seed(0)
    pair = [torch.randn(batch, length, width, device=device, generator=generator).to(getattr(torch, dtype))
            for _ in range(2)]
    backend = model._backend
    if not backend.small_fusion.fits(length, length, width, pair[0].element_size(), backend.float32_precision):
        raise ValueError(f"L = {length}, D = {width} in {dtype} do not fit one launch: both ways would be the same")

    def call(one_launch: bool):
        backend.one_launch_flops = math.inf if one_launch else 0
        if operation == "attention":
            return model.multi_head_attention(pair[0], pair[1], pair[1])[0]
        return model.fuse_representations(*pair, need_similarity=False, bidirectional=False)["fused_sequential"]

    flops = (backend.small_attention if operation == "attention" else backend.small_fusion).flops(
        batch, length, length, width, heads)
    outputs = {way: call(way).float() for way in (True, False)}  # compile, warm up
    timing = "gpu" if device == "cuda" else "cpu"
    times = {True: [], False: []}
    for _ in range(repeats):  # alternating, so that a drift of the machine touches both alike
        for way in (True, False):
            times[way] += time_calls(lambda _: call(way), [None], timing, repeats=5, warmup=1)
    one, multi = (statistics.median(times[way]) * 1e3 for way in (True, False))
    scale = float(outputs[False].abs().max())
    return {"operation": operation, "length": length, "width": width, "heads": heads, "dtype": dtype, "batch": batch,
            "flops": flops,
            "one_launch_ms": one, "multi_launch_ms": multi, "speedup": multi / one,
            "max_relative_difference": float((outputs[True] - outputs[False]).abs().max()) / scale}


def markdown(rows: list[dict]) -> str:
    lines = ["| operation | L | D | H | dtype | B | GFLOP | one launch ms | multi-launch ms | multi / one | difference |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['operation']} | {r['length']} | {r['width']} | {r['heads']} | {r['dtype']} | {r['batch']} | "
              f"{r['flops'] / 1e9:.3g} | "
              f"{r['one_launch_ms']:.4f} | "
              f"{r['multi_launch_ms']:.4f} | {r['speedup']:.2f} | {r['max_relative_difference']:.1e} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.small_fusion", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (tests, under the interpreter)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of 5 timed calls each way")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not interpreter_mode()
    if not on_gpu and not interpreter_mode():
        raise SystemExit("bench.small_fusion needs a CUDA GPU, or TRITON_INTERPRET=1 for the smoke run")
    device = "cuda" if on_gpu else "cpu"
    shapes, batches = (SMOKE_SHAPES, SMOKE_BATCHES) if args.smoke else (SHAPES, BATCHES)
    rows = []
    for (operation, length, width, heads, dtype), batch in ((s, b) for s in shapes for b in batches):
        if dtype == "bfloat16" and not on_gpu:  # the interpreter does no bfloat16 arithmetic
            dtype = "float16"
        rows.append(measure(operation, length, width, heads, dtype, batch, 1 if args.smoke else args.repeats,
                            device))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        if args.out:  # after every row: a run stopped at its time limit keeps what it timed
            with open(args.out, "w") as fh:
                json.dump({"device": torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)",
                           "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
                           "rows": rows}, fh, indent=1)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
