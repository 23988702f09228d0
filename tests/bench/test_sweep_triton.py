"""bench/sweep_triton.py on tiny shapes (under Triton's interpreter without a GPU)."""

import json

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from bench import sweep_triton  # noqa: E402


def test_smoke_sweep_checks_times_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert sweep_triton.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["configs"]
    assert {r["case"] for r in rows} == {name for name, *_ in sweep_triton.SMOKE_CASES}
    assert all(r["median_s"] > 0 and r["rel_error"] < 1e-3 for r in rows)
    assert sum(r["is_default"] for r in rows) == len(sweep_triton.SMOKE_CASES)
    assert {r["kernel"] for r in rows if r["case"] == "tiny-wide"} == {"two_pass", "fused"}
    assert "| tiny | float32 |" in capsys.readouterr().out


def test_an_interrupted_sweep_writes_the_cases_it_finished(tmp_path, monkeypatch, capsys):
    real = sweep_triton.sweep_case

    def stopped_after_the_first(name, *args):
        if name != sweep_triton.SMOKE_CASES[0][0]:
            raise KeyboardInterrupt
        return real(name, *args)

    monkeypatch.setattr(sweep_triton, "sweep_case", stopped_after_the_first)
    out = tmp_path / "sweep.json"
    assert sweep_triton.main(["--smoke", "--out", str(out)]) == 130
    result = json.loads(out.read_text())
    assert result["interrupted"] and {r["case"] for r in result["configs"]} == {sweep_triton.SMOKE_CASES[0][0]}
    assert "interrupted" in capsys.readouterr().err


def test_candidates_start_with_the_launchers_choice_and_are_distinct():
    fused = sweep_triton.launch_config(256, 256, 1280, 1280, 2)
    wide = sweep_triton.candidates(256, 1280, torch.bfloat16)  # W3: the two-pass operator first
    assert wide[:3] == [("two_pass", sweep_triton.two_pass.launch_config(256, 256, 1280, 1280, 2), True),
                        ("fused", fused, True), ("fused", fused, False)]
    assert len({json.dumps(c, sort_keys=True) for c in wide}) == len(wide)
    assert any(kernel == "fused" and c["BLOCK_M"] == 128 for kernel, c, _ in wide)
    narrow = sweep_triton.candidates(256, 128, torch.float32)  # W2 float32: the fused kernel only
    assert {kernel for kernel, _, _ in narrow} == {"fused"}
    assert {c["INPUT_PRECISION"] for _, c, _ in narrow} == {"ieee", "tf32x3", "tf32"}


def test_a_config_that_fails_is_recorded_not_fatal(monkeypatch):
    monkeypatch.setattr(sweep_triton, "candidates", lambda *a: [("fused", {"BLOCK_M": 16}, True)])  # wrong keys: refused
    (row,) = sweep_triton.sweep_case("bad", 1, 1, 8, 8, "float32", "cpu" if not torch.cuda.is_available() else "cuda", 4)
    assert row["error"].startswith("ValueError: config must have exactly the keys")


def test_unfused_alternative_computes_the_heads_sum():
    q, k, v = sweep_triton.fusion_inputs(2, 3, 17, 24, torch.float32, "cpu")
    scale = 24**-0.5
    assert sweep_triton.checked_error(sweep_triton.unfused_head_sum(q, k, v, scale), q, k, v, scale) < 1e-6


def test_sdpa_alternative_computes_the_heads_sum():
    q, k, v = sweep_triton.fusion_inputs(2, 3, 17, 24, torch.float32, "cpu")
    scale = 24**-0.5
    assert sweep_triton.checked_error(sweep_triton.sdpa_head_sum(q, k, v, scale), q, k, v, scale) < 1e-6


def test_cases_option_selects_and_rejects(capsys):
    with pytest.raises(SystemExit):
        sweep_triton.main(["--cases", "W9"])
    assert "matches none" in capsys.readouterr().err


def test_float32_candidates_include_tf32x3_for_both_operators():
    wide = sweep_triton.candidates(256, 1280, torch.float32)  # W3 float32: two-pass, IEEE then tf32x3
    tiles = sweep_triton.two_pass.launch_config
    assert wide[:2] == [("two_pass", tiles(256, 256, 1280, 1280, 4), True),
                        ("two_pass", tiles(256, 256, 1280, 1280, 4, precision="tf32x3"), True)]
    assert len({json.dumps(c, sort_keys=True) for c in wide}) == len(wide)
    assert {c["INPUT_PRECISION"] for kernel, c, _ in wide if kernel == "fused"} == {"ieee", "tf32x3", "tf32"}


def test_stages_of_a_float32_case_time_the_tf32x3_projection_and_fusion():
    stages = sweep_triton.stages("tiny", 2, 2, 40, 24, "float32", "cuda" if torch.cuda.is_available() else "cpu")
    assert stages["projection_tf32x3_s"] > 0 and stages["fusion_tf32x3_s"] > 0
    assert stages["projection_tf32x3_rel_error"] < 1e-6
    assert all(stages[f"projection_tf32x3_{'x'.join(map(str, tiles))}_s"] > 0 for tiles in sweep_triton.PROJECTION_VARIANTS)


def test_stages_time_the_gemm_route_on_its_layout():
    """The backend's GEMM route, on the fusion's inputs laid out (B, L, H, D): timed and checked."""
    stages = sweep_triton.stages("tiny-wide", 1, 2, 20, 300, "float16", "cuda" if torch.cuda.is_available() else "cpu")
    assert stages["gemm_s"] > 0 and stages["gemm_rel_error"] < 5e-3
    assert stages["sdpa_s"] > 0 and stages["unfused_s"] > 0


def test_precision_option_keeps_that_precisions_configurations():
    """--precision tf32x3: only tf32x3 configurations, among them the block variants; the launcher's
    IEEE default is not among them, so no row claims to be it."""
    wide = sweep_triton.candidates(256, 128, torch.float32)
    tf32x3 = [c for c in wide if c[1]["INPUT_PRECISION"] == "tf32x3"]
    assert len(tf32x3) >= len(sweep_triton.VARIANTS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = sweep_triton.sweep_case("tiny", 1, 2, 20, 24, "float32", device, 2, "tf32x3")
    assert [r["config"]["INPUT_PRECISION"] for r in rows] == ["tf32x3", "tf32x3"]
    assert not any(r["is_default"] for r in rows) and all(r["rel_error"] < 1e-5 for r in rows)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA loads need an sm_90 or newer GPU")
def test_tma_candidates_where_whole_tiles_allow_them_and_they_run():
    w2 = sweep_triton.candidates(256, 128, torch.bfloat16)
    tma = [c for kernel, c, summed in w2 if c["TMA"]]
    assert len(tma) == len(sweep_triton.TMA_VARIANTS[128]) and w2[2][1]["TMA"]  # timed right after the defaults
    assert not any(c["TMA"] for _, c, _ in sweep_triton.candidates(256, 128, torch.float32))  # 16-bit only
    assert not any(c.get("TMA") for _, c, _ in sweep_triton.candidates(256, 1280, torch.bfloat16))  # chunked heads
    assert not any(c["TMA"] for _, c, _ in sweep_triton.candidates(40, 128, torch.bfloat16))  # partial tiles
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = sweep_triton.sweep_case("tma", 1, 2, 128, 16, "float16", device, 2 + len(sweep_triton.TMA_VARIANTS[128]))
    ran = [r for r in rows if r["config"]["TMA"]]
    assert len(ran) == len(sweep_triton.TMA_VARIANTS[128])
    assert all("error" not in r and r["rel_error"] < 1e-2 for r in ran), ran
    assert "TMA" in sweep_triton.markdown(ran)
