"""Export the fusion to ONNX: ``to_onnx(model, path, ...)`` and the graphs the ``onnx`` backend runs.

The graph is built directly with ``onnx.helper`` (see ``graph.py`` for why and how). Inputs have
dynamic B and L; the folded weights (``crossattn_gpu.folding``) are initializers; the metadata records
D, H, the dtype, the library version and a SHA-256 of the seed's four weights they were folded from;
a file written by ``to_onnx`` also records a SHA-256 of the model itself (``integrity.py``), which
``OnnxFusion`` checks on load.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._checks import check_flag
from .._files import whole_file
from .._optional import require
from ..folding import fold_named
from ..weights import weights_digest

require("onnx", "the ONNX export")
import onnx  # noqa: E402
from onnx import TensorProto  # noqa: E402

from .graph import (  # noqa: E402
    ATTENTION_OPSET, ELEMENT_TYPES, MIN_OPSET, GraphBuilder, attention_core, cosine_similarity, folded_multi_head,
    head_weights, project_heads, zero_prob_rows,
)
from .integrity import DIGEST_KEY, model_digest  # noqa: E402

_INT64 = TensorProto.INT64
_BOOL = TensorProto.BOOL

#: Weights above this many bytes go to one external-data file beside the model, ``<model file>.data``:
#: protobuf caps a message at 2 GiB, and folded float32 weights take 2 * H * D**2 * 4 bytes (1 GiB at
#: D = 4096 with 8 heads: exported and served that way on this project's CPU, 1.7e-5 from the NumPy
#: backend's float32; 2 GiB with 16).
EXTERNAL_DATA_BYTES = 1 << 30


def check_options(opset: int, dtype: str) -> None:
    """ValueError for a dtype or an opset that the export does not support."""
    if dtype not in ("float64", "float32", "float16"):
        raise ValueError(f"dtype must be 'float64', 'float32' or 'float16'; got {dtype!r}")
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an integer from {MIN_OPSET} to {newest}; got {opset!r}")


def _folded(arrays: dict, folded: np.ndarray | None) -> np.ndarray:
    """(D, 2*H*D) float64: [A_0 .. A_H-1 | U_0 .. U_H-1] (``crossattn_gpu.folding``), unless the caller
    already has it."""
    return fold_named(arrays) if folded is None else folded


def _head_weights(g: GraphBuilder, folded: np.ndarray, heads: int, width: int) -> list[str]:
    """The initializers ``folded_query_weights`` (the A_h) and ``folded_value_weights`` (the U_h), in the
    layout of ``graph.head_weights``."""
    hd = heads * width
    return [g.weight(name, head_weights(block, heads, width))
            for name, block in (("folded_query_weights", folded[:, :hd]), ("folded_value_weights", folded[:, hd:]))]


def _metadata(arrays: dict, dtype: str, opset: int, digest: str | None, **options) -> dict[str, str]:
    from .. import __version__

    heads, width, _ = arrays["query_weights"].shape
    meta = {
        "embedding_dim": str(width),
        "attention_heads": str(heads),
        "dtype": dtype,
        "flavour": "Attention operator" if opset >= ATTENTION_OPSET else "MatMul/Softmax decomposition",
        "projections": "folded: queries X A_h, keys X, values X U_h, output the heads' sum",
        "crossattn_gpu_version": __version__,
        "weights_sha256": weights_digest(arrays) if digest is None else digest,
    }
    meta.update({key: str(value).lower() for key, value in options.items()})
    return meta


def _lengths_and_mask(g: GraphBuilder, names: tuple[str, str], lengths: bool, mask: bool):
    if lengths:
        for name in names:
            g.add_input(name, _INT64, ["batch"])
    keep = g.add_input("mask", _BOOL, ["mask_batch", "len_q", "len_k"]) if mask else None
    return keep


def build_fusion_model(
    arrays: dict,
    *,
    opset: int = 17,
    dtype: str = "float32",
    lengths: bool = True,
    mask: bool = False,
    similarity: bool = False,
    attention_weights: bool = False,
    bidirectional: bool = True,
    folded: np.ndarray | None = None,
    digest: str | None = None,
    external: dict | None = None,
) -> onnx.ModelProto:
    """The whole fusion as an ONNX model (see :func:`to_onnx` for the inputs and outputs). ``folded``
    and ``digest``: ``fold_weights`` and ``weights_digest`` of ``arrays``, when the caller builds
    several graphs from one set of weights (D = 1280, H = 8: ~0.6 s and ~0.2 s on this project's CPU).
    ``external``: a dict that receives the weights, which then stay out of the model (``GraphBuilder``)."""
    check_options(opset, dtype)
    heads, width, _ = arrays["query_weights"].shape
    g = GraphBuilder(dtype, external)
    xs = g.add_input("sequential_repr", g.elem, ["batch", "len_s", width])
    xt = g.add_input("structural_repr", g.elem, ["batch", "len_t", width])
    keep = _lengths_and_mask(g, ("sequential_lengths", "structural_lengths"), lengths, mask)
    s_valid = g.valid_positions(xs, "sequential_lengths") if lengths else None
    t_valid = g.valid_positions(xt, "structural_lengths") if lengths else None
    # Each input gives its queries (for its own direction) and values (for the other).
    weights = _head_weights(g, _folded(arrays, folded), heads, width)
    qs, vs = project_heads(g, xs, weights, heads, width)
    qt, vt = project_heads(g, xt, weights, heads, width)
    common = dict(heads=heads, width=width, opset=opset, need_probs=attention_weights)
    keep_st = None if keep is None else g.unsqueeze(keep, [1])
    keep_ts = None if keep is None else g.unsqueeze(g.op("Transpose", [keep], perm=[0, 2, 1]), [1])
    fused_s, probs_st = folded_multi_head(g, qs, xt, vt, keep=keep_st, q_valid=s_valid, k_valid=t_valid, **common)
    fused_t, probs_ts = folded_multi_head(g, qt, xs, vs, keep=keep_ts, q_valid=t_valid, k_valid=s_valid, **common)

    g.add_output("fused_sequential", fused_s, g.elem, ["batch", "len_s", width])
    g.add_output("fused_structural", fused_t, g.elem, ["batch", "len_t", width])
    if bidirectional:
        # Reshape fails at run time unless Ls == Lt, where Add alone would broadcast Ls = 1 silently.
        aligned = g.op("Reshape", [fused_t, g.op("Shape", [fused_s])])
        g.add_output("bidirectional_fusion", g.op("Add", [fused_s, aligned]), g.elem, ["batch", "len_s", width])
    if similarity:
        for name, x, fused, valid, length in (
            ("seq_similarity", xs, fused_s, s_valid, "len_s"),
            ("struct_similarity", xt, fused_t, t_valid, "len_t"),
        ):
            sims = cosine_similarity(g, g.zero_rows(x, valid), fused, opset)
            g.add_output(name, g.to_model_dtype(sims), g.elem, ["batch", length, length])
    if attention_weights:
        g.add_output("attention_weights_seq_to_struct", g.to_model_dtype(probs_st), g.elem, ["batch", heads, "len_s", "len_t"])
        g.add_output("attention_weights_struct_to_seq", g.to_model_dtype(probs_ts), g.elem, ["batch", heads, "len_t", "len_s"])
    meta = _metadata(arrays, dtype, opset, digest, graph="fusion", lengths=lengths, mask=mask, similarity=similarity,
                     attention_weights=attention_weights, bidirectional=bidirectional)
    return g.model(opset, meta)


def build_attention_model(
    arrays: dict | None, width: int, *, opset: int, dtype: str, mask: bool, attention_weights: bool,
    folded: np.ndarray | None = None, digest: str | None = None, lengths: bool = True, external: dict | None = None,
) -> onnx.ModelProto:
    """``multi_head_attention`` (with ``arrays``) or ``scaled_dot_product_attention`` (``arrays=None``).
    ``folded``, ``digest`` and ``external`` as in :func:`build_fusion_model`.

    Inputs: query_seq (B, Lq, D), key_seq (B, Lk, D), value_seq (B, Lk, Dv), with ``lengths``
    query_lengths and key_lengths (B,) int64, and with ``mask`` a bool ``mask`` (Bm, Lq, Lk), False
    where masked. Outputs: ``output`` (B, Lq, D or Dv) and, with ``attention_weights``, (B, H, Lq, Lk).
    """
    check_options(opset, dtype)
    g = GraphBuilder(dtype, external)
    xq = g.add_input("query_seq", g.elem, ["batch", "len_q", width])
    xk = g.add_input("key_seq", g.elem, ["batch", "len_k", width])
    xv = g.add_input("value_seq", g.elem, ["batch", "len_k", "width_v" if arrays is None else width])
    keep = _lengths_and_mask(g, ("query_lengths", "key_lengths"), lengths, mask)
    keep = None if keep is None else g.unsqueeze(keep, [1])
    q_valid, k_valid = None, None
    if lengths:
        q_valid, k_valid = g.valid_positions(xq, "query_lengths"), g.valid_positions(xk, "key_lengths")
    if arrays is None:
        heads = 1
        q, k, v = (g.unsqueeze(x, [1]) for x in (xq, xk, xv))
        scale = 1.0 / np.sqrt(width)
        if g.dtype == "float64":
            # onnxruntime (1.30, not 1.18 or 1.32) fuses a MatMul and a Mul by a scalar into a FusedMatMul,
            # whose scale is a float32 attribute: the float64 outputs then differed by 1e-8. A scale
            # that is a (width,) vector is not fused.
            q, scale = g.op("Mul", [q, g.const(np.full(width, scale))]), 1.0
        out, probs = attention_core(g, q, k, v, scale=scale, keep=keep, k_valid=k_valid,
                                    opset=opset, need_probs=attention_weights)
        out = g.zero_rows(g.op("Squeeze", [out, g.const([1], np.int64)]), q_valid)
        probs = zero_prob_rows(g, probs, q_valid)
        meta_arrays = None
    else:
        heads = arrays["query_weights"].shape[0]
        a, u = _head_weights(g, _folded(arrays, folded), heads, width)
        (q,) = project_heads(g, xq, [a], heads, width)
        (v,) = project_heads(g, xv, [u], heads, width)
        out, probs = folded_multi_head(g, q, xk, v, heads=heads, width=width, keep=keep, q_valid=q_valid,
                                       k_valid=k_valid, opset=opset, need_probs=attention_weights)
        meta_arrays = arrays
    g.add_output("output", out, g.elem, ["batch", "len_q", "width_v" if arrays is None else width])
    if attention_weights:
        g.add_output("attention_weights", g.to_model_dtype(probs), g.elem, ["batch", heads, "len_q", "len_k"])
    meta = {"graph": "sdpa" if arrays is None else "multi_head_attention", "embedding_dim": str(width)}
    if meta_arrays is not None:
        meta = _metadata(meta_arrays, dtype, opset, digest, graph="multi_head_attention")
    return g.model(opset, meta)


def build_similarity_model(width: int, *, opset: int, dtype: str) -> onnx.ModelProto:
    """The seed's cosine similarities alone: ``rows`` (B, La, D) and ``fused`` (B, Lb, D) in, ``similarity``
    (B, La, Lb) out, zero rows giving 0 (padded rows must come in zeroed). For the ``onnx`` backend's
    fusions too long for one graph (``OnnxBackend.fuse``)."""
    check_options(opset, dtype)
    g = GraphBuilder(dtype)
    rows = g.add_input("rows", g.elem, ["batch", "len_a", width])
    fused = g.add_input("fused", g.elem, ["batch", "len_b", width])
    sims = g.to_model_dtype(cosine_similarity(g, rows, fused, opset))
    g.add_output("similarity", sims, g.elem, ["batch", "len_a", "len_b"])
    return g.model(opset, {"graph": "similarity", "embedding_dim": str(width)})


def build_cast_model(source: str, target: str) -> onnx.ModelProto:
    """One ``Cast`` from ``source`` to ``target`` (float dtype names), any shape: the ``onnx`` backend's
    float16 conversions (``runner.host_cast``)."""
    g = GraphBuilder(target)
    x = g.add_input("x", ELEMENT_TYPES[source], None)
    g.add_output("y", g.op("Cast", [x], to=g.elem), g.elem, None)
    return g.model(MIN_OPSET, {"graph": "cast"})


def to_onnx(
    model,
    path,
    *,
    opset: int = 17,
    dtype: str = "float32",
    lengths: bool = True,
    mask: bool = False,
    similarity: bool = False,
    attention_weights: bool = False,
    bidirectional: bool = True,
) -> Path:
    """Write the fusion of ``model`` (a CrossAttention) as an ONNX file, checked by onnx's full checker.

    Args:
        model: the CrossAttention whose weights become initializers.
        path: the .onnx file to write.
        opset: below 23, a portable MatMul/Softmax decomposition; 23 or more, the Attention operator.
        dtype: "float32", "float16" or "float64" for inputs, weights and outputs (softmax in float32
            for float16 models, in float64 for float64 ones; mask constants never overflow float16).
        lengths: add the inputs ``sequential_lengths`` and ``structural_lengths`` (B,) int64.
        mask: add the input ``mask`` (Bm, Ls, Lt) bool, Bm in {1, B}: False where the seed's mask is 0
            (score -> -1e9 in the sequential -> structural direction; transposed for the other one).
        similarity: add the outputs ``seq_similarity`` (B, Ls, Ls) and ``struct_similarity`` (B, Lt, Lt).
        attention_weights: add ``attention_weights_seq_to_struct`` (B, H, Ls, Lt) and
            ``attention_weights_struct_to_seq`` (B, H, Lt, Ls).
        bidirectional: add ``bidirectional_fusion`` (B, Ls, D), the sum of the two fused outputs,
            which needs Ls == Lt (the model fails at run time otherwise); without it, as with
            ``CrossAttention``'s ``bidirectional=False``, the two lengths may differ.

    Inputs ``sequential_repr`` (B, Ls, D) and ``structural_repr`` (B, Lt, D) with B, Ls, Lt dynamic;
    outputs ``fused_sequential`` (B, Ls, D) and ``fused_structural`` (B, Lt, D), and those the options add.

    The metadata's ``model_sha256`` (``integrity.DIGEST_KEY``) is a digest of the rest of the model,
    weights included wherever they are stored: ``OnnxFusion`` refuses a file that no longer matches it.

    Weights over ``EXTERNAL_DATA_BYTES`` (1 GiB) are written beside the model as ``<path>.data``, which
    must stay in the same folder (``OnnxFusion`` refuses locations outside it).

    Returns the path written. Raises ValueError for an unsupported opset or dtype, TypeError for a flag
    that is not a bool.
    """
    for name, value in (("lengths", lengths), ("mask", mask), ("similarity", similarity),
                        ("attention_weights", attention_weights), ("bidirectional", bidirectional)):
        check_flag(value, name)
    arrays = model.get_attention_weights()
    onnx_model = build_fusion_model(
        arrays, opset=opset, dtype=dtype, lengths=lengths, mask=mask, similarity=similarity,
        attention_weights=attention_weights, bidirectional=bidirectional,
    )
    digest = model_digest(onnx_model)  # of everything else, checked on load (integrity.py)
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = DIGEST_KEY, digest
    path = Path(os.fspath(path))
    if sum(len(t.raw_data) for t in onnx_model.graph.initializer) <= EXTERNAL_DATA_BYTES:
        onnx.checker.check_model(onnx_model, full_check=True)
        with whole_file(path) as f:  # an interrupted export leaves a previous model as it was
            f.write(onnx_model.SerializeToString())
        return path
    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file: a re-export would grow it
    onnx.save_model(onnx_model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)  # by path: the checker then reads the data file
    return path
