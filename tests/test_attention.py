"""CrossAttention against the independent per-head, per-example float64 reference."""

import numpy as np
import pytest

import reference
from plans import fuse_more_layouts_than_kept, whole_paths
from crossattn_gpu import CrossAttention
from crossattn_gpu.attention import _PLANS_KEPT

RTOL64 = 1e-10


def assert_close(actual, expected, rtol=RTOL64):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-300)
    assert np.abs(actual - expected).max() <= rtol * scale


def rand(rng, *shape):
    return rng.standard_normal(shape)


@pytest.mark.parametrize("length_s,length_t,width,heads", [(10, 10, 64, 2), (1, 1, 1, 1), (3, 17, 8, 3), (113, 5, 24, 1), (17, 17, 100, 4)])
def test_fuse_2d_matches_seed_reference(length_s, length_t, width, heads):
    rng = np.random.default_rng(0)
    model = CrossAttention(width, heads, seed=1, backend="numpy")
    seq, struct = rand(rng, length_s, width), rand(rng, length_t, width)
    got = model.fuse_representations(seq, struct, bidirectional=length_s == length_t)
    want = reference.fuse(*reference.params(model), seq, struct)
    for key in ("fused_sequential", "fused_structural", "seq_similarity", "struct_similarity"):
        assert got[key].dtype == np.float64
        assert_close(got[key], want[key])
    if length_s == length_t:
        assert_close(got["bidirectional_fusion"], want["bidirectional_fusion"])
    for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq"):
        assert len(got[key]) == heads
        for g, w in zip(got[key], want[key]):
            assert_close(g, w)
    assert got["fusion_complete"] is True


def test_seed_example_runs():
    np.random.seed(42)
    seq, struct = np.random.randn(10, 64), np.random.randn(10, 64)
    model = CrossAttention(embedding_dim=64, attention_heads=2)
    result = model.fuse_representations(seq, struct)
    assert result["fused_sequential"].shape == (10, 64)
    assert result["bidirectional_fusion"].shape == (10, 64)
    assert result["seq_similarity"].shape == (10, 10)
    assert model.get_attention_weights()["query_weights"].shape == (2, 64, 64)
    report = model.generate_report()
    assert report["report_complete"] and report["is_initialized"]
    assert report["embedding_dim"] == 64 and report["attention_heads"] == 2
    # On the best available backend, which the report names (numpy without a GPU).
    assert model.backend in report["summary"] and report["backend"] == model.backend


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("scale", [1.0, 1e300, 1e-300])
def test_the_report_gives_the_weights_frobenius_norms_at_any_scale(scale):
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    want = {name: float(np.linalg.norm(w)) for name, w in model.get_attention_weights().items()}
    model.query_weights = model.query_weights * scale
    norms = model.generate_report()["weight_norms"]
    assert norms.keys() == want.keys()
    for name, norm in norms.items():
        assert norm == pytest.approx(want[name] * (scale if name == "query_weights" else 1.0), rel=1e-14), name
    assert f"query {want['query_weights'] * scale:.4g}" in model.generate_report()["summary"]


def test_seed_none_draws_from_the_global_generator_like_the_seed():
    np.random.seed(7)
    implicit = CrossAttention(16, 2, backend="numpy")
    explicit = CrossAttention(16, 2, seed=7, backend="numpy")
    for name in ("query_weights", "key_weights", "value_weights", "output_weights"):
        assert np.array_equal(getattr(implicit, name), getattr(explicit, name))


def test_weights_have_seed_shapes_and_scale():
    model = CrossAttention(32, 3, seed=0, backend="numpy")
    assert model.query_weights.shape == (3, 32, 32)
    assert model.output_weights.shape == (96, 32)
    assert 0.08 < model.key_weights.std() < 0.12


def test_sdpa_and_mha_2d_match_reference_with_mask():
    rng = np.random.default_rng(1)
    width = 16
    model = CrossAttention(width, 3, seed=2, backend="numpy")
    q, k, v = rand(rng, 7, width), rand(rng, 9, width), rand(rng, 9, 5)
    mask = rng.random((7, 9)) > 0.3
    mask[2] = False  # a fully masked row: uniform weights, as in the seed
    out, w = model.scaled_dot_product_attention(q, k, v, mask)
    want_out, want_w = reference.sdpa(q, k, v, width, mask)
    assert_close(out, want_out)
    assert_close(w, want_w)
    assert np.allclose(w[2], 1 / 9)
    out, ws = model.multi_head_attention(q, k, k, mask)
    want_out, want_ws = reference.mha(*reference.params(model), q, k, k, mask)
    assert_close(out, want_out)
    for g, e in zip(ws, want_ws):
        assert_close(g, e)


def test_batched_equals_per_example_loop():
    rng = np.random.default_rng(2)
    model = CrossAttention(12, 2, seed=3, backend="numpy")
    seq, struct = rand(rng, 5, 6, 12), rand(rng, 5, 6, 12)
    got = model.fuse_representations(seq, struct, need_weights=True)
    assert got["fused_sequential"].shape == (5, 6, 12)
    for b in range(5):
        want = reference.fuse(*reference.params(model), seq[b], struct[b])
        for key in ("fused_sequential", "fused_structural", "bidirectional_fusion", "seq_similarity", "struct_similarity"):
            assert_close(got[key][b], want[key])
        for h in range(2):
            assert_close(got["attention_weights_seq_to_struct"][h][b], want["attention_weights_seq_to_struct"][h])


def test_batched_call_builds_no_probabilities_by_default():
    rng = np.random.default_rng(3)
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    result = model.fuse_representations(rand(rng, 2, 4, 8), rand(rng, 2, 4, 8))
    assert result["attention_weights_seq_to_struct"] is None
    out, weights = model.multi_head_attention(rand(rng, 2, 4, 8), rand(rng, 2, 3, 8), rand(rng, 2, 3, 8))
    assert weights is None and out.shape == (2, 4, 8)


@pytest.mark.parametrize("batched", [False, True])
def test_the_heads_probabilities_are_converted_once_not_once_a_head(monkeypatch, batched):
    # From a GPU to NumPy each conversion is a copy to the host: the H heads' arrays are views of one.
    rng = np.random.default_rng(5)
    model = CrossAttention(8, 4, seed=0, backend="numpy")
    conversions = []
    to_caller = model._backend.to_caller
    monkeypatch.setattr(model._backend, "to_caller", lambda x, *a: conversions.append(x.shape) or to_caller(x, *a))
    lead = (2,) if batched else ()
    seq, struct = rand(rng, *lead, 5, 8), rand(rng, *lead, 3, 8)
    got = model.fuse_representations(seq, struct, need_weights=True, bidirectional=False)
    assert len(conversions) == 2 + 2 + 2  # two outputs, two directions' probabilities, two similarities
    assert len(got["attention_weights_seq_to_struct"]) == 4
    for b in range(2 if batched else 1):
        want = reference.fuse(*reference.params(model), seq[b] if batched else seq, struct[b] if batched else struct)
        for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq"):
            for h in range(4):
                assert_close(got[key][h][b] if batched else got[key][h], want[key][h])
    out, probs = model.multi_head_attention(seq, struct, struct, need_weights=True)
    assert len(conversions) == 6 + 2 and len(probs) == 4 and probs[0].shape == (*lead, 5, 3)


@pytest.mark.parametrize("mask_shape", [(6, 9), (1, 6, 9), (4, 6, 9), (4, 1, 9), (9,)])
def test_ragged_batch_equals_unpadded_examples(mask_shape):
    rng = np.random.default_rng(4)
    width, heads = 10, 3
    model = CrossAttention(width, heads, seed=5, backend="numpy")
    s_len, t_len = np.array([6, 1, 3, 5]), np.array([9, 2, 9, 1])
    seq, struct = rand(rng, 4, 6, width), rand(rng, 4, 9, width)
    mask = rng.random(mask_shape) > 0.4
    got = model.fuse_representations(
        seq, struct, mask=mask, sequential_lengths=s_len, structural_lengths=t_len,
        bidirectional=False, need_weights=True,
    )
    full_mask = np.broadcast_to(mask, (4, 6, 9))
    for b in range(4):
        ls, lt = s_len[b], t_len[b]
        want = reference.fuse(*reference.params(model), seq[b, :ls], struct[b, :lt], full_mask[b, :ls, :lt])
        assert_close(got["fused_sequential"][b, :ls], want["fused_sequential"])
        assert_close(got["fused_structural"][b, :lt], want["fused_structural"])
        assert not got["fused_sequential"][b, ls:].any() and not got["fused_structural"][b, lt:].any()
        assert_close(got["seq_similarity"][b, :ls, :ls], want["seq_similarity"])
        assert not got["seq_similarity"][b, ls:].any() and not got["seq_similarity"][b, :, ls:].any()
        for h in range(heads):
            probs = got["attention_weights_seq_to_struct"][h][b]
            assert_close(probs[:ls, :lt], want["attention_weights_seq_to_struct"][h])
            assert (probs[:, lt:] == 0).all()  # padded keys get exactly zero weight
            assert (probs[ls:] == 0).all()  # padded query rows are zeros


def test_fully_masked_row_is_uniform_over_valid_keys_only():
    rng = np.random.default_rng(5)
    model = CrossAttention(4, 1, seed=0, backend="numpy")
    q, k = rand(rng, 2, 3, 4), rand(rng, 2, 5, 4)
    mask = np.ones((3, 5))
    mask[1] = 0
    _, w = model.scaled_dot_product_attention(q, k, k, mask, key_lengths=[5, 2], need_weights=True)
    assert np.allclose(w[0, 1], 1 / 5)
    assert np.allclose(w[1, 1], [0.5, 0.5, 0, 0, 0])


def test_mask_is_distinct_from_lengths():
    # Masking every key gives uniform weights over the valid keys; padded keys stay at exactly zero.
    rng = np.random.default_rng(6)
    model = CrossAttention(4, 1, seed=0, backend="numpy")
    q, k = rand(rng, 1, 2, 4), rand(rng, 1, 4, 4)
    _, w = model.scaled_dot_product_attention(q, k, k, np.zeros((2, 4)), key_lengths=[3], need_weights=True)
    assert np.allclose(w[0, :, :3], 1 / 3) and (w[0, :, 3] == 0).all()


def test_zero_rows_give_zero_similarity_not_nan():
    model = CrossAttention(4, 1, seed=0, backend="numpy")
    seq = np.zeros((3, 4))
    seq[0] = 1.0
    result = model.fuse_representations(seq, np.ones((3, 4)))
    assert np.isfinite(result["seq_similarity"]).all()
    assert (result["seq_similarity"][1:] == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    rng = np.random.default_rng(7)
    model = CrossAttention(32, 2, seed=0, backend="numpy")
    seq, struct = rand(rng, 3, 20, 32), rand(rng, 3, 20, 32)
    got = model.fuse_representations(seq.astype(dtype), struct.astype(dtype))
    assert got["fused_sequential"].dtype == dtype
    exact = model.fuse_representations(seq.astype(dtype).astype(np.float64), struct.astype(dtype).astype(np.float64))
    rtol = 1e-5 if dtype == np.float32 else 2e-3
    assert_close(got["fused_sequential"], exact["fused_sequential"], rtol=rtol)


@pytest.mark.parametrize("backend", ["numpy", "onnx"])
@pytest.mark.parametrize("dtypes,computed", [(("float32", "float64"), "float64"), (("float16", "float64"), "float64"),
                                             (("float16", "float32"), "float32"), (("float64", "float16"), "float64")])
def test_inputs_of_mixed_dtypes_are_computed_in_the_one_that_holds_both(backend, dtypes, computed):
    """With the model's dtype following the inputs, a call computes in (and returns) the dtype that holds
    every input's: the results those inputs converted to it give, never a narrower dtype's."""
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(9)
    model = CrossAttention(16, 2, seed=0, backend=backend)
    seq, struct = rand(rng, 2, 7, 16).astype(dtypes[0]), rand(rng, 2, 7, 16).astype(dtypes[1])
    want = model.fuse_representations(seq.astype(computed), struct.astype(computed))
    got = model.fuse_representations(seq, struct)
    for key in ("fused_sequential", "fused_structural", "bidirectional_fusion", "seq_similarity"):
        assert got[key].dtype == computed and np.array_equal(got[key], want[key]), key
    values = struct.astype(dtypes[0])
    out, probs = model.multi_head_attention(seq, struct, values, need_weights=True)
    want_out, want_probs = model.multi_head_attention(seq.astype(computed), struct.astype(computed),
                                                      values.astype(computed), need_weights=True)
    assert out.dtype == computed and np.array_equal(out, want_out)
    assert all(np.array_equal(p, w) for p, w in zip(probs, want_probs))


def test_dtype_argument_casts_inputs_and_outputs():
    rng = np.random.default_rng(8)
    model = CrossAttention(8, 1, seed=0, dtype="float32", backend="numpy")
    out, _ = model.multi_head_attention(rand(rng, 4, 8), rand(rng, 4, 8), rand(rng, 4, 8))
    assert out.dtype == np.float32 and model.dtype == "float32"


def test_float32_precision_is_a_permission_the_cpu_computes_in_ieee(tmp_path):
    """tf32x3 and tf32 permit TF32 tensor cores; the CPU backends have none and compute IEEE float32,
    bit for bit as with "ieee". The choice shows in the report and survives from_weights and load."""
    rng = np.random.default_rng(0)
    seq, struct = rng.standard_normal((2, 5, 8)).astype(np.float32), rng.standard_normal((2, 6, 8)).astype(np.float32)
    ieee = CrossAttention(8, 2, seed=0, backend="numpy")
    ieee.save(tmp_path / "w.safetensors")

    def ieee_result(backend: str):
        model = CrossAttention.from_weights(**ieee.get_attention_weights(), backend=backend)
        return model.fuse_representations(seq, struct, bidirectional=False)["fused_sequential"]

    for precision in ("tf32x3", "tf32"):
        for model in (CrossAttention(8, 2, seed=0, backend="numpy", float32_precision=precision),
                      CrossAttention.from_weights(**ieee.get_attention_weights(), float32_precision=precision),
                      CrossAttention.load(tmp_path / "w.safetensors", float32_precision=precision)):
            assert model.float32_precision == precision and f"float32_precision={precision!r}" in repr(model)
            report = model.generate_report()
            assert report["float32_precision"] == precision and f"({precision})" in report["summary"]
            got = model.fuse_representations(seq, struct, bidirectional=False)["fused_sequential"]
            if model.backend in ("numpy", "onnx"):  # auto takes a GPU backend where there is one
                assert np.array_equal(got, ieee_result(model.backend))
    assert "float32 GEMMs: IEEE float32" in ieee.generate_report()["summary"]
    with pytest.raises(ValueError, match="float32_precision must be one of ieee, tf32x3, tf32; got 'fast'"):
        CrossAttention(8, 2, float32_precision="fast")


def test_large_batch_is_chunked_without_changing_results(monkeypatch):
    from crossattn_gpu.backends import numpy_backend

    rng = np.random.default_rng(9)
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    seq, struct = rand(rng, 7, 5, 8), rand(rng, 7, 6, 8)
    whole = model.fuse_representations(seq, struct, bidirectional=False, need_weights=True)
    monkeypatch.setattr(numpy_backend, "SCORE_CHUNK_ELEMENTS", 2 * 5 * 6 * 2)  # two examples per chunk
    chunked = model.fuse_representations(seq, struct, bidirectional=False, need_weights=True)
    for key in ("fused_sequential", "fused_structural"):
        assert np.array_equal(whole[key], chunked[key])
    assert np.array_equal(whole["attention_weights_struct_to_seq"][1], chunked["attention_weights_struct_to_seq"][1])


@pytest.mark.parametrize("min_block", [1, 128])
def test_long_examples_are_chunked_by_queries_without_changing_results(monkeypatch, min_block):
    """An example whose scores pass SCORE_CHUNK_ELEMENTS is cut into blocks of its queries: memory
    stays bounded whatever L is. Masks, lengths, probabilities and lse follow the blocks."""
    from crossattn_gpu.backends import numpy_backend

    rng = np.random.default_rng(11)
    q, k, v = rand(rng, 2, 3, 300, 4), rand(rng, 2, 1, 7, 4), rand(rng, 2, 3, 7, 5)
    masked = rng.random((2, 300, 7)) < 0.3
    lengths = np.array([7, 4])
    kwargs = dict(scale=0.5, masked=masked, k_lengths=lengths, need_weights=True, need_lse=True)
    whole = numpy_backend.attention(q, k, v, **kwargs)
    monkeypatch.setattr(numpy_backend, "SCORE_CHUNK_ELEMENTS", 3 * 7 * 50)  # 50 queries' scores
    monkeypatch.setattr(numpy_backend, "MIN_QUERY_BLOCK", min_block)
    chunks = numpy_backend._chunks(2, 3, 300, 7)
    assert len(chunks) == (2 * 6 if min_block == 1 else 2 * 3)  # blocks of 50 queries, or of 128
    for got, want in zip(numpy_backend.attention(q, k, v, **kwargs), whole):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_assigning_weights_takes_effect_on_next_call():
    rng = np.random.default_rng(10)
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    seq, struct = rand(rng, 5, 8).astype(np.float32), rand(rng, 5, 8).astype(np.float32)
    before = model.fuse_representations(seq, struct)["fused_sequential"]  # fills the float32 cache
    new_value = model.value_weights * 2
    model.value_weights = new_value
    after = model.fuse_representations(seq, struct)["fused_sequential"]
    assert np.allclose(after, 2 * before, rtol=1e-5)
    with pytest.raises(ValueError, match="read-only"):
        model.query_weights[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match=r"value_weights must have shape \(2, 8, 8\)"):
        model.value_weights = np.zeros((2, 8, 7))


def test_weights_assigned_while_a_build_runs_are_the_ones_later_calls_use(monkeypatch):
    """Another thread assigning weights while a call folds the old ones: the old fold once landed in
    the cleared cache, and every later call used the old weights."""
    rng = np.random.default_rng(12)
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    seq, struct = rand(rng, 5, 8), rand(rng, 5, 8)
    doubled = model.value_weights * 2
    build = model._backend.prepare_weights

    def build_while_another_thread_assigns(*args, **kwargs):
        prepared = build(*args, **kwargs)
        model.value_weights = doubled  # as if in another thread, during the build
        return prepared

    monkeypatch.setattr(model._backend, "prepare_weights", build_while_another_thread_assigns)
    first = model.fuse_representations(seq, struct)["fused_sequential"]  # the old weights: it began first
    monkeypatch.undo()
    later = model.fuse_representations(seq, struct)["fused_sequential"]
    np.testing.assert_allclose(later, 2 * first, rtol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "onnx"])
def test_repeated_fusions_of_a_layout_skip_its_checks_not_the_values(monkeypatch, backend):
    """A fusion without mask or lengths keeps what its call settled from the inputs' layout (NumPy arrays'
    shapes, strides and dtypes) and flags (``CrossAttention._plan``): the next calls of that
    layout skip those checks, not the values' (NaN, Inf, past the compute dtype) nor that of the room for
    the results, and give what the whole path gives. Other layouts and flags, array-likes, masks and
    lengths take the whole path."""
    from crossattn_gpu import _memory

    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    model = CrossAttention(16, 2, seed=3, backend=backend)
    whole = whole_paths(monkeypatch, model)
    rng = np.random.default_rng(31)
    layouts = {"float64": lambda: (rand(rng, 2, 9, 16), rand(rng, 2, 9, 16)),
               "float32": lambda: tuple(rand(rng, 2, 9, 16).astype(np.float32) for _ in range(2)),
               "other strides": lambda: tuple(np.asfortranarray(rand(rng, 2, 9, 16)) for _ in range(2)),
               "2-D": lambda: (rand(rng, 9, 16), rand(rng, 7, 16))}
    for name, draw in layouts.items():
        flags = {"bidirectional": name != "2-D"}
        count = len(whole)
        for _ in range(3):
            xs, xt = draw()
            got = model.fuse_representations(xs, xt, **flags)
            want = CrossAttention.from_weights(**model.get_attention_weights(), backend=backend).fuse_representations(
                xs, xt, **flags)
            for key, value in want.items():
                if isinstance(value, list):
                    assert all(np.array_equal(g, w) for g, w in zip(got[key], value)), key
                elif isinstance(value, np.ndarray):
                    assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
                else:
                    assert got[key] == value, key
        assert len(whole) == count + 1, name  # the first call of a layout alone

    def outcome(model, xs, xt):
        try:
            return model.fuse_representations(xs, xt, need_similarity=False)["fused_sequential"].tolist()
        except (ValueError, OverflowError) as exc:
            return type(exc), str(exc)

    # The values are checked in every call, as the whole path checks them.
    xs, xt = layouts["float32"]()
    for dtype in (None, "float16"):
        planned = CrossAttention.from_weights(**model.get_attention_weights(), backend=backend, dtype=dtype)
        planned.fuse_representations(xs, xt, need_similarity=False)
        for place, bad in (((1, 3, 5), np.nan), ((0, 8, 1), -np.inf), ((0, 0, 0), 1e5), ((1, 2, 3), 3e38)):
            poisoned = xs.copy()
            poisoned[place] = bad
            whole_path = CrossAttention.from_weights(**model.get_attention_weights(), backend=backend, dtype=dtype)
            assert outcome(planned, poisoned, xt) == outcome(whole_path, poisoned, xt), (dtype, bad)
        with pytest.raises(ValueError, match="sequential_repr contains NaN"):
            planned.fuse_representations(np.full_like(xs, np.nan), xt, need_similarity=False)
    with pytest.MonkeyPatch.context() as tight:
        tight.setattr(_memory, "CHECKED_FROM_BYTES", 0)
        tight.setattr(_memory, "available_bytes", lambda: 1000)
        with pytest.raises(MemoryError, match="similarities"):
            model.fuse_representations(xs, xt)

    count = len(whole)
    for kwargs in ({"mask": np.ones((9, 9))}, {"sequential_lengths": np.array([9, 4]), "structural_lengths": [9, 4]},
                   {"need_similarity": np.False_}):
        for _ in range(2):
            model.fuse_representations(xs, xt, **kwargs)
    for _ in range(2):
        model.fuse_representations(xs.tolist(), xt)
    assert len(whole) == count + 8

    # A model keeps a bounded number of plans, and each call's results are its own.
    def contiguous(xs, xt):
        return np.ascontiguousarray(xs), np.ascontiguousarray(xt)

    def same_as_a_fresh_model(got, xs, xt):
        want = CrossAttention.from_weights(**model.get_attention_weights(), backend=backend).fuse_representations(
            *contiguous(xs, xt), need_similarity=False)
        assert np.array_equal(got["bidirectional_fusion"], want["bidirectional_fusion"]), xs.shape

    fuse_more_layouts_than_kept(model, rand(rng, 2, _PLANS_KEPT + 3, 16), rand(rng, 2, _PLANS_KEPT + 3, 16),
                                contiguous, same_as_a_fresh_model)


@pytest.mark.parametrize("method", ["multi_head_attention", "scaled_dot_product_attention"])
@pytest.mark.parametrize("backend", ["numpy", "onnx"])
def test_repeated_attentions_of_a_layout_skip_its_checks_not_the_values(monkeypatch, backend, method):
    """``multi_head_attention`` and ``scaled_dot_product_attention`` keep plans as the fusion does: the next
    calls of a layout (the three inputs' shapes, strides and dtypes) and flags skip its checks, not the
    values' nor that of the room for the results, and give what the whole path gives (keys given as the
    values too). Other layouts, a mask, lengths, flags that are not bools and array-likes take the whole
    path; new weights, the new ones."""
    from crossattn_gpu import _memory

    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    model = CrossAttention(16, 2, seed=4, backend=backend)
    whole = whole_paths(monkeypatch, model)
    rng = np.random.default_rng(32)
    values_width = 5 if method == "scaled_dot_product_attention" else 16  # its values may be of any width
    layouts = {"float64": lambda: (rand(rng, 2, 9, 16), rand(rng, 2, 6, 16), rand(rng, 2, 6, values_width)),
               "float32": lambda: tuple(rand(rng, 2, n, w).astype(np.float32) for n, w in ((9, 16), (6, 16),
                                                                                          (6, values_width))),
               "other strides": lambda: tuple(np.asfortranarray(rand(rng, 2, n, w)) for n, w in ((9, 16), (6, 16),
                                                                                                 (6, values_width))),
               "2-D": lambda: (rand(rng, 9, 16), rand(rng, 7, 16), rand(rng, 7, values_width)),
               "keys as values": lambda: (lambda q, k: (q, k, k))(rand(rng, 2, 9, 16), rand(rng, 2, 9, 16))}

    def fresh():
        return CrossAttention.from_weights(**model.get_attention_weights(), backend=backend)

    def same(got, want):
        (out, probs), (want_out, want_probs) = got, want
        assert out.dtype == want_out.dtype and np.array_equal(out, want_out)
        if isinstance(want_probs, list):
            assert len(probs) == len(want_probs) and all(np.array_equal(g, w) for g, w in zip(probs, want_probs))
        else:
            assert (probs is None and want_probs is None) or np.array_equal(probs, want_probs)

    for name, draw in layouts.items():
        count = len(whole)
        for _ in range(3):
            inputs = draw()
            same(getattr(model, method)(*inputs), getattr(fresh(), method)(*inputs))
        assert len(whole) == count + 1, name  # the first call of a layout alone
    q, k, v = layouts["float64"]()
    same(getattr(model, method)(q, k, v, need_weights=True), getattr(fresh(), method)(q, k, v, need_weights=True))

    def outcome(model, *inputs):
        try:
            return getattr(model, method)(*inputs)[0].tolist()
        except (ValueError, OverflowError) as exc:
            return type(exc), str(exc)

    # The values are checked in every call, as the whole path checks them, in each of the three inputs.
    inputs = layouts["float32"]()
    for dtype in (None, "float16"):
        planned = CrossAttention.from_weights(**model.get_attention_weights(), backend=backend, dtype=dtype)
        getattr(planned, method)(*inputs)
        for which, place, bad in ((0, (1, 3, 5), np.nan), (1, (0, 5, 1), -np.inf), (2, (0, 0, 0), 1e5),
                                  (2, (1, 2, 3), 3e38), (1, (1, 1, 1), 3e38)):
            poisoned = [x.copy() for x in inputs]
            poisoned[which][place] = bad
            whole_path = CrossAttention.from_weights(**model.get_attention_weights(), backend=backend, dtype=dtype)
            assert outcome(planned, *poisoned) == outcome(whole_path, *poisoned), (dtype, which, bad)
        with pytest.raises(ValueError, match="keys contains NaN|key_seq contains NaN"):
            getattr(planned, method)(inputs[0], np.full_like(inputs[1], np.nan), inputs[2])
    with pytest.MonkeyPatch.context() as tight:
        tight.setattr(_memory, "CHECKED_FROM_BYTES", 0)
        tight.setattr(_memory, "available_bytes", lambda: 100)
        with pytest.raises(MemoryError, match="output"):
            getattr(model, method)(*inputs)

    # New weights: the whole path again, with the new ones (scaled_dot_product_attention uses none).
    count = len(whole)
    model.value_weights = model.value_weights * 2
    same(getattr(model, method)(*inputs), getattr(fresh(), method)(*inputs))
    assert len(whole) == count + 1

    count = len(whole)
    q, k, v = inputs
    for kwargs in ({"mask": np.ones((9, 6))}, {"query_lengths": np.array([9, 4]), "key_lengths": [6, 1]},
                   {"need_weights": np.False_}):
        for _ in range(2):
            getattr(model, method)(q, k, v, **kwargs)
    for _ in range(2):
        getattr(model, method)(q.tolist(), k, v)
    assert len(whole) == count + 8


def test_from_weights_round_trips_parameters():
    base = CrossAttention(6, 2, seed=3, backend="numpy")
    clone = CrossAttention.from_weights(**base.get_attention_weights(), backend="numpy")
    for name, value in base.get_attention_weights().items():
        assert np.array_equal(getattr(clone, name), value)
    assert clone.embedding_dim == 6 and clone.attention_heads == 2 and clone.backend == "numpy"


def test_inputs_are_never_modified():
    rng = np.random.default_rng(11)
    model = CrossAttention(6, 2, seed=0, backend="numpy")
    seq, struct = rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 4, 6))
    before = seq.copy(), struct.copy()
    model.fuse_representations(seq, struct, sequential_lengths=[5, 2], structural_lengths=[1, 4], bidirectional=False)
    assert np.array_equal(seq, before[0]) and np.array_equal(struct, before[1])


def test_a_model_pickles_and_copies_with_its_weights_and_settings():
    """The state is the weights and the settings; a copy's weights are its own."""
    import copy
    import pickle

    rng = np.random.default_rng(13)
    model = CrossAttention(8, 2, seed=0, backend="numpy", dtype="float32")
    seq, struct = rand(rng, 2, 5, 8), rand(rng, 2, 5, 8)
    want = model.fuse_representations(seq, struct)["bidirectional_fusion"]  # prepared weights cached
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), copy.copy(model)):
        assert repr(clone) == repr(model)
        np.testing.assert_array_equal(clone.fuse_representations(seq, struct)["bidirectional_fusion"], want)
        clone.value_weights = 2 * clone.value_weights
        np.testing.assert_array_equal(model.fuse_representations(seq, struct)["bidirectional_fusion"], want)


def _fuse_in_another_process(model, seq, struct):
    return model.fuse_representations(seq, struct)["bidirectional_fusion"]


def test_a_model_goes_to_a_spawned_process():
    """``multiprocessing`` with spawn (the default on macOS and Windows, forkserver on Linux from
    Python 3.14) pickles the model."""
    import multiprocessing

    rng = np.random.default_rng(14)
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    seq, struct = rand(rng, 2, 5, 8), rand(rng, 2, 5, 8)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        there = pool.apply(_fuse_in_another_process, (model, seq, struct))
    np.testing.assert_array_equal(there, model.fuse_representations(seq, struct)["bidirectional_fusion"])
