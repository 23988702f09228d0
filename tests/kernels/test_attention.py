"""kernels/attention.py against the NumPy reference of the kernel contract (SPEC section 3).

On a machine without a GPU these run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on torch CPU tensors: indexing, masking and arithmetic are checked, not speed.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from crossattn_gpu.backends.numpy_backend import attention as reference  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from crossattn_gpu.kernels.attention import attention, launch_config  # noqa: E402
from shapes import MASKED_SHAPES, SHAPES  # noqa: E402

if not interpreter_mode() and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

DEVICE = "cpu" if interpreter_mode() else "cuda"
DTYPES = [torch.float32, torch.float16] + ([] if interpreter_mode() else [torch.bfloat16])


def plain_torch(q, k, v, scale, masked, k_lengths):
    """The same attention written plainly in torch, in the inputs' dtype: the accuracy yardstick."""
    kk = k.expand(-1, q.shape[1], -1, -1)
    vv = v.expand(-1, q.shape[1], -1, -1)
    scores = torch.matmul(q, kk.transpose(-1, -2)) * scale
    if masked is not None:
        scores = scores.masked_fill(masked[:, None], -1e9 if q.dtype == torch.float32 else -6e4)
    if k_lengths is not None:
        pad = torch.arange(k.shape[2], device=q.device)[None, :] >= k_lengths[:, None]
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), vv)


def check(batch, heads, heads_k, heads_v, len_q, len_k, dim_k, dim_v, dtype, mask=False, ragged=False, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, len_q, dim_k))
    k = rng.standard_normal((batch, heads_k, len_k, dim_k))
    v = rng.standard_normal((batch, heads_v, len_k, dim_v))
    masked = None
    if mask:
        masked = rng.random((batch, len_q, len_k)) < 0.3
        masked[:, 0] = True  # a fully masked row: uniform weights
    lengths = rng.integers(1, len_k + 1, size=batch) if ragged else None
    if ragged:
        lengths[0] = 1  # one example of length 1
    scale = 1.0 / np.sqrt(dim_k)

    def dev(x, dt=dtype):
        return torch.tensor(x, dtype=dt, device=DEVICE)

    tq, tk, tv = dev(q), dev(k), dev(v)
    # The reference sees the inputs as rounded to the dtype, in float64.
    want, want_lse, _ = reference(
        *(t.double().cpu().numpy() for t in (tq, tk, tv)), scale=scale, masked=masked, k_lengths=lengths, need_lse=True
    )
    t_masked = None if masked is None else torch.tensor(masked, device=DEVICE)
    t_lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    out, lse = attention(tq, tk, tv, scale=scale, masked=t_masked, k_lengths=t_lengths)
    assert out.dtype == dtype and out.shape == (batch, heads, len_q, dim_v)
    got = out.double().cpu().numpy()
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    # The heads' sum, as the fusion asks for it (in registers when Dv fits one chunk).
    summed, summed_lse = attention(tq, tk, tv, scale=scale, masked=t_masked, k_lengths=t_lengths, sum_heads=True)
    assert summed.dtype == dtype and summed.shape == (batch, len_q, dim_v)
    torch.testing.assert_close(summed_lse, lse, rtol=1e-6, atol=1e-6)
    want_sum = want.sum(1)
    got_sum = summed.double().cpu().numpy()
    assert np.isfinite(got_sum).all()
    err_sum = np.abs(got_sum - want_sum).max() / np.abs(want_sum).max()
    if dtype == torch.float32:
        assert err <= 1e-5, err
        assert err_sum <= 1e-5, err_sum
    else:
        yard_heads = plain_torch(tq, tk, tv, scale, t_masked, t_lengths)
        yard = yard_heads.double().cpu().numpy()
        yard_err = np.abs(yard - want).max() / np.abs(want).max()
        assert err <= 2 * yard_err, (err, yard_err)
        yard_sum = yard_heads.float().sum(1).to(dtype).double().cpu().numpy()
        yard_sum_err = np.abs(yard_sum - want_sum).max() / np.abs(want_sum).max()
        assert err_sum <= 2 * yard_sum_err, (err_sum, yard_sum_err)
    # lse: compare where rows are not fully masked (there lse is about -1e9 and float32 holds it coarsely)
    lse_err = np.abs(lse.double().cpu().numpy() - want_lse) / np.maximum(np.abs(want_lse), 1.0)
    assert lse_err.max() <= (1e-5 if dtype == torch.float32 else 2e-3)




@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    check(*shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MASKED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masks_and_ragged_keys(shape, dtype):
    check(*shape, dtype=dtype, mask=True, ragged=True)


def test_strided_inputs_and_shared_mask():
    rng = np.random.default_rng(1)
    base = torch.tensor(rng.standard_normal((2, 9, 3, 2, 16)), dtype=torch.float32, device=DEVICE)
    q = base[:, :, 0].transpose(1, 2)  # (B, H, L, D) views with odd strides
    k = base[:, :, 1, :1].transpose(1, 2)
    v = base[:, :, 2].transpose(1, 2)
    masked = torch.tensor(rng.random((1, 9, 9)) < 0.5, device=DEVICE)
    out, _ = attention(q, k, v, scale=0.25, masked=masked)
    want, _, _ = reference(*(t.double().cpu().numpy() for t in (q, k, v)), scale=0.25, masked=masked.cpu().numpy())
    np.testing.assert_allclose(out.double().cpu().numpy(), want, rtol=1e-5, atol=1e-6)


def test_float32_output_for_half_inputs():
    q = torch.randn(1, 1, 5, 8, device=DEVICE).half()
    out, _ = attention(q, q, q, scale=0.3, out_dtype=torch.float32)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda q: (q[0], q, q), ValueError, "q must have rank 4"),
        (lambda q: (q, q.half(), q), TypeError, "share one dtype"),
        (lambda q: (q.double(), q.double(), q.double()), TypeError, "float32, float16 or bfloat16"),
        (lambda q: (q, q[..., :4], q), ValueError, "share the head width"),
        (lambda q: (q, q, q[:, :, :3]), ValueError, "share the key length"),
        (lambda q: (q, torch.cat([q, q], 1)[:, :3], q), ValueError, "k must have 1 or 2 heads"),
        (lambda q: (q, q[:1], q), ValueError, "batch sizes differ"),
    ],
)
def test_launcher_rejects_bad_inputs(make, error, message):
    q = torch.randn(2, 2, 5, 8, device=DEVICE)
    with pytest.raises(error, match=message):
        attention(*make(q), scale=1.0)


def test_launcher_rejects_bad_lengths_and_masks():
    q = torch.randn(2, 1, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"k_lengths must lie in 1..5"):
        attention(q, q, q, scale=1.0, k_lengths=torch.tensor([5, 6], device=DEVICE))
    with pytest.raises(ValueError, match=r"k_lengths must lie in 1..5"):
        attention(q, q, q, scale=1.0, k_lengths=torch.tensor([0, 2], device=DEVICE))
    with pytest.raises(ValueError, match="k_lengths must be an integer tensor"):
        attention(q, q, q, scale=1.0, k_lengths=torch.tensor([1.0, 2.0], device=DEVICE))
    with pytest.raises(ValueError, match=r"masked must have shape \(1 or 2, 5, 5\)"):
        attention(q, q, q, scale=1.0, masked=torch.ones(3, 5, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="masked must be bool or uint8"):
        attention(q, q, q, scale=1.0, masked=torch.ones(1, 5, 5, device=DEVICE))


def test_launch_config_tiles_any_width():
    for width in (1, 64, 100, 257, 1280, 4096):
        cfg = launch_config(256, 256, width, width, itemsize=2)
        assert 16 <= cfg["BLOCK_DK"] <= 128 and 16 <= cfg["BLOCK_DV"] <= 128
    for width in (129, 200, 256):  # 16-bit heads up to 256 wide take one chunk
        cfg = launch_config(256, 256, width, width, itemsize=2)
        assert cfg["BLOCK_DK"] == cfg["BLOCK_DV"] == 256
    assert launch_config(256, 256, 256, 256, itemsize=4)["BLOCK_DK"] == 64
    assert launch_config(1, 1, 1, 1, itemsize=4)["BLOCK_M"] == 16
    assert launch_config(3, 17, 8, 8, itemsize=2)["BLOCK_M"] == 16 and launch_config(3, 17, 8, 8, 2)["BLOCK_N"] == 32
    assert launch_config(9, 9, 8, 8, itemsize=4)["INPUT_PRECISION"] == "ieee"
    assert launch_config(9, 9, 8, 8, itemsize=4, allow_tf32=True)["INPUT_PRECISION"] == "tf32"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_width_4096(dtype):
    check(1, 2, 1, 2, 70, 90, 4096, 4096, dtype=dtype, ragged=True)
