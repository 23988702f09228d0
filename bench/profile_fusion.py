"""python -m bench.profile_fusion: where one fusion call's time goes, on the host and on the device.

The Triton backend's ``fuse_representations`` as the harness calls it (device arrays in, no
similarities), on W1 (latency; in one launch, ``kernels/small_fusion.py``, and through the multi-launch
path beside it), W2 (bfloat16; also with the similarities, which the call's defaults ask for:
``kernels/unit_rows.py``, and with the probabilities: ``kernels/probabilities.py``), W5 (ragged,
bfloat16; its lengths on the device, as the harness passes them, and on the host, as ``fuse_collection``
does) and W4 (bfloat16: the harness timed it 0.34-0.36 ms above the sweep's whole fusion on 2026-11-29
and -30, where W2 differed by 0.06), under ``torch.profiler``.
Per call: the wall time, the device's kernel time, kernel launches, reads of device values by the host
(``aten::_local_scalar_dense``), the waits among them that drain the GPU's queue and those that wait on
an event only (the late finiteness verdict), host-device copies, torch's GEMMs, and
the operators that take the most host time. What the wall time holds beyond the kernels is the host's
share (the "rest" of ``bench/sweep_triton.py``'s stages), which these counts attribute. On a GPU the
device's timeline says where in the call the GPU idled (``device_timeline``): before its first work (the
host preparing the call), or between pieces of work (the host launching slower than the GPU runs them).

    python -m bench.profile_fusion --out profile.json           # on a GPU
    TRITON_INTERPRET=1 python -m bench.profile_fusion --smoke   # tiny shapes on the CPU (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from crossattn_gpu import CrossAttention

from .workloads import WORKLOADS

#: (workload, dtype, where ragged lengths are: "device" or "host", whether small examples take one launch,
#: what else the call asks for: "", "similarities" or "probabilities").
CASES = [("W1", "float32", "device", True, ""), ("W1", "float32", "device", False, ""),
         ("W2", "bfloat16", "device", True, ""), ("W2", "bfloat16", "device", True, "similarities"),
         ("W2", "bfloat16", "device", True, "probabilities"),
         ("W5", "bfloat16", "device", True, ""), ("W5", "bfloat16", "host", True, ""),
         ("W4", "bfloat16", "device", True, "")]
#: The smoke run's (tests, under the interpreter): W1 both ways, and W5 cut to a size the interpreter runs
#: quickly, still too long for the one launch in float32 (past 16), as W5 is, also with the similarities
#: and with the probabilities.
SMOKE_CASES = [("W1", "float32", "device", True, ""), ("W1", "float32", "device", False, ""),
               ("W5", "float32", "device", True, ""), ("W5", "float32", "host", True, ""),
               ("W5", "float32", "host", True, "similarities"), ("W5", "float32", "host", True, "probabilities")]
SMOKE_W5 = dict(batch=2, len_s=20, len_t=20, width=16, ragged=(5, 20))
PROFILED_CALLS = 5
TOP_OPS = 12
#: Host-side names of a kernel launch (torch's kernels, and Triton's through the driver API).
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
#: Waits for a whole stream or device: each drains the GPU's queue (a CUDA tensor's ``.item()`` is one).
DRAIN_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize")
#: The host's range of each profiled call, for the device's timeline.
CALL_RANGE = "profiled fusion call"


def _inputs(workload, dtype, device, lengths_on: str, asks: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape_s = (workload.batch, workload.len_s, workload.width)
    shape_t = (workload.batch, workload.len_t, workload.width)
    xs = torch.randn(shape_s, generator=gen).to(device=device, dtype=dtype)
    xt = torch.randn(shape_t, generator=gen).to(device=device, dtype=dtype)
    kwargs = dict(need_similarity=asks == "similarities", need_weights=asks == "probabilities",
                  bidirectional=False)
    lengths = workload.lengths()
    if lengths is not None:
        if lengths_on == "device":
            lengths = [torch.tensor(n, device=device) for n in lengths]
        kwargs.update(sequential_lengths=lengths[0], structural_lengths=lengths[1])
    return xs, xt, kwargs


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_case(name: str, dtype_name: str, lengths_on: str, one_launch: bool, asks: str, device: str,
                 **changes) -> dict:
    """One case's row; ``one_launch`` False: small examples take the multi-launch path (the backend's
    ``one_launch_flops`` 0); ``asks``: "similarities" or "probabilities" when the call asks for them;
    ``changes``: fields of the workload replaced (the smoke run's sizes)."""
    workload = dataclasses.replace(WORKLOADS[name], **changes)
    model = CrossAttention(workload.width, workload.heads, seed=0, backend="triton")
    if not one_launch:
        model._backend.one_launch_flops = 0  # the model's own backend instance
    xs, xt, kwargs = _inputs(workload, getattr(torch, dtype_name), device, lengths_on, asks)

    def call():
        return model.fuse_representations(xs, xt, **kwargs)

    for _ in range(3):  # compile and cache
        call()
    _sync(device)
    walls = []
    for _ in range(20 if device == "cuda" else 3):
        begin = time.perf_counter()
        call()
        _sync(device)
        walls.append(time.perf_counter() - begin)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_CALLS):
            with record_function(CALL_RANGE):
                call()
        _sync(device)
    events = prof.key_averages()
    timeline = [(e.time_range.start, e.time_range.end) for e in prof.events()
                if e.name == CALL_RANGE and e.device_type == torch.autograd.DeviceType.CPU]
    device_work = [(e.time_range.start, e.time_range.end) for e in prof.events() if _device_work(e)]

    def per_call(total):
        return total / PROFILED_CALLS

    def device_us(evt):
        return getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0))

    kernels = [e for e in events if _device_work(e)]
    host_ops = sorted((e for e in events if e.key.startswith("aten::") or e.key.startswith("cuda") or
                       e.key.startswith("cu")), key=lambda e: e.self_cpu_time_total, reverse=True)
    result = {
        "case": (name + (f" ({lengths_on} lengths)" if workload.ragged else "")
                 + ("" if one_launch else " (multi-launch)") + (f" ({asks})" if asks else "")),
        "dtype": dtype_name,
        "device": device,
        "wall_ms": statistics.median(walls) * 1e3,
        "device_kernel_ms": per_call(sum(device_us(e) for e in kernels)) / 1e3,
        "kernels": {e.key[:80]: per_call(e.count) for e in kernels},
        "launches": per_call(sum(e.count for e in events if e.key in LAUNCH_NAMES)),
        "host_reads_of_device_values": per_call(sum(e.count for e in events if e.key == "aten::_local_scalar_dense")),
        # A read through pinned memory waits on an event after its copy, not on the queue behind it.
        "queue_drains": per_call(sum(e.count for e in events if e.key in DRAIN_NAMES)),
        "event_waits": per_call(sum(e.count for e in events if e.key == "cudaEventSynchronize")),
        "copies": per_call(sum(e.count for e in events if e.key == "aten::copy_")),
        "torch_gemms": per_call(sum(e.count for e in events if e.key in ("aten::mm", "aten::bmm", "aten::addmm"))),
        "top_host_ops": [{"op": e.key[:60], "calls": per_call(e.count), "self_host_us": per_call(e.self_cpu_time_total)}
                         for e in host_ops[:TOP_OPS]],
        "device_timeline": device_timeline(timeline, device_work) if device_work else None,
    }
    return result


def _device_work(event) -> bool:
    """Whether a profiler event is work on the device (a kernel, copy or memset): not a host event, and not
    the device's mirror of a ``record_function`` range (Kineto's GPU user annotation of ``CALL_RANGE``, which
    spans the call's kernels and would count as one piece of work as long as all of them)."""
    return (getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
            and getattr(event, "key", getattr(event, "name", None)) != CALL_RANGE
            and not getattr(event, "is_user_annotation", False))


def _merged(intervals: list) -> list:
    """The union of (start, end) intervals, as sorted disjoint intervals."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def device_timeline(calls: list, work: list) -> dict:
    """Where a call's time goes on the device, from the host's (start, end) of each call and the device's
    (start, end) of each piece of work (kernels, copies, memsets), in us on the profiler's one clock.

    A call owns the work that starts from its start until the next call's. Medians over the calls of:
    ``before_first_us``, from the call's start to its first work (the GPU idles while the host prepares
    the call); ``gaps_us``, the device idle between the call's pieces of work (the host launching
    slower than the GPU runs them); ``busy_us``, the union of its work; ``past_return_us``, from the
    call's return to the end of its work (negative: the GPU had finished before the host returned).
    """
    calls = sorted(calls)
    per_call = {"before_first_us": [], "gaps_us": [], "busy_us": [], "past_return_us": []}
    for index, (start, end) in enumerate(calls):
        until = calls[index + 1][0] if index + 1 < len(calls) else float("inf")
        merged = _merged([w for w in work if start <= w[0] < until])
        if not merged:
            continue
        busy = sum(b - a for a, b in merged)
        per_call["before_first_us"].append(merged[0][0] - start)
        per_call["gaps_us"].append(merged[-1][1] - merged[0][0] - busy)
        per_call["busy_us"].append(busy)
        per_call["past_return_us"].append(merged[-1][1] - end)
    if not per_call["busy_us"]:
        return None
    return {key: statistics.median(values) for key, values in per_call.items()}


def markdown(rows: list[dict]) -> str:
    lines = ["| case | dtype | wall ms | device kernels ms | launches | host reads | queue drains | event waits | copies |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['dtype']} | {r['wall_ms']:.3f} | {r['device_kernel_ms']:.3f} | "
                     f"{r['launches']:.0f} | {r['host_reads_of_device_values']:.0f} | {r['queue_drains']:.0f} | "
                     f"{r['event_waits']:.0f} | {r['copies']:.0f} |")
    timed = [r for r in rows if r.get("device_timeline")]
    if timed:
        lines += ["", "The device's timeline (per call, medians, us): idle before its first work, idle between its "
                  "pieces of work, busy, and its work past the host's return.", "",
                  "| case | dtype | idle before first | idle between | busy | past return |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in timed:
            t = r["device_timeline"]
            lines.append(f"| {r['case']} | {r['dtype']} | {t['before_first_us']:.1f} | {t['gaps_us']:.1f} | "
                         f"{t['busy_us']:.1f} | {t['past_return_us']:.1f} |")
    for r in rows:
        lines += ["", f"{r['case']} {r['dtype']}, host time by operator (per call):", "",
                  "| operator | calls | self host us |", "| --- | ---: | ---: |"]
        lines += [f"| {op['op']} | {op['calls']:.0f} | {op['self_host_us']:.1f} |" for op in r["top_host_ops"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_fusion", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="W1 and a small W5 in float32 (tests, under the interpreter)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        rows = [profile_case(*case, device, **(SMOKE_W5 if case[0] == "W5" else {})) for case in SMOKE_CASES]
    else:
        rows = [profile_case(*case, device) for case in CASES]
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)",
                       "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
