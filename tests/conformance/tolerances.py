"""The accuracy rules of the conformance suite, in one place.

Errors are relative: the largest absolute difference over the largest absolute reference value,
against the float64 NumPy reference (itself checked against a literal float64 seed) evaluated on the
inputs as the backend under test receives them, rounded to its dtype (``runnable.as_received``).

* float64: at most 1e-10.
* float32: at most 1e-5 (float64 inputs on a float32-only backend count as float32), or, for an
  ill-conditioned case where the plain float32 computation itself misses 1e-5 (large inputs, peaked
  softmax: the score's rounding error is amplified by the score's size), twice the plain error.
* For a fused output, whose every element is a sum over heads and keys of probability times value,
  the fixed limits of float64 and float32 are relative to the largest such sum of magnitudes
  (``term_scale``) where that exceeds the largest output: when the terms cancel, the result's own
  size is not what rounding errs by. Seed 20261202's 600 drawn cases had one with D = 1, H = 1 whose
  structural output (1.1e-7) was 15000 times smaller than its terms (1.5e-3): every float32 backend
  erred by about 1.3e-11, below one rounding of one term (9e-11), which relative to the output is
  1.3e-4, and plain float32 torch by 6.5e-12 (NumPy's plain loops by 7e-14, by luck of order).
* float16 and bfloat16: at most twice the error of the same computation written plainly, the seed's
  per-head loops in NumPy (float16) or torch (bfloat16) in that dtype, plus 4 units in the last
  place of the dtype at the reference's size: where the plain computation happens to be exact
  (L = 1), rounding the result once must still pass. A unit is 2**-10 (float16) or 2**-7 (bfloat16)
  relative, more below the dtype's smallest normal number, where its spacing stays fixed: a float16
  result of 7e-6 is spaced 2**-24, 8.6e-3 of itself, and one rounding of it may cost 4.3e-3.
* NaN or Inf never passes.
"""

from __future__ import annotations

import math

import numpy as np

#: Every check made in this session, for the summary (conftest.py writes it when asked).
RECORDS: list[dict] = []
#: The backend and dtype of the running test ("numpy-float32"), set by conftest.py.
CURRENT = {"label": "unlabelled"}

FIXED = {"float64": 1e-10, "float32": 1e-5}
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
MIN_NORMAL_EXPONENT = {"float16": -14, "bfloat16": -126}


def relative_error(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = np.abs(want).max()
    return float(np.abs(got - want).max() / scale) if scale > 0 else float(np.abs(got).max())


def unit_in_last_place(dtype: str, scale: float | None = None) -> float:
    """The spacing of 16-bit ``dtype`` at ``scale``, relative to ``scale`` (``EPS`` without a scale)."""
    if not scale or not np.isfinite(scale):
        return EPS[dtype]
    exponent = max(math.floor(math.log2(scale)), MIN_NORMAL_EXPONENT[dtype])
    return max(EPS[dtype], 2.0**exponent * EPS[dtype] / scale)


def allowed(dtype: str, plain_error: float | None = None, scale: float | None = None, term_scale: float | None = None) -> float:
    """The largest error the rules allow; ``scale`` is the reference's largest absolute value and
    ``term_scale`` the largest sum of magnitudes its elements add up (None: not a sum)."""
    if dtype in FIXED:
        fixed = FIXED[dtype] * max(1.0, term_scale / scale) if term_scale and scale else FIXED[dtype]
        return fixed if plain_error is None else max(fixed, 2 * plain_error)
    return 2 * plain_error + 4 * unit_in_last_place(dtype, scale)


def term_scale(probabilities, values) -> float:
    """The largest sum of magnitudes that the elements of sum_h P_h V_h add up: max of sum_h |P_h| |V_h|
    (float64), for H probability arrays (..., Lq, Lk) and H value arrays (..., Lk, D)."""
    total = sum(np.abs(np.asarray(p, dtype=np.float64)) @ np.abs(np.asarray(v, dtype=np.float64))
                for p, v in zip(probabilities, values))
    return float(np.max(total))


def check(got, want, dtype: str, plain_error=None, what: str = "", terms: float | None = None) -> float:
    """Assert the rule for ``dtype``; return the error (for summaries).

    ``plain_error`` is the yardstick's error, or a callable computing it: for float32 it is called only
    when the fixed 1e-5 is missed. ``terms``: the ``term_scale`` of a fused output.
    """
    values = np.asarray(got, dtype=np.float64)
    assert np.isfinite(values).all(), f"{what}: NaN or Inf in the result"
    err = relative_error(values, want)
    scale = float(np.abs(np.asarray(want, dtype=np.float64)).max())
    if callable(plain_error):
        plain_error = plain_error() if dtype not in FIXED or err > allowed(dtype, None, scale, terms) else None
    limit = allowed(dtype, plain_error, scale, terms)
    RECORDS.append({"pair": f"{CURRENT['label']} vs numpy-float64", "error": err, "limit": limit})
    assert err <= limit, f"{what}: relative error {err:.3e} > {limit:.3e} ({dtype})"
    return err


#: Two computations by one backend that are equal in exact arithmetic (keys permuted, a ragged batch
#: against its examples one by one) may differ by rounding only: the fixed rules above, or 8 units in
#: the last place for float16 and bfloat16.
SELF_CONSISTENCY = {"float64": 1e-10, "float32": 1e-5, "float16": 8 * EPS["float16"], "bfloat16": 8 * EPS["bfloat16"]}


def check_same(a, b, dtype: str, what: str = "") -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.isfinite(a).all() and np.isfinite(b).all(), f"{what}: NaN or Inf"
    err = relative_error(a, b)
    RECORDS.append({"pair": f"{CURRENT['label']} vs itself", "error": err, "limit": SELF_CONSISTENCY[dtype]})
    assert err <= SELF_CONSISTENCY[dtype], f"{what}: {err:.3e} > {SELF_CONSISTENCY[dtype]:.3e} ({dtype})"
