"""Attention probabilities P = softmax(scale * Q K^T, masked), written once in the caller's dtype.

The attention kernels never hold a whole row of probabilities, so a call that asks for them (the seed's
2-D calls do, batched ones with ``need_weights``) rebuilt them afterwards with torch: float32 copies of
Q and K, their product, a scale, the mask and padding fills, ``exp(S - lse)``, a row sum, a division
(which mends fully masked rows, whose lse float32 cannot hold) and a cast, most of them passes over the
(B, H, Lq, Lk) float32 scores: at W2's size in bfloat16 (B = 512, H = 4, L = 256) 0.54 GB a pass, ~7 GB
of traffic a direction (~9 with a mask and lengths), ~1.7 ms at an H200's 4.2 TB/s, about twice the
whole fusion without them (0.9 ms).

Here the two-pass operator's first pass (``attention_two_pass.scores_pass``) writes the scores in
float32 with each row's maximum m and 1 / sum, and ``_probabilities_fwd`` turns them into
exp2(S - m) / sum in the output dtype: the scores written once and read once, the probabilities written
once (~1.4 GB a direction at W2's size, with Q and K read). The maximum and the sum kept apart (not an lse) make a fully
masked row exactly uniform, as the seed's mask requires. Keys at or past a length get exactly 0, and
so do rows at or past a query length (pass 1 leaves the blocks past the lengths unwritten; they are
never read here as values, only masked out).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import attention_two_pass as two_pass
from . import contract
from .attention_common import cdiv, checked_mask_and_lengths, checked_shapes, needs_wide_offsets


@triton.jit
def _probabilities_fwd(
    Scores, RowMax, RowInvSum, KLen, QLen, Probs,
    stride_s_row,  # the scratch row: padded Lk
    stride_pb, stride_ph, stride_pm, stride_pn,
    num_heads, len_q, len_k, rows_padded, blocks_n,
    HAS_KLEN: tl.constexpr,
    HAS_QLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Axis 0: (example x head of this chunk) x key block, key blocks fastest; axis 1 (at most 65535, as
    # pass 1's): query blocks. 64-bit offsets throughout.
    pid = tl.program_id(0).to(tl.int64)
    pid_bh = pid // blocks_n
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_len = len_k
    if HAS_KLEN:
        k_len = tl.minimum(tl.load(KLen + off_b).to(tl.int32), len_k)
    q_len = len_q
    if HAS_QLEN:
        q_len = tl.minimum(tl.load(QLen + off_b).to(tl.int32), len_q)
    # Only what pass 1 wrote is read (it skips the blocks past the lengths, which hold anything): a score
    # outside the lengths loads as -inf and a row's 1 / sum as 0, so their probability is exactly 0.
    row_ok = offs_m < q_len
    stat = pid_bh * rows_padded + offs_m
    row_max = tl.load(RowMax + stat, mask=row_ok, other=0.0)
    inv_sum = tl.load(RowInvSum + stat, mask=row_ok, other=0.0)
    s = tl.load(Scores + pid_bh * rows_padded * stride_s_row + offs_m[:, None] * stride_s_row + offs_n[None, :],
                mask=row_ok[:, None] & (offs_n < k_len)[None, :], other=float("-inf"))
    p = tl.exp2(s - row_max[:, None]) * inv_sum[:, None]
    p_ptrs = Probs + off_b * stride_pb + off_h * stride_ph + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn
    tl.store(p_ptrs, p.to(Probs.dtype.element_ty), mask=(offs_m < len_q)[:, None] & (offs_n < len_k)[None, :])


def probabilities(q, k, *, scale: float, masked=None, k_lengths=None, q_lengths=None, out_dtype=None,
                  precision: str = "ieee", lengths_checked: bool = False):
    """The attention probabilities of q against k, as ``attention`` would weigh the values.

    Args:
        q: (B, H, Lq, Dk); k: (B, Hk, Lk, Dk), Hk in {1, H}. One dtype among float32, float16, bfloat16;
            one device; any strides.
        scale: multiplies the scores.
        masked: optional bool or uint8 (Bm, Lq, Lk) with Bm in {1, B}: nonzero where the seed's mask is
            0 (the score becomes -1e9; a fully masked row is uniform).
        k_lengths: optional int (B,) with values in 1..Lk: keys at or past the length get probability 0.
        q_lengths: optional int (B,) with values in 1..Lq: rows at or past the length are zeros.
        out_dtype: dtype of the probabilities (default: q's dtype).
        precision: how float32 dots run (``"ieee"``, ``"tf32x3"`` or ``"tf32"``; see ``attention.attention``).
        lengths_checked: the caller has checked the lengths' values: no read from the device.

    Returns:
        P (B, H, Lq, Lk) in ``out_dtype``, contiguous.

    Raises:
        TypeError / ValueError on inputs that break the contract above.

    Takes the two-pass operator's launch configuration and its bounded score scratch (H x Lq x Lk x 4
    bytes an example, for at most ``attention_two_pass.SCRATCH_BYTES`` of examples a launch).
    """
    dims = batch, heads, len_q, len_k, dim_k, _ = checked_shapes(q, k, k)
    masked, k_lengths, q_lengths = checked_mask_and_lengths(q, masked, k_lengths, q_lengths, dims, lengths_checked)
    cfg = two_pass.launch_config(len_q, len_k, dim_k, dim_k, q.element_size(), precision)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    contract.check_query_blocks(len_q, block_m)
    blocks_m, blocks_n = cdiv(len_q, block_m), cdiv(len_k, block_n)
    rows, cols = blocks_m * block_m, blocks_n * block_n
    step = max(1, min(batch, two_pass.SCRATCH_BYTES // (heads * rows * cols * 4)))
    scores = torch.empty((step, heads, rows, cols), device=q.device, dtype=torch.float32)
    row_max = torch.empty((step, heads, rows), device=q.device, dtype=torch.float32)
    row_inv_sum = torch.empty_like(row_max)
    probs = torch.empty((batch, heads, len_q, len_k), device=q.device, dtype=out_dtype or q.dtype)
    wide = needs_wide_offsets(q, k, masked, scores)
    for first in range(0, batch, step):
        rows_b = slice(first, min(batch, first + step))
        two_pass.scores_pass(q, k, masked, k_lengths, q_lengths, rows_b, scores, row_max, row_inv_sum, None, scale,
                             cfg, wide)
        # Absent lengths pass a valid pointer (scores) that HAS_KLEN / HAS_QLEN = False never reads.
        _probabilities_fwd[((rows_b.stop - first) * heads * blocks_n, blocks_m)](
            scores, row_max, row_inv_sum, scores if k_lengths is None else k_lengths[rows_b],
            scores if q_lengths is None else q_lengths[rows_b], probs[rows_b],
            cols, *probs.stride(), heads, len_q, len_k, rows, blocks_n,
            HAS_KLEN=k_lengths is not None, HAS_QLEN=q_lengths is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=cfg["num_warps"],
        )
    return probs
