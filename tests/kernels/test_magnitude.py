"""kernels/magnitude.py against torch's max |x| (under Triton's interpreter on a machine without a GPU):
ranks 1 to 4, rows and columns that are not multiples of the blocks, rows wider than a column block,
strided, transposed and broadcast views, up to three arrays of different dtypes and shapes in one launch,
NaN (of either sign) and Inf anywhere, and the errors of bad arguments."""

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from crossattn_gpu.kernels.magnitude import (  # noqa: E402
    MAX_BLOCK_C, MAX_STEP_R, STEP_ELEMENTS, launch_config, largest_magnitudes, takes,
)

if not interpreter_mode() and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

DEVICE = "cpu" if interpreter_mode() else "cuda"
DTYPES = [torch.float32, torch.float16] + ([] if interpreter_mode() else [torch.bfloat16])


def drawn(shape, dtype, seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def want(*arrays) -> float:
    return max(x.detach().float().abs().max().item() for x in arrays)


def got(*arrays) -> float:
    partials = largest_magnitudes(*arrays)
    assert partials.dtype == torch.float32 and partials.ndim == 1 and partials.device == arrays[0].device
    return partials.amax().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3,), (17, 1), (1, 1, 1), (5, 113, 7), (2, 3, 257, 64), (4, 33, 300),
                                   (1, 1, 2 * MAX_BLOCK_C + 1), (3, 1280)])
def test_one_array_gives_its_largest_magnitude_exactly(dtype, shape):
    x = drawn(shape, dtype, seed=sum(shape))
    assert got(x) == want(x)
    x.view(-1)[-1] = -1e4  # the very last element (its row's last block), negative
    assert got(x) == 1e4


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_largest_value_is_found_in_any_row_and_column(dtype):
    x = drawn((3, 41, 150), dtype, seed=1, scale=0.01)
    for index in [(0, 0, 0), (2, 40, 149), (1, 17, 128), (0, 39, 127), (2, 0, 64)]:
        y = x.clone()
        y[index] = 7.5
        assert got(y) == 7.5, index


def test_the_largest_value_is_found_in_every_step_of_a_block():
    cfg = launch_config(3)
    assert cfg["BLOCK_R"] > cfg["STEP_R"]  # narrow rows: several steps of rows a block
    rows = 2 * cfg["BLOCK_R"] + 5
    x = drawn((rows, 3), torch.float32, seed=6, scale=0.01)
    steps = [first + offset for first in range(0, cfg["BLOCK_R"], cfg["STEP_R"]) for offset in (0, cfg["STEP_R"] - 1)]
    for row in steps + [cfg["BLOCK_R"] + steps[-1], rows - 1]:
        y = x.clone()
        y[row, row % 3] = -3.5
        assert got(y) == 3.5, row


def test_launch_config_steps_hold_at_most_step_elements_and_max_step_r_rows():
    for cols, block_c, step_r, block_r in [(1, 1, MAX_STEP_R, 8192), (5, 8, MAX_STEP_R, 1024), (33, 64, 32, 128),
                                           (128, 128, 16, 64), (1280, MAX_BLOCK_C, 16, 64)]:
        cfg = launch_config(cols)
        assert (cfg["BLOCK_C"], cfg["STEP_R"], cfg["BLOCK_R"]) == (block_c, step_r, block_r)
        assert cfg["STEP_R"] * block_c <= STEP_ELEMENTS and cfg["BLOCK_R"] % cfg["STEP_R"] == 0


def test_strided_transposed_and_broadcast_views():
    base = drawn((6, 40, 96), torch.float32, seed=2)
    views = [base[::2, 3:37:3, 1::5], base.transpose(1, 2), base.permute(2, 0, 1)[:, :, :7],
             base[:, :1].expand(6, 50, 96), base[0, :, 0], base.unsqueeze(1)[:, :, ::2]]
    for view in views:
        assert got(view) == want(view)
        assert not view.is_contiguous() or view.dim() == 1


def test_three_arrays_of_different_dtypes_and_shapes_in_one_launch():
    q = drawn((2, 9, 24), torch.float32, seed=3)
    k = drawn((2, 13, 24), torch.float16, seed=4)
    v = drawn((2, 13, 5), torch.float32, seed=5)
    partials = largest_magnitudes(q, k, v)
    blocks = [math.ceil(x.shape[0] * x.shape[1] / launch_config(24)["BLOCK_R"]) for x in (q, k, v)]
    assert partials.numel() == sum(blocks)
    assert got(q, k, v) == want(q, k, v)
    for index, top in ((0, 11.0), (1, 12.0), (2, 13.0)):  # the largest in each array in turn
        arrays = [q.clone(), k.clone(), v.clone()]
        arrays[index][1, 2, 3] = -top
        assert got(*arrays) == top


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), -float("nan"), float("inf"), -float("inf")])
def test_nan_of_either_sign_and_inf_anywhere(dtype, bad):
    arrays = [drawn((2, 19, 33), dtype, seed=6), drawn((2, 21, 33), dtype, seed=7)]
    for which, index in [(0, (0, 0, 0)), (1, (1, 20, 32)), (1, (0, 5, 17))]:
        spoiled = [x.clone() for x in arrays]
        spoiled[which][index] = bad
        top = got(*spoiled)
        if math.isnan(bad):
            assert math.isnan(top), (which, index)
        else:
            assert top == math.inf, (which, index)
    huge = arrays[0].clone()
    huge[1, 1, 1] = torch.finfo(dtype).max  # the largest finite value stays finite
    assert got(huge, arrays[1]) == torch.finfo(dtype).max


def test_takes_says_which_arrays_it_reduces():
    x = drawn((2, 3, 4), torch.float32, seed=8)
    assert takes([x]) and takes([x, x, x])
    assert not takes([]) and not takes([x] * 4) and not takes([x.double()]) and not takes([x.to(torch.int32)])
    assert not takes([x[None, None]]) and not takes([x[:, :0]]) and not takes([torch.tensor(1.0)])
    assert not takes([x, torch.empty(3, device="meta")]) and not takes([x, x.numpy()])


def test_errors_name_the_problem():
    x = drawn((2, 3, 4), torch.float32, seed=9)
    with pytest.raises(TypeError, match="1 to 3 arrays; got 0"):
        largest_magnitudes()
    with pytest.raises(TypeError, match="1 to 3 arrays; got 4"):
        largest_magnitudes(x, x, x, x)
    with pytest.raises(TypeError, match="array 1 must be a torch.Tensor; got ndarray"):
        largest_magnitudes(x, x.numpy())
    with pytest.raises(TypeError, match="array 0 must be float32, float16 or bfloat16; got torch.float64"):
        largest_magnitudes(x.double())
    with pytest.raises(ValueError, match=r"rank 1 to 4 and no empty axis; got shape \(\)"):
        largest_magnitudes(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 2, 3, 4\)"):
        largest_magnitudes(x[None, None])
    with pytest.raises(ValueError, match=r"array 1 must have rank 1 to 4 and no empty axis; got shape \(2, 0, 4\)"):
        largest_magnitudes(x, x[:, :0])
    with pytest.raises(ValueError, match="array 1 is on meta"):
        largest_magnitudes(x, torch.empty(3, device="meta"))
