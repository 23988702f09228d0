"""The largest magnitude of up to three arrays in one launch: the front end's check of a call's inputs.

The front end checks a call's inputs for NaN and Inf, and bounds overflow, from one number, their
largest |x| (``crossattn_gpu._checks.check_values``). torch reduces it as an infinity norm per array and
a maximum per pair: three launches for a fusion's two inputs, five for an attention's three (W2's
profile of 2026-11-30 on an H200: 81 us of host time under the profiler for those three). Here one
launch reduces them all. Each program takes BLOCK_R rows of one array (its leading axes flattened into
rows, any strides, 64-bit offsets) and writes their largest |x| into its own slot of a float32 buffer;
the caller takes the buffer's maximum (``torch.amax`` keeps NaN), on the host after one copy: a few
thousand values at W2's size.

NaN: a GPU's float max leaves NaN out, so the maximum is taken on the bits. |x| as a float32 with the
sign bit cleared orders as its int32 bit pattern does, and every NaN's pattern lies above Inf's, so the
integer maximum of those patterns is the largest |x|, or a NaN when the rows hold one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import cdiv

#: Elements one program reduces: 8192 (BLOCK_R rows x BLOCK_C columns a pass over its columns), so that
#: the host's copy of the per-program partials stays small (4096 for W2's two inputs).
TILE_ELEMENTS = 8192
#: Elements of one step (STEP_R x BLOCK_C), 16 a thread at 4 warps, and its most rows. Each row holds a
#: 64-bit pointer and its index arithmetic, and rows whose stride is no multiple of 16 bytes load element
#: by element: compiled as Triton's launch specialises them (tests/kernels/compile_triton_variants.py),
#: steps of 8192 spilled up to 13 KB of registers on sm_90 (D = 1: 8192 rows of one column; D = 5: 2.1 KB),
#: steps of 2048 at most 256 rows use at most 168 registers for any width.
STEP_ELEMENTS = 2048
MAX_STEP_R = 256
#: The widest column block; wider rows are reduced in steps of it.
MAX_BLOCK_C = 128
#: Arrays one launch takes, and the dtypes it reads (float64 values could pass float32's range: the
#: caller keeps torch's reduction for them).
MAX_ARRAYS = 3
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 4


@triton.jit
def _rows_magnitude(
    X, block, rows, size_1, size_2, cols,
    stride_0, stride_1, stride_2, stride_c,
    BLOCK_R: tl.constexpr,
    STEP_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The largest |x| of rows [block * BLOCK_R, +BLOCK_R) of X, its leading axes (size_0, size_1, size_2)
    flattened in C order into ``rows``, as int32 bits of a float32 (a NaN's above every number's), STEP_R
    rows at a time."""
    offs_c = tl.arange(0, BLOCK_C)
    top = tl.zeros((STEP_R, BLOCK_C), dtype=tl.int32)
    for first in range(0, BLOCK_R, STEP_R):
        r = block.to(tl.int64) * BLOCK_R + first + tl.arange(0, STEP_R)
        row_ok = r < rows
        i2 = r % size_2
        i1 = (r // size_2) % size_1
        i0 = r // size_2 // size_1
        row_ptrs = X + i0 * stride_0 + i1 * stride_1 + i2 * stride_2
        for start in range(0, cols, BLOCK_C):
            cols_ok = (start + offs_c) < cols
            x = tl.load(row_ptrs[:, None] + (start + offs_c)[None, :].to(tl.int64) * stride_c,
                        mask=row_ok[:, None] & cols_ok[None, :], other=0.0)
            bits = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |x|, NaN kept (16 bits widen exactly)
            top = tl.maximum(top, bits)
    return tl.max(tl.max(top, 1), 0)


@triton.jit
def _magnitude_fwd(
    X0, X1, X2, Partials,
    rows_0, size_01, size_02, cols_0, stride_00, stride_01, stride_02, stride_0c,
    rows_1, size_11, size_12, cols_1, stride_10, stride_11, stride_12, stride_1c,
    rows_2, size_21, size_22, cols_2, stride_20, stride_21, stride_22, stride_2c,
    blocks_0, blocks_01,  # programs of X0, and of X0 and X1 together; the rest are X2's
    BLOCK_R: tl.constexpr,
    STEP_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < blocks_0:
        top = _rows_magnitude(X0, pid, rows_0, size_01, size_02, cols_0, stride_00, stride_01, stride_02, stride_0c,
                              BLOCK_R, STEP_R, BLOCK_C)
    elif pid < blocks_01:
        top = _rows_magnitude(X1, pid - blocks_0, rows_1, size_11, size_12, cols_1, stride_10, stride_11, stride_12,
                              stride_1c, BLOCK_R, STEP_R, BLOCK_C)
    else:
        top = _rows_magnitude(X2, pid - blocks_01, rows_2, size_21, size_22, cols_2, stride_20, stride_21, stride_22,
                              stride_2c, BLOCK_R, STEP_R, BLOCK_C)
    tl.store(Partials + pid, top.to(tl.float32, bitcast=True))


def _refusal(arrays) -> Exception | None:
    """The error ``largest_magnitudes`` raises for these arrays, or None when it takes them."""
    if not 0 < len(arrays) <= MAX_ARRAYS:
        return TypeError(f"largest_magnitudes takes 1 to {MAX_ARRAYS} arrays; got {len(arrays)}")
    for index, x in enumerate(arrays):
        if not isinstance(x, torch.Tensor):
            return TypeError(f"array {index} must be a torch.Tensor; got {type(x).__name__}")
        if x.dtype not in DTYPES:
            return TypeError(f"array {index} must be float32, float16 or bfloat16; got {x.dtype}")
        if not 1 <= x.ndim <= MAX_RANK or x.numel() == 0:
            return ValueError(f"array {index} must have rank 1 to {MAX_RANK} and no empty axis; "
                              f"got shape {tuple(x.shape)}")
        if x.device != arrays[0].device:
            return ValueError(f"array {index} is on {x.device} but array 0 is on {arrays[0].device}")
    return None


def takes(arrays) -> bool:
    """Whether ``largest_magnitudes`` takes these arrays: 1 to ``MAX_ARRAYS`` torch tensors on one device,
    each of rank 1 to ``MAX_RANK``, not empty, in float32, float16 or bfloat16."""
    return _refusal(arrays) is None


def launch_config(cols: int) -> dict:
    """Blocks of whole rows up to MAX_BLOCK_C wide (the widest array's), TILE_ELEMENTS a block in steps of
    at most STEP_ELEMENTS and MAX_STEP_R rows, 4 warps."""
    block_c = min(MAX_BLOCK_C, 1 << (cols - 1).bit_length())  # not triton.next_power_of_2: 1.4 us a call
    step_r = min(STEP_ELEMENTS // block_c, MAX_STEP_R)  # divides BLOCK_R: both powers of two, and no larger
    return {"BLOCK_R": TILE_ELEMENTS // block_c, "STEP_R": step_r, "BLOCK_C": block_c, "num_warps": 4}


def _as_rows(x) -> tuple:
    """(rows, size_1, size_2, cols, stride_0, stride_1, stride_2, stride_c) of x seen as (size_0, size_1,
    size_2, cols), leading axes of 1 added up to rank 4."""
    shape, strides = (1,) * (MAX_RANK - x.ndim) + tuple(x.shape), (0,) * (MAX_RANK - x.ndim) + x.stride()
    return (shape[0] * shape[1] * shape[2], shape[1], shape[2], shape[3], *strides)


def largest_magnitudes(*arrays):
    """Per-block largest magnitudes of the arrays, in one launch: their maximum is the arrays' largest |x|.

    Args:
        arrays: 1 to 3 torch tensors on one device, each of rank 1 to 4 with no empty axis, in float32,
            float16 or bfloat16 (each its own), any strides.

    Returns:
        A float32 tensor (P,) on their device, P the programs launched (each array's rows in blocks of
        ``launch_config``'s BLOCK_R): ``amax()`` of it is the largest |x| over all the arrays, NaN when one
        holds NaN (else Inf when one holds Inf). torch's ``amax`` keeps NaN.

    Raises:
        TypeError for no arrays, more than 3, a non-tensor or another dtype; ValueError for a rank past
        1..4, an empty array, or arrays on different devices.
    """
    refusal = _refusal(arrays)
    if refusal is not None:
        raise refusal
    return unchecked_largest_magnitudes(arrays)


def unchecked_largest_magnitudes(arrays: tuple):
    """``largest_magnitudes`` of arrays that ``takes`` has taken, without checking them again."""
    cfg = launch_config(max(x.shape[-1] for x in arrays))
    views = [_as_rows(x) for x in arrays]
    blocks = [cdiv(view[0], cfg["BLOCK_R"]) for view in views]
    partials = torch.empty(sum(blocks), dtype=torch.float32, device=arrays[0].device)
    # Absent arrays repeat the first with its shape; no program reaches their branch (blocks_01 covers all).
    padded = list(arrays) + [arrays[0]] * (MAX_ARRAYS - len(arrays))
    padded_views = views + [views[0]] * (MAX_ARRAYS - len(views))
    _magnitude_fwd[(sum(blocks),)](
        *padded, partials, *padded_views[0], *padded_views[1], *padded_views[2],
        blocks[0], sum(blocks[:2]), **cfg,
    )
    return partials
