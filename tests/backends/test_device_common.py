"""device_common.DeviceFusion's GEMM route (``_gemm_attention``), which the CuPy backend takes for large
attentions: the array library's code shared by torch and CuPy, run here on torch CPU tensors through the
Triton backend (as the rest of DeviceFusion is), against the NumPy reference of the kernel contract.
On a GPU, tests/backends/test_cupy_backend.py runs it on CuPy arrays."""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from crossattn_gpu import CrossAttention  # noqa: E402
from crossattn_gpu.backends.numpy_backend import attention as reference  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402

if not interpreter_mode() and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "kernels"))  # the kernels' shared check
from attention_check import DEVICE, DTYPES, check  # noqa: E402
from shapes import MASKED_SHAPES, SHAPES  # noqa: E402

PIECES = ["whole", "queries", "examples"]


def backend_in_pieces(pieces: str, heads: int, len_q: int, len_k: int):
    """A Triton backend (torch arrays, like the CuPy backend's) whose GEMM route runs the whole call in
    one piece, in pieces of 7 queries, or of one example."""
    backend = CrossAttention(4, 1, backend="triton")._backend
    backend.gemm_scores_elements = {"whole": backend.gemm_scores_elements, "queries": heads * len_k * 7,
                                    "examples": heads * len_q * len_k}[pieces]
    return backend


def gemm_launcher(backend):
    """``_gemm_attention`` with the kernels' signature, for ``attention_check.check`` (no lse)."""

    def attention(q, k, v, *, scale, masked=None, k_lengths=None, q_lengths=None, sum_heads=False):
        masked = None if masked is None else masked.to(torch.uint8)
        out, _ = backend._gemm_attention(q, k, v, scale=scale, masked=masked, q_lengths=q_lengths, k_lengths=k_lengths,
                                         need_weights=False, sum_heads=sum_heads)
        return out, None

    return attention


@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemm_attention_matches_the_reference(shape, dtype, pieces):
    backend = backend_in_pieces(pieces, shape[1], shape[4], shape[5])
    check(gemm_launcher(backend), *shape, dtype=dtype)


@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MASKED_SHAPES)
def test_gemm_attention_with_mask_and_ragged_lengths(shape, dtype, pieces):
    """A fully masked row (uniform), key lengths (one of 1) and query lengths (rows past them zero)."""
    backend = backend_in_pieces(pieces, shape[1], shape[4], shape[5])
    check(gemm_launcher(backend), *shape, dtype=dtype, mask=True, ragged=True)


@pytest.mark.parametrize("pieces", PIECES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_attention_probabilities(dtype, pieces):
    """The probabilities come from the route's own softmax, in q's dtype: the reference's, a fully masked
    row uniform, keys past their length 0 and rows past the query length all 0."""
    batch, heads, len_q, len_k, width = 3, 2, 17, 13, 24
    backend = backend_in_pieces(pieces, heads, len_q, len_k)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(shape) for shape in
               ((batch, heads, len_q, width), (batch, 1, len_k, width), (batch, heads, len_k, width)))
    masked = rng.random((1, len_q, len_k)) < 0.3  # one mask for the batch
    masked[:, 0] = True
    k_lengths, q_lengths = np.array([13, 1, 6]), np.array([17, 4, 1])
    tq, tk, tv = (torch.tensor(x, dtype=dtype, device=DEVICE) for x in (q, k, v))
    out, probs = backend._gemm_attention(
        tq, tk, tv, scale=0.2, masked=torch.tensor(masked, device=DEVICE).to(torch.uint8),
        q_lengths=torch.tensor(q_lengths, device=DEVICE), k_lengths=torch.tensor(k_lengths, device=DEVICE),
        need_weights=True, sum_heads=True)
    want_out, _, want = reference(*(t.double().cpu().numpy() for t in (tq, tk, tv)), scale=0.2, masked=masked,
                                  k_lengths=k_lengths, need_weights=True)
    live = np.arange(len_q)[None, :] < q_lengths[:, None]
    want = np.where(live[:, None, :, None], want, 0.0)
    want_out = np.where(live[:, :, None], want_out.sum(1), 0.0)
    assert probs.dtype == dtype and probs.shape == (batch, heads, len_q, len_k)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-3
    np.testing.assert_allclose(probs.double().cpu().numpy(), want, rtol=0, atol=tolerance)
    got_out = out.double().cpu().numpy()
    assert np.abs(got_out - want_out).max() <= 10 * tolerance * np.abs(want_out).max()
    assert not probs[1, :, 4:].any() and not probs[2, :, 1:].any() and not probs[1, :, :, 1:].any()
    assert (probs[0, :, 0] == torch.tensor(1 / len_k, dtype=dtype)).all()  # fully masked: uniform


def test_gemm_attention_ignores_padded_values_that_overflowed():
    """The GEMM multiplies the values' padded rows by probabilities of 0: a padded row that projected to
    Inf is zeroed first, so it makes no NaN; the result is that of zeros there."""
    backend = CrossAttention(4, 1, backend="triton")._backend
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float16).to(DEVICE)
               for shape in ((2, 2, 5, 8), (2, 1, 9, 8), (2, 2, 9, 8)))
    lengths = torch.tensor([9, 4], device=DEVICE)
    overflowed = v.clone()
    overflowed[1, :, 4:] = float("inf")
    zeroed = v.clone()
    zeroed[1, :, 4:] = 0
    kwargs = dict(scale=0.3, masked=None, q_lengths=None, k_lengths=lengths, need_weights=False, sum_heads=True)
    got, _ = backend._gemm_attention(q, k, overflowed, **kwargs)
    assert torch.isfinite(got).all()
    assert torch.equal(got, backend._gemm_attention(q, k, zeroed, **kwargs)[0])


def test_gemm_attention_keeps_a_masked_overflow_nan():
    """As in the kernels (``attention_common.scaled_masked``), the seed's fill replaces a finite score but
    an Inf score stays NaN, so that an overflowed query reaches the front end's check instead of a finite,
    wrong row."""
    backend = CrossAttention(4, 1, backend="triton")._backend
    q = torch.full((1, 1, 2, 4), -1e20, device=DEVICE)  # every score -Inf: the masked one alone would be finite
    q[0, 0, 1] = 1.0  # a finite row
    k = torch.ones((1, 1, 3, 4), device=DEVICE)
    v = torch.ones((1, 1, 3, 4), device=DEVICE)
    masked = torch.zeros((1, 2, 3), dtype=torch.uint8, device=DEVICE)
    masked[0, :, 0] = 1
    out, _ = backend._gemm_attention(q, k, v, scale=1e20, masked=masked, q_lengths=None, k_lengths=None,
                                     need_weights=False, sum_heads=False)
    assert torch.isnan(out[0, 0, 0]).all() and torch.isfinite(out[0, 0, 1]).all()


METHODS = ["fuse_representations", "multi_head_attention", "scaled_dot_product_attention"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("method", METHODS)
def test_the_gemm_route_through_the_front_end(monkeypatch, method, dtype):
    """With the route on (as the CuPy backend turns it on for large attentions) and pieces of 5 queries,
    the seed's three methods with a mask, ragged lengths and probabilities give NumPy's results."""
    ref = CrossAttention(24, 3, seed=0, backend="numpy")
    model = CrossAttention.from_weights(**ref.get_attention_weights(), backend="triton")
    backend = model._backend
    routed = []
    monkeypatch.setattr(backend, "_attends_as_gemms", lambda q, k, v: routed.append(q.shape) or True)
    monkeypatch.setattr(backend, "gemm_scores_elements", 3 * 13 * 5)
    monkeypatch.setattr(backend, "one_launch_flops", 0)  # Triton's own route for small calls: not CuPy's
    rng = np.random.default_rng(4)
    xs, xt = rng.standard_normal((3, 17, 24)).astype(dtype), rng.standard_normal((3, 13, 24)).astype(dtype)
    mask = rng.random((3, 17, 13)) < 0.3
    mask[:, 0] = True
    if method == "fuse_representations":
        kwargs = dict(sequential_lengths=[17, 1, 9], structural_lengths=[13, 13, 1], mask=mask, need_weights=True,
                      bidirectional=False)
        want = ref.fuse_representations(xs, xt, **kwargs)
        got = model.fuse_representations(torch.tensor(xs, device=DEVICE), torch.tensor(xt, device=DEVICE), **kwargs)
        pairs = [(got[key], want[key]) for key in ("fused_sequential", "fused_structural")]
        pairs += [pair for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq")
                  for pair in zip(got[key], want[key])]
    else:
        kwargs = dict(query_lengths=[17, 1, 9], key_lengths=[13, 13, 1], mask=mask, need_weights=True)
        call = getattr(model, method)
        args = [torch.tensor(x, device=DEVICE) for x in (xs, xt, xt)]
        pairs = list(zip(call(*args, **kwargs), getattr(ref, method)(xs, xt, xt, **kwargs)))
        pairs = [(g, w) for got, want in pairs for g, w in (zip(got, want) if isinstance(got, list) else [(got, want)])]
    assert routed  # the route ran
    tolerance = 1e-5 if dtype == np.float32 else 3e-3
    for got, want in pairs:
        got = got.detach().cpu().double().numpy()
        assert got.shape == np.shape(want) and np.isfinite(got).all()
        assert np.abs(got - want).max() <= tolerance * max(np.abs(want).max(), 1e-30)
