"""crossattn_gpu: cross-attention fusion of sequence and structure embeddings.

>>> from crossattn_gpu import CrossAttention
>>> fusion = CrossAttention(embedding_dim=64, attention_heads=2)

The NumPy backend is always there; GPU backends and the ONNX export come with extras
(``pip install 'crossattn_gpu[triton]'``, ``[cuda13]``, ``[onnx]``).
"""

from .attention import CrossAttention
from .backends import available_backends

__version__ = "0.1.0"

__all__ = ["CrossAttention", "available_backends", "__version__"]
