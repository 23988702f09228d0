"""kernels/small_fusion.py (both directions of the folded fusion in one launch) against the float64 NumPy
reference of the kernel contract, with a plain torch fusion in the same dtype as the yardstick for 16-bit
inputs (under Triton's interpreter on a machine without a GPU): outputs, probabilities and cosine
similarities, odd lengths
and widths up to the largest blocks, 1 to 16 heads, masks (a fully masked row, a shared mask), ragged
lengths with padding that holds NaN, strided views, the float32 precisions, and the errors of bad
arguments."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from attention_check import DEVICE, DTYPES, drawn_mask_and_lengths, folded, plain_torch, split  # noqa: E402
from crossattn_gpu.backends.numpy_backend import attention as reference  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from crossattn_gpu.kernels.small_fusion import (  # noqa: E402
    MAX_BLOCK_D, MAX_BLOCK_L, MAX_BLOCK_L_WITH_SIMILARITY, SmallFusion, fits, flops, launch_config,
    longest, small_fusion,
)

if not interpreter_mode() and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)


def directions(xs, xt, w, heads, masked, s_len, t_len):
    """Per direction: queries (B, H, Lq, D), raw keys (B, Lk, D), values (B, H, Lk, D), the mask
    (B or 1, Lq, Lk) or None, and the query and key lengths; NumPy arrays or torch tensors alike."""
    found = []
    for xq, xk, mask, q_len, k_len in ((xs, xt, masked, s_len, t_len),
                                      (xt, xs, None if masked is None else masked.swapaxes(1, 2), t_len, s_len)):
        (q, _), (_, v) = split(xq, w, heads), split(xk, w, heads)
        found.append((q, xk, v, mask, q_len, k_len))
    return found


def expected(xs, xt, w, heads, masked, s_len, t_len):
    """Both directions' (output, probabilities) in float64 from the kernel contract's reference, padded
    query rows zero."""
    outs = []
    for q, xk, v, mask, q_len, k_len in directions(xs, xt, w, heads, masked, s_len, t_len):
        if mask is not None:
            mask = np.broadcast_to(mask, (q.shape[0], q.shape[2], xk.shape[1]))
        out, _, probs = reference(q, xk[:, None], v, scale=1.0, masked=mask, k_lengths=k_len, need_weights=True)
        out = out.sum(1)
        if q_len is not None:
            live = np.arange(q.shape[2])[None, :, None] < q_len[:, None, None]
            out, probs = np.where(live, out, 0.0), np.where(live[:, None], probs, 0.0)
        outs.append((out, probs))
    return outs


def yardstick(xs, xt, w, heads, masked, s_len, t_len):
    """The same fusion written plainly in torch in the inputs' dtype (projections, attention, heads' sum)."""
    outs = []
    for q, xk, v, mask, q_len, k_len in directions(xs, xt, w, heads, masked, s_len, t_len):
        if mask is not None:
            mask = mask.expand(q.shape[0], q.shape[2], xk.shape[1])
        out = plain_torch(q, xk[:, None], v, 1.0, mask, k_len).float().sum(1).to(q.dtype)
        if q_len is not None:
            out = out * (torch.arange(q.shape[2], device=DEVICE)[None, :, None] < q_len[:, None, None])
        outs.append(out)
    return outs


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, La, D) x (B, Lb, D) -> (B, La, Lb) in float64; a zero row gives 0."""
    def unit(x):
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return x / np.where(norm == 0, 1.0, norm)

    return unit(a) @ unit(b).swapaxes(1, 2)


def check(batch, len_s, len_t, dim, heads, dtype, mask=False, ragged=False, precision="ieee", seed=0):
    """The kernel against the float64 reference: outputs in float32 within 1e-5 (relative to the largest),
    in 16 bits within twice the plain torch fusion's error; probabilities within 1e-5 in float32, 4 units
    of the dtype's rounding in 16 bits (they are at most 1); similarities (where they fit) of the inputs'
    rows (padding zero) and the outputs as returned within 1e-5; the outputs the same bits whether the
    rest is asked or not; padded query rows exactly zero."""
    rng = np.random.default_rng(seed)
    xs, xt = rng.standard_normal((batch, len_s, dim)), rng.standard_normal((batch, len_t, dim))
    masked, s_len, t_len = drawn_mask_and_lengths(rng, batch, len_s, len_t, mask, ragged)
    if ragged:
        xs[0, 1:] = np.nan  # padding: never read, whatever it holds
        xt[-1, 1:] = np.inf

    def dev(x, dt=dtype):
        return None if x is None else torch.tensor(x, dtype=dt, device=DEVICE)

    ts, tt, tw = dev(xs), dev(xt), dev(folded(dim, heads, seed))
    t_masked = None if masked is None else torch.tensor(masked, device=DEVICE)
    lengths = {} if not ragged else dict(s_lengths=torch.tensor(s_len, device=DEVICE),
                                         t_lengths=torch.tensor(t_len, device=DEVICE))
    similarity = fits(len_s, len_t, dim, ts.element_size(), precision, need_similarity=True)
    asked = small_fusion(ts, tt, tw, heads=heads, masked=t_masked, precision=precision, need_probs=True,
                         need_similarity=similarity, **lengths)
    got = small_fusion(ts, tt, tw, heads=heads, masked=t_masked, precision=precision, **lengths)
    for (out, probs, sim), (out_asked, _, _) in zip(got, asked):
        assert probs is None and sim is None and torch.equal(out, out_asked)
    # The reference sees the inputs and weights as rounded to the dtype, in float64, padding zeroed.
    rounded = [np.nan_to_num(t.double().cpu().numpy(), nan=0.0, posinf=0.0) for t in (ts, tt, tw)]
    want = expected(*rounded, heads, masked, s_len, t_len)
    yard = None
    if dtype != torch.float32:
        clean_s, clean_t = (torch.tensor(r, dtype=dtype, device=DEVICE) for r in rounded[:2])
        yard = yardstick(clean_s, clean_t, tw, heads, t_masked, lengths.get("s_lengths"), lengths.get("t_lengths"))
    for index, ((out, _, _), (_, probs, sim), (ref, ref_probs)) in enumerate(zip(got, asked, want)):
        assert probs.dtype == dtype and probs.shape == ref_probs.shape
        probs = probs.double().cpu().numpy()
        assert np.abs(probs - ref_probs).max() <= (1e-5 if dtype == torch.float32 else 4 * 2.0**-8)
        if similarity:
            inputs = rounded[index]
            if ragged:
                live = np.arange(inputs.shape[1])[None, :, None] < (s_len, t_len)[index][:, None, None]
                inputs = np.where(live, inputs, 0.0)
            ref_sim = cosine_similarity(inputs, out.double().cpu().numpy())
            assert sim.dtype == torch.float32 and sim.shape == ref_sim.shape
            assert np.abs(sim.double().cpu().numpy() - ref_sim).max() <= 1e-5
        else:
            assert sim is None
        assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
        out = out.double().cpu().numpy()
        assert np.isfinite(out).all()
        err = np.abs(out - ref).max() / np.abs(ref).max()
        if yard is None:
            assert err <= 1e-5, (index, err)
        else:
            yard_err = np.abs(yard[index].double().cpu().numpy() - ref).max() / np.abs(ref).max()
            assert err <= 2 * yard_err, (index, err, yard_err)
        if ragged:
            q_len, k_len = (s_len, t_len)[index], (t_len, s_len)[index]
            assert not out[np.arange(out.shape[1])[None, :] >= q_len[:, None]].any()
            assert not probs.transpose(0, 2, 1, 3)[np.arange(out.shape[1])[None, :] >= q_len[:, None]].any()
            assert not probs.transpose(0, 3, 1, 2)[np.arange(probs.shape[3])[None, :] >= k_len[:, None]].any()


SHAPES = [  # B, Ls, Lt, D, H: within every dtype's longest blocks (float32's 16)
    (1, 1, 1, 1, 1),
    (1, 10, 10, 64, 2),  # W1, the seed's demo
    (2, 3, 16, 8, 3),
    (3, 16, 5, 17, 4),
    (1, 13, 16, 33, 16),
    (2, 16, 16, 64, 1),  # full blocks
]
#: 16-bit only: up to 64 x 64 blocks.
LONG_SHAPES = [(2, 64, 63, 64, 2), (3, 17, 40, 24, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(shape, dtype):
    check(*shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 16, 5, 17, 4), (2, 3, 16, 8, 3)], ids=str)
def test_mask_and_ragged_lengths(shape, dtype):
    check(*shape, dtype=dtype, mask=True, ragged=True, seed=1)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("shape", LONG_SHAPES, ids=str)
def test_longest_16_bit_sequences(shape, dtype):
    check(*shape, dtype=dtype, mask=True, ragged=True, seed=2)


def test_float32_precisions_reach_the_dots():
    """tf32x3 meets float32's bound on sequences up to its 32; one TF32 product (``tf32``) misses it by far
    (under the interpreter, tests/tensor_cores.py rounds TF32 dots as tensor cores do)."""
    check(2, 32, 29, 64, 3, torch.float32, mask=True, ragged=True, precision="tf32x3", seed=3)
    with pytest.raises(AssertionError):
        check(1, 10, 10, 64, 2, torch.float32, precision="tf32", seed=3)


def test_strided_views_and_a_shared_mask():
    """Inputs that are views (D not innermost, every other example), weights transposed in memory, and one
    mask shared by the batch (its batch stride 0)."""
    rng = np.random.default_rng(4)
    dim, heads = 24, 3
    base_s = torch.tensor(rng.standard_normal((6, dim, 9)), dtype=torch.float32, device=DEVICE)
    base_t = torch.tensor(rng.standard_normal((3, 7, dim)), dtype=torch.float32, device=DEVICE)
    xs, xt = base_s.transpose(1, 2)[::2], base_t
    w = torch.tensor(folded(dim, heads, 4), dtype=torch.float32, device=DEVICE)
    w_strided = w.t().contiguous().t()
    masked = torch.tensor(rng.random((1, 9, 7)) < 0.4, device=DEVICE)
    got = small_fusion(xs, xt, w_strided, heads=heads, masked=masked, need_probs=True)
    want = small_fusion(xs.contiguous(), xt, w, heads=heads, masked=masked.expand(3, 9, 7).contiguous(),
                        need_probs=True)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    ref = expected(*(t.double().cpu().numpy() for t in (xs, xt, w)), heads, masked.cpu().numpy(), None, None)
    for (g, _, _), (r, _) in zip(got, ref):
        assert np.abs(g.double().cpu().numpy() - r).max() <= 1e-5 * np.abs(r).max()


def test_a_launch_made_once_serves_inputs_of_its_layout_alone():
    """``SmallFusion`` checks and configures a launch once for a layout: called again with other inputs of
    that layout (and a mask, lengths or magnitudes of their own) it gives what ``small_fusion`` gives, and
    so does its ``unchecked`` launch; inputs of any other layout (shape, strides, dtype) are refused, since
    the blocks and strides it launches with are its own layout's."""
    rng = np.random.default_rng(9)
    dim, heads = 24, 3
    w = torch.tensor(folded(dim, heads, 9), dtype=torch.float32, device=DEVICE)
    pairs = [[torch.tensor(rng.standard_normal((2, n, dim)), dtype=torch.float32, device=DEVICE) for n in (9, 7)]
             for _ in range(2)]
    launch = SmallFusion(*pairs[0], w, heads=heads, need_probs=True)
    masked = torch.tensor(rng.random((2, 9, 7)) < 0.3, device=DEVICE)
    t_len = torch.tensor([7, 2], device=DEVICE)
    for xs, xt in pairs:
        for extra in ({}, {"masked": masked, "t_lengths": t_len}):
            got, want = launch(xs, xt, **extra), small_fusion(xs, xt, w, heads=heads, need_probs=True, **extra)
            for g, r in zip(got, want):
                for a, b in zip(g, r):
                    assert (a is None and b is None) or torch.equal(a, b)
    magnitudes = torch.zeros(2, 2, device=DEVICE)
    launch(*pairs[1], magnitudes=magnitudes)
    assert torch.equal(magnitudes, torch.stack([x.abs().amax((1, 2)) for x in pairs[1]], 1))
    # Unchecked (for a caller that guarantees the layout: a plan), the same launch.
    unchecked_magnitudes = torch.zeros(2, 2, device=DEVICE)
    for g, r in zip(launch.unchecked(*pairs[1], unchecked_magnitudes), launch(*pairs[1])):
        for a, b in zip(g, r):
            assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(unchecked_magnitudes, magnitudes)
    xs, xt = pairs[0]
    for other in (xs[:, :8], xs.transpose(1, 2).contiguous().transpose(1, 2), xs.half(), xs[:1]):
        with pytest.raises(ValueError, match="this launch was made for inputs laid out as"):
            launch(other, xt)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
def test_a_fully_masked_row_is_uniform_and_nan_scores_stay_nan():
    """A row whose every key is masked averages the values (the seed's -1e9 fill); a query whose score is
    NaN keeps it NaN through the fill (for the front end's overflow check to find), not a finite row, and
    so do its similarities."""
    dim, heads = 8, 1
    w = torch.tensor(folded(dim, heads, 5), dtype=torch.float32, device=DEVICE)
    xs = torch.tensor(np.random.default_rng(5).standard_normal((1, 2, dim)), dtype=torch.float32, device=DEVICE)
    xt = torch.tensor(np.random.default_rng(6).standard_normal((1, 3, dim)), dtype=torch.float32, device=DEVICE)
    masked = torch.ones(1, 2, 3, dtype=torch.bool, device=DEVICE)
    (out_s, probs, _), _ = small_fusion(xs, xt, w, heads=heads, masked=masked, need_probs=True)
    values = (xt[0] @ w[:, dim:]).mean(0)
    torch.testing.assert_close(out_s[0, 0], values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / 3))
    xs_nan = xs.clone()
    xs_nan[0, 1, 0] = float("nan")
    (out_s, _, sim_s), _ = small_fusion(xs_nan, xt, w, heads=heads, masked=masked, need_similarity=True)
    assert torch.isnan(out_s[0, 1]).all() and torch.isfinite(out_s[0, 0]).all()
    assert torch.isnan(sim_s[0, 1]).all() and torch.isnan(sim_s[0, :, 1]).all()  # its similarities too


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_magnitudes_cover_each_input_whole(dtype):
    """``magnitudes`` (B, 2): each example's largest |x| of xs and of xt, exactly, over the whole example,
    padding past the lengths included (an Inf or NaN there too), NaN where one holds NaN, for strided views;
    the outputs the same bits with or without it."""
    rng = np.random.default_rng(9)
    dim, heads = 24, 3
    base = torch.tensor(rng.standard_normal((8, dim, 13)) * 100, dtype=dtype, device=DEVICE)
    xs = base.transpose(1, 2)[::2]  # (4, 13, 24), D not innermost
    xt = torch.tensor(rng.standard_normal((4, 5, dim)), dtype=dtype, device=DEVICE)
    xs[1, 12, 23] = -60000.0  # the last element, in the padding below
    xt[2, 4, 0] = float("inf")  # padding too
    xs[3, 6, 5] = float("nan")
    s_len, t_len = (torch.tensor(n, device=DEVICE) for n in ([13, 2, 7, 1], [5, 3, 1, 2]))
    w = torch.tensor(folded(dim, heads, 9), dtype=dtype, device=DEVICE)
    magnitudes = torch.full((4, 2), -1.0, device=DEVICE)
    got = small_fusion(xs, xt, w, heads=heads, s_lengths=s_len, t_lengths=t_len, magnitudes=magnitudes)
    want = torch.stack([x.float().abs().amax((1, 2)) for x in (xs, xt)], 1)  # amax keeps NaN
    torch.testing.assert_close(magnitudes, want, rtol=0, atol=0, equal_nan=True)
    assert magnitudes[1, 0] == 60000.0 and magnitudes[2, 1] == float("inf")
    plain = small_fusion(xs, xt, w, heads=heads, s_lengths=s_len, t_lengths=t_len)
    for (out, _, _), (ref, _, _) in zip(got, plain):
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


def test_flops_count_both_directions():
    # W1: per head and direction, the query and value projections (2 x 10 x 64 x 64 each) and the scores and
    # probabilities times values (2 x 10 x 10 x 64 each); 2 heads, 2 directions.
    assert flops(1, 10, 10, 64, 2) == 2 * 2 * (2 * (2 * 10 * 64 * 64) + 2 * (2 * 10 * 10 * 64))
    assert flops(3, 5, 7, 8, 2) == 3 * flops(1, 5, 7, 8, 2) and flops(1, 5, 7, 8, 2) == flops(1, 7, 5, 8, 2)


def test_similarities_of_tiny_rows():
    """Rows whose squares underflow float32 (inputs of 1e-30, and so outputs) still give exact similarities:
    each row is divided by its largest magnitude first. A zero row gives 0."""
    rng = np.random.default_rng(7)
    dim, heads = 16, 2
    xs, xt = (torch.tensor(rng.standard_normal((2, 5, dim)) * 1e-30, dtype=torch.float32, device=DEVICE)
              for _ in range(2))
    xs[1, 2] = 0.0
    w = torch.tensor(folded(dim, heads, 7), dtype=torch.float32, device=DEVICE)
    (out_s, _, sim_s), (out_t, _, sim_t) = small_fusion(xs, xt, w, heads=heads, need_similarity=True)
    for x, out, sim in ((xs, out_s, sim_s), (xt, out_t, sim_t)):
        want = cosine_similarity(x.double().cpu().numpy(), out.double().cpu().numpy())
        assert np.isfinite(want).all() and np.abs(sim.double().cpu().numpy() - want).max() <= 1e-5
    assert not sim_s[1, 2].any()


def test_launch_config_fits_and_longest():
    assert launch_config(10, 10, 64, 4) == {"BLOCK_S": 16, "BLOCK_T": 16, "BLOCK_D": 64, "num_warps": 8,
                                            "num_stages": 1, "INPUT_PRECISION": "ieee"}
    assert launch_config(3, 40, 1, 2, "tf32x3")["BLOCK_T"] == 64
    assert launch_config(3, 40, 1, 2, "tf32x3")["INPUT_PRECISION"] == "ieee"  # 16-bit dots ignore it
    assert launch_config(3, 4, 5, 4, "tf32x3")["INPUT_PRECISION"] == "tf32x3"
    assert (longest(4), longest(4, "tf32x3"), longest(4, "tf32"), longest(2)) == (16, 32, 32, 64)
    assert set(MAX_BLOCK_L) == {"ieee", "tf32x3", "tf32", "16-bit"}
    assert fits(16, 1, 64, 4) and not fits(17, 1, 64, 4) and fits(32, 17, 64, 4, "tf32x3")
    assert fits(64, 64, MAX_BLOCK_D, 2) and not fits(64, 65, 64, 2) and not fits(3, 3, MAX_BLOCK_D + 1, 2)
    # With the similarities, 16-bit sequences up to 32 (64 spill registers); float32 as without.
    assert (longest(2, need_similarity=True), longest(4, need_similarity=True)) == (32, 16)
    assert fits(32, 3, 64, 2, need_similarity=True) and not fits(33, 3, 64, 2, need_similarity=True)
    assert MAX_BLOCK_L_WITH_SIMILARITY["tf32x3"] == MAX_BLOCK_L["tf32x3"]


def test_bad_arguments_name_the_problem():
    xs, xt = torch.zeros(2, 3, 4, device=DEVICE), torch.zeros(2, 5, 4, device=DEVICE)
    w = torch.zeros(4, 16, device=DEVICE)
    with pytest.raises(TypeError, match="xt must be a torch.Tensor"):
        small_fusion(xs, np.zeros((2, 5, 4), np.float32), w, heads=2)
    with pytest.raises(TypeError, match="must share one dtype"):
        small_fusion(xs, xt.double(), w, heads=2)
    with pytest.raises(TypeError, match="must share one dtype"):
        small_fusion(xs.half(), xt.half(), w, heads=2)
    with pytest.raises(ValueError, match=r"xs and xt must be \(B, L, D\)"):
        small_fusion(xs[0], xt, w, heads=2)
    with pytest.raises(ValueError, match="no empty axis"):
        small_fusion(xs[:, :0], xt, w, heads=2)
    with pytest.raises(ValueError, match="must share B and D"):
        small_fusion(xs[:1], xt, w, heads=2)
    with pytest.raises(ValueError, match=r"weights must be \(D, 2 x heads x D\) = \(4, 24\) for 3 heads"):
        small_fusion(xs, xt, w, heads=3)
    for weights in (w, w[:, :0]):  # no heads, even with weights of that shape
        with pytest.raises(ValueError, match=r"weights must be"):
            small_fusion(xs, xt, weights, heads=0)
    with pytest.raises(ValueError, match=r"Lt = 17, D = 4 pass what one program holds in float32 \(L <= 16"):
        small_fusion(xs, torch.zeros(2, 17, 4, device=DEVICE), w, heads=2)
    with pytest.raises(ValueError, match=r"Ls = 33, Lt = 5, D = 4 pass what one program holds in float16 with the "
                                         r"similarities \(L <= 32"):
        small_fusion(torch.zeros(2, 33, 4, dtype=torch.float16, device=DEVICE), xt.half(), w.half(), heads=2,
                     need_similarity=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        small_fusion(xs, xt, w, heads=2, precision="fast")
    for magnitudes in (torch.zeros(2, 3, device=DEVICE), torch.zeros(2, 2, dtype=torch.float64, device=DEVICE),
                       torch.zeros(2, 4, device=DEVICE)[:, ::2], np.zeros((2, 2), np.float32)):
        with pytest.raises(ValueError, match=r"magnitudes must be a contiguous float32 \(2, 2\) tensor on"):
            small_fusion(xs, xt, w, heads=2, magnitudes=magnitudes)
    with pytest.raises(ValueError, match=r"masked must have shape \(1 or 2, 3, 5\)"):
        small_fusion(xs, xt, w, heads=2, masked=torch.zeros(2, 5, 3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"t_lengths must lie in 1..5"):
        small_fusion(xs, xt, w, heads=2, t_lengths=torch.tensor([5, 6], device=DEVICE))
    with pytest.raises(ValueError, match=r"s_lengths must be an integer tensor of shape \(2,\)"):
        small_fusion(xs, xt, w, heads=2, s_lengths=torch.tensor([1.0, 2.0], device=DEVICE))
