"""Every head's softmax over the keys, written with the keys ahead of the heads:
P[b, q, k, h] = softmax_k(scale * S[b, q, h, :])[k].

The middle step of attention as two cuBLAS GEMMs, for the fusion's wide heads over short sequences
(``crossattn_gpu.backends.triton_backend``): the first GEMM takes each example's queries of every head as
rows (q, h) against the shared raw keys, S (Lq x H, Lk) in float32; this kernel turns each row into
probabilities; the second GEMM multiplies P (Lq, Lk x H) by the values as rows (k, h), (Lk x H, Dv), and so
sums the heads inside its float32 accumulation. Writing P with the keys ahead of the heads is what lets
one GEMM take that sum: the values' rows (k, h) are how one projection GEMM lays them out.

One program per (example, query): its H rows of S are one contiguous block of H x Lk scores, and its
probabilities one contiguous block of Lk x H, so that both the load and the store are whole lines. The
whole block sits in registers (``MAX_ROW_BLOCK`` elements at most, in base 2 with the scale folded in);
the float32 scores are read once and the probabilities written once, in the values' dtype, as
FlashAttention casts them before its second product.

Ragged batches: keys at or past the example's key length get probability 0 (their scores are -inf),
and queries at or past its query length get a row of zeros, so that the second GEMM gives those
queries zero rows. The GEMMs still multiply the padding (unlike the attention kernels, which skip it),
so its rows must hold finite values: the backend zeroes padded input rows before the projections.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import contract
from .attention_common import checked_lengths

#: The most elements (heads x keys, each padded to a power of two) one program holds: 16 heads of 1024
#: keys, 64 float32 registers per thread at 8 warps.
MAX_ROW_BLOCK = 16 * 1024


@triton.jit
def _softmax_heads_fwd(
    Scores, Probs, KLen, QLen,
    stride_sb, stride_sq, stride_sh, stride_sk,
    stride_pb, stride_pq, stride_pk, stride_ph,
    len_q, num_heads, len_k,
    scale_log2,  # scale * log2(e): exp2 then gives exp(scale * s)
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_H: tl.constexpr,  # num_heads == BLOCK_H: no head mask
    EVEN_K: tl.constexpr,  # len_k == BLOCK_K: no key mask
    HAS_KLEN: tl.constexpr,
    HAS_QLEN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b, q); 64-bit: B x Lq x H x Lk may pass 2**31 elements
    b, q = row // len_q, row % len_q
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    s_ptrs = Scores + b * stride_sb + q * stride_sq + offs_h[:, None] * stride_sh + offs_k[None, :] * stride_sk
    p_ptrs = Probs + b * stride_pb + q * stride_pq + offs_h[:, None] * stride_ph + offs_k[None, :] * stride_pk
    if EVEN_H and EVEN_K:
        s = tl.load(s_ptrs).to(tl.float32) * scale_log2
    else:
        inside = (offs_h[:, None] < num_heads) & (offs_k[None, :] < len_k)
        s = tl.load(s_ptrs, mask=inside, other=float("-inf")).to(tl.float32) * scale_log2
        if not EVEN_H:  # padding heads: zeros, not -inf, so that their (unstored) rows hold no NaN
            s = tl.where(offs_h[:, None] < num_heads, s, 0.0)
    if HAS_KLEN:  # keys past the length: -inf, weight 0 (lengths are >= 1: the maximum stays finite)
        s = tl.where(offs_k[None, :] < tl.load(KLen + b).to(tl.int32), s, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    if HAS_QLEN:  # a query past the length: a row of zeros (whatever its scores held)
        p = tl.where(q < tl.load(QLen + b), p, 0.0)
    if EVEN_H and EVEN_K:
        tl.store(p_ptrs, p.to(Probs.dtype.element_ty))
    else:
        tl.store(p_ptrs, p.to(Probs.dtype.element_ty), mask=inside)


def launch_config(num_heads: int, len_k: int) -> dict:
    """The block covers all heads and keys of one query (powers of two). Warps grow with it, 32 elements
    a thread up to 8 warps (W3's 8 heads x 256 keys: 2 warps; ``MAX_ROW_BLOCK``: 8 warps, 64 a thread)."""
    block_h, block_k = triton.next_power_of_2(num_heads), triton.next_power_of_2(len_k)
    elements = block_h * block_k
    return {"BLOCK_H": block_h, "BLOCK_K": block_k, "num_warps": max(1, min(8, elements // 1024))}


def fits(num_heads: int, len_k: int) -> bool:
    """Whether one program can hold a query's heads x keys block (``MAX_ROW_BLOCK``)."""
    return triton.next_power_of_2(num_heads) * triton.next_power_of_2(len_k) <= MAX_ROW_BLOCK


def softmax_heads(scores, *, scale: float = 1.0, out_dtype=None, k_lengths=None, q_lengths=None,
                  lengths_checked: bool = False):
    """Softmax over the keys of float32 scores, the heads moved behind the keys.

    Args:
        scores: (B, Lq, H, Lk) float32 torch tensor, any strides, with H x Lk (each padded to a power of
            two) at most ``MAX_ROW_BLOCK``.
        scale: multiplies the scores first.
        out_dtype: float32, float16 or bfloat16 (default float32).
        k_lengths: optional int (B,) in 1..Lk: keys at or past the length get probability 0.
        q_lengths: optional int (B,) in 1..Lq: queries at or past the length get rows of zeros.
        lengths_checked: the caller has checked the lengths' values (the library's front end does): no
            read from the device (``contract.check_lengths``).

    Returns:
        P (B, Lq, Lk, H) in ``out_dtype``, contiguous, with P[b, q, :, h] summing to 1 (0 for padded
        queries).

    Raises:
        TypeError for a non-tensor, non-float32 scores or another out_dtype; ValueError for another rank,
        an empty head or key axis, a block past ``MAX_ROW_BLOCK``, more than 2**31 - 1 programs, or
        lengths of another shape, dtype or range.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor; got {type(scores).__name__}")
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32; got {contract.dtype_name(scores)}")
    if scores.ndim != 4:
        raise ValueError(f"scores must be (B, Lq, H, Lk); got shape {tuple(scores.shape)}")
    out_dtype = out_dtype or torch.float32
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16; got {out_dtype}")
    batch, len_q, heads, len_k = scores.shape
    if heads == 0 or len_k == 0:
        raise ValueError(f"scores need at least one head and one key; got shape {tuple(scores.shape)}")
    if not fits(heads, len_k):
        raise ValueError(f"{heads} heads x {len_k} keys pass the {MAX_ROW_BLOCK} elements one program holds")
    if batch * len_q >= 2**31:
        raise ValueError(f"B x Lq = {batch * len_q} programs pass what a grid axis takes (2**31 - 1)")
    given = checked_lengths({"k_lengths": (k_lengths, len_k), "q_lengths": (q_lengths, len_q)}, batch,
                            scores.device, lengths_checked)
    probs = torch.empty((batch, len_q, len_k, heads), device=scores.device, dtype=out_dtype)
    if probs.numel() == 0:
        return probs
    cfg = launch_config(heads, len_k)
    # Absent lengths pass a valid pointer (the scores) that HAS_KLEN / HAS_QLEN = False never reads.
    _softmax_heads_fwd[(batch * len_q,)](
        scores, probs, given.get("k_lengths", scores), given.get("q_lengths", scores),
        *scores.stride(), *probs.stride(), len_q, heads, len_k, float(scale) * contract.LOG2E,
        BLOCK_H=cfg["BLOCK_H"], BLOCK_K=cfg["BLOCK_K"], EVEN_H=heads == cfg["BLOCK_H"],
        EVEN_K=len_k == cfg["BLOCK_K"], HAS_KLEN="k_lengths" in given, HAS_QLEN="q_lengths" in given,
        num_warps=cfg["num_warps"],
    )
    return probs
