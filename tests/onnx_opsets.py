"""Which ONNX opsets the installed onnx and onnxruntime both handle (the extra allows onnx 1.16 and
onnxruntime 1.18; opset 23, the Attention operator, came with onnx 1.18 and onnxruntime 1.23)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def runtime_has_opset(opset: int) -> bool:
    """Whether onnx knows ``opset`` and onnxruntime loads a model of it on its CPU provider."""
    import onnx

    from crossattn_gpu.export.runner import _loads

    if onnx.defs.onnx_opset_version() < opset:
        return False
    x, y = (onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1]) for name in "xy")
    return _loads([onnx.helper.make_node("Identity", ["x"], ["y"])], [x], y, opset=opset)
