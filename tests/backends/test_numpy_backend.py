"""The kernel contract (SPEC section 3) on its NumPy reference: O, lse, head broadcast, masks."""

import numpy as np
import pytest

from crossattn_gpu.backends.numpy_backend import MASK_FILL, attention


def direct(q, k, v, scale, masked=None, k_lengths=None):
    """Plain float64 loops over batch and head."""
    batch, heads, len_q, _ = q.shape
    out = np.zeros((batch, heads, len_q, v.shape[-1]))
    lse = np.zeros((batch, heads, len_q))
    for b in range(batch):
        for h in range(heads):
            kh, vh = k[b, h % k.shape[1]], v[b, h % v.shape[1]]
            s = q[b, h] @ kh.T * scale
            if masked is not None:
                s = np.where(np.broadcast_to(masked, (batch,) + s.shape)[b], MASK_FILL, s)
            if k_lengths is not None:
                s[:, k_lengths[b]:] = -np.inf
            m = s.max(-1, keepdims=True)
            p = np.exp(s - m)
            out[b, h] = p @ vh / p.sum(-1, keepdims=True)
            lse[b, h] = (m + np.log(p.sum(-1, keepdims=True)))[:, 0]
    return out, lse


@pytest.mark.parametrize("heads_k,heads_v", [(1, 1), (3, 3), (1, 3), (3, 1)])
def test_contract_with_head_broadcast_mask_and_lengths(heads_k, heads_v):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 5, 7))
    k = rng.standard_normal((2, heads_k, 6, 7))
    v = rng.standard_normal((2, heads_v, 6, 4))
    masked = rng.random((1, 5, 6)) < 0.3
    masked[0, 0] = True
    lengths = np.array([6, 2])
    out, lse, weights = attention(q, k, v, scale=0.3, masked=masked, k_lengths=lengths, need_weights=True, need_lse=True)
    want_out, want_lse = direct(q, k, v, 0.3, masked, lengths)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)
    # The probabilities can be rebuilt from the log-sum-exp, except in fully masked rows, whose lse is
    # about -1e9: there the rebuild keeps only ~1e-7 relative precision.
    kb = np.broadcast_to(k, (2, 3, 6, 7))
    key_pad = np.arange(6) >= lengths[:, None, None]
    scores = np.where(masked[:, None], MASK_FILL, q @ kb.swapaxes(-1, -2) * 0.3)
    scores = np.where(key_pad[:, None], -np.inf, scores)
    rebuilt = np.exp(scores - lse[..., None])
    fully_masked = np.broadcast_to((masked | key_pad).all(-1)[:, None], (2, 3, 5))
    assert fully_masked.any() and not fully_masked.all()
    np.testing.assert_allclose(rebuilt[~fully_masked], weights[~fully_masked], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(rebuilt[fully_masked], weights[fully_masked], rtol=1e-6)


def test_lse_and_weights_only_when_asked():
    q = np.ones((1, 1, 2, 3))
    out, lse, weights = attention(q, q, q, scale=1.0)
    assert lse is None and weights is None and out.shape == (1, 1, 2, 3)


def test_float32_stays_float32():
    q = np.ones((1, 2, 3, 4), dtype=np.float32)
    out, lse, _ = attention(q, q, q, scale=0.5, need_lse=True)
    assert out.dtype == np.float32 and lse.dtype == np.float32


@pytest.mark.parametrize("len_s,len_t", [(2, 3), (300, 250)])  # rows of each input (one example)
def test_both_inputs_projected_at_once_or_apart_alike(monkeypatch, len_s, len_t):
    """Small inputs share one projection GEMM on their stacked rows (MIN_BLOCK_ROWS); larger ones take
    one GEMM each, in row blocks. Forcing the other path changes nothing."""
    from crossattn_gpu import CrossAttention
    from crossattn_gpu.backends import numpy_backend

    rng = np.random.default_rng(5)
    model = CrossAttention(8, 3, seed=0, backend="numpy")
    seq, struct = rng.standard_normal((1, len_s, 8)), rng.standard_normal((1, len_t, 8))
    natural = model.fuse_representations(seq, struct, bidirectional=False)
    stacked = len_s + len_t <= numpy_backend.MIN_BLOCK_ROWS
    monkeypatch.setattr(numpy_backend, "MIN_BLOCK_ROWS", 0 if stacked else 10**6)
    forced = model.fuse_representations(seq, struct, bidirectional=False)
    for key in ("fused_sequential", "fused_structural"):
        np.testing.assert_allclose(forced[key], natural[key], rtol=1e-12, atol=1e-14)
