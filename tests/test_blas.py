"""crossattn_gpu._blas: NumPy's OpenBLAS kernels as threadpoolctl reports them."""

import pytest

from crossattn_gpu import _blas


@pytest.mark.parametrize("libraries, avx512", [
    ([{"internal_api": "openblas", "architecture": "SkylakeX"}], True),
    ([{"internal_api": "openblas", "architecture": "SapphireRapids"},
      {"internal_api": "openblas", "architecture": "cooperlake"}], True),
    ([{"internal_api": "openblas", "architecture": "SkylakeX"},  # two libraries, one of them on AVX2
      {"internal_api": "openblas", "architecture": "Haswell"}], False),
    ([{"internal_api": "openblas", "architecture": "Zen"}], False),
    ([{"internal_api": "openblas"}], False),  # a threadpoolctl that does not say
    ([], False),  # no threadpoolctl, or a NumPy on MKL or Accelerate
])
def test_openblas_runs_avx512_only_when_every_openblas_says_so(monkeypatch, libraries, avx512):
    monkeypatch.setattr(_blas, "openblas_libraries", lambda: libraries)
    assert _blas.openblas_runs_avx512() is avx512


def test_the_libraries_are_this_process_openblas():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numpy as np

    np.ones((64, 64)) @ np.ones((64, 64))  # NumPy's BLAS loaded
    found = [lib for lib in threadpoolctl.threadpool_info() if lib.get("internal_api") == "openblas"]
    assert _blas.openblas_libraries() == found
    assert _blas.openblas_kernels() == {lib["architecture"].lower() for lib in found if lib.get("architecture")}


def test_without_threadpoolctl_nothing_is_known(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_threadpoolctl(name, *args, **kwargs):
        if name == "threadpoolctl":
            raise ImportError("no threadpoolctl")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_threadpoolctl)
    assert _blas.openblas_libraries() == [] and not _blas.openblas_runs_avx512()


AVX512 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}


@pytest.mark.parametrize("flags, kernels, advice", [
    (AVX512, ["Haswell"], ("Haswell", "SKYLAKEX")),  # this project's AMD EPYC VMs
    (AVX512, ["Prescott"], ("Prescott", "SKYLAKEX")),  # NumPy 1.24's OpenBLAS on its Intel Xeon
    (AVX512, ["SkylakeX"], None),
    (AVX512, ["SkylakeX", "Haswell"], ("Haswell, SkylakeX", "SKYLAKEX")),
    ({"avx2", "fma", "avx512f"}, ["Haswell"], None),  # AVX-512 without BW, VL, DQ, CD: not SkylakeX's
    ({"avx2", "fma"}, ["Zen"], None),
    ({"avx2", "fma"}, ["Prescott"], ("Prescott", "HASWELL")),
    ({"sse3"}, ["Prescott"], None),
    (AVX512, [], None),  # nothing known
    (set(), ["Haswell"], None),  # flags unknown (not Linux)
])
def test_faster_coretype_asks_only_for_what_the_cpu_has(monkeypatch, flags, kernels, advice):
    monkeypatch.setattr(_blas, "cpu_flags", lambda: flags)
    monkeypatch.setattr(_blas, "openblas_libraries",
                        lambda: [{"internal_api": "openblas", "architecture": k} for k in kernels])
    assert _blas.faster_coretype() == advice


def test_cpu_flags_of_the_first_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse3 avx2 fma avx512f\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert _blas.cpu_flags(str(cpuinfo)) == {"fpu", "sse3", "avx2", "fma", "avx512f"}
    assert _blas.cpu_flags(str(tmp_path / "absent")) == set()
