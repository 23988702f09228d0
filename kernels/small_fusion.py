"""The whole fusion of small examples in one launch: both directions, every head, projections included.

For sequences and heads this small the fusion's arithmetic takes microseconds on a GPU, and a call's
time is its launches: W1 (the seed's demo, B = 1, L = 10, D = 64, H = 2) took 0.367 ms on an H200
through two projection GEMMs, two attentions and two heads' sums (bench/NOTES.md, 2026-11-30), for
0.031 ms of kernels. Here one program per (example, direction) does all of it in registers, in the
folded formulation of SPEC section 4: with W = [A_0 .. A_H-1 | U_0 .. U_H-1] (D, 2 H D),

    out_s = sum_h softmax(Xs A_h Xt^T, masked) (Xt U_h)    (sequential queries, structural keys)
    out_t = sum_h softmax(Xt A_h Xs^T, masked^T) (Xs U_h)  (and the reverse)

The scale 1/sqrt(D) is inside A_h. The rounding follows the multi-launch path's: the folded queries
Xq A_h and values Xk U_h are rounded to the inputs' dtype (as the projection GEMMs store them), the
probabilities are cast to it before their product with the values (as FlashAttention does), and the
scores and the heads' sum are accumulated in float32.

Probabilities, when asked (STORE_PROBS), are written from the same registers: (B, H, Lq, Lk) per
direction in the inputs' dtype, zero for keys past the key length and for rows past the query length.
So are the seed's cosine similarities (STORE_SIM): the query input's rows against the output's rows as
returned (rounded to the dtype), (B, Lq, Lq) in float32, each row divided by its largest magnitude and
then by its norm first (as ``device_common.DeviceFusion._cosine_similarity``: no overflow or underflow
of the squares; a zero row, padding included, gives 0).

The inputs' largest magnitudes, when asked (STORE_MAGNITUDE), come from the same loads: each program
writes its query input's max |x| over the whole example, padding included, NaN where one holds NaN, for
the front end's check of the inputs' values (``triton_backend.KernelMagnitude``), which would otherwise
take three launches of its own.

Ragged examples: rows of either input at or past its example's length are loaded as zeros (whatever
the padding holds, no Inf reaches a product), keys past the key length get -inf scores (zero weight;
lengths are >= 1, so every row keeps a finite maximum), and output rows past the query length are
written as zeros. The seed's mask replaces a score by -1e9, except that an Inf or NaN score stays NaN
(``attention_common.scaled_masked``).

Every offset is taken in 64 bits: the blocks are small, and any strides (views) then stay in bounds
without a second variant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import contract
from .attention_common import block_at_least_16, checked_lengths, checked_mask, mask_strides

#: The widest head one program holds (padded to a power of two, at least 16: tl.dot's smallest block).
MAX_BLOCK_D = 64
#: The longest sequence one program holds (padded likewise), by how its dots run: the largest blocks that
#: spill no registers at 8 warps with mask, lengths, probabilities, similarities and magnitudes (sm_90,
#: Triton 3.6's ptxas, D = 64, compiled as launched: tests/kernels/compile_triton_variants.py). IEEE
#: float32 dots are the hungriest: 16 x 64 blocks take 207 registers (W1 at 4 warps, without any of
#: those: 808 bytes of spills), 32 x 64 spill 804 bytes; TF32 products fit 32 x 64 (tf32x3 245
#: registers; 64 x 64 spill 1888), 16-bit 64 x 64 without the similarities (193).
MAX_BLOCK_L = {"ieee": 16, "tf32x3": 32, "tf32": 32, "16-bit": 64}
#: The same with the similarities (STORE_SIM: a float32 dot of the unit rows at the end), where 16-bit
#: blocks of 64 spill 256 bytes; 32 take 177 registers.
MAX_BLOCK_L_WITH_SIMILARITY = {**MAX_BLOCK_L, "16-bit": 32}


@triton.jit
def _unit_rows(x):
    """float32 rows scaled to unit length: by their largest magnitude first, then by their norm; a zero
    row stays zero, and a row holding NaN (an output that overflowed, which the front end reports) NaN."""
    # NaN left out of the maximum, as a GPU's max does anyway; Triton's interpreter warns on a row of NaN.
    top = tl.max(tl.where(x == x, tl.abs(x), 0.0), 1)
    x = x / tl.where(top == 0.0, 1.0, top)[:, None]
    norm = tl.sqrt(tl.sum(x * x, 1))
    return x / tl.where(norm == 0.0, 1.0, norm)[:, None]


@triton.jit
def _largest_magnitude(x):
    """max |x| over a block in float32, NaN when the block holds NaN (a GPU's max leaves NaN out)."""
    x = x.to(tl.float32)
    top = tl.max(tl.max(tl.where(x == x, tl.abs(x), 0.0), 1), 0)
    has_nan = tl.max(tl.max((x != x).to(tl.int32), 1), 0)
    return tl.where(has_nan > 0, float("nan"), top)


@triton.jit
def _rows(ptrs, rows, length, padded, d_ok, WHOLE_MAGNITUDE: tl.constexpr):
    """An example's rows (BLOCK, BLOCK_D), zero at or past ``length`` whatever they hold, and with
    WHOLE_MAGNITUDE the largest |x| of all ``padded`` rows, padding included (the front end's check
    covers it; else 0): the rows are then loaded whole and the padding zeroed by a select, so that no
    second load is needed (a second load of 16-bit 64 x 64 blocks spilled)."""
    if WHOLE_MAGNITUDE:
        x = tl.load(ptrs, mask=(rows < padded)[:, None] & d_ok[None, :], other=0.0)
        top = _largest_magnitude(x)
        x = tl.where((rows < length)[:, None], x, 0.0)  # a select: the padding's Inf or NaN leaves no trace
    else:
        x = tl.load(ptrs, mask=(rows < length)[:, None] & d_ok[None, :], other=0.0)
        top = 0.0
    return x, top


@triton.jit
def one_direction(
    Xq, Xk, Xv, W, Out, Probs, Sim, Magnitude, Mask, QLen, KLen, b,
    stride_qb, stride_qm, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_wd, stride_wc,
    stride_ob, stride_om, stride_od,
    stride_mb, stride_mm, stride_mn,
    len_q, len_k, dim, num_heads, mask_fill,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_QLEN: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    STORE_PROBS: tl.constexpr,
    STORE_SIM: tl.constexpr,
    STORE_MAGNITUDE: tl.constexpr,
    STORE_KV_MAGNITUDES: tl.constexpr,
    VALUES_ARE_KEYS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One example's output rows for queries Xq against keys Xk (values Xv U_h, Xv the keys themselves
    with VALUES_ARE_KEYS, as in the fusion: then Xv is not read), heads summed; with
    STORE_PROBS, each head's probabilities into Probs (B, H, Lq, Lk), with STORE_SIM the cosine
    similarities of Xq's rows and the output's into Sim (B, Lq, Lq), both contiguous; with
    STORE_MAGNITUDE, the largest |x| of the example's whole Xq, padding included, at Magnitude[0], and
    with STORE_KV_MAGNITUDES those of Xk and Xv at Magnitude[1] and Magnitude[2]."""
    offs_q = tl.arange(0, BLOCK_Q).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = offs_d < dim
    q_len = len_q
    if HAS_QLEN:
        q_len = tl.minimum(tl.load(QLen + b).to(tl.int32), len_q)  # clamped: a bad length stays in bounds
    k_len = len_k
    if HAS_KLEN:
        k_len = tl.minimum(tl.load(KLen + b).to(tl.int32), len_k)
    q_live = offs_q < q_len
    k_live = offs_k < k_len

    xq, top = _rows(Xq + b * stride_qb + offs_q[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    offs_q, q_len, len_q, d_ok, STORE_MAGNITUDE)
    if STORE_MAGNITUDE:
        tl.store(Magnitude, top)
    xk, top = _rows(Xk + b * stride_kb + offs_k[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    offs_k, k_len, len_k, d_ok, STORE_KV_MAGNITUDES)
    if STORE_KV_MAGNITUDES:
        tl.store(Magnitude + 1, top)
    xk_t = tl.trans(xk)
    if VALUES_ARE_KEYS:
        xv = xk
    else:
        xv, top = _rows(Xv + b * stride_vb + offs_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        offs_k, k_len, len_k, d_ok, STORE_KV_MAGNITUDES)
    if STORE_KV_MAGNITUDES:
        tl.store(Magnitude + 2, top)  # the keys' again where they are the values
    if HAS_MASK:
        masked = tl.load(Mask + b * stride_mb + offs_q[:, None] * stride_mm + offs_k[None, :] * stride_mn,
                         mask=(offs_q[:, None] < len_q) & (offs_k[None, :] < len_k), other=0)
    w_rows = W + offs_d[:, None] * stride_wd
    w_ok = d_ok[:, None] & d_ok[None, :]
    total = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for head in range(num_heads):
        a = tl.load(w_rows + (head * dim + offs_d[None, :]) * stride_wc, mask=w_ok, other=0.0)
        qf = tl.dot(xq, a, input_precision=INPUT_PRECISION).to(xq.dtype)
        s = tl.dot(qf, xk_t, input_precision=INPUT_PRECISION) * 1.4426950408889634  # log2(e): exp2 below
        if HAS_MASK:
            s = tl.where(masked != 0, mask_fill + s * 0.0, s)
        s = tl.where(k_live[None, :], s, float("-inf"))
        p = tl.exp2(s - tl.max(s, 1)[:, None])
        inv_l = 1.0 / tl.sum(p, 1)
        if STORE_PROBS:
            probs = tl.where(q_live[:, None], p * inv_l[:, None], 0.0)
            tl.store(Probs + ((b * num_heads + head) * len_q + offs_q[:, None]) * len_k + offs_k[None, :],
                     probs.to(Probs.dtype.element_ty), mask=(offs_q[:, None] < len_q) & (offs_k[None, :] < len_k))
        u = tl.load(w_rows + ((num_heads + head) * dim + offs_d[None, :]) * stride_wc, mask=w_ok, other=0.0)
        v = tl.dot(xv, u, input_precision=INPUT_PRECISION).to(xv.dtype)
        total += tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION) * inv_l[:, None]
    out = tl.where(q_live[:, None], total, 0.0).to(Out.dtype.element_ty)
    tl.store(Out + b * stride_ob + offs_q[:, None] * stride_om + offs_d[None, :] * stride_od, out,
             mask=(offs_q[:, None] < len_q) & d_ok[None, :])
    if STORE_SIM:  # padded rows of both are zero: their similarities 0
        sim = tl.dot(_unit_rows(xq.to(tl.float32)), tl.trans(_unit_rows(out.to(tl.float32))), input_precision="ieee")
        tl.store(Sim + (b * len_q + offs_q[:, None]) * len_q + offs_q[None, :], sim,
                 mask=(offs_q[:, None] < len_q) & (offs_q[None, :] < len_q))


@triton.jit
def _small_fusion_fwd(
    Xs, Xt, W, OutS, OutT, ProbsS, ProbsT, SimS, SimT, Magnitudes, Mask, SLen, TLen,
    stride_sb, stride_sm, stride_sd,
    stride_tb, stride_tm, stride_td,
    stride_wd, stride_wc,
    stride_osb, stride_osm, stride_osd,
    stride_otb, stride_otm, stride_otd,
    stride_mb, stride_ms, stride_mt,
    len_s, len_t, dim, num_heads,
    mask_fill,  # MASK_FILL * log2(e): the seed's -1e9 in the scores' base-2 units
    BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_SLEN: tl.constexpr,
    HAS_TLEN: tl.constexpr,
    STORE_PROBS: tl.constexpr,
    STORE_SIM: tl.constexpr,
    STORE_MAGNITUDE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Grid: (B, 2). Axis 1 picks the direction; the structural direction reads the mask transposed.
    # Magnitudes (B, 2): each direction's program writes its query input's, column 0 Xs's, 1 Xt's.
    b = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        one_direction(Xs, Xt, Xt, W, OutS, ProbsS, SimS, Magnitudes + 2 * b, Mask, SLen, TLen, b,
                      stride_sb, stride_sm, stride_sd, stride_tb, stride_tm, stride_td, stride_tb, stride_tm, stride_td,
                      stride_wd, stride_wc, stride_osb, stride_osm, stride_osd, stride_mb, stride_ms, stride_mt,
                      len_s, len_t, dim, num_heads, mask_fill,
                      BLOCK_S, BLOCK_T, BLOCK_D, HAS_MASK, HAS_SLEN, HAS_TLEN, STORE_PROBS, STORE_SIM,
                      STORE_MAGNITUDE, False, True, INPUT_PRECISION)
    else:
        one_direction(Xt, Xs, Xs, W, OutT, ProbsT, SimT, Magnitudes + 2 * b + 1, Mask, TLen, SLen, b,
                      stride_tb, stride_tm, stride_td, stride_sb, stride_sm, stride_sd, stride_sb, stride_sm, stride_sd,
                      stride_wd, stride_wc, stride_otb, stride_otm, stride_otd, stride_mb, stride_mt, stride_ms,
                      len_t, len_s, dim, num_heads, mask_fill,
                      BLOCK_T, BLOCK_S, BLOCK_D, HAS_MASK, HAS_TLEN, HAS_SLEN, STORE_PROBS, STORE_SIM,
                      STORE_MAGNITUDE, False, True, INPUT_PRECISION)


def longest(itemsize: int, precision: str = "ieee", need_similarity: bool = False) -> int:
    """The longest sequence one program holds for inputs of ``itemsize`` bytes (``MAX_BLOCK_L``, or
    ``MAX_BLOCK_L_WITH_SIMILARITY`` with the similarities)."""
    table = MAX_BLOCK_L_WITH_SIMILARITY if need_similarity else MAX_BLOCK_L
    return table["16-bit" if itemsize <= 2 else contract.check_precision(precision)]


def fits(len_s: int, len_t: int, dim: int, itemsize: int, precision: str = "ieee",
         need_similarity: bool = False) -> bool:
    """Whether one program holds an example's sequences and heads (``longest``, ``MAX_BLOCK_D``)."""
    return max(len_s, len_t) <= longest(itemsize, precision, need_similarity) and dim <= MAX_BLOCK_D


def flops(batch: int, len_s: int, len_t: int, dim: int, heads: int) -> float:
    """The fusion's FLOPs (both directions, unpadded): per example and head, the four projections
    (queries and values of both inputs) and the two directions' scores and probabilities times values."""
    return 2.0 * batch * heads * dim * (2 * (len_s + len_t) * dim + 4 * len_s * len_t)


def launch_config(len_s: int, len_t: int, dim: int, itemsize: int, precision: str = "ieee") -> dict:
    """Blocks that cover the sequences and the width, 8 warps (4 spill at W1's shape in float32, above),
    one stage (the kernel has no loop over a sequence to pipeline)."""
    block_s, block_t, block_d = block_at_least_16(len_s), block_at_least_16(len_t), block_at_least_16(dim)
    return {"BLOCK_S": block_s, "BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": 8, "num_stages": 1,
            "INPUT_PRECISION": "ieee" if itemsize <= 2 else contract.check_precision(precision)}


def check_inputs(named: dict, weights, heads: int) -> None:
    """The launchers' common checks: the named inputs and the weights are torch tensors on one device, of
    one dtype among float32, float16 and bfloat16; the inputs are (B, L, D) with no empty axis, sharing
    B and D; the weights (D, 2 x heads x D)."""
    first = next(iter(named.values()))
    for name, t in (*named.items(), ("weights", weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {next(iter(named))} is on {first.device}")
    dtypes = [contract.dtype_name(t) for t in (*named.values(), weights)]
    if len(set(dtypes)) != 1 or dtypes[0] not in contract.DTYPES:
        raise TypeError(f"{_listing([*named, 'weights'])} must share one dtype among float32, float16 and bfloat16; "
                        f"got {', '.join(dtypes)}")

    def shapes_error(need: str) -> ValueError:  # the message is formatted on failure only, not every call
        shapes = _listing([str(tuple(t.shape)) for t in named.values()])
        return ValueError(f"{_listing(list(named))} must {need}; got shapes {shapes}")

    if any(t.ndim != 3 for t in named.values()):
        raise shapes_error("be (B, L, D)")
    if any(0 in t.shape for t in named.values()):
        raise shapes_error("have no empty axis")
    batch, _, dim = first.shape
    if any(t.shape[0] != batch or t.shape[2] != dim for t in named.values()):
        raise shapes_error("share B and D")
    if heads < 1 or tuple(weights.shape) != (dim, 2 * heads * dim):
        raise ValueError(f"weights must be (D, 2 x heads x D) = ({dim}, {2 * heads * dim}) for {heads} heads; "
                         f"got {tuple(weights.shape)}")


def check_fits(lengths: dict, x, precision: str, need_similarity: bool = False) -> None:
    """ValueError, naming the two ``lengths`` (name -> L) and x's width, when they pass ``fits``."""
    (len_a, len_b), dim, itemsize = lengths.values(), x.shape[-1], x.element_size()
    if not fits(len_a, len_b, dim, itemsize, precision, need_similarity):
        named = ", ".join(f"{name} = {length}" for name, length in lengths.items())
        raise ValueError(f"{named}, D = {dim} pass what one program holds in "
                         f"{contract.dtype_name(x)}{' with the similarities' * need_similarity} "
                         f"(L <= {longest(itemsize, precision, need_similarity)}, D <= {MAX_BLOCK_D}); "
                         f"use kernels.attention")


def check_magnitudes(magnitudes, inputs: int, batch: int, device) -> None:
    """None, or a contiguous float32 (B, inputs) tensor on ``device``: the launchers' ``magnitudes``."""
    if magnitudes is not None and not (
            isinstance(magnitudes, torch.Tensor) and tuple(magnitudes.shape) == (batch, inputs)
            and magnitudes.dtype == torch.float32 and magnitudes.device == device and magnitudes.is_contiguous()):
        raise ValueError(f"magnitudes must be a contiguous float32 ({batch}, {inputs}) tensor on {device}")


def _listing(items: list) -> str:
    """'a and b', 'a, b and c'."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def small_fusion(xs, xt, weights, *, heads: int, masked=None, s_lengths=None, t_lengths=None,
                 need_probs: bool = False, need_similarity: bool = False, precision: str = "ieee",
                 lengths_checked: bool = False, magnitudes=None):
    """Both directions of the folded fusion of small examples, in one launch.

    Args:
        xs: (B, Ls, D) sequential inputs; xt: (B, Lt, D) structural inputs; one dtype among float32,
            float16 and bfloat16, one device, any strides, with Ls, Lt and D within ``fits`` (16-bit
            sequences with the similarities up to 32 long, without them 64).
        weights: (D, 2 x heads x D) folded weights [A_0 .. A_H-1 | U_0 .. U_H-1] in the inputs' dtype
            (``crossattn_gpu.folding.fold_weights``: the scale 1/sqrt(D) inside the A_h).
        heads: H.
        masked: optional bool or uint8 (Bm, Ls, Lt), Bm in {1, B}: nonzero where the seed's mask is 0
            (the score becomes -1e9); the structural direction reads it transposed.
        s_lengths, t_lengths: optional int (B,) in 1..Ls and 1..Lt: rows at or past the length are
            neither keys nor values, and their output rows are zeros.
        need_probs: also return each head's attention probabilities.
        need_similarity: also return the cosine similarities of each input's rows (padded rows zero)
            and its direction's output rows.
        precision: how float32 dots run (``contract.FLOAT32_PRECISIONS``); 16-bit inputs ignore it.
        lengths_checked: the caller has checked the lengths' values (the library's front end does): no
            read from the device (``contract.check_lengths``).
        magnitudes: optional contiguous float32 (B, 2) tensor on the inputs' device, written with each
            example's largest |x| over the whole of xs[b] (column 0) and xt[b] (column 1), padding past
            the lengths included, NaN where one holds NaN: the front end's check of the inputs' values
            without a launch of its own.

    Returns:
        ((out_s, probs_st, sim_s), (out_t, probs_ts, sim_t)): out_s (B, Ls, D) and out_t (B, Lt, D), each
        the sum over heads of its direction's attention outputs; probs_st (B, H, Ls, Lt) and probs_ts
        (B, H, Lt, Ls), or None without ``need_probs``, zero for padded keys and rows; all in the
        inputs' dtype; sim_s (B, Ls, Ls) and sim_t (B, Lt, Lt) float32, or None without
        ``need_similarity``.

    Raises:
        TypeError for non-tensors, other dtypes or differing dtypes; ValueError for other ranks, empty
        axes, differing batches or widths, weights of another shape, shapes past ``fits``, devices that
        differ, a precision not in ``contract.FLOAT32_PRECISIONS``, a mask or lengths of another shape,
        dtype or range, or ``magnitudes`` of another shape, dtype, device or layout.
    """
    launch = SmallFusion(xs, xt, weights, heads=heads, need_probs=need_probs, need_similarity=need_similarity,
                         precision=precision)
    return launch(xs, xt, masked=masked, s_lengths=s_lengths, t_lengths=t_lengths, lengths_checked=lengths_checked,
                  magnitudes=magnitudes)


def layout(xs, xt) -> tuple:
    """What a ``SmallFusion`` is made for: both inputs' shapes, strides, dtypes and devices."""
    return (xs.shape, xs.stride(), xs.dtype, xs.device, xt.shape, xt.stride(), xt.dtype, xt.device)


class SmallFusion:
    """``small_fusion``'s launch, checked and configured once for inputs laid out as ``xs`` and ``xt``
    (``layout``) and for ``weights``: a call with inputs of that layout checks only what it adds (mask,
    lengths, magnitudes) and launches. ``small_fusion`` makes one per call; the Triton backend keeps one
    for repeated calls of a layout (``TritonBackend.fusion_plan``): a small call's time on a GPU is its
    host's (W1: 0.031 ms of kernels in 0.367 on an H200, 2026-11-30).

    Args and Raises: as ``small_fusion``'s, which this takes apart. A call with inputs of another layout
    is a ValueError: the blocks and strides are this layout's.
    """

    def __init__(self, xs, xt, weights, *, heads: int, need_probs: bool = False, need_similarity: bool = False,
                 precision: str = "ieee"):
        contract.check_precision(precision)
        check_inputs({"xs": xs, "xt": xt}, weights, heads)
        (_, len_s, dim), len_t = xs.shape, xt.shape[1]
        check_fits({"Ls": len_s, "Lt": len_t}, xs, precision, need_similarity)
        self.layout = layout(xs, xt)
        self._weights, self._heads = weights, heads
        self._need_probs, self._need_similarity = need_probs, need_similarity
        self._config = launch_config(len_s, len_t, dim, xs.element_size(), precision)
        # The outputs are written contiguous, so their strides are known now.
        self._strides = (*xs.stride(), *xt.stride(), *weights.stride(), len_s * dim, dim, 1, len_t * dim, dim, 1)

    def __call__(self, xs, xt, *, masked=None, s_lengths=None, t_lengths=None, lengths_checked: bool = False,
                 magnitudes=None):
        if layout(xs, xt) != self.layout:
            raise ValueError(f"this launch was made for inputs laid out as {self.layout}; got {layout(xs, xt)}")
        (batch, len_s, _), len_t = xs.shape, xt.shape[1]
        check_magnitudes(magnitudes, 2, batch, xs.device)
        masked = checked_mask(masked, batch, len_s, len_t, xs.device)
        given = checked_lengths({"s_lengths": (s_lengths, len_s), "t_lengths": (t_lengths, len_t)}, batch,
                                xs.device, lengths_checked)
        return self._launch(xs, xt, masked, given, magnitudes)

    def unchecked(self, xs, xt, magnitudes=None):
        """The launch without mask or lengths for inputs that the caller guarantees are of this layout (a
        plan kept under their layout: ``TritonBackend.fusion_plan``), with ``magnitudes`` None or a buffer
        that passes ``check_magnitudes`` (``KernelMagnitude.kernel_buffer`` makes one): nothing is checked
        again. The checks it skips took ~2.5 us of W1's ~45 us host path on this project's CPU."""
        return self._launch(xs, xt, None, {}, magnitudes)

    def _launch(self, xs, xt, masked, given: dict, magnitudes):
        """The launch on checked arguments: ``given`` the lengths as ``checked_lengths`` gives them."""
        (batch, len_s, dim), len_t, heads = xs.shape, xt.shape[1], self._heads
        out_s = torch.empty((batch, len_s, dim), dtype=xs.dtype, device=xs.device)
        out_t = torch.empty((batch, len_t, dim), dtype=xs.dtype, device=xs.device)
        probs_st = probs_ts = sim_s = sim_t = None
        if self._need_probs:
            probs_st = torch.empty((batch, heads, len_s, len_t), dtype=xs.dtype, device=xs.device)
            probs_ts = torch.empty((batch, heads, len_t, len_s), dtype=xs.dtype, device=xs.device)
        if self._need_similarity:
            sim_s = torch.empty((batch, len_s, len_s), dtype=torch.float32, device=xs.device)
            sim_t = torch.empty((batch, len_t, len_t), dtype=torch.float32, device=xs.device)
        # Absent mask, lengths, probabilities, similarities and magnitudes pass a valid pointer (xs) that
        # HAS_MASK, HAS_*LEN, STORE_PROBS, STORE_SIM and STORE_MAGNITUDE = False never read or write.
        _small_fusion_fwd[(batch, 2)](
            xs, xt, self._weights, out_s, out_t,
            *(xs if t is None else t for t in (probs_st, probs_ts, sim_s, sim_t, magnitudes)),
            masked if masked is not None else xs,
            given.get("s_lengths", xs), given.get("t_lengths", xs),
            *self._strides, *mask_strides(masked),
            len_s, len_t, dim, heads, contract.MASK_FILL * contract.LOG2E,
            HAS_MASK=masked is not None, HAS_SLEN="s_lengths" in given, HAS_TLEN="t_lengths" in given,
            STORE_PROBS=self._need_probs, STORE_SIM=self._need_similarity, STORE_MAGNITUDE=magnitudes is not None,
            **self._config,
        )
        return (out_s, probs_st, sim_s), (out_t, probs_ts, sim_t)
