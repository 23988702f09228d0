"""bench/small_fusion.py: tiny shapes under Triton's interpreter (or on a GPU)."""

import json

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

from bench import small_fusion  # noqa: E402


def test_smoke_times_both_routes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "small.json"
    assert small_fusion.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["operation"], row["batch"]) for row in rows] == [
        (operation, batch) for operation in ("fusion", "attention") for batch in small_fusion.SMOKE_BATCHES]
    for row in rows:
        assert row["one_launch_ms"] > 0 and row["multi_launch_ms"] > 0
        assert row["speedup"] == pytest.approx(row["multi_launch_ms"] / row["one_launch_ms"])
        assert row["max_relative_difference"] <= 1e-5  # the two routes compute the same fusion
    printed = capsys.readouterr().out
    assert "| fusion | 10 | 16 | 2 | float32 | 3 |" in printed and "| attention | 10 | 16 | 2 | float32 | 3 |" in printed
    attention = rows[-1]
    assert attention["flops"] == 2.0 * 3 * 2 * 16 * ((10 + 10) * 16 + 2 * 10 * 10)  # half a fusion's


def test_a_shape_past_one_launch_is_refused():
    with pytest.raises(ValueError, match="do not fit one launch"):
        small_fusion.measure("attention", 17, 16, 2, "float32", 1, 1, "cpu")
