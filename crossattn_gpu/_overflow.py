"""Overflow of finite inputs: an error that names it, never Inf or NaN handed back as a result.

Finite inputs can still take a stage of the computation past the largest value of its dtype: float16
stops at 65504, and at D = 1280 with the seed's weights a float16 projection can reach 407 times the
inputs' largest magnitude (the largest l1 norm of a column of the U_h), so inputs past 160 can overflow
it. The result would then hold Inf or NaN (every score of a query whose projection overflowed is
infinite or NaN, and so is its output).

Checking every result costs a pass over it, and on a GPU a synchronisation that stops the host from
queueing the next call while this one runs. So the front end first bounds every stage from the inputs'
largest magnitude ``m`` (which the input check reads anyway) and the weights (``folding.fold_magnitudes``):

* projections: ``|x A_h|, |x U_h| <= m * gain`` (gain: the largest l1 norm of a column);
* scores: ``|(x A_h) . x'| <= D * m * (m * gain_A)`` (the 1/sqrt(D) is inside A_h);
* outputs: each head's output is a convex combination of its values, so ``|sum_h| <= H * m * gain_U``,
  twice that for ``bidirectional_fusion``.

The cosine similarities are computed on rows scaled by their largest magnitude, so they cannot
overflow. Only when a bound comes within a factor ``MARGIN`` of its stage's largest value are the
results checked; a non-finite one raises ``OverflowError``. With float32 or bfloat16 (largest value
~3.4e38) that takes inputs of ~1e17; with float16 it is the common case at large D (D = 1280, H = 8:
from inputs of magnitude 5, the output bound being loose), and the check costs a pass over the outputs
and, on a GPU, a synchronisation.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from .folding import FoldMagnitudes

#: The largest finite value of each dtype (bfloat16 is not a NumPy dtype).
LARGEST = {
    "float64": 1.7976931348623157e308,
    "float32": 3.4028234663852886e38,
    "bfloat16": 3.3895313892515355e38,
    "float16": 65504.0,
}

#: The magnitude from which a value rounds to Inf in each dtype: its largest value plus half a unit in
#: the last place there (round to nearest even; the largest value's last bit is odd, so the tie goes up),
#: less half a unit of float32's there for the 16-bit dtypes. torch converts float64 to float16 and
#: bfloat16 through float32, rounding twice (c10's Half and BFloat16 are built from a float, on a GPU
#: too): float64 values from 65520 - 2**-9 round up to float32's 65520 and then to Inf (torch 2.13 on the
#: CPU: 65519.999 became Inf, where NumPy's single rounding gives 65504). No float32 or 16-bit value lies
#: in the half unit taken off, so inputs of those dtypes are judged as one rounding would judge them.
_ROUNDS_TO_INF = {
    "float64": math.inf,
    "float32": 2.0**128 - 2.0**103,
    "bfloat16": 2.0**128 - 2.0**119 - 2.0**103,
    "float16": 65520.0 - 2.0**-9,
}


#: Rounding can take a computed value a few units in the last place past its exact bound; a stage counts
#: as safe only while its bound stays below half its dtype's largest value.
MARGIN = 2.0

_WIDER = {"float16": "float32", "bfloat16": "float32", "float32": "float64"}


class StageDtypes(NamedTuple):
    """The dtypes a backend holds each stage in, for results of one dtype."""

    projections: str  # the inputs as cast, and their projections
    scores: str  # where the scores are accumulated
    outputs: str  # the head sums and the results as returned


class Bounds(NamedTuple):
    """Upper bounds on the magnitude of every value of each stage (a tuple: built on every call, where a
    frozen dataclass cost W1 ~1 us more)."""

    projections: float
    scores: float
    outputs: float

    @classmethod
    def attention(cls, magnitude: float, width: int, scale: float) -> "Bounds":
        """``scaled_dot_product_attention`` on inputs up to ``magnitude``, keys ``width`` wide: the
        scores are products scaled after they are summed, the outputs convex combinations of the values."""
        return cls(magnitude, width * magnitude * magnitude * max(scale, 1.0), magnitude)

    @classmethod
    def folded(cls, magnitude: float, width: int, heads: int, weights: FoldMagnitudes, terms: int = 1) -> "Bounds":
        """Multi-head attention through the folded weights; ``terms`` directional fusions summed."""
        gain_q, gain_v = weights.query_gain, weights.value_gain
        return cls(magnitude * max(gain_q, gain_v), width * magnitude * (magnitude * gain_q),
                   terms * heads * magnitude * gain_v)


def narrower(a: str, b: str) -> str:
    """The dtype of the two with the smaller largest value."""
    return a if LARGEST[a] <= LARGEST[b] else b


def risky_dtype(bounds: Bounds, dtypes: StageDtypes) -> str | None:
    """The narrowest dtype of a stage whose bound is within ``MARGIN`` of its largest value, or None
    when no stage can overflow."""
    risky = [dtype for bound, dtype in ((bounds.projections, dtypes.projections), (bounds.scores, dtypes.scores),
                                        (bounds.outputs, dtypes.outputs)) if MARGIN * bound > LARGEST[dtype]]
    return min(risky, key=LARGEST.__getitem__) if risky else None


def check_cast(arrays: dict, magnitude: float, dtype: str, backend) -> None:
    """ValueError when an input is too large for the dtype the inputs are cast to (the cast gives Inf)."""
    if magnitude < _ROUNDS_TO_INF[dtype]:
        return
    for name, arr in arrays.items():  # the failing call pays one read per input to name it
        top = _largest_magnitude(backend, [arr])
        if not top < _ROUNDS_TO_INF[dtype]:
            raise ValueError(
                f"{name} reaches {top:.3g} in magnitude, past {dtype}'s largest value {LARGEST[dtype]:.5g}, the "
                f"dtype it is computed in; scale it down{_wider_hint(dtype)}"
            )


def check_weights(weights: FoldMagnitudes, dtype: str) -> None:
    """ValueError when the folded weights do not fit ``dtype``, the dtype they are computed in."""
    if not weights.largest < _ROUNDS_TO_INF[dtype]:
        raise ValueError(
            f"the folded weights (Wq[h] Wk[h]^T / sqrt(D) and Wv[h] times its block of output_weights) reach "
            f"{weights.largest:.3g}, past {dtype}'s largest value {LARGEST[dtype]:.5g}, the dtype they are "
            f"computed in; scale the weights down{_wider_hint(dtype)}"
        )


def named_not_warned(method):
    """A public call (``method``) with NumPy's overflow and invalid-value warnings off, in the NumPy
    backend's worker threads too (they take the calling thread's settings: ``_threads.run_in_parallel``).
    An overflow from finite inputs in it is named by ``check_cast`` or ``check_results``; the warnings
    would only come before that error (six of them for a NumPy call whose scores overflowed). Cost: a
    switch of NumPy's settings, 1 to 2.4 us of W1's ~55 us on this project's CPU (NOTES)."""

    @functools.wraps(method)
    def without_numpy_overflow_warnings(*args, **kwargs):  # (the name shows in tracebacks)
        with np.errstate(over="ignore", invalid="ignore"):
            return method(*args, **kwargs)

    return without_numpy_overflow_warnings


def check_results(results: dict, magnitude: float, bounds: Bounds, dtypes: StageDtypes, backend) -> None:
    """OverflowError naming the first result that holds Inf or NaN, when the bounds allow overflow.

    ``results``: name -> backend array or None. With no stage at risk nothing is read.
    """
    dtype = risky_dtype(bounds, dtypes)
    if dtype is not None:
        check_finite_results(results, magnitude, dtype, backend)


def check_finite_results(results: dict, magnitude: float, dtype: str, backend) -> None:
    """OverflowError naming the first result that holds Inf or NaN, or a value that ``dtype`` rounds to
    Inf (results computed wider are narrowed to it after), computed from finite inputs reaching
    ``magnitude``. One read of the device for all the results when they are in range."""
    arrays = {name: arr for name, arr in results.items() if arr is not None}
    if _in_range(backend, arrays.values(), dtype):
        return
    name = next(name for name, arr in arrays.items() if not _in_range(backend, [arr], dtype))
    raise OverflowError(
        f"{name} came out past {dtype}'s largest value {LARGEST[dtype]:.5g} (Inf or NaN) from finite inputs "
        f"reaching {magnitude:.3g} in magnitude: the computation overflowed {dtype}; scale the inputs or "
        f"the weights down{_wider_hint(dtype)}"
    )


def _in_range(backend, arrays, dtype: str) -> bool:
    return _largest_magnitude(backend, arrays) < _ROUNDS_TO_INF[dtype]  # False for NaN too


def _largest_magnitude(backend, arrays) -> float:
    top = backend.largest_magnitude(*arrays)
    return top() if callable(top) else top


def _wider_hint(dtype: str) -> str:
    wider = _WIDER.get(dtype)
    if wider is None:
        return ""
    where = " on the 'numpy' or 'onnx' backend" if wider == "float64" else ""
    return f", or compute in {wider} (dtype='{wider}'{where})"
