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
    assert list(rows) == ["W1", "W1 (multi-launch)", "W5 (device lengths)", "W5 (host lengths)",
                          "W5 (host lengths) (similarities)", "W5 (host lengths) (probabilities)"]
    waits = 1 if torch.cuda.is_available() else 0
    for name, row in rows.items():
        assert row["wall_ms"] > 0 and row["top_host_ops"] and row["top_host_ops"][0]["self_host_us"] > 0
        assert (row["device_timeline"] is not None) == torch.cuda.is_available()  # the CPU has no device work
        # Never a wait for the whole queue (the profile's own final synchronize is 1/5 a call).
        assert row["queue_drains"] < 1
        # One projection GEMM per input, attention in the Triton kernels; W1 in one launch: none. The
        # similarities take two more GEMMs (their products).
        assert row["torch_gemms"] == (0 if name == "W1" else 4 if name.endswith("(similarities)") else 2)
    # The front end reads one verdict on NaN and Inf for both inputs a call; on a GPU it waits on the
    # event after its copy. Lengths on the device add one verdict, read the same way; host ones none.
    for name in ("W1", "W1 (multi-launch)"):
        assert rows[name]["host_reads_of_device_values"] == 1 and rows[name]["event_waits"] == waits
    assert rows["W5 (device lengths)"]["host_reads_of_device_values"] == 2
    assert rows["W5 (device lengths)"]["event_waits"] == 2 * waits
    assert rows["W5 (host lengths)"]["host_reads_of_device_values"] == 1
    for asks in ("similarities", "probabilities"):  # they read nothing more from the device
        assert rows[f"W5 (host lengths) ({asks})"]["host_reads_of_device_values"] == 1
    timed = dict(rows["W1"], device_timeline={"before_first_us": 1.0, "gaps_us": 2.0, "busy_us": 3.0,
                                              "past_return_us": -4.0})
    assert "| W1 | float32 | 1.0 | 2.0 | 3.0 | -4.0 |" in profile_fusion.markdown([timed])  # a GPU's table
    printed = capsys.readouterr().out
    assert "| W1 | float32 |" in printed and "| W5 (host lengths) | float32 |" in printed
    assert "| W1 (multi-launch) | float32 |" in printed


def test_the_device_timeline_splits_a_call_into_idle_before_idle_between_and_busy():
    calls = [(100.0, 150.0), (0.0, 40.0)]  # host ranges, out of order
    work = [(10.0, 20.0), (15.0, 25.0), (30.0, 35.0), (60.0, 70.0),  # call 1: [10, 25] and [30, 35], then 60..70
            (130.0, 140.0), (145.0, 155.0)]  # call 2
    timeline = profile_fusion.device_timeline(calls, work)
    # Call 1: first work 10 us in, busy 15 + 5 + 10 = 30, idle between 60 - 30 = 30, 30 us past its return;
    # call 2: 30 in, busy 20, idle 5 between, 5 past. Medians of the two.
    assert timeline == {"before_first_us": 20.0, "gaps_us": 17.5, "busy_us": 25.0, "past_return_us": 17.5}
    assert profile_fusion.device_timeline(calls, []) is None
    assert profile_fusion.device_timeline([(0.0, 1.0)], [(5.0, 6.0)]) == {
        "before_first_us": 5.0, "gaps_us": 0.0, "busy_us": 1.0, "past_return_us": 5.0}


def test_device_work_is_kernels_copies_and_memsets_not_the_calls_annotation():
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    kernel = SimpleNamespace(name="_attention_fwd", device_type=cuda, is_user_annotation=False)
    annotation = SimpleNamespace(name=profile_fusion.CALL_RANGE, device_type=cuda, is_user_annotation=True)
    named_like_it = SimpleNamespace(key=profile_fusion.CALL_RANGE, device_type=cuda)  # key_averages' events
    host = SimpleNamespace(name="aten::mm", device_type=cpu, is_user_annotation=False)
    assert [profile_fusion._device_work(e) for e in (kernel, annotation, named_like_it, host)] == [
        True, False, False, False]
