"""Fused attention forward for any head width: O = softmax(scale * Q K^T, masked) V, and the row lse.

The kernel contract is SPEC section 3; ``crossattn_gpu.backends.numpy_backend.attention`` is its
reference. Q is (B, H, Lq, Dk), K (B, Hk, Lk, Dk), V (B, Hv, Lk, Dv) with Hk and Hv each 1 or H (a
head stride of 0 broadcasts), any strides, float32 / float16 / bfloat16, float32 accumulation.

Design for any head width
-------------------------
The seed gives every head a full D x D projection, so the head width is D itself: 1280 for ESM-2
650M, 2560 for 3B. FlashAttention-style kernels keep a (BLOCK_M, D) query tile and a (BLOCK_M, D)
float32 accumulator in registers, which stops at D = 256. Here 16-bit heads up to 256 wide take one
chunk in the same way, and wider heads (and float32 beyond 64) are tiled over D:

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

Head sum (SUM_HEADS): the fusion wants only the sum over heads of the outputs (SPEC section 4). When
Dv fits one chunk, each program takes one (batch, query block) and loops over the heads, adding each
head's normalised output to a float32 sum in registers, so the (B, H, Lq, Dv) per-head outputs never
reach memory (W2 bfloat16 on an H200, 128 x 32 blocks: 0.54 ms with the heads written and summed by
torch after, 0.38 ms summed here). The keys, shared by every head, are re-read from L2 per head.

Ragged keys: the key loop stops at the example's length, and scores at or past it are -inf, so those
keys get exactly zero weight and nothing past the end of K or V is read. The seed's mask replaces a
score by -1e9 (a fully masked row is uniform). Every block of keys the loop visits holds at least one
valid key (lengths are >= 1), so the running maximum is finite after the first block: no inf - inf.

Ragged queries (q_lengths): rows at or past the example's query length are written as zeros (the fusion
wants them so), and a query block wholly past it visits no keys: in a padded batch of antibodies of
different lengths, the padding's queries cost no attention. Such a block's sum l stays 0 and is replaced
by 1 before the division, so no NaN arises that the zeros would have to hide.

Wide heads over short sequences (Lk <= Dv) do not come here: the launcher hands them to
``attention_two_pass``, which writes the scores once instead of an accumulator per key block.

Boolean constexpr flags remove bounds checks on full tiles (EVEN_M, EVEN_N, EVEN_DK, EVEN_DV). Strides,
lengths and the scale are runtime arguments: a new shape compiles a new variant only when it changes a
block size (short sequences take smaller blocks) or an EVEN_* flag.

TMA loads (``_attention_fwd_tma``, sm_90 and newer): the whole-tile case (one Dk and one
Dv chunk, Lq and Lk multiples of the blocks, no mask, no lengths: W2's and W4's fusions) with the tiles
loaded by the Tensor Memory Accelerator from host-built descriptors, and optionally warp-specialised (a
producer warp group issues the loads, the others compute). Compiled as launched for sm_90 at W2 in
bfloat16 (64 x 64, 4 warps, 3 stages, heads summed) it takes 193 registers and spills nothing, where the
pointer kernel takes 255 and spills 48 bytes, in the same 112 KiB of shared memory. Not yet any launch's
default: a ``config`` with ``TMA`` (and ``WARP_SPECIALIZE``) asks for it, and bench/sweep_triton.py times
it, until an H200 has measured it against the pointer kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import contract
from .attention_common import (
    block_at_least_16, block_offsets, cdiv, checked_mask_and_lengths, checked_shapes, chosen_config, chunked_scores,
    mask_strides, needs_wide_offsets, program_heads, scaled_masked, shared_memory_per_block,
)
from .attention_two_pass import attention_two_pass, preferred as two_pass_preferred

MASK_FILL = contract.MASK_FILL
_LOG2E = contract.LOG2E


@triton.jit
def _attention_fwd(
    Q, K, V, Mask, KLen, QLen, Out, Lse, Acc,
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
    HAS_QLEN: tl.constexpr,
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
    SUM_HEADS: tl.constexpr,
    STORE_LSE: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
):
    # Grid axis 0 is batch x heads, or the batch alone when SUM_HEADS (each program then loops over the
    # heads): up to 2**31 - 1, where axis 1 stops at 65535, which B * H can pass.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    off_b, first_head, head_count = program_heads(pid_bh, num_heads, SUM_HEADS)
    off_b = off_b.to(tl.int64)  # 64-bit offsets: B * H * L * D can pass 2**31 elements

    # Inside one example and head, 32-bit offsets unless one can pass 2**31 (``needs_wide_offsets``).
    offs_m = block_offsets(pid_m * BLOCK_M, BLOCK_M, WIDE_OFFSETS)
    offs_n = block_offsets(0, BLOCK_N, WIDE_OFFSETS)
    offs_dk = block_offsets(0, BLOCK_DK, WIDE_OFFSETS)
    offs_dv = block_offsets(0, BLOCK_DV, WIDE_OFFSETS)
    row_ok = offs_m < len_q

    # Keys at or past k_len are never read; clamping to len_k keeps a bad length in bounds.
    k_len = len_k
    if HAS_KLEN:
        k_len = tl.minimum(tl.load(KLen + off_b).to(tl.int32), len_k)
    if HAS_QLEN:
        # Rows at or past the example's query length are written as zeros; a block wholly past it
        # visits no keys at all.
        q_len = tl.minimum(tl.load(QLen + off_b).to(tl.int32), len_q)
        row_live = offs_m < q_len
        k_len = tl.where(pid_m * BLOCK_M < q_len, k_len, 0)
    if SUM_HEADS:
        total = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)

    for head in range(first_head, first_head + head_count):
        off_h = tl.cast(head, tl.int64)
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh
        acc_base = Acc + off_b * stride_ab + off_h * stride_ah
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
                s = chunked_scores(q_base, k_base, offs_m, cols, row_ok, col_ok, dim_k,
                                   stride_qm, stride_qd, stride_kn, stride_kd,
                                   BLOCK_M, BLOCK_N, BLOCK_DK, EVEN_M, EVEN_N, EVEN_DK, INPUT_PRECISION,
                                   WIDE_OFFSETS)
            s = scaled_masked(s, qk_scale, Mask + off_b * stride_mb, offs_m, cols, row_ok, col_ok,
                              stride_mm, stride_mn, mask_fill, HAS_MASK, EVEN_N)

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

        # --- normalise and write (or add to the head sum) ------------------------------------------
        out_base = Out + off_b * stride_ob + off_h * stride_oh
        if HAS_QLEN:
            l_i = tl.where(l_i > 0, l_i, 1.0)  # 0 in a block that visited no keys: its rows are zeros
        inv_l = 1.0 / l_i
        if SUM_HEADS:
            total += acc * inv_l[:, None]
        elif SINGLE_DV:
            o_ptrs = out_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
            o = acc * inv_l[:, None]
            if HAS_QLEN:
                o = tl.where(row_live[:, None], o, 0.0)
            o = o.to(Out.dtype.element_ty)
            if EVEN_M and EVEN_DV:
                tl.store(o_ptrs, o)
            else:
                tl.store(o_ptrs, o, mask=row_ok[:, None] & (offs_dv[None, :] < dim_v))
        else:
            for start_d in range(0, dim_v, BLOCK_DV):
                dvs = start_d + offs_dv
                a_ptrs = acc_base + offs_m[:, None] * stride_am + dvs[None, :] * stride_ad
                if HAS_QLEN:  # zeros past the length (a block that visited no keys never wrote its scratch)
                    o = tl.load(a_ptrs, mask=row_live[:, None], other=0.0) * inv_l[:, None]
                else:
                    o = tl.load(a_ptrs) * inv_l[:, None]
                o = o.to(Out.dtype.element_ty)
                o_ptrs = out_base + offs_m[:, None] * stride_om + dvs[None, :] * stride_od
                tl.store(o_ptrs, o, mask=row_ok[:, None] & (dvs[None, :] < dim_v))

        if STORE_LSE:
            # lse in natural-log units: (m + log2 l) * ln 2.
            lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
            l_ptrs = Lse + (off_b * num_heads + off_h) * len_q + offs_m
            if EVEN_M:
                tl.store(l_ptrs, lse)
            else:
                tl.store(l_ptrs, lse, mask=row_ok)

    if SUM_HEADS:
        o_ptrs = Out + off_b * stride_ob + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
        if HAS_QLEN:
            total = tl.where(row_live[:, None], total, 0.0)
        o = total.to(Out.dtype.element_ty)
        if EVEN_M and EVEN_DV:
            tl.store(o_ptrs, o)
        else:
            tl.store(o_ptrs, o, mask=row_ok[:, None] & (offs_dv[None, :] < dim_v))


@triton.jit
def _attention_fwd_tma(
    Qd, Kd, Vd, Out, Lse,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, len_q, len_k,
    qk_scale,  # scale * log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SUM_HEADS: tl.constexpr,
    STORE_LSE: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
):
    # _attention_fwd's whole-tile case (one Dk and one Dv chunk, Lq and Lk multiples of the blocks, no
    # mask, no lengths), its tiles loaded by the TMA unit from descriptors (B, H or 1, L, D) instead of
    # per-thread pointers: no address arithmetic in registers, and with WARP_SPECIALIZE a producer warp
    # issues the loads while the others compute. Every load is a whole tile inside the tensor, so
    # nothing is zero-filled and no score needs a -inf.
    off_b, first_head, head_count = program_heads(tl.program_id(0), num_heads, SUM_HEADS)  # TMA takes int32
    start_m = tl.program_id(1) * BLOCK_M
    offs_m = block_offsets(start_m, BLOCK_M, WIDE_OFFSETS)
    offs_dv = block_offsets(0, BLOCK_DV, WIDE_OFFSETS)
    if SUM_HEADS:
        total = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)

    for head in range(first_head, first_head + head_count):
        # Inputs shared by the heads (keys and values, or queries broadcast) have a head axis of 1: every
        # head reads its row 0.
        q_head = tl.minimum(head, Qd.shape[1] - 1)
        k_head = tl.minimum(head, Kd.shape[1] - 1)
        v_head = tl.minimum(head, Vd.shape[1] - 1)
        q = Qd.load([off_b, q_head, start_m, 0]).reshape(BLOCK_M, BLOCK_DK)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
        for start_n in tl.range(0, len_k, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            k = Kd.load([off_b, k_head, start_n, 0]).reshape(BLOCK_N, BLOCK_DK)
            s = tl.dot(q, k.T, input_precision=INPUT_PRECISION) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            v = Vd.load([off_b, v_head, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        inv_l = 1.0 / l_i
        off_bh = tl.cast(off_b, tl.int64) * num_heads + head
        if SUM_HEADS:
            total += acc * inv_l[:, None]
        else:
            o_ptrs = (Out + tl.cast(off_b, tl.int64) * stride_ob + tl.cast(head, tl.int64) * stride_oh
                      + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)
            tl.store(o_ptrs, (acc * inv_l[:, None]).to(Out.dtype.element_ty))
        if STORE_LSE:
            tl.store(Lse + off_bh * len_q + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453)

    if SUM_HEADS:
        o_ptrs = Out + tl.cast(off_b, tl.int64) * stride_ob + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, total.to(Out.dtype.element_ty))


#: Shared memory the launch configuration of 16-bit heads 129 to 256 wide needs (128 x 64 blocks, 2 stages,
#: compiled as launched with mask and lengths: 160 KiB on sm_80, 200 KiB on sm_90): A100's 163 KiB and
#: H100's 227 KiB hold it; GPUs with less (99 KiB per block on sm_86, sm_89 and sm_120: A10, L4, L40S,
#: RTX 30x0 to 50x0) take smaller blocks.
HEADS_256_SHARED_MEMORY = 163 * 1024


def launch_config(len_q: int, len_k: int, dim_k: int, dim_v: int, itemsize: int, precision: str = "ieee",
                  shared_memory: int | None = None) -> dict:
    """Block sizes, warps, stages and the float32 dot precision for a shape, on a GPU whose blocks may take
    ``shared_memory`` bytes of shared memory (None: an A100's or more). tl.dot needs every block
    dimension >= 16.

    16-bit heads up to 256 wide fit one chunk (the query tile and the accumulator stay in registers, as
    in FlashAttention); wider heads are chunked by 128, and float32 by 64 (its tiles take twice the
    shared memory), so any D runs with the same footprint. Blocks, warps and stages are the fastest
    measured on an H200 for the fusion's call (bench/results/2026-11-28-nvidia-h200-sweep-{1,2}.md):

    * 16-bit, D <= 128 (W2), heads summed in the kernel: 64 x 64, 4 warps, 3 stages: 0.273 ms
      (128 x 32: 0.380; 64 x 64 with 8 warps: 0.426);
    * 16-bit, D in 129..256 (W4), heads summed: 128 x 64, 8 warps, 2 stages: 0.580 ms (64 x 64: 1.20);
      its accumulator and head sum spill registers, and it is still the fastest measured. On GPUs with
      less than ``HEADS_256_SHARED_MEMORY`` it would not launch (160 KiB); there 64 x 64 at 4 warps and
      one stage (72 KiB; not timed), the blocks FlashAttention-2 takes for such heads on such GPUs;
    * 16-bit, chunked D = 1280 (W3), heads written: 64 x 128, 4 warps, 3 stages: 1.96 ms (64 x 64 with
      8 warps, 2 stages: 3.57);
    * float32 (W2), heads written: 64 x 64, 4 warps, 3 stages: 4.33 ms (2 stages: 4.47).

    float32 dots take ``precision`` (``contract.FLOAT32_PRECISIONS``): IEEE float32 on CUDA cores by
    default, or TF32 tensor cores, three products (``tf32x3``) or one (``tf32``). The blocks are the
    IEEE ones for all three; in tf32x3 at W2 they took 2.20 ms, and the best of seven tiles, 128 x 64
    at 8 warps and 2 stages, 2.08 (bench/results/2026-11-30-nvidia-h200-sweep-2.md): W2's unmasked
    fusions attend through SDPA (1.73) anyway, so the blocks stay one set until a fusion is timed.

    ``TMA`` and ``WARP_SPECIALIZE`` are False: the pointer kernel, until the sweep has timed the TMA loads.
    """
    contract.check_precision(precision)
    half = itemsize <= 2
    widest = max(dim_k, dim_v)
    d_cap = (256 if widest <= 256 else 128) if half else 64
    block_dk = min(block_at_least_16(dim_k), d_cap)
    block_dv = min(block_at_least_16(dim_v), d_cap)
    one_chunk = dim_k <= block_dk and dim_v <= block_dv
    if half and one_chunk and widest <= 128:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 3
    elif half and one_chunk and (shared_memory is None or shared_memory >= HEADS_256_SHARED_MEMORY):  # D 129..256
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 2
    elif half and one_chunk:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 1
    elif half:
        block_m, block_n, num_warps, num_stages = 64, 128, 4, 3
    else:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 3
    # Short sequences take the smallest block that covers them.
    block_m = min(block_m, block_at_least_16(len_q))
    block_n = min(block_n, block_at_least_16(len_k))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_DK": block_dk, "BLOCK_DV": block_dv,
            "num_warps": num_warps, "num_stages": num_stages, "INPUT_PRECISION": "ieee" if half else precision,
            "TMA": False, "WARP_SPECIALIZE": False}


def _tma_layout(t) -> tuple[list, list] | None:
    """(shape, strides) of a TMA descriptor over t (B, H, L, D), or None where TMA cannot address it: the
    unit reads a 16-byte-aligned base, rows of unit stride, and other strides that are multiples of 16
    bytes. An axis of one element (keys or values shared by the heads) takes a stride the unit accepts;
    heads broadcast from one (stride 0) become an axis of one, which the kernel reads for every head;
    another broadcast axis is refused."""
    shape, strides = list(t.shape), list(t.stride())
    if shape[1] > 1 and strides[1] == 0:
        shape[1] = 1
    for axis in range(3):
        if shape[axis] == 1:
            strides[axis] = shape[2] * strides[2]
    size = t.element_size()
    if (t.data_ptr() % 16 or strides[3] != 1
            or any(stride == 0 or stride * size % 16 for stride in strides[:3])):
        return None
    return shape, strides


def _tma_refusal(q, masked, k_lengths, q_lengths, dims, cfg, warp_specialize: bool, layouts: dict) -> str | None:
    """Why the launch ``cfg`` asks for cannot load by TMA (None: it can): the whole-tile case only.
    ``layouts``: name -> ``_tma_layout`` of q, k and v."""
    _, _, len_q, len_k, dim_k, dim_v = dims
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 9:
        return "TMA loads need an sm_90 or newer GPU"
    if warp_specialize and q.dtype == torch.float32 and cfg["INPUT_PRECISION"] != "ieee":
        # Compiled for sm_90 (2026-12-01): Triton 3.6's warp specialisation pass fails on TF32 dots.
        return "warp-specialised TF32 dots do not compile (Triton 3.6)"
    if masked is not None or k_lengths is not None or q_lengths is not None:
        return "TMA loads take no mask and no lengths"
    if dim_k != cfg["BLOCK_DK"] or dim_v != cfg["BLOCK_DV"]:
        return f"TMA loads need Dk == BLOCK_DK and Dv == BLOCK_DV; got {dim_k}, {dim_v}"
    if len_q % cfg["BLOCK_M"] or len_k % cfg["BLOCK_N"]:
        return f"TMA loads need Lq a multiple of BLOCK_M and Lk of BLOCK_N; got {len_q}, {len_k}"
    for name, layout in layouts.items():
        if layout is None:
            return f"{name}'s memory is not TMA-addressable (16-byte-aligned base and strides, unit last stride)"
    return None


def _descriptor(t, layout: tuple[list, list], block_rows: int, block_cols: int):
    shape, strides = layout
    return TensorDescriptor(t, shape, strides, [1, 1, block_rows, block_cols])


def attention(q, k, v, *, scale: float, masked=None, k_lengths=None, q_lengths=None, out_dtype=None,
              sum_heads: bool = False, precision: str = "ieee", config: dict | None = None,
              lengths_checked: bool = False, need_lse: bool = True):
    """Fused attention forward.

    Args:
        q: (B, H, Lq, Dk); k: (B, Hk, Lk, Dk); v: (B, Hv, Lk, Dv); Hk, Hv in {1, H}. One dtype among
            float32, float16, bfloat16; one device; any strides.
        scale: multiplies the scores.
        masked: optional bool or uint8 (Bm, Lq, Lk) with Bm in {1, B}: nonzero where the seed's mask is
            0 (the score becomes -1e9).
        k_lengths: optional int (B,) with values in 1..Lk: keys at or past the length get zero weight.
            Checking the values reads one flag from the device (a synchronisation).
        q_lengths: optional int (B,) with values in 1..Lq: output rows at or past the length are zeros,
            and query blocks wholly past it skip their keys (the lse of those rows is undefined).
            Checked as k_lengths is.
        out_dtype: dtype of O (default: q's dtype); float32 keeps the accumulator's precision.
        sum_heads: return the sum of the heads' outputs, (B, Lq, Dv), taken in float32. When Dv fits one
            chunk, each program loops over the heads and keeps the sum in registers, so the per-head
            outputs never reach memory; otherwise they are written in float32 and summed after.
        precision: how float32 dots run: ``"ieee"`` (CUDA cores), ``"tf32x3"`` (three TF32 tensor-core
            products, about float32's accuracy) or ``"tf32"`` (one, ~1e-3 relative error); 16-bit
            inputs ignore it.
        config: a launch configuration with the keys of ``launch_config``'s result, used instead of it
            (for tuning sweeps, ``bench/sweep_triton.py``; its INPUT_PRECISION replaces ``precision``); it
            always runs this file's fused kernel, loading its tiles by TMA where ``TMA`` is true (and
            warp-specialised where ``WARP_SPECIALIZE`` is): whole tiles of tensors TMA can address
            (16-byte-aligned bases and strides, unit last stride), no mask and no lengths, on an sm_90
            or newer GPU, else ValueError.
        lengths_checked: the caller has checked that k_lengths lie in 1..Lk and q_lengths in 1..Lq (the
            library's front end does): no read from the device. Values out of range are then not caught
            (the kernel stays in bounds, but its numbers are wrong).
        need_lse: compute and return the lse (B x H x Lq float32: on W4, 0.25 MiB, the whole difference
            between the fusion's peak memory and torch SDPA's); without it the second result is None.

    Wide heads over short sequences (``attention_two_pass.preferred``: 16-bit heads over 256 wide,
    float32 over 64, and Lk <= Dv) go to ``attention_two_pass``, which computes the same function
    with the scores materialised; ``config`` keeps them here.

    Returns:
        O (B, H, Lq, Dv), or (B, Lq, Dv) with ``sum_heads``, and lse (B, H, Lq) float32, the natural-log
        log-sum-exp of each score row (None without ``need_lse``).

    Raises:
        TypeError / ValueError on inputs that break the contract above.
    """
    dims = batch, heads, len_q, len_k, dim_k, dim_v = checked_shapes(q, k, v)
    if config is None and two_pass_preferred(len_q, len_k, dim_k, dim_v, q.element_size()):
        return attention_two_pass(q, k, v, scale=scale, masked=masked, k_lengths=k_lengths, q_lengths=q_lengths,
                                  out_dtype=out_dtype, sum_heads=sum_heads, precision=precision,
                                  lengths_checked=lengths_checked, need_lse=need_lse)
    masked, k_lengths, q_lengths = checked_mask_and_lengths(q, masked, k_lengths, q_lengths, dims, lengths_checked)
    cfg = chosen_config(launch_config(len_q, len_k, dim_k, dim_v, q.element_size(), precision,
                                      shared_memory_per_block(q)), config)
    block_m, block_dv = cfg["BLOCK_M"], cfg["BLOCK_DV"]
    contract.check_query_blocks(len_q, block_m)
    tma, warp_specialize = cfg.pop("TMA"), cfg.pop("WARP_SPECIALIZE")  # which kernel, not its parameters
    if warp_specialize and not tma:
        raise ValueError("config asks for TMA loads, but WARP_SPECIALIZE needs TMA")
    if tma:
        layouts = {"q": _tma_layout(q), "k": _tma_layout(k), "v": _tma_layout(v)}
        refusal = _tma_refusal(q, masked, k_lengths, q_lengths, dims, cfg, warp_specialize, layouts)
        if refusal:
            raise ValueError(f"config asks for TMA loads, but {refusal}")
    single_dv = dim_v <= block_dv
    sum_in_kernel = sum_heads and single_dv
    dtype = out_dtype or q.dtype
    if sum_in_kernel:
        out = torch.empty((batch, len_q, dim_v), device=q.device, dtype=dtype)
        out_strides = (out.stride(0), 0, out.stride(1), out.stride(2))
    else:
        out = torch.empty((batch, heads, len_q, dim_v), device=q.device, dtype=torch.float32 if sum_heads else dtype)
        out_strides = out.stride()
    lse = torch.empty((batch, heads, len_q), device=q.device, dtype=torch.float32) if need_lse else None
    if tma:
        grid = (batch if sum_in_kernel else batch * heads, len_q // block_m)
        _attention_fwd_tma[grid](
            _descriptor(q, layouts["q"], block_m, cfg["BLOCK_DK"]),
            _descriptor(k, layouts["k"], cfg["BLOCK_N"], cfg["BLOCK_DK"]),
            _descriptor(v, layouts["v"], cfg["BLOCK_N"], block_dv), out, lse if lse is not None else out,
            *out_strides, heads, len_q, len_k, float(scale) * _LOG2E,
            SUM_HEADS=sum_in_kernel, STORE_LSE=need_lse, WARP_SPECIALIZE=warp_specialize,
            WIDE_OFFSETS=needs_wide_offsets(out), **cfg,
        )
        return out, lse
    if single_dv:
        scratch, scratch_strides = out, (0, 0, 0, 0)  # unused: the accumulator stays in registers
    else:  # float32 accumulator, padded to whole blocks so the kernel needs no masks on it
        rows = cdiv(len_q, block_m) * block_m
        cols = cdiv(dim_v, block_dv) * block_dv
        scratch = torch.empty((batch, heads, rows, cols), device=q.device, dtype=torch.float32)
        scratch_strides = scratch.stride()
    # Valid pointers that HAS_MASK, HAS_KLEN and HAS_QLEN = False never read and STORE_LSE=False never writes.
    mask_arg = masked if masked is not None else q
    lse_arg = lse if lse is not None else q

    wide = needs_wide_offsets(q, k, v, masked, out, None if single_dv else scratch)

    grid = (batch if sum_in_kernel else batch * heads, cdiv(len_q, block_m))
    _attention_fwd[grid](
        q, k, v, mask_arg, k_lengths if k_lengths is not None else q, q_lengths if q_lengths is not None else q,
        out, lse_arg, scratch,
        *q.stride(),
        k.stride(0), 0 if k.shape[1] == 1 else k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), 0 if v.shape[1] == 1 else v.stride(1), v.stride(2), v.stride(3),
        *mask_strides(masked),
        *out_strides,
        *scratch_strides,
        heads, len_q, len_k, dim_k, dim_v,
        float(scale) * _LOG2E,
        MASK_FILL * _LOG2E,
        HAS_MASK=masked is not None,
        HAS_KLEN=k_lengths is not None,
        HAS_QLEN=q_lengths is not None,
        SINGLE_DK=dim_k <= cfg["BLOCK_DK"],
        SINGLE_DV=single_dv,
        EVEN_M=len_q % block_m == 0,
        EVEN_N=len_k % cfg["BLOCK_N"] == 0 and k_lengths is None,
        EVEN_DK=dim_k % cfg["BLOCK_DK"] == 0,
        EVEN_DV=dim_v % block_dv == 0,
        SUM_HEADS=sum_in_kernel,
        STORE_LSE=need_lse,
        WIDE_OFFSETS=wide,
        **cfg,
    )
    if sum_heads and not sum_in_kernel:
        out = out.sum(1).to(dtype)
    return out, lse
