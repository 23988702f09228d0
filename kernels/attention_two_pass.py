"""Attention for wide heads over short sequences, in two passes: O = softmax(scale * Q K^T, masked) V.

The same contract as ``kernels/attention.py`` (SPEC section 3), which hands it the shapes where it is
the better plan (``preferred``): heads too wide for the fused kernel's one register chunk (16-bit
above 256, float32 above 64) and keys no more than the head width.

Why two passes
--------------
The fused kernel keeps one (BLOCK_M, Dv) output accumulator per query block. A 1280-wide head
(ESM-2 650M) does not fit in registers, so the fused kernel keeps it in a float32 scratch in global
memory and reloads, rescales and stores every chunk of it once per key block: 78 TFLOP/s on an H200
for W3 (B=64, H=8, L=256, D=1280; bench/results/2026-11-28-nvidia-h200-sweep-2.md), a tenth of the
bfloat16 GEMM ceiling. When the keys are fewer than the head width, the scores are the smaller
tensor, so this operator materialises them instead:

1. ``_attention_fwd_scores``, one program per (batch, head, query block): S = scale * Q K^T
   accumulated over Dk-chunks in float32 (tl.dot), masked, written to a float32 scratch, with the
   online row maximum and sum in base 2. Stores the row maximum m, 1 / (row sum) and the lse.
2. ``_attention_fwd_probs_values``, one program per (batch, query block, Dv chunk), Dv chunk fastest
   in the launch order so that the programs re-reading one block of scores run together (L2): for
   every head (SUM_HEADS) and key block, P = exp2(S - m) / sum, cast to the values' dtype as
   FlashAttention does, and acc += P @ V[:, chunk] in float32 registers. The output is written once,
   and the heads' sum (the fusion's output, SPEC section 4) is taken in those registers: neither the
   per-head outputs nor a rescaled accumulator ever reach memory.

The maximum and the reciprocal sum are kept apart (not folded into an lse) because a fully masked row
has m = -1e9 * log2(e), where float32 cannot hold m + log2(sum): exp2(S - m) = 1 there, and the row is
uniform, as the seed's mask requires.

Cost for W3 per direction: 2 x 86 GFLOP of tl.dot work in tile shapes a GEMM would use, plus the
scores, 134 MB of float32, written once and read once per Dv chunk. Memory: H x Lq x Lk x 4 bytes of
scratch per example, no more than the fused kernel's H x Lq x Dv x 4 accumulator when Lk <= Dv, which
``preferred`` requires, for at most ``SCRATCH_BYTES`` worth of examples at a time.

Ragged keys: both passes stop at the example's key length; scores past it in the last block are -inf
(zero weight), and nothing past the end of K or V is read. Ragged queries: output rows at or past the
example's query length are zeros, and a query block wholly past it computes no scores in either pass
(pass 2 then never reads the scratch rows pass 1 left unwritten). The scratch is padded to whole
blocks, so its loads and stores need no masks; pass 2 reads only the blocks pass 1 wrote.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import contract
from .attention_common import (
    block_at_least_16, block_offsets, cdiv, checked_mask_and_lengths, checked_shapes, chosen_config, chunked_scores,
    mask_strides, needs_wide_offsets, program_heads, scaled_masked, shared_memory_per_block,
)


@triton.jit
def _attention_fwd_scores(
    Q, K, Mask, KLen, QLen, Scores, RowMax, RowInvSum, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mm, stride_mn,
    stride_s_row,  # the scratch row: padded Lk
    num_heads, len_q, len_k, dim_k, rows_padded,
    qk_scale,  # scale * log2(e)
    mask_fill,  # the seed's -1e9 times log2(e)
    HAS_MASK: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    HAS_QLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_DK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    STORE_LSE: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
):
    # Axis 0 is batch x heads (up to 2**31 - 1; axis 1 stops at 65535, which B * H can pass).
    pid_bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * H * Lq * Lk can pass 2**31
    pid_m = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    offs_m = block_offsets(pid_m * BLOCK_M, BLOCK_M, WIDE_OFFSETS)  # 64-bit where needed (needs_wide_offsets)
    offs_n = block_offsets(0, BLOCK_N, WIDE_OFFSETS)
    row_ok = offs_m < len_q

    k_len = len_k
    if HAS_KLEN:  # clamped to len_k, so a bad length stays in bounds
        k_len = tl.minimum(tl.load(KLen + off_b).to(tl.int32), len_k)
    if HAS_QLEN:  # a query block wholly past the example's length computes no scores
        k_len = tl.where(pid_m * BLOCK_M < tl.minimum(tl.load(QLen + off_b).to(tl.int32), len_q), k_len, 0)

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    s_base = Scores + pid_bh * rows_padded * stride_s_row
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        s = chunked_scores(q_base, k_base, offs_m, cols, row_ok, col_ok, dim_k,
                           stride_qm, stride_qd, stride_kn, stride_kd,
                           BLOCK_M, BLOCK_N, BLOCK_DK, EVEN_M, EVEN_N, EVEN_DK, INPUT_PRECISION, WIDE_OFFSETS)
        s = scaled_masked(s, qk_scale, Mask + off_b * stride_mb, offs_m, cols, row_ok, col_ok,
                          stride_mm, stride_mn, mask_fill, HAS_MASK, EVEN_N)
        # Every program's rows and this block's columns lie inside the padded scratch.
        tl.store(s_base + offs_m[:, None] * stride_s_row + cols[None, :], s)
        # Online maximum and sum; each key block holds a valid key (lengths >= 1), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new

    stat = pid_bh * rows_padded + offs_m  # padded rows too: pass 2 loads them without masks
    if HAS_QLEN:
        l_i = tl.where(l_i > 0, l_i, 1.0)  # 0 in a block that visited no keys
    tl.store(RowMax + stat, m_i)
    tl.store(RowInvSum + stat, 1.0 / l_i)
    if STORE_LSE:
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log units
        if EVEN_M:
            tl.store(Lse + pid_bh * len_q + offs_m, lse)
        else:
            tl.store(Lse + pid_bh * len_q + offs_m, lse, mask=row_ok)


@triton.jit
def _attention_fwd_probs_values(
    Scores, RowMax, RowInvSum, V, KLen, QLen, Out,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_s_row,
    num_heads, len_q, len_k, dim_v, rows_padded, blocks_m, blocks_dv,
    HAS_KLEN: tl.constexpr,
    HAS_QLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SUM_HEADS: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
):
    # One axis, Dv chunk fastest, then query block, then batch (x head): the programs that re-read one
    # block of scores are launched side by side.
    pid = tl.program_id(0)
    pid_dv = pid % blocks_dv
    pid_m = (pid // blocks_dv) % blocks_m
    pid_bh = (pid // (blocks_dv * blocks_m)).to(tl.int64)
    off_b, first_head, head_count = program_heads(pid_bh, num_heads, SUM_HEADS)

    offs_m = block_offsets(pid_m * BLOCK_M, BLOCK_M, WIDE_OFFSETS)
    offs_n = block_offsets(0, BLOCK_N, WIDE_OFFSETS)
    offs_dv = block_offsets(pid_dv * BLOCK_DV, BLOCK_DV, WIDE_OFFSETS)
    row_ok = offs_m < len_q
    dv_ok = offs_dv < dim_v

    k_len = len_k
    if HAS_KLEN:
        k_len = tl.minimum(tl.load(KLen + off_b).to(tl.int32), len_k)
    if HAS_QLEN:  # rows at or past the example's query length are zeros; a block wholly past it skips its keys
        q_len = tl.minimum(tl.load(QLen + off_b).to(tl.int32), len_q)
        k_len = tl.where(pid_m * BLOCK_M < q_len, k_len, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for head in range(first_head, first_head + head_count):
        off_h = tl.cast(head, tl.int64)
        row = off_b * num_heads + off_h
        row_max = tl.load(RowMax + row * rows_padded + offs_m)
        inv_sum = tl.load(RowInvSum + row * rows_padded + offs_m)
        s_base = Scores + row * rows_padded * stride_s_row
        v_base = V + off_b * stride_vb + off_h * stride_vh
        for start_n in range(0, k_len, BLOCK_N):
            cols = start_n + offs_n
            s = tl.load(s_base + offs_m[:, None] * stride_s_row + cols[None, :])
            # Keys past the length hold -inf from pass 1: exp2 gives them exactly zero weight.
            p = tl.exp2(s - row_max[:, None]) * inv_sum[:, None]
            v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd
            if EVEN_N and EVEN_DV:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=(cols[:, None] < k_len) & dv_ok[None, :], other=0.0)
            acc += tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)

    o_base = Out + off_b * stride_ob + first_head * stride_oh
    o_ptrs = o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    if HAS_QLEN:
        acc = tl.where((offs_m < q_len)[:, None], acc, 0.0)
    o = acc.to(Out.dtype.element_ty)
    if EVEN_M and EVEN_DV:
        tl.store(o_ptrs, o)
    else:
        tl.store(o_ptrs, o, mask=row_ok[:, None] & dv_ok[None, :])


#: Bytes of score scratch at most: the batch is processed in chunks below it (W3: 64 examples x 2 MiB,
#: one chunk).
SCRATCH_BYTES = 256 << 20

#: The widest head the fused kernel holds in one register chunk, by bytes per element.
FUSED_ONE_CHUNK = {2: 256, 4: 64}


def preferred(len_q: int, len_k: int, dim_k: int, dim_v: int, itemsize: int) -> bool:
    """True where this operator replaces the fused kernel: heads too wide for the fused kernel's one
    register chunk, and keys no more than the value width, so that its score scratch (Lq x Lk) is no
    bigger than the fused kernel's accumulator scratch (Lq x Dv).

    Measured on an H200 at W3 (B = 64, H = 8, L = 256, D = 1280, heads summed, one direction): bfloat16
    0.75 ms against 2.16 for the fused kernel, float32 8.6 against 10.2 (bench/NOTES.md); the fusions
    of these shapes without mask, key lengths or probabilities go to cuBLAS GEMMs instead
    (``crossattn_gpu.backends.triton_backend``). ``bench/sweep_triton.py`` times both kernels on the
    same calls.
    """
    widest = max(dim_k, dim_v)
    return widest > FUSED_ONE_CHUNK[min(itemsize, 4)] and len_k <= dim_v


#: Shared memory that pass 2 needs in float32 tf32x3 with two stages (W3's tiles, compiled as launched with
#: mask and lengths): 64 KiB on sm_80 with triton 3.6, but 128 KiB with triton 3.8 (the triton torch 2.14
#: pins; sm_90: 128 and 160 KiB). A100's 163 KiB and H100's 227 KiB hold it; GPUs with less (99 KiB per
#: block on sm_86, sm_89 and sm_120: A10, L4, L40S, RTX 30x0 to 50x0) take one stage: 64 KiB with either.
TF32X3_TWO_STAGES_SHARED_MEMORY = 163 * 1024


def launch_config(len_q: int, len_k: int, dim_k: int, dim_v: int, itemsize: int, precision: str = "ieee",
                  shared_memory: int | None = None) -> dict:
    """Blocks, warps and stages for both passes (they share BLOCK_M and BLOCK_N, which pad the scratch), on
    a GPU whose blocks may take ``shared_memory`` bytes of shared memory (None: an A100's or more).

    Timed on an H200 on W3's attention (B = 64, H = 8, L = 256, D = 1280, heads summed; two sweeps of
    2026-11-29): 128 x 64 blocks with Dv chunks of 128 at 8 warps were the fastest of the tiles tried,
    though pass 2 then spills registers in float32 (sm_90, compiled as launched: up to 116 bytes with
    mask and lengths; 16-bit none). 16-bit, Dk chunks of 64, 3 stages: 0.75 ms (2 stages 1.01; 128 x 32 blocks,
    which spill nothing, 1.48). float32, Dk chunks of 32, 2 stages: IEEE 8.6 ms, tf32x3 4.6 (64 x 32
    blocks with Dv chunks of 64, which spill nothing: 15.3 and 9.9). On GPUs with less than
    ``TF32X3_TWO_STAGES_SHARED_MEMORY``, tf32x3 takes one stage (not timed). tl.dot needs every block
    dimension >= 16.
    """
    contract.check_precision(precision)
    half = itemsize <= 2
    block_m, block_n, block_dk, block_dv = (128, 64, 64, 128) if half else (128, 64, 32, 128)
    num_stages = 3 if half else 2
    small_shared_memory = shared_memory is not None and shared_memory < TF32X3_TWO_STAGES_SHARED_MEMORY
    if precision == "tf32x3" and not half and small_shared_memory:
        num_stages = 1
    return {
        "BLOCK_M": min(block_m, block_at_least_16(len_q)),
        "BLOCK_N": min(block_n, block_at_least_16(len_k)),
        "BLOCK_DK": min(block_dk, block_at_least_16(dim_k)),
        "BLOCK_DV": min(block_dv, block_at_least_16(dim_v)),
        "num_warps": 8,
        "num_stages": num_stages,
        "INPUT_PRECISION": "ieee" if half else precision,
    }


def scores_pass(q, k, masked, k_lengths, q_lengths, rows_b: slice, scores, row_max, row_inv_sum, lse, scale: float,
                cfg: dict, wide: bool) -> None:
    """Launch pass 1 on the examples ``rows_b`` of checked q (B, H, Lq, Dk) and k (B, Hk, Lk, Dk), mask
    and lengths (``checked_mask_and_lengths``): their scaled, masked scores in base 2 into ``scores``
    (examples x H x rows x cols, float32, padded to whole blocks of ``cfg``), each row's maximum and
    1 / sum into ``row_max`` and ``row_inv_sum`` (examples x H x rows), and the lse into ``lse[rows_b]``
    unless it is None. Keys past a length score -inf in the last block they reach; later blocks, and the
    query blocks wholly past a query length, are not written. Also the first pass of
    ``kernels/probabilities.py``."""
    heads, len_q, dim_k = q.shape[1:]
    len_k = k.shape[2]
    block_m, block_n, block_dk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_DK"]
    rows, cols = scores.shape[2:]
    # Absent mask and lengths pass a valid pointer (q) that HAS_MASK / HAS_KLEN / HAS_QLEN = False never reads.
    mask_arg = q if masked is None else (masked if masked.shape[0] == 1 else masked[rows_b])
    _attention_fwd_scores[((rows_b.stop - rows_b.start) * heads, rows // block_m)](
        q[rows_b], k[rows_b], mask_arg, q if k_lengths is None else k_lengths[rows_b],
        q if q_lengths is None else q_lengths[rows_b], scores, row_max, row_inv_sum,
        row_max if lse is None else lse[rows_b],  # a valid pointer that STORE_LSE=False never writes
        *q.stride(),
        k.stride(0), 0 if k.shape[1] == 1 else k.stride(1), k.stride(2), k.stride(3),
        *mask_strides(masked),
        cols,
        heads, len_q, len_k, dim_k, rows,
        float(scale) * contract.LOG2E,
        contract.MASK_FILL * contract.LOG2E,
        HAS_MASK=masked is not None, HAS_KLEN=k_lengths is not None, HAS_QLEN=q_lengths is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=block_dk,
        EVEN_M=len_q % block_m == 0, EVEN_N=len_k % block_n == 0 and k_lengths is None,
        EVEN_DK=dim_k % block_dk == 0, INPUT_PRECISION=cfg["INPUT_PRECISION"], STORE_LSE=lse is not None,
        WIDE_OFFSETS=wide, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def attention_two_pass(q, k, v, *, scale: float, masked=None, k_lengths=None, q_lengths=None, out_dtype=None,
                       sum_heads: bool = False, precision: str = "ieee", config: dict | None = None,
                       lengths_checked: bool = False, need_lse: bool = True):
    """Attention forward in two passes (scores materialised in float32), for wide heads.

    Args:
        q: (B, H, Lq, Dk); k: (B, Hk, Lk, Dk); v: (B, Hv, Lk, Dv); Hk, Hv in {1, H}. One dtype among
            float32, float16, bfloat16; one device; any strides.
        scale: multiplies the scores.
        masked: optional bool or uint8 (Bm, Lq, Lk) with Bm in {1, B}: nonzero where the seed's mask is
            0 (the score becomes -1e9).
        k_lengths: optional int (B,) with values in 1..Lk: keys at or past the length get zero weight.
        q_lengths: optional int (B,) with values in 1..Lq: output rows at or past the length are zeros,
            and query blocks wholly past it compute no scores (the lse of those rows is undefined).
        out_dtype: dtype of O (default: q's dtype).
        sum_heads: return the sum of the heads' outputs, (B, Lq, Dv), taken in float32 registers.
        precision: how float32 dots run (``"ieee"``, ``"tf32x3"`` or ``"tf32"``; see ``attention.attention``).
        config: a launch configuration with the keys of ``launch_config``'s result, used instead of it
            (its INPUT_PRECISION replaces ``precision``).
        lengths_checked: the caller has checked that k_lengths lie in 1..Lk and q_lengths in 1..Lq: no read
            from the device.
        need_lse: compute and return the lse; without it the second result is None.

    Returns:
        O (B, H, Lq, Dv), or (B, Lq, Dv) with ``sum_heads``, and lse (B, H, Lq) float32 (or None).

    Raises:
        TypeError / ValueError on inputs that break the contract, or when one example would need more
        than 2**31 - 1 programs.

    Takes H x Lq x Lk x 4 bytes of scratch per example for the scores (rounded up to whole blocks),
    for at most ``SCRATCH_BYTES`` worth of examples at a time (more examples: more launches).
    """
    dims = batch, heads, len_q, len_k, dim_k, dim_v = checked_shapes(q, k, v)
    masked, k_lengths, q_lengths = checked_mask_and_lengths(q, masked, k_lengths, q_lengths, dims, lengths_checked)
    cfg = chosen_config(launch_config(len_q, len_k, dim_k, dim_v, q.element_size(), precision,
                                      shared_memory_per_block(q)), config)
    block_m, block_n, block_dv = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_DV"]
    contract.check_query_blocks(len_q, block_m)  # pass 1's grid
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    blocks_m, blocks_dv = cdiv(len_q, block_m), cdiv(dim_v, block_dv)
    rows, cols = blocks_m * block_m, cdiv(len_k, block_n) * block_n
    # The scratch serves a chunk of the batch at a time, so that its memory stays bounded for any B.
    step = max(1, min(batch, SCRATCH_BYTES // (heads * rows * cols * 4)))
    scores = torch.empty((step, heads, rows, cols), device=q.device, dtype=torch.float32)
    row_max = torch.empty((step, heads, rows), device=q.device, dtype=torch.float32)
    row_inv_sum = torch.empty_like(row_max)
    lse = torch.empty((batch, heads, len_q), device=q.device, dtype=torch.float32) if need_lse else None
    dtype = out_dtype or q.dtype
    if sum_heads:
        out = torch.empty((batch, len_q, dim_v), device=q.device, dtype=dtype)
        out_strides = (out.stride(0), 0, out.stride(1), out.stride(2))
    else:
        out = torch.empty((batch, heads, len_q, dim_v), device=q.device, dtype=dtype)
        out_strides = out.stride()
    even_n = len_k % block_n == 0 and k_lengths is None
    wide = needs_wide_offsets(q, k, v, masked, scores, out)
    programs_per_example = blocks_dv * blocks_m * (1 if sum_heads else heads)
    if programs_per_example * step >= 2**31:
        raise ValueError(f"this call needs {programs_per_example * step} programs per launch, more than a grid "
                         "axis takes (2**31 - 1)")

    for first in range(0, batch, step):
        rows_b = slice(first, min(batch, first + step))
        count = rows_b.stop - first
        scores_pass(q, k, masked, k_lengths, q_lengths, rows_b, scores, row_max, row_inv_sum, lse, scale, cfg, wide)
        # Absent lengths pass a valid pointer (q) that HAS_KLEN / HAS_QLEN = False never reads.
        lengths_arg = q if k_lengths is None else k_lengths[rows_b]
        q_lengths_arg = q if q_lengths is None else q_lengths[rows_b]
        _attention_fwd_probs_values[(programs_per_example * count,)](
            scores, row_max, row_inv_sum, v[rows_b], lengths_arg, q_lengths_arg, out[rows_b],
            v.stride(0), 0 if v.shape[1] == 1 else v.stride(1), v.stride(2), v.stride(3),
            *out_strides,
            cols,
            heads, len_q, len_k, dim_v, rows, blocks_m, blocks_dv,
            HAS_KLEN=k_lengths is not None, HAS_QLEN=q_lengths is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DV=block_dv,
            EVEN_M=len_q % block_m == 0, EVEN_N=even_n, EVEN_DV=dim_v % block_dv == 0,
            INPUT_PRECISION=cfg["INPUT_PRECISION"], SUM_HEADS=sum_heads, WIDE_OFFSETS=wide, **launch,
        )
    return out, lse
