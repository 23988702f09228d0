"""Every bad input named in the foundation issue gets a clear TypeError or ValueError."""

import numpy as np
import pytest

from crossattn_gpu import CrossAttention, available_backends

D = 8


@pytest.fixture
def model():
    return CrossAttention(D, 2, seed=0, backend="numpy")


def good(*shape):
    return np.random.default_rng(0).standard_normal(shape)


@pytest.mark.parametrize(
    "seq,struct,kwargs,error,message",
    [
        (good(4), good(4, D), {}, ValueError, r"sequential_repr must have shape \(L, D\) or \(B, L, D\); got rank 1"),
        (good(1, 2, 4, D), good(4, D), {}, ValueError, "got rank 4"),
        (good(4, D + 1), good(4, D), {}, ValueError, "sequential_repr has last dimension 9, but this CrossAttention has embedding_dim=8"),
        (good(4, D), good(4, 3), {}, ValueError, "structural_repr has last dimension 3"),
        (np.ones((4, D), dtype=np.int64), good(4, D), {}, TypeError, "sequential_repr must be floating point"),
        (np.ones((4, D), dtype=bool), good(4, D), {}, TypeError, "must be floating point"),
        (good(4, D) + 1j, good(4, D), {}, TypeError, "complex"),
        (np.array([["a"] * D]), good(4, D), {}, TypeError, "floating point"),
        (good(0, D), good(4, D), {}, ValueError, "empty axis L"),
        (good(2, 0, D), good(2, 4, D), {}, ValueError, "empty axis L"),
        (np.full((4, D), np.nan), good(4, D), {}, ValueError, "sequential_repr contains NaN"),
        (good(4, D), np.full((4, D), np.inf), {}, ValueError, "structural_repr contains Inf"),
        (good(2, 4, D), good(4, D), {}, ValueError, "all be"),
        (good(2, 4, D), good(3, 4, D), {}, ValueError, "batch sizes differ"),
        (good(4, D), good(5, D), {}, ValueError, "needs Ls == Lt.*bidirectional=False"),
        (good(4, D), good(4, D), {"mask": np.ones((3, 4))}, ValueError, r"mask of shape \(3, 4\) does not broadcast to \(4, 4\)"),
        (good(2, 4, D), good(2, 4, D), {"mask": np.ones((3, 4, 4))}, ValueError, "does not broadcast"),
        (good(4, D), good(4, D), {"mask": np.ones((1, 1, 4, 4))}, ValueError, "mask has rank 4"),
        (good(4, D), good(4, D), {"mask": np.full((4, 4), np.nan)}, ValueError, "mask contains NaN"),
        (good(4, D), good(4, D), {"mask": np.full((4, 4), "x")}, TypeError, "mask must be boolean or real numeric"),
        (good(2, 4, D), good(2, 4, D), {"sequential_lengths": [4, 5]}, ValueError, r"sequential_lengths must lie in 1..4"),
        (good(2, 4, D), good(2, 4, D), {"sequential_lengths": [4, 0]}, ValueError, "must lie in 1..4"),
        (good(2, 4, D), good(2, 4, D), {"structural_lengths": [-1, 2]}, ValueError, "structural_lengths must lie in"),
        (good(2, 4, D), good(2, 4, D), {"sequential_lengths": [4]}, ValueError, r"must have shape \(2,\)"),
        (good(2, 4, D), good(2, 4, D), {"sequential_lengths": [[4, 4]]}, ValueError, r"must have shape \(2,\)"),
        (good(2, 4, D), good(2, 4, D), {"sequential_lengths": [4.0, 3.0]}, TypeError, "must be an integer array"),
        (good(2, 4, D), good(2, 4, D), {"sequential_lengths": [True, True]}, TypeError, "integer array"),
        (good(4, D), good(4, D), {"sequential_lengths": [4]}, ValueError, "applies to batched"),
        (good(2, 4, D), good(2, 4, D), {"sequential_lengths": [4, 3], "structural_lengths": [4, 4]}, ValueError, "example 1 has 3 and 4"),
    ],
)
def test_bad_fuse_inputs(model, seq, struct, kwargs, error, message):
    with pytest.raises(error, match=message):
        model.fuse_representations(seq, struct, **kwargs)
    # a bad call leaves no state behind
    assert model.fuse_representations(good(3, D), good(3, D))["fused_sequential"].shape == (3, D)


def test_ragged_lengths_without_bidirectional_are_fine(model):
    result = model.fuse_representations(
        good(2, 4, D), good(2, 5, D), sequential_lengths=[4, 3], structural_lengths=[5, 1], bidirectional=False
    )
    assert result["bidirectional_fusion"] is None
    assert result["fused_structural"].shape == (2, 5, D)


def test_bad_attention_inputs(model):
    with pytest.raises(ValueError, match="keys and values must have the same length"):
        model.scaled_dot_product_attention(good(3, D), good(4, D), good(5, D))
    with pytest.raises(ValueError, match="keys has last dimension 4"):
        model.scaled_dot_product_attention(good(3, D), good(4, 4), good(4, D))
    with pytest.raises(ValueError, match="key_seq and value_seq must have the same length"):
        model.multi_head_attention(good(3, D), good(4, D), good(5, D))
    with pytest.raises(ValueError, match="value_seq has last dimension"):
        model.multi_head_attention(good(3, D), good(4, D), good(4, 2))
    with pytest.raises(ValueError, match="query_lengths must lie"):
        model.multi_head_attention(good(1, 3, D), good(1, 4, D), good(1, 4, D), query_lengths=[7])


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"embedding_dim": 0}, ValueError, "embedding_dim must be >= 1"),
        ({"embedding_dim": 2.5}, TypeError, "embedding_dim must be an integer"),
        ({"attention_heads": True}, TypeError, "attention_heads must be an integer"),
        ({"backend": "tpu"}, ValueError, "unknown backend 'tpu'"),
        ({"backend": None}, TypeError, "backend must be a string"),
        ({"dtype": "int8"}, ValueError, "dtype must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        CrossAttention(**kwargs)


def test_device_arrays_are_refused_by_the_cpu_backend(model):
    class FakeCupyArray:
        __cuda_array_interface__ = {}

    with pytest.raises(TypeError, match="on a GPU, but backend 'numpy' takes host arrays"):
        model.fuse_representations(FakeCupyArray(), good(4, D))
    if "onnx" in available_backends():  # the backend that inherits the check names itself
        onnx_model = CrossAttention.from_weights(**model.get_attention_weights(), backend="onnx")
        with pytest.raises(TypeError, match="on a GPU, but backend 'onnx' takes host arrays"):
            onnx_model.fuse_representations(FakeCupyArray(), good(4, D))


def test_from_weights_checks_shapes_and_dtypes():
    w = CrossAttention(4, 2, seed=0).get_attention_weights()
    with pytest.raises(ValueError, match=r"output_weights must have shape \(8, 4\)"):
        CrossAttention.from_weights(w["query_weights"], w["key_weights"], w["value_weights"], np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"query_weights must have shape \(H, D, D\)"):
        CrossAttention.from_weights(np.zeros((2, 4, 3)), w["key_weights"], w["value_weights"], w["output_weights"])
    with pytest.raises(TypeError, match="key_weights must be a real floating-point array"):
        CrossAttention.from_weights(w["query_weights"], w["key_weights"].astype(int), w["value_weights"], w["output_weights"])
    with pytest.raises(ValueError, match="value_weights contains NaN"):
        CrossAttention.from_weights(w["query_weights"], w["key_weights"], w["value_weights"] * np.nan, w["output_weights"])
    with pytest.raises(TypeError, match=r"from_weights\(\) got unexpected keyword arguments: seed \(it takes backend"):
        CrossAttention.from_weights(**w, seed=3)


def test_a_late_finiteness_verdict_is_read_after_the_work_and_before_any_result(model, monkeypatch):
    """The Triton backend on a GPU hands back the inputs' largest magnitude (their finiteness verdict) as
    a function to call later (the read is a synchronisation). Every method must then queue its work
    first, read the verdict, and raise the named error instead of returning results."""
    backend, events = model._backend, []

    def late_magnitude(*arrays):
        magnitude = type(backend).largest_magnitude(*arrays)

        def read():
            events.append("verdict read")
            return magnitude

        return read

    monkeypatch.setattr(backend, "largest_magnitude", late_magnitude)
    for work in ("fuse", "multi_head_attention", "scaled_dot_product_attention"):
        def logged(*args, _work=work, _original=getattr(backend, work), **kwargs):
            events.append(_work)
            return _original(*args, **kwargs)

        monkeypatch.setattr(backend, work, logged)
    bad = np.full((4, D), np.nan)
    calls = [
        (lambda: model.fuse_representations(bad, good(4, D)), "sequential_repr contains NaN", "fuse"),
        (lambda: model.multi_head_attention(good(4, D), good(4, D), bad), "value_seq contains NaN", "multi_head_attention"),
        (lambda: model.scaled_dot_product_attention(good(4, D), bad, good(4, D)), "keys contains NaN",
         "scaled_dot_product_attention"),
        (lambda: model.fuse_representations(good(4, D), good(4, D), mask=np.full((4, 4), np.inf)),
         "mask contains NaN or Inf", "fuse"),  # a float mask's verdict: read late as well, first
    ]
    for call, message, work in calls:
        events.clear()
        with np.errstate(all="ignore"), pytest.raises(ValueError, match=message):
            call()
        assert events == [work, "verdict read"]
    events.clear()
    assert model.fuse_representations(good(3, D), good(3, D))["fusion_complete"]
    assert events == ["fuse", "verdict read"]
    events.clear()
    assert model.fuse_representations(good(3, D), good(3, D), mask=np.ones((3, 3)))["fusion_complete"]
    assert events == ["fuse", "verdict read", "verdict read"]


def test_a_masked_array_without_masked_entries_is_its_data(model):
    xs, xt = good(4, D), good(5, D)
    plain = model.fuse_representations(xs, xt, bidirectional=False)["fused_sequential"]
    unmasked = model.fuse_representations(np.ma.masked_array(xs), xt, bidirectional=False)["fused_sequential"]
    np.testing.assert_array_equal(unmasked, plain)


def test_late_length_verdicts_are_read_after_the_work_and_before_any_result(model, monkeypatch):
    """A backend that checks lengths on its device (the Triton backend's device lengths) hands back
    clamped lengths and a verdict read later. The front end must queue the work on the clamped lengths
    first, read the verdict, and on a failed one raise the host check's error (or, if the host finds
    nothing wrong, an AssertionError: the backend's bug)."""
    backend, events = model._backend, []

    def late_lengths(lengths, tops, equal):
        clamped = [None if n is None else np.clip(n, 1, top) for n, top in zip(lengths, tops)]
        failed = any(n is not None and (n != c).any() for n, c in zip(lengths, clamped))
        events.append(("clamped", [None if c is None else c.tolist() for c in clamped]))
        return clamped, lambda: events.append("verdict read") or failed or backend_bug

    backend_bug = False
    monkeypatch.setattr(backend, "checks_lengths_late", lambda lengths: isinstance(lengths, np.ndarray))
    monkeypatch.setattr(backend, "late_lengths", late_lengths, raising=False)
    fuse = backend.fuse
    monkeypatch.setattr(backend, "fuse", lambda *a, **k: events.append("fuse") or fuse(*a, **k))
    x = good(2, 4, D)
    with pytest.raises(ValueError, match=r"structural_lengths must lie in 1..4 .* from 2 to 7"):
        model.fuse_representations(x, x, structural_lengths=np.array([7, 2]), bidirectional=False)
    assert events == [("clamped", [None, [4, 2]]), "fuse", "verdict read"]
    events.clear()
    out = model.fuse_representations(x, x, sequential_lengths=np.array([4, 2]), structural_lengths=np.array([4, 2]))
    assert out["fusion_complete"] and events == [("clamped", [[4, 2], [4, 2]]), "fuse", "verdict read"]
    backend_bug = True
    with pytest.raises(AssertionError, match="the device found the lengths invalid, the host did not"):
        model.fuse_representations(x, x, sequential_lengths=np.array([4, 2]), bidirectional=False)
    with pytest.raises(ValueError, match=r"sequential_lengths must have shape \(2,\)"):  # shapes: at once
        model.fuse_representations(x, x, sequential_lengths=np.array([4]), bidirectional=False)
