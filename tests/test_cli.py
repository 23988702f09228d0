"""The crossattn-gpu command: demo, fuse and info, on temporary files."""

import re
import subprocess
import sys

import numpy as np
import pytest

import reference
from crossattn_gpu import CrossAttention
from crossattn_gpu.backends import backend_status, get_backend
from crossattn_gpu.cli import main
from onnx_opsets import runtime_has_opset


def write_collection(path, lengths, width, seed):
    rng = np.random.default_rng(seed)
    arrays = {f"ab{i:03d}": rng.standard_normal((n, width)).astype(np.float32) for i, n in enumerate(lengths)}
    np.savez(path, **arrays)
    return arrays


def test_demo_runs_the_seed_example(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert f"Backend: {get_backend('auto').name}" in out  # the best available (onnx without a GPU, when installed)
    assert "Fused sequential shape: (10, 64)" in out
    assert "Average sequential similarity:" in out
    assert "Cross-Attention Report" in out and "ms (first call, including set-up), then" in out
    assert re.search(r"then \d+\.\d{3} ms a call \(median of \d+\)", out)


def test_module_entry_point_and_help():
    for args in (["--help"], ["demo", "--help"], ["fuse", "--help"], ["export", "--help"], ["info", "--help"]):
        done = subprocess.run([sys.executable, "-m", "crossattn_gpu", *args], capture_output=True, text=True)
        assert done.returncode == 0 and "usage: crossattn-gpu" in done.stdout


def test_info_lists_backends_and_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy    available" in out and "numpy" in out and "GPU:" in out
    auto, auto_float64 = get_backend("auto").name, get_backend("auto", dtype="float64").name
    assert f"auto takes: {auto}{'' if auto == auto_float64 else ' (for models of dtype float64: ' + auto_float64}" in out
    try:
        import onnxruntime
    except ImportError:
        assert "onnxruntime providers" not in out
    else:
        assert f"onnxruntime providers: {', '.join(onnxruntime.get_available_providers())}\n" in out


def test_fuse_without_weights_draws_them_from_seed_and_heads(tmp_path, capsys):
    seq = write_collection(tmp_path / "seq.npz", [5, 3], 8, seed=1)
    struct = write_collection(tmp_path / "struct.npz", [5, 3], 8, seed=2)
    assert main(["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"), "--out",
                 str(tmp_path / "out.npz"), "--seed", "7", "--heads", "3", "--backend", "numpy", "--quiet"]) == 0
    assert "using random weights (seed 7, D=8, H=3)" in capsys.readouterr().err
    model = CrossAttention(8, 3, seed=7, backend="numpy")
    with np.load(tmp_path / "out.npz") as out:
        for key in seq:
            want = model.fuse_representations(seq[key], struct[key], need_weights=False, need_similarity=False)
            np.testing.assert_allclose(out[f"{key}/bidirectional_fusion"], want["bidirectional_fusion"],
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,precision", [("numpy", "ieee"), ("triton", "tf32x3"), ("auto", "ieee")])
def test_fuse_matches_single_example_results(tmp_path, capsys, backend, precision):
    choice = [] if backend == "auto" else ["--backend", backend]
    if backend == "auto":  # onnx on a CPU when installed
        backend = get_backend("auto").name
    why_not = backend_status()[backend]
    if why_not:
        pytest.skip(why_not)
    lengths = [5, 17, 3, 17, 1, 9, 12]
    seq = write_collection(tmp_path / "seq.npz", lengths, 8, seed=0)
    struct = write_collection(tmp_path / "struct.npz", lengths, 8, seed=1)
    model = CrossAttention(8, 2, seed=3)
    model.save(tmp_path / "w.safetensors")
    code = main([
        "fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"),
        "--out", str(tmp_path / "out.npz"), "--weights", str(tmp_path / "w.safetensors"), "--batch-size", "3",
        "--float32-precision", precision, *choice,
    ])
    assert code == 0
    captured = capsys.readouterr()
    assert f"fused 7 antibodies on backend {backend}" in captured.out
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
        assert len(out.files) == 3 * len(lengths)
        for key in seq:
            want = reference.fuse(*reference.params(model), seq[key].astype(np.float64), struct[key].astype(np.float64))
            for name in ("fused_sequential", "fused_structural", "bidirectional_fusion"):
                got = out[f"{key}/{name}"]
                assert got.dtype == np.float32 and got.shape == want[name].shape
                np.testing.assert_allclose(got, want[name], rtol=1e-4, atol=1e-5)


def test_fuse_reports_mismatched_ids(tmp_path, capsys):
    write_collection(tmp_path / "seq.npz", [3, 4], 8, seed=0)
    np.savez(tmp_path / "struct.npz", ab000=np.ones((3, 8), np.float32), other=np.ones((4, 8), np.float32))
    code = main(["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"), "--out", str(tmp_path / "o.npz")])
    assert code == 2
    err = capsys.readouterr().err
    assert "same antibody ids" in err and "'ab001'" in err and "'other'" in err


def test_fuse_dtype_is_one_an_npz_file_holds(tmp_path, capsys):
    write_collection(tmp_path / "seq.npz", [3], 8, seed=0)
    with pytest.raises(SystemExit) as stop:
        main(["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "seq.npz"), "--out",
              str(tmp_path / "o.npz"), "--dtype", "bfloat16"])
    assert stop.value.code == 2
    assert "invalid choice: 'bfloat16'" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_fuse_unequal_lengths_need_no_bidirectional(tmp_path, capsys):
    np.savez(tmp_path / "seq.npz", a=np.ones((3, 4)), b=np.ones((2, 4)))
    np.savez(tmp_path / "struct.npz", a=np.ones((5, 4)), b=np.ones((2, 4)))
    args = ["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"), "--out", str(tmp_path / "o.npz"), "--quiet"]
    assert main(args) == 2
    assert "id 'a': sequence length 3 != structure length 5" in capsys.readouterr().err
    assert main(args + ["--no-bidirectional"]) == 0
    with np.load(tmp_path / "o.npz") as out:
        assert sorted(out.files) == ["a/fused_sequential", "a/fused_structural", "b/fused_sequential", "b/fused_structural"]
        assert out["a/fused_structural"].shape == (5, 4)


def test_fuse_of_one_antibody_says_antibody(tmp_path, capsys):
    np.savez(tmp_path / "seq.npz", a=np.ones((3, 4)))
    args = ["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "seq.npz"), "--out", str(tmp_path / "o.npz")]
    assert main(args) == 0
    assert "fused 1 antibody on backend" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,message",
    [
        (b"not a zip", "not a readable npz file"),
        (None, "has shape (4,); each id needs an (L, D) array"),
    ],
)
def test_fuse_bad_input_files(tmp_path, capsys, content, message):
    if content is None:
        np.savez(tmp_path / "seq.npz", a=np.ones(4))
    else:
        (tmp_path / "seq.npz").write_bytes(content)
    np.savez(tmp_path / "struct.npz", a=np.ones((4, 4)))
    code = main(["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"), "--out", str(tmp_path / "o.npz")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_fuse_that_fails_midway_leaves_no_output(tmp_path, capsys):
    seq = write_collection(tmp_path / "seq.npz", [4, 6, 5], 8, seed=0)
    struct = write_collection(tmp_path / "struct.npz", [4, 6, 5], 8, seed=1)
    struct["ab000"][2, 3] = np.nan  # the shortest antibody: its batch runs last
    np.savez(tmp_path / "struct.npz", **struct)
    code = main(["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"),
                 "--out", str(tmp_path / "o.npz"), "--batch-size", "1", "--quiet"])
    assert code == 2
    assert "'ab000'" in capsys.readouterr().err and len(seq) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq.npz", "struct.npz"]


def test_fuse_reports_an_overflow_with_its_batch(tmp_path, capsys):
    seq = write_collection(tmp_path / "seq.npz", [4, 6], 8, seed=0)
    struct = write_collection(tmp_path / "struct.npz", [4, 6], 8, seed=1)
    for path, arrays in (("seq.npz", seq), ("struct.npz", struct)):  # float32 scores of ~1e40
        np.savez(tmp_path / path, **{key: x * 1e20 for key, x in arrays.items()})
    code = main(["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"),
                 "--out", str(tmp_path / "o.npz"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "in the batch with ids" in err and "overflowed float32" in err
    assert not (tmp_path / "o.npz").exists()


def test_export_refuses_to_write_over_its_weights(tmp_path, capsys):
    CrossAttention(8, 2, seed=0).save(tmp_path / "w.safetensors")
    before = (tmp_path / "w.safetensors").read_bytes()
    assert main(["export", "--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "is the weights file itself" in capsys.readouterr().err
    assert (tmp_path / "w.safetensors").read_bytes() == before


def test_fuse_width_must_match_weights(tmp_path, capsys):
    write_collection(tmp_path / "seq.npz", [3], 8, seed=0)
    write_collection(tmp_path / "struct.npz", [3], 8, seed=1)
    CrossAttention(6, 1, seed=0).save(tmp_path / "w.npz")
    code = main([
        "fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"),
        "--out", str(tmp_path / "o.npz"), "--weights", str(tmp_path / "w.npz"),
    ])
    assert code == 2
    assert "has width 8, but the model has D=6" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--opset", "23", "--dtype", "float16", "--mask", "--similarity"],
                                   ["--dtype", "float64"]])
def test_export_writes_a_model_onnxruntime_serves(tmp_path, capsys, extra):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from crossattn_gpu.export import OnnxFusion

    if "23" in extra and not runtime_has_opset(23):
        pytest.skip("this onnx or onnxruntime release predates opset 23")
    model = CrossAttention(8, 2, seed=0, backend="numpy")  # the reference (auto on a GPU computes float64 in float32)
    model.save(tmp_path / "w.safetensors")
    code = main(["export", "--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "m.onnx"), *extra])
    assert code == 0 and "wrote" in capsys.readouterr().out
    fusion = OnnxFusion(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((2, 5, 8))
    got = fusion(x, x)["fused_sequential"]
    want = model.fuse_representations(x, x)["fused_sequential"]
    rtol, atol = {"float16": (1e-2, 1e-2), "float64": (1e-13, 1e-14)}.get(fusion.dtype, (1e-5, 1e-6))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    assert ("seq_similarity" in fusion.output_names) == ("--similarity" in extra)


def test_export_needs_weights(tmp_path, capsys):
    assert main(["export", "--weights", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "none.safetensors" in capsys.readouterr().err


def test_export_serving_repository_only(tmp_path, capsys):
    pytest.importorskip("onnx")
    CrossAttention(8, 1, seed=0).save(tmp_path / "w.npz")
    assert main(["export", "--weights", str(tmp_path / "w.npz"), "--serving-repo", str(tmp_path / "repo")]) == 0
    assert (tmp_path / "repo" / "crossattn_fusion" / "1" / "model.onnx").is_file()
    with pytest.raises(SystemExit):
        main(["export", "--weights", str(tmp_path / "w.npz")])
    assert "give --out, --serving-repo or both" in capsys.readouterr().err


def test_fuse_with_auto_keeps_float64_files_in_float64(tmp_path, capsys):
    for name, seed in (("seq", 0), ("struct", 1)):
        arrays = write_collection(tmp_path / f"{name}.npz", [4, 6], 8, seed=seed)
        np.savez(tmp_path / f"{name}.npz", **{k: v.astype(np.float64) for k, v in arrays.items()})
    code = main(["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"),
                 "--out", str(tmp_path / "out.npz"), "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    # onnx computes float64 in float64; files of float64 alone name the dtype, so that auto may take NumPy
    backend = get_backend("auto", dtype="float64").name
    assert f"on backend {backend}" in captured.out
    tip = f"note: the files hold float64, which backend {backend} computes in float64; --dtype float32 computes " \
          "in float32, faster"
    assert (tip in captured.err) == (backend in ("numpy", "onnx"))
    model = CrossAttention(8, 1, seed=0)  # the command's random weights without --weights
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out, np.load(tmp_path / "seq.npz") as seq, \
            np.load(tmp_path / "struct.npz") as struct:
        for key in seq.files:
            want = reference.fuse(*reference.params(model), seq[key], struct[key])
            got = out[f"{key}/bidirectional_fusion"]
            assert got.dtype == np.float64
            # The GPU backends compute float64 in float32 (the README's backend table).
            rtol, atol = (1e-12, 1e-13) if backend in ("numpy", "onnx") else (1e-5, 1e-6)
            np.testing.assert_allclose(got, want["bidirectional_fusion"], rtol=rtol, atol=atol)
    args = ["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"), "--quiet"]
    for extra in (["--dtype", "float64"], ["--dtype", "float32"]):  # a dtype asked for gets no advice
        assert main([*args, "--out", str(tmp_path / f"out{extra[1]}.npz"), *extra]) == 0
        assert "note:" not in capsys.readouterr().err


def test_info_tips_on_openblas(capsys, monkeypatch):
    from crossattn_gpu import _blas

    spin_tip, avx_tip = "export OPENBLAS_THREAD_TIMEOUT=4", "export OPENBLAS_CORETYPE=SKYLAKEX"
    float64_choice = "(for models of dtype float64: numpy, whose OpenBLAS runs AVX-512 kernels here)"
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    monkeypatch.delenv("GOTO_THREAD_TIMEOUT", raising=False)
    monkeypatch.setattr(_blas, "cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                                     "avx512cd"})
    for libraries, spins in (([{"internal_api": "openblas", "num_threads": 2, "architecture": "SkylakeX"}], True),
                             ([{"internal_api": "openblas", "num_threads": 1, "architecture": "SkylakeX"}], False),
                             ([], False)):
        monkeypatch.setattr(_blas, "openblas_libraries", lambda: libraries)
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        assert (spin_tip in out) == (spins and get_backend("auto").name == "onnx")
        assert "OPENBLAS_CORETYPE" not in out  # SkylakeX kernels: AVX-512 in use (or nothing known)
        assert (float64_choice in out) == (bool(libraries) and get_backend("auto").name == "onnx")
    monkeypatch.setattr(_blas, "openblas_libraries", lambda: [{"internal_api": "openblas", "architecture": "Haswell"}])
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "NumPy's OpenBLAS runs its Haswell kernels, older than this CPU's instructions; " + avx_tip in out
    assert float64_choice not in out
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")  # OpenBLAS read it when it loaded
    monkeypatch.setattr(_blas, "openblas_libraries", lambda: [{"internal_api": "openblas", "num_threads": 2}])
    assert main(["info"]) == 0
    assert spin_tip not in capsys.readouterr().out


@pytest.mark.parametrize("bidirectional", [True, False])
def test_fuse_with_an_exported_model(tmp_path, capsys, bidirectional):
    pytest.importorskip("onnxruntime")
    from crossattn_gpu.export import to_onnx

    lengths = [5, 17, 3, 17, 1, 9, 12]
    seq = write_collection(tmp_path / "seq.npz", lengths, 8, seed=0)
    struct = write_collection(tmp_path / "struct.npz", lengths, 8, seed=1)
    model = CrossAttention(8, 2, seed=3)
    to_onnx(model, tmp_path / "m.onnx", similarity=True)
    code = main(["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"),
                 "--out", str(tmp_path / "out.npz"), "--model", str(tmp_path / "m.onnx"), "--batch-size", "3",
                 *([] if bidirectional else ["--no-bidirectional"])])
    assert code == 0
    assert "fused 7 antibodies on onnxruntime (CPUExecutionProvider)" in capsys.readouterr().out
    names = ("fused_sequential", "fused_structural", "bidirectional_fusion")[:3 if bidirectional else 2]
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
        assert sorted(out.files) == sorted(f"{key}/{name}" for key in seq for name in names)  # no similarities
        for key in seq:
            want = reference.fuse(*reference.params(model), seq[key].astype(np.float64), struct[key].astype(np.float64))
            for name in names:
                assert out[f"{key}/{name}"].dtype == np.float32
                np.testing.assert_allclose(out[f"{key}/{name}"], want[name], rtol=1e-4, atol=1e-5)


def test_a_model_exported_without_bidirectional_fuses_unequal_lengths(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = CrossAttention(8, 2, seed=3)
    model.save(tmp_path / "w.safetensors")
    assert main(["export", "--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "m.onnx"),
                 "--no-bidirectional"]) == 0
    seq = write_collection(tmp_path / "seq.npz", [5, 17, 3, 1], 8, seed=0)
    struct = write_collection(tmp_path / "struct.npz", [4, 17, 9, 2], 8, seed=1)
    args = ["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "struct.npz"),
            "--out", str(tmp_path / "out.npz"), "--model", str(tmp_path / "m.onnx"), "--quiet"]
    assert main(args) == 2
    assert ("the model was exported without bidirectional_fusion (--no-bidirectional); fuse with --no-bidirectional"
            in capsys.readouterr().err)
    assert not (tmp_path / "out.npz").exists()
    assert main([*args, "--no-bidirectional"]) == 0
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
        assert len(out.files) == 2 * len(seq)
        for key in seq:
            want = reference.fuse(*reference.params(model), seq[key].astype(np.float64), struct[key].astype(np.float64))
            for name in ("fused_sequential", "fused_structural"):
                np.testing.assert_allclose(out[f"{key}/{name}"], want[name], rtol=1e-4, atol=1e-5)


def test_fuse_with_a_model_on_a_named_provider(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from crossattn_gpu.export import to_onnx

    write_collection(tmp_path / "seq.npz", [4, 6], 8, seed=0)
    to_onnx(CrossAttention(8, 2, seed=3), tmp_path / "m.onnx")
    args = ["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "seq.npz"), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "cpu.npz"), "--model", str(tmp_path / "m.onnx"),
                 "--provider", "CPUExecutionProvider"]) == 0
    assert "on onnxruntime (CPUExecutionProvider)" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "no.npz"), "--model", str(tmp_path / "m.onnx"),
                 "--provider", "NoSuchExecutionProvider"]) == 2
    assert "not NoSuchExecutionProvider" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "no.npz"), "--provider", "CPUExecutionProvider"]) == 2
    assert "--provider names onnxruntime's execution provider for --model" in capsys.readouterr().err
    assert not (tmp_path / "no.npz").exists()


def test_fuse_with_a_model_refuses_the_options_of_weights(tmp_path, capsys):
    write_collection(tmp_path / "seq.npz", [3], 8, seed=0)
    args = ["fuse", "--seq", str(tmp_path / "seq.npz"), "--struct", str(tmp_path / "seq.npz"), "--out",
            str(tmp_path / "out.npz"), "--model", str(tmp_path / "m.onnx")]
    assert main([*args, "--weights", "w.npz", "--heads", "2", "--dtype", "float32"]) == 2
    assert ("error: --model fuses with the model's own weights and dtype on onnxruntime; drop --weights, --heads, "
            "--dtype") in capsys.readouterr().err
    assert not (tmp_path / "out.npz").exists()
