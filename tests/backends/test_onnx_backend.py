"""backend='onnx': every operation through exported graphs, against backend='numpy'."""

import logging
import os
import pickle

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from concurrency import assert_a_forked_child_gets, overlapping_results  # noqa: E402
from crossattn_gpu import CrossAttention  # noqa: E402
from crossattn_gpu.backends import onnx_backend  # noqa: E402


def rel_err(got, want):
    return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


@pytest.fixture
def pair():
    ref = CrossAttention(12, 2, seed=1, backend="numpy")
    return ref, CrossAttention.from_weights(**ref.get_attention_weights(), backend="onnx")


def test_fuse_2d_seed_semantics(pair):
    ref, onnx_model = pair
    rng = np.random.default_rng(0)
    seq, struct = rng.standard_normal((6, 12)), rng.standard_normal((6, 12))
    got, want = onnx_model.fuse_representations(seq, struct), ref.fuse_representations(seq, struct)
    assert onnx_model.backend == "onnx" and got["fused_sequential"].dtype == np.float64
    # float64 inputs are computed in float64 graphs
    for key in ("fused_sequential", "fused_structural", "bidirectional_fusion", "seq_similarity", "struct_similarity"):
        assert rel_err(got[key], want[key]) <= 1e-13
    for g, w in zip(got["attention_weights_seq_to_struct"], want["attention_weights_seq_to_struct"]):
        assert rel_err(g, w) <= 1e-13


def test_ragged_masked_mha_and_sdpa(pair):
    ref, onnx_model = pair
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((3, 5, 12)), rng.standard_normal((3, 9, 12))
    v = rng.standard_normal((3, 9, 4))
    mask = rng.random((5, 9)) > 0.5
    mask[0] = False
    kw = dict(mask=mask, query_lengths=[5, 1, 3], key_lengths=[9, 2, 1], need_weights=True)
    got, want = onnx_model.multi_head_attention(q, k, k, **kw), ref.multi_head_attention(q, k, k, **kw)
    assert rel_err(got[0], want[0]) <= 1e-13
    assert rel_err(np.stack(got[1]), np.stack(want[1])) <= 1e-13
    got, want = onnx_model.scaled_dot_product_attention(q, k, v, **kw), ref.scaled_dot_product_attention(q, k, v, **kw)
    assert rel_err(got[0], want[0]) <= 1e-13 and rel_err(got[1], want[1]) <= 1e-13


def test_new_weights_rebuild_the_graphs(pair):
    _, onnx_model = pair
    x = np.random.default_rng(2).standard_normal((4, 12)).astype(np.float32)
    before = onnx_model.fuse_representations(x, x)["fused_sequential"]
    onnx_model.value_weights = onnx_model.value_weights * 3
    after = onnx_model.fuse_representations(x, x)["fused_sequential"]
    np.testing.assert_allclose(after, 3 * before, rtol=1e-4, atol=1e-6)


def gpu_backend_for_auto():
    """The GPU backend ``auto`` takes before any other on this machine, or None."""
    from crossattn_gpu.backends.cupy_backend import CupyBackend
    from crossattn_gpu.backends.triton_backend import TritonBackend

    return next((b.name for b in (TritonBackend, CupyBackend) if b.usable_by_auto()), None)


@pytest.mark.parametrize("kernels", ["Haswell", "SkylakeX", None])
def test_auto_takes_onnx_but_for_float64_beside_avx512_openblas_and_says_so(caplog, monkeypatch, kernels):
    """onnx for every dtype, but NumPy for float64 models where NumPy's OpenBLAS runs AVX-512 kernels (its
    float64 GEMMs the faster there: ``OnnxBackend.usable_by_auto``); nothing known (no threadpoolctl,
    None) keeps onnx. A model whose dtype follows its inputs takes onnx everywhere."""
    from crossattn_gpu import _blas

    libraries = [] if kernels is None else [{"internal_api": "openblas", "architecture": kernels}]
    monkeypatch.setattr(_blas, "openblas_libraries", lambda: libraries)
    gpu = gpu_backend_for_auto()
    for dtype in (None, "float32", "float64", "float16", "bfloat16"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="crossattn_gpu"):
            model = CrossAttention(4, 1, dtype=dtype)
        numpy_for_float64 = dtype == "float64" and kernels == "SkylakeX"
        assert model.backend == (gpu or ("numpy" if numpy_for_float64 else "onnx"))
        assert f"backend='auto' picked {model.backend!r}" in caplog.text
        assert f"Backend: {model.backend}" in model.generate_report()["summary"]
        assert (f"for dtype {dtype}" in caplog.text) == (dtype is not None)
        assert pickle.loads(pickle.dumps(model)).backend == model.backend  # the name travels, not the rule


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_float16_is_computed_in_float32_graphs_as_numpy_computes_it(dtype):
    """Whether the dtype follows float16 inputs or is fixed to float16: float32 graphs, the results cast
    to float16, at NumPy's error (the exported float16 model's graphs round more, tests/conformance)."""
    ref = CrossAttention(16, 2, seed=6, backend="numpy", dtype=dtype)
    rng = np.random.default_rng(6)
    seq, struct = (rng.standard_normal((3, 9, 16)).astype(np.float16) for _ in range(2))
    exact = CrossAttention.from_weights(**ref.get_attention_weights(), backend="numpy", dtype="float64")
    want = exact.fuse_representations(seq.astype(np.float64), struct.astype(np.float64))["bidirectional_fusion"]
    numpy_result = ref.fuse_representations(seq, struct)["bidirectional_fusion"]
    onnx_model = CrossAttention.from_weights(**ref.get_attention_weights(), backend="onnx", dtype=dtype)
    got = onnx_model.fuse_representations(seq, struct)["bidirectional_fusion"]
    assert got.dtype == np.float16
    assert [np.dtype(d).name for d in onnx_model._prepared] == ["float32"]
    # NumPy's result but for float32 roundings before the last cast (one float16 unit)
    np.testing.assert_allclose(got, numpy_result, rtol=2**-10, atol=0)
    assert rel_err(got, want) <= 1.01 * rel_err(numpy_result, want)


def test_auto_without_onnxruntime_takes_numpy_and_a_named_onnx_raises(monkeypatch):
    if gpu_backend_for_auto():
        pytest.skip("auto takes the GPU backend here")

    def missing(module, purpose):
        raise ImportError(f"{module} is needed for {purpose} but is not installed: pip install 'crossattn_gpu[onnx]'")

    monkeypatch.setattr(onnx_backend, "require", missing)
    assert CrossAttention(4, 1).backend == CrossAttention(4, 1, dtype="float16").backend == "numpy"
    with pytest.raises(ImportError, match=r"crossattn_gpu\[onnx\]"):
        CrossAttention(4, 1, dtype="float32", backend="onnx")


@pytest.mark.parametrize("dtype,limit", [("float32", 1e-5), ("float64", 1e-13)])
def test_auto_with_onnx_computes_what_numpy_computes(dtype, limit, monkeypatch):
    if gpu_backend_for_auto():
        pytest.skip("auto takes the GPU backend here")
    from crossattn_gpu import _blas

    monkeypatch.setattr(_blas, "openblas_libraries", lambda: [])  # kernels unknown: onnx for float64 too
    ref = CrossAttention(16, 2, seed=4, backend="numpy", dtype=dtype)
    auto = CrossAttention.from_weights(**ref.get_attention_weights(), dtype=dtype)
    assert auto.backend == "onnx"
    rng = np.random.default_rng(5)
    seq, struct = rng.standard_normal((3, 9, 16)), rng.standard_normal((3, 9, 16))
    got, want = auto.fuse_representations(seq, struct), ref.fuse_representations(seq, struct)
    for key in ("fused_sequential", "fused_structural", "bidirectional_fusion"):
        assert got[key].dtype == want[key].dtype == np.dtype(dtype)
        assert rel_err(got[key], want[key]) <= limit


def test_graphs_take_length_inputs_only_when_lengths_are_given(pair):
    ref, onnx_model = pair
    rng = np.random.default_rng(3)
    seq, struct = rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 7, 12))
    plain = onnx_model.fuse_representations(seq, struct, bidirectional=False)
    ragged = onnx_model.fuse_representations(seq, struct, bidirectional=False, structural_lengths=[7, 3])
    (prepared,) = onnx_model._prepared.values()  # float64 inputs, computed in float64
    inputs = {key[-1]: set(session.inputs) for key, session in prepared.sessions.items()}
    assert inputs[False] == {"sequential_repr", "structural_repr"}
    assert inputs[True] == {"sequential_repr", "structural_repr", "sequential_lengths", "structural_lengths"}
    for got, kw in ((plain, {}), (ragged, {"structural_lengths": [7, 3]})):
        want = ref.fuse_representations(seq, struct, bidirectional=False, **kw)
        assert rel_err(got["fused_sequential"], want["fused_sequential"]) <= 1e-5


@pytest.fixture
def small_runs(monkeypatch):
    """Runs of two examples at most (the CPU provider slices a batch by ``cpu_examples_per_run``)."""
    from crossattn_gpu.export import runner

    monkeypatch.setattr(runner, "CPU_RUN_ELEMENTS", 1)
    monkeypatch.setattr(runner, "CPU_RUN_MIN_ROWS", 10)
    assert runner.cpu_examples_per_run(5, 12, 2) == 2


def test_batches_run_in_slices_with_every_output(pair, small_runs):
    ref, onnx_model = pair
    rng = np.random.default_rng(4)
    seq, struct = rng.standard_normal((5, 5, 12)), rng.standard_normal((5, 4, 12))
    for mask in (rng.random((5, 4)) > 0.3, rng.random((5, 5, 4)) > 0.3):  # one mask for all, one per example
        kw = dict(mask=mask, sequential_lengths=[5, 1, 3, 4, 2], structural_lengths=[4, 2, 1, 4, 3],
                  bidirectional=False, need_weights=True)
        got, want = onnx_model.fuse_representations(seq, struct, **kw), ref.fuse_representations(seq, struct, **kw)
        for key in ("fused_sequential", "fused_structural", "seq_similarity", "struct_similarity"):
            assert got[key].shape == want[key].shape and rel_err(got[key], want[key]) <= 1e-5
        for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq"):
            assert rel_err(np.stack(got[key]), np.stack(want[key])) <= 1e-5
    q, k, v = rng.standard_normal((5, 3, 12)), rng.standard_normal((5, 6, 12)), rng.standard_normal((5, 6, 2))
    kw = dict(key_lengths=[6, 1, 2, 5, 3], need_weights=True)
    got, want = onnx_model.scaled_dot_product_attention(q, k, v, **kw), ref.scaled_dot_product_attention(q, k, v, **kw)
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5


def test_query_blocks_bound_the_scores_of_one_run(monkeypatch):
    assert onnx_backend.query_blocks(4, 2048, 2048) == [slice(0, 2048)]  # 2**24 scores: one run
    monkeypatch.setattr(onnx_backend, "RUN_SCORE_ELEMENTS", 2 * 7 * 30)
    monkeypatch.setattr(onnx_backend, "MIN_QUERY_BLOCK", 1)
    assert onnx_backend.query_blocks(2, 100, 7) == [slice(0, 30), slice(30, 60), slice(60, 90), slice(90, 100)]
    monkeypatch.setattr(onnx_backend, "MIN_QUERY_BLOCK", 40)
    assert onnx_backend.query_blocks(2, 100, 7) == [slice(0, 40), slice(40, 80), slice(80, 100)]


def test_long_examples_run_their_queries_in_blocks_with_every_output(pair, monkeypatch):
    """Examples whose scores pass RUN_SCORE_ELEMENTS: each direction's queries in blocks (memory
    bounded whatever L is), blocks past an example's length included; every output as in one run."""
    ref, onnx_model = pair
    rng = np.random.default_rng(8)
    seq, struct = rng.standard_normal((3, 23, 12)), rng.standard_normal((3, 17, 12))
    lengths = dict(sequential_lengths=[23, 4, 11], structural_lengths=[17, 9, 2])
    calls = [
        ("fuse_representations", (seq, struct), dict(mask=rng.random((3, 23, 17)) > 0.3, **lengths)),
        ("fuse_representations", (seq, struct), dict(mask=rng.random((23, 17)) > 0.3)),
        ("fuse_representations", (seq, struct), dict(mask=rng.random((1, 1, 17)) > 0.3, **lengths)),
        ("multi_head_attention", (seq, struct, struct), dict(mask=rng.random((23, 17)) > 0.3, key_lengths=[17, 9, 2])),
        ("scaled_dot_product_attention", (seq, struct, struct[..., :5]), dict(query_lengths=[23, 4, 11])),
    ]
    whole = [getattr(onnx_model, method)(*args, bidirectional=False, need_weights=True, **kw)
             if method == "fuse_representations" else getattr(onnx_model, method)(*args, need_weights=True, **kw)
             for method, args, kw in calls]
    monkeypatch.setattr(onnx_backend, "RUN_SCORE_ELEMENTS", 2 * 5 * 23)  # blocks of 5 queries
    monkeypatch.setattr(onnx_backend, "MIN_QUERY_BLOCK", 1)
    for (method, args, kw), in_one in zip(calls, whole):
        if method == "fuse_representations":
            kw = dict(kw, bidirectional=False, need_weights=True)
            got, want = onnx_model.fuse_representations(*args, **kw), ref.fuse_representations(*args, **kw)
            keys = ["fused_sequential", "fused_structural", "seq_similarity", "struct_similarity",
                    "attention_weights_seq_to_struct", "attention_weights_struct_to_seq"]
            got, want, in_one = ([np.asarray(r[key]) for key in keys] for r in (got, want, in_one))
        else:
            got, want = getattr(onnx_model, method)(*args, need_weights=True, **kw), getattr(ref, method)(*args, need_weights=True, **kw)
            got, want, in_one = ([np.asarray(x) for x in r] for r in (got, want, in_one))
        for g, w, o in zip(got, want, in_one):
            assert g.shape == w.shape and rel_err(g, w) <= 1e-5
            np.testing.assert_allclose(g, o, rtol=1e-6, atol=1e-7)
    (prepared,) = onnx_model._prepared.values()
    assert ("similarity",) in prepared.sessions  # the fusions went by direction


def test_repeated_calls_settle_their_session_once(pair, monkeypatch):
    """A call without mask or lengths that runs as one graph keeps its session and its run's shape in its
    plan (``fusion_plan``, ``attention_plan``, ``sdpa_plan``): the next calls of that layout look up no
    session and give the same bits as a fresh model's whole path. Examples whose queries run in blocks
    (``query_blocks``) keep the whole operation as their plan (a look-up a run), and the same bits too."""
    ref, _ = pair
    looked_up = []  # the OnnxPrepared (weights and their sessions) of each look-up
    session = onnx_backend.OnnxPrepared.session
    monkeypatch.setattr(onnx_backend.OnnxPrepared, "session", lambda self, *a: looked_up.append(self) or session(self, *a))
    rng = np.random.default_rng(9)
    xs, xt = rng.standard_normal((3, 9, 12)), rng.standard_normal((3, 7, 12))
    calls = {"fuse": lambda m: m.fuse_representations(xs, xt, bidirectional=False, need_weights=True),
             "mha": lambda m: m.multi_head_attention(xs, xt, xt, need_weights=True),
             "sdpa": lambda m: m.scaled_dot_product_attention(xs, xt, xt[..., :5], need_weights=True)}

    def fresh():
        return CrossAttention.from_weights(**ref.get_attention_weights(), backend="onnx")

    def same(got, want):
        got, want = (got, want) if isinstance(got, dict) else (dict(enumerate(got)), dict(enumerate(want)))
        for name, value in want.items():
            if isinstance(value, list):
                assert all(np.array_equal(g, w) for g, w in zip(got[name], value)), name
            else:
                assert (value is None and got[name] is None) or np.array_equal(got[name], value), name

    for in_blocks in (False, True):
        if in_blocks:
            monkeypatch.setattr(onnx_backend, "RUN_SCORE_ELEMENTS", 4 * 7)  # blocks of 2 queries, 4 with one head
            monkeypatch.setattr(onnx_backend, "MIN_QUERY_BLOCK", 1)
        model = fresh()
        for name, call in calls.items():
            call(model)  # the layout's first call makes the plan
            looked_up.clear()
            for _ in range(2):
                same(call(model), call(fresh()))
            mine = {id(p) for p in (*model._prepared.values(), *model._backend._sdpa.values())}
            planned = sum(id(p) in mine for p in looked_up)
            assert len(looked_up) > planned and (planned > 0) == in_blocks, (name, in_blocks)


def test_every_graph_names_its_weights_digest_computed_once_per_weights(pair, monkeypatch):
    from crossattn_gpu.weights import weights_digest

    _, onnx_model = pair
    calls = []
    monkeypatch.setattr(onnx_backend, "weights_digest", lambda arrays: calls.append(1) or weights_digest(arrays))
    x = np.random.default_rng(5).standard_normal((2, 4, 12))
    for _ in range(2):
        onnx_model.fuse_representations(x, x)
        onnx_model.fuse_representations(x, x, sequential_lengths=[4, 2], structural_lengths=[4, 2])
        onnx_model.multi_head_attention(x, x, x)
        (prepared,) = onnx_model._prepared.values()
        assert len(prepared.sessions) == 3
        digests = {session.metadata["weights_sha256"] for session in prepared.sessions.values()}
        assert digests == {weights_digest(onnx_model.get_attention_weights())}
        onnx_model.key_weights = onnx_model.key_weights + 1  # new weights: new graphs, a new digest
    assert len(calls) == 2


def test_a_model_with_sessions_pickles(pair):
    """onnxruntime sessions do not pickle: the model pickles its weights and settings, and the copy
    builds its sessions on its first call."""
    import pickle

    _, model = pair
    rng = np.random.default_rng(7)
    seq, struct = rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 5, 12))
    want = model.fuse_representations(seq, struct)["bidirectional_fusion"]
    clone = pickle.loads(pickle.dumps(model))
    assert clone.backend == "onnx"
    np.testing.assert_array_equal(clone.fuse_representations(seq, struct)["bidirectional_fusion"], want)


def test_the_backend_feeds_its_graphs_without_the_runner_checks_again(pair, monkeypatch):
    """The front end has checked the inputs, so the backend's runs skip ``OnnxSession``'s checks and
    casts (~10 us of a W1 call); the graphs still get exactly their inputs in their dtypes."""
    from crossattn_gpu.export import runner

    def no_second_check(self, name, value):
        raise AssertionError(f"{name} was checked again")

    monkeypatch.setattr(runner.OnnxSession, "_prepare", no_second_check)
    ref, onnx_model = pair
    monkeypatch.setattr(onnx_backend, "RUN_SCORE_ELEMENTS", 2 * 5 * 5)  # also the query blocks and similarities
    rng = np.random.default_rng(4)
    xs, xt = rng.standard_normal((3, 9, 12)), rng.standard_normal((3, 9, 12))
    kwargs = dict(sequential_lengths=[9, 4, 1], structural_lengths=[9, 4, 1], mask=rng.random((9, 9)) > 0.3,
                  need_weights=True)
    for call in (lambda m: m.fuse_representations(xs, xt, **kwargs),
                 lambda m: m.multi_head_attention(xs, xt, xt, key_lengths=[9, 2, 5]),
                 lambda m: m.scaled_dot_product_attention(xs, xt, xt[..., :5])):
        got, want = call(onnx_model), call(ref)
        got, want = (got, want) if isinstance(got, dict) else (dict(enumerate(got)), dict(enumerate(want)))
        for name, value in want.items():
            if isinstance(value, np.ndarray):
                assert rel_err(got[name], value) < 1e-5, name


def test_threads_calling_at_once_build_each_session_once(monkeypatch):
    import threading
    import time

    from crossattn_gpu.export import runner

    built = []
    original = runner.OnnxSession.__init__

    def slow_init(self, *args, **kwargs):
        built.append(threading.get_ident())
        time.sleep(0.2)  # every thread arrives while the first build runs
        original(self, *args, **kwargs)

    monkeypatch.setattr(runner.OnnxSession, "__init__", slow_init)
    prepare = onnx_backend.OnnxBackend.prepare_weights

    def slow_prepare(self, *args, **kwargs):
        time.sleep(0.1)  # every thread prepares the weights: they must still share one prepared form
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(onnx_backend.OnnxBackend, "prepare_weights", slow_prepare)
    model = CrossAttention(8, 2, seed=0, backend="onnx")
    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    start, results = threading.Barrier(4), []

    def call():
        start.wait()
        results.append(model.fuse_representations(x, x, need_similarity=False)["bidirectional_fusion"])

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(results) == 4
    assert all(np.array_equal(r, results[0]) for r in results)


def _pooled_model_and_inputs():
    """A model and inputs whose runs take the pooled session (more than ``SERIAL_RUN_WORK``)."""
    from crossattn_gpu.export import runner

    model = CrossAttention(64, 4, seed=0, backend="onnx")
    rng = np.random.default_rng(8)
    seq, struct = rng.standard_normal((8, 96, 64), np.float32), rng.standard_normal((8, 96, 64), np.float32)
    shape = (96, 64, 4)
    assert runner._run_work(runner.cpu_examples_per_run(*shape), shape) > runner.SERIAL_RUN_WORK
    return model, seq, struct


def test_overlapping_calls_from_threads_give_a_lone_calls_results():
    model, seq, struct = _pooled_model_and_inputs()
    alone = model.fuse_representations(seq, struct)["bidirectional_fusion"]
    for result in overlapping_results(lambda: model.fuse_representations(seq, struct)["bidirectional_fusion"]):
        np.testing.assert_array_equal(result, alone)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_fuses_through_the_parents_sessions():
    """A child forked after the parent's sessions ran (their pools' threads are not in the child), as
    multiprocessing's default start on Linux and PyTorch's DataLoader workers do."""
    model, seq, struct = _pooled_model_and_inputs()
    in_parent = model.fuse_representations(seq, struct)["bidirectional_fusion"]
    assert_a_forked_child_gets(lambda: model.fuse_representations(seq, struct)["bidirectional_fusion"], in_parent)


def test_large_float16_conversions_go_through_onnxruntime_with_the_same_results(monkeypatch):
    model = CrossAttention(16, 2, seed=7, backend="onnx")
    rng = np.random.default_rng(10)
    seq, struct = (rng.standard_normal((3, 40, 16)).astype(np.float16) for _ in range(2))
    from crossattn_gpu.export import runner

    runs = []
    original = runner.HalfCasts.__call__

    def counted(self, x, dtype):
        runs.append((x.dtype.name, np.dtype(dtype).name))
        return original(self, x, dtype)

    monkeypatch.setattr(runner.HalfCasts, "__call__", counted)
    with_numpy = model.fuse_representations(seq, struct)
    assert runs == []  # 1920 elements an input: below CAST_ELEMENTS
    monkeypatch.setattr(runner, "CAST_ELEMENTS", 1)
    with_onnxruntime = model.fuse_representations(seq, struct)
    assert runs.count(("float16", "float32")) == 2 and runs.count(("float32", "float16")) == 5
    for key, value in with_numpy.items():
        if isinstance(value, np.ndarray):
            assert with_onnxruntime[key].dtype == np.float16
            np.testing.assert_array_equal(with_onnxruntime[key], value)
