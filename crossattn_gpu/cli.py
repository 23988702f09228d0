"""The ``crossattn-gpu`` command (also ``python -m crossattn_gpu``): demo, fuse, info."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

from . import __version__, _blas
from ._optional import version_of
from ._threads import cpu_count, parallel_available
from .attention import CrossAttention
from .backends import FLOAT32_PRECISIONS, backend_status, get_backend


def _demo(args) -> int:
    # The seed document's usage example, on the chosen backend.
    np.random.seed(args.seed)
    sequential_repr = np.random.randn(args.length, args.dim)
    structural_repr = np.random.randn(args.length, args.dim)
    cross_attention = CrossAttention(embedding_dim=args.dim, attention_heads=args.heads, backend=args.backend)
    start = time.perf_counter()
    fusion_results = cross_attention.fuse_representations(sequential_repr, structural_repr)
    elapsed = time.perf_counter() - start

    print(f"Backend: {cross_attention.backend}")
    print(f"Sequential representations shape: {sequential_repr.shape}")
    print(f"Structural representations shape: {structural_repr.shape}")
    print(f"Fused sequential shape: {fusion_results['fused_sequential'].shape}")
    print(f"Fused structural shape: {fusion_results['fused_structural'].shape}")
    print(f"Bidirectional fusion shape: {fusion_results['bidirectional_fusion'].shape}")
    print(f"Average sequential similarity: {np.mean(fusion_results['seq_similarity']):.3f}")
    print(f"Average structural similarity: {np.mean(fusion_results['struct_similarity']):.3f}")
    print(f"Query weights shape: {cross_attention.get_attention_weights()['query_weights'].shape}")
    print(cross_attention.generate_report()["summary"])
    # The first call builds what the backend keeps (onnxruntime's sessions: ~20 ms here at D = 64);
    # later calls show what a call costs.
    later = []
    while len(later) < 5 or (len(later) < 200 and sum(later) < 0.2):
        start = time.perf_counter()
        cross_attention.fuse_representations(sequential_repr, structural_repr)
        later.append(time.perf_counter() - start)
    print(f"fuse_representations took {elapsed * 1e3:.3f} ms (first call, including set-up), then "
          f"{np.median(later) * 1e3:.3f} ms a call (median of {len(later)})")
    return 0


def _fuse(args) -> int:
    from .fuse_files import EmbeddingFile, NpzWriter, fuse_collections

    if args.model:
        given = [flag for flag, value in (("--weights", args.weights), ("--seed", args.seed), ("--heads", args.heads),
                                          ("--backend", args.backend), ("--dtype", args.dtype),
                                          ("--float32-precision", args.float32_precision)) if value is not None]
        if given:
            raise ValueError("--model fuses with the model's own weights and dtype on onnxruntime; "
                             f"drop {', '.join(given)}")
    elif args.provider:
        raise ValueError("--provider names onnxruntime's execution provider for --model; without --model, "
                         "--backend chooses where the fusion runs")
    with EmbeddingFile(args.seq, "sequence") as seq, EmbeddingFile(args.struct, "structure") as struct:
        # Files of float64 alone are computed in float64 whether the model's dtype follows them or is
        # float64; named, it lets ``auto`` take the faster CPU backend for float64 (onnx_backend).
        dtype = args.dtype or ("float64" if seq.dtypes | struct.dtypes == {"float64"} else None)
        settings = dict(backend=args.backend or "auto", dtype=dtype, float32_precision=args.float32_precision or "ieee")
        if args.model:
            from .export.runner import OnnxFusion

            model = OnnxFusion(args.model, providers=args.provider)
        elif args.weights:
            model = CrossAttention.load(args.weights, **settings)
        else:
            width = next(iter(seq.shapes.values()))[1]
            seed, heads = (default if value is None else value for value, default in ((args.seed, 0), (args.heads, 1)))
            print(f"no --weights given: using random weights (seed {seed}, D={width}, H={heads})", file=sys.stderr)
            model = CrossAttention(width, heads, seed=seed, **settings)
        runs_on = f"onnxruntime ({model.provider})" if args.model else f"backend {model.backend}"
        on_cpu_backend = not args.model and model.backend in ("numpy", "onnx")
        if args.dtype is None and "float64" in seq.dtypes | struct.dtypes and on_cpu_backend:
            # 400 antibodies at D = 1280, H = 8 on this project's 2-core CPU: 55 s in float64 on NumPy,
            # 18 s with --dtype float32 (onnx backend).
            print(f"note: the files hold float64, which backend {model.backend} computes in float64; --dtype float32 "
                  "computes in float32, faster",
                  file=sys.stderr)
        start = time.perf_counter()
        with NpzWriter(args.out, keep={"sequence file": args.seq, "structure file": args.struct}) as out:
            for key, array in fuse_collections(
                model, seq, struct, batch_size=args.batch_size, bidirectional=not args.no_bidirectional,
                progress=not args.quiet,
            ):
                out.write(key, array)
        elapsed = time.perf_counter() - start
    print(f"fused {len(seq)} antibod{'y' if len(seq) == 1 else 'ies'} on {runs_on} in {elapsed:.2f} s (files read "
          f"and written included) -> {out.path}")
    return 0


def _export(args) -> int:
    from .export.onnx_export import to_onnx

    if args.out and os.path.exists(args.out) and os.path.samefile(args.out, args.weights):
        raise ValueError(f"--out {args.out} is the weights file itself; writing the model would replace it")
    model = CrossAttention.load(args.weights, backend="numpy")
    if args.serving_repo:
        from .export.serving import write_serving_repository

        folder = write_serving_repository(model, args.serving_repo, opset=args.opset, dtype=args.dtype, mask=args.mask,
                                          bidirectional=not args.no_bidirectional)
        print(f"wrote the Triton Inference Server model repository entry {folder}")
    if not args.out:
        return 0
    path = to_onnx(
        model, args.out, opset=args.opset, dtype=args.dtype, lengths=not args.no_lengths, mask=args.mask,
        similarity=args.similarity, attention_weights=args.attention_weights, bidirectional=not args.no_bidirectional,
    )
    flavour = "Attention operator" if args.opset >= 23 else "MatMul/Softmax decomposition"
    print(f"wrote {path} (D={model.embedding_dim}, H={model.attention_heads}, {args.dtype}, opset {args.opset}: {flavour})")
    return 0


def _info(args) -> int:
    print(f"crossattn_gpu {__version__} on Python {platform.python_version()} ({platform.machine()})")
    print("backends:")
    for name, reason in backend_status().items():
        print(f"  {name:8s} {'available' if reason is None else 'unavailable: ' + reason}")
    auto = get_backend("auto").name
    auto_float64 = get_backend("auto", dtype="float64").name
    print(f"auto takes: {auto}" + ("" if auto_float64 == auto else
                                   f" (for models of dtype float64: {auto_float64}, whose OpenBLAS runs AVX-512 kernels here)"))
    workers = f"{cpu_count()} worker threads" if parallel_available() else "1 thread (install the [cpu] extra for more)"
    print(f"numpy backend runs on {workers}")
    faster = _blas.faster_coretype()
    if faster:
        print(f"  tip: NumPy's OpenBLAS runs its {faster[0]} kernels, older than this CPU's instructions; export "
              f"OPENBLAS_CORETYPE={faster[1]} before starting Python to use them (float32 GEMMs 1.8x faster with "
              "SKYLAKEX on this project's AMD EPYC machines, 5.4x with NumPy 1.24 on its Intel Xeon)")
    if auto == "onnx" and _openblas_spins():
        print("  tip: NumPy's OpenBLAS threads spin on after each of its GEMMs and slow the onnx backend's next run "
              "(one NumPy GEMM just before a call: +27 to +33 ms on this project's 2-core CPU); export "
              "OPENBLAS_THREAD_TIMEOUT=4 before starting Python to have them sleep at once")
    print("packages:")
    for module in ("numpy", "threadpoolctl", "torch", "triton", "cupy", "onnx", "onnxruntime"):
        print(f"  {module:14s} {version_of(module) or 'not installed'}")
    if version_of("onnxruntime"):  # which run an exported model (OnnxFusion): the CUDA one needs onnxruntime-gpu
        import onnxruntime

        print(f"onnxruntime providers: {', '.join(onnxruntime.get_available_providers())}")
    print(f"GPU: {_gpu_name() or 'none found'}")
    return 0


def _openblas_spins() -> bool:
    """True when an OpenBLAS with more than one thread is loaded and keeps its default spin after a GEMM
    (OpenBLAS reads OPENBLAS_THREAD_TIMEOUT, or GOTO_THREAD_TIMEOUT, when it loads)."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ or "GOTO_THREAD_TIMEOUT" in os.environ:
        return False
    return any(lib.get("num_threads", 1) > 1 for lib in _blas.openblas_libraries())


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # no cupy, no driver or no device: all mean "no GPU through cupy"
        pass
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossattn-gpu", description="Cross-attention fusion of sequence and structure embeddings."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the seed document's example and time it")
    demo.add_argument("--backend", default="auto", help="backend name, or auto (default)")
    demo.add_argument("--seed", type=int, default=42, help="NumPy seed for inputs and weights (default 42)")
    demo.add_argument("--length", type=int, default=10, help="sequence length L (default 10)")
    demo.add_argument("--dim", type=int, default=64, help="embedding dimension D (default 64)")
    demo.add_argument("--heads", type=int, default=2, help="attention heads H (default 2)")
    demo.set_defaults(run=_demo)

    fuse = commands.add_parser("fuse", help="fuse npz files of per-antibody embeddings")
    fuse.add_argument("--seq", required=True, help="npz with one (L_i, D) sequence embedding per antibody id")
    fuse.add_argument("--struct", required=True, help="npz with one (L_i, D) structure embedding per antibody id")
    fuse.add_argument("--out", required=True, help="output npz: '<id>/fused_sequential', ... per id")
    fuse.add_argument("--weights", help="weights file (safetensors or npz) written by CrossAttention.save")
    fuse.add_argument("--model", help="instead of weights, an ONNX model written by 'crossattn-gpu export' (or "
                      "to_onnx): fused on onnxruntime, in the model's dtype")
    fuse.add_argument("--provider", action="append", metavar="NAME",
                      help="with --model: onnxruntime's execution provider, such as CPUExecutionProvider (repeat "
                      "for more, in onnxruntime's order of preference; the first must start); default "
                      "CUDAExecutionProvider where onnxruntime offers it, else CPUExecutionProvider")
    fuse.add_argument("--seed", type=int, help="seed of random weights when --weights is absent (default 0)")
    fuse.add_argument("--heads", type=int, help="heads of random weights when --weights is absent (default 1)")
    fuse.add_argument("--backend", help="backend name, or auto (default: the fastest here; without a GPU, "
                      "onnx when the onnx extra is installed, else numpy)")
    fuse.add_argument("--dtype", default=None, choices=("float64", "float32", "float16"),
                      help="compute dtype (default: the inputs' dtype; npz files hold no bfloat16)")
    fuse.add_argument("--float32-precision", choices=FLOAT32_PRECISIONS,
                      help="float32 GEMMs on a GPU: ieee (default), tf32x3 (three TF32 tensor-core products, about "
                      "float32's accuracy) or tf32 (one, ~1e-3); backends without TF32 kernels compute ieee")
    fuse.add_argument("--batch-size", type=int, default=64, help="at most this many antibodies per padded batch (default 64); antibodies of "
                      "similar length share one while their padding costs less than a call of their own")
    fuse.add_argument("--no-bidirectional", action="store_true", help="skip bidirectional_fusion")
    fuse.add_argument("--quiet", action="store_true", help="no progress bar")
    fuse.set_defaults(run=_fuse)

    export = commands.add_parser("export", help="export the fusion to ONNX for onnxruntime")
    export.add_argument("--weights", required=True, help="weights file (safetensors or npz)")
    export.add_argument("--out", help="the .onnx file to write")
    export.add_argument("--serving-repo", help="also (or only) write a Triton Inference Server model repository here")
    export.add_argument("--opset", type=int, default=17, help="below 23: MatMul/Softmax; 23+: Attention op (default 17)")
    export.add_argument("--dtype", default="float32", choices=["float32", "float16", "float64"],
                        help="model dtype (default float32)")
    export.add_argument("--no-lengths", action="store_true", help="no sequential_lengths/structural_lengths inputs")
    export.add_argument("--mask", action="store_true", help="add a bool mask input (B, Ls, Lt), False = masked")
    export.add_argument("--similarity", action="store_true", help="add the similarity outputs")
    export.add_argument("--attention-weights", action="store_true", help="add the attention probability outputs")
    export.add_argument("--no-bidirectional", action="store_true",
                        help="no bidirectional_fusion output: the model then takes sequences and structures of "
                             "different lengths")
    export.set_defaults(run=_export)

    info = commands.add_parser("info", help="backends, package versions and GPU of this machine")
    info.set_defaults(run=_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "export" and not (args.out or args.serving_repo):
        parser.error("export: give --out, --serving-repo or both")
    try:
        return args.run(args)
    except (ValueError, TypeError, OverflowError, ImportError, RuntimeError, OSError) as exc:
        print(f"crossattn-gpu {args.command}: error: {exc}", file=sys.stderr)
        return 2
