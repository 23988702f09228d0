"""Results as JSON, a markdown table and a PNG plot of the speed-up over torch."""

from __future__ import annotations

import json
from pathlib import Path

from . import targets


def _fmt(value, pattern: str, empty: str = "n/a") -> str:
    return empty if value is None else pattern.format(value)


def markdown(report: dict) -> str:
    machine, ceil = report["machine"], report["ceilings"]
    gemm = ", ".join(f"{d} {v / 1e12:.2f} TFLOP/s" for d, v in ceil["gemm_flops"].items())
    lines = [
        f"# crossattn_gpu benchmark, {report['date']}, {machine['device_name']}",
        "",
        f"Machine: {machine['description']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + "."
        + "".join(f" {k}={v}" for k, v in machine.get("environment", {}).items()),
        f"Ceilings measured in this run: GEMM {gemm}; copy {ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s.",
        "Times are medians of repeated calls, peers timed round-robin, inputs rotated. FLOPs are those of",
        "the direct formulation for every peer, so an algorithm that does fewer (this library's folded",
        "projections) can pass 100% of the roofline, max(FLOPs / GEMM ceiling, bytes / copy ceiling) over",
        "the time. 'vs SDPA' is the speed-up over torch's batched projections + SDPA in the same dtype.",
        "",
        "| workload | peer | dtype | median (ms) | TFLOP/s | roofline | peak MiB | vs SDPA | rel. error |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        if row.get("skipped"):
            continue
        lines.append(
            f"| {row['workload']} | {row['peer']} | {row['dtype']} | {row['median_s'] * 1e3:.3f} | "
            f"{row['tflops']:.3f} | {_fmt(row['roofline_fraction'], '{:.0%}')} | "
            f"{_fmt(None if row['peak_bytes'] is None else row['peak_bytes'] / 2**20, '{:.1f}')} | "
            f"{_fmt(row['speedup_vs_sdpa'], '{:.2f}x')} | "
            f"{row['rel_error']:.1e}{'' if row['ok'] else ' WRONG'} |"
        )
    skipped = sorted({f"{r['peer']}: {r['reason']}" for r in report["rows"] if r.get("skipped")})
    if skipped:
        lines += ["", "Not run here: " + "; ".join(skipped) + "."]
    judged = targets.markdown(report)
    if judged:
        lines += ["", judged.rstrip("\n")]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """Grouped bars of the speed-up over torch SDPA per workload; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    rows = [r for r in report["rows"] if not r.get("skipped") and r["speedup_vs_sdpa"] is not None]
    if not rows:  # no torch SDPA row to compare with
        return False
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    series = list(dict.fromkeys(f"{r['peer']} ({r['dtype']})" for r in rows))
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(workloads)), 5.5))
    width = 0.8 / max(1, len(series))
    for i, label in enumerate(series):
        values = [next((r["speedup_vs_sdpa"] for r in rows if r["workload"] == w and f"{r['peer']} ({r['dtype']})" == label), 0)
                  for w in workloads]
        ax.bar([x + i * width for x in range(len(workloads))], values, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(workloads))], workloads)
    ax.set_ylabel("speed-up over torch SDPA (same dtype)")
    ax.set_title(f"{report['machine']['device_name']}, {report['date']}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(report: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    written[1].write_text(markdown(report))
    if plot(report, out_dir / f"{stem}.png"):
        written.append(out_dir / f"{stem}.png")
    return written
