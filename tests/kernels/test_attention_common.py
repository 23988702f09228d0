"""kernels/attention_common.py: the launchers' integer helpers agree with Triton's own, the masked
scores keep an overflow visible, and offsets past 2**31 inside one example are taken in 64 bits."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from crossattn_gpu.backends.numpy_backend import attention as reference  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from crossattn_gpu.kernels.attention import attention  # noqa: E402
from crossattn_gpu.kernels.attention_common import block_at_least_16, cdiv, needs_wide_offsets  # noqa: E402
from crossattn_gpu.kernels.attention_two_pass import attention_two_pass  # noqa: E402

SIZES = list(range(1, 600)) + [1023, 1024, 1025, 1280, 2560, 4096, 4097, 2**20 + 1]


def test_block_at_least_16_is_triton_power_of_two_floored_at_16():
    for n in SIZES:
        assert block_at_least_16(n) == max(16, triton.next_power_of_2(n)), n


@pytest.mark.parametrize("divisor", [1, 16, 32, 64, 128, 256])
def test_cdiv_matches_triton(divisor):
    for n in SIZES:
        assert cdiv(n, divisor) == triton.cdiv(n, divisor), n


@pytest.mark.skipif(not interpreter_mode() and not torch.cuda.is_available(), reason="needs a GPU or the interpreter")
@pytest.mark.parametrize("operator", [attention, attention_two_pass], ids=["fused", "two-pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN on purpose
def test_a_query_with_no_finite_score_stays_nan_under_a_mask(operator, dtype):
    """A query whose projection overflowed scores -Inf on every key whose entry there is positive. Were
    the masked keys' fill taken as it is, they alone would weigh, and the row would come out finite and
    wrong; it must come out NaN, as the NumPy reference's does, for the front end to catch."""
    device = "cuda" if torch.cuda.is_available() and not interpreter_mode() else "cpu"
    rng = np.random.default_rng(0)
    q, v = rng.standard_normal((1, 1, 3, 16)), rng.standard_normal((1, 1, 5, 16))
    k = np.abs(rng.standard_normal((1, 1, 5, 16))) + 0.1
    q[0, 0, 1, 4] = -np.inf
    masked = np.zeros((1, 3, 5), dtype=bool)
    masked[:, :, :2] = True  # the first two keys masked for every query
    want, _, _ = reference(q, k, v, scale=0.25, masked=masked)
    as_tensor = lambda x: torch.tensor(x, dtype=dtype, device=device)  # noqa: E731
    out, _ = operator(as_tensor(q), as_tensor(k), as_tensor(v), scale=0.25,
                      masked=torch.tensor(masked, device=device), out_dtype=torch.float32)
    out = out.cpu().double().numpy()
    assert np.isnan(want[0, 0, 1]).all() and np.isnan(out[0, 0, 1]).all()
    np.testing.assert_allclose(out[0, 0, [0, 2]], want[0, 0, [0, 2]], rtol=2e-3, atol=2e-3)


class _Strided:
    """Only what ``needs_wide_offsets`` reads of a view into a large storage: shape and strides."""

    def __init__(self, shape, strides):
        self.shape, self._strides = shape, strides

    def stride(self):
        return self._strides

    def untyped_storage(self):
        return self

    def nbytes(self):
        return 2**40


@pytest.mark.parametrize("shape,strides,wide", [
    ((1, 46340, 46340), (0, 46340, 1), False),  # a mask: last offset 46339 * 46341 < 2**31
    ((1, 46341, 46341), (0, 46341, 1), True),  # 46340 * 46342 >= 2**31
    ((2**20, 4, 2**17, 4096), (4 * 2**17 * 4096, 2**17 * 4096, 4096, 1), False),  # batch and heads are 64-bit
    ((1, 1, 2**19, 4096), (0, 0, 4096, 1), False),  # one example of 2**31 elements: last offset 2**31 - 1
    ((1, 1, 2**19 + 1, 4096), (0, 0, 4096, 1), True),
    ((1, 1, 3, 16), (0, 0, 2**30, 1), True),  # a strided view
    ((1, 1, 3, 16), (0, 0, -2**30, 1), True),
    ((1, 1, 16, 3), (0, 0, 1, 2**30), True),
])
def test_wide_offsets_where_an_offset_inside_an_example_passes_31_bits(shape, strides, wide):
    assert needs_wide_offsets(None, _Strided(shape, strides)) is wide


def test_tensors_of_storages_under_2_gib_need_no_wide_offsets():
    assert not needs_wide_offsets(torch.empty(2, 3, 17, 8), None, torch.empty(1, 5, 5, dtype=torch.uint8))
    transposed = torch.empty(2**16, 2**15 + 1, dtype=torch.uint8).t()  # 2 GiB, never touched
    assert needs_wide_offsets(transposed)  # its last offset: 2**15 + (2**16 - 1) * (2**15 + 1) > 2**31 - 1


@pytest.mark.skipif(not interpreter_mode() and not torch.cuda.is_available(), reason="needs a GPU or the interpreter")
@pytest.mark.parametrize("operator", [attention, attention_two_pass], ids=["fused", "two-pass"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_rows_past_31_bits_of_offset_are_read_where_they_lie(operator):
    """Query rows 2**30 elements apart: the third lies 2**31 elements in, where a 32-bit offset wraps to
    -2**31. The storage (8 GB, untouched but for the rows) holds NaN there, which wrapped offsets read."""
    device = "cuda" if torch.cuda.is_available() and not interpreter_mode() else "cpu"
    row, base = 2**30, 2**31
    storage = torch.empty(base + 2 * row + 16, dtype=torch.float16, device=device)
    storage[:16] = float("nan")
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3, 16))
    for i in range(3):
        storage[base + i * row : base + i * row + 16] = torch.tensor(rows[i], dtype=torch.float16)
    q = storage[base:].as_strided((1, 1, 3, 16), (0, 0, row, 1))
    k, v = rng.standard_normal((1, 1, 5, 16)), rng.standard_normal((1, 1, 5, 16))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float16, device=device)  # noqa: E731
    out, _ = operator(q, as_tensor(k), as_tensor(v), scale=0.25, out_dtype=torch.float32, need_lse=False)
    want, _, _ = reference(q.cpu().double().numpy(), as_tensor(k).cpu().double().numpy(),
                           as_tensor(v).cpu().double().numpy(), scale=0.25)
    np.testing.assert_allclose(out.cpu().double().numpy(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("operator", [attention, attention_two_pass], ids=["fused", "two-pass"])
def test_more_query_blocks_than_a_grid_axis_takes_is_named(operator):
    len_q = 65535 * 128 + 1  # past the y axis for blocks of up to 128 rows
    q = torch.zeros(1, 1, 1, 16).expand(1, 1, len_q, 16)  # no memory: a stride of 0
    k = v = torch.zeros(1, 1, 5, 16)
    with pytest.raises(ValueError, match=f"Lq = {len_q} needs .* query blocks .* slices of at most"):
        operator(q, k, v, scale=1.0)
