"""Which kernels NumPy's OpenBLAS runs on this CPU, as threadpoolctl reports them.

OpenBLAS picks its kernels once, when it loads, from the CPU it finds (or from OPENBLAS_CORETYPE). That
choice decides how fast the NumPy backend's GEMMs are, and so which CPU backend ``auto`` takes for
float64 work (``OnnxBackend.usable_by_auto``) and which tips ``crossattn-gpu info`` prints. Without
threadpoolctl (the ``cpu`` extra) nothing is known: no library is reported.
"""

from __future__ import annotations

#: OpenBLAS's kernels that use AVX-512 (its ``openblas_get_corename``, lower-cased).
AVX512_KERNELS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})
#: Its kernels for older instruction sets, which it also runs on AVX-512 CPUs it does not recognise
#: (this project's AMD EPYC VMs: Haswell).
PRE_AVX512_KERNELS = frozenset({"haswell", "zen", "sandybridge"})


def openblas_libraries() -> list[dict]:
    """threadpoolctl's records of the OpenBLAS libraries loaded in this process (none without it)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [lib for lib in threadpool_info() if lib.get("internal_api") == "openblas"]


def openblas_kernels() -> set[str]:
    """The kernels (lower-cased core names) of the OpenBLAS libraries loaded here; empty when unknown."""
    return {str(lib.get("architecture")).lower() for lib in openblas_libraries() if lib.get("architecture")}


def openblas_runs_avx512() -> bool:
    """True when every OpenBLAS loaded here (NumPy's) runs AVX-512 kernels; False when one does not, or
    when nothing is known (no threadpoolctl, or a NumPy on another BLAS)."""
    kernels = openblas_kernels()
    return bool(kernels) and kernels <= AVX512_KERNELS
