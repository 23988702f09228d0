"""Triton backend: projections as torch GEMMs, attention in the fused kernel of ``kernels/attention.py``.

The fusion uses the folded weights (``crossattn_gpu.folding``): one GEMM per input gives every head's
queries and values, the raw inputs are the keys of every head (a head stride of 0 in the kernel), and
the output is the sum of the heads' outputs, taken in float32. Both directions, the similarities and,
when asked, the attention probabilities (rebuilt from the kernel's log-sum-exp) stay on the device.

Arrays: torch tensors stay torch (results on the caller's device), CuPy arrays cross through DLPack
without a copy (results are CuPy), NumPy arrays are copied over and back. With ``TRITON_INTERPRET=1``
and no GPU, the same code runs under Triton's interpreter on torch CPU tensors (for tests; slow).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from .._optional import require
from ..folding import fold_weights

_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float32"}


def interpreter_mode() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class TorchFoldedWeights:
    heads: int
    width: int
    query_value: object  # torch (D, 2*H*D): [A_0 .. A_H-1 | U_0 .. U_H-1]

    def columns(self, part: str):
        hd = self.heads * self.width
        return {"q": self.query_value[:, :hd], "v": self.query_value[:, hd:], "qv": self.query_value}[part]


class TritonBackend:
    """Runs the fusion on a CUDA GPU with Triton kernels (or under Triton's interpreter on the CPU)."""

    name = "triton"

    def __init__(self):
        self.torch = require("torch", "backend 'triton'")
        require("triton", "backend 'triton'")
        if interpreter_mode():
            self.device = self.torch.device("cpu")
            # The interpreter does no bfloat16 arithmetic.
            self.dtypes = ("float64", "float32", "float16")
        elif self.torch.cuda.is_available():
            self.device = self.torch.device("cuda", self.torch.cuda.current_device())
            self.dtypes = ("float64", "float32", "float16", "bfloat16")
        else:
            raise RuntimeError(
                "backend 'triton' needs a CUDA GPU, and torch sees none; set TRITON_INTERPRET=1 before "
                "importing crossattn_gpu to run it under Triton's interpreter on the CPU (slow, for testing)"
            )
        from ..kernels import attention as kernel  # imported late: TRITON_INTERPRET is read at import

        self.kernel = kernel

    @staticmethod
    def usable_by_auto() -> bool:
        """``auto`` takes Triton only on a real GPU, never under the (slow) interpreter.

        Cheap checks first, so that ``auto`` on a machine without an NVIDIA driver never imports torch.
        """
        if interpreter_mode() or (sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia")):
            return False
        try:
            import torch
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.is_available()

    # --- arrays -----------------------------------------------------------------------------------

    def caller_kind(self, x):
        torch = self.torch
        if isinstance(x, torch.Tensor):
            return ("torch", x.device)
        if type(x).__module__.split(".")[0] == "cupy":
            return ("cupy", None)
        return ("numpy", None)

    def native(self, x, name: str):
        """``x`` as a torch tensor on this backend's device (no copy for device tensors and CuPy)."""
        torch = self.torch
        if isinstance(x, torch.Tensor):
            return x.to(self.device)
        if type(x).__module__.split(".")[0] == "cupy":
            if self.device.type != "cuda":
                raise TypeError(f"{name} is a CuPy array, but backend 'triton' runs on the CPU here (interpreter)")
            return torch.from_dlpack(x)
        arr = np.asarray(x)
        if arr.dtype == object:
            raise TypeError(f"{name} must be a numeric array; got an object array (ragged nested lists?)")
        if arr.dtype.kind not in "biufc":
            raise TypeError(f"{name} must be numeric; got dtype {arr.dtype}")
        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)

    def host(self, x, name: str) -> np.ndarray:
        if isinstance(x, self.torch.Tensor):
            return x.detach().cpu().numpy()
        if type(x).__module__.split(".")[0] == "cupy":
            return x.get()
        return np.asarray(x)

    @staticmethod
    def dtype_name(arr) -> str:
        return str(arr.dtype).replace("torch.", "")

    def all_finite(self, arr) -> bool:
        return bool(self.torch.isfinite(arr).all())

    def to_caller(self, x, kind, dtype_name: str):
        torch = self.torch
        x = x.to(getattr(torch, dtype_name))
        tag, device = kind
        if tag == "torch":
            return x.to(device)
        if tag == "cupy":
            import cupy

            return cupy.from_dlpack(x.contiguous())
        if dtype_name == "bfloat16":  # NumPy has no bfloat16
            raise TypeError("bfloat16 results cannot be returned as NumPy arrays; pass torch or CuPy inputs")
        return x.cpu().numpy()

    def compute_dtype(self, dtype_name: str):
        # float64 is computed in float32 on the GPU (documented in the README's backend table).
        return getattr(self.torch, _TORCH_DTYPES[dtype_name])

    @staticmethod
    def cast(x, dtype):
        return x.to(dtype)

    def prepare_weights(self, query, key, value, output, dtype) -> TorchFoldedWeights:
        heads, width, _ = query.shape
        folded = self.torch.tensor(fold_weights(query, key, value, output), dtype=dtype, device=self.device)
        return TorchFoldedWeights(heads, width, folded)

    # --- the seed's operations ---------------------------------------------------------------------

    def _device_lengths(self, lengths):
        return None if lengths is None else self.torch.as_tensor(lengths, device=self.device)

    def _zero_padded_rows(self, x, lengths, axis: int):
        """x with the positions at or past ``lengths[b]`` along ``axis`` (1 or 2) set to zero."""
        if lengths is None:
            return x
        positions = self.torch.arange(x.shape[axis], device=x.device)
        pad = positions[None, :] >= self._device_lengths(lengths)[:, None]  # (B, L)
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[axis] = x.shape[axis]
        return x.masked_fill(pad.reshape(shape), 0)

    def _attention(self, q, k, v, *, scale, masked, k_lengths, need_weights, out_dtype=None):
        """The kernel, plus the probabilities rebuilt from its log-sum-exp when asked."""
        torch = self.torch
        if masked is not None:
            masked = masked.expand(masked.shape[0], q.shape[2], k.shape[2])
        out, lse = self.kernel.attention(
            q, k, v, scale=scale, masked=masked, k_lengths=self._device_lengths(k_lengths), out_dtype=out_dtype
        )
        probs = None
        if need_weights:
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
            if masked is not None:
                scores = scores.masked_fill(masked[:, None].bool(), self.kernel.MASK_FILL)
            if k_lengths is not None:
                key_pad = torch.arange(k.shape[2], device=q.device)[None, :] >= self._device_lengths(k_lengths)[:, None]
                scores = scores.masked_fill(key_pad[:, None, None, :], float("-inf"))
            probs = torch.exp(scores - lse[..., None])
            # Renormalising costs little and mends fully masked rows, whose lse (about -1e9) float32
            # cannot hold to the precision that exp(scores - lse) needs.
            probs = (probs / probs.sum(-1, keepdim=True)).to(q.dtype)
        return out, probs

    def _project(self, x, weights: TorchFoldedWeights, parts: str):
        batch, length, width = x.shape
        flat = x.reshape(batch * length, width) @ weights.columns(parts)
        flat = flat.view(batch, length, len(parts), weights.heads, weights.width)
        return [flat[:, :, i].transpose(1, 2) for i in range(len(parts))]  # (B, H, L, D) views

    def _attend(self, q_folded, x_keys, v_folded, masked, q_lengths, k_lengths, need_weights):
        head_out, probs = self._attention(
            q_folded, x_keys[:, None], v_folded, scale=1.0, masked=masked, k_lengths=k_lengths,
            need_weights=need_weights, out_dtype=self.torch.float32,
        )
        out = self._zero_padded_rows(head_out.sum(dim=1).to(x_keys.dtype), q_lengths, axis=1)
        if probs is not None:
            probs = self._zero_padded_rows(probs, q_lengths, axis=2)
        return out, probs

    def scaled_dot_product_attention(self, q, k, v, *, scale, masked, q_lengths, k_lengths, need_weights):
        out, probs = self._attention(
            q[:, None], k[:, None], v[:, None], scale=scale, masked=masked, k_lengths=k_lengths, need_weights=need_weights
        )
        out = self._zero_padded_rows(out[:, 0], q_lengths, axis=1)
        if probs is not None:
            probs = self._zero_padded_rows(probs[:, 0], q_lengths, axis=1)
        return out, probs

    def multi_head_attention(self, xq, xk, xv, weights, *, masked, q_lengths, k_lengths, need_weights):
        (q,) = self._project(xq, weights, "q")
        (v,) = self._project(xv, weights, "v")
        return self._attend(q, xk, v, masked, q_lengths, k_lengths, need_weights)

    def _cosine_similarity(self, a, b):
        """(B, La, D) x (B, Lb, D) -> (B, La, Lb) in float32; a zero row gives 0, never NaN."""
        torch = self.torch

        def unit_rows(x):
            x = x.float()
            norm = x.norm(dim=-1, keepdim=True)
            return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(torch.float32).tiny), 0.0)

        return torch.matmul(unit_rows(a), unit_rows(b).transpose(-1, -2))

    def fuse(self, xs, xt, weights, *, masked, s_lengths, t_lengths, need_weights, need_similarity):
        qs, vs = self._project(xs, weights, "qv")
        qt, vt = self._project(xt, weights, "qv")
        fused_s, probs_st = self._attend(qs, xt, vt, masked, s_lengths, t_lengths, need_weights)
        masked_ts = None if masked is None else masked.transpose(-1, -2)
        fused_t, probs_ts = self._attend(qt, xs, vs, masked_ts, t_lengths, s_lengths, need_weights)
        result = {
            "fused_sequential": fused_s,
            "fused_structural": fused_t,
            "attention_weights_seq_to_struct": probs_st,
            "attention_weights_struct_to_seq": probs_ts,
        }
        if need_similarity:
            xs = self._zero_padded_rows(xs, s_lengths, axis=1)
            xt = self._zero_padded_rows(xt, t_lengths, axis=1)
            result["seq_similarity"] = self._cosine_similarity(xs, fused_s)
            result["struct_similarity"] = self._cosine_similarity(xt, fused_t)
        return result
