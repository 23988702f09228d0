"""CuPy backend: projections as cuBLAS GEMMs (``cupy.matmul``), attention in the CUDA C kernel of
``kernels/attention_cuda.cu``, or when large as GEMMs too (``_attends_as_gemms``); the fusion itself is
``device_common.DeviceFusion`` on CuPy arrays, the code the Triton backend runs on torch tensors.

Arrays: CuPy in, CuPy out; torch CUDA tensors cross through DLPack (torch out); NumPy arrays are copied
to the GPU and back. Importing the package never imports CuPy; constructing this backend does.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from .._checks import check_no_grad, host_array, is_torch_tensor, numpy_dtype_name, transferable_host_array
from .._optional import require
from ..folding import fold_magnitudes, fold_weights
from .device_common import DeviceFoldedWeights, DeviceFusion

_COMPUTE = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float32"}

#: Attentions of at least this many scores (B x H x Lq x Lk) run as cuBLAS GEMMs around CuPy's softmax
#: (``DeviceFusion._gemm_attention``) rather than in the CUDA C kernel, whose scalar float32 arithmetic ran
#: at ~5 TFLOP/s on an H200 (W2 bfloat16: 25.5 ms, 2026-11-30 run 2). A prediction, not yet timed: the
#: route moves ~44 bytes a float32 score (its GEMM's write, the softmax's passes, the cast; ~13 ps at
#: 3.5 TB/s) where the kernel spends ~4 x D FLOPs (~50 ps at D = 64), but it launches about a dozen
#: operations a piece, which a small call (W1: 200 scores) would not repay.
GEMM_MIN_SCORES = 1 << 20


def _gpu_count(cupy) -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, or a driver without devices
        return 0


class CupyBackend(DeviceFusion):
    """Runs the fusion on a CUDA GPU with CuPy and a CUDA C kernel."""

    name = "cupy"
    dtypes = ("float64", "float32", "float16", "bfloat16")

    def __init__(self):
        self.cupy = self.xp = require("cupy", "backend 'cupy'")
        self.float32 = self.cupy.float32
        if _gpu_count(self.cupy) == 0:
            raise RuntimeError("backend 'cupy' needs a CUDA GPU, and CuPy sees none")
        from ..kernels import attention_cuda as kernel

        self.kernel = kernel

    @staticmethod
    def usable_by_auto(dtype: str | None = None) -> bool:
        # Chosen by auto only behind Triton (see KNOWN_BACKENDS), until the benchmark shows it faster.
        if sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia"):
            return False
        try:
            import cupy
        except ImportError:
            return False
        return _gpu_count(cupy) > 0

    # --- arrays -----------------------------------------------------------------------------------

    def caller_kind(self, x):
        if isinstance(x, self.cupy.ndarray):
            return ("cupy", None)
        if is_torch_tensor(x):
            return ("torch", x.device)  # results go back to the tensor's device, the CPU included
        return ("numpy", None)

    @staticmethod
    def results_on_host(kind) -> bool:
        tag, device = kind
        return tag == "numpy" or (tag == "torch" and device.type == "cpu")

    def native(self, x, name: str):
        cupy = self.cupy
        if isinstance(x, cupy.ndarray):
            return x
        if is_torch_tensor(x):
            check_no_grad(x, name)
            if x.device.type != "cuda":
                x = x.cuda()
            return cupy.from_dlpack(x)
        return cupy.asarray(transferable_host_array(x, name))

    def host(self, x, name: str) -> np.ndarray:
        if isinstance(x, self.cupy.ndarray):
            return x.get()
        if type(x).__module__.split(".")[0] == "torch":
            return x.detach().cpu().numpy()
        return host_array(x, name)

    @staticmethod
    def dtype_name(arr) -> str:
        return numpy_dtype_name(arr.dtype)

    def all_finite(self, *arrays) -> bool:
        """One read from the device (a synchronisation) for all the arrays."""
        cupy = self.cupy
        return bool(cupy.stack([cupy.isfinite(arr).all() for arr in arrays]).all())

    def largest_magnitude(self, *arrays) -> float:
        """The largest |x| over the arrays (NaN if one holds NaN, else Inf if one holds Inf), read at once
        (the Triton backend defers its read)."""
        cupy = self.cupy
        return float(cupy.stack([cupy.abs(arr).max().astype(cupy.float64) for arr in arrays]).max())

    def to_caller(self, x, kind, dtype_name: str):
        x = x.astype(dtype_name, copy=False)
        tag, device = kind
        if tag == "cupy":
            return x
        if tag == "torch":
            return sys.modules["torch"].from_dlpack(x).to(device)
        return x.get()  # not bfloat16: _checks.check_result_kind refused that before any work

    @staticmethod
    def compute_dtype(dtype_name: str) -> str:
        return _COMPUTE[dtype_name]

    @staticmethod
    def cast(x, dtype):
        return x.astype(dtype, copy=False)

    def prepare_weights(self, query, key, value, output, dtype) -> DeviceFoldedWeights:
        heads, width, _ = query.shape
        folded = fold_weights(query, key, value, output)
        on_device = self.cupy.asarray(folded.astype(np.float32)).astype(dtype)
        return DeviceFoldedWeights(heads, width, on_device, fold_magnitudes(folded, heads, width))

    # --- primitives of DeviceFusion -----------------------------------------------------------------

    @staticmethod
    def _attends_as_gemms(q, k, v) -> bool:
        """Large attentions (``GEMM_MIN_SCORES``) as GEMMs, the rest in the kernel."""
        batch, heads, len_q, _ = q.shape
        return batch * heads * len_q * k.shape[2] >= GEMM_MIN_SCORES

    def _positions(self, length: int):
        return self.cupy.arange(length)

    def _device_lengths(self, lengths):
        return self.cupy.asarray(lengths)
