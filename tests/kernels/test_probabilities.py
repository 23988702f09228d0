"""kernels/probabilities.py against the NumPy reference of the kernel contract (its weights), on the
attention kernels' shape grid (under Triton's interpreter on a machine without a GPU): masks with a fully
masked row, key and query lengths of 1, keys shared by the heads, strided views, 16-bit within twice a
plain torch softmax's error, and the errors of bad arguments."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from crossattn_gpu.backends.numpy_backend import attention as reference  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from crossattn_gpu.kernels.probabilities import probabilities  # noqa: E402

if not interpreter_mode() and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from attention_check import DEVICE, DTYPES  # noqa: E402
from shapes import MASKED_SHAPES, SHAPES  # noqa: E402


def drawn(shape, dtype, rng):
    return torch.tensor(rng.standard_normal(shape), dtype=dtype, device=DEVICE)


def plain_torch(q, k, scale, masked, k_lengths):
    """The probabilities written plainly in torch in the inputs' dtype (a float32 softmax): the yardstick."""
    scores = torch.matmul(q, k.expand(-1, q.shape[1], -1, -1).transpose(-1, -2)) * scale
    if masked is not None:
        scores = scores.masked_fill(masked[:, None], -1e9 if q.dtype == torch.float32 else -6e4)
    if k_lengths is not None:
        pad = torch.arange(k.shape[2], device=q.device)[None, :] >= k_lengths[:, None]
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype)


def check(batch, heads, heads_k, len_q, len_k, dim, dtype, mask=False, ragged=False, seed=0):
    rng = np.random.default_rng(seed)
    q, k = drawn((batch, heads, len_q, dim), dtype, rng), drawn((batch, heads_k, len_k, dim), dtype, rng)
    masked = k_lengths = q_lengths = None
    if mask:
        masked = torch.tensor(rng.random((batch, len_q, len_k)) < 0.3, device=DEVICE)
        masked[:, 0] = True  # a fully masked row: uniform
    if ragged:
        k_lengths = torch.tensor(rng.integers(1, len_k + 1, size=batch), device=DEVICE)
        q_lengths = torch.tensor(rng.integers(1, len_q + 1, size=batch), device=DEVICE)
        k_lengths[0], q_lengths[-1] = 1, 1
    scale = 1.0 / np.sqrt(dim)
    got = probabilities(q, k, scale=scale, masked=masked, k_lengths=k_lengths, q_lengths=q_lengths)
    assert got.dtype == dtype and got.shape == (batch, heads, len_q, len_k) and got.is_contiguous()
    _, _, want = reference(q.double().cpu().numpy(), k.double().cpu().numpy(), k.double().cpu().numpy(), scale=scale,
                           masked=None if masked is None else masked.cpu().numpy(),
                           k_lengths=None if k_lengths is None else k_lengths.cpu().numpy(), need_weights=True)
    yardstick = plain_torch(q, k, scale, masked, k_lengths).double().cpu().numpy()
    if ragged:
        live = (torch.arange(len_q, device=DEVICE)[None, :] < q_lengths[:, None]).cpu().numpy()
        want = np.where(live[:, None, :, None], want, 0.0)
        yardstick = np.where(live[:, None, :, None], yardstick, 0.0)
        got_np = got.double().cpu().numpy()
        assert np.all(got_np[~np.broadcast_to(live[:, None, :, None], got_np.shape)] == 0)  # padded queries
        past = (torch.arange(len_k, device=DEVICE)[None, :] >= k_lengths[:, None]).cpu().numpy()
        assert np.all(got_np[np.broadcast_to(past[:, None, None, :], got_np.shape)] == 0)  # padded keys
    got = got.double().cpu().numpy()
    assert np.isfinite(got).all()
    err = np.abs(got - want).max()
    if dtype == torch.float32:
        assert err <= 1e-6
    else:  # 16 bits: within twice plain torch's error
        assert err <= 2 * np.abs(yardstick - want).max()
    if mask:  # the fully masked rows are uniform over the keys within the length
        for b in range(batch):
            n = len_k if k_lengths is None else int(k_lengths[b])
            np.testing.assert_allclose(got[b, :, 0, :n], 1.0 / n, rtol=2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    batch, heads, heads_k, _, len_q, len_k, dim, _ = shape
    check(batch, heads, heads_k, len_q, len_k, dim, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MASKED_SHAPES + [(2, 3, 3, 3, 257, 3, 16, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_masks_and_lengths(shape, dtype):
    batch, heads, heads_k, _, len_q, len_k, dim, _ = shape
    check(batch, heads, heads_k, len_q, len_k, dim, dtype, mask=True, ragged=True)


def test_strided_views_and_other_output_dtype():
    rng = np.random.default_rng(1)
    base_q, base_k = drawn((2, 40, 3, 20), torch.float32, rng), drawn((2, 50, 1, 20), torch.float32, rng)
    q, k = base_q.permute(0, 2, 1, 3)[:, :, ::2], base_k.permute(0, 2, 1, 3)  # (2, 3, 20, 20), (2, 1, 50, 20)
    got = probabilities(q, k, scale=0.5, out_dtype=torch.float16)
    want = probabilities(q.contiguous(), k.contiguous(), scale=0.5).half()
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_arguments_raise():
    q, k = torch.zeros(1, 2, 3, 4, device=DEVICE), torch.zeros(1, 1, 5, 4, device=DEVICE)
    with pytest.raises(ValueError):
        probabilities(q[0], k, scale=1.0)
    with pytest.raises(ValueError):
        probabilities(q, torch.zeros(1, 1, 5, 3, device=DEVICE), scale=1.0)
    with pytest.raises((TypeError, ValueError)):
        probabilities(q, k.half(), scale=1.0)
    with pytest.raises(ValueError):
        probabilities(q, k, scale=1.0, masked=torch.zeros(1, 3, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError):
        probabilities(q, k, scale=1.0, k_lengths=torch.tensor([6], device=DEVICE))


def test_batch_chunks_bound_the_scratch_and_change_nothing(monkeypatch):
    """A batch whose scores pass ``attention_two_pass.SCRATCH_BYTES`` is computed a chunk of examples at a
    time, each chunk with its own examples' mask and lengths."""
    from crossattn_gpu.kernels import attention_two_pass as two_pass

    rng = np.random.default_rng(4)
    q, k = drawn((5, 2, 17, 24), torch.float32, rng), drawn((5, 1, 33, 24), torch.float32, rng)
    masked = torch.tensor(rng.random((5, 17, 33)) < 0.3, device=DEVICE)
    kwargs = dict(scale=0.2, masked=masked, k_lengths=torch.tensor([33, 1, 20, 7, 33], device=DEVICE),
                  q_lengths=torch.tensor([17, 3, 1, 17, 9], device=DEVICE))
    whole = probabilities(q, k, **kwargs)
    cfg = two_pass.launch_config(17, 33, 24, 24, 4, "ieee")
    rows, cols = -(-17 // cfg["BLOCK_M"]) * cfg["BLOCK_M"], -(-33 // cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    monkeypatch.setattr(two_pass, "SCRATCH_BYTES", 2 * 2 * rows * cols * 4)  # chunks of 2, 2 and 1 examples
    assert torch.equal(probabilities(q, k, **kwargs), whole)
    for b in range(5):  # and each example is its own, as computed alone
        alone = probabilities(q[b : b + 1], k[b : b + 1], scale=0.2, masked=masked[b : b + 1],
                              k_lengths=kwargs["k_lengths"][b : b + 1], q_lengths=kwargs["q_lengths"][b : b + 1])
        assert torch.equal(whole[b : b + 1], alone), b
