"""Optional dependencies: import them on demand and name the extra that provides them."""

from __future__ import annotations

import importlib
from types import ModuleType

#: Which ``pip install 'crossattn_gpu[EXTRA]'`` brings each optional module.
EXTRA_FOR_MODULE = {
    "torch": "triton",
    "triton": "triton",
    "cupy": "cuda13",
    "onnx": "onnx",
    "onnxruntime": "onnx",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that says which extra to install.

    ``purpose`` completes the sentence "... is needed for <purpose>".
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRA_FOR_MODULE.get(module.split(".")[0], "dev")
        hint = f"pip install 'crossattn_gpu[{extra}]'"
        if extra == "cuda13":
            hint += " (or [cuda12] for a CUDA 12 driver)"
        raise ImportError(f"{module} is needed for {purpose} but is not installed: {hint}") from exc


def version_of(module: str) -> str | None:
    """The installed version of ``module``, or None when it cannot be imported."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # a broken optional install must not break `info`
        return None
    return str(getattr(mod, "__version__", "unknown"))
