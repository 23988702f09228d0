"""Every (backend, dtype) pair this machine can run, for parametrising the conformance tests."""

from __future__ import annotations

import numpy as np
import pytest

from crossattn_gpu import CrossAttention
from crossattn_gpu.backends import backend_status

_STATUS = backend_status()
_CANDIDATES = [
    ("numpy", "float64"),
    ("numpy", "float32"),
    ("triton", "float32"),
    ("triton", "float16"),
    ("triton", "bfloat16"),
    ("cupy", "float32"),
    ("cupy", "float16"),
    ("onnx", "float32"),
    ("onnx", "float16"),
]


def _runnable(backend: str, dtype: str) -> bool:
    if _STATUS.get(backend) is not None:
        return False
    if dtype == "bfloat16":  # needs torch inputs on a GPU (NumPy has no bfloat16; the interpreter none either)
        from crossattn_gpu.backends.triton_backend import interpreter_mode

        return not interpreter_mode()
    return True


BACKENDS = [pytest.param(b, d, id=f"{b}-{d}") for b, d in _CANDIDATES if _runnable(b, d)]
NOT_RUN = {f"{b}-{d}": _STATUS.get(b) or "bfloat16 needs a GPU" for b, d in _CANDIDATES if not _runnable(b, d)}


def model_for(backend: str, reference: CrossAttention) -> CrossAttention:
    return CrossAttention.from_weights(**reference.get_attention_weights(), backend=backend)


def to_backend(x, dtype: str):
    """Inputs in the dtype under test: NumPy arrays, or torch tensors for bfloat16."""
    if x is None:
        return None
    if dtype == "bfloat16":
        import torch

        return torch.tensor(np.asarray(x, dtype=np.float32), dtype=torch.bfloat16, device="cuda")
    return np.asarray(x).astype(dtype)


def to_numpy(x):
    if x is None or isinstance(x, np.ndarray):
        return x
    if isinstance(x, list):
        return [to_numpy(v) for v in x]
    return x.float().cpu().numpy()  # torch
