"""The shared check of an attention launcher against the NumPy reference of the kernel contract, with a
plain torch implementation in the same dtype as the accuracy yardstick for 16-bit inputs; and the folded
weights and projections of the one-launch kernels' tests."""

import numpy as np
import torch

from crossattn_gpu.backends.numpy_backend import attention as reference
from crossattn_gpu.backends.triton_backend import interpreter_mode
from crossattn_gpu.folding import fold_weights

DEVICE = "cpu" if interpreter_mode() else "cuda"
DTYPES = [torch.float32, torch.float16] + ([] if interpreter_mode() else [torch.bfloat16])


def plain_torch(q, k, v, scale, masked, k_lengths):
    """The same attention written plainly in torch, in the inputs' dtype: the accuracy yardstick."""
    kk = k.expand(-1, q.shape[1], -1, -1)
    vv = v.expand(-1, q.shape[1], -1, -1)
    scores = torch.matmul(q, kk.transpose(-1, -2)) * scale
    if masked is not None:
        scores = scores.masked_fill(masked[:, None], -1e9 if q.dtype == torch.float32 else -6e4)
    if k_lengths is not None:
        pad = torch.arange(k.shape[2], device=q.device)[None, :] >= k_lengths[:, None]
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), vv)


def check(attention, batch, heads, heads_k, heads_v, len_q, len_k, dim_k, dim_v, dtype, mask=False, ragged=False,
          seed=0):
    """``attention`` (a launcher) against the reference on random inputs of this shape: per-head
    outputs, the heads' sum and the lse (where the launcher returns one); float32 within 1e-5, 16-bit
    within twice plain torch.
    ``ragged``: key lengths (one example's 1) and query lengths (another's 1), whose padded rows must
    come out zero; the launcher's keys and values hold NaN past the key lengths, which it must never
    read (the reference and the yardstick take finite ones)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, len_q, dim_k))
    k = rng.standard_normal((batch, heads_k, len_k, dim_k))
    v = rng.standard_normal((batch, heads_v, len_k, dim_v))
    masked = None
    if mask:
        masked = rng.random((batch, len_q, len_k)) < 0.3
        masked[:, 0] = True  # a fully masked row: uniform weights
    lengths = rng.integers(1, len_k + 1, size=batch) if ragged else None
    q_lengths = rng.integers(1, len_q + 1, size=batch) if ragged else None
    if ragged:
        lengths[0] = 1  # one example of length 1
        q_lengths[-1] = 1  # and one of one query: its later query blocks visit no keys
    scale = 1.0 / np.sqrt(dim_k)

    def dev(x, dt=dtype):
        return torch.tensor(x, dtype=dt, device=DEVICE)

    tq, tk, tv = dev(q), dev(k), dev(v)
    # The reference sees the inputs as rounded to the dtype, in float64.
    want, want_lse, _ = reference(
        *(t.double().cpu().numpy() for t in (tq, tk, tv)), scale=scale, masked=masked, k_lengths=lengths, need_lse=True
    )
    t_masked = None if masked is None else torch.tensor(masked, device=DEVICE)
    t_lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    live = np.ones((batch, len_q), dtype=bool)
    if ragged:
        live = np.arange(len_q)[None, :] < q_lengths[:, None]
        want = np.where(live[:, None, :, None], want, 0.0)
        t_lengths = dict(k_lengths=t_lengths, q_lengths=torch.tensor(q_lengths, device=DEVICE))
    else:
        t_lengths = dict(k_lengths=t_lengths)
    kernel_k, kernel_v = tk, tv
    if ragged:
        past = torch.tensor(np.arange(len_k)[None, :] >= lengths[:, None], device=DEVICE)[:, None, :, None]
        kernel_k, kernel_v = tk.masked_fill(past, float("nan")), tv.masked_fill(past, float("nan"))
    out, lse = attention(tq, kernel_k, kernel_v, scale=scale, masked=t_masked, **t_lengths)
    assert out.dtype == dtype and out.shape == (batch, heads, len_q, dim_v)
    got = out.double().cpu().numpy()
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    # The heads' sum, as the fusion asks for it (in registers when Dv fits one chunk).
    summed, summed_lse = attention(tq, kernel_k, kernel_v, scale=scale, masked=t_masked, sum_heads=True, **t_lengths)
    assert summed.dtype == dtype and summed.shape == (batch, len_q, dim_v)
    live_lse = np.repeat(live[:, None, :], heads, axis=1)  # the lse of padded queries is undefined
    if lse is not None:
        torch.testing.assert_close(summed_lse[live_lse], lse[live_lse], rtol=1e-6, atol=1e-6)
    want_sum = want.sum(1)
    got_sum = summed.double().cpu().numpy()
    assert np.isfinite(got_sum).all()
    err_sum = np.abs(got_sum - want_sum).max() / np.abs(want_sum).max()
    if dtype == torch.float32:
        assert err <= 1e-5, err
        assert err_sum <= 1e-5, err_sum
    else:
        yard_heads = plain_torch(tq, tk, tv, scale, t_masked, t_lengths["k_lengths"])
        yard_heads = yard_heads * torch.tensor(live[:, None, :, None], device=DEVICE)
        yard = yard_heads.double().cpu().numpy()
        yard_err = np.abs(yard - want).max() / np.abs(want).max()
        assert err <= 2 * yard_err, (err, yard_err)
        yard_sum = yard_heads.float().sum(1).to(dtype).double().cpu().numpy()
        yard_sum_err = np.abs(yard_sum - want_sum).max() / np.abs(want_sum).max()
        assert err_sum <= 2 * yard_sum_err, (err_sum, yard_sum_err)
    if lse is None:  # a launcher without one (``DeviceFusion._gemm_attention``)
        return
    # lse: compare where rows are not fully masked (there lse is about -1e9 and float32 holds it coarsely)
    lse_err = np.abs(lse.double().cpu().numpy() - want_lse) / np.maximum(np.abs(want_lse), 1.0)
    assert lse_err[live_lse].max() <= (1e-5 if dtype == torch.float32 else 2e-3)


def check_float32_precisions(attention):
    """``precision="tf32x3"`` meets ``check``'s float32 bound (1e-5) with masks and ragged keys, on one key
    block and on odd blocks of a chunked head width; ``"tf32"`` (one TF32 product a dot) misses it by
    far (~1e-3, which IEEE float32's ~1e-7 would not show): the precision reaches the dots. Under the
    interpreter, tests/tensor_cores.py makes TF32 dots round as tensor cores do."""

    def tf32x3(q, k, v, **kwargs):
        return attention(q, k, v, precision="tf32x3", **kwargs)

    for shape in ((2, 2, 1, 2, 17, 113, 24, 24), (1, 2, 1, 2, 33, 70, 130, 130)):
        check(tf32x3, *shape, dtype=torch.float32, mask=True, ragged=True)
    assert 1e-5 < precision_error(attention, "tf32") < 5e-2
    assert precision_error(attention, "tf32x3") < 1e-5


def precision_error(attention, precision: str) -> float:
    """The relative error of ``attention(..., precision=precision)`` on float32 inputs (B=1, H=2,
    Lq=33, Lk=70, D=64) against the reference: tells which float32 arithmetic reached the dots."""
    rng = np.random.default_rng(5)
    q, k, v = (torch.tensor(rng.standard_normal(shape), dtype=torch.float32, device=DEVICE)
               for shape in ((1, 2, 33, 64), (1, 1, 70, 64), (1, 2, 70, 64)))
    want = reference(*(t.double().cpu().numpy() for t in (q, k, v)), scale=0.125)[0]
    out, _ = attention(q, k, v, scale=0.125, precision=precision)
    got = out.double().cpu().numpy()
    assert np.isfinite(got).all()
    return float(np.abs(got - want).max() / np.abs(want).max())


def check_without_lse(attention):
    """``need_lse=False``: no lse, and the same outputs bit for bit, per head and summed."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE) for shape in ((2, 3, 17, 24), (2, 1, 33, 24), (2, 3, 33, 24)))
    masked = torch.rand((2, 17, 33), generator=gen).to(DEVICE) < 0.3
    lengths = torch.tensor([33, 5], device=DEVICE)
    for sum_heads in (False, True):
        kwargs = dict(scale=0.2, masked=masked, k_lengths=lengths, sum_heads=sum_heads)
        out, lse = attention(q, k, v, need_lse=False, **kwargs)
        assert lse is None
        assert torch.equal(out, attention(q, k, v, **kwargs)[0])


def folded(dim: int, heads: int, seed: int) -> np.ndarray:
    """The seed's weights (standard normal x 0.1), folded: (D, 2 H D) float64."""
    rng = np.random.default_rng(seed)
    query, key, value = (rng.standard_normal((heads, dim, dim)) * 0.1 for _ in range(3))
    return fold_weights(query, key, value, rng.standard_normal((heads * dim, dim)) * 0.1)


def split(x, w, heads: int):
    """Folded queries (B, H, L, D) and values (B, H, L, D) of x (B, L, D) under w (D, 2 H D)."""
    batch, length, dim = x.shape
    both = (x @ w).reshape(batch, length, 2, heads, dim)
    return both[:, :, 0].swapaxes(1, 2), both[:, :, 1].swapaxes(1, 2)


def drawn_mask_and_lengths(rng, batch: int, len_q: int, len_k: int, mask: bool, ragged: bool):
    """(masked (B, Lq, Lk) bool or None, q_len (B,) or None, k_len (B,) or None) for the one-launch kernels'
    tests: a mask with a fully masked first row, and lengths with a first example of one query and a last
    of one key."""
    masked = q_len = k_len = None
    if mask:
        masked = rng.random((batch, len_q, len_k)) < 0.3
        masked[:, 0] = True  # a fully masked row: uniform weights
    if ragged:
        q_len, k_len = rng.integers(1, len_q + 1, size=batch), rng.integers(1, len_k + 1, size=batch)
        q_len[0], k_len[-1] = 1, 1
    return masked, q_len, k_len
