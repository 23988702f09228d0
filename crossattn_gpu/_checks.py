"""Input validation shared by every backend.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value) with a
message that names the argument and the problem, before any result is returned. The checks work on
the backend's own arrays (NumPy, torch or CuPy) through five methods every backend has: ``native``,
``host``, ``dtype_name``, ``all_finite`` and ``largest_magnitude``. Shapes, dtypes, masks and lengths
are checked before any kernel runs. On a GPU, reading a value from the device is a synchronisation, so
the finiteness of all inputs is one value, their largest magnitude, read once the call's kernels are
queued (``check_values``): kernels index memory by shapes and lengths, never by the float inputs, so
NaN or Inf there cannot make them misbehave. The same magnitude bounds the computation against
overflow (``crossattn_gpu._overflow``). Lengths and float masks already on a GPU are likewise checked
there and read late (``late_check``), the lengths clamped into range meanwhile so that no kernel reads
past the padding.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from ._overflow import StageDtypes

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def normalize_dtype(dtype) -> str | None:
    """Map None, a string, a NumPy dtype or a torch dtype to one of the supported dtype names."""
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    if name not in FLOAT_DTYPES:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)} or None; got {dtype!r}")
    return name


@lru_cache(maxsize=64)
def numpy_dtype_name(dtype) -> str:
    """``dtype.name``, which NumPy computes in Python on every access (3 us, four times a call)."""
    return dtype.name


def result_dtype(names) -> str:
    """The dtype that holds every one of the given float dtypes (float16 with bfloat16 -> float32)."""
    names = set(names)
    if len(names) == 1:
        return names.pop()
    return "float64" if "float64" in names else "float32"


def is_device_array(x) -> bool:
    """True when ``x`` lives on a GPU (CuPy, torch CUDA, or anything with a non-CPU DLPack device)."""
    if hasattr(x, "__cuda_array_interface__"):
        return True
    if hasattr(x, "__dlpack_device__"):
        try:
            return int(x.__dlpack_device__()[0]) != 1  # 1 is kDLCPU
        except Exception:
            return False
    return False


def is_torch_tensor(x) -> bool:
    """True for a torch tensor (without importing torch: a tensor means torch is loaded already)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def check_no_grad(x, name: str) -> None:
    """TypeError for a torch tensor that requires grad: no backend computes gradients, so its results
    would be cut from the autograd graph without a word (and NumPy cannot read such a tensor at all)."""
    if is_torch_tensor(x) and x.requires_grad:
        raise TypeError(
            f"{name} is a torch tensor that requires grad, but crossattn_gpu computes no gradients (its results "
            f"would not be connected to the autograd graph); pass {name}.detach(), or compute it under "
            "torch.no_grad()"
        )


def input_dtype_name(x, arr, backend) -> str:
    """The dtype the caller gave ``x`` in, given its backend array ``arr``: a torch bfloat16 tensor reaches
    the host backends as float32 (NumPy has no bfloat16), and its results go back in bfloat16."""
    if is_torch_tensor(x) and x.dtype is sys.modules["torch"].bfloat16:
        return "bfloat16"
    return backend.dtype_name(arr)


def check_result_kind(first_input, out_dtype: str) -> None:
    """TypeError, before any work, for bfloat16 results that would be handed back as NumPy arrays (the
    kind of results follows the first input; NumPy has no bfloat16)."""
    if out_dtype == "bfloat16" and not (is_torch_tensor(first_input) or type(first_input).__module__.split(".")[0] == "cupy"):
        raise TypeError(
            "bfloat16 results cannot be returned as NumPy arrays (results come back in the kind of the first "
            "input, and NumPy has no bfloat16); pass torch tensors or CuPy arrays, or choose dtype='float32'"
        )


def host_array(x, name: str) -> np.ndarray:
    """``x`` (a NumPy array, an array-like or a CPU tensor) as a NumPy array of numbers, without a copy
    where NumPy can share the memory. A torch bfloat16 tensor becomes float32 (``input_dtype_name``).

    TypeError for what does not convert, for object arrays (ragged nested lists), for a masked array
    with masked entries, whose mask ``np.asarray`` would drop without a word, and for a tensor that
    requires grad (``check_no_grad``).
    """
    if is_torch_tensor(x):
        check_no_grad(x, name)
        x = x.resolve_conj().resolve_neg()  # views with these bits set: NumPy cannot read them
        if x.dtype is sys.modules["torch"].bfloat16:
            x = x.float()
    if np.ma.is_masked(x):
        raise TypeError(
            f"{name} is a masked array with masked entries, and the mask would be ignored; fill them, and "
            "give padded lengths as sequential_lengths / structural_lengths (or key_lengths) instead"
        )
    try:
        arr = np.asarray(x)
    except Exception as exc:  # e.g. a torch tensor on the meta device, or a sparse one
        raise TypeError(f"{name} could not be read as a NumPy array: {exc}") from exc
    if arr.dtype == object:
        if arr.ndim == 0:  # None, a dict, an int past 64 bits...
            raise TypeError(f"{name} must be a numeric array; got {type(x).__name__}")
        raise TypeError(
            f"{name} must be a numeric array; got an object array (ragged nested lists, or numbers past 64 bits?)"
        )
    return arr


def transferable_host_array(x, name: str) -> np.ndarray:
    """``host_array(x)`` ready for a device library (torch, CuPy): numbers of a dtype it has, in native
    byte order and C order, with the rank kept (``np.ascontiguousarray`` makes a 0-d array 1-d). Neither
    library takes big-endian arrays or long doubles, and their own errors name no argument."""
    arr = host_array(x, name)
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"{name} must be numeric; got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and numpy_dtype_name(arr.dtype.newbyteorder("=")) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be floating point ({', '.join(FLOAT_DTYPES)}); got dtype {arr.dtype}")
    return np.asarray(arr, dtype=arr.dtype.newbyteorder("="), order="C")


def check_input(arr, name: str, backend) -> None:
    """A floating array of rank 2 or 3 with no empty axis (its values: ``check_values``)."""
    dtype = backend.dtype_name(arr)
    if dtype.startswith("complex"):
        raise TypeError(f"{name} must be real floating point; got complex dtype {dtype}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be floating point ({', '.join(FLOAT_DTYPES)}); got dtype {dtype}")
    shape = tuple(arr.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"{name} must have shape (L, D) or (B, L, D); got rank {len(shape)} with shape {shape}")
    if 0 in shape:
        axis = ("B", "L", "D")[3 - len(shape) :][shape.index(0)]
        need = {"B": "a batch needs B >= 1 examples", "L": "sequences need L >= 1", "D": "embeddings need D >= 1"}[axis]
        raise ValueError(f"{name} has an empty axis {axis} (shape {shape}); {need}")


def check_values(arrays: dict, backend, pending=None) -> Callable[[], float]:
    """No NaN or Inf in any of the named arrays, from one value for all of them: their largest magnitude.

    Returns the function that finishes the check and returns that magnitude. ``backend.largest_magnitude``
    gives either the value itself (the check ends here, and raises here) or a function that reads it
    later: on a GPU that read is a synchronisation, so the front end calls the returned function only
    once the call's work is queued, and the read no longer leaves the device idle while the host
    prepares that work. ``pending`` (``backend.pending_magnitude``, not None) stands in for it: a
    magnitude the call's own kernel may write, read likewise.
    """
    magnitude = backend.largest_magnitude(*arrays.values()) if pending is None else pending
    if callable(magnitude):
        return lambda: _finite_magnitude(magnitude(), arrays, backend)
    magnitude = _finite_magnitude(magnitude, arrays, backend)
    return lambda: magnitude


def _finite_magnitude(magnitude: float, arrays: dict, backend) -> float:
    if math.isfinite(magnitude):
        return magnitude
    for name, arr in arrays.items():  # the rare failing call pays one read per array to name it
        if not backend.all_finite(arr):
            bad = "NaN" if bool((arr != arr).any()) else "Inf"  # NaN is the one value unequal to itself
            raise ValueError(f"{name} contains {bad}; inputs must be finite")
    raise AssertionError(f"largest magnitude {magnitude}, but every input is finite")  # a backend's bug


def check_same_rank(arrays: dict) -> bool:
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


def check_width(x, name: str, width: int) -> None:
    if x.shape[-1] != width:
        raise ValueError(
            f"{name} has last dimension {x.shape[-1]}, but this CrossAttention has embedding_dim={width}"
        )


def check_lengths(lengths, name: str, batch: int, max_len: int, batched: bool, backend) -> np.ndarray | None:
    """Per-example valid lengths as a host int64 array of shape (B,), each in 1..max_len."""
    if lengths is None:
        return None
    if not batched:
        raise ValueError(f"{name} applies to batched (B, L, D) inputs; got unbatched (L, D) inputs")
    arr = backend.host(lengths, name)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of shape (B,); got dtype {arr.dtype}")
    check_lengths_shape(arr.shape, name, batch)
    low, high = int(arr.min()), int(arr.max())
    if low < 1 or high > max_len:
        raise ValueError(f"{name} must lie in 1..{max_len} (the padded length); got values from {low} to {high}")
    return arr.astype(np.int64)


def check_lengths_shape(shape: tuple, name: str, batch: int) -> None:
    if shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one length per example); got {shape}")


def late_check(verdict, on_failure: Callable[[], None], what: str) -> Callable[[], None]:
    """The function that finishes a check made on the device: ``verdict`` is True where it failed (a
    value, or a function that reads it, see ``Batch.finish_checks``); ``on_failure`` repeats the check
    on host copies, raising the error that names the problem."""

    def finish() -> None:
        if verdict() if callable(verdict) else verdict:
            on_failure()
            raise AssertionError(f"the device found the {what} invalid, the host did not")  # a backend's bug

    return finish


def check_flag(value, name: str) -> bool:
    """A bool (Python's or NumPy's); anything else is a TypeError, since bool("no") would be True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def check_mask(mask, batch: int, len_q: int, len_k: int, batched: bool, backend, late_checks: list | None = None):
    """The positions where ``mask == 0``, as a bool array of rank 3 broadcastable to (B, Lq, Lk).

    The mask is returned un-broadcast, so a shared (Lq, Lk) mask costs Lq*Lk bytes, not B*Lq*Lk.
    ``late_checks`` (``Batch.late_checks``): where the backend reads its arrays' magnitude late (a GPU),
    a float mask's finiteness is read late too, appended there; NaN or Inf in a mask cannot make a
    kernel misbehave meanwhile (it only decides which scores are filled). Else it is checked now.
    """
    if mask is None:
        return None
    arr = backend.native(mask, "mask")
    dtype = backend.dtype_name(arr)
    if dtype != "bool" and not (dtype.startswith(("int", "uint")) or dtype in FLOAT_DTYPES):
        raise TypeError(f"mask must be boolean or real numeric (0 = masked); got dtype {dtype}")
    if dtype in FLOAT_DTYPES:
        _check_mask_finite(arr, backend, late_checks)
    target = (batch, len_q, len_k) if batched else (len_q, len_k)
    shape = tuple(arr.shape)
    if len(shape) > len(target):
        raise ValueError(f"mask has rank {len(shape)} (shape {shape}); it must broadcast to {target}")
    try:
        broadcast = np.broadcast_shapes(shape, target)
    except ValueError:
        broadcast = None
    if broadcast != target:
        raise ValueError(f"mask of shape {shape} does not broadcast to {target}")
    masked = arr == 0
    return masked.reshape((1,) * (3 - len(shape)) + shape)


def _check_mask_finite(arr, backend, late_checks: list | None) -> None:
    def fail() -> None:
        raise ValueError("mask contains NaN or Inf; use 0 for masked and 1 for kept positions")

    magnitude = backend.largest_magnitude(arr)
    if callable(magnitude):  # a GPU's value, read late where the caller finishes late checks
        if late_checks is not None:
            late_checks.append(late_check(lambda: not math.isfinite(magnitude()), fail, "mask"))
            return
        magnitude = magnitude()
    if not math.isfinite(magnitude):
        fail()


class BatchLayout(NamedTuple):  # a tuple: built in every call, and a frozen dataclass is slow to build
    """What a call's checks settle from its inputs' layout (kinds, shapes, dtypes, devices) alone."""

    batched: bool  # False when the caller gave (L, D) arrays
    out_dtype: str  # dtype name of the results
    compute: object  # the backend's dtype the inputs are computed in
    stages: StageDtypes  # the dtypes the backend computes these inputs' stages in
    caller_kind: object  # how to hand results back (the backend's token)


@dataclass(frozen=True)
class Batch:
    """Validated, batched inputs of one call, in the backend's compute dtype."""

    arrays: tuple  # rank-3 backend arrays (B, L, D)
    layout: BatchLayout
    finish_values: Callable[[], float]  # raises if the inputs' values failed, else their largest magnitude
    late_checks: list = field(default_factory=list)  # functions that raise if a check read late failed
    pending_magnitude: object = None  # backend.pending_magnitude or None, for fuse or multi_head_attention

    @property
    def batched(self) -> bool:
        return self.layout.batched

    @property
    def out_dtype(self) -> str:
        return self.layout.out_dtype

    @property
    def caller_kind(self):
        return self.layout.caller_kind

    @property
    def stages(self) -> StageDtypes:
        return self.layout.stages

    def finish_checks(self) -> float:
        """Finish the checks read late from the device (a GPU's reads wait for their own copies, not for
        the call's work): call it once that work is queued, before handing anything back. Raises if one
        failed; returns the inputs' largest magnitude. The mask's and the lengths' verdicts first, in the
        order the host checks them."""
        for check in self.late_checks:
            check()
        return self.finish_values()

    def unbatch(self, x):
        """Drop the leading batch axis that the front end added to unbatched inputs."""
        if x is None or self.batched:
            return x
        return x[0]
