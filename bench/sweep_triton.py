"""python -m bench.sweep_triton: the Triton kernel's launch configurations, and the stages of the fusion,
timed on the GPU workloads' attention shapes.

The fusion calls the kernel with folded queries and values (B, H, L, D), the raw inputs as keys shared
by every head (Hk = 1), and asks for the heads' sum and no lse; the sweep times exactly that call under each
candidate configuration (and with the heads summed after the kernel), after checking its result
against the float64 reference on two examples. The stages come first: one direction's projection
GEMM and kernel call, the whole ``fuse_representations`` call and what it spends beyond them, three
alternatives to the kernel (GEMMs around a softmax, torch's SDPA, and the backend's GEMM route around
``kernels/softmax_heads.py``), and for float32 the projection
and the fusion with ``float32_precision="tf32x3"``. Output: a JSON file and a table.

    python -m bench.sweep_triton --out sweep.json            # on a GPU
    python -m bench.sweep_triton --cases W3,W2:float32        # some cases only
    TRITON_INTERPRET=1 python -m bench.sweep_triton --smoke  # tiny shapes under the interpreter (tests)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import numpy as np
import torch

from crossattn_gpu.backends.numpy_backend import attention as reference
from crossattn_gpu.kernels import attention_two_pass as two_pass
from crossattn_gpu.kernels import projection
from crossattn_gpu.kernels.attention import attention, launch_config

KERNELS = {"fused": attention, "two_pass": two_pass.attention_two_pass}

# (name, B, H, L, D, dtype): the attention of W2, W3 and W4 (Lq = Lk = L) as the fusion launches it.
# Untuned first: a call stopped at its time limit keeps what matters most. Last, two shapes between W2 and
# W4 for the bounds of the 16-bit SDPA route (``TritonBackend._sdpa_shapes``: heads wider than 128, at
# least ``sdpa_16bit_min_length`` long): their stages time the kernel against SDPA on the same inputs.
CASES = [
    ("W3", 64, 8, 256, 1280, "bfloat16"),
    ("W3", 64, 8, 256, 1280, "float32"),
    ("W2", 512, 4, 256, 128, "bfloat16"),
    ("W4", 4, 4, 4096, 256, "bfloat16"),
    ("W2", 512, 4, 256, 128, "float32"),
    ("W4-1k", 16, 4, 1024, 256, "bfloat16"),
    ("W4-D128", 4, 4, 4096, 128, "bfloat16"),
]
SMOKE_CASES = [("tiny", 2, 2, 40, 24, "float32"), ("tiny-wide", 1, 2, 20, 300, "float16")]


# (BLOCK_M, BLOCK_N, num_warps, num_stages) around the default: the best of the first sweep
# (bench/results/2026-11-28-nvidia-h200-sweep.md) and shapes for heads 256 wide; and W2's default with two
# stages, whose 80 KiB of shared memory leave room for two blocks per SM where three stages' 112 leave one
# (bfloat16, as launched: bench/NOTES.md, 2026-11-30 seventh session).
VARIANTS = [(128, 32, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3), (64, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 3),
            (64, 64, 4, 2)]
# The fused kernel's TMA loads (``_attention_fwd_tma``: whole tiles of 16-bit heads in one chunk, no mask or
# lengths; not yet any launch's default), as (BLOCK_M, BLOCK_N, num_warps, num_stages, warp-specialised),
# per head width up to 128 and up to 256: the tiles that fit an H200's 227 KiB of shared memory, compiled
# as launched (bench/NOTES.md, 2026-12-01). The pointer kernel's default first, loaded by TMA.
TMA_VARIANTS = {128: [(64, 64, 4, 3, False), (64, 64, 4, 3, True), (64, 64, 4, 2, True), (128, 64, 8, 2, False),
                      (128, 64, 8, 3, False), (128, 128, 8, 2, False)],
                256: [(128, 64, 8, 2, False), (64, 64, 4, 3, False), (64, 64, 4, 2, True)]}
# The two-pass operator's (BLOCK_M, BLOCK_N, BLOCK_DV, num_warps, num_stages) around its default (timed
# on W3: bench/results/2026-11-29-nvidia-h200-sweep-*.md): wider and narrower tiles, other stages, fewer
# warps.
TWO_PASS_VARIANTS = [(128, 128, 128, 8, 2), (64, 64, 64, 8, 2), (128, 64, 128, 8, 3), (128, 64, 128, 8, 2),
                     (128, 64, 64, 8, 2), (64, 64, 128, 8, 2), (128, 64, 128, 4, 2)]


# The projection GEMM's other (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) that spill no registers in
# tf32x3 on sm_90 (W2's projection compiled as launched, as tests/kernels/compile_triton_variants.py does:
# 128 x 128 at 4 warps spills 1316 bytes, 128 x 256 and 256 x 128 at 8 warps 1020 and 1284); its default
# is 128 x 64 x 32 at 4 warps, 4 stages (231 registers).
PROJECTION_VARIANTS = [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)]


def candidates(length: int, width: int, dtype: torch.dtype) -> list[tuple[str, dict, bool]]:
    """(kernel, config, sum_heads) triples, the launcher's own choice first, with the heads summed in
    the kernel (as the fusion calls it). Then the fused kernel's default, the same with the heads
    written and summed after, its TMA loads where they apply, the two-pass operator's variants where it
    is the choice, float32 on tensor cores (three TF32 products, and one), then the fused kernel's block
    variants."""
    fused = launch_config(length, length, width, width, dtype.itemsize)
    found = [("fused", fused, True), ("fused", fused, False)]
    if dtype.itemsize == 2 and fused["BLOCK_DK"] == width:  # one whole chunk: TMA loads can take it
        for block_m, block_n, warps, stages, specialised in TMA_VARIANTS[128 if width <= 128 else 256]:
            if length % block_m == 0 and length % block_n == 0:
                found.append(("fused", {**fused, "BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps,
                                        "num_stages": stages, "TMA": True, "WARP_SPECIALIZE": specialised}, True))
    if two_pass.preferred(length, length, width, width, dtype.itemsize):
        base = two_pass.launch_config(length, length, width, width, dtype.itemsize)
        found.insert(0, ("two_pass", base, True))
        if dtype == torch.float32:
            tf32x3 = two_pass.launch_config(length, length, width, width, dtype.itemsize, precision="tf32x3")
            found.insert(1, ("two_pass", tf32x3, True))
        for block_m, block_n, block_dv, warps, stages in TWO_PASS_VARIANTS:
            config = {**base, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_DV": block_dv, "num_warps": warps,
                      "num_stages": stages}
            if ("two_pass", config, True) not in found:
                found.append(("two_pass", config, True))
    if dtype == torch.float32:
        found += [("fused", {**fused, "INPUT_PRECISION": precision}, True) for precision in ("tf32x3", "tf32")]
        # The fewest register spills on sm_90 for float32 at D = 128 in either precision (W2 compiled as
        # launched: 4 bytes a thread in tf32x3, against 92 at the default 64 x 64, 4 warps, 3 stages, and 488
        # in IEEE).
        low_spill = {**fused, "BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "INPUT_PRECISION": "tf32x3"}
        found.append(("fused", low_spill, True))
        if width <= 128:  # one 128-wide chunk: the accumulator and the heads' sum in registers (320 bytes spilled)
            found.append(("fused", {**low_spill, "BLOCK_DK": 128, "BLOCK_DV": 128}, True))
    # The block variants, in IEEE (or 16 bits), then for float32 in tf32x3 too.
    precisions = (fused["INPUT_PRECISION"], "tf32x3") if dtype == torch.float32 else (fused["INPUT_PRECISION"],)
    for precision, (block_m, block_n, warps, stages) in itertools.product(precisions, VARIANTS):
        config = {**fused, "BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages,
                  "INPUT_PRECISION": precision}
        if ("fused", config, True) not in found:
            found.append(("fused", config, True))
    return found


def seconds(fn) -> float:
    """Median seconds of fn(): CUDA events through triton.testing.do_bench on a GPU, else one host-timed call."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def fusion_inputs(batch, heads, length, width, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, heads, length, width, generator=gen).to(device=device, dtype=dtype)
    keys = torch.randn(batch, 1, length, width, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(batch, heads, length, width, generator=gen).to(device=device, dtype=dtype)
    return q, keys, v


CHECKED = slice(0, 2)  # the examples whose results are checked against float64


def reference_head_sum(q, k, v, scale) -> np.ndarray:
    """The float64 reference of the heads' sum for the checked examples."""
    want, _, _ = reference(*(t[CHECKED].double().cpu().numpy() for t in (q, k, v)), scale=scale)
    return want.sum(1)


def relative_error(head_sum, want) -> float:
    """Relative max error of the checked examples of ``head_sum`` against ``want``."""
    got = head_sum[CHECKED].double().cpu().numpy()
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - want).max() / np.abs(want).max())


def checked_error(head_sum, q, k, v, scale) -> float:
    return relative_error(head_sum, reference_head_sum(q, k, v, scale))


def sweep_case(name, batch, heads, length, width, dtype_name, device, max_configs, precision=None) -> list[dict]:
    """The fusion's kernel call (heads summed, output in the inputs' dtype) under each candidate (those
    whose dots run in ``precision`` only, when given)."""
    dtype = getattr(torch, dtype_name)
    q, k, v = fusion_inputs(batch, heads, length, width, dtype, device)
    scale = width**-0.5
    want = reference_head_sum(q, k, v, scale)  # once: every candidate computes the same function
    rows = []
    chosen = candidates(length, width, dtype)
    default = chosen[0]
    if precision is not None:
        chosen = [c for c in chosen if c[1]["INPUT_PRECISION"] == precision]
    for kernel, config, sum_heads in chosen[:max_configs]:
        row = {"case": name, "dtype": dtype_name, "B": batch, "H": heads, "L": length, "D": width,
               "kernel": kernel, "config": config, "sum_heads": sum_heads,
               "is_default": (kernel, config, sum_heads) == default}

        def call():
            return KERNELS[kernel](q, k, v, scale=scale, sum_heads=sum_heads, config=config, need_lse=False)[0]

        try:
            out = call()
            row["rel_error"] = relative_error(out if sum_heads else out.float().sum(1), want)
            row["median_s"] = seconds(call if sum_heads else lambda: call().float().sum(1).to(dtype))
        except Exception as exc:  # a configuration that does not compile (shared memory) is recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def stages(name, batch, heads, length, width, dtype_name, device) -> dict:
    """One direction's parts and the whole fusion (both directions), timed separately."""
    from crossattn_gpu import CrossAttention

    dtype = getattr(torch, dtype_name)
    model = CrossAttention(width, heads, seed=0, backend="triton")
    gen = torch.Generator(device="cpu").manual_seed(1)
    xs = torch.randn(batch, length, width, generator=gen).to(device=device, dtype=dtype)
    xt = torch.randn(batch, length, width, generator=gen).to(device=device, dtype=dtype)
    folded = torch.randn(width, 2 * heads * width, generator=gen).to(device=device, dtype=dtype) * width**-0.5
    q, k, v = fusion_inputs(batch, heads, length, width, dtype, device)
    result = {
        "case": name, "dtype": dtype_name,
        "projection_gemm_s": seconds(lambda: xs.reshape(-1, width) @ folded),
        "kernel_s": seconds(lambda: attention(q, k, v, scale=1.0, sum_heads=True, need_lse=False)),
        "fusion_both_directions_s": seconds(
            lambda: model.fuse_representations(xs, xt, need_similarity=False, bidirectional=False)),
    }
    # What the two directions' GEMMs and kernels leave: validation, casts, launches.
    result["rest_s"] = result["fusion_both_directions_s"] - 2 * (result["projection_gemm_s"] + result["kernel_s"])
    if dtype == torch.float32:  # the same on TF32 tensor cores, three products (float32_precision="tf32x3")
        rows = xs.reshape(-1, width)
        want = rows[:256].double() @ folded.double()
        tf32x3 = projection.matmul(rows, folded, precision="tf32x3")
        result["projection_tf32x3_rel_error"] = float((tf32x3[:256] - want).abs().max() / want.abs().max())
        result["projection_tf32x3_s"] = seconds(lambda: projection.matmul(rows, folded, precision="tf32x3"))
        for tiles in PROJECTION_VARIANTS:  # the launcher's choice is timed above
            config = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), tiles), GROUP_M=8)
            result[f"projection_tf32x3_{'x'.join(map(str, tiles))}_s"] = seconds(
                lambda: projection.matmul(rows, folded, precision="tf32x3", config=config))
        fast = CrossAttention(width, heads, seed=0, backend="triton", float32_precision="tf32x3")
        result["fusion_tf32x3_s"] = seconds(
            lambda: fast.fuse_representations(xs, xt, need_similarity=False, bidirectional=False))
    # The unfused alternative for the kernel's work, timed and checked the same way.
    scale = width**-0.5
    result["unfused_rel_error"] = checked_error(unfused_head_sum(q, k, v, scale), q, k, v, scale)
    result["unfused_s"] = seconds(lambda: unfused_head_sum(q, k, v, scale))
    # torch's own attention kernels (flash / cuDNN / memory-efficient, as SDPA picks) on the same
    # folded inputs: what routing the unmasked call through SDPA would give.
    result["sdpa_rel_error"] = checked_error(sdpa_head_sum(q, k, v, scale), q, k, v, scale)
    result["sdpa_s"] = seconds(lambda: sdpa_head_sum(q, k, v, scale))
    # Two GEMMs around kernels/softmax_heads.py (TritonBackend._gemm_head_sum), on the same inputs laid
    # out (B, L, H, D) as the fusion's projections leave them where it routes wide heads there.
    q_rows, v_rows = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, v))
    gemm = model._backend._gemm_head_sum
    result["gemm_rel_error"] = checked_error(gemm(q_rows, k, v_rows, scale), q, k, v, scale)
    result["gemm_s"] = seconds(lambda: gemm(q_rows, k, v_rows, scale))
    print(json.dumps(result), flush=True)
    return result


def unfused_head_sum(q, k, v, scale):
    """The kernel's work as cuBLAS GEMMs around a softmax, scores materialised: (B, H, Lq, Lk) is small
    when sequences are short, whatever the head width. A candidate for wide heads (W3: D = 1280, where
    the chunked kernel runs at 78 TFLOP/s); timed here before any backend would use it."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).float().sum(1).to(q.dtype)


def sdpa_head_sum(q, k, v, scale):
    """The kernel's work (no mask, no lengths) through ``torch.nn.functional.scaled_dot_product_attention``,
    the raw keys expanded over the heads, the heads summed in float32 after."""
    keys = k.expand(-1, q.shape[1], -1, -1)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, v, scale=scale)
    return out.float().sum(1).to(q.dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_triton", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and two configurations (interpreter tests)")
    parser.add_argument("--max-configs", type=int, default=16)
    parser.add_argument("--cases", help="comma-separated NAME or NAME:dtype (e.g. W3,W2:float32); default all")
    parser.add_argument("--precision", choices=("ieee", "tf32x3", "tf32"),
                        help="only the configurations whose dots run in this precision (float32 cases)")
    parser.add_argument("--no-stages", action="store_true", help="the launch configurations only")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = SMOKE_CASES if args.smoke else CASES
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if c[0] in wanted or f"{c[0]}:{c[5]}" in wanted]
        if not cases:
            parser.error(f"--cases {args.cases} matches none of {', '.join(f'{c[0]}:{c[5]}' for c in CASES)}")
    max_configs = 3 if args.smoke else args.max_configs
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)",
              "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
              "configs": [], "stages": []}
    try:
        if not (args.smoke or args.no_stages):  # first: the stages are what a short call must not lose
            for case in cases:
                result["stages"].append(stages(*case, device))
        for case in cases:
            result["configs"] += sweep_case(*case, device, max_configs, args.precision)
    except KeyboardInterrupt:  # a time limit's SIGINT (bench/gpu_session.sh): write what was timed
        result["interrupted"] = True
        print("interrupted: writing the stages and cases finished", file=sys.stderr, flush=True)
    print(markdown(result["configs"]))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    errors = [r for r in result["configs"] if r.get("rel_error", 0) > 2e-2]
    return 1 if errors else 130 if result.get("interrupted") else 0


def markdown(rows: list[dict]) -> str:
    """Per case: the default (heads summed in the kernel), the fused kernel's default, the same with the
    heads summed after, and the best."""
    lines = ["| case | dtype | default ms | fused default ms | fused, heads summed after ms | best ms | best config |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for (name, dtype), group in itertools.groupby(rows, key=lambda r: (r["case"], r["dtype"])):
        timed = [r for r in group if "median_s" in r and r["rel_error"] <= 2e-2]
        if not timed:
            lines.append(f"| {name} | {dtype} | - | - | - | - | none ran |")
            continue
        default = next((r["median_s"] * 1e3 for r in timed if r["is_default"]), float("nan"))
        fused = next((r["median_s"] * 1e3 for r in timed if r["kernel"] == "fused"), float("nan"))
        after = next((r["median_s"] * 1e3 for r in timed if not r["sum_heads"]), float("nan"))
        best = min(timed, key=lambda r: r["median_s"])
        keys = ("BLOCK_M", "BLOCK_N", "BLOCK_DK", "BLOCK_DV", "num_warps", "num_stages", "INPUT_PRECISION")
        short = f"{best['kernel']}: " + ", ".join(f"{k}={best['config'][k]}" for k in keys)
        short += "".join(f", {k}" for k in ("TMA", "WARP_SPECIALIZE") if best["config"].get(k))
        short += f", sum_heads={best['sum_heads']}"
        lines.append(f"| {name} | {dtype} | {default:.3f} | {fused:.3f} | {after:.3f} | "
                     f"{best['median_s'] * 1e3:.3f} | {short} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
