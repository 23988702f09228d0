"""bench/targets.py: the performance issue's targets judged on a harness report."""

import json

from bench import report as reporting
from bench import targets


def row(workload, peer, dtype, ms, device="gpu", ok=True, peak=None):
    return {"workload": workload, "peer": peer, "dtype": dtype, "median_s": ms / 1e3, "device": device, "ok": ok,
            "peak_bytes": peak}


SDPA = "torch batched projections + SDPA"


def by_target(rows):
    return {(e["workload"], e["dtype"]): e for e in targets.judged({"rows": rows})}


def test_the_best_accurate_row_of_this_library_is_judged():
    judged = by_target([
        row("W2", SDPA, "float32", 6.8),
        row("W2", "crossattn_gpu triton", "float32", 11.3),
        row("W2", "crossattn_gpu triton", "tf32x3", 2.4),  # float32 inputs on TF32 tensor cores count
        row("W2", "crossattn_gpu cupy", "float32", 1.0, ok=False),  # a wrong result never counts
        row("W2", SDPA, "bfloat16", 0.73),
        row("W2", "crossattn_gpu triton", "bfloat16", 1.3),
    ])
    assert judged["W2", "float32"]["met"] and judged["W2", "float32"]["ours"] == "crossattn_gpu triton (tf32x3)"
    assert judged["W2", "float32"]["sdpa_ms"] == 6.8
    assert not judged["W2", "bfloat16"]["met"] and judged["W2", "bfloat16"]["ours_ms"] == 1.3


def test_memory_and_ratio_targets():
    judged = by_target([
        row("W4", SDPA, "bfloat16", 1.0, peak=144 << 20),
        row("W4", "crossattn_gpu triton", "bfloat16", 0.8, peak=(144 << 20) + 1),  # fast, one byte over
        row("W2c", SDPA, "float32", 198.0, device="cpu"),
        row("W2c", "onnxruntime (exported model)", "float32", 49.0, device="cpu"),  # the exported model counts
        row("W2c", "crossattn_gpu numpy", "float32", 131.0, device="cpu"),
    ])
    assert not judged["W4", "bfloat16"]["met"]
    assert judged["W2c", "float32"]["met"] and judged["W2c", "float32"]["goal"] == "4x SDPA (49.5 ms)"


def test_targets_without_both_sides_are_left_out_and_the_report_shows_the_rest(tmp_path, capsys):
    rows = [row("W3", "crossattn_gpu triton", "bfloat16", 7.3),  # no torch row: not judged
            row("W1", SDPA, "float32", 0.22), row("W1", "crossattn_gpu triton", "float32", 0.64)]
    assert set(by_target(rows)) == {("W1", "float32")}
    assert targets.markdown({"rows": rows[:1]}) == ""
    report = {"date": "2026-11-29", "machine": {"device_name": "GPU", "description": "test"}, "versions": {},
              "ceilings": {"gemm_flops": {}, "copy_bytes_per_s": 1e9},
              "rows": [{**r, "tflops": 1.0, "roofline_fraction": None, "speedup_vs_sdpa": None, "rel_error": 0.0}
                       for r in rows]}
    text = reporting.markdown(report)
    assert "| W1 | float32 | 0.025 ms | 0.640 ms (crossattn_gpu triton (float32)) | 0.220 ms | missed |" in text
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    assert targets.main([str(path)]) == 0
    assert "| W1 | float32 |" in capsys.readouterr().out
