import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # runnable.py, tolerances.py, plain_yardstick.py

import tolerances  # noqa: E402


@pytest.fixture(autouse=True)
def _label_checks(request):
    """Tag every accuracy check with the backend and dtype of the running test."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    tolerances.CURRENT["label"] = f"{params['backend']}-{params['dtype']}" if "backend" in params else "all backends"


def pytest_sessionfinish(session, exitstatus):
    """With CROSSATTN_CONFORMANCE_SUMMARY=PATH (no suffix), write PATH.json and PATH.md: checks and
    worst errors per pair of backends (the GPU session commits them under bench/results/).

    Under pytest-xdist each worker leaves its records in PATH.<worker>.records.json, and the controller,
    whose session ends after theirs, joins them (each worker used to write the summary of its own
    checks alone, the last one over the others)."""
    target = os.environ.get("CROSSATTN_CONFORMANCE_SUMMARY")
    if not target:
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    if worker is not None:
        path.with_name(f"{path.name}.{worker}.records.json").write_text(json.dumps(tolerances.RECORDS))
        return
    records = list(tolerances.RECORDS)
    for part in sorted(path.parent.glob(f"{path.name}.*.records.json")):
        records += json.loads(part.read_text())
        part.unlink()
    if not records:
        return
    pairs = {}
    for record in records:
        entry = pairs.setdefault(record["pair"], {"checks": 0, "worst_error": 0.0, "worst_error_over_limit": 0.0})
        entry["checks"] += 1
        entry["worst_error"] = max(entry["worst_error"], record["error"])
        entry["worst_error_over_limit"] = max(entry["worst_error_over_limit"], record["error"] / record["limit"])
    path.with_suffix(".json").write_text(json.dumps({"exit_status": int(exitstatus), "pairs": pairs}, indent=2) + "\n")
    lines = _summary_header()
    lines += ["| pair | checks | worst relative error | worst error / allowed |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {p} | {e['checks']} | {e['worst_error']:.2e} | {e['worst_error_over_limit']:.2f} |" for p, e in sorted(pairs.items())]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _summary_header() -> list[str]:
    """Title (date, machine, package versions) and how to read the table."""
    import datetime

    from crossattn_gpu._optional import version_of

    versions = [f"{name} {version_of(name)}" for name in ("numpy", "torch", "triton", "onnxruntime", "cupy")
                if version_of(name) is not None]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        machine = torch.cuda.get_device_name(0)
    else:
        machine = (f"CPU ({os.cpu_count()} cores), Triton under its interpreter, TF32 dots emulated "
                   "(tests/tensor_cores.py)")
    examples = os.environ.get("CROSSATTN_HYPOTHESIS_EXAMPLES", "200")
    return [
        f"# Conformance summary, {datetime.date.today().isoformat()}, {machine}",
        "",
        f"Versions: {', '.join(versions)}. Every accuracy check of `tests/conformance` ({examples} drawn cases per "
        "backend), by pair; 'allowed' is the rule of `tests/conformance/tolerances.py`. numpy-float64 is the "
        "reference; 'itself' are self-consistency checks (invariants).",
        "",
    ]
