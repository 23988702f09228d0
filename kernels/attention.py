"""Fused attention forward for any head width: O = softmax(scale * Q K^T, masked) V, and the row lse.

The kernel contract is SPEC section 3; ``crossattn_gpu.backends.numpy_backend.attention`` is its
reference. Q is (B, H, Lq, Dk), K (B, Hk, Lk, Dk), V (B, Hv, Lk, Dv) with Hk and Hv each 1 or H (a
head stride of 0 broadcasts), any strides, float32 / float16 / bfloat16, float32 accumulation.

Design for any head width
-------------------------
The seed gives every head a full D x D projection, so the head width is D itself: 1280 for ESM-2
650M, 2560 for 3B. FlashAttention-style kernels keep a (BLOCK_M, D) query tile and a (BLOCK_M, D)
float32 accumulator in registers, which stops at D = 256. Here both are tiled over D:

* Scores. For each key block, S = sum over Dk-chunks of Q[:, chunk] @ K[:, chunk]^T, accumulated in
  float32 registers (BLOCK_M x BLOCK_N). When Dk fits one chunk (SINGLE_DK), the query tile is loaded
  once, before the key loop, as in FlashAttention.
* Softmax. One pass over the key blocks with an online softmax in base 2 (scale * log2(e) folded into
  one multiply): running row maximum m and sum l; the accumulator is rescaled by exp2(m_old - m_new).
* Output. When Dv fits one chunk (SINGLE_DV), the (BLOCK_M, BLOCK_DV) accumulator lives in registers.
  Otherwise it lives in a float32 scratch buffer in global memory (each program owns its rows): per key
  block and Dv-chunk, load the chunk, rescale it, add P @ V[:, chunk], store it back; at the end divide
  by l and write the output. The scratch rows of one program are BLOCK_M x Dv x 4 bytes (320 KiB for
  BLOCK_M = 64, D = 1280), so they stay in L2 between key blocks; the scores, the dominant cost, are
  computed once. A CTA barrier orders each chunk's store before the next key block's load of it (the
  two may use different thread layouts).

Ragged keys: the key loop stops at the example's length, and scores at or past it are -inf, so those
keys get exactly zero weight and nothing past the end of K or V is read. The seed's mask replaces a
score by -1e9 (a fully masked row is uniform). Every block of keys the loop visits holds at least one
valid key (lengths are >= 1), so the running maximum is finite after the first block: no inf - inf.

Boolean constexpr flags remove bounds checks on full tiles (EVEN_M, EVEN_N, EVEN_DK, EVEN_DV). Strides,
lengths and the scale are runtime arguments, so new shapes do not recompile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import contract

#: The seed's fill value for masked scores.
MASK_FILL = -1e9
_LOG2E = 1.4426950408889634


@triton.jit
def _attention_fwd(
    Q, K, V, Mask, KLen, Out, Lse, Acc,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_ab, stride_ah, stride_am, stride_ad,
    num_heads, len_q, len_k, dim_k, dim_v,
    qk_scale,  # scale * log2(e)
    mask_fill,  # MASK_FILL * log2(e): the seed's -1e9, in the base-2 units of the scores
    HAS_MASK: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SINGLE_DK: tl.constexpr,
    SINGLE_DV: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_DK: tl.constexpr,
    EVEN_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Batch x heads on grid axis 0 (up to 2**31 - 1): axis 1 stops at 65535, which B * H can pass.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    # 64-bit offsets: B * H * L * D can pass 2**31 elements.
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < len_q

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    acc_base = Acc + off_b * stride_ab + off_h * stride_ah

    # Keys at or past k_len are never read; clamping to len_k keeps a bad length in bounds.
    k_len = len_k
    if HAS_KLEN:
        k_len = tl.minimum(tl.load(KLen + off_b).to(tl.int32), len_k)

    if SINGLE_DK:
        q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_dk[None, :] * stride_qd
        if EVEN_M and EVEN_DK:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_dk[None, :] < dim_k), other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if SINGLE_DV:
        acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)

    for start_n in range(0, k_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len

        # --- scores, accumulated over Dk-chunks -----------------------------------------------
        if SINGLE_DK:
            k_ptrs = k_base + cols[None, :] * stride_kn + offs_dk[:, None] * stride_kd
            if EVEN_N and EVEN_DK:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=col_ok[None, :] & (offs_dk[:, None] < dim_k), other=0.0)
            s = tl.dot(q, k, input_precision=INPUT_PRECISION)
        else:
            s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for start_d in range(0, dim_k, BLOCK_DK):
                dks = start_d + offs_dk
                q_ptrs = q_base + offs_m[:, None] * stride_qm + dks[None, :] * stride_qd
                k_ptrs = k_base + cols[None, :] * stride_kn + dks[:, None] * stride_kd
                if EVEN_M and EVEN_N and EVEN_DK:
                    qc = tl.load(q_ptrs)
                    kc = tl.load(k_ptrs)
                else:
                    qc = tl.load(q_ptrs, mask=row_ok[:, None] & (dks[None, :] < dim_k), other=0.0)
                    kc = tl.load(k_ptrs, mask=col_ok[None, :] & (dks[:, None] < dim_k), other=0.0)
                s += tl.dot(qc, kc, input_precision=INPUT_PRECISION)
        s = s * qk_scale

        if HAS_MASK:
            m_ptrs = Mask + off_b * stride_mb + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn
            masked = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
            s = tl.where(masked != 0, mask_fill, s)
        if not EVEN_N:
            s = tl.where(col_ok[None, :], s, float("-inf"))

        # --- online softmax (base 2) ----------------------------------------------------------
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        # --- P @ V, over Dv-chunks --------------------------------------------------------------
        if SINGLE_DV:
            v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd
            if EVEN_N and EVEN_DV:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=col_ok[:, None] & (offs_dv[None, :] < dim_v), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        else:
            for start_d in range(0, dim_v, BLOCK_DV):
                dvs = start_d + offs_dv
                v_ptrs = v_base + cols[:, None] * stride_vn + dvs[None, :] * stride_vd
                a_ptrs = acc_base + offs_m[:, None] * stride_am + dvs[None, :] * stride_ad
                if EVEN_N and EVEN_DV:
                    v = tl.load(v_ptrs)
                else:
                    v = tl.load(v_ptrs, mask=col_ok[:, None] & (dvs[None, :] < dim_v), other=0.0)
                pv = tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
                if start_n == 0:
                    chunk = pv
                else:
                    chunk = tl.load(a_ptrs) * alpha[:, None] + pv
                # The scratch is padded to whole blocks, so its loads and stores need no mask.
                tl.store(a_ptrs, chunk)
            tl.debug_barrier()

    # --- normalise and write ----------------------------------------------------------------------
    out_base = Out + off_b * stride_ob + off_h * stride_oh
    inv_l = 1.0 / l_i
    if SINGLE_DV:
        o_ptrs = out_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
        o = (acc * inv_l[:, None]).to(Out.dtype.element_ty)
        if EVEN_M and EVEN_DV:
            tl.store(o_ptrs, o)
        else:
            tl.store(o_ptrs, o, mask=row_ok[:, None] & (offs_dv[None, :] < dim_v))
    else:
        for start_d in range(0, dim_v, BLOCK_DV):
            dvs = start_d + offs_dv
            a_ptrs = acc_base + offs_m[:, None] * stride_am + dvs[None, :] * stride_ad
            o = (tl.load(a_ptrs) * inv_l[:, None]).to(Out.dtype.element_ty)
            o_ptrs = out_base + offs_m[:, None] * stride_om + dvs[None, :] * stride_od
            tl.store(o_ptrs, o, mask=row_ok[:, None] & (dvs[None, :] < dim_v))

    # lse in natural-log units: (m + log2 l) * ln 2.
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    l_ptrs = Lse + pid_bh.to(tl.int64) * len_q + offs_m
    if EVEN_M:
        tl.store(l_ptrs, lse)
    else:
        tl.store(l_ptrs, lse, mask=row_ok)


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def launch_config(len_q: int, len_k: int, dim_k: int, dim_v: int, itemsize: int) -> dict:
    """Block sizes and warps for a shape. tl.dot needs every block dimension >= 16.

    Chunks of the head width are capped at 128 (64 for float32, whose tiles take twice the shared
    memory), so any D runs with the same register and shared-memory footprint.
    """
    d_cap = 128 if itemsize <= 2 else 64
    block_m = 64 if len_q > 32 else (32 if len_q > 16 else 16)
    block_n = 64 if len_k > 32 else (32 if len_k > 16 else 16)
    block_dk = min(_pow2_at_least_16(dim_k), d_cap)
    block_dv = min(_pow2_at_least_16(dim_v), d_cap)
    num_warps = 8 if block_m * max(block_dk, block_dv) >= 64 * 128 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_DK": block_dk, "BLOCK_DV": block_dv,
            "num_warps": num_warps, "num_stages": 2}


def attention(q, k, v, *, scale: float, masked=None, k_lengths=None, out_dtype=None, allow_tf32: bool = False):
    """Fused attention forward.

    Args:
        q: (B, H, Lq, Dk); k: (B, Hk, Lk, Dk); v: (B, Hv, Lk, Dv); Hk, Hv in {1, H}. One dtype among
            float32, float16, bfloat16; one device; any strides.
        scale: multiplies the scores.
        masked: optional bool or uint8 (Bm, Lq, Lk) with Bm in {1, B}: nonzero where the seed's mask is
            0 (the score becomes -1e9).
        k_lengths: optional int (B,) with values in 1..Lk: keys at or past the length get zero weight.
        out_dtype: dtype of O (default: q's dtype); float32 keeps the accumulator's precision.
        allow_tf32: float32 inputs may use TF32 tensor cores (faster, ~1e-3 relative error).

    Returns:
        O (B, H, Lq, Dv) and lse (B, H, Lq) float32, the natural-log log-sum-exp of each score row.

    Raises:
        TypeError / ValueError on inputs that break the contract above.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    batch, heads, len_q, len_k, dim_k, dim_v = contract.check_qkv(q, k, v)
    if masked is not None:
        contract.check_masked(masked, batch, len_q, len_k)
        masked = masked.to(device=q.device, dtype=torch.uint8)
    if k_lengths is not None:
        contract.check_lengths(k_lengths, batch, len_k)
        k_lengths = k_lengths.to(device=q.device, dtype=torch.int32)

    cfg = launch_config(len_q, len_k, dim_k, dim_v, q.element_size())
    block_m, block_dv = cfg["BLOCK_M"], cfg["BLOCK_DV"]
    single_dv = dim_v <= block_dv
    out = torch.empty((batch, heads, len_q, dim_v), device=q.device, dtype=out_dtype or q.dtype)
    lse = torch.empty((batch, heads, len_q), device=q.device, dtype=torch.float32)
    if single_dv:
        scratch = out  # unused: the accumulator stays in registers
    else:  # float32 accumulator, padded to whole blocks so the kernel needs no masks on it
        rows = triton.cdiv(len_q, block_m) * block_m
        cols = triton.cdiv(dim_v, block_dv) * block_dv
        scratch = torch.empty((batch, heads, rows, cols), device=q.device, dtype=torch.float32)
    mask_arg = masked if masked is not None else q  # a valid pointer that HAS_MASK=False never reads
    mask_strides = (
        (0 if masked.shape[0] == 1 else masked.stride(0), masked.stride(1), masked.stride(2))
        if masked is not None else (0, 0, 0)
    )

    grid = (batch * heads, triton.cdiv(len_q, block_m))
    _attention_fwd[grid](
        q, k, v, mask_arg, k_lengths if k_lengths is not None else q, out, lse, scratch,
        *q.stride(),
        k.stride(0), 0 if k.shape[1] == 1 else k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), 0 if v.shape[1] == 1 else v.stride(1), v.stride(2), v.stride(3),
        *mask_strides,
        *out.stride(),
        *scratch.stride(),
        heads, len_q, len_k, dim_k, dim_v,
        float(scale) * _LOG2E,
        MASK_FILL * _LOG2E,
        HAS_MASK=masked is not None,
        HAS_KLEN=k_lengths is not None,
        SINGLE_DK=dim_k <= cfg["BLOCK_DK"],
        SINGLE_DV=single_dv,
        EVEN_M=len_q % block_m == 0,
        EVEN_N=len_k % cfg["BLOCK_N"] == 0 and k_lengths is None,
        EVEN_DK=dim_k % cfg["BLOCK_DK"] == 0,
        EVEN_DV=dim_v % block_dv == 0,
        INPUT_PRECISION="tf32" if allow_tf32 and q.dtype == torch.float32 else "ieee",
        **cfg,
    )
    return out, lse
