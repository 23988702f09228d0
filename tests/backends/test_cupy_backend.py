"""backend='cupy': a clear error without CuPy or a GPU; on a GPU, the reference's results in CuPy's arrays."""

import subprocess
import sys

import numpy as np
import pytest

from crossattn_gpu import CrossAttention
from crossattn_gpu.backends import backend_status


def test_without_cupy_the_error_names_the_extra():
    code = "import sys\nsys.modules['cupy'] = None\nfrom crossattn_gpu import CrossAttention\nCrossAttention(4, 1, backend='cupy')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "pip install 'crossattn_gpu[cuda13]'" in done.stderr


def test_unavailable_backend_is_an_error_not_a_fallback():
    reason = backend_status()["cupy"]
    if reason is None:
        pytest.skip("CuPy and a GPU are available here")
    with pytest.raises((ImportError, RuntimeError), match="cupy"):
        CrossAttention(4, 1, backend="cupy")


gpu_only = pytest.mark.skipif(backend_status()["cupy"] is not None, reason="needs CuPy and a CUDA GPU")


def test_large_attentions_take_the_gemms_and_small_ones_the_kernel():
    """The rule needs only the shapes, so it runs without CuPy: W1 (B = 1, H = 2, L = 10) keeps the kernel's
    single launch; W2 (B = 512, H = 4, L = 256) and a single long example take the GEMMs."""
    from crossattn_gpu.backends.cupy_backend import GEMM_MIN_SCORES, CupyBackend

    def route(batch, heads, len_q, len_k):
        return CupyBackend._attends_as_gemms(np.empty((batch, heads, len_q, 0)), np.empty((batch, 1, len_k, 0)), None)

    assert not route(1, 2, 10, 10)
    assert route(512, 4, 256, 256) and route(1, 4, 4096, 4096)
    assert route(1, 1, GEMM_MIN_SCORES, 1) and not route(1, 1, GEMM_MIN_SCORES - 1, 1)


@gpu_only
def test_cupy_in_cupy_out_matches_numpy():
    import cupy

    ref = CrossAttention(24, 3, seed=0, backend="numpy")
    model = CrossAttention.from_weights(**ref.get_attention_weights(), backend="cupy")
    rng = np.random.default_rng(0)
    seq, struct = rng.standard_normal((3, 17, 24)), rng.standard_normal((3, 13, 24))
    kwargs = dict(sequential_lengths=[17, 1, 9], structural_lengths=[13, 13, 1], bidirectional=False, need_weights=True)
    want = ref.fuse_representations(seq, struct, **kwargs)
    got = model.fuse_representations(cupy.asarray(seq, dtype=cupy.float32), cupy.asarray(struct, dtype=cupy.float32), **kwargs)
    assert isinstance(got["fused_sequential"], cupy.ndarray)
    for key in ("fused_sequential", "fused_structural", "seq_similarity"):
        np.testing.assert_allclose(got[key].get(), want[key], rtol=1e-5, atol=1e-5 * np.abs(want[key]).max())


@gpu_only
def test_fuse_collection_pads_cupy_arrays_with_cupy():
    import cupy

    ref = CrossAttention(24, 3, seed=0, backend="numpy")
    model = CrossAttention.from_weights(**ref.get_attention_weights(), backend="cupy")
    rng = np.random.default_rng(1)
    seq = [rng.standard_normal((n, 24)).astype(np.float32) for n in (17, 1, 3)]
    struct = [rng.standard_normal((n, 24)).astype(np.float32) for n in (17, 1, 3)]
    got = model.fuse_collection([cupy.asarray(x) for x in seq], [cupy.asarray(x) for x in struct], batch_size=2)
    for result, xs, xt in zip(got, seq, struct):
        want = ref.fuse_representations(xs, xt, need_weights=False, need_similarity=False)
        assert isinstance(result["bidirectional_fusion"], cupy.ndarray)
        for key in ("fused_sequential", "fused_structural", "bidirectional_fusion"):
            np.testing.assert_allclose(result[key].get(), want[key], rtol=1e-5, atol=1e-5 * np.abs(want[key]).max())


@gpu_only
def test_weights_from_device_arrays_are_copied_to_the_host():
    import cupy

    ref = CrossAttention(8, 2, seed=1, backend="numpy")
    arrays = ref.get_attention_weights()
    model = CrossAttention.from_weights(*(cupy.asarray(arrays[n]) for n in arrays), backend="cupy")
    for name in arrays:
        np.testing.assert_array_equal(getattr(model, name), arrays[name])


@gpu_only
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_gemm_route_on_cupy_arrays(monkeypatch, dtype):
    """The GEMM route (``DeviceFusion._gemm_attention``) on CuPy arrays, in pieces of 5 queries, with a mask,
    ragged lengths and probabilities: NumPy's results (tests/backends/test_device_common.py runs the same
    code on torch tensors)."""
    import cupy

    ref = CrossAttention(24, 3, seed=0, backend="numpy")
    model = CrossAttention.from_weights(**ref.get_attention_weights(), backend="cupy")
    routed = []
    monkeypatch.setattr(model._backend, "_attends_as_gemms", lambda q, k, v: routed.append(q.shape) or True)
    monkeypatch.setattr(model._backend, "gemm_scores_elements", 3 * 13 * 5)
    rng = np.random.default_rng(4)
    seq, struct = rng.standard_normal((3, 17, 24)).astype(dtype), rng.standard_normal((3, 13, 24)).astype(dtype)
    mask = rng.random((3, 17, 13)) < 0.3
    mask[:, 0] = True
    kwargs = dict(sequential_lengths=[17, 1, 9], structural_lengths=[13, 13, 1], mask=mask, need_weights=True,
                  bidirectional=False)
    want = ref.fuse_representations(seq, struct, **kwargs)
    got = model.fuse_representations(cupy.asarray(seq), cupy.asarray(struct), **kwargs)
    assert routed
    tolerance = 1e-5 if dtype == "float32" else 3e-3
    for key in ("fused_sequential", "fused_structural"):
        np.testing.assert_allclose(got[key].get(), want[key], rtol=0, atol=tolerance * np.abs(want[key]).max())
    for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq"):
        for g, w in zip(got[key], want[key]):
            np.testing.assert_allclose(g.get(), w, rtol=0, atol=tolerance)
    routed.clear()
    out, weights = model.scaled_dot_product_attention(cupy.asarray(seq), cupy.asarray(struct), cupy.asarray(struct),
                                                      mask=mask, key_lengths=[13, 13, 1], need_weights=True)
    want_out, want_weights = ref.scaled_dot_product_attention(seq, struct, struct, mask=mask, key_lengths=[13, 13, 1],
                                                              need_weights=True)
    assert routed
    np.testing.assert_allclose(out.get(), want_out, rtol=0, atol=tolerance * np.abs(want_out).max())
    for g, w in zip(weights, want_weights):
        np.testing.assert_allclose(g.get(), w, rtol=0, atol=tolerance)
