"""GPU kernel sources (Triton and CUDA), one operator per file; installed as ``crossattn_gpu.kernels``."""
