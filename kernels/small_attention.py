"""The multi-head attention of small examples in one launch, projections included.

``CrossAttention.multi_head_attention`` in the folded formulation of SPEC section 4, with
W = [A_0 .. A_H-1 | U_0 .. U_H-1] (D, 2 H D):

    out = sum_h softmax(Xq A_h Xk^T, masked) (Xv U_h)

is one direction of ``kernels/small_fusion.py``'s fusion with values of their own, and runs in the same
code (``small_fusion.one_direction``): one program per example holds its queries, keys and values, every
head's projections, scores, softmax and values, and their sum in registers, with the same rounding, masks,
lengths (rows at or past a length are loaded as zeros) and 64-bit offsets, and, when asked, the three
inputs' largest magnitudes for the front end's check of their values. The multi-launch path takes that
check's five launches, two projection GEMMs, an attention and the heads' sum; for examples this small
those launches are the call's time (``small_fusion``'s docstring: W1 on an H200). Values that are the
keys themselves (the same memory and strides) are loaded once.

The sequences and the width fit one program as in the fusion (``small_fusion.fits``: heads up to 64
wide; sequences up to 16 long in IEEE float32, 32 in TF32, 64 in 16 bits): the one tile more for the
values' rows spills nothing there (sm_90, 8 warps, with mask, lengths, probabilities and magnitudes,
compiled as launched: at most 205 registers; the compile test fails on a spill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import contract
from .attention_common import checked_lengths, checked_mask, mask_strides
from .small_fusion import check_fits, check_inputs, check_magnitudes, launch_config, one_direction


@triton.jit
def _small_attention_fwd(
    Xq, Xk, Xv, W, Out, Probs, Magnitudes, Mask, QLen, KLen,
    stride_qb, stride_qm, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_wd, stride_wc,
    stride_ob, stride_om, stride_od,
    stride_mb, stride_mm, stride_mn,
    len_q, len_k, dim, num_heads,
    mask_fill,  # MASK_FILL * log2(e): the seed's -1e9 in the scores' base-2 units
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_QLEN: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    STORE_PROBS: tl.constexpr,
    STORE_MAGNITUDE: tl.constexpr,
    VALUES_ARE_KEYS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Grid: (B,). Magnitudes (B, 3): Xq's, Xk's and Xv's. No similarities: Out stands in for their
    # pointer, never touched.
    b = tl.program_id(0).to(tl.int64)
    one_direction(Xq, Xk, Xv, W, Out, Probs, Out, Magnitudes + 3 * b, Mask, QLen, KLen, b,
                  stride_qb, stride_qm, stride_qd, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd,
                  stride_wd, stride_wc, stride_ob, stride_om, stride_od, stride_mb, stride_mm, stride_mn,
                  len_q, len_k, dim, num_heads, mask_fill,
                  BLOCK_Q, BLOCK_K, BLOCK_D, HAS_MASK, HAS_QLEN, HAS_KLEN, STORE_PROBS, False, STORE_MAGNITUDE,
                  STORE_MAGNITUDE, VALUES_ARE_KEYS, INPUT_PRECISION)


def flops(batch: int, len_q: int, len_k: int, dim: int, heads: int) -> float:
    """The attention's FLOPs (unpadded): per example and head, the queries' and the values' projections
    and the scores and probabilities times values."""
    return 2.0 * batch * heads * dim * ((len_q + len_k) * dim + 2 * len_q * len_k)


def small_attention(xq, xk, xv, weights, *, heads: int, masked=None, q_lengths=None, k_lengths=None,
                    need_probs: bool = False, precision: str = "ieee", lengths_checked: bool = False,
                    magnitudes=None):
    """The folded multi-head attention of small examples, heads summed, in one launch.

    Args:
        xq: (B, Lq, D) query inputs; xk, xv: (B, Lk, D) key and value inputs; one dtype among float32,
            float16 and bfloat16, one device, any strides, with Lq, Lk and D within ``small_fusion.fits``.
        weights: (D, 2 x heads x D) folded weights [A_0 .. A_H-1 | U_0 .. U_H-1] in the inputs' dtype
            (``crossattn_gpu.folding.fold_weights``: the scale 1/sqrt(D) inside the A_h).
        heads: H.
        masked: optional bool or uint8 (Bm, Lq, Lk), Bm in {1, B}: nonzero where the seed's mask is 0
            (the score becomes -1e9).
        q_lengths, k_lengths: optional int (B,) in 1..Lq and 1..Lk: keys and values at or past the key
            length are not attended; output rows at or past the query length are zeros.
        need_probs: also return each head's attention probabilities.
        precision: how float32 dots run (``contract.FLOAT32_PRECISIONS``); 16-bit inputs ignore it.
        lengths_checked: the caller has checked the lengths' values (the library's front end does): no
            read from the device (``contract.check_lengths``).
        magnitudes: optional contiguous float32 (B, 3) tensor on the inputs' device, written with each
            example's largest |x| over the whole of xq[b], xk[b] and xv[b], padding past the lengths
            included, NaN where one holds NaN: the front end's check of the inputs' values without a
            launch of its own.

    Returns:
        (out (B, Lq, D), probs (B, H, Lq, Lk) or None), in the inputs' dtype; probabilities zero for padded
        keys and rows.

    Raises:
        TypeError for non-tensors, other dtypes or differing dtypes; ValueError for other ranks, empty
        axes, differing batches or widths, keys and values of different lengths, weights of another shape,
        shapes past ``small_fusion.fits``, devices that differ, a precision not in
        ``contract.FLOAT32_PRECISIONS``, a mask or lengths of another shape, dtype or range, or
        ``magnitudes`` of another shape, dtype, device or layout.
    """
    launch = SmallAttention(xq, xk, xv, weights, heads=heads, need_probs=need_probs, precision=precision)
    return launch(xq, xk, xv, masked=masked, q_lengths=q_lengths, k_lengths=k_lengths, lengths_checked=lengths_checked,
                  magnitudes=magnitudes)


def layout(xq, xk, xv) -> tuple:
    """What a ``SmallAttention`` is made for: the three inputs' shapes, strides, dtypes and devices."""
    return tuple(item for x in (xq, xk, xv) for item in (x.shape, x.stride(), x.dtype, x.device))


class SmallAttention:
    """``small_attention``'s launch, checked and configured once for inputs laid out as ``xq``, ``xk`` and
    ``xv`` (``layout``) and for ``weights``: a call with inputs of that layout checks only what it adds
    (mask, lengths, magnitudes) and launches. ``small_attention`` makes one per call; the Triton backend
    keeps one for repeated calls of a layout (``TritonBackend.attention_plan``), as it keeps a
    ``small_fusion.SmallFusion`` for the fusion's.

    Args and Raises: as ``small_attention``'s, which this takes apart. A call with inputs of another layout
    is a ValueError: the blocks and strides are this layout's.
    """

    def __init__(self, xq, xk, xv, weights, *, heads: int, need_probs: bool = False, precision: str = "ieee"):
        contract.check_precision(precision)
        check_inputs({"xq": xq, "xk": xk, "xv": xv}, weights, heads)
        (_, len_q, dim), len_k = xq.shape, xk.shape[1]
        if xv.shape[1] != len_k:
            raise ValueError(f"xk and xv must have the same length; got {len_k} and {xv.shape[1]}")
        check_fits({"Lq": len_q, "Lk": len_k}, xq, precision)
        self.layout = layout(xq, xk, xv)
        self._weights, self._heads, self._need_probs = weights, heads, need_probs
        self._values_strided_as_keys = xv.stride() == xk.stride()
        cfg = launch_config(len_q, len_k, dim, xq.element_size(), precision)
        self._blocks = dict(BLOCK_Q=cfg["BLOCK_S"], BLOCK_K=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"],
                            INPUT_PRECISION=cfg["INPUT_PRECISION"], num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"])
        # The output is written contiguous, so its strides are known now.
        self._strides = (*xq.stride(), *xk.stride(), *xv.stride(), *weights.stride(), len_q * dim, dim, 1)

    def __call__(self, xq, xk, xv, *, masked=None, q_lengths=None, k_lengths=None, lengths_checked: bool = False,
                 magnitudes=None):
        if layout(xq, xk, xv) != self.layout:
            raise ValueError(f"this launch was made for inputs laid out as {self.layout}; got {layout(xq, xk, xv)}")
        (batch, len_q, _), len_k = xq.shape, xk.shape[1]
        check_magnitudes(magnitudes, 3, batch, xq.device)
        masked = checked_mask(masked, batch, len_q, len_k, xq.device)
        given = checked_lengths({"q_lengths": (q_lengths, len_q), "k_lengths": (k_lengths, len_k)}, batch, xq.device,
                                lengths_checked)
        return self._launch(xq, xk, xv, masked, given, magnitudes)

    def unchecked(self, xq, xk, xv, magnitudes=None):
        """The launch without mask or lengths for inputs that the caller guarantees are of this layout (a
        plan kept under their layout: ``TritonBackend.attention_plan``), with ``magnitudes`` None or a
        buffer that passes ``check_magnitudes`` (``KernelMagnitude.kernel_buffer`` makes one): nothing is
        checked again, as ``small_fusion.SmallFusion.unchecked``."""
        return self._launch(xq, xk, xv, None, {}, magnitudes)

    def _launch(self, xq, xk, xv, masked, given: dict, magnitudes):
        """The launch on checked arguments: ``given`` the lengths as ``checked_lengths`` gives them."""
        (batch, len_q, dim), len_k, heads = xq.shape, xk.shape[1], self._heads
        # Values that are the keys (the fusion's case, and self-attention's) are loaded once.
        values_are_keys = self._values_strided_as_keys and xv.data_ptr() == xk.data_ptr()
        out = torch.empty((batch, len_q, dim), dtype=xq.dtype, device=xq.device)
        probs = None
        if self._need_probs:
            probs = torch.empty((batch, heads, len_q, len_k), dtype=xq.dtype, device=xq.device)
        # An absent mask, lengths, probabilities or magnitudes pass a valid pointer (xq) that HAS_MASK,
        # HAS_*LEN, STORE_PROBS and STORE_MAGNITUDE = False never read or write.
        _small_attention_fwd[(batch,)](
            xq, xk, xv, self._weights, out, *(xq if t is None else t for t in (probs, magnitudes, masked)),
            given.get("q_lengths", xq), given.get("k_lengths", xq),
            *self._strides, *mask_strides(masked),
            len_q, len_k, dim, heads, contract.MASK_FILL * contract.LOG2E,
            HAS_MASK=masked is not None, HAS_QLEN="q_lengths" in given, HAS_KLEN="k_lengths" in given,
            STORE_PROBS=self._need_probs, STORE_MAGNITUDE=magnitudes is not None, VALUES_ARE_KEYS=values_are_keys,
            **self._blocks,
        )
        return out, probs
