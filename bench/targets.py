"""The performance issue's targets, judged on a harness result: met or missed, and by how much.

    python -m bench.targets bench/results/2026-11-28-nvidia-h200.json

``python -m bench`` appends the same table to its markdown report for the targets its run covers.
Only rows whose output passed the harness's accuracy check count; a float32 target counts this
library's ``tf32x3`` rows too (float32 inputs on TF32 tensor cores, held to the float32 rules), and
the best of this library's rows (its backends, and its exported model in onnxruntime) is the one
judged. torch's figure is SDPA's in the same run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Target:
    workload: str
    dtype: str  # the torch dtype compared with; ``ours`` lists the dtypes of this library's rows that count
    ours: tuple
    device: str
    limit_ms: float | None = None  # the time to reach, or
    times_faster_than_sdpa: float | None = None  # a speed-up over torch SDPA in the same run
    memory_at_most_sdpa: bool = False


#: The targets of the performance issue (H200 figures; the CPU one is relative to torch on that CPU).
TARGETS = [
    Target("W1", "float32", ("float32", "tf32x3"), "gpu", limit_ms=0.025),
    Target("W2", "bfloat16", ("bfloat16",), "gpu", limit_ms=0.40),
    Target("W2", "float32", ("float32", "tf32x3"), "gpu", limit_ms=2.5),
    Target("W3", "bfloat16", ("bfloat16",), "gpu", limit_ms=3.5),
    Target("W3", "float32", ("float32", "tf32x3"), "gpu", limit_ms=40.0),
    Target("W4", "bfloat16", ("bfloat16",), "gpu", limit_ms=0.90, memory_at_most_sdpa=True),
    Target("W2c", "float32", ("float32",), "cpu", times_faster_than_sdpa=4.0),
]


#: The harness's peers that are this library: its backends, and its exported model in onnxruntime.
OURS = ("crossattn_gpu", "onnxruntime (exported model)")


def _rows(report: dict, workload: str, device: str) -> list[dict]:
    return [r for r in report["rows"] if not r.get("skipped") and r["workload"] == workload and r["device"] == device]


def judged(report: dict) -> list[dict]:
    """One entry per target the report covers (this library and torch SDPA both ran it)."""
    entries = []
    for target in TARGETS:
        rows = _rows(report, target.workload, target.device)
        ours = [r for r in rows if r["peer"].startswith(OURS) and r["dtype"] in target.ours and r["ok"]]
        sdpa = next((r for r in rows if r["peer"].startswith("torch batched") and r["dtype"] == target.dtype), None)
        if not ours or sdpa is None:
            continue
        best = min(ours, key=lambda r: r["median_s"])
        ours_ms, sdpa_ms = best["median_s"] * 1e3, sdpa["median_s"] * 1e3
        if target.limit_ms is not None:
            goal, met = f"{target.limit_ms:g} ms", ours_ms <= target.limit_ms
        else:
            goal = f"{target.times_faster_than_sdpa:g}x SDPA ({sdpa_ms / target.times_faster_than_sdpa:.3g} ms)"
            met = sdpa_ms / ours_ms >= target.times_faster_than_sdpa
        if target.memory_at_most_sdpa:
            peaks = best["peak_bytes"], sdpa["peak_bytes"]
            goal += ", peak memory <= SDPA's"
            met = met and None not in peaks and peaks[0] <= peaks[1]
        entries.append({
            "workload": target.workload, "dtype": target.dtype, "goal": goal, "met": met,
            "ours_ms": ours_ms, "ours": f"{best['peer']} ({best['dtype']})", "sdpa_ms": sdpa_ms,
            "ours_peak_bytes": best["peak_bytes"], "sdpa_peak_bytes": sdpa["peak_bytes"],
        })
    return entries


def markdown(report: dict) -> str:
    """The table of ``judged(report)``, or an empty string when the report covers no target."""
    entries = judged(report)
    if not entries:
        return ""
    lines = ["## Targets of the performance issue", "",
             "| workload | dtype | target | best of this library | torch SDPA (same run) | status |",
             "| --- | --- | --- | --- | ---: | --- |"]
    def mib(value) -> str:
        return "" if value is None else f", peak {value / 2**20:.1f} MiB"

    for e in entries:
        memory = "peak memory" in e["goal"]
        peak, sdpa_peak = (mib(e["ours_peak_bytes"]), mib(e["sdpa_peak_bytes"])) if memory else ("", "")
        lines.append(f"| {e['workload']} | {e['dtype']} | {e['goal']} | {e['ours_ms']:.3f} ms ({e['ours']}{peak}) | "
                     f"{e['sdpa_ms']:.3f} ms{sdpa_peak} | {'met' if e['met'] else 'missed'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path, help="a JSON report written by python -m bench")
    args = parser.parse_args(argv)
    table = markdown(json.loads(args.report.read_text()))
    print(table or f"{args.report} covers none of the targets (this library and torch SDPA on one workload)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
