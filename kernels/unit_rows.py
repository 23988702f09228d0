"""Unit rows for the cosine similarities: each row of x divided by its largest |x|, then by its norm, in
float32, in one launch.

The fusion's similarities (``seq_similarity``, ``struct_similarity``) are products of unit rows, the
rows of an input (its padded rows zero) against those of its fused output. torch built each of those four
sides' unit rows in twelve operators (a cast to float32, the largest |x|, a division, the squares and
their sum, a square root, a second division and the guards of zero rows), each a launch and most a pass
over a (B, L, D) float32 array: at W2's size in bfloat16 (B = 512, L = 256, D = 128) ~0.77 GB of traffic
a side, ~3.1 GB a fusion, ~0.7 ms at an H200's 4.2 TB/s (the whole fusion without them took 0.9 ms on
2026-11-30). Here one launch a side reads its rows once and writes them once in float32: ~0.1 GB a side.
Dividing by the largest |x| first keeps the squares from overflowing or underflowing (rows of 1e-30 and
1e20 in float32); a zero row stays zero.

Each program takes BLOCK_R whole rows (the rows of all examples in order, any strides, 64-bit offsets)
in three passes over its columns, BLOCK_C at a time: the first finds each row's largest |x|, the second
sums the squares, the third writes. The second and third read again what the first read, from cache:
the rows of one program are BLOCK_R x D elements, at most 2048 up to D = 512 and 5120 at D = 1280. Rows at or
past an example's length (``lengths``) are read as zeros, so they come out zero without a pass of their
own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import cdiv

#: Elements of one block (BLOCK_R x BLOCK_C), 16 a thread at 4 warps, and its most rows. Each row holds a
#: 64-bit pointer and its index arithmetic, and rows whose stride is no multiple of 16 bytes load element
#: by element: compiled as Triton's launch specialises them (tests/kernels/compile_triton_variants.py),
#: blocks of 4096 spilled 20 to 44 bytes of registers on sm_90 for D = 5, 17 and 33.
TILE_ELEMENTS = 2048
MAX_BLOCK_R = 256
#: The widest column block; wider rows take steps of it (D = 1280: three).
MAX_BLOCK_C = 512
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _unit_rows_fwd(
    X, Lengths, Units,
    rows, length, cols,
    stride_xb, stride_xl, stride_xc,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    example, position = r // length, r % length
    valid = row_ok
    if HAS_LENGTHS:  # rows past the length read as zeros (example is in range wherever row_ok holds)
        valid = valid & (position < tl.load(Lengths + example, mask=row_ok, other=0))
    x_rows = X + example * stride_xb + position * stride_xl
    unit_rows = Units + r * cols  # Units is contiguous (B, L, D) float32
    offs_c = tl.arange(0, BLOCK_C)

    top = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, cols, BLOCK_C):
        c = start + offs_c
        x = tl.load(x_rows[:, None] + c[None, :].to(tl.int64) * stride_xc,
                    mask=valid[:, None] & (c < cols)[None, :], other=0.0).to(tl.float32)
        top = tl.maximum(top, tl.max(tl.abs(x), 1))
    top = tl.where(top > 0, top, 1.0)  # a zero row stays zero

    squares = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, cols, BLOCK_C):
        c = start + offs_c
        x = tl.load(x_rows[:, None] + c[None, :].to(tl.int64) * stride_xc,
                    mask=valid[:, None] & (c < cols)[None, :], other=0.0).to(tl.float32)
        scaled = x / top[:, None]
        squares += tl.sum(scaled * scaled, 1)
    norm = tl.sqrt(squares)
    norm = tl.where(norm > 0, norm, 1.0)

    for start in range(0, cols, BLOCK_C):
        c = start + offs_c
        x = tl.load(x_rows[:, None] + c[None, :].to(tl.int64) * stride_xc,
                    mask=valid[:, None] & (c < cols)[None, :], other=0.0).to(tl.float32)
        tl.store(unit_rows[:, None] + c[None, :], (x / top[:, None]) / norm[:, None],
                 mask=row_ok[:, None] & (c < cols)[None, :])


def launch_config(cols: int) -> dict:
    """Blocks of whole rows, up to MAX_BLOCK_C columns a step, TILE_ELEMENTS a block and at most MAX_BLOCK_R
    rows, 4 warps."""
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(cols))
    return {"BLOCK_R": min(TILE_ELEMENTS // block_c, MAX_BLOCK_R), "BLOCK_C": block_c, "num_warps": 4}


def unit_rows(x, lengths=None):
    """x's rows divided by their largest magnitude and then by their norm, in float32: zero rows stay zero.

    Args:
        x: (B, L, D) torch tensor, float32, float16 or bfloat16, no empty axis, any strides.
        lengths: optional integer (B,) tensor on x's device with values in 1..L (checked by the caller,
            as the library's front end does): rows at or past ``lengths[b]`` come out as zeros.

    Returns:
        A contiguous float32 (B, L, D) tensor on x's device; ``unit_rows(a) @ unit_rows(b).transpose(1, 2)``
        is the cosine similarity of a's and b's rows, 0 where either row is zero.

    Raises:
        TypeError for a non-tensor, another dtype or non-integer lengths; ValueError for another rank, an
        empty axis, lengths of another shape, or arrays on different devices.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    if x.ndim != 3 or x.numel() == 0:
        raise ValueError(f"x must be (B, L, D) with no empty axis; got shape {tuple(x.shape)}")
    batch, length, cols = x.shape
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError("lengths must be an integer torch.Tensor")
        if tuple(lengths.shape) != (batch,) or lengths.device != x.device:
            raise ValueError(f"lengths must be ({batch},) on {x.device}; "
                             f"got {tuple(lengths.shape)} on {lengths.device}")
    out = torch.empty((batch, length, cols), dtype=torch.float32, device=x.device)
    cfg = launch_config(cols)
    rows = batch * length
    # Without lengths, x is a valid pointer that HAS_LENGTHS = False never reads.
    _unit_rows_fwd[(cdiv(rows, cfg["BLOCK_R"]),)](
        x, lengths if lengths is not None else x, out, rows, length, cols, *x.stride(),
        HAS_LENGTHS=lengths is not None, **cfg,
    )
    return out
