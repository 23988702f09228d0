"""Triton backend: projections as torch GEMMs (or ``kernels/projection.py`` for TF32), attention in the
kernels of ``kernels/attention.py``; the fusion itself is ``device_common.DeviceFusion`` on torch tensors.
Fusions of small examples (``kernels/small_fusion.py``'s ``fits``: the seed's demo) run in one launch
instead, projections, both directions, the probabilities and the similarities (when asked) included, and
so do their multi-head attentions (``kernels/small_attention.py``).
Fusions without mask or probabilities attend elsewhere where that was faster: heads wider than 256 over
short sequences as two cuBLAS GEMMs around ``kernels/softmax_heads.py``, other float32 heads and 16-bit
heads 129 to 256 wide over long sequences (and ``scaled_dot_product_attention`` likewise) in torch's SDPA
(``TritonBackend._attention``).

Arrays: torch tensors stay torch (results on the caller's device), CuPy arrays cross through DLPack
without a copy (results are CuPy), NumPy arrays are copied over and back. With ``TRITON_INTERPRET=1``
and no GPU, the same code runs under Triton's interpreter on torch CPU tensors (for tests; slow).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

from .._checks import check_no_grad, host_array, transferable_host_array
from .._optional import require
from ..folding import fold_magnitudes, fold_weights
from .device_common import DeviceFoldedWeights, DeviceFusion

_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float32"}


def interpreter_mode() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(DeviceFusion):
    """Runs the fusion on a CUDA GPU with Triton kernels (or under Triton's interpreter on the CPU)."""

    name = "triton"
    kernel_takes_query_lengths = True
    probabilities_need_lse = False  # kernels/probabilities.py keeps each row's maximum and sum instead
    #: Fusions and multi-head attentions of small examples run in one launch (``kernels/small_fusion.py``,
    #: ``kernels/small_attention.py``) up to this many FLOPs (their ``flops``): where the multi-launch
    #: path's fixed cost (W1 on an H200: 0.367 ms, of which 0.031 kernels) outweighs the arithmetic even at
    #: 10 TFLOP/s. Larger batches of small examples keep the measured path (cuBLAS projections) until
    #: ``bench.small_fusion`` has timed both; it sets this to 0 (never) and to infinity (whenever the
    #: examples fit).
    one_launch_flops = 1e9
    #: 16-bit heads 129 to 256 wide attend through torch's SDPA (flash attention) where queries and keys
    #: are at least this many, no mask, no probabilities and no key lengths (flash attention takes no
    #: mask). Timed on an H200 at W4's shapes only (B = 4, L = 4096, D = 256, H = 4, bfloat16, one
    #: direction, heads summed: SDPA 0.473 ms, the fused kernel 0.579, whose heads-summed launch spills
    #: 1.1 KB of registers at that width); at W2's (L = 256, D = 128) the kernel won, 0.257 against 0.466.
    #: The bound between is a guess until ``bench.sweep_triton`` times its W4-1k and W4-D128 cases.
    sdpa_16bit_min_length = 2048
    #: Narrow heads' fusions that attend through SDPA project by direction (``_projects_by_direction``)
    #: from this many bytes of projections (both inputs' queries and values) on: below it the two extra
    #: GEMM launches would cost more than the memory is worth (W4 in bfloat16: 128 MiB).
    split_projections_bytes = 1 << 26

    def __init__(self):
        self.torch = self.xp = require("torch", "backend 'triton'")
        self.float32 = self.torch.float32
        require("triton", "backend 'triton'")
        if interpreter_mode():
            self.device = self.torch.device("cpu")
            # The interpreter does no bfloat16 arithmetic.
            self.dtypes = ("float64", "float32", "float16")
        elif self.torch.cuda.is_available():
            self.device = self.torch.device("cuda", self.torch.cuda.current_device())
            self.dtypes = ("float64", "float32", "float16", "bfloat16")
        else:
            raise RuntimeError(
                "backend 'triton' needs a CUDA GPU, and torch sees none; set TRITON_INTERPRET=1 before "
                "importing crossattn_gpu to run it under Triton's interpreter on the CPU (slow, for testing)"
            )
        # Imported late: TRITON_INTERPRET is read at import.
        from ..kernels import attention as kernel
        from ..kernels import (
            attention_two_pass, magnitude, probabilities, projection, small_attention, small_fusion, softmax_heads,
            unit_rows,
        )

        self.kernel, self.projection, self.softmax_heads, self.magnitude = kernel, projection, softmax_heads, magnitude
        self.unit_rows, self.probabilities = unit_rows, probabilities
        self.small_fusion, self.small_attention = small_fusion, small_attention
        self.two_pass = attention_two_pass

    @staticmethod
    def usable_by_auto(dtype: str | None = None) -> bool:
        """``auto`` takes Triton only on a real GPU, never under the (slow) interpreter, whatever the
        model's ``dtype``.

        Cheap checks first, so that ``auto`` on a machine without an NVIDIA driver never imports torch.
        """
        if interpreter_mode() or (sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia")):
            return False
        try:
            import torch
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.is_available()

    # --- arrays -----------------------------------------------------------------------------------

    def caller_kind(self, x):
        torch = self.torch
        if isinstance(x, torch.Tensor):
            return ("torch", x.device)
        if type(x).__module__.split(".")[0] == "cupy":
            return ("cupy", torch.device("cuda", x.device.id))
        return ("numpy", None)

    @staticmethod
    def results_on_host(kind) -> bool:
        tag, device = kind
        return tag == "numpy" or (tag == "torch" and device.type == "cpu")

    def native(self, x, name: str):
        """``x`` as a torch tensor on this backend's device: no copy for torch tensors and CuPy arrays on it,
        a copy for those on another GPU (a kernel launched on this device must not be handed another's
        memory), as for host arrays."""
        torch = self.torch
        if not isinstance(x, torch.Tensor) and type(x).__module__.split(".")[0] == "cupy":
            if self.device.type != "cuda":
                raise TypeError(f"{name} is a CuPy array, but backend 'triton' runs on the CPU here (interpreter)")
            x = torch.from_dlpack(x)
        if isinstance(x, torch.Tensor):
            check_no_grad(x, name)
            return x.to(self.device)
        arr = transferable_host_array(x, name)
        if not arr.flags.writeable:  # a read-only memmap, say, of which torch.from_numpy warns: copied instead
            return torch.tensor(arr, device=self.device)  # (on a GPU that is the one copy to it, as below)
        return torch.from_numpy(arr).to(self.device)

    def host(self, x, name: str) -> np.ndarray:
        if isinstance(x, self.torch.Tensor):
            return x.detach().cpu().numpy()
        if type(x).__module__.split(".")[0] == "cupy":
            return x.get()
        return host_array(x, name)

    @staticmethod
    def dtype_name(arr) -> str:
        return str(arr.dtype).replace("torch.", "")

    def all_finite(self, *arrays) -> bool:
        """One read from the device (a synchronisation) for all the arrays."""
        return math.isfinite(self._largest_magnitude(arrays).amax().item())

    def largest_magnitude(self, *arrays):
        """The largest |x| over the arrays (NaN if one holds NaN, else Inf if one holds Inf), as a
        function that reads it later on a GPU.

        The device reduces the arrays now and copies the result into pinned host memory behind an event.
        The returned function waits for that event alone, not for the work queued after it, so the
        front end queues the call's GEMMs and kernels first and reads the magnitude then: the GPU no
        longer idles from the read until the host's next launch. Under the interpreter it is at hand at
        once."""
        return self._read_later(self._largest_magnitude(arrays))

    def pending_magnitude(self, *arrays) -> "KernelMagnitude":
        """The largest magnitude of a fusion's or a multi-head attention's inputs, for ``fuse`` and
        ``multi_head_attention`` to have the one-launch kernels write (``KernelMagnitude``) instead of
        reducing the inputs with torch."""
        return KernelMagnitude(self, arrays)

    def _read_later(self, value):
        """A device tensor's largest value (a 0-d one's value), or on a GPU a function that reads it later
        (``_copy_later``); the maximum is taken on the host, NaN kept."""
        copy = self._copy_later(value)
        return (lambda: copy().amax().item()) if callable(copy) else copy.amax().item()

    def _copy_later(self, value):
        """A device tensor on the host, or on a GPU a function that returns it later: it is copied into
        pinned host memory behind an event, and the function waits for that event alone, not for the
        work queued after it."""
        torch = self.torch
        if self.device.type != "cuda":
            return value
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
        host.copy_(value, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(value.device))  # the stream the copy went to

        def read():
            copied.synchronize()
            return host

        return read

    def checks_lengths_late(self, lengths) -> bool:
        """Whether ``late_lengths`` takes these lengths: an integer tensor already on this backend's device
        (of a dtype torch compares and clamps: int8 to int64, uint8). The front end checks other lengths
        on the host, which for a GPU tensor is a read that drains the queue."""
        torch = self.torch
        return (isinstance(lengths, torch.Tensor) and lengths.device == self.device
                and lengths.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))

    def late_lengths(self, lengths: list, max_lengths: list, equal: bool):
        """Lengths checked on the device, read late (``checks_lengths_late``; shapes checked already).

        ``lengths``: (B,) tensors or None; ``max_lengths``: each one's padded length. Returns the lengths
        clamped into 1..max, as int32 (the kernels' dtype), so that no kernel reads past the padding
        whatever the values, and a verdict: True where some length was out of range or, with ``equal``,
        two examples' lengths differ (None standing for the full length). Like the magnitude
        (``largest_magnitude``), the verdict is a value, or on a GPU a function that reads it later: no
        synchronisation now."""
        torch = self.torch
        clamped, failed = [], None
        for given, top in zip(lengths, max_lengths):
            if given is None:
                clamped.append(None)
                continue
            wide = given if given.dtype in (torch.int32, torch.int64) else given.to(torch.int64)
            bounded = wide.clamp(1, top)
            outside = (bounded != wide).any()
            clamped.append(self.cast(bounded, torch.int32))
            failed = outside if failed is None else failed | outside
        if equal:
            first, second = (torch.full_like(other, top) if given is None else given
                             for given, other, top in zip(clamped, clamped[::-1], max_lengths))
            differ = (first != second).any()
            failed = differ if failed is None else failed | differ
        return clamped, self._read_later(failed)

    def _largest_magnitude(self, arrays):
        """A device tensor whose maximum is the largest |x| over the arrays, NaN if one holds NaN: one pass
        over each and no temporaries (``isfinite(x).all()`` takes several passes and launches: torch on the
        CPU 51 ms against 1.6 ms for a sum of 21M float32 values).

        Up to three arrays of 16-bit or float32 values in one launch (``kernels/magnitude.py``: per-block
        maxima, their maximum taken by the caller, on the host after the read); else torch's infinity norm
        per array and a maximum per pair (0-d), whose NaN propagates through both reductions: float64
        arrays (whose values may pass float32's range), ranks past 4. An array given twice (the keys as the
        values, ``multi_head_attention(q, k, k)``) is read once."""
        arrays = tuple({id(arr): arr for arr in arrays}.values())
        if self.magnitude.takes(arrays):
            return self.magnitude.unchecked_largest_magnitudes(arrays)
        torch = self.torch
        top = None
        for arr in arrays:
            norm = torch.linalg.vector_norm(arr, math.inf)
            top = norm if top is None else torch.maximum(top, norm)
        return top

    def to_caller(self, x, kind, dtype_name: str):
        x = self.cast(x, getattr(self.torch, dtype_name))
        tag, device = kind
        if tag == "torch":
            return x if x.device == device else x.to(device)
        if tag == "cupy":  # back on the caller's GPU, as torch tensors go back to theirs
            import cupy

            return cupy.from_dlpack((x if x.device == device else x.to(device)).contiguous())
        return x.cpu().numpy()  # not bfloat16: _checks.check_result_kind refused that before any work

    def compute_dtype(self, dtype_name: str):
        # float64 is computed in float32 on the GPU (documented in the README's backend table).
        return getattr(self.torch, _TORCH_DTYPES[dtype_name])

    @staticmethod
    def cast(x, dtype):
        # The test first: .to() of a tensor already of that dtype takes 0.75 us of host time, the test
        # 0.07 (this project's CPU); a W1 call casts 14 times, mostly to the dtype it has.
        return x if x.dtype == dtype else x.to(dtype)

    def prepare_weights(self, query, key, value, output, dtype) -> DeviceFoldedWeights:
        heads, width, _ = query.shape
        folded = fold_weights(query, key, value, output)
        on_device = self.torch.tensor(folded, dtype=dtype, device=self.device)
        return DeviceFoldedWeights(heads, width, on_device, fold_magnitudes(folded, heads, width))

    # --- primitives of DeviceFusion -----------------------------------------------------------------

    def _attention(self, q, k, v, *, scale, masked, q_lengths, k_lengths, need_weights, sum_heads=False):
        """Without mask or probabilities: heads' sums of heads wider than 256 over short sequences as two
        GEMMs (``_gemm_head_sum``); float32 attention otherwise through torch's SDPA (``_sdpa_heads``: keys
        shared by the heads expanded over them, no copy, key lengths as an additive -inf mask), where SDPA
        runs its memory-efficient kernel or the keys are few, and so 16-bit heads 129 to 256 wide over long
        sequences without key lengths, in its flash attention kernel (``_sdpa_shapes``); the heads' sum
        accumulated in float32 after it. The rest through the kernels.

        Timed on an H200 on the fusion's own call, one direction (sweeps of 2026-11-29 and 2026-11-30):
        W3 (D = 1280, L = 256) in bfloat16 as GEMMs 0.34 ms, against 0.75 for the two-pass operator and
        1.73 for SDPA; in float32 as GEMMs 3.45 ms, SDPA 3.86, the two-pass operator 8.6 (tf32x3 4.6).
        W2 (D = 128) in float32: SDPA 1.73 ms, GEMMs 1.78, the fused kernel 4.5 (tf32x3, its best tiles:
        2.1); in bfloat16 the fused kernel 0.26, SDPA 0.47, GEMMs 0.50. W4 (D = 256, L = 4096) in bfloat16:
        SDPA 0.47, the fused kernel 0.58, but SDPA's per-head outputs would lift the fusion's peak memory
        past torch's (W4's target) unless each direction is projected just before its attention
        (``_projects_by_direction``). In float32, whole fusions of 2026-11-30 (run 2) put torch's SDPA far
        ahead of the fused kernel where the keys are many: W4 14.0 ms for torch's (its memory-efficient
        kernel, float32 as three TF32 products, at ~44 TFLOP/s), 34.9 for the kernel (17.8 in tf32x3);
        W5 (ragged, D = 128, L = 256) 7.3 against 11.7 (6.7). SDPA takes no mask with the seed's fill,
        hence the kernels for masks.
        """
        if masked is None and not need_weights:
            if sum_heads and self._gemm_route(q, k, v):
                return self._gemm_head_sum(q, k, v, scale, q_lengths, k_lengths), None
            sdpa = self._sdpa_shapes(q.dtype, max(q.shape[3], v.shape[3]), q.shape[2], k.shape[2])
            out = self._sdpa_heads(q, k, v, scale, k_lengths) if sdpa else None
            if out is not None:
                out = out.sum(1) if sum_heads else out
                return self._zero_padded_rows(out, q_lengths, axis=out.ndim - 2), None
        return super()._attention(q, k, v, scale=scale, masked=masked, q_lengths=q_lengths, k_lengths=k_lengths,
                                  need_weights=need_weights, sum_heads=sum_heads)

    def _sdpa_heads(self, q, k, v, scale, k_lengths):
        """softmax(scale * Q_h K_h^T) V_h (B, H, Lq, Dv) through torch's SDPA, K and V broadcast over the
        heads when they have one, keys past ``k_lengths`` masked by an additive -inf, or None where SDPA
        would not bound its memory or was not timed: in float32, where it cannot run its memory-efficient
        kernel (on a CUDA GPU, head widths multiples of 4; never on the CPU) and the keys are more than
        twice as many as the values are wide (there torch falls back to its math path, whose (B, H, Lq, Lk)
        float32 scores then take at most twice the outputs' memory; longer sequences keep the kernels, whose
        memory does not grow with Lk); in 16 bits, with key lengths or where it cannot run flash attention
        (the kernel that was timed against the fused one).

        SDPA multiplies the padding, and finite padding can still overflow: a padded value row's projection
        to Inf (times a probability of 0, NaN) or a padded key's score to Inf (plus the -inf mask, NaN), so
        the callers zero their inputs' padded rows first (``_zeroes_padding_first``,
        ``scaled_dot_product_attention``). The fusions' per-head outputs, (B, H, Lq, Dv) in float32 before
        their sum, take what the queries' projection takes."""
        torch = self.torch
        keys, v = k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)
        if k_lengths is None:
            if not self._sdpa_takes(q, keys, v):
                return None
            return torch.nn.functional.scaled_dot_product_attention(q, keys, v, scale=scale)
        if q.dtype != self.float32:
            return None  # before the mask is built: it would be thrown away
        padded = self._positions(k.shape[2])[None, :] >= self._device_lengths(k_lengths)[:, None]  # (B, Lk)
        bias = torch.zeros(padded.shape, dtype=q.dtype, device=q.device).masked_fill_(padded, float("-inf"))
        bias = bias[:, None, None, :]  # broadcast over heads and queries
        if k.shape[2] > 2 * v.shape[3] and not self._efficient_sdpa(q, keys, v, bias):
            return None
        return torch.nn.functional.scaled_dot_product_attention(q, keys, v, attn_mask=bias, scale=scale)

    def _sdpa_takes(self, q, k, v) -> bool:
        """``_sdpa_heads``'s verdict on (B, H, L, D) heads without key lengths: in 16 bits where SDPA can
        run flash attention, in float32 where it runs its memory-efficient kernel or the keys are few."""
        if q.dtype != self.float32:
            return self._flash_sdpa(q, k, v)
        return k.shape[2] <= 2 * v.shape[3] or self._efficient_sdpa(q, k, v, None)

    def _sdpa_shapes(self, dtype, width: int, len_q: int, len_k: int) -> bool:
        """Whether attention of heads ``width`` wide (the wider of queries and values) over ``len_q``
        queries and ``len_k`` keys goes to SDPA when it has no mask or probabilities (``_sdpa_heads`` has
        the last word): float32 always; 16 bits over long sequences (``sdpa_16bit_min_length``) for heads
        wider than W2's 128 (where the kernel won), up to the 256 that the fused kernel holds."""
        if dtype == self.float32:
            return True
        return 128 < width <= self.two_pass.FUSED_ONE_CHUNK[2] and min(len_q, len_k) >= self.sdpa_16bit_min_length

    def _sdpa_params(self, q, k, v, bias):
        return self.torch.backends.cuda.SDPAParams(q, k, v, bias, 0.0, False, False)  # no dropout, not causal, no GQA

    def _efficient_sdpa(self, q, k, v, bias) -> bool:
        """Whether torch's SDPA runs these arguments in its memory-efficient kernel (as torch decides)."""
        if q.device.type != "cuda":
            return False
        return self.torch.backends.cuda.can_use_efficient_attention(self._sdpa_params(q, k, v, bias), False)

    def _flash_sdpa(self, q, k, v) -> bool:
        """Whether torch's SDPA can run these arguments (no mask) in its flash attention kernel."""
        if q.device.type != "cuda":
            return False
        return self.torch.backends.cuda.can_use_flash_attention(self._sdpa_params(q, k, v, None), False)

    def _wide_heads(self, dtype, width: int) -> bool:
        """Heads wider than 256 (the widest the fused kernel holds in 16 bits) in a dtype the GEMM route
        takes: float32, or 16 bits, whose GEMMs give float32 results (torch.bmm's out_dtype)."""
        return width > self.two_pass.FUSED_ONE_CHUNK[2] and dtype in (self.float32, self.torch.float16,
                                                                      self.torch.bfloat16)

    def _gemm_route(self, q, k, v) -> bool:
        """Wide heads (``_wide_heads``) where the two-pass operator would run (keys no more than the head
        width), with queries no more than the head width either, so that the float32 scores (B, H, Lq, Lk)
        take no more memory than the values would in float32 (twice theirs in 16 bits); keys shared by the
        heads; and queries and values laid out (B, L, H, D) in memory (``_project``), so that every
        head's rows form one matrix per example."""
        batch, heads, len_q, width = q.shape
        len_k = k.shape[2]
        return (self._wide_heads(q.dtype, width) and k.shape[1] == 1 and len_q <= v.shape[3]
                and self.two_pass.preferred(len_q, len_k, width, v.shape[3], q.element_size())
                and self.softmax_heads.fits(heads, len_k)
                and _heads_within_rows(q) and _heads_within_rows(v))

    def _gemm_head_sum(self, q, k, v, scale, q_lengths=None, k_lengths=None):
        """sum_h softmax(scale * Q_h K^T) V_h as two batched GEMMs, for wide heads over short sequences.

        Per example, the queries of every head as rows (q, h) against the shared keys give the float32
        scores S (Lq x H, Lk) in one GEMM; ``softmax_heads`` turns them into P (Lq, Lk x H) in the values'
        dtype; P times the values as rows (k, h), (Lk x H, Dv), is the heads' sum, taken in the GEMM's
        float32 accumulation. cuBLAS's float32 GEMMs, like the IEEE projections', follow torch's
        process-wide TF32 setting. W3 on an H200, one direction: bfloat16 0.34 ms, float32 3.45.

        Ragged batches: P is 0 for keys past the length and for queries past theirs (rows of zeros out).
        The GEMMs multiply the padding all the same, so the padded value rows must be finite: the fusions
        zero their inputs' padded rows first (``_fuse_block``)."""
        torch = self.torch
        batch, heads, len_q, width = q.shape
        len_k, width_v = k.shape[2], v.shape[3]
        rows_q = q.transpose(1, 2).reshape(batch, len_q * heads, width)  # views (_heads_within_rows)
        rows_v = v.transpose(1, 2).reshape(batch, len_k * heads, width_v)
        keys_t = k[:, 0].transpose(1, 2)
        if q.dtype != torch.float32 and q.device.type == "cuda":
            scores = torch.bmm(rows_q, keys_t, out_dtype=torch.float32)
        else:  # float32 inputs, or the interpreter's CPU, which has no 16-bit GEMM with float32 results
            scores = torch.bmm(rows_q.float(), keys_t.float())
        probs = self.softmax_heads.softmax_heads(scores.view(batch, len_q, heads, len_k), scale=scale,
                                                 out_dtype=v.dtype, k_lengths=k_lengths, q_lengths=q_lengths,
                                                 lengths_checked=True)
        return torch.bmm(probs.view(batch, len_q, len_k * heads), rows_v)

    def _zeroes_padding_first(self, dtype, weights: DeviceFoldedWeights, masked, need_weights) -> bool:
        """Whether a block's attention may take the GEMM route (wide heads, no mask, no probabilities) or
        SDPA's (float32, no mask, no probabilities), which multiply the padding: then its inputs' padded
        rows are zeroed before the projections, so that no padded row overflows into an Inf that a
        probability of 0, or SDPA's -inf mask, makes NaN (a float16 projection of large padding can
        overflow, and so can float32 products of padding near float32's largest value, which the input
        check passes). One pass over each input, a fraction of a projection."""
        sdpa_or_gemms = dtype == self.float32 or self._wide_heads(dtype, weights.width)
        return masked is None and not need_weights and sdpa_or_gemms

    def _projects_by_direction(self, xs, xt, weights: DeviceFoldedWeights, masked, need_weights) -> bool:
        """Wide heads project queries and values in GEMMs of their own anyway (``_project``), so each
        direction's come just before its attention at no cost, and half the projections' memory is held
        at a time. Narrow heads do so where their attention goes to SDPA (no mask or probabilities,
        ``_sdpa_shapes``) and the projections are large (``split_projections_bytes``): SDPA holds a
        direction's heads' outputs before their sum, which would lift W4's peak in bfloat16 from the 144
        MiB of all four projections (128) and both outputs to 176, past torch SDPA's 144; by direction two
        projections (64 MiB), the heads' outputs (32) and the outputs (16), ~112. Two more GEMM launches."""
        if self._wide_heads(xs.dtype, weights.width):
            return True
        hd = weights.heads * weights.width
        projections = 2 * hd * (xs.shape[0] * xs.shape[1] + xt.shape[0] * xt.shape[1]) * xs.element_size()
        return (masked is None and not need_weights and projections >= self.split_projections_bytes
                and self._sdpa_shapes(xs.dtype, weights.width, xs.shape[1], xt.shape[1]))

    def _fuse_block(self, xs, xt, weights, *, masked, s_lengths, t_lengths, need_weights, need_similarity,
                    magnitude=None):
        if self._fuses_in_one_launch(xs, xt, weights, need_similarity):
            launch = self._small_fusion(xs, xt, weights, need_weights, need_similarity)
            return self._one_launch_fusion(launch, xs, xt, masked, s_lengths, t_lengths, magnitude)
        if self._zeroes_padding_first(xs.dtype, weights, masked, need_weights):
            xs, xt = self._zero_padded_rows(xs, s_lengths, axis=1), self._zero_padded_rows(xt, t_lengths, axis=1)
        return super()._fuse_block(xs, xt, weights, masked=masked, s_lengths=s_lengths, t_lengths=t_lengths,
                                   need_weights=need_weights, need_similarity=need_similarity, magnitude=magnitude)

    def fusion_plan(self, xs, xt, weights: DeviceFoldedWeights, *, need_weights: bool, need_similarity: bool):
        """``fuse``'s (``FoldedFusion.fusion_plan``), and for examples that take the one launch
        (``_fuses_in_one_launch``) that launch checked and configured once (``small_fusion.SmallFusion``)."""
        blocks = self._example_blocks(xs.shape[0], max(xs.shape[1], xt.shape[1]), weights)
        if len(blocks) != 1 or not self._fuses_in_one_launch(xs, xt, weights, need_similarity):
            return super().fusion_plan(xs, xt, weights, need_weights=need_weights, need_similarity=need_similarity)
        launch = self._small_fusion(xs, xt, weights, need_weights, need_similarity)

        def run(xs, xt, magnitude):  # inputs of the plan's layout (its key): the launch checks nothing again
            buffer = None if magnitude is None else magnitude.kernel_buffer(xs, xt)
            return self._launched_fusion(xs, xt, launch.unchecked(xs, xt, buffer), None, None)

        return run

    def attention_plan(self, xq, xk, xv, weights: DeviceFoldedWeights, *, need_weights: bool):
        """``multi_head_attention``'s (``FoldedFusion.attention_plan``), and for examples that take the one
        launch (``_attends_in_one_launch``) that launch checked and configured once
        (``small_attention.SmallAttention``)."""
        blocks = self._example_blocks(xq.shape[0], max(xq.shape[1], xk.shape[1]), weights)
        if len(blocks) != 1 or not self._attends_in_one_launch(xq, xk, weights):
            return super().attention_plan(xq, xk, xv, weights, need_weights=need_weights)
        launch = self._small_attention(xq, xk, xv, weights, need_weights)

        def run(xq, xk, xv, magnitude):  # inputs of the plan's layout (its key): the launch checks nothing again
            return launch.unchecked(xq, xk, xv, None if magnitude is None else magnitude.kernel_buffer(xq, xk, xv))

        return run

    def sdpa_plan(self, q, k, v, *, scale: float, need_weights: bool):
        """``scaled_dot_product_attention``'s (``FoldedFusion.sdpa_plan``), and where its inputs attend through
        torch's SDPA (no probabilities, ``_sdpa_shapes``, ``_sdpa_takes``) that route settled once: a planned
        call is SDPA on the inputs as one head, without the route's questions (a CUDA GPU asks torch twice)."""
        q4, k4, v4 = q[:, None], k[:, None], v[:, None]
        if need_weights or not (self._sdpa_shapes(q.dtype, max(q.shape[2], v.shape[2]), q.shape[1], k.shape[1])
                                and self._sdpa_takes(q4, k4, v4)):
            return super().sdpa_plan(q, k, v, scale=scale, need_weights=need_weights)
        functional = self.torch.nn.functional

        def run(q, k, v, magnitude):  # inputs of the plan's layout (its key)
            return functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=scale)[:, 0], None

        return run

    def plan_settings(self) -> tuple:
        """The settings a plan (``fusion_plan``, ``attention_plan``, ``sdpa_plan``) depends on besides its inputs'
        layout and weights: torch's switches of SDPA's kernels too, which ``_sdpa_takes`` asks about (0.2 us)."""
        cuda = self.torch.backends.cuda
        return self.float32_precision, self.one_launch_flops, cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled()

    def layout_key(self, x):
        """A torch tensor's layout (shape, strides, dtype, device; no grad) for the front end's plans, or
        None for anything else: host arrays and CuPy arrays take the whole path each call."""
        if type(x) is not self.torch.Tensor or x.requires_grad:
            return None
        return x.shape, x.stride(), x.dtype, x.device

    def _fuses_in_one_launch(self, xs, xt, weights: DeviceFoldedWeights, need_similarity: bool) -> bool:
        flops = self.small_fusion.flops(xs.shape[0], xs.shape[1], xt.shape[1], weights.width, weights.heads)
        return self._in_one_launch(xs, xt, flops, need_similarity)

    def _small_fusion(self, xs, xt, weights: DeviceFoldedWeights, need_weights: bool, need_similarity: bool):
        return self.small_fusion.SmallFusion(xs, xt, weights.query_value, heads=weights.heads, need_probs=need_weights,
                                             need_similarity=need_similarity, precision=self.float32_precision)

    def _one_launch_fusion(self, launch, xs, xt, masked, s_lengths, t_lengths, magnitude) -> dict:
        """``fuse``'s result from ``launch`` (``_small_fusion``'s, for xs and xt): probabilities and
        similarities as it was made to write them."""
        if masked is not None:
            masked = masked.expand(masked.shape[0], xs.shape[1], xt.shape[1])  # a view
        launched = launch(xs, xt, masked=masked, s_lengths=s_lengths, t_lengths=t_lengths, lengths_checked=True,
                          magnitudes=None if magnitude is None else magnitude.kernel_buffer(xs, xt))
        return self._launched_fusion(xs, xt, launched, s_lengths, t_lengths)

    def _launched_fusion(self, xs, xt, launched: tuple, s_lengths, t_lengths) -> dict:
        """``fuse``'s result from what a ``SmallFusion`` launch returned."""
        (fused_s, probs_st, sim_s), (fused_t, probs_ts, sim_t) = launched
        result = self._fusion_result(xs, xt, (fused_s, probs_st), (fused_t, probs_ts), s_lengths, t_lengths, None)
        if sim_s is not None:
            result.update(seq_similarity=sim_s, struct_similarity=sim_t)
        return result

    def _probabilities(self, q, k, lse, scale, masked, k_lengths, q_lengths):
        """In two launches (``kernels/probabilities.py``: the scores in float32 with each row's maximum and
        sum, then the probabilities written once in q's dtype, rows past ``q_lengths`` zero), where torch
        took about eight passes over the (B, H, Lq, Lk) scores in float32; no lse needed."""
        return self.probabilities.probabilities(q, k, scale=scale, masked=masked, k_lengths=k_lengths,
                                                q_lengths=q_lengths, precision=self.float32_precision,
                                                lengths_checked=True)

    def _input_similarity(self, x, lengths, fused):
        """Both sides' unit rows in one launch each (``kernels/unit_rows.py``, x's padded rows zero on the
        way), where torch took twelve operators a side; their product in float32 as before."""
        rows = self.unit_rows.unit_rows(x, lengths)
        return self.torch.matmul(rows, self.unit_rows.unit_rows(fused).transpose(1, 2))

    def _in_one_launch(self, x, other, flops: float, need_similarity: bool = False) -> bool:
        """Whether a call on x (B, L, D) and other (B, L', D) runs in one launch (``small_fusion``,
        ``small_attention``): small examples (``small_fusion.fits``) and at most ``one_launch_flops``. The
        probabilities and similarities, when asked, come from the same registers."""
        return (self.small_fusion.fits(x.shape[1], other.shape[1], x.shape[2], x.element_size(),
                                       self.float32_precision, need_similarity)
                and flops <= self.one_launch_flops)

    def _multi_head_attention_block(self, xq, xk, xv, weights, *, masked, q_lengths, k_lengths, need_weights,
                                    magnitude=None):
        if self._attends_in_one_launch(xq, xk, weights):
            launch = self._small_attention(xq, xk, xv, weights, need_weights)
            return self._one_launch_attention(launch, xq, xk, xv, masked, q_lengths, k_lengths, magnitude)
        if self._zeroes_padding_first(xq.dtype, weights, masked, need_weights):
            xk, xv = self._zero_padded_keys_values(xk, xv, k_lengths)
        return super()._multi_head_attention_block(xq, xk, xv, weights, masked=masked, q_lengths=q_lengths,
                                                   k_lengths=k_lengths, need_weights=need_weights, magnitude=magnitude)

    def _attends_in_one_launch(self, xq, xk, weights: DeviceFoldedWeights) -> bool:
        flops = self.small_attention.flops(xq.shape[0], xq.shape[1], xk.shape[1], weights.width, weights.heads)
        return self._in_one_launch(xq, xk, flops)

    def _small_attention(self, xq, xk, xv, weights: DeviceFoldedWeights, need_weights: bool):
        return self.small_attention.SmallAttention(xq, xk, xv, weights.query_value, heads=weights.heads,
                                                   need_probs=need_weights, precision=self.float32_precision)

    def _one_launch_attention(self, launch, xq, xk, xv, masked, q_lengths, k_lengths, magnitude):
        """``multi_head_attention``'s (output, probabilities) from ``launch`` (``_small_attention``'s, for xq,
        xk and xv)."""
        if masked is not None:
            masked = masked.expand(masked.shape[0], xq.shape[1], xk.shape[1])  # a view
        return launch(xq, xk, xv, masked=masked, q_lengths=q_lengths, k_lengths=k_lengths, lengths_checked=True,
                      magnitudes=None if magnitude is None else magnitude.kernel_buffer(xq, xk, xv))

    def scaled_dot_product_attention(self, q, k, v, *, scale, masked, q_lengths, k_lengths, need_weights):
        """float32 without mask or probabilities may attend through torch's SDPA (``_attention``), which
        multiplies the padding: the keys' and values' padded rows are zeroed first, as the fusions' are."""
        q_lengths, k_lengths = self._on_device(q_lengths, k_lengths)  # once, for the zeroing and the attention
        if masked is None and not need_weights and q.dtype == self.float32:
            k, v = self._zero_padded_keys_values(k, v, k_lengths)
        return super().scaled_dot_product_attention(q, k, v, scale=scale, masked=masked, q_lengths=q_lengths,
                                                    k_lengths=k_lengths, need_weights=need_weights)

    def _zero_padded_keys_values(self, k, v, k_lengths):
        """k and v (B, Lk, D) with their rows past ``k_lengths`` zero; one pass when v is k. The keys too:
        SDPA's -inf mask makes a padded key's Inf score NaN."""
        values_are_keys = v is k
        k = self._zero_padded_rows(k, k_lengths, axis=1)
        return k, k if values_are_keys else self._zero_padded_rows(v, k_lengths, axis=1)

    def _kernel_options(self) -> dict:
        return {"precision": self.float32_precision}

    def _project(self, x, weights: DeviceFoldedWeights, parts: str):
        """Wide heads (``_wide_heads``): queries and values in two GEMMs, each laid out (B, L, H, D), so
        that the GEMM route (``_gemm_route``) can take every head's rows as one matrix; one GEMM otherwise."""
        if parts == "qv" and self._wide_heads(x.dtype, weights.width):
            return super()._project(x, weights, "q") + super()._project(x, weights, "v")
        return super()._project(x, weights, parts)

    def _matmul(self, a, b):
        """cuBLAS (torch) for IEEE float32 and 16-bit projections; TF32 float32 projections in
        ``kernels/projection.py``, since cuBLAS takes TF32 only through a process-wide switch."""
        if self.float32_precision == "ieee" or a.dtype != self.torch.float32:
            return self.torch.matmul(a, b)
        return self.projection.matmul(a, b, precision=self.float32_precision)

    def _positions(self, length: int):
        return self.torch.arange(length, device=self.device)

    def _device_lengths(self, lengths):
        """Host lengths go over as int32, the kernels' dtype (checked: none is longer than its sequence)."""
        torch = self.torch
        if isinstance(lengths, torch.Tensor):
            return lengths.to(self.device)
        host = torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int32))
        if self.device.type != "cuda":
            return host
        # From pinned memory the copy needs no synchronisation (torch waits for a pageable one).
        return host.pin_memory().to(self.device, non_blocking=True)


def _heads_within_rows(x) -> bool:
    """Whether x (B, H, L, D) is laid out (B, L, H, D) with unit D stride: then x.transpose(1, 2) reshapes
    to (B, L x H, D) without a copy."""
    batch, heads, length, width = x.shape
    return x.stride(3) == 1 and x.stride(1) == width and x.stride(2) == heads * width


class KernelMagnitude:
    """A call's inputs' largest magnitude, written by the one-launch kernel where the call takes it.

    The front end checks the inputs for NaN and Inf, and bounds overflow, from their largest |x|
    (``_checks.check_values``). Reduced on its own (``TritonBackend.largest_magnitude``) that is a launch of
    ``kernels/magnitude.py`` (torch's two norms and a maximum before: three launches, in W1's profile of
    2026-11-30 on an H200 67 us of their operators' host time and three of the nine launches' 78), beside
    one launch for the whole fusion. ``small_fusion`` and ``small_attention`` load each input whole anyway,
    and write it for a reduction and a store an input (their ``magnitudes``).

    The backend's fuse (or multi_head_attention) either hands the kernel ``kernel_buffer(xs, xt)`` (or
    ``kernel_buffer(xq, xk, xv)``) or, on any other route, calls
    ``reduce()`` once the projections are queued: the GPU starts on them while the host queues the
    reduction, and the late read waits for the projections and the reduction, not for the attention queued
    after.
    Called (once the work is queued: ``Batch.finish_checks``), it returns the magnitude, NaN if an input
    holds NaN. From the kernel's buffer that read waits for the kernel: on the one-launch route, at most
    ``TritonBackend.one_launch_flops`` of work.
    """

    def __init__(self, backend: TritonBackend, arrays: tuple):
        self._backend, self._arrays = backend, arrays
        self._per_example = None  # the kernel's (B, 2) magnitudes
        self._read = None  # torch's reduction: its value, or on a GPU the function that reads it

    def kernel_buffer(self, *inputs):
        """(B, inputs) float32 for a one-launch kernel to write, when the inputs are the checked arrays
        themselves (the same memory, dtype and strides, with the batch axis the front end adds to (L, D)
        inputs): the kernel's magnitude is then theirs. Else None, and the inputs are reduced now."""
        if self._per_example is None and self._read is None and len(inputs) == len(self._arrays) and all(
            map(_same_values, inputs, self._arrays)
        ):
            self._per_example = self._backend.torch.empty((inputs[0].shape[0], len(inputs)),
                                                          dtype=self._backend.float32, device=inputs[0].device)
            return self._per_example
        self.reduce()
        return None

    def reduce(self) -> None:
        """Reduce the inputs with torch now, unless the kernel has their magnitude or they are reduced."""
        if self._per_example is None and self._read is None:
            self._read = self._backend._read_later(self._backend._largest_magnitude(self._arrays))

    def __call__(self) -> float:
        if self._per_example is not None:
            copy = self._backend._copy_later(self._per_example)  # the read waits for its event, not the queue
            return (copy() if callable(copy) else copy).amax().item()  # on the host; torch's amax keeps NaN
        self.reduce()
        return self._read() if callable(self._read) else self._read


def _same_values(x, arr) -> bool:
    """Whether ``x`` views the memory of ``arr`` as it is, or with a leading axis of 1 added."""
    if x is arr:  # (L, D) inputs get a view; (B, L, D) ones already in the compute dtype are the arrays
        return True
    rank = arr.ndim
    return (x.dtype == arr.dtype and x.data_ptr() == arr.data_ptr() and x.numel() == arr.numel()
            and tuple(x.shape[-rank:]) == tuple(arr.shape) and x.stride()[-rank:] == arr.stride())
