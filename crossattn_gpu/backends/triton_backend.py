"""Triton backend: projections as torch GEMMs (or ``kernels/projection.py`` for TF32), attention in the
kernels of ``kernels/attention.py`` (float32 fusions without mask or key lengths over short sequences in
torch's SDPA, faster there); the fusion itself is ``device_common.DeviceFusion`` on torch tensors.

Arrays: torch tensors stay torch (results on the caller's device), CuPy arrays cross through DLPack
without a copy (results are CuPy), NumPy arrays are copied over and back. With ``TRITON_INTERPRET=1``
and no GPU, the same code runs under Triton's interpreter on torch CPU tensors (for tests; slow).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

from .._checks import check_no_grad, host_array, transferable_host_array
from .._optional import require
from ..folding import fold_magnitudes, fold_weights
from .device_common import DeviceFoldedWeights, DeviceFusion

_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float32"}


def interpreter_mode() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(DeviceFusion):
    """Runs the fusion on a CUDA GPU with Triton kernels (or under Triton's interpreter on the CPU)."""

    name = "triton"

    def __init__(self):
        self.torch = self.xp = require("torch", "backend 'triton'")
        self.float32 = self.torch.float32
        require("triton", "backend 'triton'")
        if interpreter_mode():
            self.device = self.torch.device("cpu")
            # The interpreter does no bfloat16 arithmetic.
            self.dtypes = ("float64", "float32", "float16")
        elif self.torch.cuda.is_available():
            self.device = self.torch.device("cuda", self.torch.cuda.current_device())
            self.dtypes = ("float64", "float32", "float16", "bfloat16")
        else:
            raise RuntimeError(
                "backend 'triton' needs a CUDA GPU, and torch sees none; set TRITON_INTERPRET=1 before "
                "importing crossattn_gpu to run it under Triton's interpreter on the CPU (slow, for testing)"
            )
        # Imported late: TRITON_INTERPRET is read at import.
        from ..kernels import attention as kernel
        from ..kernels import projection

        self.kernel, self.projection = kernel, projection

    @staticmethod
    def usable_by_auto() -> bool:
        """``auto`` takes Triton only on a real GPU, never under the (slow) interpreter.

        Cheap checks first, so that ``auto`` on a machine without an NVIDIA driver never imports torch.
        """
        if interpreter_mode() or (sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia")):
            return False
        try:
            import torch
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.is_available()

    # --- arrays -----------------------------------------------------------------------------------

    def caller_kind(self, x):
        torch = self.torch
        if isinstance(x, torch.Tensor):
            return ("torch", x.device)
        if type(x).__module__.split(".")[0] == "cupy":
            return ("cupy", None)
        return ("numpy", None)

    @staticmethod
    def results_on_host(kind) -> bool:
        tag, device = kind
        return tag == "numpy" or (tag == "torch" and device.type == "cpu")

    def native(self, x, name: str):
        """``x`` as a torch tensor on this backend's device (no copy for device tensors and CuPy)."""
        torch = self.torch
        if isinstance(x, torch.Tensor):
            check_no_grad(x, name)
            return x.to(self.device)
        if type(x).__module__.split(".")[0] == "cupy":
            if self.device.type != "cuda":
                raise TypeError(f"{name} is a CuPy array, but backend 'triton' runs on the CPU here (interpreter)")
            return torch.from_dlpack(x)
        arr = transferable_host_array(x, name)
        if not arr.flags.writeable:  # a read-only memmap, say, of which torch.from_numpy warns: copied instead
            return torch.tensor(arr, device=self.device)  # (on a GPU that is the one copy to it, as below)
        return torch.from_numpy(arr).to(self.device)

    def host(self, x, name: str) -> np.ndarray:
        if isinstance(x, self.torch.Tensor):
            return x.detach().cpu().numpy()
        if type(x).__module__.split(".")[0] == "cupy":
            return x.get()
        return host_array(x, name)

    @staticmethod
    def dtype_name(arr) -> str:
        return str(arr.dtype).replace("torch.", "")

    def all_finite(self, *arrays) -> bool:
        """One read from the device (a synchronisation) for all the arrays."""
        return math.isfinite(self._largest_magnitude(arrays).item())

    def largest_magnitude(self, *arrays):
        """The largest |x| over the arrays (NaN if one holds NaN, else Inf if one holds Inf), as a
        function that reads it later on a GPU.

        The device reduces the arrays now and copies the result into pinned host memory behind an event.
        The returned function waits for that event alone, not for the work queued after it, so the
        front end queues the call's GEMMs and kernels first and reads the magnitude then: the GPU no
        longer idles from the read until the host's next launch. Under the interpreter it is at hand at
        once."""
        torch = self.torch
        top = self._largest_magnitude(arrays)
        if self.device.type != "cuda":
            return top.item()
        host = torch.empty((), dtype=top.dtype, pin_memory=True)
        host.copy_(top, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(top.device))  # the stream the copy went to

        def read() -> float:
            copied.synchronize()
            return host.item()

        return read

    def _largest_magnitude(self, arrays):
        """max |x| over the arrays, on the device: one pass over each and no temporaries
        (``isfinite(x).all()`` takes several passes and launches: torch on the CPU 51 ms against 1.6 ms
        for a sum of 21M float32 values). NaN propagates through both reductions. One op per array and
        one per pair: W1's two inputs 6.8 us of host time on this project's CPU (``aminmax``, a negation,
        a maximum, a cast and a stack per array: 11.2; the sums this replaced: 3.6)."""
        torch = self.torch
        top = None
        for arr in arrays:
            norm = torch.linalg.vector_norm(arr, math.inf)
            top = norm if top is None else torch.maximum(top, norm)
        return top

    def to_caller(self, x, kind, dtype_name: str):
        x = self.cast(x, getattr(self.torch, dtype_name))
        tag, device = kind
        if tag == "torch":
            return x if x.device == device else x.to(device)
        if tag == "cupy":
            import cupy

            return cupy.from_dlpack(x.contiguous())
        return x.cpu().numpy()  # not bfloat16: _checks.check_result_kind refused that before any work

    def compute_dtype(self, dtype_name: str):
        # float64 is computed in float32 on the GPU (documented in the README's backend table).
        return getattr(self.torch, _TORCH_DTYPES[dtype_name])

    @staticmethod
    def cast(x, dtype):
        # The test first: .to() of a tensor already of that dtype takes 0.75 us of host time, the test
        # 0.07 (this project's CPU); a W1 call casts 14 times, mostly to the dtype it has.
        return x if x.dtype == dtype else x.to(dtype)

    def prepare_weights(self, query, key, value, output, dtype) -> DeviceFoldedWeights:
        heads, width, _ = query.shape
        folded = fold_weights(query, key, value, output)
        on_device = self.torch.tensor(folded, dtype=dtype, device=self.device)
        return DeviceFoldedWeights(heads, width, on_device, fold_magnitudes(folded, heads, width))

    # --- primitives of DeviceFusion -----------------------------------------------------------------

    def _attention(self, q, k, v, *, scale, masked, k_lengths, need_weights, sum_heads=False):
        """float32 heads' sums without mask, key lengths or probabilities go through torch's SDPA (the
        shared keys expanded over the heads, no copy) and a float32 sum; the rest through the kernels.

        Timed on an H200 on the fusion's own call, one direction (sweep of 2026-11-29): W2 (D = 128)
        SDPA 1.73 ms against 4.5 for the fused kernel (IEEE; tf32x3 about 2.2), W3 (D = 1280) 4.0 ms
        against 8.6 for the two-pass operator (tf32x3 4.6), with IEEE accuracy (7.5e-7). In 16 bits
        the kernels were faster on W2 and W3 (0.26 against 0.47 ms, 0.75 against 1.72). SDPA takes
        no mask with the seed's fill, hence the kernels for masks and lengths. Keys at most twice as many
        as the heads are wide (W2 and W3 are): where SDPA falls back to its math path, its (B, H, Lq, Lk)
        float32 scores then take at most twice the output's memory; longer sequences keep the kernels,
        whose memory does not grow with Lk.
        """
        if (sum_heads and q.dtype == self.float32 and masked is None and k_lengths is None and not need_weights
                and k.shape[2] <= 2 * v.shape[3]):
            keys = k.expand(-1, q.shape[1], -1, -1)
            return self.torch.nn.functional.scaled_dot_product_attention(q, keys, v, scale=scale).sum(1), None
        return super()._attention(q, k, v, scale=scale, masked=masked, k_lengths=k_lengths,
                                  need_weights=need_weights, sum_heads=sum_heads)

    def _kernel_options(self) -> dict:
        return {"precision": self.float32_precision}

    def _matmul(self, a, b):
        """cuBLAS (torch) for IEEE float32 and 16-bit projections; TF32 float32 projections in
        ``kernels/projection.py``, since cuBLAS takes TF32 only through a process-wide switch."""
        if self.float32_precision == "ieee" or a.dtype != self.torch.float32:
            return self.torch.matmul(a, b)
        return self.projection.matmul(a, b, precision=self.float32_precision)

    def _positions(self, length: int):
        return self.torch.arange(length, device=self.device)

    def _device_lengths(self, lengths):
        torch = self.torch
        if isinstance(lengths, torch.Tensor):
            return lengths.to(self.device)
        host = torch.from_numpy(np.ascontiguousarray(lengths))
        if self.device.type != "cuda":
            return host
        # From pinned memory the copy needs no synchronisation (torch waits for a pageable one).
        return host.pin_memory().to(self.device, non_blocking=True)
