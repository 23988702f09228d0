"""Finite inputs that overflow the computation, on every backend: a named OverflowError (or, for an input
the cast alone takes past its dtype, a ValueError naming it), never Inf or NaN handed back; the check
that runs when a stage may overflow changes no result; and cosine similarities of tiny rows are right."""

from __future__ import annotations

import math

import numpy as np
import pytest

from crossattn_gpu import CrossAttention, _overflow
from crossattn_gpu.weights import random_weights
from runnable import BACKENDS, backend_options, model_for, to_backend, to_numpy

D, H = 8, 2
pytestmark = pytest.mark.parametrize("backend,dtype", BACKENDS)
rng = np.random.default_rng(0)
S, T = rng.standard_normal((2, 5, D)), rng.standard_normal((2, 5, D))

#: How each dtype under test is made to overflow: (input scale, value-weight scale, the dtype named).
#: float64 and float32 overflow in the scores (D * m**2 * |A|); bfloat16 keeps the float32 range, and
#: its scores are accumulated in float32; float16 overflows in the values (x @ U ~ 1e6, from weights
#: whose folded entries, up to 7.9e3, fit float16).
OVERFLOWS = {
    "float64": (1e160, 1.0, "float64"),
    "float32": (1e20, 1.0, "float32"),
    "bfloat16": (1e20, 1.0, "float32"),
    "float16": (100.0, 1e5, "float16"),
}


def weights(value_scale: float = 1.0) -> dict:
    w = random_weights(D, H, seed=0)
    return {**w, "value_weights": w["value_weights"] * value_scale}


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the named error, not NumPy's overflow warnings before it
def test_an_overflow_raises_a_named_error(backend, dtype):
    scale, value_scale, named = OVERFLOWS[dtype]
    model = CrossAttention.from_weights(**weights(value_scale), **backend_options(backend))
    xs, xt = to_backend(S * scale, dtype), to_backend(T * scale, dtype)
    for call, name in ((lambda: model.fuse_representations(xs, xt), "fused_sequential"),
                       (lambda: model.multi_head_attention(xt, xs, xs), "output")):
        with pytest.raises(OverflowError, match=f"^{name} came out past") as info:
            call()
        assert f"overflowed {named}" in str(info.value)
    # no poisoned state: inputs small enough for the weights go through
    good = model.fuse_representations(to_backend(S / value_scale, dtype), to_backend(T / value_scale, dtype))
    assert np.isfinite(to_numpy(good["fused_sequential"])).all()


def test_weights_past_the_compute_dtype_are_named(backend, dtype):
    compute = CrossAttention(D, H, **backend_options(backend))._backend.stage_dtypes(dtype).projections
    if compute == "float64":
        pytest.skip("float64 weights fold in float64: they fit")
    # float16 computed in float16 fails at 1e6; float16 inputs computed in float32 (NumPy, onnx) as float32
    model = CrossAttention.from_weights(**weights(1e6 if compute == "float16" else 1e40), **backend_options(backend))
    for call in (lambda: model.fuse_representations(to_backend(S, dtype), to_backend(T, dtype)),
                 lambda: model.multi_head_attention(to_backend(S, dtype), to_backend(T, dtype), to_backend(T, dtype))):
        with pytest.raises(ValueError, match=r"the folded weights .* reach .* past (float16|float32|bfloat16)'s largest"):
            call()


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_an_input_the_cast_takes_past_its_dtype_is_named(backend, dtype):
    model = CrossAttention.from_weights(**weights(), **{**backend_options(backend), "dtype": dtype})
    compute = model._backend.stage_dtypes(dtype).projections
    if compute == "float64":
        pytest.skip("float64 inputs computed in float64: no cast")
    xt = T.copy()
    xt[1, 2, 3] = -2 * _overflow.LARGEST[compute]
    if dtype == "bfloat16":  # float64 values reach the backend as torch tensors on the GPU
        import torch

        xs, xt = (torch.tensor(x, device="cuda") for x in (S, xt))
    else:
        xs = S
    with pytest.raises(ValueError, match=f"structural_repr reaches .* past {compute}"):
        model.fuse_representations(xs, xt)


def test_checking_the_results_changes_none(backend, dtype, monkeypatch):
    model = model_for(backend, CrossAttention(D, H, seed=1, backend="numpy"))
    xs, xt = to_backend(S, dtype), to_backend(T, dtype)
    plain = model.fuse_representations(xs, xt, need_weights=True)
    monkeypatch.setattr(_overflow, "MARGIN", math.inf)  # every stage counts as at risk: the results are read
    checked = model.fuse_representations(xs, xt, need_weights=True)
    for key, value in plain.items():
        if isinstance(value, list):
            for a, b in zip(value, checked[key]):
                np.testing.assert_array_equal(to_numpy(b), to_numpy(a))
        elif value is not None and not isinstance(value, bool):
            np.testing.assert_array_equal(to_numpy(checked[key]), to_numpy(value))


def test_cosine_similarities_of_tiny_rows(backend, dtype):
    """Rows of 1e-22 in float32 (their squares underflow) and 1e-170 in float64. The similarity is
    scale-free and the fusion of ``x * s`` is ``s`` times that of ``x`` under query weights times
    ``s**2``, so the reference is a float64 fusion of unscaled inputs."""
    if dtype == "float16":
        pytest.skip("float16 rows of that size are subnormal: they lose the digits themselves")
    scale = 1e-170 if dtype == "float64" else 1e-22
    w = weights()
    model = CrossAttention.from_weights(**w, **backend_options(backend))
    got = model.fuse_representations(to_backend(S * scale, dtype), to_backend(T * scale, dtype))
    exact = CrossAttention.from_weights(**{**w, "query_weights": w["query_weights"] * scale**2}, backend="numpy")
    want = exact.fuse_representations(S, T)
    tolerance = 1e-12 if dtype == "float64" else 1e-5 if dtype == "float32" else 1e-2
    for key in ("seq_similarity", "struct_similarity"):
        np.testing.assert_allclose(to_numpy(got[key]).astype(np.float64), want[key], rtol=0, atol=tolerance)
