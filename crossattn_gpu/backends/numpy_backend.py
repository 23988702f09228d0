"""NumPy backend: the library's reference and CPU fallback.

Everything is vectorised over batch and heads, and the fusion uses the folded weights of SPEC
section 4 (``crossattn_gpu.folding``): one GEMM per input gives every head's queries and values, the
keys are the raw inputs shared by all heads, and the output is a sum over heads.

Scores are built transposed, (Lk, Lq) per head, so the softmax's max and sum run down columns,
which NumPy vectorises (the max 2.3x faster than along rows). Together the folding and the
transposed scores took the float32 fusion of B=64, L=256, D=128, H=4 from 270 ms to 162 ms on this
project's 2-core CPU. Work runs on one thread per core, each with a single-threaded BLAS (the
attention GEMMs are too small for BLAS's own threads): attention 76 ms -> 48 ms there. A large batch
is fused in blocks of a few examples, each on one worker from its projections to its outputs
(``EXAMPLE_BLOCK_ELEMENTS``): 159 -> 132 ms on the fusion above, and the projections' memory bounded.

The score tensor is the only quadratic buffer; it is built for a chunk of the batch (or of one long
example's queries) at a time, so that memory stays bounded (``SCORE_CHUNK_ELEMENTS``) whatever B and
L are. Intermediates of 64 KiB to 4 MiB (projections, the heads' outputs, chunks of scores) go into
buffers each thread keeps for its next call (``SCRATCH_BYTES``: a few of them a thread, freed when the
thread ends, as onnxruntime's arena keeps its largest run's memory), which spares them the page faults
of fresh memory: a lone example of L = 200, D = 128, H = 4 fused 1.4x faster, call after call.

Semantics (SPEC section 1): where the seed's ``mask`` is 0 the scaled score becomes -1e9 (so a fully
masked row is uniform); keys past an example's length get exactly zero weight (their score is
-inf), and query rows past an example's length come out as zeros.
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .._checks import host_array, is_device_array, is_torch_tensor, numpy_dtype_name
from .._overflow import StageDtypes, narrower
from .._threads import cpu_count, run_in_parallel
from ..folding import FoldMagnitudes, fold_magnitudes, fold_weights
from .fusion import FoldedFusion

#: The seed's fill value for masked scores (finite, so a fully masked row is uniform).
MASK_FILL = -1e9

#: Upper bound on the elements of one chunk of the score tensor. 2**20 float32 scores (4 MiB) stay
#: in cache between the passes of the softmax: 162 ms against 207 ms with 2**24 (the fusion above).
SCORE_CHUNK_ELEMENTS = 1 << 20

#: Fewest rows a worker's block of a projection GEMM takes: below that, handing blocks to threads costs
#: more than it saves (W1 0.33 -> 0.079 ms with it).
MIN_BLOCK_ROWS = 512

#: Fewest queries in a chunk of one long example: narrower blocks make the attention GEMMs too thin
#: (B=1, L=2048, D=128, H=16 on this project's CPU: 578 ms with 32-query blocks, 473 ms with 128; whole
#: examples, before query blocks, took 498 ms and 337 MiB against 113).
MIN_QUERY_BLOCK = 128


#: A batch whose projections (B x L x 2*H*D elements per input) pass this bound is fused in blocks of
#: whole examples, each block on one worker from its projections to its outputs, so that a block's
#: intermediates stay small and on one core. This project's 2-core CPU, float32 fusion, one block
#: against blocks of 2**19 elements (alternating, medians): B=64, L=256, D=128, H=4 (W2c) 158.6 -> 131.8
#: ms; B=4, L=256, D=1280, H=8 (W3c) 559.6 -> 547.6 ms; B=64, L=120, D=1280, H=8 5111 -> 3913 ms and
#: 1575 -> 280 MiB traced; B=256, L=100, D=64, H=2 42.9 -> 31.3 ms. Blocks of 2**20 and 2**22 elements
#: were slower on W2c (136.3, 150.0 ms against 131.7).
EXAMPLE_BLOCK_ELEMENTS = 1 << 19

#: Fewest rows of each input in such a block, which keeps its projection GEMMs from getting thin
#: (B=64, L=120, D=1280 above: blocks of at least 1024 rows 4057 ms, 512 3921, 256 3842, 128 3814).
MIN_EXAMPLE_BLOCK_ROWS = 256


#: Intermediates up to this size (the projections, the heads' outputs, a chunk of scores) are written
#: into buffers each thread keeps between calls, instead of fresh arrays. glibc's malloc hands large
#: freed arrays back to the system, so a call whose results were dropped before the next (a loop that
#: writes them away) got fresh pages for each one's intermediates, faulted in on first touch, often by
#: two threads at once (~1.5 us a 4 KiB page on this project's CPU): two 400 x 128 by 128 x 1024
#: float32 GEMMs into fresh outputs took 2.07 ms, into the same outputs again 0.92 ms. Larger arrays are
#: left to malloc: NumPy asks for huge pages for arrays of 4 MiB and more, and keeping them gained
#: nothing at D = 1280 (glibc told to keep all freed memory: B = 1, L = 120, H = 8 62-66 ms either way).
SCRATCH_BYTES = 1 << 22

#: ... and smaller ones too, which malloc keeps in memory it holds (its threshold for handing arrays
#: back starts at 128 KiB): looking buffers up costs more than their pages (with every intermediate in
#: a buffer, W1 took 93 us instead of 72).
SCRATCH_MIN_BYTES = 1 << 16

_scratch_buffers = threading.local()


def _scratch(name: str, shape: tuple, dtype: np.dtype) -> np.ndarray | None:
    """An uninitialised array for an intermediate that never leaves this module, in the calling
    thread's buffer ``name`` (grown as needed, kept for the thread's next call); None for a size
    outside the buffers' range, to be allocated as usual. Two arrays in use at once in one thread need
    two names."""
    size = dtype.itemsize * math.prod(shape)
    if not SCRATCH_MIN_BYTES <= size <= SCRATCH_BYTES:
        return None
    buffers = _scratch_buffers.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.size < size:
        buffer = buffers[name] = np.empty(size, np.uint8)
    return buffer[:size].view(dtype).reshape(shape)


def _product(name: str, a: np.ndarray, b: np.ndarray, shape: tuple) -> np.ndarray:
    """``a @ b`` (of shape ``shape``) in scratch buffer ``name``, or in a new array (see ``_scratch``)."""
    out = _scratch(name, shape, np.result_type(a, b))
    return np.matmul(a, b) if out is None else np.matmul(a, b, out=out)


@dataclass(frozen=True)
class FoldedWeights:
    """The folded weights (``crossattn_gpu.folding``) in the compute dtype."""

    heads: int
    width: int
    query_value: np.ndarray  # (D, 2*H*D): [A_0 .. A_H-1 | U_0 .. U_H-1]
    magnitudes: FoldMagnitudes  # of the float64 fold, for the overflow bounds

    @classmethod
    def build(cls, query, key, value, output, dtype) -> "FoldedWeights":
        heads, width, _ = query.shape
        folded = fold_weights(query, key, value, output)
        with np.errstate(over="ignore"):  # past the dtype: the front end names it (check_weights)
            cast = folded.astype(dtype)
        return cls(heads, width, cast, fold_magnitudes(folded, heads, width))

    def columns(self, part: str) -> np.ndarray:
        """The (D, H*D) block for part 'q' (the A_h) or 'v' (the U_h), or (D, 2*H*D) for 'qv'."""
        hd = self.heads * self.width
        return {"q": self.query_value[:, :hd], "v": self.query_value[:, hd:], "qv": self.query_value}[part]


def _chunks(batch: int, heads: int, len_q: int, len_k: int) -> list[tuple[slice, slice]]:
    """(examples, queries) blocks whose scores, b x H x Lk x lq, hold at most ``SCORE_CHUNK_ELEMENTS``:
    whole examples while one fits, else blocks of one example's queries (the softmax runs down each
    query's column, so query blocks are independent) of at least ``MIN_QUERY_BLOCK`` queries."""
    per_example = heads * len_q * len_k
    if per_example <= SCORE_CHUNK_ELEMENTS:
        step = min(batch, SCORE_CHUNK_ELEMENTS // per_example)
        return [(slice(start, start + step), slice(None)) for start in range(0, batch, step)]
    cols = max(MIN_QUERY_BLOCK, SCORE_CHUNK_ELEMENTS // (heads * len_k))
    return [(slice(b, b + 1), slice(start, start + cols)) for b in range(batch) for start in range(0, len_q, cols)]


def _example_blocks(batch: int, length: int, weights: "FoldedWeights") -> list[slice]:
    """Blocks of examples for a fusion of sequences up to ``length`` (see ``EXAMPLE_BLOCK_ELEMENTS``),
    a multiple of the workers in number so that none waits alone on the last. One block when the batch
    fits in one, or is too small to share evenly (3 examples on 2 workers): that block is then fused
    with the work inside it shared."""
    per_example = length * 2 * weights.heads * weights.width
    step = max(1, -(-MIN_EXAMPLE_BLOCK_ROWS // length), EXAMPLE_BLOCK_ELEMENTS // per_example)
    if step >= batch:
        return [slice(0, batch)]
    blocks, workers = -(-batch // step), cpu_count()
    count = -(-blocks // workers) * workers
    if count > batch:
        return [slice(0, batch)]
    bounds = [batch * i // count for i in range(count + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def attention(q, k, v, *, scale, masked=None, k_lengths=None, need_weights=False, need_lse=False, out=None):
    """Reference of the kernel contract (SPEC section 3).

    Args:
        q: (B, H, Lq, Dk); k: (B, Hk, Lk, Dk); v: (B, Hv, Lk, Dv), with Hk and Hv each 1 or H. Any
            strides (BLAS takes transposed operands as they are).
        scale: multiplies the scores.
        masked: bool, broadcastable to (B, Lq, Lk): True where the seed's mask is 0 (score -> -1e9).
        k_lengths: int (B,): keys at positions >= k_lengths[b] get zero weight.
        need_weights: also return the probabilities (B, H, Lq, Lk).
        need_lse: also return the row log-sum-exp (B, H, Lq) of the scaled, masked scores.
        out: where to write O (a new array if None).

    Returns:
        (O, lse or None, weights or None), O of shape (B, H, Lq, Dv) in the dtype of ``q``.

    The weights equal ``exp(scores - lse)``, but not to full precision in a fully masked row: its lse
    is -1e9 + log(Lk), which float64 holds to ~1e-7 relative and float32 not at all. Rebuilding
    weights there needs the row maximum and the sum kept apart.
    """
    batch, heads, len_q, _ = q.shape
    len_k, width_v = k.shape[2], v.shape[3]
    if out is None:
        out = np.empty((batch, heads, len_q, width_v), dtype=q.dtype)
    lse = np.empty((batch, heads, len_q), dtype=q.dtype) if need_lse else None
    weights = np.empty((batch, heads, len_q, len_k), dtype=q.dtype) if need_weights else None
    if masked is not None:  # transposed like the scores and copied to that layout, once per mask: (B, 1, Lk, Lq)
        masked = np.ascontiguousarray(np.broadcast_to(masked, (masked.shape[0], len_q, len_k)).swapaxes(-1, -2))
        masked = np.broadcast_to(masked, (batch, len_k, len_q))[:, None]
    key_pad = None if k_lengths is None else np.arange(len_k) >= k_lengths[:, None]  # (B, Lk)
    small = q.dtype.itemsize * batch * heads * len_q * len_k < SCRATCH_MIN_BYTES  # no chunk's scores in scratch

    def attend_chunk(chunk: tuple[slice, slice]) -> None:
        rows, cols = chunk
        q_t = q[rows, :, cols].swapaxes(-1, -2)
        if small:
            scores_t = np.matmul(k[rows], q_t)  # (b, H, Lk, lq)
        else:
            scores_t = _product("scores", k[rows], q_t, q_t.shape[:2] + (len_k, q_t.shape[3]))
        _scale_and_fill(
            scores_t, scale, None if masked is None else masked[rows, ..., cols],
            None if key_pad is None else key_pad[rows],
        )
        col_max = scores_t.max(axis=-2, keepdims=True)  # (b, H, 1, lq)
        scores_t -= col_max
        np.exp(scores_t, out=scores_t)
        col_sum = scores_t.sum(axis=-2, keepdims=True)
        # Normalise the (lq, Dv) product instead of the (Lk, lq) weights: fewer divisions.
        block = out[rows, :, cols]
        np.matmul(scores_t.swapaxes(-1, -2), v[rows], out=block)
        block /= col_sum.swapaxes(-1, -2)
        if need_lse:
            lse[rows, :, cols] = (col_max + np.log(col_sum))[:, :, 0]
        if need_weights:
            np.divide(scores_t, col_sum, out=weights[rows, :, cols].swapaxes(-1, -2))

    run_in_parallel(attend_chunk, _chunks(batch, heads, len_q, len_k))
    return out, lse, weights


def _scale_and_fill(scores_t: np.ndarray, scale: float, masked_t, key_pad) -> None:
    """In place: scores times ``scale``, the seed's fill where ``masked_t`` (b, 1, Lk, Lq), laid out in
    that order, is True, and -inf for the keys where ``key_pad`` (b, Lk) is True.

    The fills are a multiply (by the scale, or 0 where masked) and an add (the fill, -inf, or 0), with
    the factors built once per chunk without the heads' axis. For finite scores, which the front end
    guarantees, that is exactly the replacement, and faster than ``np.copyto`` with a boolean ``where``
    (one chunk of 2**20 float32 scores on this project's CPU: mask 2.1 ms against 0.19 ms, key padding
    0.35 ms against 0.13 ms).
    """
    dtype = scores_t.dtype
    factor, bias = scale, None
    if masked_t is not None:  # casts and products: np.where with scalar choices is 20x slower here
        factor = (~masked_t).astype(dtype)
        if scale != 1.0:
            factor *= dtype.type(scale)
        bias = masked_t.astype(dtype) * dtype.type(MASK_FILL)  # -1e9 where masked, else (-)0
    if key_pad is not None:
        pad = np.where(key_pad, -np.inf, 0.0).astype(dtype)[:, None, :, None]  # small: (b, 1, Lk, 1)
        bias = pad if bias is None else bias + pad
    if masked_t is not None or scale != 1.0:  # the folded weights carry the scale already
        np.multiply(scores_t, factor, out=scores_t)
    if bias is not None:
        np.add(scores_t, bias, out=scores_t)


def _split_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """(B, L, H*D) -> a (B, H, L, D) view (no copy: matmul takes the strides as they are)."""
    batch, length, hd = x.shape
    return x.reshape(batch, length, heads, hd // heads).transpose(0, 2, 1, 3)


def _matmul_rows(a: np.ndarray, b: np.ndarray, name: str) -> np.ndarray:
    """a @ b for a large 2-D ``a``, in row blocks on the worker threads, into scratch buffer ``name``.

    Every GEMM of the backend runs on the same workers with a single-threaded BLAS: when BLAS's own
    threads run a GEMM, they then spin for a while and slow the workers' next chunks (measured:
    parallel attention 47 ms alone, 71 ms right after a GEMM on BLAS's threads).
    """
    step, shape = max(MIN_BLOCK_ROWS, -(-a.shape[0] // (4 * cpu_count()))), (a.shape[0], b.shape[1])
    if a.shape[0] <= step:
        return _product(name, a, b, shape)
    dtype = np.result_type(a, b)
    out = _scratch(name, shape, dtype)
    if out is None:
        out = np.empty(shape, dtype)

    def block(rows: slice) -> None:
        np.matmul(a[rows], b, out=out[rows])

    run_in_parallel(block, [slice(start, start + step) for start in range(0, a.shape[0], step)])
    return out


def _project(x: np.ndarray, weights: FoldedWeights, parts: str, name: str = "") -> list[np.ndarray]:
    """Every head's folded queries ('q'), values ('v') or both ('qv') of ``x`` (B, L, D), one GEMM, in
    scratch buffer ``name`` (default: named by ``parts``)."""
    batch, length, width = x.shape
    flat = _matmul_rows(x.reshape(batch * length, width), weights.columns(parts), name or f"project {parts}")
    return _parts_by_head(flat.reshape(batch, length, -1), weights, len(parts))


def _project_pair(xs: np.ndarray, xt: np.ndarray, weights: FoldedWeights) -> tuple[list, list]:
    """Both inputs' queries and values; one GEMM on their stacked rows when together they fit one block,
    where a GEMM is mostly call overhead (W1's two 10 x 64 by 64 x 256 products: 18.1 us, one on the
    20 stacked rows: 11.7 us)."""
    rows_s, rows_t = xs.shape[0] * xs.shape[1], xt.shape[0] * xt.shape[1]
    if rows_s + rows_t > MIN_BLOCK_ROWS:
        return _project(xs, weights, "qv", "project sequential"), _project(xt, weights, "qv", "project structural")
    stacked = np.concatenate([xs.reshape(rows_s, -1), xt.reshape(rows_t, -1)])
    columns = weights.columns("qv")
    flat = _product("project both", stacked, columns, (stacked.shape[0], columns.shape[1]))
    return (_parts_by_head(flat[:rows_s].reshape(*xs.shape[:2], -1), weights, 2),
            _parts_by_head(flat[rows_s:].reshape(*xt.shape[:2], -1), weights, 2))


def _parts_by_head(flat: np.ndarray, weights: FoldedWeights, count: int) -> list[np.ndarray]:
    """(B, L, count*H*D) projections -> ``count`` (B, H, L, D) views."""
    hd = weights.heads * weights.width
    return [_split_heads(flat[:, :, i * hd : (i + 1) * hd], weights.heads) for i in range(count)]


def _zero_padded_rows_in_place(x: np.ndarray, lengths, axis: int) -> None:
    """Zero the positions at or past ``lengths[b]`` along ``axis`` (1 or 2) of x, an array we own."""
    if lengths is None:
        return
    pad = np.arange(x.shape[axis]) >= lengths[:, None]  # (B, L)
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[axis] = x.shape[axis]
    np.copyto(x, 0, where=pad.reshape(shape))


def _attend(q_folded, x_keys, v_folded, masked, q_lengths, k_lengths, need_weights):
    """Multi-head attention from folded queries and values: raw keys shared by all heads, the output
    projection already inside the values, so the output is the sum of the heads' outputs."""
    heads = _scratch("heads", q_folded.shape[:3] + v_folded.shape[3:], q_folded.dtype)
    head_out, _, probs = attention(q_folded, x_keys[:, None], v_folded, scale=1.0, masked=masked,
                                   k_lengths=k_lengths, need_weights=need_weights, out=heads)
    out = head_out.sum(axis=1)
    _zero_padded_rows_in_place(out, q_lengths, axis=1)
    if probs is not None:
        _zero_padded_rows_in_place(probs, q_lengths, axis=2)
    return out, probs


def _exact_squares(x: np.ndarray, squares: np.ndarray) -> bool:
    """Whether every row's sum of squares is exact to the machine epsilon: none overflowed, none lost
    digits to underflow, and a zero sum comes from a row of zeros (as padded rows are: those rows alone
    are read again)."""
    low = x.shape[-1] * _exact_sum_per_term(x.dtype)
    if not squares.max() < np.inf:
        return False
    if squares.min() >= low:
        return True
    positive = squares > 0
    return squares.min(where=positive, initial=np.inf) >= low and not x[~positive].any()


@lru_cache(maxsize=8)
def _exact_sum_per_term(dtype: np.dtype) -> float:
    """A square below the normal range is off by less than the smallest normal number, so a sum of D
    squares is exact to the machine epsilon once it reaches D times this."""
    info = np.finfo(dtype)
    return float(info.smallest_normal / info.eps)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, La, D) x (B, Lb, D) -> (B, La, Lb) cosine similarities; a zero row gives 0, never NaN.

    Squares may overflow or underflow: float32 rows of magnitude 1e-20 lost precision to subnormal
    squares (similarities off by 5e-5), rows of 1e-30 or 1e20 came out wrong entirely, and float64
    failed the same way below 1e-154 or above 1e154. When any row's sum of squares is not exact
    (``_exact_squares``), every row is first scaled by a power of two near its largest magnitude
    (exactly, barring subnormals) and summed again. Scaling every row on every call cost W1 10 us more
    (a 90 us call) and a ragged W2c-shaped similarity 9.3 -> 12.8 ms; with the test first, the ragged
    one is unchanged and W1 pays ~5 us.
    """

    def unit_rows(x):
        squares = np.einsum("bld,bld->bl", x, x)
        if not _exact_squares(x, squares):
            _, exponent = np.frexp(np.abs(x).max(axis=-1, keepdims=True))
            x = np.ldexp(x, -exponent)
            squares = np.einsum("bld,bld->bl", x, x)
        norm = np.sqrt(squares)[..., None]
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)

    return np.matmul(unit_rows(a), unit_rows(b).swapaxes(-1, -2))


def _float16_largest_magnitude(arr: np.ndarray) -> float:
    """The largest |x| of a float16 array (NaN if it holds one, else Inf if it holds one) from its bit
    patterns: with the sign bit cleared, IEEE half magnitudes order as the integers that hold them,
    Inf is 0x7C00 and NaNs lie above it. NumPy reduces float16 in software: W2c's (64, 256, 128) input
    took 22.9 ms for a max and a min, 0.24 ms this way (this project's CPU)."""
    bits = arr.view(np.dtype(np.uint16).newbyteorder(arr.dtype.byteorder))
    return float(np.uint16(int((bits & 0x7FFF).max())).view(np.float16))


class NumpyBackend(FoldedFusion):
    """Runs on the CPU with NumPy; takes host arrays (NumPy, array-likes, torch CPU tensors) and
    returns NumPy arrays, or torch CPU tensors when the first input is one (sharing the memory of
    NumPy's results). float16 and bfloat16 (torch tensors only: NumPy has none) are computed in float32."""

    name = "numpy"
    dtypes = ("float64", "float32", "float16", "bfloat16")
    prepare_weights = FoldedWeights.build
    #: What a call of its own is worth, in FLOPs of fusion work: ``ragged.length_batches`` pads an antibody
    #: into the previous one's call while the padding adds less. Set from ``python -m bench.collection``
    #: on this project's 2-core CPU (bench/NOTES.md), not from a call's fixed cost (W1, 55-70 us, is ~2e7
    #: FLOPs here): a call of one or two mid-sized examples leaves a core idle for much of its attention
    #: (one chunk of scores), where a batch shares its examples among the workers, so padding pays up to
    #: 1e9 FLOPs (L = 200, D = 128, H = 4: 1.7 ms an example alone, 1.4-1.5 in batches of 4 or 8).
    #: 256 antibodies of L 30..400, D = 128: 888 ms with 2e6, 721 with 1e9 (a loop of calls: 759).
    call_flops = 1e9

    @staticmethod
    def usable_by_auto(dtype: str | None = None) -> bool:
        return True

    # --- arrays -----------------------------------------------------------------------------------

    def native(self, x, name: str) -> np.ndarray:
        """``x`` as a NumPy array; TypeError for device arrays (never copied silently) or non-arrays."""
        if is_device_array(x):
            raise TypeError(
                f"{name} is a {type(x).__module__}.{type(x).__name__} on a GPU, but backend '{self.name}' takes "
                "host arrays; move it to the host or use a GPU backend ('triton' or 'cupy')"
            )
        return host_array(x, name)

    host = native

    @staticmethod
    def layout_key(x):
        """A NumPy array's layout (shape, strides, dtype) for the front end's plans, or None for anything
        else (array-likes, subclasses, torch tensors take the whole path each call)."""
        if type(x) is not np.ndarray:
            return None
        return x.shape, x.strides, x.dtype

    @staticmethod
    def dtype_name(arr) -> str:
        return numpy_dtype_name(arr.dtype)

    @staticmethod
    def all_finite(*arrays) -> bool:
        return all(bool(np.isfinite(arr).all()) for arr in arrays)

    @staticmethod
    def largest_magnitude(*arrays) -> float:
        """The largest |x| over the arrays; NaN if one holds NaN, else Inf if one holds Inf. On the host
        it is at hand at once (a GPU backend may hand back a function that reads it later). A max and a
        min, no temporaries: W2c's 2M-element inputs 0.16 ms each in float32 (``isfinite(x).all()``: 0.15)."""
        tops = []
        for arr in arrays:
            if arr.dtype.char == "e":  # float16
                top = _float16_largest_magnitude(arr)
                if top != top:
                    return top
                tops.append(top)
                continue
            high, low = float(arr.max()), float(arr.min())
            if high != high:  # NaN: the max and the min of an array holding one are both NaN
                return high
            tops += (high, -low)
        return max(tops)

    @staticmethod
    def caller_kind(x) -> str:
        return "torch" if is_torch_tensor(x) else "numpy"

    @staticmethod
    def results_on_host(kind) -> bool:
        """Whether results handed back in ``kind`` live in host memory (``_memory`` checks they fit)."""
        return True

    @staticmethod
    def to_caller(x, kind: str, dtype_name: str):
        if kind == "numpy":
            return x.astype(dtype_name, copy=False)
        torch = sys.modules["torch"]  # loaded: the first input is a tensor
        if dtype_name == "bfloat16":
            return torch.from_numpy(x).to(torch.bfloat16)
        return torch.from_numpy(x.astype(dtype_name, copy=False))

    @staticmethod
    def compute_dtype(dtype_name: str) -> np.dtype:
        # float16 is stored, not computed: it accumulates in float32 like the GPU backends.
        return np.dtype(np.float64 if dtype_name == "float64" else np.float32)

    def stage_dtypes(self, dtype_name: str) -> StageDtypes:
        """Every stage in the compute dtype; the results then cast to ``dtype_name``."""
        compute = numpy_dtype_name(self.compute_dtype(dtype_name))
        return StageDtypes(compute, compute, narrower(compute, dtype_name))

    @staticmethod
    def cast(x, dtype):
        return x.astype(dtype, copy=False)

    # --- the seed's operations ---------------------------------------------------------------------

    def scaled_dot_product_attention(self, q, k, v, *, scale, masked, q_lengths, k_lengths, need_weights):
        out, _, probs = attention(
            q[:, None], k[:, None], v[:, None], scale=scale, masked=masked, k_lengths=k_lengths, need_weights=need_weights
        )
        out = out[:, 0]
        _zero_padded_rows_in_place(out, q_lengths, axis=1)
        if probs is not None:
            probs = probs[:, 0]
            _zero_padded_rows_in_place(probs, q_lengths, axis=1)
        return out, probs

    # --- blocks of examples (FoldedFusion) ---------------------------------------------------------

    _example_blocks = staticmethod(_example_blocks)

    @staticmethod
    def _run_blocks(run_block, count: int) -> None:
        run_in_parallel(run_block, list(range(count)))

    _concatenate = staticmethod(np.concatenate)

    # --- building blocks of FoldedFusion -----------------------------------------------------------

    _project = staticmethod(_project)
    _project_pair = staticmethod(_project_pair)
    _attend = staticmethod(_attend)
    _cosine_similarity = staticmethod(cosine_similarity)

    @staticmethod
    def _zero_padded_rows(x, lengths, axis: int):
        """A copy of x with the padded rows zeroed (x may be the caller's own input)."""
        if lengths is None:
            return x
        x = x.copy()
        _zero_padded_rows_in_place(x, lengths, axis)
        return x
