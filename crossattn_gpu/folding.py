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

import numpy as np


def fold_weights(query, key, value, output) -> np.ndarray:
    """(D, 2*H*D) float64: columns [h*D, (h+1)*D) hold A_h, columns [(H+h)*D, (H+h+1)*D) hold U_h.

    Built in float64 whatever the compute dtype, so folding adds no rounding of its own beyond the
    final cast.
    """
    query, key, value, output = (np.asarray(w, dtype=np.float64) for w in (query, key, value, output))
    heads, width, _ = query.shape
    fold_q = np.matmul(query, key.transpose(0, 2, 1)) / np.sqrt(width)  # (H, D, D)
    fold_v = np.matmul(value, output.reshape(heads, width, width))  # Wo_h is rows h*D..(h+1)*D
    side_by_side = [f.transpose(1, 0, 2).reshape(width, heads * width) for f in (fold_q, fold_v)]
    return np.concatenate(side_by_side, axis=1)


def fold_named(arrays: dict) -> np.ndarray:
    """``fold_weights`` of a dict holding ``query_weights``, ``key_weights``, ``value_weights`` and
    ``output_weights`` (as ``CrossAttention.get_attention_weights`` returns them)."""
    return fold_weights(*(arrays[f"{part}_weights"] for part in ("query", "key", "value", "output")))
