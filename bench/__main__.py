"""python -m bench: every backend and its peers on fixed workloads, checked, with ceilings.

    python -m bench                         # the CPU set (W1, W2c, W3c), or the GPU set on a GPU
    python -m bench --workloads W2c --peers numpy,sdpa --dtypes float32 --repeats 20

Every timed output is checked against the float64 NumPy reference first: a wrong result is marked
WRONG and the run exits 1, so a fast wrong answer never wins.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from crossattn_gpu import CrossAttention, __version__
from crossattn_gpu._blas import blas_libraries, cpu_fields
from crossattn_gpu._optional import version_of

from . import report as reporting
from .peers import all_peers, gpu_available
from .timing import ceilings, peak_memory, time_calls
from .workloads import DEFAULT_CPU, DEFAULT_GPU, WORKLOADS

#: Largest accepted error against float64, relative to the largest reference value, by dtype; a
#: result within twice the error of the most accurate torch peer in the same dtype passes too (the
#: project's rule for half precision: a D = 1280 fusion in bfloat16 is off by ~5e-2 in plain torch).
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "tf32x3": 1e-4, "tf32": 1e-2, "float16": 1e-2, "bfloat16": 5e-2}
#: The torch dtype a row is compared with ('vs SDPA'): tf32x3 rows (float32 inputs, three TF32
#: products, float32's accuracy) with IEEE float32 SDPA.
SDPA_DTYPE = {"tf32x3": "float32"}
ROTATION_BYTES = 256 << 20  # rotate through at least this many input bytes (beyond any cache)


#: Environment variables that change the peers' speed (BLAS kernels and threads, OpenBLAS's spinning
#: threads, OpenMP's), recorded with every run that sets them.
SPEED_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                   "OMP_WAIT_POLICY", "MKL_NUM_THREADS")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name as Linux reports it, else what ``platform`` knows ("x86_64"). The project's
    2-vCPU VMs have been AMD EPYC and Intel Xeon machines, on which the peers' GEMM libraries rank
    differently (onnxruntime's float32 GEMM: 478 GFLOP/s on the AMD, 161-176 on the Intel, where NumPy's
    OpenBLAS took 189-212): a run's figures are comparable only with runs on the same model."""
    fields = cpu_fields(cpuinfo)
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    # A VM's model name can be as vague as "Intel(R) Xeon(R) Processor"; family and model number say which.
    numbers = [f"{key} {fields[key]}" for key in ("cpu family", "model") if key in fields]
    return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")


def numpy_blas() -> str | None:
    """NumPy's BLAS and the kernels it chose for this CPU, as threadpoolctl reports them (None without
    threadpoolctl): OpenBLAS picks its kernels when it loads, per CPU and per OPENBLAS_CORETYPE."""
    found = [f"{lib['internal_api']} {lib.get('version') or ''} ({lib.get('architecture') or 'kernels unknown'})"
             for lib in blas_libraries() if "numpy" in lib.get("filepath", "")]
    return "; ".join(found) or None


def machine(device: str) -> dict:
    cores = os.cpu_count()
    environment = {name: os.environ[name] for name in SPEED_VARIABLES if name in os.environ}
    cpu = cpu_model()
    if device == "gpu":
        import torch

        name = torch.cuda.get_device_name(0)
        return {"device_name": name, "description": f"{name}, host {cpu} with {cores} cores", "environment": environment}
    blas = numpy_blas()
    return {"device_name": f"CPU ({cores} cores)", "environment": environment,
            "description": f"{cpu}, {cores} cores, Python {platform.python_version()}"
                           + (f", NumPy's BLAS {blas}" if blas else "")}


def valid_rows_error(got, want, lengths) -> float:
    """Relative max error over the rows that are not padding."""
    err = 0.0
    for g, w, n in zip(got, want, lengths):
        err = max(err, float(np.abs(g[:n] - w[:n]).max()))
    scale = max(float(np.abs(w).max()) for w in want)
    return err / scale if math.isfinite(err) else math.inf


def gemm_ceiling(ceil: dict, dtype: str) -> float:
    """The GEMM FLOP/s a row's arithmetic can reach: tf32x3 does three TF32 products per product."""
    flops = ceil["gemm_flops"]
    if dtype == "tf32x3" and "tf32" in flops:
        return flops["tf32"] / 3
    return flops.get(dtype) or flops["float32"]


ROUNDS = 5  # timed calls are spread over this many round-robin rounds


def run_workload(workload, peers, dtypes, device, repeats, budget_s, ceil, log) -> list[dict]:
    """Time every (peer, dtype) on one workload, round-robin, so that drift in the machine's speed
    (a shared VM's neighbours, clocks) hits every peer alike rather than whichever ran last."""
    model = CrossAttention(workload.width, workload.heads, seed=0, backend="numpy")
    pair_bytes = 2 * workload.batch * (workload.len_s + workload.len_t) * workload.width * 8
    pairs = workload.inputs(copies=max(1, min(32, math.ceil(ROTATION_BYTES / pair_bytes))))
    lengths = workload.lengths()
    ref_kwargs = {} if lengths is None else {"sequential_lengths": lengths[0], "structural_lengths": lengths[1]}
    want = model.fuse_representations(*pairs[0], need_similarity=False, bidirectional=False, **ref_kwargs)
    want = (want["fused_sequential"], want["fused_structural"])
    row_lengths = lengths or (np.full(workload.batch, workload.len_s), np.full(workload.batch, workload.len_t))

    rows, entries = [], []
    for peer in peers:
        if peer.device != device:
            continue
        reason = peer.unavailable()
        for dtype in [d for d in dtypes if d in peer.dtypes]:
            base = {"workload": workload.name, "peer": peer.name, "device": device, "dtype": dtype}
            if reason:
                rows.append({**base, "skipped": True, "reason": reason})
                continue
            prepared = peer.prepare(model, workload, pairs, dtype)
            with prepared.context():
                start = time.perf_counter()
                got = prepared.fused(prepared.run(prepared.inputs[0]))  # warm-up, compile, and the result to check
                one = time.perf_counter() - start
                # Allocations the harness can see: NumPy's on the CPU, torch's on the GPU (not CuPy's pool).
                visible = ("seed", "crossattn_gpu numpy") if device == "cpu" else ("torch", "crossattn_gpu triton")
                peak = peak_memory(prepared.run, prepared.inputs[0], device, traced=peer.name.startswith(visible))
            error = max(valid_rows_error(g, w, n) for g, w, n in zip(got, want, row_lengths))
            calls = max(ROUNDS, min(repeats, int(budget_s / max(one, 1e-6))))
            entries.append({"row": {**base, "peak_bytes": peak, "rel_error": error},
                            "prepared": prepared, "per_round": math.ceil(calls / ROUNDS), "times": []})
    best_torch = {}  # dtype -> the smallest error of a torch peer
    for row in (e["row"] for e in entries if e["row"]["peer"].startswith("torch")):
        best_torch[row["dtype"]] = min(row["rel_error"], best_torch.get(row["dtype"], math.inf))
    for row in (e["row"] for e in entries):
        row["allowed_error"] = max(TOLERANCE[row["dtype"]], 2 * best_torch.get(row["dtype"], 0.0))
        row["ok"] = row["rel_error"] <= row["allowed_error"]

    for _ in range(ROUNDS):
        for entry in entries:
            prepared = entry["prepared"]
            with prepared.context():
                entry["times"] += time_calls(prepared.run, prepared.inputs, device, entry["per_round"], warmup=1)

    flops = workload.flops()
    for entry in entries:
        row, times = entry["row"], entry["times"]
        median = statistics.median(times)
        itemsize = {"float64": 8, "float32": 4, "tf32": 4, "tf32x3": 4}.get(row["dtype"], 2)
        gemm = gemm_ceiling(ceil, row["dtype"])
        bound = max(flops / gemm, workload.io_bytes(itemsize) / ceil["copy_bytes_per_s"])
        row.update(median_s=median, min_s=min(times), repeats=len(times), tflops=flops / median / 1e12,
                   roofline_fraction=bound / median)
        rows.append(row)
        log(f"{workload.name:4s} {row['peer']:40s} {row['dtype']:8s} {median * 1e3:10.3f} ms  err {row['rel_error']:.1e}"
            f"{'' if row['ok'] else '  WRONG'}")
    for row in rows:
        if row.get("skipped"):
            continue
        torch_row = next((r for r in rows if not r.get("skipped") and r["peer"].startswith("torch batched")
                          and r["dtype"] == SDPA_DTYPE.get(row["dtype"], row["dtype"])), None)
        row["speedup_vs_sdpa"] = None if torch_row is None else torch_row["median_s"] / row["median_s"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--workloads", help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--peers", help="comma-separated substrings of peer names (e.g. numpy,sdpa,seed)")
    parser.add_argument("--dtypes", help="comma-separated (default: float64,float32 on CPU; float32,tf32x3,tf32,bfloat16 "
                        "on GPU; tf32x3 is float32 with three TF32 products, this library's float32_precision)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per peer at most (default 20)")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of timed calls per peer at most")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    device = ("gpu" if gpu_available() else "cpu") if args.device == "auto" else args.device
    if device == "gpu" and not gpu_available():
        parser.error("--device gpu: no CUDA GPU visible to torch")
    names = args.workloads.split(",") if args.workloads else list(DEFAULT_GPU if device == "gpu" else DEFAULT_CPU)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    dtypes = args.dtypes.split(",") if args.dtypes else (
        ["float32", "tf32x3", "tf32", "bfloat16"] if device == "gpu" else ["float64", "float32"])
    peers = all_peers()
    if args.peers:
        wanted = args.peers.split(",")
        peers = [p for p in peers if any(w in p.name for w in wanted)]

    # tf32x3's ceiling is derived from tf32's (gemm_ceiling).
    measured = [d for d in dtypes if d not in ("float16", "tf32x3")]
    if "tf32x3" in dtypes and "tf32" not in measured:
        measured.append("tf32")
    ceil = ceilings(device, measured)
    rows, done = [], []
    try:
        for name in names:
            rows += run_workload(WORKLOADS[name], peers, dtypes, device, args.repeats, args.budget, ceil,
                                 lambda line: print(line, flush=True))
            done.append(name)
    except KeyboardInterrupt:  # a time limit's SIGINT (bench/gpu_session.sh): report the workloads finished
        print(f"interrupted: reporting {', '.join(done) or 'no workload'}", file=sys.stderr, flush=True)
        if not done:
            return 130
    info = machine(device)
    result = {
        "date": date.today().isoformat(),
        "machine": info,
        "versions": {"crossattn_gpu": __version__, "python": platform.python_version(),
                     **{m: version_of(m) for m in ("numpy", "torch", "triton", "cupy", "onnxruntime")}},
        "ceilings": ceil,
        "workloads": {n: vars(WORKLOADS[n]) | {"flops": WORKLOADS[n].flops()} for n in done},
        "rows": rows,
    }
    slug = info["device_name"].lower().replace("(", "").replace(")", "").replace(" ", "-")
    written = reporting.write(result, Path(args.out_dir), f"{result['date']}-{slug}")
    print(reporting.markdown(result))
    print("wrote " + ", ".join(map(str, written)))
    wrong = [f"{r['workload']} {r['peer']} {r['dtype']}" for r in rows if not r.get("skipped") and not r["ok"]]
    if wrong:
        print("WRONG results (failing the run): " + "; ".join(wrong), file=sys.stderr)
        return 1
    return 0 if done == names else 130


if __name__ == "__main__":
    raise SystemExit(main())
