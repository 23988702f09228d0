"""ONNX export and the onnxruntime runner; installed as ``crossattn_gpu.export``.

``to_onnx`` needs the ``onnx`` extra (``pip install 'crossattn_gpu[onnx]'``); importing this package
does not.
"""


def __getattr__(name):
    if name in ("to_onnx", "build_fusion_model"):
        from . import onnx_export

        return getattr(onnx_export, name)
    if name == "OnnxFusion":
        from .runner import OnnxFusion

        return OnnxFusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["to_onnx", "build_fusion_model", "OnnxFusion"]
