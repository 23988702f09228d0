"""kernels/softmax_heads.py against a float64 NumPy softmax (under Triton's interpreter on a machine
without a GPU): odd head counts and key lengths (masked blocks), strided scores, the scale, each output
dtype, and the errors of bad arguments."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from crossattn_gpu.kernels.softmax_heads import MAX_ROW_BLOCK, fits, launch_config, softmax_heads  # noqa: E402

if not interpreter_mode() and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

DEVICE = "cpu" if interpreter_mode() else "cuda"
OUT_DTYPES = [torch.float32, torch.float16] + ([] if interpreter_mode() else [torch.bfloat16])
#: Rounding of one value to each dtype, relative (probabilities are at most 1).
ROUNDING = {torch.float32: 2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def reference(scores: np.ndarray, scale: float) -> np.ndarray:
    """(B, Lq, H, Lk) -> (B, Lq, Lk, H), in float64."""
    s = scores.astype(np.float64) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).transpose(0, 1, 3, 2)


def check(scores: torch.Tensor, scale: float, out_dtype) -> None:
    got = softmax_heads(scores, scale=scale, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.is_contiguous()
    want = reference(scores.cpu().numpy(), scale)
    got = got.cpu().double().numpy()
    assert got.shape == want.shape and np.isfinite(got).all()
    # float32: exp2 of the scaled scores loses a few ulps of their magnitude (|s| up to ~12 here).
    tolerance = 4 * ROUNDING[out_dtype] if out_dtype != torch.float32 else 2e-5
    assert np.abs(got - want).max() <= tolerance


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("batch,len_q,heads,len_k", [(1, 1, 1, 1), (2, 3, 3, 17), (1, 2, 8, 256), (2, 1, 5, 113),
                                                      (1, 2, 16, 257), (3, 2, 2, 3), (1, 1, 1, 1024),
                                                      (2, 3, 3, 16), (1, 2, 5, 64)])  # whole keys, padded heads
def test_matches_float64(batch, len_q, heads, len_k, out_dtype):
    gen = torch.Generator().manual_seed(batch * 1000 + len_k)
    scores = (torch.randn(batch, len_q, heads, len_k, generator=gen) * 4).to(DEVICE)
    check(scores, 0.7, out_dtype)


def test_strided_scores_and_large_magnitudes():
    """A view with the keys not innermost, and scores of 1e4 (the maximum is subtracted first: no
    overflow) and a row of equal scores (uniform)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 19, 4, 5, generator=gen) * 1e4
    base[0, :, 1, 2] = 7.0
    scores = base.permute(0, 3, 2, 1).to(DEVICE)  # (2, 5, 4, 19), strided
    assert not scores.is_contiguous()
    check(scores, 1.0, torch.float32)
    uniform = softmax_heads(scores, out_dtype=torch.float32)[0, 2, :, 1]
    assert torch.allclose(uniform, torch.full_like(uniform, 1 / 19))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("batch,len_q,heads,len_k", [(3, 5, 3, 17), (2, 4, 8, 256), (2, 3, 1, 1)])
def test_ragged_keys_and_queries(batch, len_q, heads, len_k, out_dtype):
    """Keys past each example's length get probability 0, the rest a softmax of their own; queries past
    its query length get rows of zeros, even where their scores are huge."""
    rng = np.random.default_rng(len_k)
    scores = rng.standard_normal((batch, len_q, heads, len_k)).astype(np.float32) * 4
    k_len = rng.integers(1, len_k + 1, size=batch)
    q_len = rng.integers(1, len_q + 1, size=batch)
    k_len[0], q_len[-1] = 1, 1
    scores[-1, 1:] = 3e38  # padded queries: their scores never reach the probabilities
    got = softmax_heads(torch.tensor(scores, device=DEVICE), scale=0.5, out_dtype=out_dtype,
                        k_lengths=torch.tensor(k_len, device=DEVICE), q_lengths=torch.tensor(q_len, device=DEVICE))
    got = got.cpu().double().numpy()
    assert np.isfinite(got).all()
    for b in range(batch):
        want = reference(scores[b : b + 1, : q_len[b], :, : k_len[b]], 0.5)[0]
        tolerance = 4 * ROUNDING[out_dtype] if out_dtype != torch.float32 else 2e-5
        assert np.abs(got[b, : q_len[b], : k_len[b]] - want).max() <= tolerance
        assert not got[b, q_len[b] :].any() and not got[b, :, k_len[b] :].any()


def test_empty_batch_or_queries():
    for shape in [(0, 3, 2, 5), (2, 0, 2, 5)]:
        assert softmax_heads(torch.zeros(shape, device=DEVICE)).shape == (shape[0], shape[1], 5, 2)


def test_launch_config_and_fits():
    assert launch_config(8, 256) == {"BLOCK_H": 8, "BLOCK_K": 256, "num_warps": 2}
    assert launch_config(3, 17) == {"BLOCK_H": 4, "BLOCK_K": 32, "num_warps": 1}
    assert launch_config(16, 1024)["num_warps"] == 8
    assert fits(16, 1024) and not fits(16, 1025) and not fits(17, 1024) and fits(1, MAX_ROW_BLOCK)


def test_bad_arguments_name_the_problem():
    good = torch.zeros(1, 2, 3, 4, device=DEVICE)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        softmax_heads(np.zeros((1, 2, 3, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="scores must be float32; got float16"):
        softmax_heads(good.half())
    with pytest.raises(ValueError, match=r"scores must be \(B, Lq, H, Lk\)"):
        softmax_heads(good[0])
    with pytest.raises(TypeError, match="out_dtype must be"):
        softmax_heads(good, out_dtype=torch.int32)
    for shape in [(1, 2, 3, 0), (1, 2, 0, 4)]:
        with pytest.raises(ValueError, match="at least one head and one key"):
            softmax_heads(torch.zeros(shape, device=DEVICE))
    with pytest.raises(ValueError, match="17 heads x 1024 keys pass"):
        softmax_heads(torch.zeros(1, 1, 17, 1024, device=DEVICE))
    with pytest.raises(ValueError, match=r"k_lengths must lie in 1..4"):
        softmax_heads(good, k_lengths=torch.tensor([5], device=DEVICE))
    with pytest.raises(ValueError, match=r"q_lengths must be an integer tensor of shape \(1,\)"):
        softmax_heads(good, q_lengths=torch.tensor([1, 2], device=DEVICE), lengths_checked=True)
