"""bench/profile_fusion.py on W1 (under Triton's interpreter without a GPU)."""

import json

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from bench import profile_fusion  # noqa: E402


def test_smoke_profile_counts_host_reads_and_writes_json(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile_fusion.main(["--smoke", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["case"] == "W1" and row["wall_ms"] > 0
    # The front end reads one verdict on NaN and Inf for both inputs a call. On a GPU it waits on the
    # event after its copy, never on the whole queue (the profile's own final synchronize is 1/5 a call).
    assert row["host_reads_of_device_values"] == 1
    assert row["queue_drains"] < 1
    assert row["event_waits"] == (1 if torch.cuda.is_available() else 0)
    assert row["torch_gemms"] == 2  # one projection GEMM per input; attention is the Triton kernel's
    assert row["top_host_ops"] and row["top_host_ops"][0]["self_host_us"] > 0
    assert "| W1 | float32 |" in capsys.readouterr().out
