"""Input validation shared by every backend.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value) with a
message that names the argument and the problem, before any backend sees the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SUPPORTED_DTYPES = ("float64", "float32", "float16", "bfloat16")


def normalize_dtype(dtype) -> str | None:
    """Map None, a string, a NumPy dtype or a torch dtype to one of the supported dtype names."""
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    if name not in _SUPPORTED_DTYPES:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    if name not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_SUPPORTED_DTYPES)} or None; got {dtype!r}")
    return name


def reject_device_array(x, name: str, backend: str) -> None:
    """Raise TypeError when ``x`` lives on a GPU: a host backend never copies device data silently."""
    on_device = hasattr(x, "__cuda_array_interface__")
    if not on_device and hasattr(x, "__dlpack_device__"):
        try:
            on_device = int(x.__dlpack_device__()[0]) != 1  # 1 is kDLCPU
        except Exception:
            on_device = False
    if on_device:
        raise TypeError(
            f"{name} is a {type(x).__module__}.{type(x).__name__} on a GPU, but backend {backend!r} "
            "runs on the CPU; move it to the host or use a GPU backend ('triton' or 'cupy')"
        )


def as_float_array(x, name: str, backend: str) -> np.ndarray:
    """``x`` as a NumPy floating array of rank 2 or 3 with no empty axis and no NaN or Inf."""
    reject_device_array(x, name, backend)
    try:
        arr = np.asarray(x)
    except Exception as exc:  # e.g. a torch tensor that requires grad
        raise TypeError(f"{name} could not be read as an array: {exc}") from exc
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array; got an object array (ragged nested lists?)")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real floating point; got complex dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(
            f"{name} must be floating point (float64, float32 or float16); got dtype {arr.dtype}"
        )
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} must have shape (L, D) or (B, L, D); got rank {arr.ndim} with shape {arr.shape}"
        )
    if 0 in arr.shape:
        axis = ("B", "L", "D")[3 - arr.ndim :][arr.shape.index(0)]
        raise ValueError(f"{name} has an empty axis {axis} (shape {arr.shape}); sequences need L >= 1")
    if not np.isfinite(arr).all():
        bad = "NaN" if np.isnan(arr).any() else "Inf"
        raise ValueError(f"{name} contains {bad}; inputs must be finite")
    return arr


def check_same_rank(arrays: dict[str, np.ndarray]) -> bool:
    """True when the inputs are batched (all rank 3), False when all are rank 2; else ValueError."""
    ranks = {name: a.ndim for name, a in arrays.items()}
    if len(set(ranks.values())) != 1:
        listing = ", ".join(f"{n} has rank {r}" for n, r in ranks.items())
        raise ValueError(f"inputs must all be (L, D) or all be (B, L, D): {listing}")
    batched = next(iter(ranks.values())) == 3
    if batched:
        sizes = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(sizes.values())) != 1:
            listing = ", ".join(f"{n} has B={b}" for n, b in sizes.items())
            raise ValueError(f"batch sizes differ: {listing}")
    return batched


def check_width(x: np.ndarray, name: str, width: int) -> None:
    if x.shape[-1] != width:
        raise ValueError(
            f"{name} has last dimension {x.shape[-1]}, but this CrossAttention has embedding_dim={width}"
        )


def check_lengths(lengths, name: str, batch: int, max_len: int, batched: bool, backend: str) -> np.ndarray | None:
    """Per-example valid lengths as an int64 array of shape (B,), each in 1..max_len."""
    if lengths is None:
        return None
    if not batched:
        raise ValueError(f"{name} applies to batched (B, L, D) inputs; got unbatched (L, D) inputs")
    reject_device_array(lengths, name, backend)
    arr = np.asarray(lengths)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of shape (B,); got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one length per example); got {arr.shape}")
    low, high = int(arr.min()), int(arr.max())
    if low < 1 or high > max_len:
        raise ValueError(
            f"{name} must lie in 1..{max_len} (the padded length); got values from {low} to {high}"
        )
    return arr.astype(np.int64)


def check_mask(mask, batch: int, len_q: int, len_k: int, batched: bool, backend: str) -> np.ndarray | None:
    """The positions where ``mask == 0`` as a bool array broadcastable to (B, Lq, Lk) (rank 3).

    The mask is returned un-broadcast, so a shared (Lq, Lk) mask costs Lq*Lk bytes, not B*Lq*Lk.
    """
    if mask is None:
        return None
    reject_device_array(mask, "mask", backend)
    arr = np.asarray(mask)
    if arr.dtype != bool and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"mask must be boolean or real numeric (0 = masked); got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError("mask contains NaN or Inf; use 0 for masked and 1 for kept positions")
    target = (batch, len_q, len_k) if batched else (len_q, len_k)
    if arr.ndim > len(target):
        raise ValueError(f"mask has rank {arr.ndim} (shape {arr.shape}); it must broadcast to {target}")
    try:
        broadcast = np.broadcast_shapes(arr.shape, target)
    except ValueError:
        broadcast = None
    if broadcast != target:
        raise ValueError(f"mask of shape {arr.shape} does not broadcast to {target}")
    masked = arr == 0
    return masked.reshape((1,) * (3 - masked.ndim) + masked.shape)


@dataclass(frozen=True)
class Batch:
    """Validated, batched inputs of one attention direction or one fusion."""

    arrays: tuple  # rank-3 arrays (B, L, D)
    batched: bool  # False when the caller gave (L, D) arrays
    out_dtype: np.dtype

    def unbatch(self, x):
        """Drop the leading batch axis that the front end added to unbatched inputs."""
        if x is None or self.batched:
            return x
        return x[0]
