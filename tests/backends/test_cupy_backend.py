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
