"""A model repository for NVIDIA Triton Inference Server's onnxruntime backend.

``write_serving_repository(model, root)`` writes ``root/<name>/1/model.onnx`` and
``root/<name>/config.pbtxt``, with dynamic batching on. The batch axis is Triton's (``max_batch_size``),
so the dims in the config leave it out; the per-example lengths, (B,) in the model, are dims [1]
reshaped to scalars. Triton batches requests of equal lengths together.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .._checks import check_flag
from .onnx_export import check_options, to_onnx

_TYPES = {"float64": "TYPE_FP64", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}


def _tensor(name: str, data_type: str, dims: list[int], reshape_to_scalar: bool = False) -> str:
    reshape = " reshape: { shape: [ ] }" if reshape_to_scalar else ""
    return f'  {{ name: "{name}" data_type: {data_type} dims: [ {", ".join(map(str, dims))} ]{reshape} }}'


def write_serving_repository(model, root, *, name: str = "crossattn_fusion", max_batch_size: int = 64,
                             opset: int = 17, dtype: str = "float32", mask: bool = False,
                             bidirectional: bool = True) -> Path:
    """Export ``model`` into a Triton Inference Server model repository; returns the model's folder.

    The model has the length inputs and the three fused outputs, or two without ``bidirectional`` (see
    ``to_onnx``). ``name`` is the model's folder and its name in the config: letters, digits, ``_``,
    ``.`` and ``-``, not starting with ``.`` or ``-`` (no path separators, which would place the folder
    elsewhere, and no quotes, which would break the config). ValueError otherwise, or for
    ``max_batch_size`` below 1.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"name must be letters, digits, '_', '.' and '-', not starting with '.' or '-'; got {name!r}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, (int, np.integer)) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1; got {max_batch_size!r}")
    check_flag(mask, "mask")
    check_flag(bidirectional, "bidirectional")
    check_options(opset, dtype)  # before any folder is made
    folder = Path(os.fspath(root)) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    to_onnx(model, folder / "1" / "model.onnx", opset=opset, dtype=dtype, mask=mask, bidirectional=bidirectional)
    width, kind = model.embedding_dim, _TYPES[dtype]
    inputs = [
        _tensor("sequential_repr", kind, [-1, width]),
        _tensor("structural_repr", kind, [-1, width]),
        _tensor("sequential_lengths", "TYPE_INT64", [1], reshape_to_scalar=True),
        _tensor("structural_lengths", "TYPE_INT64", [1], reshape_to_scalar=True),
    ]
    if mask:
        inputs.append(_tensor("mask", "TYPE_BOOL", [-1, -1]))
    names = ("fused_sequential", "fused_structural", "bidirectional_fusion")[: 3 if bidirectional else 2]
    outputs = [_tensor(n, kind, [-1, width]) for n in names]
    config = "\n".join([
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [", ",\n".join(inputs), "]",
        "output [", ",\n".join(outputs), "]",
        "dynamic_batching { }",
        "",
    ])
    (folder / "config.pbtxt").write_text(config)
    return folder
