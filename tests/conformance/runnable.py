"""Every (backend, dtype) pair this machine can run, for parametrising the conformance tests.

A backend may carry an option after a "+": "triton+tf32x3" is the Triton backend with
``float32_precision="tf32x3"`` (TF32 tensor cores, three products; emulated under the interpreter by
tests/tensor_cores.py), held to the same float32 rules as IEEE float32. "numpy-float16" and
"onnx-float16" store float16 and compute in float32 (as the CPU backends compute float16), held to the
float16 rules. "onnx-float16-graphs" (``ExportedFloat16Graphs``, registered here for the tests) runs
float16 in the exported float16 model's graphs.
"""

from __future__ import annotations

import numpy as np
import pytest

from crossattn_gpu import CrossAttention, backends
from crossattn_gpu.backends import backend_status
from crossattn_gpu.backends.onnx_backend import OnnxBackend


class ExportedFloat16Graphs(OnnxBackend):
    """The onnx backend computing float16 in the graphs of the exported float16 model
    (``to_onnx(dtype="float16")``: float16 GEMMs, softmax in float32), which the library's onnx backend
    leaves for float32 graphs, so that those graphs meet the drawn cases too. Registered by name, so
    that a pickled model rebuilds it."""

    name = "onnx-float16-graphs"

    def compute_dtype(self, dtype_name: str) -> np.dtype:
        return np.dtype(np.float16) if dtype_name == "float16" else super().compute_dtype(dtype_name)


backends._FACTORIES[ExportedFloat16Graphs.name] = ExportedFloat16Graphs

_STATUS = backend_status()
_CANDIDATES = [
    ("numpy", "float64"),
    ("numpy", "float32"),
    ("numpy", "float16"),
    ("triton", "float32"),
    ("triton+tf32x3", "float32"),
    ("triton", "float16"),
    ("triton", "bfloat16"),
    ("cupy", "float32"),
    ("cupy", "float16"),
    ("cupy", "bfloat16"),
    ("onnx", "float64"),
    ("onnx", "float32"),
    ("onnx", "float16"),
    ("onnx-float16-graphs", "float16"),
]


def _cupy_has_bfloat16() -> bool:
    """Whether the installed CuPy has a bfloat16 dtype (CuPy learned it late; NumPy has none)."""
    try:
        import cupy

        cupy.zeros(1, dtype=cupy.float32).astype("bfloat16")
        return True
    except Exception:
        return False


def backend_options(label: str) -> dict:
    """The CrossAttention keyword arguments of a backend label: "triton+tf32x3" -> backend="triton",
    float32_precision="tf32x3"."""
    backend, _, option = label.partition("+")
    return {"backend": backend, "float32_precision": option or "ieee"}


def _why_not(label: str, dtype: str) -> str | None:
    backend = backend_options(label)["backend"]
    status = _STATUS["onnx" if backend == ExportedFloat16Graphs.name else backend]
    if status is not None:
        return status
    if dtype == "bfloat16":  # needs torch inputs on a GPU (NumPy has no bfloat16; the interpreter none either)
        from crossattn_gpu.backends.triton_backend import interpreter_mode

        if interpreter_mode():
            return "bfloat16 needs a GPU"
        if backend == "cupy" and not _cupy_has_bfloat16():
            return "the installed CuPy has no bfloat16 dtype"
    return None


_REASONS = {(b, d): _why_not(b, d) for b, d in _CANDIDATES}
BACKENDS = [pytest.param(b, d, id=f"{b}-{d}") for (b, d), why in _REASONS.items() if why is None]
NOT_RUN = {f"{b}-{d}": why for (b, d), why in _REASONS.items() if why is not None}


def model_for(label: str, reference: CrossAttention) -> CrossAttention:
    return CrossAttention.from_weights(**reference.get_attention_weights(), **backend_options(label))


def to_backend(x, dtype: str):
    """Inputs in the dtype under test: NumPy arrays, or torch tensors for bfloat16."""
    if x is None:
        return None
    if dtype == "bfloat16":
        import torch

        return torch.tensor(np.asarray(x, dtype=np.float32), dtype=torch.bfloat16, device="cuda")
    return np.asarray(x).astype(dtype)


def as_received(x, dtype: str):
    """The float64 values of ``x`` as a backend under test receives them: rounded to ``dtype``.

    The reference (and the plain yardstick's error) is taken on these, so that the rounding of the
    inputs, which no backend can undo, is charged to nobody. Against the unrounded inputs it dominated
    near-cancelling cases and made the 2x rule a draw: D = 1, H = 1, Lq = 1, Lk = 17 in float16, whose
    output is 1.3% of its values' size, had 8.7e-3 of error from the inputs' rounding alone; plain
    NumPy and torch landed at 2.6e-3 and 1.4e-3 (their own errors happened to cancel it), the Triton
    backend at 1.43e-2, over the 9.17e-3 allowed. On the rounded inputs: Triton 5.6e-3, plain NumPy
    6.0e-3, plain torch 7.3e-3.
    """
    if x is None:
        return None
    return to_numpy(to_backend(x, dtype)).astype(np.float64)


def to_numpy(x):
    if x is None or isinstance(x, np.ndarray):
        return x
    if isinstance(x, list):
        return [to_numpy(v) for v in x]
    return x.float().cpu().numpy()  # torch
