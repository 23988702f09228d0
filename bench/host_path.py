"""TRITON_INTERPRET=1 python -m bench.host_path: the host's share of one small fusion call, on any CPU.

W1 (the seed's demo: L = 10, D = 64, H = 2) is bound by the host on a GPU: its kernels take
microseconds, and the call's time is Python, torch's operator dispatch and the Triton launches. This
times the Triton backend's ``fuse_representations`` on torch CPU tensors with every Triton kernel launch
replaced by a no-op, so what remains is the host path a GPU call also takes (the front end's checks,
the projections' GEMMs, which are tiny here, and the launchers' own Python), without a GPU. Triton's
own launch and CUDA's are not in it. Medians of many calls, with the NumPy backend's whole W1 call
(which computes everything) beside it for scale, and the seed's ``multi_head_attention`` on W1's inputs
(queries the sequential ones, keys and values the structural ones) and its
``scaled_dot_product_attention`` through the same host path, torch's SDPA (a launch on a GPU, which
computes on the CPU) answering with an empty result of its shape.

A large call is bound by its kernels, but the GPU idles from the call's start until its first launch,
and a harness that waits for each call sees that wait whole. ``w2_until_first_launch_us`` times it:
a W2-shaped fusion (float16, since the interpreter has no bfloat16; device inputs, no lengths, so
nothing is queued before the projection GEMM), from the call to its first GEMM or Triton launch, after
one whole call of that layout (its launches no-ops), as in a harness's repeated calls: the model keeps
what that call settled from the inputs' layout (``CrossAttention._plan``).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import statistics
import time

import numpy as np
import torch
from triton.runtime.interpreter import InterpretedFunction

from crossattn_gpu import CrossAttention
from crossattn_gpu.backends.triton_backend import TritonBackend, interpreter_mode

from .timing import time_calls
from .workloads import WORKLOADS


def median_us(fn, calls: int) -> float:
    return statistics.median(time_calls(lambda _: fn(), [None], "cpu", repeats=calls, warmup=0)) * 1e6


@functools.cache
def no_launch(kernel: InterpretedFunction):
    """A launch of ``kernel`` that runs nothing, except that the inputs' magnitudes the one-launch kernels
    would write (their ``Magnitudes``), or kernels/magnitude.py its ``Partials``, are set to 0, a finite
    value the front end's check reads. One per kernel: its parameters are looked up once, not in the
    timed calls."""
    names = list(inspect.signature(kernel.fn).parameters)
    partials = names.index("Partials") if "Partials" in names else None

    def launch(*args, STORE_MAGNITUDE=False, **kwargs) -> None:
        if STORE_MAGNITUDE:
            args[names.index("Magnitudes")].zero_()
        if partials is not None:
            args[partials].zero_()

    return launch


class _FirstLaunch(Exception):
    """Raised by the first launch of a call timed up to it, with the time of that launch."""

    def __init__(self):
        super().__init__()
        self.at = time.perf_counter()


def _stop(*args, **kwargs):
    raise _FirstLaunch


def no_sdpa(q, k, v, **kwargs):
    """torch's SDPA answered with an empty result of its shape: a launch that computes nothing."""
    return torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)


def until_first_launch_us(fn, calls: int) -> float:
    """Median microseconds from calling ``fn`` to its first projection GEMM or Triton launch (each raises)."""
    original = TritonBackend._matmul, InterpretedFunction.__getitem__
    TritonBackend._matmul, InterpretedFunction.__getitem__ = _stop, lambda self, grid: _stop

    def one() -> float:
        start = time.perf_counter()
        try:
            fn()
        except _FirstLaunch as launch:
            return launch.at - start
        raise RuntimeError("the call launched nothing")

    try:
        return statistics.median(one() for _ in range(calls)) * 1e6
    finally:
        TritonBackend._matmul, InterpretedFunction.__getitem__ = original


def _inputs(name: str, dtype=np.float32) -> list:
    workload = WORKLOADS[name]
    rng = np.random.default_rng(0)
    shape = (workload.batch, workload.len_s, workload.width)
    return [rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False) for _ in range(2)]


def measure(calls: int) -> dict:
    """Median microseconds of one W1 call (the NumPy backend's, and the Triton backend's host path), of a
    ``multi_head_attention`` and a ``scaled_dot_product_attention`` on its inputs (the host paths), and of a
    W2-shaped call's host time before its first launch (``calls // 10`` of those)."""
    if not interpreter_mode():
        raise RuntimeError("bench.host_path needs TRITON_INTERPRET=1, set before the kernels are imported")
    w1, w2 = WORKLOADS["W1"], WORKLOADS["W2"]
    xs, xt = _inputs("W1")
    kwargs = dict(need_similarity=False, bidirectional=False)
    numpy_model = CrossAttention(w1.width, w1.heads, seed=0, backend="numpy")
    triton_model = CrossAttention(w1.width, w1.heads, seed=0, backend="triton")
    ts, tt = torch.from_numpy(xs), torch.from_numpy(xt)
    results = {"numpy_w1_us": median_us(lambda: numpy_model.fuse_representations(xs, xt, **kwargs), calls)}
    large_model = CrossAttention(w2.width, w2.heads, seed=0, backend="triton")
    large = [torch.from_numpy(x) for x in _inputs("W2", np.float16)]
    original, sdpa = InterpretedFunction.__getitem__, torch.nn.functional.scaled_dot_product_attention
    InterpretedFunction.__getitem__ = lambda self, grid: no_launch(self)  # launches do nothing
    try:
        results["triton_host_path_us"] = median_us(lambda: triton_model.fuse_representations(ts, tt, **kwargs), calls)
        results["triton_attention_host_path_us"] = median_us(
            lambda: triton_model.multi_head_attention(ts, tt, tt, need_weights=False), calls)
        torch.nn.functional.scaled_dot_product_attention = no_sdpa
        results["triton_sdpa_host_path_us"] = median_us(
            lambda: triton_model.scaled_dot_product_attention(ts, tt, tt, need_weights=False), calls)
        torch.nn.functional.scaled_dot_product_attention = sdpa
        large_model.fuse_representations(*large, need_similarity=False)  # the layout's first call, whole
    finally:
        InterpretedFunction.__getitem__ = original
        torch.nn.functional.scaled_dot_product_attention = sdpa
    results["w2_until_first_launch_us"] = until_first_launch_us(
        lambda: large_model.fuse_representations(*large, need_similarity=False), max(1, calls // 10))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_path", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per median")
    parser.add_argument("--repeats", type=int, default=3, help="medians taken; the median of them is printed")
    args = parser.parse_args(argv)
    runs = [measure(args.calls) for _ in range(args.repeats)]
    for key in runs[0]:
        print(f"{key}: {statistics.median(r[key] for r in runs):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
