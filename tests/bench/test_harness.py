"""python -m bench end to end on the smallest workload, and a wrong peer failing the run."""

import json
import platform

import numpy as np

import bench.__main__ as harness
from bench import peers


def test_small_run_writes_json_markdown_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")  # recorded: it changes the peers' speed
    code = harness.main(["--device", "cpu", "--workloads", "W1", "--peers", "seed,numpy,SDPA", "--repeats", "5",
                         "--budget", "0.2", "--out-dir", str(tmp_path)])
    assert code == 0
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    ran = [r for r in report["rows"] if not r.get("skipped")]
    assert {"seed (loops, NumPy)", "crossattn_gpu numpy"} <= {r["peer"] for r in ran}
    assert all(r["ok"] and r["median_s"] > 0 and r["repeats"] >= 5 for r in ran)
    assert report["ceilings"]["gemm_flops"]["float32"] > 0 and report["versions"]["numpy"] == np.__version__
    assert report["machine"]["environment"]["OPENBLAS_THREAD_TIMEOUT"] == "4"
    assert report["machine"]["description"].startswith(harness.cpu_model() + ", ")
    if harness.numpy_blas():  # which kernels NumPy's GEMMs ran: they set its speed
        assert report["machine"]["description"].endswith(f"NumPy's BLAS {harness.numpy_blas()}")
    table = next(tmp_path.glob("*.md")).read_text()
    assert "| W1 | crossattn_gpu numpy | float32 |" in table and " OPENBLAS_THREAD_TIMEOUT=4" in table
    if any(r["peer"].startswith("torch batched") for r in ran):  # the plot compares with torch SDPA
        assert list(tmp_path.glob("*.png"))


def test_a_fast_wrong_result_fails_the_run(tmp_path, monkeypatch, capsys):
    class Wrong(peers.SeedPeer):
        name = "seed but wrong"

        def prepare(self, model, workload, pairs, dtype):
            prepared = super().prepare(model, workload, pairs, dtype)
            prepared.fused = lambda result: (result[0] * 1.01, result[1])
            return prepared

    monkeypatch.setattr(harness, "all_peers", lambda: [Wrong()])
    code = harness.main(["--device", "cpu", "--workloads", "W1", "--repeats", "3", "--budget", "0.1", "--out-dir", str(tmp_path)])
    assert code == 1
    assert "WRONG" in capsys.readouterr().err
    assert "WRONG" in next(tmp_path.glob("*.md")).read_text()


def test_an_interrupted_run_reports_the_workloads_it_finished(tmp_path, monkeypatch, capsys):
    """A time limit's SIGINT (bench/gpu_session.sh) keeps what was timed: the finished workloads'
    report is written and the run exits 130."""
    real = harness.run_workload

    def stopped_after_the_first(workload, *args):
        if workload.name != "W1":
            raise KeyboardInterrupt
        return real(workload, *args)

    monkeypatch.setattr(harness, "run_workload", stopped_after_the_first)
    code = harness.main(["--device", "cpu", "--workloads", "W1,W2c", "--peers", "numpy", "--dtypes", "float32",
                         "--repeats", "3", "--budget", "0.1", "--out-dir", str(tmp_path)])
    assert code == 130
    assert "interrupted: reporting W1" in capsys.readouterr().err
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert list(report["workloads"]) == ["W1"] and {r["workload"] for r in report["rows"]} == {"W1"}


def test_a_run_interrupted_before_any_workload_writes_nothing(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "run_workload", interrupted)
    assert harness.main(["--device", "cpu", "--workloads", "W1", "--out-dir", str(tmp_path)]) == 130
    assert not list(tmp_path.iterdir())


def test_half_precision_rule_allows_twice_the_best_torch_error(tmp_path, monkeypatch, capsys):
    def off_by(name, factor):
        class Off(peers.SeedPeer):
            def prepare(self, model, workload, pairs, dtype):
                prepared = super().prepare(model, workload, pairs, dtype)
                prepared.fused = lambda result: (result[0] * factor, result[1])
                return prepared

        Off.name = name
        return Off()

    # The "torch" peer is off by 1e-6; 1.5e-6 passes (within twice that), 3e-6 fails, though both
    # are far above the fixed float64 limit of 1e-10.
    monkeypatch.setattr(harness, "all_peers", lambda: [off_by("torch yardstick", 1 + 1e-6),
                                                       off_by("close", 1 + 1.5e-6), off_by("too far", 1 + 3e-6)])
    code = harness.main(["--device", "cpu", "--workloads", "W1", "--dtypes", "float64", "--repeats", "3",
                         "--budget", "0.1", "--out-dir", str(tmp_path)])
    assert code == 1
    rows = {r["peer"]: r for r in json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]}
    assert rows["torch yardstick"]["ok"] and rows["close"]["ok"] and not rows["too far"]["ok"]
    assert abs(rows["close"]["allowed_error"] - 2 * rows["torch yardstick"]["rel_error"]) < 1e-12


def test_gemm_ceiling_of_tf32x3_is_a_third_of_tf32s():
    ceil = {"gemm_flops": {"float32": 50e12, "tf32": 300e12, "bfloat16": 700e12}}
    assert harness.gemm_ceiling(ceil, "tf32x3") == 100e12
    assert harness.gemm_ceiling(ceil, "bfloat16") == 700e12
    assert harness.gemm_ceiling({"gemm_flops": {"float32": 50e12}}, "tf32x3") == 50e12  # tf32 not measured
    assert harness.SDPA_DTYPE.get("tf32x3") == "float32" and "tf32x3" in peers.OursPeer("triton").dtypes
    assert "tf32x3" not in peers.OursPeer("cupy").dtypes  # its CUDA C kernel has no TF32 path


def test_the_cpu_model_comes_from_the_first_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n"
                       "model name\t: Intel(R) Xeon(R) Processor\n\nprocessor\t: 1\nmodel name\t: Other\n")
    assert harness.cpu_model(str(cpuinfo)) == "Intel(R) Xeon(R) Processor (cpu family 6, model 207)"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R45\n")
    assert harness.cpu_model(str(cpuinfo)) == "AMD EPYC 9R45"
    fallback = platform.processor() or platform.machine()
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # no model name (some ARM kernels)
    assert harness.cpu_model(str(cpuinfo)) == fallback
    assert harness.cpu_model(str(tmp_path / "absent")) == fallback
