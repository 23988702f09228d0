"""Float32 GEMM with TF32 tensor-core dots, for the projections of a ``tf32x3`` (or ``tf32``) call.

C = A @ B for float32 A (M, K) and B (K, N), any strides, float32 accumulation. ``tl.dot`` with
``input_precision="tf32x3"`` splits each operand into a TF32 value and a TF32 remainder and adds three
tensor-core products (the remainders' product is dropped): about float32's accuracy, where IEEE
float32 GEMMs run on CUDA cores (an H200 measured 50.8 TFLOP/s in float32 and 404 in TF32; three
products per product leave ~135).

Why not cuBLAS: it takes TF32 only through torch's process-wide switch
(``torch.backends.cuda.matmul``), which a library must not flip under its caller's other threads, and
which torch 2.9+ refuses to read once its legacy and new APIs are mixed. IEEE float32 and 16-bit
projections stay cuBLAS GEMMs (``crossattn_gpu.backends.triton_backend``).

Tiles: the classic grouped ordering (GROUP_M row blocks walk the same column blocks, so B's tiles are
reused from L2), with the tile shapes of ``launch_config`` (timed on an H200); EVEN_* flags drop the
bounds checks on full tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import contract
from .attention_common import block_at_least_16, cdiv, chosen_config


@triton.jit
def _matmul_fwd(
    A, B, C,
    rows, cols, depth,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_cm, stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(rows, BLOCK_M)
    blocks_n = tl.cdiv(cols, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    # 64-bit row offsets: rows x depth may pass 2**31 elements.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < rows
    col_ok = offs_n < cols
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start_k in range(0, depth, BLOCK_K):
        if EVEN_M and EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & (start_k + offs_k[None, :] < depth), other=0.0)
        if EVEN_N and EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=(start_k + offs_k[:, None] < depth) & col_ok[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if EVEN_M and EVEN_N:
        tl.store(c_ptrs, acc)
    else:
        tl.store(c_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


def launch_config(rows: int, cols: int, depth: int) -> dict:
    """Tiles for C (rows, cols) = A (rows, depth) @ B (depth, cols). tl.dot needs every block dimension
    >= 16; small matrices take the smallest power of two that covers them.

    128 x 64 x 32 tiles at 4 warps and 4 stages (no spill on sm_90) were the fastest of four timed in
    tf32x3 on an H200 (sweep of 2026-11-29, one direction's projections): W3 (16384 x 1280 by 1280 x
    20480) 15.2 ms against 23.8 for 128 x 128 x 32 at 8 warps, 3 stages; W2 0.76 against 1.11 ms.
    """
    return {
        "BLOCK_M": min(128, block_at_least_16(rows)),
        "BLOCK_N": min(64, block_at_least_16(cols)),
        "BLOCK_K": min(32, block_at_least_16(depth)),
        "GROUP_M": 8,
        "num_warps": 4,
        "num_stages": 4,
    }


def matmul(a, b, *, precision: str = "tf32x3", config: dict | None = None):
    """a @ b in float32 with ``precision`` dots (``"tf32x3"``, ``"tf32"`` or ``"ieee"``).

    Args:
        a: (M, K) float32 torch tensor; b: (K, N) float32 on the same device; any strides.
        precision: ``contract.FLOAT32_PRECISIONS``.
        config: a launch configuration with the keys of ``launch_config``'s result (for sweeps).

    Returns:
        (M, N) float32, contiguous.

    Raises:
        TypeError / ValueError naming the argument that is not a 2-D float32 tensor of fitting shape.
    """
    precision = contract.check_precision(precision)
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.ndim != 2 or 0 in t.shape:
            raise ValueError(f"{name} must be a non-empty 2-D tensor; got shape {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32; got {contract.dtype_name(t)}")
    if b.device != a.device:
        raise ValueError(f"b is on {b.device} but a is on {a.device}")
    (rows, depth), cols = a.shape, b.shape[1]
    if b.shape[0] != depth:
        raise ValueError(f"a (M, K) and b (K, N) must share K; got {tuple(a.shape)} and {tuple(b.shape)}")
    cfg = chosen_config(launch_config(rows, cols, depth), config)
    out = torch.empty((rows, cols), device=a.device, dtype=torch.float32)
    grid = (cdiv(rows, cfg["BLOCK_M"]) * cdiv(cols, cfg["BLOCK_N"]),)
    _matmul_fwd[grid](
        a, b, out, rows, cols, depth, *a.stride(), *b.stride(), *out.stride(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        EVEN_M=rows % cfg["BLOCK_M"] == 0, EVEN_N=cols % cfg["BLOCK_N"] == 0, EVEN_K=depth % cfg["BLOCK_K"] == 0,
        INPUT_PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
