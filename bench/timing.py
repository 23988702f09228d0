"""Timing, peak memory, and the machine's own GEMM and copy ceilings, measured in the same run."""

from __future__ import annotations

import statistics
import time
import tracemalloc

import numpy as np

from .peers import torch_or_none


def _sync(device: str) -> None:
    if device == "gpu":
        torch_or_none().cuda.synchronize()


def time_calls(run, inputs: list, device: str, repeats: int, warmup: int) -> list[float]:
    """Seconds per call, rotating through ``inputs`` so that no call finds its inputs in cache.

    On the GPU, CUDA events around each call (host launch gaps included, as a caller sees them).
    """
    for i in range(warmup):
        run(inputs[i % len(inputs)])
    _sync(device)
    times = []
    if device == "gpu":
        torch = torch_or_none()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i in range(repeats):
            start.record()
            run(inputs[i % len(inputs)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for i in range(repeats):
            begin = time.perf_counter()
            run(inputs[i % len(inputs)])
            times.append(time.perf_counter() - begin)
    return times


def peak_memory(run, pair, device: str, traced: bool) -> float | None:
    """Peak bytes allocated by one call beyond what was allocated before it; None when ``traced`` is
    False (the harness cannot see that peer's allocations).

    GPU: torch's allocator statistics (CuPy's own memory pool is not seen). CPU: tracemalloc, which
    sees NumPy's allocations but not torch's or onnxruntime's.
    """
    if not traced:
        return None
    if device == "gpu":
        torch = torch_or_none()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(pair)
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    tracemalloc.start()
    try:
        run(pair)
        return float(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


def ceilings(device: str, dtypes: list[str], repeats: int = 5) -> dict:
    """GEMM throughput (FLOP/s) per dtype and copy bandwidth (bytes/s, read + write) of this machine."""
    result = {"gemm_flops": {}, "copy_bytes_per_s": None}
    if device == "gpu":
        torch = torch_or_none()
        n = 8192
        for dtype in dtypes:
            tdtype = torch.float32 if dtype == "tf32" else getattr(torch, dtype)
            a = torch.randn(n, n, device="cuda", dtype=tdtype)
            b = torch.randn(n, n, device="cuda", dtype=tdtype)
            before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
            try:
                seconds = statistics.median(time_calls(lambda _: a @ b, [None], "gpu", repeats, 2))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before
            result["gemm_flops"][dtype] = 2 * n**3 / seconds
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        seconds = statistics.median(time_calls(lambda _: dst.copy_(src), [None], "gpu", repeats, 2))
        result["copy_bytes_per_s"] = 2 * src.numel() / seconds
        return result
    # The CPU ceiling is the best GEMM any library here reaches: BLAS kernels differ (on this
    # project's AVX-512 CPU, onnxruntime's MLAS ran float32 GEMMs 1.8x faster than NumPy's OpenBLAS).
    n = 2048
    result["gemm_by_library"] = {}
    for dtype in dtypes:
        a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
        candidates = {"numpy": lambda _: a @ a}
        torch = torch_or_none()
        if torch is not None:
            ta = torch.from_numpy(a)
            candidates["torch"] = lambda _: ta @ ta
        if dtype == "float32":
            ort_matmul = _onnxruntime_matmul(n)
            if ort_matmul is not None:
                candidates["onnxruntime"] = lambda _: ort_matmul(a)
        speeds = {lib: 2 * n**3 / statistics.median(time_calls(fn, [None], "cpu", repeats, 1)) for lib, fn in candidates.items()}
        result["gemm_by_library"][dtype] = speeds
        result["gemm_flops"][dtype] = max(speeds.values())
    src = np.ones(1 << 28, dtype=np.uint8)
    dst = np.empty_like(src)
    seconds = statistics.median(time_calls(lambda _: np.copyto(dst, src), [None], "cpu", repeats, 1))
    result["copy_bytes_per_s"] = 2 * src.nbytes / seconds
    return result


def _onnxruntime_matmul(n: int):
    """A callable a -> a @ a through onnxruntime's CPU MatMul, or None without onnx/onnxruntime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "a"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # the newest onnx writes IR versions that older onnxruntime releases refuse
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda a: session.run(None, {"a": a})
