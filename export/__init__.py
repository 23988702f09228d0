"""ONNX export and the onnxruntime runner; installed as ``crossattn_gpu.export``."""
