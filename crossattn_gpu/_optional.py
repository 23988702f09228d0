"""Optional dependencies: import them on demand and name the extra that provides them."""

from __future__ import annotations

import importlib
import re
from types import ModuleType

#: Which ``pip install 'crossattn_gpu[EXTRA]'`` brings each optional module.
EXTRA_FOR_MODULE = {
    "torch": "triton",
    "triton": "triton",
    "cupy": "cuda13",
    "onnx": "onnx",
    "onnxruntime": "onnx",
}

#: The oldest release of each optional module that the library runs with, as pyproject.toml's extras
#: say (tests/test_packaging.py holds the two together): older ones fail later, naming nothing useful.
MINIMUM_VERSIONS = {"torch": "2.9", "triton": "3.5", "cupy": "13", "onnx": "1.16", "onnxruntime": "1.18"}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise an ImportError that says which extra to install where it is not
    installed or is older than ``MINIMUM_VERSIONS`` allows.

    ``purpose`` completes the sentence "... is needed for <purpose>".
    """
    extra = EXTRA_FOR_MODULE.get(module.split(".")[0], "dev")
    hint = f"pip install 'crossattn_gpu[{extra}]'"
    if extra == "cuda13":
        hint += " (or [cuda12] for a CUDA 12 driver)"
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed for {purpose} but is not installed: {hint}") from exc
    minimum = MINIMUM_VERSIONS.get(module)
    version = getattr(imported, "__version__", None)
    if minimum and isinstance(version, str) and () < release(version) < release(minimum):
        raise ImportError(f"{module} >= {minimum} is needed for {purpose}, and this is {module} {version}: "
                          f"{hint.replace('pip install', 'pip install --upgrade', 1)}")
    return imported


def release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version string: "2.9.1+cu128" -> (2, 9, 1); () where it has none."""
    numbers = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in numbers.group().split(".")) if numbers else ()


def version_of(module: str) -> str | None:
    """The installed version of ``module``, or None when it cannot be imported."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # a broken optional install must not break `info`
        return None
    return str(getattr(mod, "__version__", "unknown"))
