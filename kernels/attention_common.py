"""What the two Triton attention operators (``attention.py``, ``attention_two_pass.py``) share: the block
of scaled, masked scores their kernels compute, and their launchers' input checks (the mask and lengths'
also serve ``softmax_heads.py`` and ``small_fusion.py``)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import contract


#: The largest element offset 32-bit index arithmetic holds. The kernels index the batch and head axes
#: in 64 bits always, and the rows and columns inside one example and head in 32 bits, unless
#: ``needs_wide_offsets`` says an offset there can pass this (WIDE_OFFSETS: one long example, a
#: (Lq, Lk) mask of 2**31 elements at L = 46341, or strided views): 32-bit offsets would wrap and
#: read or write outside the tensors.
MAX_32BIT_OFFSET = 2**31 - 1


def needs_wide_offsets(*tensors) -> bool:
    """Whether an offset the kernels compute in 32 bits can pass ``MAX_32BIT_OFFSET``: from the last two
    axes (rows and columns, inside one example and head) of each tensor a launch indexes (None: absent)."""
    # Host time counts (W1): a storage of at most 2**31 - 1 bytes holds no offset past it, and asking
    # takes 86 ns a tensor on this project's CPU, where the arithmetic below takes ~0.5 us.
    for t in tensors:
        if t is not None and t.untyped_storage().nbytes() > MAX_32BIT_OFFSET:
            shape, strides = t.shape, t.stride()
            if (shape[-2] - 1) * abs(strides[-2]) + (shape[-1] - 1) * abs(strides[-1]) > MAX_32BIT_OFFSET:
                return True
    return False


@triton.jit
def block_offsets(start, BLOCK: tl.constexpr, WIDE_OFFSETS: tl.constexpr):
    """start + arange(BLOCK): int32, or int64 with WIDE_OFFSETS, so that every offset computed from
    it is 64-bit too."""
    offsets = start + tl.arange(0, BLOCK)
    if WIDE_OFFSETS:
        offsets = offsets.to(tl.int64)
    return offsets


@triton.jit
def program_heads(pid_bh, num_heads, SUM_HEADS: tl.constexpr):
    """(example, first head, head count) of a program on the batch x heads grid axis: with SUM_HEADS the
    axis is the batch alone and the program loops over every head of its example (summing them), else
    one head. In pid_bh's integer type."""
    if SUM_HEADS:
        return pid_bh, 0, num_heads
    else:
        return pid_bh // num_heads, pid_bh % num_heads, 1


@triton.jit
def chunked_scores(
    q_base, k_base, offs_m, cols, row_ok, col_ok, dim_k,
    stride_qm, stride_qd, stride_kn, stride_kd,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_DK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
):
    """Q[rows] @ K[cols]^T accumulated over Dk-chunks in float32: (BLOCK_M, BLOCK_N)."""
    offs_dk = block_offsets(0, BLOCK_DK, WIDE_OFFSETS)
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
    return s


@triton.jit
def scaled_masked(
    s, qk_scale, mask_base, offs_m, cols, row_ok, col_ok, stride_mm, stride_mn, mask_fill,
    HAS_MASK: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """The scores in base-2 units: scaled, the seed's fill where masked, -inf for keys past the length
    (or past Lk) so that they get exactly zero weight."""
    s = s * qk_scale
    if HAS_MASK:
        m_ptrs = mask_base + offs_m[:, None] * stride_mm + cols[None, :] * stride_mn
        masked = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
        # The fill, except that an Inf or NaN score stays NaN (s * 0): a query whose projection overflowed
        # has no finite score, and with every unmasked one at -Inf the fill alone would hand back a
        # finite, wrong row instead of the NaN that the front end's overflow check catches.
        s = tl.where(masked != 0, mask_fill + s * 0.0, s)
    if not EVEN_N:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    return s


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints. Plain Python on purpose: in Triton 3.6 ``triton.cdiv`` and
    ``triton.next_power_of_2`` are constexpr functions that cost 1.4 us a call on the host (measured on
    this project's CPU), and a launch needs up to eight of them."""
    return -(-a // b)


def block_at_least_16(n: int) -> int:
    """The smallest power of two >= n, and at least 16 (tl.dot's smallest block dimension)."""
    return max(16, 1 << (n - 1).bit_length())


def shared_memory_per_block(t) -> int | None:
    """Bytes of shared memory one block may take on the GPU holding tensor ``t`` (what Triton checks at a
    launch), or None off a GPU (Triton's interpreter, which has no such limit)."""
    return None if t.device.type != "cuda" else _shared_memory_per_block(t.device.index)


@functools.cache
def _shared_memory_per_block(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def checked_shapes(q, k, v) -> tuple[int, int, int, int, int, int]:
    """(B, H, Lq, Lk, Dk, Dv) of torch tensors on one device that meet the kernel contract."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    return contract.check_qkv(q, k, v)


def checked_mask(masked, batch: int, len_q: int, len_k: int, device):
    """A (Bm, Lq, Lk) mask checked (``contract.check_masked``), as uint8 on ``device``; None stays None."""
    if masked is None:
        return None
    contract.check_masked(masked, batch, len_q, len_k)
    return masked.to(device=device, dtype=torch.uint8)


def checked_lengths(named: dict, batch: int, device, checked: bool) -> dict:
    """Lengths named ``name -> (lengths or None, padded length)``, each given one checked in that order
    (``contract.check_lengths``) and moved to ``device`` as int32, the kernels' dtype: name -> tensor."""
    given = {}
    for name, (lengths, length) in named.items():
        if lengths is not None:
            contract.check_lengths(lengths, batch, length, checked, name=name)
            given[name] = lengths.to(device=device, dtype=torch.int32)
    return given


def checked_mask_and_lengths(q, masked, k_lengths, q_lengths, dims: tuple, lengths_checked: bool):
    """The mask as uint8 and both lengths as int32 on q's device (or None), checked against ``dims``."""
    batch, _, len_q, len_k, _, _ = dims
    masked = checked_mask(masked, batch, len_q, len_k, q.device)
    given = checked_lengths({"k_lengths": (k_lengths, len_k), "q_lengths": (q_lengths, len_q)}, batch, q.device,
                            lengths_checked)
    return masked, given.get("k_lengths"), given.get("q_lengths")


def chosen_config(default: dict, config: dict | None) -> dict:
    """``config`` (for tuning sweeps) in place of the launcher's ``default``, with exactly its keys."""
    if config is None:
        return default
    if set(config) != set(default):
        raise ValueError(f"config must have exactly the keys {sorted(default)}; got {sorted(config)}")
    return dict(config)


def mask_strides(masked) -> tuple[int, int, int]:
    """Batch, query and key strides of a (Bm, Lq, Lk) mask; a batch of 1 is shared (stride 0)."""
    if masked is None:
        return (0, 0, 0)
    return (0 if masked.shape[0] == 1 else masked.stride(0), masked.stride(1), masked.stride(2))

