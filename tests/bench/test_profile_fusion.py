"""bench/profile_fusion.py on W1 (one launch and multi-launch) and a small W5 (under Triton's interpreter
without a GPU)."""

import json

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from bench import profile_fusion  # noqa: E402


def test_smoke_profile_counts_host_reads_and_writes_json(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile_fusion.main(["--smoke", "--out", str(out)]) == 0
    rows = {row["case"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["W1", "W1 (multi-launch)", "W5 (device lengths)", "W5 (host lengths)"]
    waits = 1 if torch.cuda.is_available() else 0
    for name, row in rows.items():
        assert row["wall_ms"] > 0 and row["top_host_ops"] and row["top_host_ops"][0]["self_host_us"] > 0
        # Never a wait for the whole queue (the profile's own final synchronize is 1/5 a call).
        assert row["queue_drains"] < 1
        # One projection GEMM per input, attention in the Triton kernels; W1 in one launch: none.
        assert row["torch_gemms"] == (0 if name == "W1" else 2)
    # The front end reads one verdict on NaN and Inf for both inputs a call; on a GPU it waits on the
    # event after its copy. Lengths on the device add one verdict, read the same way; host ones none.
    for name in ("W1", "W1 (multi-launch)"):
        assert rows[name]["host_reads_of_device_values"] == 1 and rows[name]["event_waits"] == waits
    assert rows["W5 (device lengths)"]["host_reads_of_device_values"] == 2
    assert rows["W5 (device lengths)"]["event_waits"] == 2 * waits
    assert rows["W5 (host lengths)"]["host_reads_of_device_values"] == 1
    printed = capsys.readouterr().out
    assert "| W1 | float32 |" in printed and "| W5 (host lengths) | float32 |" in printed
    assert "| W1 (multi-launch) | float32 |" in printed
