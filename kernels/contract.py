"""The attention kernel contract (SPEC section 3), checked the same way by every launcher.

Works on any array with ``ndim``, ``shape`` and ``dtype`` (torch tensors, CuPy arrays).
"""

from __future__ import annotations

DTYPES = ("float32", "float16", "bfloat16")

#: The seed's fill value for masked scores (finite: a fully masked row gets uniform weights).
MASK_FILL = -1e9
#: log2(e): the kernels work in base 2, with scale * log2(e) folded into one multiply.
LOG2E = 1.4426950408889634
#: How float32 dots may run: IEEE float32 (CUDA cores), three TF32 tensor-core products per product
#: (``tf32x3``: each operand split into a TF32 value and a TF32 remainder, the remainders' product
#: dropped; about float32's accuracy), or one TF32 product (``tf32``: ~1e-3 relative error). 16-bit
#: dots always use their own tensor cores.
FLOAT32_PRECISIONS = ("ieee", "tf32x3", "tf32")


#: The most blocks a CUDA grid takes on its y axis, where every launcher puts the query blocks.
MAX_GRID_Y = 65535


def check_query_blocks(len_q: int, block_m: int) -> None:
    """ValueError when Lq needs more query blocks of ``block_m`` rows than a grid's y axis takes."""
    blocks = -(-len_q // block_m)
    if blocks > MAX_GRID_Y:
        raise ValueError(f"Lq = {len_q} needs {blocks} query blocks of {block_m} rows, more than a GPU grid axis "
                         f"takes ({MAX_GRID_Y}); run the queries in slices of at most {MAX_GRID_Y * block_m} rows")


def dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def check_precision(precision) -> str:
    if precision not in FLOAT32_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(FLOAT32_PRECISIONS)}; got {precision!r}")
    return precision


def check_qkv(q, k, v) -> tuple[int, int, int, int, int, int]:
    """(B, H, Lq, Lk, Dk, Dv) of q (B, H, Lq, Dk), k (B, Hk, Lk, Dk), v (B, Hv, Lk, Dv) with Hk, Hv in
    {1, H} and one float dtype; TypeError or ValueError naming what breaks the contract."""
    names = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, L, D); got shape {tuple(t.shape)}")
        names.append(dtype_name(t))
        if names[-1] not in DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16; got {names[-1]}")
    if len(set(names)) != 1:
        raise TypeError(f"q, k and v must share one dtype; got {', '.join(names)}")
    batch, heads, len_q, dim_k = q.shape
    len_k, dim_v = k.shape[2], v.shape[3]
    if 0 in tuple(q.shape) + tuple(k.shape) + tuple(v.shape):
        raise ValueError("q, k and v must have no empty axis")
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != dim_k:
        raise ValueError(f"q and k must share the head width; got {dim_k} and {k.shape[3]}")
    if v.shape[2] != len_k:
        raise ValueError(f"k and v must share the key length; got {len_k} and {v.shape[2]}")
    for name, t in (("k", k), ("v", v)):
        if t.shape[1] not in (1, heads):
            raise ValueError(f"{name} must have 1 or {heads} heads; got {t.shape[1]}")
    return batch, heads, len_q, len_k, dim_k, dim_v


def check_masked(masked, batch: int, len_q: int, len_k: int) -> None:
    if masked.ndim != 3 or masked.shape[0] not in (1, batch) or tuple(masked.shape[1:]) != (len_q, len_k):
        raise ValueError(f"masked must have shape (1 or {batch}, {len_q}, {len_k}); got {tuple(masked.shape)}")
    if dtype_name(masked) not in ("bool", "uint8"):
        raise TypeError(f"masked must be bool or uint8; got {dtype_name(masked)}")


def check_lengths(lengths, batch: int, length: int, checked: bool = False, name: str = "k_lengths") -> None:
    """Integer (B,) lengths in 1..length (Lk for ``k_lengths``, Lq for ``q_lengths``). The range check
    reads one flag from the device (a synchronisation); ``checked`` (the caller has checked the values,
    as the library's front end does) skips it and checks only the shape and dtype."""
    dtype = dtype_name(lengths)
    if tuple(lengths.shape) != (batch,) or not dtype.startswith(("int", "uint")):
        raise ValueError(f"{name} must be an integer tensor of shape ({batch},); got {dtype} {tuple(lengths.shape)}")
    if checked or not bool(((lengths < 1) | (lengths > length)).any()):
        return
    low, high = int(lengths.min()), int(lengths.max())
    raise ValueError(f"{name} must lie in 1..{length}; got values from {low} to {high}")
