"""kernels/attention_cuda.cu: compiled by nvcc in CI (no GPU needed), run against the reference on a GPU."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
CUDA_SOURCES = sorted(KERNELS.glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_compiles_to_ptx_without_warnings(tmp_path, source, arch):
    done = subprocess.run(
        ["nvcc", "-ptx", f"-arch={arch}", "--Werror", "all-warnings", "-o", str(tmp_path / "out.ptx"), str(source)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "warning" not in (done.stdout + done.stderr).lower()
    assert (tmp_path / "out.ptx").read_text().count(".entry") == 5  # every dtype's entry point


def test_there_is_a_cuda_source():
    assert CUDA_SOURCES


def _gpu():
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


cupy = _gpu()
gpu_only = pytest.mark.skipif(cupy is None, reason="needs CuPy and a CUDA GPU")


@gpu_only
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1, 1, 1), (2, 3, 1, 3, 17, 113, 24, 24), (1, 2, 2, 1, 130, 17, 100, 100),
                                   (1, 2, 1, 2, 17, 33, 1280, 1280), (1, 2, 1, 2, 70, 90, 4096, 4096)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_on_gpu(shape, dtype):
    from crossattn_gpu.backends.numpy_backend import attention as reference
    from crossattn_gpu.kernels.attention_cuda import attention

    batch, heads, heads_k, heads_v, len_q, len_k, dim_k, dim_v = shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((batch, heads, len_q, dim_k)).astype(np.float32)
    k = rng.standard_normal((batch, heads_k, len_k, dim_k)).astype(np.float32)
    v = rng.standard_normal((batch, heads_v, len_k, dim_v)).astype(np.float32)
    masked = rng.random((batch, len_q, len_k)) < 0.3
    masked[:, 0] = True
    lengths = rng.integers(1, len_k + 1, size=batch)
    try:
        dev = [cupy.asarray(x).astype(dtype) for x in (q, k, v)]
    except TypeError:
        pytest.skip(f"this CuPy has no {dtype}")
    out, lse = attention(*dev, scale=dim_k**-0.5, masked=cupy.asarray(masked), k_lengths=cupy.asarray(lengths))
    rounded = [x.astype(cupy.float64).get() for x in dev]
    want, want_lse, _ = reference(*rounded, scale=dim_k**-0.5, masked=masked, k_lengths=lengths, need_lse=True)
    got = out.astype(cupy.float64).get()
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
