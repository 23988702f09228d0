"""Backend registry: which backends exist, which are available here, and which ``auto`` picks."""

from __future__ import annotations

import logging

from ..kernels.contract import FLOAT32_PRECISIONS
from .cupy_backend import CupyBackend
from .numpy_backend import NumpyBackend
from .onnx_backend import OnnxBackend
from .triton_backend import TritonBackend

logger = logging.getLogger("crossattn_gpu")

#: Every backend the library knows, fastest first: ``auto`` takes the first one usable here for the
#: model's dtype (onnx when its extra is installed, but not always for float64: see
#: ``OnnxBackend.usable_by_auto``; numpy always).
_FACTORIES = {"triton": TritonBackend, "cupy": CupyBackend, "onnx": OnnxBackend, "numpy": NumpyBackend}
KNOWN_BACKENDS = tuple(_FACTORIES)


def backend_status() -> dict[str, str | None]:
    """For each known backend, None when it is available here, else the reason it is not."""
    status = {}
    for name in KNOWN_BACKENDS:
        try:
            _FACTORIES[name]()
            status[name] = None
        except (ImportError, RuntimeError) as exc:
            status[name] = str(exc)
    return status


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, fastest first."""
    return [name for name, reason in backend_status().items() if reason is None]


def get_backend(name: str, *, float32_precision: str = "ieee", dtype: str | None = None):
    """The backend called ``name``, or the fastest available one for ``"auto"``; a new instance.

    ``float32_precision`` (``"ieee"``, ``"tf32x3"`` or ``"tf32"``) permits float32 GEMMs on TF32 tensor
    cores where the backend has such kernels (Triton on a GPU); the others compute IEEE float32.
    ``dtype``: the model's compute dtype name, or None where it follows the inputs; ``auto`` takes the
    fastest backend for it (on a CPU, float64 can go to NumPy where onnx takes the rest:
    ``OnnxBackend.usable_by_auto``).

    Raises:
        ValueError: ``name`` is not a known backend, or ``float32_precision`` not a known precision.
        ImportError / RuntimeError: the backend is known but cannot run here (missing extra, no GPU);
            there is never a silent fallback to another backend.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string; got {type(name).__name__}")
    if name == "auto":
        # numpy is always usable; Triton and CuPy only on a real GPU (not under the interpreter).
        name = next(n for n in KNOWN_BACKENDS if _FACTORIES[n].usable_by_auto(dtype))
        logger.info("backend='auto' picked %r%s", name, "" if dtype is None else f" for dtype {dtype}")
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {', '.join(KNOWN_BACKENDS)}")
    if float32_precision not in FLOAT32_PRECISIONS:
        raise ValueError(f"float32_precision must be one of {', '.join(FLOAT32_PRECISIONS)}; got {float32_precision!r}")
    backend = _FACTORIES[name]()
    backend.float32_precision = float32_precision
    return backend
