"""kernels/attention_two_pass.py against the NumPy reference of the kernel contract (SPEC section 3), on
the same grid as the fused kernel (under Triton's interpreter on a machine without a GPU)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from crossattn_gpu.kernels.attention_two_pass import (  # noqa: E402
    TF32X3_TWO_STAGES_SHARED_MEMORY, attention_two_pass, launch_config, preferred,
)

if not interpreter_mode() and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from attention_check import DEVICE, DTYPES, check, check_float32_precisions, check_without_lse  # noqa: E402
from shapes import MASKED_SHAPES, SHAPES  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    check(attention_two_pass, *shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MASKED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masks_and_ragged_keys(shape, dtype):
    check(attention_two_pass, *shape, dtype=dtype, mask=True, ragged=True)


def test_float32_precisions():
    check_float32_precisions(attention_two_pass)


def test_the_lse_only_when_asked():
    check_without_lse(attention_two_pass)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_width_4096(dtype):
    check(attention_two_pass, 1, 2, 1, 2, 70, 90, 4096, 4096, dtype=dtype, ragged=True)


def test_strided_inputs_broadcast_values_and_shared_mask():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 9, 3, 2, 40, generator=gen).to(DEVICE)
    q = base[:, :, 0].transpose(1, 2)  # (B, H, L, D) views with odd strides
    k = base[:, :, 1, :1].transpose(1, 2)
    v = base[:, :, 2, :1].transpose(1, 2)  # one value head for both query heads
    masked = torch.rand(1, 9, 9, generator=gen).to(DEVICE) < 0.5
    got, got_lse = attention_two_pass(q, k, v, scale=0.25, masked=masked)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    scores = scores.masked_fill(masked[:, None], -1e9)
    torch.testing.assert_close(got.double(), torch.softmax(scores, -1) @ v.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_lse.double(), torch.logsumexp(scores, -1), rtol=1e-6, atol=1e-5)


def test_config_override_and_bad_config():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 20, 150, generator=gen).to(DEVICE)
    cfg = launch_config(20, 20, 150, 150, itemsize=4)
    small = {**cfg, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_DK": 16, "BLOCK_DV": 32}
    got, _ = attention_two_pass(q, q, q, scale=0.1, config=small)
    want, _ = attention_two_pass(q, q, q, scale=0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="config must have exactly the keys"):
        attention_two_pass(q, q, q, scale=0.1, config={"BLOCK_M": 16})


def test_launch_config_fits_the_gpus_shared_memory():
    w3 = (256, 256, 1280, 1280)
    large = launch_config(*w3, 4, "tf32x3")
    assert large["num_stages"] == 2
    for shared_memory in (TF32X3_TWO_STAGES_SHARED_MEMORY, 227 * 1024):  # A100, H100 / H200
        assert launch_config(*w3, 4, "tf32x3", shared_memory=shared_memory) == large
    small = launch_config(*w3, 4, "tf32x3", shared_memory=99 * 1024)  # sm_86, sm_89, sm_120
    assert small == {**large, "num_stages": 1}
    for itemsize, precision in ((4, "ieee"), (4, "tf32"), (2, "ieee")):  # these fit 99 KiB with the large stages
        same = launch_config(*w3, itemsize, precision)
        assert launch_config(*w3, itemsize, precision, shared_memory=99 * 1024) == same


def small_shared_memory_tf32x3(q, k, v, **kwargs):
    """The two-pass operator in tf32x3, in the launch configuration of a GPU with 99 KiB of shared memory a
    block (one stage)."""
    len_q, dim_k = q.shape[2:]
    len_k, dim_v = k.shape[2], v.shape[3]
    config = launch_config(len_q, len_k, dim_k, dim_v, 4, "tf32x3", shared_memory=99 * 1024)
    return attention_two_pass(q, k, v, config=config, **kwargs)


@pytest.mark.parametrize("shape", [(2, 2, 1, 2, 17, 113, 100, 100), (1, 2, 1, 2, 33, 70, 130, 300)],
                         ids=lambda s: "x".join(map(str, s)))
def test_tf32x3_on_gpus_with_less_shared_memory(shape):
    check(small_shared_memory_tf32x3, *shape, dtype=torch.float32, mask=True, ragged=True)


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda q: (q[0], q, q), ValueError, "q must have rank 4"),
        (lambda q: (q, q.half(), q), TypeError, "share one dtype"),
        (lambda q: (q, q, q[:, :, :3]), ValueError, "share the key length"),
        (lambda q: (q.numpy(), q, q), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_rejects_bad_inputs(make, error, message):
    q = torch.randn(2, 2, 5, 300)
    with pytest.raises(error, match=message):
        attention_two_pass(*make(q), scale=1.0)


def test_rejects_bad_lengths_and_masks():
    q = torch.randn(2, 1, 5, 300, device=DEVICE)
    with pytest.raises(ValueError, match=r"k_lengths must lie in 1..5"):
        attention_two_pass(q, q, q, scale=1.0, k_lengths=torch.tensor([5, 6], device=DEVICE))
    with pytest.raises(ValueError, match=r"q_lengths must lie in 1..5"):
        attention_two_pass(q, q, q, scale=1.0, q_lengths=torch.tensor([0, 5], device=DEVICE))
    with pytest.raises(ValueError, match=r"masked must have shape \(1 or 2, 5, 5\)"):
        attention_two_pass(q, q, q, scale=1.0, masked=torch.ones(3, 5, 5, dtype=torch.bool, device=DEVICE))


def test_preferred_only_where_the_fused_kernel_would_chunk_and_keys_are_few():
    assert preferred(256, 256, 1280, 1280, itemsize=2)  # W3
    assert preferred(256, 256, 1280, 1280, itemsize=4)
    assert not preferred(256, 256, 128, 128, itemsize=2)  # W2: one register chunk
    assert not preferred(4096, 4096, 256, 256, itemsize=2)  # W4
    assert not preferred(256, 256, 128, 128, itemsize=4)  # float32 W2: keys outnumber the width
    assert not preferred(256, 4096, 1280, 1280, itemsize=2)  # long keys: the scores would be the bigger scratch
    assert preferred(17, 33, 24, 300, itemsize=2)  # Dv alone too wide for one chunk


@pytest.mark.parametrize("sum_heads", [False, True])
def test_batch_chunks_bound_the_scratch_and_change_nothing(monkeypatch, sum_heads):
    from crossattn_gpu.kernels import attention_two_pass as module

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 2, 17, 100, generator=gen).to(DEVICE)
    k = torch.randn(5, 1, 33, 100, generator=gen).to(DEVICE)
    v = torch.randn(5, 2, 33, 100, generator=gen).to(DEVICE)
    masked = torch.rand(5, 17, 33, generator=gen).to(DEVICE) < 0.3
    lengths = torch.tensor([33, 1, 20, 7, 33], device=DEVICE)
    kwargs = dict(scale=0.1, masked=masked, k_lengths=lengths, sum_heads=sum_heads)
    whole = attention_two_pass(q, k, v, **kwargs)
    cfg = launch_config(17, 33, 100, 100, itemsize=4)
    rows, cols = -(-17 // cfg["BLOCK_M"]) * cfg["BLOCK_M"], -(-33 // cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    one_example = 2 * rows * cols * 4  # heads x padded Lq x padded Lk x 4 bytes
    monkeypatch.setattr(module, "SCRATCH_BYTES", 2 * one_example)  # chunks of 2, 2 and 1 examples
    chunked = attention_two_pass(q, k, v, **kwargs)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
