"""bench/gemm_route.py: tiny shapes through the Triton backend under the interpreter (CuPy's run needs a GPU)."""

import json

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

from bench import gemm_route  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402

interpreter_only = pytest.mark.skipif(not interpreter_mode(), reason="the smoke run is the interpreter's")


@interpreter_only
def test_smoke_times_both_routes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "gemm_route.json"
    assert gemm_route.main(["--smoke", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["backend"] == "triton" and written["versions"]["device"] == "cpu (Triton interpreter)"
    rows = written["rows"]
    assert [row["shape"] for row in rows] == [shape[0] for shape in gemm_route.SMOKE_SHAPES]
    for row, tolerance in zip(rows, (1e-6, 2e-3)):  # float32, float16: the two routes compute the same attention
        assert row["kernel_ms"] > 0 and row["gemm_ms"] > 0
        assert row["kernel_over_gemm"] == pytest.approx(row["kernel_ms"] / row["gemm_ms"])
        assert 0 < row["max_relative_difference"] <= tolerance  # 0 would mean one route ran twice
        assert row["scores"] == row["batch"] * row["heads"] * row["length"] ** 2
    assert "| small | 2 | 3 | 33 | 24 | float16 | 6534 |" in capsys.readouterr().out


@interpreter_only
def test_the_full_run_needs_cupy_on_a_gpu():
    with pytest.raises(SystemExit, match="CuPy backend on a GPU"):
        gemm_route.main([])
