"""kernels/attention_common.py: the launchers' integer helpers agree with Triton's own."""

import pytest

pytest.importorskip("torch")
triton = pytest.importorskip("triton")

from crossattn_gpu.kernels.attention_common import block_at_least_16, cdiv  # noqa: E402

SIZES = list(range(1, 600)) + [1023, 1024, 1025, 1280, 2560, 4096, 4097, 2**20 + 1]


def test_block_at_least_16_is_triton_power_of_two_floored_at_16():
    for n in SIZES:
        assert block_at_least_16(n) == max(16, triton.next_power_of_2(n)), n


@pytest.mark.parametrize("divisor", [1, 16, 32, 64, 128, 256])
def test_cdiv_matches_triton(divisor):
    for n in SIZES:
        assert cdiv(n, divisor) == triton.cdiv(n, divisor), n
