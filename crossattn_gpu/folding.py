"""The identity of SPEC section 4, shared by every backend.

Because every head has a full D x D projection, for head h

    scores_h = (X_q Wq[h]) (X_k Wk[h])^T / sqrt(D) = (X_q A_h) X_k^T,   A_h = Wq[h] Wk[h]^T / sqrt(D)
    output   = sum_h P_h (X_k Wv[h]) Wo_h          = sum_h P_h (X_k U_h),   U_h = Wv[h] Wo_h

so one GEMM against [A_0 .. A_H-1 | U_0 .. U_H-1] gives every head's queries and values, the keys are
the raw inputs shared by all heads, and the output projection becomes a sum over heads: half the
projection FLOPs of the direct formulation. The tests check it against a literal per-head float64
implementation of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def fold_weights(query, key, value, output) -> np.ndarray:
    """(D, 2*H*D) float64: columns [h*D, (h+1)*D) hold A_h, columns [(H+h)*D, (H+h+1)*D) hold U_h.

    Built in float64 whatever the compute dtype, so folding adds no rounding of its own beyond the
    final cast.
    """
    query, key, value, output = (np.asarray(w, dtype=np.float64) for w in (query, key, value, output))
    heads, width, _ = query.shape
    folded = np.empty((width, 2 * heads * width))
    # Each product is written straight into its columns (BLAS takes the row stride), without the
    # per-head stacks, transposes and concatenation, whose fresh pages made a process's first fold
    # cost as much again: D = 1280, H = 8 (67 GFLOP in float64) on this project's 2-core CPU, first
    # call 1.69 -> 0.64 s, later calls 0.62 -> 0.58 s; bit for bit the same result.
    for h in range(heads):
        np.matmul(query[h], key[h].T, out=folded[:, h * width : (h + 1) * width])
        np.matmul(value[h], output[h * width : (h + 1) * width], out=folded[:, (heads + h) * width : (heads + h + 1) * width])
    folded[:, : heads * width] /= np.sqrt(width)
    return folded


def fold_named(arrays: dict) -> np.ndarray:
    """``fold_weights`` of a dict holding ``query_weights``, ``key_weights``, ``value_weights`` and
    ``output_weights`` (as ``CrossAttention.get_attention_weights`` returns them)."""
    return fold_weights(*(arrays[f"{part}_weights"] for part in ("query", "key", "value", "output")))


@dataclass(frozen=True)
class FoldMagnitudes:
    """What ``crossattn_gpu._overflow`` bounds the computation with: every entry of a projection
    ``x @ A_h`` is at most ``max|x| * query_gain`` in magnitude, of ``x @ U_h`` ``max|x| * value_gain``."""

    query_gain: float  # the largest l1 norm of a column of the A_h
    value_gain: float  # the same for the U_h
    largest: float  # the largest magnitude of an entry: the weights must fit the compute dtype


def fold_magnitudes(folded: np.ndarray, heads: int, width: int) -> FoldMagnitudes:
    """``FoldMagnitudes`` of ``fold_weights``' result, one head's block at a time, so that the absolute
    values never take more than a D x D temporary."""
    sums, largest = [], 0.0
    for h in range(2 * heads):
        block = np.abs(folded[:, h * width : (h + 1) * width])
        sums.append(float(block.sum(axis=0).max()))
        largest = max(largest, float(block.max()))
    return FoldMagnitudes(max(sums[:heads]), max(sums[heads:]), largest)
