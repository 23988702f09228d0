"""kernels/small_attention.py (the folded multi-head attention of small examples in one launch) against the
float64 NumPy reference of the kernel contract, with a plain torch attention in the same dtype as the
yardstick for 16-bit inputs (under Triton's interpreter on a machine without a GPU): outputs and
probabilities, queries and keys of different lengths, values apart from the keys, 1 to 16 heads, D = 1 to
64, the longest blocks, masks (a fully masked row, a shared mask), ragged lengths with padding that holds
NaN and Inf, strided views, tf32x3, the inputs' magnitudes, and the errors of bad arguments."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from attention_check import DEVICE, DTYPES, drawn_mask_and_lengths, folded, plain_torch, split  # noqa: E402
from crossattn_gpu.backends.numpy_backend import attention as reference  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from crossattn_gpu.kernels.small_attention import SmallAttention, flops, small_attention  # noqa: E402
from crossattn_gpu.kernels.small_fusion import small_fusion  # noqa: E402

if not interpreter_mode() and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)


def check(batch, len_q, len_k, dim, heads, dtype, mask=False, ragged=False, precision="ieee", seed=0):
    """The kernel against the float64 reference: outputs in float32 within 1e-5 (relative to the largest),
    in 16 bits within twice the plain torch attention's error; probabilities within 1e-5 in float32, 4
    units of the dtype's rounding in 16 bits; the outputs the same bits with or without the probabilities;
    padded query rows and padded keys' probabilities exactly zero."""
    rng = np.random.default_rng(seed)
    xq, xk, xv = (rng.standard_normal((batch, n, dim)) for n in (len_q, len_k, len_k))
    masked, q_len, k_len = drawn_mask_and_lengths(rng, batch, len_q, len_k, mask, ragged)
    if ragged:
        xq[0, 1:], xk[-1, 1:], xv[-1, 1:] = np.nan, np.inf, np.nan  # padding: never read, whatever it holds

    def dev(x):
        return torch.tensor(x, dtype=dtype, device=DEVICE)

    tq, tk, tv, tw = dev(xq), dev(xk), dev(xv), dev(folded(dim, heads, seed))
    t_masked = None if masked is None else torch.tensor(masked, device=DEVICE)
    lengths = {} if not ragged else dict(q_lengths=torch.tensor(q_len, device=DEVICE),
                                         k_lengths=torch.tensor(k_len, device=DEVICE))
    out, probs = small_attention(tq, tk, tv, tw, heads=heads, masked=t_masked, precision=precision, need_probs=True,
                                 **lengths)
    plain, none = small_attention(tq, tk, tv, tw, heads=heads, masked=t_masked, precision=precision, **lengths)
    assert none is None and torch.equal(out, plain)
    # The reference sees the inputs and weights as rounded to the dtype, in float64, padding zeroed.
    rq, rk, rv, rw = (np.nan_to_num(t.double().cpu().numpy(), nan=0.0, posinf=0.0) for t in (tq, tk, tv, tw))
    (q, _), (_, v) = split(rq, rw, heads), split(rv, rw, heads)
    full_mask = None if masked is None else np.broadcast_to(masked, (batch, len_q, len_k))
    ref, _, ref_probs = reference(q, rk[:, None], v, scale=1.0, masked=full_mask, k_lengths=k_len, need_weights=True)
    ref = ref.sum(1)
    if ragged:
        live = np.arange(len_q)[None, :, None] < q_len[:, None, None]
        ref, ref_probs = np.where(live, ref, 0.0), np.where(live[:, None], ref_probs, 0.0)
    assert probs.dtype == dtype and probs.shape == ref_probs.shape
    probs = probs.double().cpu().numpy()
    assert np.abs(probs - ref_probs).max() <= (1e-5 if dtype == torch.float32 else 4 * 2.0**-8)
    assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
    got = out.double().cpu().numpy()
    assert np.isfinite(got).all()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    if dtype == torch.float32:
        assert err <= 1e-5, err
    else:
        clean_q, clean_k, clean_v = (torch.tensor(r, dtype=dtype, device=DEVICE) for r in (rq, rk, rv))
        (yq, _), (_, yv) = split(clean_q, tw, heads), split(clean_v, tw, heads)
        k_lengths = lengths.get("k_lengths")
        yard = plain_torch(yq, clean_k[:, None], yv, 1.0, None if t_masked is None else t_masked.expand(
            batch, len_q, len_k), k_lengths).float().sum(1).to(dtype)
        if ragged:
            yard = yard * (torch.arange(len_q, device=DEVICE)[None, :, None] < lengths["q_lengths"][:, None, None])
        yard_err = np.abs(yard.double().cpu().numpy() - ref).max() / np.abs(ref).max()
        assert err <= 2 * yard_err, (err, yard_err)
    if ragged:
        assert not got[np.arange(len_q)[None, :] >= q_len[:, None]].any()
        assert not probs.transpose(0, 3, 1, 2)[np.arange(len_k)[None, :] >= k_len[:, None]].any()


SHAPES = [  # B, Lq, Lk, D, H: within every dtype's longest blocks (float32's 16)
    (1, 1, 1, 1, 1),
    (1, 10, 10, 64, 2),  # W1's shape
    (2, 3, 16, 8, 3),
    (3, 16, 5, 17, 4),
    (1, 13, 16, 33, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(shape, dtype):
    check(*shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_and_ragged_lengths(dtype):
    check(3, 16, 5, 17, 4, dtype, mask=True, ragged=True)
    check(2, 3, 16, 8, 3, dtype, mask=True, ragged=True, seed=1)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_longest_16_bit_sequences(dtype):
    check(2, 64, 63, 64, 2, dtype, mask=True, ragged=True)


def test_tf32x3_and_the_fusion_s_first_direction():
    """tf32x3 (32-long float32 blocks) within float32's bound; with the keys as values, the same bits as
    the fusion's sequential direction, which runs the same code."""
    check(2, 32, 29, 24, 3, torch.float32, mask=True, ragged=True, precision="tf32x3")
    rng = np.random.default_rng(3)
    xs, xt = (torch.tensor(rng.standard_normal((2, n, 24)), dtype=torch.float32, device=DEVICE) for n in (7, 11))
    w = torch.tensor(folded(24, 3, 3), dtype=torch.float32, device=DEVICE)
    (fused, probs, _), _ = small_fusion(xs, xt, w, heads=3, need_probs=True)
    out, got_probs = small_attention(xs, xt, xt, w, heads=3, need_probs=True)
    assert torch.equal(out, fused) and torch.equal(got_probs, probs)


def test_strided_views_and_a_shared_mask():
    """Inputs that are views (D not innermost, every other example), and one mask shared by the batch."""
    rng = np.random.default_rng(4)
    dim, heads = 24, 3
    base = torch.tensor(rng.standard_normal((6, dim, 9)), dtype=torch.float32, device=DEVICE)
    xq, xk = base.transpose(1, 2)[::2], torch.tensor(rng.standard_normal((3, 7, dim)), dtype=torch.float32,
                                                     device=DEVICE)
    xv = torch.tensor(rng.standard_normal((7, 3, dim)), dtype=torch.float32, device=DEVICE).transpose(0, 1)
    w = torch.tensor(folded(dim, heads, 4), dtype=torch.float32, device=DEVICE)
    masked = torch.tensor(rng.random((1, 9, 7)) < 0.4, device=DEVICE)
    got = small_attention(xq, xk, xv, w, heads=heads, masked=masked, need_probs=True)
    want = small_attention(xq.contiguous(), xk, xv.contiguous(), w, heads=heads,
                           masked=masked.expand(3, 9, 7).contiguous(), need_probs=True)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_a_launch_made_once_serves_inputs_of_its_layout_alone():
    """``SmallAttention`` checks and configures a launch once for a layout: called again with other inputs of
    that layout (and a mask, lengths or magnitudes of their own) it gives what ``small_attention`` gives,
    values that are the keys included (loaded once, in the call that passes them so), and so does its
    ``unchecked`` launch; inputs of any other layout (shape, strides, dtype) are refused, since the blocks
    and strides it launches with are its own layout's."""
    rng = np.random.default_rng(11)
    dim, heads = 16, 3  # keys and values (dim, dim) below: float32 sequences up to 16 long
    w = torch.tensor(folded(dim, heads, 11), dtype=torch.float32, device=DEVICE)

    def drawn():
        return [torch.tensor(rng.standard_normal((2, n, dim)), dtype=torch.float32, device=DEVICE) for n in (9, 7, 7)]

    def same(got, want):
        for g, r in zip(got, want):
            assert (g is None and r is None) or torch.equal(g, r)

    first = drawn()
    launch = SmallAttention(*first, w, heads=heads, need_probs=True)
    masked = torch.tensor(rng.random((2, 9, 7)) < 0.3, device=DEVICE)
    k_len = torch.tensor([7, 2], device=DEVICE)
    for xq, xk, xv in (first, drawn()):
        for extra in ({}, {"masked": masked, "k_lengths": k_len}):
            same(launch(xq, xk, xv, **extra), small_attention(xq, xk, xv, w, heads=heads, need_probs=True, **extra))
        same(launch(xq, xk, xk), small_attention(xq, xk, xk, w, heads=heads, need_probs=True))
    shared = SmallAttention(first[0], first[1], first[1], w, heads=heads)  # made with keys as values
    for xq, xk, xv in (first, drawn()):
        same(shared(xq, xk, xv), small_attention(xq, xk, xv, w, heads=heads))
    magnitudes = torch.zeros(2, 3, device=DEVICE)
    launch(*first, magnitudes=magnitudes)
    assert torch.equal(magnitudes, torch.stack([x.abs().amax((1, 2)) for x in first], 1))
    # Unchecked (for a caller that guarantees the layout: a plan), the same launch, keys as values too.
    unchecked_magnitudes = torch.zeros(2, 3, device=DEVICE)
    same(launch.unchecked(*first, unchecked_magnitudes), launch(*first))
    assert torch.equal(unchecked_magnitudes, magnitudes)
    same(launch.unchecked(first[0], first[1], first[1]), launch(first[0], first[1], first[1]))
    xq, xk, xv = first
    for other in ((xq[:, :8], xk, xv), (xq, xk, xv.transpose(1, 2).contiguous().transpose(1, 2)),
                  (xq, xk.half(), xv), (xq[:1], xk[:1], xv[:1])):
        with pytest.raises(ValueError, match="this launch was made for inputs laid out as"):
            launch(*other)
    # Values at the keys' address but laid out otherwise (square examples, transposed) are not the keys.
    square = torch.tensor(rng.standard_normal((2, dim, dim)), dtype=torch.float32, device=DEVICE)
    transposed = square.transpose(1, 2)
    got = SmallAttention(xq, square, transposed, w, heads=heads)(xq, square, transposed)
    same(got, small_attention(xq, square, transposed.contiguous(), w, heads=heads))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_magnitudes_cover_each_input_whole(dtype):
    """``magnitudes`` (B, 3): each example's largest |x| of xq, xk and xv, exactly, over the whole example,
    padding past the lengths included, NaN where one holds NaN; values that are the keys (loaded once)
    give the keys' again, and the outputs the same bits as values that are a copy of the keys."""
    rng = np.random.default_rng(10)
    dim, heads = 24, 3
    xq, xk, xv = (torch.tensor(rng.standard_normal((3, n, dim)) * 100, dtype=dtype, device=DEVICE) for n in (9, 6, 6))
    xq[0, 8, 23] = -60000.0  # in the padding below
    xk[1, 5, 0] = float("inf")
    xv[2, 3, 1] = float("nan")
    q_len, k_len = (torch.tensor(n, device=DEVICE) for n in ([2, 9, 4], [6, 3, 1]))
    w = torch.tensor(folded(dim, heads, 10), dtype=dtype, device=DEVICE)
    magnitudes = torch.full((3, 3), -1.0, device=DEVICE)
    got = small_attention(xq, xk, xv, w, heads=heads, q_lengths=q_len, k_lengths=k_len, magnitudes=magnitudes)
    want = torch.stack([x.float().abs().amax((1, 2)) for x in (xq, xk, xv)], 1)  # amax keeps NaN
    torch.testing.assert_close(magnitudes, want, rtol=0, atol=0, equal_nan=True)
    assert magnitudes[0, 0] == 60000.0 and magnitudes[1, 1] == float("inf") and magnitudes[2, 2].isnan()
    plain = small_attention(xq, xk, xv, w, heads=heads, q_lengths=q_len, k_lengths=k_len)
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0, equal_nan=True)
    shared = small_attention(xq, xk, xk, w, heads=heads, q_lengths=q_len, k_lengths=k_len, magnitudes=magnitudes)
    torch.testing.assert_close(magnitudes[:, 2], want[:, 1], rtol=0, atol=0, equal_nan=True)
    copied = small_attention(xq, xk, xk.clone(), w, heads=heads, q_lengths=q_len, k_lengths=k_len)
    torch.testing.assert_close(shared[0], copied[0], rtol=0, atol=0, equal_nan=True)


def test_flops():
    # Per head: the query and value projections (2 x L x D x D each) and the scores and probabilities times
    # values (2 x Lq x Lk x D each).
    assert flops(1, 10, 7, 64, 2) == 2 * (2 * 10 * 64 * 64 + 2 * 7 * 64 * 64 + 2 * (2 * 10 * 7 * 64))
    assert flops(3, 5, 7, 8, 2) == 3 * flops(1, 5, 7, 8, 2)


def test_bad_arguments_name_the_problem():
    xq, xk = torch.zeros(2, 3, 4, device=DEVICE), torch.zeros(2, 5, 4, device=DEVICE)
    w = torch.zeros(4, 16, device=DEVICE)
    with pytest.raises(TypeError, match="xv must be a torch.Tensor"):
        small_attention(xq, xk, np.zeros((2, 5, 4), np.float32), w, heads=2)
    with pytest.raises(TypeError, match=r"xq, xk, xv and weights must share one dtype among float32, float16 and "
                                        r"bfloat16; got float32, float32, float64, float32"):
        small_attention(xq, xk, xk.double(), w, heads=2)
    with pytest.raises(ValueError, match=r"xq, xk and xv must be \(B, L, D\); got shapes \(2, 3, 4\), \(5, 4\) and"):
        small_attention(xq, xk[0], xk, w, heads=2)
    with pytest.raises(ValueError, match="xq, xk and xv must share B and D"):
        small_attention(xq, xk, xk[:1], w, heads=2)
    with pytest.raises(ValueError, match="xk and xv must have the same length; got 5 and 4"):
        small_attention(xq, xk, xk[:, :4], w, heads=2)
    with pytest.raises(ValueError, match=r"weights must be \(D, 2 x heads x D\) = \(4, 24\) for 3 heads"):
        small_attention(xq, xk, xk, w, heads=3)
    with pytest.raises(ValueError, match=r"Lq = 3, Lk = 17, D = 4 pass what one program holds in float32 \(L <= 16"):
        small_attention(xq, torch.zeros(2, 17, 4, device=DEVICE), torch.zeros(2, 17, 4, device=DEVICE), w, heads=2)
    with pytest.raises(ValueError, match=r"masked must have shape \(1 or 2, 3, 5\)"):
        small_attention(xq, xk, xk, w, heads=2, masked=torch.zeros(2, 5, 3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"k_lengths must lie in 1..5"):
        small_attention(xq, xk, xk, w, heads=2, k_lengths=torch.tensor([5, 6], device=DEVICE))
    with pytest.raises(ValueError, match="precision must be one of"):
        small_attention(xq, xk, xk, w, heads=2, precision="fast")
    with pytest.raises(ValueError, match=r"magnitudes must be a contiguous float32 \(2, 3\) tensor on"):
        small_attention(xq, xk, xk, w, heads=2, magnitudes=torch.zeros(2, 2, device=DEVICE))
