"""kernels/unit_rows.py against the NumPy backend's cosine similarity in float64 (under Triton's
interpreter on a machine without a GPU): widths from 1 to past four column blocks, lengths that are not
multiples of the row blocks, rows of extreme magnitudes and zero rows, lengths, strided and transposed
views, and the errors of bad arguments."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from crossattn_gpu.backends.numpy_backend import cosine_similarity  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from crossattn_gpu.kernels.unit_rows import (  # noqa: E402
    MAX_BLOCK_C, MAX_BLOCK_R, TILE_ELEMENTS, launch_config, unit_rows,
)

if not interpreter_mode() and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from attention_check import DEVICE, DTYPES  # noqa: E402


def drawn(shape, dtype, seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def similarity(a, b, lengths=None):
    return unit_rows(a, lengths) @ unit_rows(b).transpose(1, 2)


def reference(a, b) -> np.ndarray:
    return cosine_similarity(a.double().cpu().numpy(), b.double().cpu().numpy())


def unit_norms(rows) -> np.ndarray:
    return torch.linalg.vector_norm(rows.double(), dim=-1).cpu().numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (2, 300, 3), (3, 17, 64), (1, 113, 257), (2, 5, 1280),
                                   (1, 3, 4 * MAX_BLOCK_C + 1)])
def test_similarities_match_the_float64_reference(dtype, shape):
    a, b = drawn(shape, dtype, seed=sum(shape)), drawn(shape[:2] + (shape[2],), dtype, seed=1)
    rows = unit_rows(a)
    assert rows.dtype == torch.float32 and rows.is_contiguous() and tuple(rows.shape) == shape
    # The inputs are exact in float32, so float32's own rounding is all the error there is.
    np.testing.assert_allclose(similarity(a, b).cpu().numpy(), reference(a, b), rtol=0, atol=2e-6)
    np.testing.assert_allclose(unit_norms(rows), 1.0, rtol=0, atol=1e-6)


def test_rows_of_every_magnitude_and_zero_rows():
    """Each row is divided by its largest |x| before its squares are summed: rows of 1e-30, 1e-40
    (subnormal in float32) and 1e20 to float32's largest value give the unit rows of any other scale,
    where summing their squares directly underflows or overflows; a zero row comes out zero."""
    base = drawn((1, 1, 40), torch.float32, seed=3)
    scales = [1.0, 1e-30, 1e-40, 1e20, 3.4e38 / base.abs().max().item(), 0.0]
    x = torch.cat([base * s for s in scales], dim=1)
    rows = unit_rows(x)
    expected = (base / torch.linalg.vector_norm(base.double(), dim=-1, keepdim=True)).float()[0, 0]
    for index, scale in enumerate(scales[:-2]):
        torch.testing.assert_close(rows[0, index], expected, rtol=0, atol=1e-6 if scale != 1e-40 else 2e-3)
    torch.testing.assert_close(rows[0, 4], expected, rtol=0, atol=1e-6)
    assert torch.all(rows[0, 5] == 0)
    # The largest |x| of a wide row in its last column block, the first block's values tiny beside it.
    wide = torch.full((1, 1, 2 * MAX_BLOCK_C + 3), 1e-20, device=DEVICE)
    wide[0, 0, -1] = 3e38
    got = unit_rows(wide)[0, 0]
    assert got[-1].item() == 1.0 and torch.all(got[:-1] == 1e-20 / 3e38)
    half = torch.tensor([[[65504.0, -65504.0, 1.0], [6e-8, 0.0, -6e-8], [0.0, 0.0, 0.0]]], dtype=torch.float16,
                        device=DEVICE)
    got = unit_rows(half)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(unit_norms(got)[0], [1.0, 1.0, 0.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_rows_past_the_lengths_are_zeros(dtype):
    x = drawn((4, 37, 50), torch.float32, seed=4)
    lengths = torch.tensor([1, 37, 20, 36], dtype=dtype, device=DEVICE)
    rows = unit_rows(x, lengths)
    whole = unit_rows(x)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(rows[b, n:] == 0)
        torch.testing.assert_close(rows[b, :n], whole[b, :n], rtol=0, atol=0)


def test_strided_and_transposed_views():
    base = drawn((3, 90, 70), torch.float32, seed=5)
    for view in [base[:, ::3, 5:60:2], base.transpose(1, 2), base[::2, 7:8], base.permute(1, 2, 0)[:20]]:
        torch.testing.assert_close(unit_rows(view), unit_rows(view.contiguous()), rtol=0, atol=0)
        np.testing.assert_allclose(similarity(view, view).cpu().numpy(), reference(view, view), rtol=0, atol=2e-6)


def test_launch_config_blocks_hold_whole_tiles_of_at_most_max_block_r_rows():
    for cols, block_c, block_r in [(1, 1, MAX_BLOCK_R), (5, 8, MAX_BLOCK_R), (17, 32, 64), (128, 128, 16),
                                   (1280, MAX_BLOCK_C, 4), (5000, MAX_BLOCK_C, 4)]:
        cfg = launch_config(cols)
        assert (cfg["BLOCK_C"], cfg["BLOCK_R"]) == (block_c, block_r)
        assert cfg["BLOCK_R"] * block_c <= TILE_ELEMENTS


def test_bad_arguments_raise():
    x = drawn((2, 3, 4), torch.float32, seed=6)
    with pytest.raises(TypeError, match="torch.Tensor"):
        unit_rows(x.numpy() if DEVICE == "cpu" else x.cpu().numpy())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        unit_rows(x.double())
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        unit_rows(x[0])
    with pytest.raises(ValueError, match="empty"):
        unit_rows(x[:, :0])
    for lengths in [torch.tensor([1.0, 2.0], device=DEVICE), torch.tensor([True, True], device=DEVICE)]:
        with pytest.raises(TypeError, match="integer"):
            unit_rows(x, lengths)
    with pytest.raises(ValueError, match=r"lengths must be \(2,\) on .*; got \(2,\) on meta"):
        unit_rows(x, torch.empty(2, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        unit_rows(x, torch.tensor([1, 2, 3], device=DEVICE))
