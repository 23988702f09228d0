"""Every backend against the float64 NumPy reference and against each other, on every output."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import reference
from runnable import BACKENDS, NOT_RUN, as_received, model_for, to_backend, to_numpy
from crossattn_gpu import CrossAttention
from plain_yardstick import fuse_yardstick, plain_attention
from tolerances import RECORDS, allowed, check, relative_error

FUSED_KEYS = ("fused_sequential", "fused_structural", "seq_similarity", "struct_similarity")


def case(seed=0, batch=3, len_s=17, len_t=13, width=24, heads=3):
    rng = np.random.default_rng(seed)
    xs, xt = rng.standard_normal((batch, len_s, width)), rng.standard_normal((batch, len_t, width))
    mask = rng.random((batch, len_s, len_t)) > 0.3
    mask[:, 0] = False  # a fully masked row
    s_len, t_len = np.array([len_s, 1, 9])[:batch], np.array([len_t, 13, 1])[:batch]
    return xs, xt, mask, s_len, t_len


def run(model, dtype, xs, xt, mask, s_len, t_len):
    return model.fuse_representations(
        to_backend(xs, dtype), to_backend(xt, dtype), mask=mask, sequential_lengths=s_len,
        structural_lengths=t_len, bidirectional=False, need_weights=True,
    )


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("width,heads", [(24, 3), (1, 1), (300, 2)])
def test_fuse_against_float64_reference(backend, dtype, width, heads):
    ref = CrossAttention(width, heads, seed=width, backend="numpy")
    xs, xt, mask, s_len, t_len = case(width, width=width, heads=heads)
    xs, xt = as_received(xs, dtype), as_received(xt, dtype)
    want = ref.fuse_representations(xs, xt, mask=mask, sequential_lengths=s_len, structural_lengths=t_len,
                                    bidirectional=False, need_weights=True)
    got = run(model_for(backend, ref), dtype, xs, xt, mask, s_len, t_len)
    yard = None
    if dtype in ("float16", "bfloat16"):
        yard = fuse_yardstick(want, FUSED_KEYS, reference.params(ref), xs, xt, mask, s_len, t_len, dtype)
    for key in FUSED_KEYS:
        check(to_numpy(got[key]), want[key], dtype, yard, what=f"{backend} {dtype} {key}")
    for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq"):
        for h, (g, w) in enumerate(zip(to_numpy(got[key]), want[key])):
            check(g, w, dtype, yard, what=f"{backend} {dtype} {key}[{h}]")


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_attention_methods_against_float64_reference(backend, dtype):
    ref = CrossAttention(16, 2, seed=1, backend="numpy")
    model = model_for(backend, ref)
    rng = np.random.default_rng(1)
    q, k, v = (as_received(rng.standard_normal(shape), dtype) for shape in ((2, 5, 16), (2, 7, 16), (2, 7, 16)))
    mask = rng.random((5, 7)) > 0.4
    mask[1] = False
    kw = dict(mask=mask, query_lengths=[5, 2], key_lengths=[7, 1], need_weights=True)
    for method in ("scaled_dot_product_attention", "multi_head_attention"):
        want_out, want_w = getattr(ref, method)(q, k, v, **kw)
        got_out, got_w = getattr(model, method)(to_backend(q, dtype), to_backend(k, dtype), to_backend(v, dtype), **kw)
        yard = None
        if dtype in ("float16", "bfloat16"):
            plain = plain_attention(method, reference.params(ref), q, k, v, mask, [5, 2], [7, 1], dtype)
            yard = relative_error(plain, want_out)
        check(to_numpy(got_out), want_out, dtype, yard, what=f"{backend} {dtype} {method}")
        want_w = want_w if isinstance(want_w, list) else [want_w]
        got_w = to_numpy(got_w) if isinstance(got_w, list) else [to_numpy(got_w)]
        for g, w in zip(got_w, want_w):
            check(g, w, dtype, yard, what=f"{backend} {dtype} {method} weights")


def test_backends_agree_with_each_other():
    ref = CrossAttention(24, 3, seed=2, backend="numpy")
    xs, xt, mask, s_len, t_len = case(2)
    want = ref.fuse_representations(xs, xt, mask=mask, sequential_lengths=s_len, structural_lengths=t_len,
                                    bidirectional=False, need_weights=True)
    results, limits = {}, {}
    for param in BACKENDS:
        backend, dtype = param.values
        got = run(model_for(backend, ref), dtype, xs, xt, mask, s_len, t_len)
        results[param.id] = to_numpy(got["fused_sequential"])
        yard = None
        if dtype in ("float16", "bfloat16"):
            yard = fuse_yardstick(want, ["fused_sequential"], reference.params(ref), xs, xt, mask, s_len, t_len, dtype)
        limits[param.id] = allowed(dtype, yard)
    assert len(results) >= 2, f"only {list(results)} ran here; not run: {NOT_RUN}"
    for a, b in itertools.combinations(results, 2):
        err = relative_error(results[a], results[b])
        RECORDS.append({"pair": f"{a} vs {b}", "error": err, "limit": limits[a] + limits[b]})
        assert err <= limits[a] + limits[b], f"{a} vs {b}: {err:.3e}"
