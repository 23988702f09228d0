"""bench/huge_batch.py: tiny shapes under Triton's interpreter (or on a GPU)."""

import json

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

from bench import huge_batch  # noqa: E402
from crossattn_gpu.backends import device_common  # noqa: E402


def test_blocks_and_one_block_agree_and_the_bound_is_restored(capsys):
    before = device_common.DEVICE_BLOCK_ELEMENTS
    # 5 examples of 6 x (2 x 2 x 8) projection elements, at most 2 examples a block: 3 blocks.
    args = ["--batch", "5", "--length", "6", "--width", "8", "--heads", "2", "--dtype", "float32",
            "--bound", str(2 * 6 * 2 * 2 * 8), "--repeats", "1"]
    assert huge_batch.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["blocks"]["count"] == 3 and result["one_block"]["count"] == 1
    assert result["max_relative_difference"] <= 1e-6
    assert result["blocks"]["median_ms"] > 0 and result["one_block"]["median_ms"] > 0
    assert device_common.DEVICE_BLOCK_ELEMENTS == before
