"""Launcher of ``attention_cuda.cu`` through ``cupy.RawModule``: the CuPy backend's attention.

Same contract as ``kernels/attention.py`` (SPEC section 3) on CuPy arrays. The module is compiled
once per process by NVRTC (and kept in CuPy's on-disk kernel cache); the launch configuration is
fixed by the kernel's tile sizes, so only the grid depends on the shape.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cupy
import numpy as np

from . import contract

MASK_FILL = contract.MASK_FILL
_LOG2E = contract.LOG2E
BLOCK_M, BLOCK_N, CHUNK_K, CHUNK_V, THREADS = 16, 64, 64, 128, 256  # as in attention_cuda.cu
# q, k and v tiles, scores, and three per-row vectors, in float32: 57 KiB, above the 48 KiB default.
SHARED_BYTES = 4 * (BLOCK_M * CHUNK_K + BLOCK_N * (CHUNK_K + 1) + BLOCK_N * CHUNK_V + BLOCK_M * BLOCK_N + 3 * BLOCK_M)

_SHAPE_FIELDS = (
    "heads len_q len_k dim_k dim_v q_b q_h q_m q_d k_b k_h k_n k_d v_b v_h v_n v_d m_b m_m m_n o_b o_h o_m o_d"
).split()
_SHAPE_DTYPE = np.dtype([(name, np.int64) for name in _SHAPE_FIELDS])  # struct Shape: 24 long longs


@lru_cache(maxsize=None)
def _kernel(name: str):
    source = (Path(__file__).with_name("attention_cuda.cu")).read_text()
    module = cupy.RawModule(code=source, options=("--std=c++17",))
    kernel = module.get_function(name)
    kernel.max_dynamic_shared_size_bytes = SHARED_BYTES
    return kernel


def _elements(strides, itemsize):
    return [s // itemsize for s in strides]


def attention(q, k, v, *, scale: float, masked=None, k_lengths=None, out_dtype=None, sum_heads: bool = False,
              lengths_checked: bool = False, need_lse: bool = True):
    """Fused attention forward on CuPy arrays.

    Args:
        q: (B, H, Lq, Dk); k: (B, Hk, Lk, Dk); v: (B, Hv, Lk, Dv); Hk, Hv in {1, H}; one dtype among
            float32, float16, bfloat16; any strides.
        scale: multiplies the scores.
        masked: optional bool/uint8 (Bm, Lq, Lk), Bm in {1, B}: nonzero where the seed's mask is 0.
        k_lengths: optional int (B,) in 1..Lk: keys at or past the length get zero weight.
        out_dtype: q's dtype (default) or float32.
        sum_heads: return the sum of the heads' outputs, (B, Lq, Dv), taken in float32 (the heads are
            written in float32 and summed after the kernel).
        lengths_checked: the caller has checked that k_lengths lie in 1..Lk: no read from the device.
        need_lse: return the lse; without it the second result is None (this kernel writes it anyway:
            4 bytes a row, beside its B x H x Lq x Dv float32 scratch).

    Returns:
        O (B, H, Lq, Dv), or (B, Lq, Dv) with ``sum_heads``, and lse (B, H, Lq) float32 (or None).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, cupy.ndarray):
            raise TypeError(f"{name} must be a cupy.ndarray; got {type(t).__name__}")
    batch, heads, len_q, len_k, dim_k, dim_v = contract.check_qkv(q, k, v)
    contract.check_query_blocks(len_q, BLOCK_M)
    out_dtype = np.dtype(out_dtype or q.dtype)
    if out_dtype not in (q.dtype, np.dtype(np.float32)):
        raise TypeError(f"out_dtype must be q's dtype or float32; got {out_dtype}")
    final_dtype, out_dtype = out_dtype, (np.dtype(np.float32) if sum_heads else out_dtype)
    mask_strides = (0, 0, 0)
    if masked is not None:
        contract.check_masked(masked, batch, len_q, len_k)
        masked = cupy.ascontiguousarray(masked.astype(cupy.uint8, copy=False))
        mask_strides = (0 if masked.shape[0] == 1 else masked.strides[0], masked.strides[1], masked.strides[2])
    if k_lengths is not None:
        contract.check_lengths(k_lengths, batch, len_k, lengths_checked)
        k_lengths = k_lengths.astype(cupy.int64, copy=False)

    out = cupy.empty((batch, heads, len_q, dim_v), dtype=out_dtype)
    lse = cupy.empty((batch, heads, len_q), dtype=cupy.float32)
    scratch = cupy.empty((batch * heads, len_q, dim_v), dtype=cupy.float32)
    size = q.itemsize

    def head_strides(t):
        st = _elements(t.strides, t.itemsize)
        return [st[0], 0 if t.shape[1] == 1 else st[1], st[2], st[3]]

    shape = np.array(
        tuple([heads, len_q, len_k, dim_k, dim_v] + _elements(q.strides, size) + head_strides(k) + head_strides(v)
              + list(mask_strides) + _elements(out.strides, out.itemsize)),
        dtype=_SHAPE_DTYPE,
    )
    name = f"attention_fwd_{q.dtype.name}" + ("_out_float32" if out_dtype != q.dtype else "")
    grid = (batch * heads, (len_q + BLOCK_M - 1) // BLOCK_M)
    _kernel(name)(
        grid, (THREADS,),
        # Absent mask and lengths pass a valid pointer (lse) that the flags keep the kernel from reading.
        (q, k, v, lse if masked is None else masked, lse if k_lengths is None else k_lengths, out, lse, scratch,
         shape[()], np.float32(scale * _LOG2E), np.float32(MASK_FILL * _LOG2E),
         np.int32(masked is not None), np.int32(k_lengths is not None)),
        shared_mem=SHARED_BYTES,
    )
    if sum_heads:
        out = out.sum(axis=1).astype(final_dtype, copy=False)
    return out, (lse if need_lse else None)
