"""The folded weights of SPEC section 4 against literal per-head products, and the identity itself
against the seed's direct formulation, in float64."""

import numpy as np
import pytest

import reference
from crossattn_gpu.folding import fold_named, fold_weights
from crossattn_gpu.weights import random_weights

SHAPES = [(1, 1), (1, 16), (3, 2), (17, 3), (64, 4), (130, 2)]  # (D, H)


@pytest.mark.parametrize("width,heads", SHAPES)
def test_columns_hold_each_heads_products(width, heads):
    w = random_weights(width, heads, seed=width * heads)
    folded = fold_named(w)
    assert folded.shape == (width, 2 * heads * width) and folded.dtype == np.float64
    for h in range(heads):
        a = w["query_weights"][h] @ w["key_weights"][h].T / np.sqrt(width)
        u = w["value_weights"][h] @ w["output_weights"][h * width : (h + 1) * width]
        np.testing.assert_allclose(folded[:, h * width : (h + 1) * width], a, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(folded[:, (heads + h) * width : (heads + h + 1) * width], u, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("width,heads", SHAPES)
def test_identity_gives_the_seeds_multi_head_attention(width, heads):
    w = random_weights(width, heads, seed=7)
    rng = np.random.default_rng(width + heads)
    xq, xk = rng.standard_normal((3, width)), rng.standard_normal((17, width))  # Lq != Lk
    folded = fold_named(w)
    out = np.zeros((3, width))
    for h in range(heads):
        scores = xq @ folded[:, h * width : (h + 1) * width] @ xk.T
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out += (p / p.sum(-1, keepdims=True)) @ (xk @ folded[:, (heads + h) * width : (heads + h + 1) * width])
    want, _ = reference.mha(*(w[k] for k in ("query_weights", "key_weights", "value_weights", "output_weights")), xq, xk, xk)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


def test_any_float_dtype_and_layout_folds_in_float64():
    w = random_weights(5, 2, seed=3)
    parts = [w[k] for k in ("query_weights", "key_weights", "value_weights", "output_weights")]
    want = fold_weights(*(p.astype(np.float32).astype(np.float64) for p in parts))
    as_float32_fortran = [np.asfortranarray(p.astype(np.float32)) for p in parts]
    got = fold_weights(*as_float32_fortran)
    assert got.dtype == np.float64 and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-16)
