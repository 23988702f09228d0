"""The kernel contract (SPEC section 3) on its NumPy reference: O, lse, head broadcast, masks."""

import numpy as np
import pytest

from crossattn_gpu.backends.numpy_backend import MASK_FILL, attention, cosine_similarity


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


def test_example_blocks_share_the_workers_evenly(monkeypatch):
    from crossattn_gpu.backends import numpy_backend
    from crossattn_gpu.backends.numpy_backend import FoldedWeights, _example_blocks

    monkeypatch.setattr(numpy_backend, "cpu_count", lambda: 2)
    w2c, wide = FoldedWeights(4, 128, None, None), FoldedWeights(8, 1280, None, None)
    for batch, length, weights, sizes in [
        (64, 256, w2c, [2] * 32),  # 2**19 elements of projections a block
        (64, 120, wide, [2] * 2 + [3] * 20),  # at least 256 rows a block, 22 blocks (a multiple of 2 workers)
        (4, 256, wide, [1] * 4),
        (3, 256, wide, [3]),  # three blocks would leave one worker alone on the last: one shared block
        (8, 10, w2c, [8]),  # small: one block
        (1, 4096, w2c, [1]),
    ]:
        blocks = _example_blocks(batch, length, weights)
        assert sorted(b.stop - b.start for b in blocks) == sizes
        assert [b.start for b in blocks[1:]] == [b.stop for b in blocks[:-1]] and blocks[-1].stop == batch


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fusion_in_example_blocks_equals_one_block(monkeypatch, dtype):
    """Every output of fuse and multi_head_attention, with per-example and shared masks, lengths,
    probabilities and similarities, is the same whether the batch runs in blocks or at once."""
    from crossattn_gpu import CrossAttention, _threads
    from crossattn_gpu.backends import numpy_backend

    monkeypatch.setattr(_threads, "cpu_count", lambda: 2)
    monkeypatch.setattr(numpy_backend, "cpu_count", lambda: 2)
    rng = np.random.default_rng(6)
    model = CrossAttention(8, 3, seed=0, backend="numpy")
    seq, struct = rng.standard_normal((7, 6, 8)).astype(dtype), rng.standard_normal((7, 6, 8)).astype(dtype)
    equal = dict(sequential_lengths=[6, 1, 3, 6, 2, 5, 4], structural_lengths=[6, 1, 3, 6, 2, 5, 4])
    unequal = dict(sequential_lengths=[6, 1, 3, 6, 2, 5, 4], structural_lengths=[2, 6, 6, 1, 3, 4, 5], bidirectional=False)
    masks = (rng.random((7, 6, 6)) > 0.3, rng.random((6, 6)) > 0.3)

    def calls():
        out = [model.fuse_representations(seq, struct, mask=m, need_weights=True, **kw) for m, kw in zip(masks, (equal, unequal))]
        mha = model.multi_head_attention(seq, struct, struct, mask=masks[0], need_weights=True,
                                         query_lengths=unequal["sequential_lengths"])
        return out, mha

    monkeypatch.setattr(numpy_backend, "EXAMPLE_BLOCK_ELEMENTS", 1 << 30)
    whole = calls()
    monkeypatch.setattr(numpy_backend, "EXAMPLE_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(numpy_backend, "MIN_EXAMPLE_BLOCK_ROWS", 12)  # blocks of 2 examples: 4 blocks of 1 to 2
    assert len(numpy_backend._example_blocks(7, 6, numpy_backend.FoldedWeights(3, 8, None, None))) == 4
    blocked = calls()
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for got, want in zip(blocked[0], whole[0]):
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, (list, np.ndarray)):
                np.testing.assert_allclose(np.asarray(got[key]), np.asarray(value), rtol=rtol, atol=rtol * 1e-2)
            else:
                assert got[key] == value
    np.testing.assert_allclose(blocked[1][0], whole[1][0], rtol=rtol, atol=rtol * 1e-2)
    np.testing.assert_allclose(np.stack(blocked[1][1]), np.stack(whole[1][1]), rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("dtype,scales", [
    (np.float32, [1.0, 1e-20, 1e-30, 1e-40, 1e18, 0.0]),
    (np.float64, [1.0, 1e-160, 1e-300, 1e150, 0.0]),
])
def test_cosine_similarity_of_rows_of_any_size(dtype, scales):
    """Rows whose squares underflow, overflow or are zero (padding), beside ordinary ones: every
    similarity as float64 gives it on the same rows scaled to size 1 first."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, len(scales), 16)) * np.array(scales)[None, :, None]
    b = rng.standard_normal((2, 5, 16))
    a, b = a.astype(dtype), b.astype(dtype)
    got = cosine_similarity(a, b)

    def unit(x):
        x = x.astype(np.float64)
        top = np.abs(x).max(-1, keepdims=True)
        x = np.divide(x, top, out=np.zeros_like(x), where=top > 0)
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)

    want = unit(a) @ unit(b).swapaxes(-1, -2)
    # subnormal float32 rows (1e-40) hold only a few digits, but those are exact in the scaling
    np.testing.assert_allclose(got, want, rtol=0, atol=20 * np.finfo(dtype).eps)
    assert not got[:, -1].any()  # the zero row


def test_cosine_similarity_of_ordinary_and_padded_rows_needs_no_rescaling(monkeypatch):
    """The fast path: ordinary rows and rows of zeros are summed once, never scaled."""
    calls = []
    monkeypatch.setattr(np, "frexp", lambda *args: calls.append(1))
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 7, 8)).astype(np.float32)
    a[1, 5:] = 0
    cosine_similarity(a, a)
    assert calls == []


@pytest.mark.parametrize("order", ["=", "S"])  # native and swapped byte order
def test_float16_largest_magnitude_from_bit_patterns(order):
    """The largest |x| of float16 arrays, read from their bits, equals float64's answer on every kind of
    value (subnormals, signed zeros, the largest finite) and is NaN or Inf as the array holds them."""
    from crossattn_gpu.backends.numpy_backend import NumpyBackend

    every = np.arange(2**16, dtype=np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        arr = rng.choice(finite, size=rng.integers(1, 50)).astype(np.dtype(np.float16).newbyteorder(order))
        want = float(np.abs(arr.astype(np.float64)).max())
        assert NumpyBackend.largest_magnitude(arr) == want
        strided = float(np.abs(arr[::-2].astype(np.float64)).max())
        assert NumpyBackend.largest_magnitude(arr[::-2], np.float32([want / 2])) == max(strided, float(np.float32(want / 2)))
    nan_bits = every[np.isnan(every)]
    assert np.isnan(NumpyBackend.largest_magnitude(np.float16([1.0, np.inf]), nan_bits[:5].astype(np.float16)))
    assert NumpyBackend.largest_magnitude(np.float16([-np.inf, 2.0]).astype(np.dtype(np.float16).newbyteorder(order))) == np.inf


def test_scratch_buffers_are_kept_per_name_and_grown(monkeypatch):
    from crossattn_gpu.backends import numpy_backend
    from crossattn_gpu.backends.numpy_backend import _scratch

    monkeypatch.setattr(numpy_backend, "SCRATCH_MIN_BYTES", 64)
    monkeypatch.setattr(numpy_backend, "SCRATCH_BYTES", 4096)
    f32 = np.dtype(np.float32)
    assert _scratch("test a", (4, 3), f32) is None  # 48 bytes: below the range, allocated as usual
    assert _scratch("test a", (33, 32), f32) is None  # 4224 bytes: above it
    first = _scratch("test a", (4, 8), f32)
    again = _scratch("test a", (8, 4), f32)
    assert first.shape == (4, 8) and again.shape == (8, 4) and again.dtype == f32
    assert np.shares_memory(first, again)  # kept for the next use of the name
    assert not np.shares_memory(first, _scratch("test b", (4, 8), f32))  # another name, another buffer
    grown = _scratch("test a", (32, 32), np.dtype(np.float32))
    assert grown.shape == (32, 32) and not np.shares_memory(first, grown)
    assert np.shares_memory(grown, _scratch("test a", (4, 8), np.dtype(np.float64)))


def test_results_never_share_the_reused_buffers(monkeypatch):
    """Every intermediate in scratch buffers (the floor lowered to 0) gives the same bits as none, and
    no result is a view of a buffer: a later call, which rewrites them, leaves earlier results alone."""
    from crossattn_gpu import CrossAttention
    from crossattn_gpu.backends import numpy_backend

    rng = np.random.default_rng(12)
    model = CrossAttention(8, 3, seed=0, backend="numpy")
    seq, struct = rng.standard_normal((5, 7, 8)), rng.standard_normal((5, 6, 8))
    lengths = dict(sequential_lengths=[7, 1, 3, 6, 2], structural_lengths=[6, 2, 6, 1, 4])
    mask = rng.random((7, 6)) > 0.3

    def calls(seq, struct):
        return [model.fuse_representations(seq, struct, mask=mask, need_weights=True, bidirectional=False, **lengths),
                model.fuse_representations(seq[0, :6], struct[0]),  # the seed's 2-D call: probabilities, similarities
                model.multi_head_attention(seq, struct, struct, need_weights=True),
                model.scaled_dot_product_attention(seq[0], struct[0], struct[0])]

    def arrays(results):
        found = []
        for item in results:
            values = item.values() if isinstance(item, dict) else item
            for value in values:
                found += [np.asarray(v) for v in (value if isinstance(value, list) else [value]) if hasattr(v, "shape")]
        return found

    monkeypatch.setattr(numpy_backend, "SCRATCH_BYTES", -1)
    plain = [a.copy() for a in arrays(calls(seq, struct))]
    monkeypatch.setattr(numpy_backend, "SCRATCH_BYTES", 1 << 22)
    monkeypatch.setattr(numpy_backend, "SCRATCH_MIN_BYTES", 0)
    got = arrays(calls(seq, struct))
    assert len(got) == len(plain) > 20
    for a, b in zip(got, plain):
        np.testing.assert_array_equal(a, b)
    buffers = numpy_backend._scratch_buffers.buffers.values()
    assert {"project both", "project q", "project v", "heads", "scores"} <= set(numpy_backend._scratch_buffers.buffers)
    assert not any(np.shares_memory(a, buffer) for a in got for buffer in buffers)
    calls(-seq, 2 * struct)  # rewrites every buffer
    for a, b in zip(got, plain):
        np.testing.assert_array_equal(a, b)


def test_a_threads_buffers_go_with_it():
    import gc
    import threading
    import weakref

    from crossattn_gpu.backends import numpy_backend

    kept = []

    def in_thread():
        numpy_backend._scratch("test thread", (64, 1024), np.dtype(np.float32))
        kept.append(weakref.ref(numpy_backend._scratch_buffers.buffers["test thread"]))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    gc.collect()
    assert len(kept) == 1 and kept[0]() is None
    assert "test thread" not in getattr(numpy_backend._scratch_buffers, "buffers", {})  # not this thread's
