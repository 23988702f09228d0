"""OnnxFusion: input checks, providers, and the refusal of unsafe or corrupt files."""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto  # noqa: E402

from concurrency import assert_a_forked_child_gets, overlapping_results  # noqa: E402
from crossattn_gpu import CrossAttention, _memory  # noqa: E402
from crossattn_gpu.export import OnnxFusion, runner, to_onnx  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "fusion.onnx"
    return to_onnx(CrossAttention(8, 2, seed=0), path)


@pytest.fixture(scope="module")
def fusion(exported):
    return OnnxFusion(exported)


@pytest.mark.parametrize(
    "args,kwargs,error,message",
    [
        ((np.ones((1, 1, 3, 8)), np.ones((1, 3, 8))), {}, ValueError, r"sequential_repr must have shape \(L, D\) or \(B, L, D\)"),
        ((np.ones((3, 8)), np.ones((1, 3, 8))), {}, ValueError, r"must all be \(L, D\) or all be \(B, L, D\)"),
        ((np.ones((3, 8)), np.ones((3, 8))), {"sequential_lengths": [3]}, ValueError, "applies to batched"),
        ((np.ones((3, 8)), np.ones((3, 8))), {"mask": np.ones((1, 3, 3))}, ValueError, "mask has rank 3"),
        ((np.ones((1, 3, 7)), np.ones((1, 3, 8))), {}, ValueError, "sequential_repr has width 7, but the model has D=8"),
        ((np.ones((2, 3, 8)), np.ones((1, 3, 8))), {}, ValueError, "batch sizes differ"),
        ((np.ones((1, 3, 8), dtype=int), np.ones((1, 3, 8))), {}, TypeError, "sequential_repr must be floating point"),
        ((np.ones((1, 3, 8)), np.ones((1, 3, 8))), {"sequential_lengths": [4]}, ValueError, "must lie in 1..3"),
        ((np.ones((1, 3, 8)), np.ones((1, 3, 8))), {"sequential_lengths": [1.5]}, TypeError, "integer array"),
        ((np.ones((2, 3, 8)), np.ones((2, 3, 8))), {"sequential_lengths": [3, 2], "structural_lengths": [3, 3]}, ValueError,
         "needs equal sequential and structural lengths per example; example 1 has 2 and 3"),
        ((np.ones((1, 3, 8)), np.ones((1, 3, 8))), {"mask": np.ones((3, 3))}, TypeError, "unknown input"),
        ((np.ones((1, 0, 8)), np.ones((1, 3, 8))), {}, ValueError, "sequential_repr has an empty axis L"),
        ((np.ones((1, 3, 8)), np.full((1, 3, 8), np.nan)), {}, ValueError, "structural_repr contains NaN"),
        ((np.full((1, 3, 8), 1e39), np.ones((1, 3, 8))), {}, ValueError, "sequential_repr reaches 1e\\+39 in magnitude, past float32"),
    ],
)
def test_bad_inputs(fusion, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        fusion(*args, **kwargs)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the named error, not NumPy's overflow warnings before it
@pytest.mark.parametrize("dtype,scale,value_scale", [("float32", 1e20, 1.0), ("float16", 1e3, 1e3)])
def test_an_overflow_inside_the_model_is_named(tmp_path, dtype, scale, value_scale):
    """float32 overflows in the scores, float16 in the values (folded value weights up to ~80, inputs of
    ~1e3: values of ~1e5)."""
    w = CrossAttention(8, 2, seed=0).get_attention_weights()
    model = CrossAttention.from_weights(**{**w, "value_weights": w["value_weights"] * value_scale})
    fusion = OnnxFusion(to_onnx(model, tmp_path / "m.onnx", dtype=dtype))
    rng = np.random.default_rng(0)
    xs, xt = rng.standard_normal((2, 5, 8)) * scale, rng.standard_normal((2, 5, 8)) * scale
    with pytest.raises(OverflowError, match=f"came out past {dtype}'s largest value"):
        fusion(xs, xt)
    assert np.isfinite(fusion(xs / scale, xt / scale)["fused_sequential"]).all()


def test_one_example_without_the_batch_axis(tmp_path):
    """(L, D) inputs give CrossAttention's unbatched results, and the batched outputs' first rows."""
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    fusion = OnnxFusion(to_onnx(model, tmp_path / "m.onnx", mask=True, similarity=True, attention_weights=True))
    rng = np.random.default_rng(0)
    xs, xt, mask = rng.standard_normal((5, 8)), rng.standard_normal((5, 8)), rng.random((5, 5)) > 0.3
    got = fusion(xs, xt, mask=mask)
    batched = fusion(xs[None], xt[None], mask=mask[None])
    want = model.fuse_representations(xs, xt, mask=mask, need_weights=True)
    assert sorted(got) == sorted(fusion.output_names)
    for name, value in got.items():
        expected = np.stack(want[name]) if isinstance(want[name], list) else want[name]
        assert value.shape == expected.shape, name
        np.testing.assert_array_equal(value, batched[name][0], err_msg=name)
        np.testing.assert_allclose(value, expected, rtol=0, atol=2e-6 * np.abs(expected).max(), err_msg=name)


def test_repr_says_what_the_model_is(fusion, exported):
    assert repr(fusion) == (
        f"OnnxFusion({os.path.abspath(exported)!r}, embedding_dim=8, attention_heads=2, dtype='float32', "
        "provider='CPUExecutionProvider', inputs=['sequential_repr', 'structural_repr', 'sequential_lengths', "
        "'structural_lengths'], outputs=['fused_sequential', 'fused_structural', 'bidirectional_fusion'])")


def test_float64_inputs_are_cast(fusion):
    out = fusion(np.ones((1, 3, 8)), np.ones((1, 3, 8)))
    assert out["fused_sequential"].dtype == np.float32


def test_unknown_provider_is_an_error(exported):
    with pytest.raises(ValueError, match="onnxruntime here offers"):
        OnnxFusion(exported, providers=["NoSuchExecutionProvider"])


@pytest.fixture
def cuda_that_fails_to_start(monkeypatch):
    """onnxruntime-gpu without its CUDA libraries: it offers the CUDA provider, then leaves it out of a
    session (a line in its log) and runs on the CPU. Records the keyword arguments of each session."""
    real, made = runner._SessionWithoutFallback, []

    def session(source, options, providers, **kwargs):
        made.append(kwargs)
        return real(source, options, providers=[p for p in providers if runner.provider_name(p) != "CUDAExecutionProvider"])

    monkeypatch.setattr(runner.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runner, "_SessionWithoutFallback", session)
    return made


@pytest.mark.parametrize("cuda", ["CUDAExecutionProvider", ("CUDAExecutionProvider", {"device_id": 1})])
def test_a_named_provider_that_fails_to_start_is_an_error(exported, cuda_that_fails_to_start, cuda):
    with pytest.raises(RuntimeError, match=r"onnxruntime could not start CUDAExecutionProvider .* and would run "
                                           r"on CPUExecutionProvider; pass providers=\['CPUExecutionProvider'\]"):
        OnnxFusion(exported, providers=[cuda, "CPUExecutionProvider"])
    assert cuda_that_fails_to_start[-1] == {"enable_fallback": 0}  # nor retried on the CPU by onnxruntime


def test_providers_with_options_as_onnxruntime_takes_them(exported):
    fusion = OnnxFusion(exported, providers=[("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})])
    assert fusion.provider == "CPUExecutionProvider"
    x = np.ones((1, 3, 8))
    np.testing.assert_array_equal(fusion(x, x)["fused_sequential"], OnnxFusion(exported)(x, x)["fused_sequential"])
    for providers, message in (("CPUExecutionProvider", "providers must be a non-empty list"),
                               ([], "providers must be a non-empty list"),
                               ([("CPUExecutionProvider",)], r"each provider must be a name or a \(name, options dict\) "
                                                             r"pair; got \('CPUExecutionProvider',\)"),
                               ([("CPUExecutionProvider", "fast")], "each provider must be a name or")):
        with pytest.raises(TypeError, match=message):
            OnnxFusion(exported, providers=providers)


def test_the_default_providers_run_where_onnxruntime_can_and_say_where(exported, cuda_that_fails_to_start):
    fusion = OnnxFusion(exported)  # the CUDA provider when offered, else the CPU one
    assert fusion.provider == "CPUExecutionProvider"
    # The session and its one-thread twin for small runs; onnxruntime's own retry is off there too.
    assert cuda_that_fails_to_start == [{"enable_fallback": 0}] * 2
    assert fusion(np.ones((1, 3, 8)), np.ones((1, 3, 8)))["fused_sequential"].shape == (1, 3, 8)


@pytest.mark.parametrize("mangle", [lambda b: b[: len(b) // 2], lambda b: b"\x00garbage" * 50, lambda b: b""])
def test_corrupt_or_truncated_files(tmp_path, exported, mangle):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(mangle(exported.read_bytes()))
    with pytest.raises(ValueError, match="not a valid ONNX model|cannot load"):
        OnnxFusion(bad)


def test_damaged_models_are_refused_not_run(tmp_path, exported):
    """One bit flipped at each of 120 places in the file: each copy is refused, or computes exactly
    what the model does (a change protobuf parses to the same model). Before the digest, 21 of 400
    copies with a few bytes changed ran and gave other numbers."""
    import contextlib
    import io

    x = np.random.default_rng(1).standard_normal((2, 5, 8))
    want = OnnxFusion(exported)(x, x)["bidirectional_fusion"]
    raw = exported.read_bytes()
    rng = np.random.default_rng(7)
    refused = 0
    for position in rng.choice(len(raw), size=120, replace=False):
        damaged = bytearray(raw)
        damaged[position] ^= 1 << int(rng.integers(8))
        (tmp_path / "damaged.onnx").write_bytes(bytes(damaged))
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints on some failures
                got = OnnxFusion(tmp_path / "damaged.onnx")(x, x)["bidirectional_fusion"]
        except ValueError:
            refused += 1
            continue
        assert np.array_equal(got, want), f"byte {position} changed: the model ran and computed other numbers"
    assert refused >= 100


def _flip_a_weight_bit(model):
    tensor = next(t for t in model.graph.initializer if t.name == "folded_query_weights")
    tensor.raw_data = bytes([tensor.raw_data[0] ^ 1]) + tensor.raw_data[1:]


def _set_metadata(model, key, value):
    next(prop for prop in model.metadata_props if prop.key == key).value = value


def _drop_the_digest(model):
    model.metadata_props.remove(next(prop for prop in model.metadata_props if prop.key == "model_sha256"))


def _rename_metadata_key(model, key, new_key):
    next(prop for prop in model.metadata_props if prop.key == key).key = new_key


def _reverse_a_weights_dims(model):
    """The same bytes read as another shape: (D, 2*H*D) as (2*H*D, D)."""
    tensor = next(t for t in model.graph.initializer if t.name == "folded_query_weights")
    tensor.dims[:] = list(reversed(tensor.dims))


@pytest.mark.parametrize("edit", [
    _flip_a_weight_bit,
    lambda model: _set_metadata(model, "attention_heads", "3"),
    lambda model: _rename_metadata_key(model, "crossattn_gpu_version", "crossattn_gpu_versioN"),
    lambda model: setattr(model, "producer_name", "crossattn_gpU"),
    _reverse_a_weights_dims,
])
def test_a_model_that_differs_from_its_digest_is_named_damaged(tmp_path, exported, edit):
    model = onnx.load(exported)
    edit(model)
    onnx.save_model(model, str(tmp_path / "edited.onnx"))
    with pytest.raises(ValueError, match="edited.onnx is damaged: what it holds does not match the model_sha256 "
                                         "digest stored when it was exported; export it again"):
        OnnxFusion(tmp_path / "edited.onnx")


def test_the_digest_frames_each_value_so_that_a_split_elsewhere_differs():
    """Two serialised messages of one type, back to back, are one message's bytes ({key} then {value}
    read as {key, value}); the digest takes each repeated value's length too, so such models differ."""
    from crossattn_gpu.export.integrity import model_digest

    split, whole = onnx.ModelProto(), onnx.ModelProto()
    split.metadata_props.add().key = "a"
    split.metadata_props.add().value = "b"
    entry = whole.metadata_props.add()
    entry.key, entry.value = "a", "b"
    assert b"".join(p.SerializeToString() for p in split.metadata_props) == entry.SerializeToString()
    assert model_digest(split) != model_digest(whole)


def test_models_without_a_digest_still_load(tmp_path, exported):
    """Models of other tools, and of crossattn_gpu before it stored the digest, have none to check."""
    model = onnx.load(exported)
    _drop_the_digest(model)
    onnx.save_model(model, str(tmp_path / "older.onnx"))
    x = np.ones((1, 3, 8))
    np.testing.assert_array_equal(OnnxFusion(tmp_path / "older.onnx")(x, x)["fused_sequential"],
                                  OnnxFusion(exported)(x, x)["fused_sequential"])


_NOT_UTF8 = "the model's input or output names, axis names or metadata are not valid UTF-8"


@pytest.mark.parametrize("damaged,message", [
    (b"XXXXXXXX", _NOT_UTF8),  # a metadata value
    (b"fused_structural", _NOT_UTF8),  # an output's name
    (b"len_s", _NOT_UTF8),  # an input's dynamic axis (onnxruntime decodes it when the shape is read)
    (b"Transpose", "onnxruntime cannot load the model: .*held bytes that are not UTF-8: a damaged file"),  # an op
])
def test_bytes_that_are_not_utf8_are_named(tmp_path, exported, damaged, message, capfd):
    """In a model that no longer says it comes from crossattn_gpu (so no digest is asked for),
    onnxruntime's UnicodeDecodeError (on Python 3.10 with onnxruntime 1.18, an error with an empty message)
    becomes an error that says what is wrong, and onnxruntime does not take it for a provider's failure: no
    banner on stdout, no second load on the CPU (1.18 to 1.22 printed one, ignoring ``enable_fallback=0``)."""
    model = onnx.load(exported)
    model.producer_name = ""
    kept = [prop for prop in model.metadata_props if prop.key not in ("crossattn_gpu_version", "model_sha256")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    _set_metadata(model, "flavour", "XXXXXXXX")
    raw = model.SerializeToString()
    assert damaged in raw
    (tmp_path / "bad_utf8.onnx").write_bytes(raw.replace(damaged, b"\xff" * len(damaged)))
    with pytest.raises(ValueError, match=message):
        OnnxFusion(tmp_path / "bad_utf8.onnx")
    assert capfd.readouterr().out == ""


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX model at .*none.onnx$"):
        OnnxFusion(tmp_path / "none.onnx")
    with pytest.raises(IsADirectoryError, match="is a folder; name the .onnx file in it"):
        OnnxFusion(tmp_path)
    if os.path.exists("/dev/null"):
        with pytest.raises(FileNotFoundError, match=r"no ONNX model at /dev/null \(not a regular file\)"):
            OnnxFusion("/dev/null")


def with_external_weight(tmp_path, location: str):
    """A copy of the model whose folded weights claim to live in external data at ``location``."""
    model = onnx.load(str(to_onnx(CrossAttention(8, 2, seed=0), tmp_path / "base.onnx")))
    tensor = next(t for t in model.graph.initializer if t.name == "folded_query_weights")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    path = tmp_path / "external.onnx"
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("location,message", [("../outside.bin", "leaves the model's folder"),
                                              ("/etc/passwd", "must be a relative path"),
                                              ("sub/../../x.bin", "leaves the model's folder"),
                                              ("", "must be a relative path")])
def test_external_data_outside_the_folder_is_refused(tmp_path, location, message):
    with pytest.raises(ValueError, match=message):
        OnnxFusion(with_external_weight(tmp_path, location))


def test_external_data_through_a_symlink_is_refused(tmp_path):
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"\0" * 1024)
    (tmp_path / "inside").mkdir()
    os.symlink(target, tmp_path / "inside" / "w.bin")
    with pytest.raises(ValueError, match="symlink"):
        OnnxFusion(with_external_weight(tmp_path, "inside/w.bin"))


def test_foreign_models_are_refused(tmp_path):
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "foreign.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # loadable by any onnxruntime, so that only the missing metadata can refuse it
    onnx.save_model(model, str(path))
    with pytest.raises(ValueError, match="not exported by crossattn_gpu"):
        OnnxFusion(path)


def test_lengths_for_a_model_without_length_inputs_are_refused(tmp_path):
    fusion = OnnxFusion(to_onnx(CrossAttention(8, 2, seed=0), tmp_path / "no_lengths.onnx", lengths=False))
    x = np.ones((2, 3, 8))
    assert fusion(x, x)["fused_sequential"].shape == (2, 3, 8)
    with pytest.raises(TypeError, match=r"exported without length inputs \(lengths=False\)"):
        fusion(x, x, structural_lengths=[3, 2])


def restamped(model):
    """``model`` with its digest made again, as if exported so: the edits of a test, not damage."""
    from crossattn_gpu.export.integrity import DIGEST_KEY, model_digest

    entry = next(prop for prop in model.metadata_props if prop.key == DIGEST_KEY)
    entry.value = model_digest(model)
    return model


def test_a_model_that_asks_for_inputs_we_do_not_know_names_them(tmp_path, exported):
    model = onnx.load(exported)
    model.graph.input.append(onnx.helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [1]))
    onnx.save_model(restamped(model), str(tmp_path / "edited.onnx"))
    x = np.ones((1, 3, 8))
    with pytest.raises(TypeError, match=r"missing input\(s\) temperature"):
        OnnxFusion(tmp_path / "edited.onnx")(x, x)


@pytest.mark.parametrize("edit,message", [
    (lambda model: _rename_metadata_key(model, "embedding_dim", "width"), r"was not exported by crossattn_gpu \(no "
                                                                         r"embedding_dim in its metadata\)"),
    (lambda model: _rename_metadata_key(model, "attention_heads", "heads"), "no attention_heads in its metadata"),
    (lambda model: _set_metadata(model, "attention_heads", "two"), "attention_heads in its metadata is 'two', not a "
                                                                    "positive integer"),
    (lambda model: _set_metadata(model, "attention_heads", "0"), "attention_heads in its metadata is '0'"),
    (lambda model: _set_metadata(model, "embedding_dim", "9"), r"metadata says embedding_dim=9, but its input "
                                                               r"sequential_repr has shape \['batch', 'len_s', 8\]"),
])
def test_metadata_that_does_not_describe_the_model_is_named(tmp_path, exported, edit, message):
    """The metadata OnnxFusion reads D and H from (a KeyError had escaped when attention_heads was lost)."""
    model = onnx.load(exported)
    edit(model)
    onnx.save_model(restamped(model), str(tmp_path / "edited.onnx"))
    with pytest.raises(ValueError, match=message):
        OnnxFusion(tmp_path / "edited.onnx")


def test_examples_per_run_on_the_cpu():
    from crossattn_gpu.export.runner import cpu_examples_per_run

    assert cpu_examples_per_run(256, 128, 4) == 2  # W2c: 2**19 elements of (b, H, Lq, Lk) scores a run
    assert cpu_examples_per_run(120, 1280, 8) == 5  # wide heads: at least 512 rows a run
    assert cpu_examples_per_run(100, 64, 2) == 26  # scores wider than the heads
    assert cpu_examples_per_run(4096, 256, 4) == 1



def test_masks_broadcast_as_the_front_end_takes_them(tmp_path):
    """Any mask that broadcasts to (B, Ls, Lt), of any real dtype, gives the front end's results; one that
    does not is named (it had reached onnxruntime's Add, whose error names neither mask nor shape)."""
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    fusion = OnnxFusion(to_onnx(model, tmp_path / "m.onnx", mask=True))
    rng = np.random.default_rng(0)
    xs, xt = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
    for mask in (np.tri(5, dtype=bool), np.tri(5), (rng.random((2, 1, 5)) > 0.3).astype(np.int8),
                 rng.random((1, 5, 1)) > 0.3, np.ones(5, dtype=np.float32), None):  # None: nothing masked
        want = model.fuse_representations(xs, xt, mask=mask, need_similarity=False)
        got = fusion(xs, xt, mask=mask)
        for key in ("fused_sequential", "fused_structural"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=f"{np.shape(mask)} {key}")
    for mask, message in ((np.ones((3, 5, 5), bool), r"mask of shape \(3, 5, 5\) does not broadcast to \(2, 5, 5\)"),
                          (np.ones((1, 2, 5, 5), bool), "mask has rank 4"),
                          (np.full((5, 5), np.nan), "mask contains NaN")):
        with pytest.raises(ValueError, match=message):
            fusion(xs, xt, mask=mask)


def test_sliced_runs_equal_one_run(tmp_path, monkeypatch):
    from crossattn_gpu.export import runner

    fusion = OnnxFusion(to_onnx(CrossAttention(8, 2, seed=0), tmp_path / "m.onnx", mask=True, attention_weights=True))
    rng = np.random.default_rng(0)
    xs, xt = rng.standard_normal((7, 4, 8)), rng.standard_normal((7, 4, 8))
    lengths = [4, 1, 2, 3, 4, 2, 1]
    masks = (rng.random((7, 4, 4)) > 0.2, rng.random((1, 4, 4)) > 0.2)  # one per example, one for all
    whole = [fusion(xs, xt, sequential_lengths=lengths, structural_lengths=lengths, mask=mask) for mask in masks]
    monkeypatch.setattr(runner, "CPU_RUN_ELEMENTS", 1)
    monkeypatch.setattr(runner, "CPU_RUN_MIN_ROWS", 12)  # runs of 3, 3 and 1 examples
    for mask, want in zip(masks, whole):
        got = fusion(xs, xt, sequential_lengths=lengths, structural_lengths=lengths, mask=mask)
        assert set(got) == set(want) and "attention_weights_seq_to_struct" in got
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_weights_handed_over_in_memory_stay_out_of_the_model(dtype):
    from crossattn_gpu.export.onnx_export import build_fusion_model
    from crossattn_gpu.export.runner import OnnxSession

    weights = CrossAttention(48, 3, seed=2).get_attention_weights()
    embedded = build_fusion_model(weights, dtype=dtype, lengths=False)
    external = {}
    lean = build_fusion_model(weights, dtype=dtype, lengths=False, external=external)
    assert sorted(external) == ["folded_query_weights", "folded_value_weights"]
    assert all(a.dtype == np.dtype(dtype) and a.flags.c_contiguous for a in external.values())
    weight_bytes = sum(a.nbytes for a in external.values())  # 2 x 3 x 48 x 48 elements
    # No weight bytes in the model, so protobuf's 2 GiB cap no longer bounds the weights.
    assert len(lean.SerializeToString()) < len(embedded.SerializeToString()) - weight_bytes + 1024
    rng = np.random.default_rng(1)
    feeds = {name: rng.standard_normal((2, 5, 48)).astype(dtype) for name in ("sequential_repr", "structural_repr")}
    want = OnnxSession(embedded).run(feeds)
    got = OnnxSession(lean, initializers=external).run(feeds)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    with pytest.raises(ValueError, match="onnxruntime cannot load the model"):
        OnnxSession(lean)  # the weights are not in the model: without them there is no session


def test_overlapping_calls_and_a_forked_child_give_a_lone_calls_results(tmp_path):
    """Threads calling one OnnxFusion at once, and a child forked after the parent's sessions ran (as
    multiprocessing's default start on Linux and PyTorch's DataLoader workers do), on runs of both of
    its sessions: the pooled one and the one-thread one for small runs."""
    fusion = OnnxFusion(to_onnx(CrossAttention(64, 4, seed=0), tmp_path / "m.onnx"))
    rng = np.random.default_rng(8)
    small, pooled = rng.standard_normal((1, 5, 64)), rng.standard_normal((8, 96, 64))
    assert runner._run_work(1, (5, 64, 4)) <= runner.SERIAL_RUN_WORK
    assert runner._run_work(runner.cpu_examples_per_run(96, 64, 4), (96, 64, 4)) > runner.SERIAL_RUN_WORK
    for x in (small, pooled):
        alone = fusion(x, x)["bidirectional_fusion"]
        for result in overlapping_results(lambda: fusion(x, x)["bidirectional_fusion"]):
            np.testing.assert_array_equal(result, alone)
        if hasattr(os, "fork"):
            assert_a_forked_child_gets(lambda: fusion(x, x)["bidirectional_fusion"], alone)


def test_pickles_as_its_path_and_refuses_a_changed_file(tmp_path):
    import pickle

    path = to_onnx(CrossAttention(8, 2, seed=0), tmp_path / "fusion.onnx")
    fusion = OnnxFusion(path)
    x = np.random.default_rng(0).standard_normal((2, 4, 8))
    clone = pickle.loads(pickle.dumps(fusion))
    assert clone.provider == fusion.provider
    np.testing.assert_array_equal(clone(x, x)["bidirectional_fusion"], fusion(x, x)["bidirectional_fusion"])
    pickled = pickle.dumps(fusion)
    to_onnx(CrossAttention(8, 2, seed=1), path)  # other weights under the same name
    with pytest.raises(ValueError, match="has changed since this OnnxFusion was pickled"):
        pickle.loads(pickled)


def test_pool_threads_stop_after_a_run_and_small_runs_take_one_thread(tmp_path, monkeypatch):
    from crossattn_gpu.export import runner

    monkeypatch.setattr(runner._threads, "cpu_count", lambda: os.cpu_count())  # every CPU usable
    fusion = OnnxFusion(to_onnx(CrossAttention(8, 2, seed=0), tmp_path / "m.onnx"))
    pooled, serial = fusion._session.session, fusion._session._serial
    for session in (pooled, serial):
        assert session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    assert serial.get_session_options().intra_op_num_threads == 1
    assert pooled.get_session_options().intra_op_num_threads == 0  # onnxruntime's default: a thread a core
    used = []
    run = runner.OnnxSession._run
    monkeypatch.setattr(runner.OnnxSession, "_run", lambda self, session, feeds: used.append(session) or run(self, session, feeds))
    x = np.random.default_rng(0).standard_normal((3, 5, 8))
    small = fusion(x, x)
    monkeypatch.setattr(runner, "SERIAL_RUN_WORK", 3 * 2 * 5 * 8 * 8 - 1)  # one unit less than the run's work
    large = fusion(x, x)
    assert used == [serial, pooled]
    for name in small:
        np.testing.assert_allclose(small[name], large[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("metadata,serial", [
    ({"embedding_dim": "1024", "attention_heads": "1"}, True),  # one example of L = 1: 2**20, the limit
    ({"embedding_dim": "1025", "attention_heads": "1"}, False),
    ({"embedding_dim": "8"}, True),  # heads default to 1 (the sdpa and similarity graphs)
    ({"embedding_dim": "eight", "attention_heads": "2"}, False),
    ({"embedding_dim": "0"}, False),
    ({}, False),  # not one of this library's models: no shape to size a run by
])
def test_the_one_thread_session_is_built_only_where_a_run_can_be_small(metadata, serial):
    from onnx import helper

    from crossattn_gpu.export.runner import OnnxSession

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, metadata)
    session = OnnxSession(model)
    assert (session._serial is not None) == serial
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_array_equal(session.run({"x": x}, shape=(1, 8, 1))["y"], x)


def test_pool_threads_follow_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    """onnxruntime's own thread count ignores CPU affinity and a container's CPU quota."""
    from crossattn_gpu.export import runner

    monkeypatch.setattr(runner.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(runner._threads, "cpu_count", lambda: 64)
    assert runner.pool_threads() == 0  # unrestricted: onnxruntime's choice
    monkeypatch.setattr(runner._threads, "cpu_count", lambda: 2)  # e.g. docker --cpus=2 on a 64-core host
    assert runner.pool_threads() == 2
    fusion = OnnxFusion(to_onnx(CrossAttention(48, 3, seed=0), tmp_path / "m.onnx"))
    assert fusion._session.session.get_session_options().intra_op_num_threads == 2
    assert fusion._session._serial.get_session_options().intra_op_num_threads == 1


def test_float64_models_load_where_the_transpose_fusion_lacks_float64(tmp_path, monkeypatch):
    """Where onnxruntime's MatmulTransposeFusion has no float64 kernel (1.18, the extra's floor), a model
    that fails to load is loaded again without that fusion; a model that fails either way still gives
    the ValueError. Here the old onnxruntime's refusal is played by a stand-in for its session."""
    from crossattn_gpu.export import runner

    real = runner._SessionWithoutFallback
    tries = []

    def old_onnxruntime(*args, disabled_optimizers=None, **kwargs):
        tries.append(disabled_optimizers)
        if not disabled_optimizers:
            raise RuntimeError("NOT_IMPLEMENTED : Failed to find kernel for com.microsoft.FusedMatMul(1)")
        return real(*args, disabled_optimizers=disabled_optimizers, **kwargs)

    model = CrossAttention(8, 2, seed=0, backend="numpy")
    path = to_onnx(model, tmp_path / "m64.onnx", dtype="float64")
    monkeypatch.setattr(runner, "_SessionWithoutFallback", old_onnxruntime)
    monkeypatch.setattr(runner, "fusion_takes_float64", lambda: False)
    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    got = OnnxFusion(path)(x, x)["fused_sequential"]
    assert [None, ["MatmulTransposeFusion"]] == tries[:2]
    np.testing.assert_allclose(got, model.fuse_representations(x, x)["fused_sequential"], rtol=1e-13, atol=1e-15)

    def refuses(*args, disabled_optimizers=None, **kwargs):
        tries.append(disabled_optimizers)
        raise RuntimeError(f"refused with {disabled_optimizers}")

    tries.clear()
    monkeypatch.setattr(runner, "_SessionWithoutFallback", refuses)
    with pytest.raises(ValueError, match=r"onnxruntime cannot load the model: refused with None$"):
        OnnxFusion(path)
    assert tries == [None, ["MatmulTransposeFusion"]]


def test_onnxruntime_1_23s_float64_attention_failure_names_the_way_out(tmp_path, monkeypatch):
    """onnxruntime 1.23 loads the Attention operator on float64 but not with a float64 mask, and says so
    as a type error in an Add that the model does not have (``attention_float64_mask_fails``)."""
    path = to_onnx(CrossAttention(8, 2, seed=0, backend="numpy"), tmp_path / "m64.onnx", dtype="float64")
    message = "Type parameter (T) of Optype (Add) bound to different types (tensor(double) and tensor(float) in node ()."

    def fails(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(runner, "_SessionWithoutFallback", fails)
    for on_1_23, hint in ((True, "; onnxruntime 1.23 cannot run the Attention operator (opset 23 and later) on float64 "
                                 "with a mask: export with an opset below 23, or use onnxruntime 1.24 or later"),
                          (False, "")):
        monkeypatch.setattr(runner, "attention_float64_mask_fails", lambda: on_1_23)
        with pytest.raises(ValueError) as info:
            OnnxFusion(path)
        assert str(info.value) == f"onnxruntime cannot load the model: {message}{hint}"


def test_half_casts_give_numpys_bits():
    """onnxruntime's Cast, which ``host_cast`` uses for large float16 conversions, against NumPy's astype:
    every finite float16 up; random float32 bit patterns, the float16 ties and the overflow edge down."""
    casts = runner.HalfCasts()
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = every_half[np.isfinite(every_half)]
    np.testing.assert_array_equal(casts(finite, np.float32).view(np.uint32), finite.astype(np.float32).view(np.uint32))
    patterns = np.random.default_rng(9).integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    singles = patterns.view(np.float32)
    singles = singles[np.isfinite(singles)]
    ties = ((finite[:-1].astype(np.float64) + finite[1:].astype(np.float64)) / 2).astype(np.float32)
    edge = np.array([65504, 65519.99, 65520, 1e5, -65520, 2.0**-25, 1.5 * 2.0**-24, 2.0**-26, -0.0], np.float32)
    for values in (singles, ties, edge):
        with np.errstate(over="ignore"):
            want = values.astype(np.float16)
        np.testing.assert_array_equal(casts(values, np.float16).view(np.uint16), want.view(np.uint16))
    # a view that is not contiguous, in a 3-D shape
    strided = finite[: 2 * 3 * 40].reshape(2, 3, 40)[:, :, ::2]
    np.testing.assert_array_equal(casts(strided, np.float32), strided.astype(np.float32))


def test_a_float16_model_takes_float32_inputs_converted_by_onnxruntime(tmp_path, monkeypatch):
    path = to_onnx(CrossAttention(8, 2, seed=3), tmp_path / "half.onnx", dtype="float16")
    rng = np.random.default_rng(11)
    seq, struct = rng.standard_normal((4, 9, 8)), rng.standard_normal((4, 9, 8))
    want = OnnxFusion(path)(seq.astype(np.float16), struct.astype(np.float16))
    monkeypatch.setattr(runner, "CAST_ELEMENTS", 1)
    runs = []
    original = runner.HalfCasts.__call__
    monkeypatch.setattr(runner.HalfCasts, "__call__", lambda self, x, dtype: runs.append(x.dtype) or original(self, x, dtype))
    got = OnnxFusion(path)(seq.astype(np.float32), struct.astype(np.float32))
    assert runs == [np.float32, np.float32]
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


def _antibodies(lengths, width=8, seed=0):
    rng = np.random.default_rng(seed)
    return ([rng.standard_normal((n, width)) for n in lengths], [rng.standard_normal((n, width)) for n in lengths])


@pytest.mark.parametrize("options", [{}, {"similarity": True, "attention_weights": True}, {"lengths": False}])
def test_a_collection_gives_each_antibody_its_own_results(tmp_path, options):
    """Each antibody's outputs, cut from its padded run, are CrossAttention's for its two arrays alone
    (within float32's rounding: the model computes in float32), as lists and as dicts by id."""
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    fusion = OnnxFusion(to_onnx(model, tmp_path / "m.onnx", **options))
    seq, struct = _antibodies([5, 3, 9, 3, 1, 17, 113])
    got = fusion.fuse_collection(seq, struct, batch_size=3)
    for outputs, xs, xt in zip(got, seq, struct):
        want = model.fuse_representations(xs, xt, need_weights=True)
        assert sorted(outputs) == sorted(fusion.output_names)
        for name, value in outputs.items():
            expected = np.stack(want[name]) if isinstance(want[name], list) else want[name]
            assert value.shape == expected.shape and value.dtype == np.float32, name
            np.testing.assert_allclose(value, expected, rtol=0, atol=2e-6 * np.abs(expected).max(), err_msg=name)
    by_id = fusion.fuse_collection(dict(zip("abcdefg", seq)), dict(zip("abcdefg", struct)))
    assert list(by_id) == list("abcdefg")
    for outputs, want in zip(by_id.values(), got):
        for name, value in want.items():
            np.testing.assert_allclose(outputs[name], value, rtol=0, atol=1e-6 * np.abs(value).max())
    assert [key for key, _ in fusion.iter_collection(seq, struct)] == [6, 5, 2, 0, 1, 3, 4]  # longest first


@pytest.mark.parametrize("lengths", [True, False])
def test_a_model_without_bidirectional_fusion_takes_unequal_lengths(tmp_path, lengths):
    """Exported with bidirectional=False, as CrossAttention's bidirectional=False: Ls != Lt in a call,
    one example, and a collection (without length inputs, only equal pairs of lengths share a run)."""
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    fusion = OnnxFusion(to_onnx(model, tmp_path / "m.onnx", bidirectional=False, lengths=lengths,
                                attention_weights=True, similarity=True))
    assert "bidirectional_fusion" not in fusion.output_names and fusion.metadata["bidirectional"] == "false"
    rng = np.random.default_rng(0)
    seq = [rng.standard_normal((n, 8)) for n in (5, 1, 9, 5, 17)]
    struct = [rng.standard_normal((n, 8)) for n in (3, 4, 9, 3, 1)]
    results = [fusion.fuse_collection(seq, struct, batch_size=3), [fusion(xs, xt) for xs, xt in zip(seq, struct)]]
    for got in results:
        for outputs, xs, xt in zip(got, seq, struct):
            want = model.fuse_representations(xs, xt, need_weights=True, bidirectional=False)
            assert sorted(outputs) == sorted(fusion.output_names)
            for name, value in outputs.items():
                expected = np.stack(want[name]) if isinstance(want[name], list) else want[name]
                assert value.shape == expected.shape, name
                scale = 1.0 if "similarity" in name else np.abs(expected).max()  # cosines: on the scale of 1
                np.testing.assert_allclose(value, expected, rtol=0, atol=2e-6 * scale, err_msg=name)
    with_both = OnnxFusion(to_onnx(model, tmp_path / "both.onnx"))
    with pytest.raises(ValueError, match="needs Ls == Lt; got 5 and 3 .a model exported with bidirectional=False"):
        with_both(seq[0], struct[0])
    with pytest.raises(ValueError, match="item 0: sequence length 5 != structure length 3; this model outputs "
                                         "bidirectional_fusion, which needs equal lengths"):
        with_both.fuse_collection(seq, struct)


def test_a_model_without_length_inputs_runs_only_equal_lengths_together(tmp_path, monkeypatch):
    fusion = OnnxFusion(to_onnx(CrossAttention(8, 2, seed=0), tmp_path / "m.onnx", lengths=False))
    runs, run = [], OnnxFusion.__call__
    monkeypatch.setattr(OnnxFusion, "__call__",
                        lambda self, xs, xt, **kw: runs.append(xs.shape) or run(self, xs, xt, **kw))
    fusion.fuse_collection(*_antibodies([4, 3, 4, 3, 4, 5]), batch_size=2)
    assert sorted(runs) == [(1, 4, 8), (1, 5, 8), (2, 3, 8), (2, 4, 8)]  # 5 | 4, 4 | 4 | 3, 3


def test_a_collection_is_checked_before_any_run(tmp_path, exported, monkeypatch):
    fusion = OnnxFusion(exported)
    monkeypatch.setattr(OnnxFusion, "__call__", lambda *args, **kwargs: pytest.fail("ran before the checks"))
    seq, struct = _antibodies([5, 3])
    with pytest.raises(ValueError, match="item 0: sequence length 5 != structure length 3; this model outputs "
                                         "bidirectional_fusion, which needs equal lengths"):
        fusion.iter_collection(seq, struct[::-1])
    with pytest.raises(ValueError, match=r"structural\[1\] has width 7, but the model has D=8"):
        fusion.iter_collection(seq, [struct[0], np.ones((3, 7))])
    with pytest.raises(TypeError, match=r"two lists \(or tuples\) of \(L, D\) arrays, or two dicts .* call the "
                                        r"OnnxFusion itself with sequential_lengths"):
        fusion.iter_collection(np.ones((2, 3, 8)), np.ones((2, 3, 8)))
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        fusion.iter_collection(seq, struct, batch_size=0)
    monkeypatch.setattr(_memory, "CHECKED_FROM_BYTES", 0)
    monkeypatch.setattr(_memory, "available_bytes", lambda: 100)  # 3 outputs x 8 x 8 float32 values: 768 bytes
    with pytest.raises(MemoryError, match="fused_sequential .*take the results as they come with iter_collection"):
        fusion.fuse_collection(seq, seq)


def test_a_failed_run_names_the_antibody_to_look_at(exported):
    seq, struct = _antibodies([5, 3, 4])
    seq[2][1, 2] = np.inf
    with pytest.raises(ValueError, match=r"in the batch with ids 'a'..'b' \(NaN or Inf in id 'c'\): sequential_repr "
                                         "contains Inf"):
        OnnxFusion(exported).fuse_collection(dict(zip("abc", seq)), dict(zip("abc", struct)))
