"""The building blocks of ``fusion.FoldedFusion`` on a device array library (torch or CuPy), around a
fused attention kernel.

Shared by the Triton backend (torch tensors) and the CuPy backend, so that the CuPy backend, which only
a GPU can run, executes the same code that the Triton backend's interpreter tests exercise on the CPU.
It uses the folded weights of ``crossattn_gpu.folding``: one GEMM per input gives every head's queries
and values, the raw inputs are the keys of every head (a head stride of 0 in the kernel), and the
output is the sum of the heads' outputs, which the kernel takes in float32 (``sum_heads``). The
attention probabilities, when asked, are rebuilt from the kernel's log-sum-exp (``_probabilities``;
the Triton backend writes them in kernels of their own instead). Where a backend prefers
(``_attends_as_gemms``: the CuPy backend, for large attentions), the attention runs as the array
library's GEMMs around an elementwise softmax instead (``_gemm_attention``).

A subclass provides the array module ``xp`` (``torch`` or ``cupy``: only functions both share are
used), ``float32``, ``cast``, ``_positions``, ``_device_lengths`` and ``kernel`` (a module with
``attention`` and ``MASK_FILL``).

Ragged lengths arrive checked, on the host (the front end checks them there). Each entry point moves
them to the device once, and the kernel is told they are checked: it would otherwise read their range
back, one synchronisation per direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .._overflow import StageDtypes, narrower
from ..folding import FoldMagnitudes
from .fusion import FoldedFusion

#: A batch whose projections (B x L x 2*H*D elements per input) pass this bound runs in blocks of whole
#: examples, one after another, so that device memory stays bounded whatever B is: without blocks, 2000
#: antibodies of L = 256, D = 1280, H = 8 would need 21 GB of bfloat16 projections per input (W3, 64
#: examples: 0.67 GB, one block). The extra launches are a few per block of at least 2**30 elements.
DEVICE_BLOCK_ELEMENTS = 1 << 30


@dataclass(frozen=True)
class DeviceFoldedWeights:
    heads: int
    width: int
    query_value: object  # (D, 2*H*D) device array: [A_0 .. A_H-1 | U_0 .. U_H-1]
    magnitudes: FoldMagnitudes  # of the float64 fold, for the overflow bounds

    @cached_property
    def _parts(self) -> dict:  # the slices, built once: three views cost ~3 us a call
        hd = self.heads * self.width
        return {"q": self.query_value[:, :hd], "v": self.query_value[:, hd:], "qv": self.query_value}

    def columns(self, part: str):
        return self._parts[part]


class DeviceFusion(FoldedFusion):
    xp = None
    float32 = None
    kernel = None
    #: Whether ``kernel.attention`` takes ``q_lengths`` (writes the rows past them as zeros and skips the
    #: query blocks wholly past them); else the rows are zeroed after it.
    kernel_takes_query_lengths = False
    #: Whether ``_probabilities`` rebuilds them from the kernel's lse (so the kernel computes it).
    probabilities_need_lse = True
    #: A call's fixed cost in FLOPs of fusion work (``ragged.length_batches``): W1 took 0.64 ms on an
    #: H200 (Triton, 2026-11-28), where the fusion's GEMMs run at tens (float32) to hundreds (16-bit) of
    #: TFLOP/s. An estimate, not a measured optimum: at this size antibodies nearly always share calls.
    call_flops = 5e10
    #: The float32 scores one piece of ``_gemm_attention`` holds (128 MiB), besides its probabilities in
    #: the values' dtype (64 MiB in 16 bits), with key lengths one more copy of the scores, and its queries
    #: and heads' outputs in float32 (D / Lk times the scores' size each: no more than the CUDA C kernel's
    #: float32 accumulator of every head and query).
    gemm_scores_elements = 1 << 25

    def cast(self, x, dtype):
        raise NotImplementedError

    def stage_dtypes(self, dtype_name: str) -> StageDtypes:
        """Projections and outputs in the compute dtype, scores accumulated in float32 by the kernels."""
        compute = str(self.compute_dtype(dtype_name)).replace("torch.", "")
        return StageDtypes(compute, "float32", narrower(compute, dtype_name))

    def _positions(self, length: int):
        raise NotImplementedError

    def _device_lengths(self, lengths):
        """Host lengths (B,) as a device array; device arrays as they are."""
        raise NotImplementedError

    def _on_device(self, *lengths):
        return [None if n is None else self._device_lengths(n) for n in lengths]

    # --- blocks of examples (FoldedFusion) ---------------------------------------------------------

    @staticmethod
    def _example_blocks(batch: int, length: int, weights: DeviceFoldedWeights) -> list[slice]:
        step = max(1, DEVICE_BLOCK_ELEMENTS // (length * 2 * weights.heads * weights.width))
        return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]

    def _concatenate(self, arrays: list):
        return self.xp.concatenate(arrays)

    # --- building blocks -------------------------------------------------------------------------

    def _zero_padded_rows(self, x, lengths, axis: int):
        """x with the positions at or past ``lengths[b]`` along ``axis`` (1 or 2) set to zero."""
        if lengths is None:
            return x
        pad = self._positions(x.shape[axis])[None, :] >= self._device_lengths(lengths)[:, None]  # (B, L)
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        shape[axis] = x.shape[axis]
        return self.cast(self.xp.where(pad.reshape(shape), 0, x), x.dtype)

    def _attention(self, q, k, v, *, scale, masked, q_lengths, k_lengths, need_weights, sum_heads=False):
        """The kernel (the heads' outputs, or their sum), its rows at or past ``q_lengths`` zero, plus the
        probabilities when asked (``_probabilities``; their rows past ``q_lengths`` zero too); or the same
        as GEMMs where this backend prefers them (``_attends_as_gemms``, ``_gemm_attention``)."""
        xp = self.xp
        if masked is not None:  # in the kernels' uint8 once, for the attention and the probabilities both
            masked = xp.broadcast_to(self.cast(masked, xp.uint8), (masked.shape[0], q.shape[2], k.shape[2]))
        lengths = None if k_lengths is None else self._device_lengths(k_lengths)
        if self._attends_as_gemms(q, k, v):
            return self._gemm_attention(q, k, v, scale=scale, masked=masked, q_lengths=q_lengths, k_lengths=lengths,
                                        need_weights=need_weights, sum_heads=sum_heads)
        in_kernel = {"q_lengths": q_lengths} if self.kernel_takes_query_lengths else {}
        # The lse serves only to rebuild the probabilities: without them the kernel neither computes
        # nor allocates it (W4: 0.25 MiB, the fusion's whole excess over torch SDPA's peak memory).
        need_lse = need_weights and self.probabilities_need_lse
        out, lse = self.kernel.attention(q, k, v, scale=scale, masked=masked, k_lengths=lengths, sum_heads=sum_heads,
                                         lengths_checked=True, need_lse=need_lse, **in_kernel,
                                         **self._kernel_options())
        if not in_kernel:
            out = self._zero_padded_rows(out, q_lengths, axis=out.ndim - 2)
        probs = self._probabilities(q, k, lse, scale, masked, lengths, q_lengths) if need_weights else None
        return out, probs

    def _attends_as_gemms(self, q, k, v) -> bool:
        """Whether ``_attention`` runs ``_gemm_attention`` instead of the kernel: here never (the CuPy
        backend does where its kernel is the slower, ``CupyBackend._attends_as_gemms``)."""
        return False

    def _gemm_attention(self, q, k, v, *, scale, masked, q_lengths, k_lengths, need_weights, sum_heads):
        """``_attention``'s result as the array library's GEMMs around an elementwise softmax, in pieces of
        whole examples, or of one example's queries, whose float32 scores (b, H, lq, Lk) hold at most
        ``gemm_scores_elements``: memory bounded whatever the batch and lengths.

        Per piece: the scores as one float32 GEMM (16-bit queries and keys widened first, so that the
        softmax sees float32 scores, as in the kernels), scaled; the seed's mask (the fill, but an Inf
        or NaN score stays NaN, as in the kernels) and keys past ``k_lengths`` (-inf); the softmax;
        the probabilities in the values' dtype times the values, each head's output in that dtype (as
        plain torch's, the accuracy yardstick), their sum taken in float32. The values' rows past
        ``k_lengths`` are zeroed first: the GEMM multiplies them by probabilities of 0, and a padded
        row projected to Inf would make NaN. ``masked``: uint8 (Bm, Lq, Lk), Bm in {1, B};
        ``k_lengths``: on the device."""
        batch, heads, len_q, len_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        queries = min(len_q, max(1, self.gemm_scores_elements // (heads * len_k)))
        examples = max(1, self.gemm_scores_elements // (heads * len_q * len_k)) if queries == len_q else 1
        if k_lengths is not None:
            v = self._zero_padded_rows(v, k_lengths, axis=2)
        outs, probs = [], []
        for start in range(0, batch, examples):
            ex = slice(start, start + examples)
            mask_rows = None if masked is None else masked[ex if masked.shape[0] > 1 else slice(None)]
            lengths = None if k_lengths is None else k_lengths[ex]
            pieces = [self._gemm_attention_piece(q[ex, :, rows], k[ex], v[ex], scale,
                                                 None if masked is None else mask_rows[:, rows], lengths,
                                                 need_weights, sum_heads)
                      for rows in (slice(first, first + queries) for first in range(0, len_q, queries))]
            outs.append(self._joined([out for out, _ in pieces], axis=-2))
            probs.append(self._joined([p for _, p in pieces], axis=2) if need_weights else None)
        out = self._zero_padded_rows(self._joined(outs, axis=0), q_lengths, axis=outs[0].ndim - 2)
        if not need_weights:
            return out, None
        return out, self._zero_padded_rows(self._joined(probs, axis=0), q_lengths, axis=2)

    def _gemm_attention_piece(self, q, k, v, scale, masked, k_lengths, need_weights, sum_heads):
        """One piece of ``_gemm_attention``: (output, probabilities or None) of these examples and queries."""
        xp, float32 = self.xp, self.float32
        scores = xp.matmul(self.cast(q, float32), self.cast(k, float32).swapaxes(-1, -2))  # keys broadcast over heads
        if scale != 1.0:  # the fusions' scale is in their folded weights
            scores *= scale
        if masked is not None:  # in place: the factors are (b, 1, lq, Lk), the scores H times that
            keep = self.cast(masked == 0, float32)[:, None]
            scores *= keep  # 0 where masked, but an Inf or NaN score stays NaN
            scores += (1 - keep) * self.kernel.MASK_FILL
        if k_lengths is not None:
            key_pad = self._positions(k.shape[2])[None, :] >= k_lengths[:, None]
            scores = xp.where(key_pad[:, None, None, :], float("-inf"), scores)
        scores -= xp.amax(scores, axis=-1, keepdims=True)  # every row has a key: a finite maximum
        probs = xp.exp(scores, out=scores)
        probs /= probs.sum(-1)[..., None]
        probs = self.cast(probs, v.dtype)
        out = xp.matmul(probs, v)
        if sum_heads:
            out = self.cast(self.cast(out, float32).sum(1), q.dtype)
        return out, self.cast(probs, q.dtype) if need_weights else None

    def _joined(self, parts: list, axis: int):
        return parts[0] if len(parts) == 1 else self.xp.concatenate(parts, axis=axis)

    def _probabilities(self, q, k, lse, scale, masked, k_lengths, q_lengths):
        """The attention probabilities (B, H, Lq, Lk) in q's dtype, rows past ``q_lengths`` zero, rebuilt
        from the kernel's lse."""
        xp = self.xp
        scores = xp.matmul(self.cast(q, self.float32), self.cast(k, self.float32).swapaxes(-1, -2)) * scale
        if masked is not None:
            scores = xp.where(masked[:, None] != 0, self.kernel.MASK_FILL, scores)
        if k_lengths is not None:
            key_pad = self._positions(k.shape[2])[None, :] >= k_lengths[:, None]
            scores = xp.where(key_pad[:, None, None, :], float("-inf"), scores)
        probs = xp.exp(scores - lse[..., None])
        # Renormalising costs little and mends fully masked rows, whose lse (about -1e9) float32
        # cannot hold to the precision that exp(scores - lse) needs.
        return self._zero_padded_rows(self.cast(probs / probs.sum(-1)[..., None], q.dtype), q_lengths, axis=2)

    def _kernel_options(self) -> dict:
        """Keyword arguments for ``kernel.attention`` beyond the contract's (none here)."""
        return {}

    def _matmul(self, a, b):
        """a @ b for the projections: the array library's GEMM here."""
        return self.xp.matmul(a, b)

    def _project(self, x, weights: DeviceFoldedWeights, parts: str):
        batch, length, width = x.shape
        flat = self._matmul(x.reshape(batch * length, width), weights.columns(parts))
        flat = flat.reshape(batch, length, len(parts), weights.heads, weights.width)
        return list(self.xp.moveaxis(flat, (2, 3), (0, 2)))  # (B, H, L, D) views, in two ops not 2 per part

    def _attend(self, q_folded, x_keys, v_folded, masked, q_lengths, k_lengths, need_weights):
        return self._attention(
            q_folded, x_keys[:, None], v_folded, scale=1.0, masked=masked, q_lengths=q_lengths, k_lengths=k_lengths,
            need_weights=need_weights, sum_heads=True,
        )

    def _cosine_similarity(self, a, b):
        """(B, La, D) x (B, Lb, D) -> (B, La, Lb) in float32; a zero row gives 0, never NaN.

        Each row is divided by its largest magnitude first, so that its squares neither overflow nor
        underflow (``numpy_backend.cosine_similarity``)."""
        xp = self.xp

        def unit_rows(x):
            x = self.cast(x, self.float32)
            top = xp.amax(xp.abs(x), axis=-1, keepdims=True)
            x = x / (top + (top == 0))  # a zero row stays zero
            norm = xp.sqrt((x * x).sum(-1))[..., None]
            return x / (norm + (norm == 0))

        return self.xp.matmul(unit_rows(a), unit_rows(b).swapaxes(-1, -2))

    # --- the seed's operations ---------------------------------------------------------------------

    def fuse(self, xs, xt, weights, *, s_lengths, t_lengths, **kwargs):
        s_lengths, t_lengths = self._on_device(s_lengths, t_lengths)
        return super().fuse(xs, xt, weights, s_lengths=s_lengths, t_lengths=t_lengths, **kwargs)

    def multi_head_attention(self, xq, xk, xv, weights, *, q_lengths, k_lengths, **kwargs):
        q_lengths, k_lengths = self._on_device(q_lengths, k_lengths)
        return super().multi_head_attention(xq, xk, xv, weights, q_lengths=q_lengths, k_lengths=k_lengths, **kwargs)

    def scaled_dot_product_attention(self, q, k, v, *, scale, masked, q_lengths, k_lengths, need_weights):
        q_lengths, k_lengths = self._on_device(q_lengths, k_lengths)
        out, probs = self._attention(
            q[:, None], k[:, None], v[:, None], scale=scale, masked=masked, q_lengths=q_lengths, k_lengths=k_lengths,
            need_weights=need_weights,
        )
        return out[:, 0], None if probs is None else probs[:, 0]
