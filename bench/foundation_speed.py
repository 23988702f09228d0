"""CPU speed of the NumPy backend against the seed's algorithm and torch, in one run.

    python bench/foundation_speed.py [--batch 64 --length 256 --dim 128 --heads 4 --repeats 5]

Peers, all computing fused_sequential and fused_structural (no similarities, no probabilities):
  seed      the seed's algorithm as written: per example, per head, float64 NumPy;
  numpy     this library's NumPy backend in float32 and float64;
  torch     the same fusion in torch on the CPU, float32: one GEMM per projection for all heads and
            F.scaled_dot_product_attention.
Every output is checked against the float64 seed result before its time counts. Writes a JSON file
and a markdown table to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np

from crossattn_gpu import CrossAttention, __version__


def seed_fusion(w, seq, struct):
    """The seed's loops: per example, per head, float64."""
    wq, wk, wv, wo = w
    heads, width = wq.shape[0], wq.shape[1]

    def mha(xq, xkv):
        outs = []
        for h in range(heads):
            q, k, v = np.dot(xq, wq[h]), np.dot(xkv, wk[h]), np.dot(xkv, wv[h])
            scores = np.dot(q, k.T) / np.sqrt(width)
            e = np.exp(scores - scores.max(axis=-1, keepdims=True))
            outs.append(np.dot(e / e.sum(axis=-1, keepdims=True), v))
        return np.dot(np.concatenate(outs, axis=-1), wo)

    fs = np.stack([mha(seq[b], struct[b]) for b in range(len(seq))])
    ft = np.stack([mha(struct[b], seq[b]) for b in range(len(seq))])
    return fs, ft


def torch_fusion(torch, w, seq, struct):
    """Batched projections and F.scaled_dot_product_attention, on the CPU."""
    wq, wk, wv, wo = w  # (D, H*D) each, and (H*D, D)
    batch, length, width = seq.shape
    heads = wq.shape[1] // width

    def split(x):
        return x.view(batch, -1, heads, width).transpose(1, 2)

    def mha(xq, xkv):
        q, k, v = split(xq @ wq), split(xkv @ wk), split(xkv @ wv)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=width**-0.5)
        return o.transpose(1, 2).reshape(batch, -1, heads * width) @ wo

    with torch.inference_mode():
        return mha(seq, struct), mha(struct, seq)


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, object]:
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def rel_error(got, want) -> float:
    got = np.asarray(got, dtype=np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    shape = (args.batch, args.length, args.dim)
    seq, struct = rng.standard_normal(shape), rng.standard_normal(shape)
    model = CrossAttention(args.dim, args.heads, seed=0, backend="numpy")
    params = [model.query_weights, model.key_weights, model.value_weights, model.output_weights]
    seed_time, (want_s, want_t) = median_time(lambda: seed_fusion(params, seq, struct), max(1, args.repeats // 2), 0)
    rows = [{"peer": "seed (per example, per head)", "dtype": "float64", "median_s": seed_time, "rel_error": 0.0}]

    def ours(dtype):
        xs, xt = seq.astype(dtype), struct.astype(dtype)
        return lambda: model.fuse_representations(xs, xt, need_similarity=False)

    for dtype in (np.float32, np.float64):
        t, result = median_time(ours(dtype), args.repeats)
        err = max(rel_error(result["fused_sequential"], want_s), rel_error(result["fused_structural"], want_t))
        rows.append({"peer": "crossattn_gpu numpy", "dtype": np.dtype(dtype).name, "median_s": t, "rel_error": err})

    versions = {"numpy": np.__version__, "crossattn_gpu": __version__}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        versions["torch"] = torch.__version__
        side_by_side = [w.transpose(1, 0, 2).reshape(args.dim, -1) for w in params[:3]] + [params[3]]
        concat = [torch.tensor(w, dtype=torch.float32) for w in side_by_side]
        ts, tt = torch.from_numpy(seq).float(), torch.from_numpy(struct).float()
        t, (fs, ft) = median_time(lambda: torch_fusion(torch, concat, ts, tt), args.repeats)
        err = max(rel_error(fs.numpy(), want_s), rel_error(ft.numpy(), want_t))
        rows.append({"peer": "torch CPU (SDPA)", "dtype": "float32", "median_s": t, "rel_error": err, "threads": torch.get_num_threads()})

    for row in rows:
        limit = 1e-10 if row["dtype"] == "float64" else 1e-4
        if row["rel_error"] > limit:
            raise SystemExit(f"{row['peer']} {row['dtype']}: relative error {row['rel_error']:.2e} > {limit}: not timed")
        row["speedup_vs_seed"] = seed_time / row["median_s"]

    ours32 = next(r for r in rows if r["peer"] == "crossattn_gpu numpy" and r["dtype"] == "float32")
    torch_row = next((r for r in rows if r["peer"].startswith("torch")), None)
    report = {
        "date": date.today().isoformat(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "workload": {"B": args.batch, "L": args.length, "D": args.dim, "H": args.heads},
        "versions": versions,
        "rows": rows,
        "numpy_f32_vs_torch": torch_row["median_s"] / ours32["median_s"] if torch_row else None,
    }
    lines = [
        f"# Foundation speed, {report['date']}, CPU ({report['machine']['cores']} cores), "
        f"B={args.batch} L={args.length} D={args.dim} H={args.heads}",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}. Medians of {args.repeats} runs.",
        "",
        "| peer | dtype | median (ms) | speed-up vs seed | rel. error vs float64 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['peer']} | {r['dtype']} | {r['median_s'] * 1e3:.1f} | {r['speedup_vs_seed']:.2f}x | {r['rel_error']:.1e} |"
        for r in rows
    ]
    if torch_row:
        lines += ["", f"NumPy float32 vs torch CPU float32: {report['numpy_f32_vs_torch']:.2f}x (above 1: NumPy faster)."]
    table = "\n".join(lines) + "\n"
    print(table)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['date']}-cpu-foundation"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
