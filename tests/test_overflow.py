"""The overflow bounds of ``crossattn_gpu._overflow`` against the values they bound (float64), and the
front end's use of them on the NumPy backend: no pass over the results when nothing can overflow, a
check that changes nothing when something might, and a named error when something did."""

import math

import numpy as np
import pytest

from crossattn_gpu import CrossAttention, _overflow
from crossattn_gpu._overflow import LARGEST, Bounds, StageDtypes, risky_dtype
from crossattn_gpu.backends.numpy_backend import NumpyBackend
from crossattn_gpu.folding import FoldMagnitudes, fold_magnitudes, fold_named
from crossattn_gpu.weights import random_weights


def draws(width: int, rng):
    """Inputs that make the bounds tight in different ways: dense, heavy-tailed, one-hot rows."""
    yield rng.standard_normal((4, 9, width))
    yield rng.standard_t(1.5, (4, 9, width))
    onehot = np.zeros((4, 9, width))
    onehot[:, np.arange(9), rng.integers(0, width, 9)] = rng.choice([-3.0, 3.0], 9)
    yield onehot


@pytest.mark.parametrize("width,heads,weight_scale", [(1, 1, 1.0), (3, 2, 0.1), (17, 3, 5.0), (64, 4, 0.1), (130, 16, 1.0)])
def test_the_bounds_bound_every_stage(width, heads, weight_scale):
    rng = np.random.default_rng(width * heads)
    w = {name: a * weight_scale / 0.1 for name, a in random_weights(width, heads, seed=width).items()}
    folded = fold_named(w)
    magnitudes = fold_magnitudes(folded, heads, width)
    hd = heads * width
    for xs in draws(width, rng):
        xt = rng.permutation(xs.reshape(-1, width)).reshape(xs.shape)
        magnitude = max(np.abs(xs).max(), np.abs(xt).max())
        bounds = Bounds.folded(magnitude, width, heads, magnitudes, terms=2)
        fused = []
        for xq, xk in ((xs, xt), (xt, xs)):
            projections = xq @ folded
            assert np.abs(projections).max() <= bounds.projections
            assert np.abs(xk @ folded).max() <= bounds.projections
            out = np.zeros(xq.shape)
            for h in range(heads):
                scores = projections[..., h * width : (h + 1) * width] @ xk.swapaxes(-1, -2)
                assert np.abs(scores).max() <= bounds.scores
                p = np.exp(scores - scores.max(-1, keepdims=True))
                out += (p / p.sum(-1, keepdims=True)) @ (xk @ folded[:, hd + h * width : hd + (h + 1) * width])
            fused.append(out)
        assert np.abs(fused[0] + fused[1]).max() <= bounds.outputs
        assert max(np.abs(f).max() for f in fused) <= bounds.outputs / 2


def test_the_attention_bounds_count_the_scores_before_their_scale():
    bounds = Bounds.attention(10.0, 4, scale=0.5)
    assert (bounds.projections, bounds.scores, bounds.outputs) == (10.0, 400.0, 10.0)
    assert Bounds.attention(10.0, 4, scale=3.0).scores == 1200.0


def test_fold_magnitudes_are_the_largest_column_l1_norms_and_entry():
    rng = np.random.default_rng(1)
    heads, width = 3, 5
    folded = rng.standard_normal((width, 2 * heads * width))
    l1 = np.abs(folded).sum(axis=0)
    assert fold_magnitudes(folded, heads, width) == FoldMagnitudes(
        l1[: heads * width].max(), l1[heads * width :].max(), np.abs(folded).max())


def test_the_riskiest_stage_names_the_narrowest_dtype():
    stages = StageDtypes("float16", "float32", "float16")
    assert risky_dtype(Bounds(1e3, 1e30, 1e3), stages) is None
    assert risky_dtype(Bounds(1e3, 2e38, 1e3), stages) == "float32"
    assert risky_dtype(Bounds(4e4, 2e38, 1e3), stages) == "float16"  # both at risk: float16 is narrower
    # a stage counts as safe only below half its largest value
    assert risky_dtype(Bounds(LARGEST["float16"] / _overflow.MARGIN, 0, 0), stages) is None
    assert risky_dtype(Bounds(LARGEST["float16"] / _overflow.MARGIN * 1.001, 0, 0), stages) == "float16"


def counting_reads(monkeypatch):
    """The arrays handed to each ``largest_magnitude`` call, by count."""
    calls = []
    original = NumpyBackend.largest_magnitude

    def counted(*arrays):
        calls.append(len(arrays))
        return original(*arrays)

    monkeypatch.setattr(NumpyBackend, "largest_magnitude", staticmethod(counted))
    return calls


@pytest.mark.parametrize("dtype", [None, "float32", "float16"])
def test_results_are_read_again_only_when_a_stage_may_overflow(monkeypatch, dtype):
    model = CrossAttention(16, 2, seed=0, backend="numpy", dtype=dtype)
    rng = np.random.default_rng(0)
    xs, xt = rng.standard_normal((3, 7, 16)), rng.standard_normal((3, 7, 16))
    calls = counting_reads(monkeypatch)
    plain = model.fuse_representations(xs, xt)
    assert calls == [2]  # the inputs alone
    monkeypatch.setattr(_overflow, "MARGIN", math.inf)  # every stage now counts as at risk
    calls.clear()
    checked = model.fuse_representations(xs, xt)
    assert calls == [2, 3]  # then the two fusions and their sum, in one read
    for key, value in plain.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(checked[key], value)
    calls.clear()
    model.multi_head_attention(xs, xt, xt)
    model.scaled_dot_product_attention(xs, xt, xt)
    assert calls == [3, 1, 3, 1]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the named error, not NumPy's overflow warnings before it
@pytest.mark.parametrize(
    "dtype,scale,overflowed,hint",
    [(None, 1e160, "float64", r"scale the inputs or the weights down$"),
     ("float32", 1e20, "float32", r"compute in float64 \(dtype='float64' on the 'numpy' or 'onnx' backend\)"),
     ("float16", 1.0, "float16", r"compute in float32 \(dtype='float32'\)")],
)
def test_an_overflow_is_named_with_its_dtype_and_a_way_out(dtype, scale, overflowed, hint):
    w = random_weights(8, 2, seed=0)
    if dtype == "float16":  # values of ~1e6 from inputs of ~1: the float16 outputs overflow
        w = {**w, "value_weights": w["value_weights"] * 1e6}
    model = CrossAttention.from_weights(**w, backend="numpy", dtype=dtype)
    rng = np.random.default_rng(0)
    xs, xt = rng.standard_normal((2, 5, 8)) * scale, rng.standard_normal((2, 5, 8)) * scale
    calls = [
        (lambda: model.fuse_representations(xs, xt), "fused_sequential"),
        (lambda: model.multi_head_attention(xt, xs, xs), "output"),
    ]
    if dtype != "float16":  # the attention alone (no weights) keeps float16 outputs within the values
        calls.append((lambda: model.scaled_dot_product_attention(xs, xt, xt), "output"))
    for call, name in calls:
        with pytest.raises(OverflowError, match=f"^{name} came out past") as info:
            call()
        assert f"overflowed {overflowed}" in str(info.value)
        assert info.match(hint)



@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("backend", ["numpy", "onnx"])
def test_weights_that_overflow_the_scores_of_small_inputs_are_named_too(backend):
    """Folded weights that fit float64 (~1e307) but take the scores of inputs of 1 past it: the error had
    said to scale the inputs down."""
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    model = CrossAttention(8, 2, seed=0, backend=backend)
    model.query_weights = np.full((2, 8, 8), 1e308)
    with pytest.raises(OverflowError, match="reaching 1 in magnitude: .* scale the inputs or the weights down$"):
        model.fuse_representations(np.ones((3, 8)), np.ones((3, 8)))


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_an_input_past_the_compute_dtype_is_named_before_the_cast_hides_it():
    model = CrossAttention(8, 2, seed=0, backend="numpy", dtype="float32")
    xs = np.ones((5, 8))
    xt = np.ones((5, 8))
    xt[2, 3] = -1e39  # float32 stops at 3.4e38: the cast would make it -Inf
    with pytest.raises(ValueError, match=r"structural_repr reaches 1e\+39 in magnitude, past float32"):
        model.fuse_representations(xs, xt)


#: Magnitudes at the edge of each dtype: its largest value, then values about where float64 rounds to Inf
#: in one rounding or in two (through float32, as torch converts to 16 bits).
EDGES = {
    "float32": [float(np.finfo(np.float32).max), float(np.nextafter(2.0**128 - 2.0**103, 0)), 2.0**128 - 2.0**103],
    "float16": [65504.0, 65519.99609375, float(np.nextafter(65520.0 - 2.0**-9, 0)), 65520.0 - 2.0**-9,
                float(np.nextafter(65520.0, 0)), 65520.0],
    "bfloat16": [3.3895313892515355e38, 2.0**128 - 2.0**119 - 2.0**104,
                 float(np.nextafter(2.0**128 - 2.0**119 - 2.0**103, 0)), 2.0**128 - 2.0**119 - 2.0**103,
                 2.0**128 - 2.0**119],
}


def casts_to_inf(dtype: str) -> list:
    """The conversions of a float64 value to ``dtype`` that backends make (NumPy's, in one rounding;
    through float32, as torch does; torch's own where installed), each as value -> whether it gives Inf."""
    def numpy_cast(*steps):
        def cast(value):
            x = np.array([value])
            with np.errstate(over="ignore"):
                for step in steps:
                    x = x.astype(step)
            return bool(np.isinf(x[0]))
        return cast

    casts = [] if dtype == "bfloat16" else [numpy_cast(dtype), numpy_cast(np.float32, dtype)]
    try:
        import torch
    except ImportError:
        return casts
    return casts + [lambda value: bool(torch.isinf(torch.tensor(value, dtype=torch.float64).to(getattr(torch, dtype))))]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_cast_check_refuses_exactly_the_values_that_a_cast_takes_to_inf(dtype):
    """The check of the inputs, and that of the folded weights, refuse a magnitude exactly when a cast
    that a backend makes to the dtype gives Inf, and pass the dtype's largest value."""
    casts = casts_to_inf(dtype)
    if not casts:
        pytest.skip("bfloat16 casts need torch")
    backend = NumpyBackend()
    refused = []
    for value in EDGES[dtype]:
        arrays = {"sequential_repr": np.array([[-value]])}
        if any(cast(value) for cast in casts):
            refused.append(value)
            with pytest.raises(ValueError, match=f"sequential_repr reaches .* past {dtype}'s largest value"):
                _overflow.check_cast(arrays, value, dtype, backend)
            with pytest.raises(ValueError, match=f"the folded weights .* past {dtype}'s largest value"):
                _overflow.check_weights(FoldMagnitudes(1.0, 1.0, value), dtype)
        else:
            _overflow.check_cast(arrays, value, dtype, backend)
            _overflow.check_weights(FoldMagnitudes(1.0, 1.0, value), dtype)
    assert 0 < len(refused) < len(EDGES[dtype]) and EDGES[dtype][0] not in refused
