"""kernels/attention.py against the NumPy reference of the kernel contract (SPEC section 3).

On a machine without a GPU these run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on torch CPU tensors: indexing, masking and arithmetic are checked, not speed.
The grid runs the fused kernel itself (a ``config`` keeps every shape there, wide heads included);
tests/kernels/test_attention_two_pass.py runs the same grid through the two-pass operator.
"""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from crossattn_gpu.backends.numpy_backend import attention as reference  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from crossattn_gpu.kernels import attention_two_pass  # noqa: E402
from crossattn_gpu.kernels.attention import HEADS_256_SHARED_MEMORY, attention, launch_config  # noqa: E402
from crossattn_gpu.kernels.attention_common import shared_memory_per_block  # noqa: E402

if not interpreter_mode() and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from attention_check import DEVICE, DTYPES, check, check_float32_precisions, check_without_lse  # noqa: E402
from shapes import MASKED_SHAPES, SHAPES  # noqa: E402


def fused(q, k, v, precision="ieee", **kwargs):
    """The fused kernel whatever the shape: an explicit config bypasses the two-pass dispatch."""
    len_q, dim_k = q.shape[2:]
    len_k, dim_v = k.shape[2], v.shape[3]
    config = launch_config(len_q, len_k, dim_k, dim_v, q.element_size(), precision)
    return attention(q, k, v, config=config, **kwargs)



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    check(fused, *shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MASKED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masks_and_ragged_keys(shape, dtype):
    check(fused, *shape, dtype=dtype, mask=True, ragged=True)


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
    k = torch.randn(2, 1, 7, 8, device=DEVICE)  # Lq = 5, Lk = 7: each lengths' own bound
    with pytest.raises(ValueError, match=r"q_lengths must lie in 1..5; got values from 2 to 6"):
        attention(q, k, k, scale=1.0, q_lengths=torch.tensor([6, 2], device=DEVICE),
                  k_lengths=torch.tensor([7, 7], device=DEVICE))
    with pytest.raises(ValueError, match=r"q_lengths must be an integer tensor of shape \(2,\)"):
        attention(q, k, k, scale=1.0, q_lengths=torch.tensor([5], device=DEVICE), lengths_checked=True)
    with pytest.raises(ValueError, match=r"masked must have shape \(1 or 2, 5, 5\)"):
        attention(q, q, q, scale=1.0, masked=torch.ones(3, 5, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="masked must be bool or uint8"):
        attention(q, q, q, scale=1.0, masked=torch.ones(1, 5, 5, device=DEVICE))


def test_checked_lengths_skip_only_the_range_check():
    q = torch.randn(2, 1, 5, 8, device=DEVICE)
    lengths = torch.tensor([5, 2], device=DEVICE)
    torch.testing.assert_close(attention(q, q, q, scale=0.3, k_lengths=lengths, lengths_checked=True),
                               attention(q, q, q, scale=0.3, k_lengths=lengths))
    with pytest.raises(ValueError, match="k_lengths must be an integer tensor"):  # shape and dtype still checked
        attention(q, q, q, scale=1.0, k_lengths=torch.tensor([5], device=DEVICE), lengths_checked=True)


def small_shared_memory_fused(q, k, v, precision="ieee", **kwargs):
    """The fused kernel in the launch configuration of a GPU with 99 KiB of shared memory a block."""
    len_q, dim_k = q.shape[2:]
    len_k, dim_v = k.shape[2], v.shape[3]
    config = launch_config(len_q, len_k, dim_k, dim_v, q.element_size(), precision, shared_memory=99 * 1024)
    return attention(q, k, v, config=config, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 1, 2, 33, 70, 256, 256), (2, 2, 1, 2, 70, 65, 200, 130)],
                         ids=lambda s: "x".join(map(str, s)))
def test_heads_256_wide_on_gpus_with_less_shared_memory(shape, dtype):
    check(small_shared_memory_fused, *shape, dtype=dtype, mask=True, ragged=True)


def test_launch_config_fits_the_gpus_shared_memory():
    large = launch_config(4096, 4096, 256, 256, itemsize=2)
    assert (large["BLOCK_M"], large["BLOCK_N"], large["num_warps"], large["num_stages"]) == (128, 64, 8, 2)
    for shared_memory in (HEADS_256_SHARED_MEMORY, 227 * 1024):  # A100, H100 / H200
        assert launch_config(4096, 4096, 256, 256, 2, shared_memory=shared_memory) == large
    small = launch_config(4096, 4096, 256, 256, 2, shared_memory=99 * 1024)  # sm_86, sm_89, sm_120
    assert (small["BLOCK_M"], small["BLOCK_N"], small["num_warps"], small["num_stages"]) == (64, 64, 4, 1)
    for shape, itemsize in (((256, 256, 128, 128), 2), ((256, 256, 256, 256), 4), ((256, 256, 1280, 1280), 2)):
        assert launch_config(*shape, itemsize, shared_memory=99 * 1024) == launch_config(*shape, itemsize)
    assert shared_memory_per_block(torch.empty(1)) is None  # the interpreter's tensors: no limit
    if DEVICE == "cuda":  # what Triton checks a launch against: 227 KiB on an H200
        assert shared_memory_per_block(torch.empty(1, device=DEVICE)) >= 99 * 1024


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
    assert launch_config(9, 9, 8, 8, itemsize=4, precision="tf32x3")["INPUT_PRECISION"] == "tf32x3"
    assert launch_config(9, 9, 8, 8, itemsize=2, precision="tf32x3")["INPUT_PRECISION"] == "ieee"  # 16-bit dots
    # TMA loads are chosen by a config (the sweep's), not yet by default: untimed on a GPU.
    assert not any(launch_config(256, 256, 128, 128, 2)[key] for key in ("TMA", "WARP_SPECIALIZE"))
    for itemsize in (4, 2):  # refused for 16-bit inputs too, which ignore a valid one
        with pytest.raises(ValueError, match="precision must be one of ieee, tf32x3, tf32"):
            launch_config(9, 9, 8, 8, itemsize=itemsize, precision="fast")


#: TMA needs an sm_90 or newer GPU (the interpreter emulates it on the CPU).
needs_tma = pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9,
                               reason="TMA loads need an sm_90 or newer GPU")


def tma_fused(warp_specialize: bool):
    """The fused kernel's launcher with its tiles loaded by TMA (``_attention_fwd_tma``)."""

    def launch(q, k, v, precision="ieee", **kwargs):
        len_q, dim_k = q.shape[2:]
        len_k, dim_v = k.shape[2], v.shape[3]
        config = {**launch_config(len_q, len_k, dim_k, dim_v, q.element_size(), precision),
                  "TMA": True, "WARP_SPECIALIZE": warp_specialize}
        return attention(q, k, v, config=config, **kwargs)

    return launch


#: Whole tiles (the TMA kernel's case): Lq != Lk, keys or values shared by the heads or not, Dk != Dv,
#: the smallest tiles (16), and query and key lengths that differ in blocks.
TMA_SHAPES = [(2, 3, 1, 3, 128, 64, 32, 32), (1, 2, 2, 1, 32, 192, 64, 64), (3, 1, 1, 1, 16, 16, 16, 16),
              (1, 2, 1, 2, 64, 128, 16, 64)]


@needs_tma
@pytest.mark.parametrize("warp_specialize", [False, True], ids=["tma", "tma+ws"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tma_loads_match_reference(shape, dtype, warp_specialize):
    check(tma_fused(warp_specialize), *shape, dtype=dtype)


@needs_tma
def test_tma_loads_on_the_fusions_strided_projections():
    """Queries and values as the fusion projects them ((B, L, parts, H, D) views), the raw inputs as keys,
    and queries broadcast over the heads: the descriptors follow their strides, with the pointer kernel's
    results."""
    batch, heads, length, width = 2, 3, 64, 32
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(batch, length, 2, heads, width, generator=gen).to(DEVICE)
    q, v = rows.movedim((2, 3), (0, 2))  # (B, H, L, D) views, row stride 2 * H * D
    keys = torch.randn(batch, length, width, generator=gen).to(DEVICE)[:, None]
    shared_queries = q[:, :1].expand(-1, heads, -1, -1)  # broadcast over the heads: stride 0
    for queries, sum_heads in itertools.product((q, shared_queries), (False, True)):
        got, got_lse = tma_fused(False)(queries, keys, v, scale=0.2, sum_heads=sum_heads)
        want, want_lse = fused(queries, keys, v, scale=0.2, sum_heads=sum_heads)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-6, atol=1e-6)
    half = [t.half() for t in (q, keys, v)]  # a float32 output for 16-bit inputs keeps the accumulator's bits
    got, _ = tma_fused(True)(*half, scale=0.2, sum_heads=True, out_dtype=torch.float32)
    want, _ = fused(*half, scale=0.2, sum_heads=True, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_tma
@pytest.mark.parametrize(
    "make,message",
    [
        (lambda q: dict(q=q, masked=torch.zeros(1, 64, 64, dtype=torch.bool, device=DEVICE)), "no mask and no lengths"),
        (lambda q: dict(q=q, k_lengths=torch.tensor([64, 3], device=DEVICE)), "no mask and no lengths"),
        (lambda q: dict(q=q, q_lengths=torch.tensor([64, 3], device=DEVICE)), "no mask and no lengths"),
        (lambda q: dict(q=q[:, :, :48]), "Lq a multiple of BLOCK_M"),
        (lambda q: dict(q=q, config={"BLOCK_DK": 64}), "Dk == BLOCK_DK"),
        # A base 4 bytes past 16-byte alignment; rows 72 bytes apart; the batch broadcast (stride 0).
        (lambda q: dict(q=torch.empty(q.numel() + 1, device=DEVICE)[1:].view(q.shape)), "q's memory is not TMA"),
        (lambda q: dict(q=torch.empty(2, 2, 64, 18, device=DEVICE)[..., :16]), "q's memory is not TMA"),
        (lambda q: dict(q=q[:1].expand(2, -1, -1, -1)), "q's memory is not TMA"),
        (lambda q: dict(q=q, config={"TMA": False}), "WARP_SPECIALIZE needs TMA"),
        (lambda q: dict(q=q, config={"INPUT_PRECISION": "tf32x3"}), "warp-specialised TF32 dots do not compile"),
    ],
)
def test_tma_loads_refuse_what_they_cannot_load(make, message):
    q = torch.randn(2, 2, 64, 16, device=DEVICE)
    args = make(q)
    q = args.pop("q")
    config = {**launch_config(64, 64, 16, 16, 4), "TMA": True, "WARP_SPECIALIZE": True, **args.pop("config", {})}
    with pytest.raises(ValueError, match="config asks for TMA loads, but .*" + message):
        attention(q, q[:, :1, :64], q[:, :, :64], scale=0.5, config=config, **args)


def test_float32_precisions():
    check_float32_precisions(fused)


def test_the_lse_only_when_asked():
    check_without_lse(fused)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_width_4096(dtype):
    check(fused, 1, 2, 1, 2, 70, 90, 4096, 4096, dtype=dtype, ragged=True)


@pytest.mark.parametrize(
    "shape,two_pass",
    [((1, 2, 1, 2, 17, 33, 300, 300), True),  # 16-bit-chunked width, keys fewer than the width
     ((1, 2, 1, 2, 17, 40, 24, 24), False),  # narrow heads: the fused kernel's registers
     ((1, 1, 1, 1, 9, 400, 300, 300), False)],  # keys outnumber the width: the fused kernel's scratch
)
def test_wide_heads_over_short_sequences_take_the_two_pass_operator(shape, two_pass):
    batch, heads, heads_k, heads_v, len_q, len_k, dim_k, dim_v = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, len_q, dim_k, generator=gen).half().to(DEVICE)
    k = torch.randn(batch, heads_k, len_k, dim_k, generator=gen).half().to(DEVICE)
    v = torch.randn(batch, heads_v, len_k, dim_v, generator=gen).half().to(DEVICE)
    assert attention_two_pass.preferred(len_q, len_k, dim_k, dim_v, itemsize=2) is two_pass
    got, got_lse = attention(q, k, v, scale=0.1, sum_heads=True)
    want, want_lse = (attention_two_pass.attention_two_pass if two_pass else fused)(q, k, v, scale=0.1, sum_heads=True)
    assert torch.equal(got, want) and torch.equal(got_lse, want_lse)
