"""Which kernels NumPy's OpenBLAS runs on this CPU, as threadpoolctl reports them.

OpenBLAS picks its kernels once, when it loads, from the CPU it finds (or from OPENBLAS_CORETYPE). That
choice decides how fast the NumPy backend's GEMMs are, and so which CPU backend ``auto`` takes for
float64 work (``OnnxBackend.usable_by_auto``) and which tips ``crossattn-gpu info`` prints. Without
threadpoolctl (the ``cpu`` extra) nothing is known: no library is reported.
"""

from __future__ import annotations

#: OpenBLAS's kernels that use AVX-512 (its ``openblas_get_corename``, lower-cased).
AVX512_KERNELS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})
#: OPENBLAS_CORETYPE values for a CPU's best instructions, best first: the CPU flags each needs, and
#: the kernels that already use them. OpenBLAS falls back to older kernels on CPUs it does not
#: recognise: AVX2 ones (Haswell) on this project's AMD EPYC VMs, SSE3 ones (Prescott) with NumPy
#: 1.24's OpenBLAS on its Intel Xeon VM, whose float32 GEMM ran at 37 GFLOP/s there and 201 with
#: OPENBLAS_CORETYPE=SKYLAKEX.
CORETYPES = (
    ("SKYLAKEX", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}), AVX512_KERNELS),
    ("HASWELL", frozenset({"avx2", "fma"}), AVX512_KERNELS | {"haswell", "zen"}),
)


def blas_libraries() -> list[dict]:
    """threadpoolctl's records of the BLAS libraries loaded in this process (none without it)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]


def openblas_libraries() -> list[dict]:
    """threadpoolctl's records of the OpenBLAS libraries loaded in this process (none without it)."""
    return [lib for lib in blas_libraries() if lib.get("internal_api") == "openblas"]


def openblas_kernels() -> set[str]:
    """The kernels (lower-cased core names) of the OpenBLAS libraries loaded here; empty when unknown."""
    return {str(lib.get("architecture")).lower() for lib in openblas_libraries() if lib.get("architecture")}


def openblas_runs_avx512() -> bool:
    """True when every OpenBLAS loaded here (NumPy's) runs AVX-512 kernels; False when one does not, or
    when nothing is known (no threadpoolctl, or a NumPy on another BLAS)."""
    kernels = openblas_kernels()
    return bool(kernels) and kernels <= AVX512_KERNELS


def cpu_fields(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """The fields of this CPU's first processor as Linux reports them ("model name", "flags", ...);
    empty elsewhere."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():  # the first processor's block is enough
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of this CPU's first processor (Linux); empty elsewhere."""
    return set(cpu_fields(cpuinfo).get("flags", "").split())


def faster_coretype() -> tuple[str, str] | None:
    """(the kernels OpenBLAS runs, the OPENBLAS_CORETYPE that would use this CPU's best instructions)
    when the OpenBLAS loaded here runs older kernels than the CPU allows; None when it uses them, or
    when its kernels or the CPU's flags are unknown."""
    names = {str(lib["architecture"]) for lib in openblas_libraries() if lib.get("architecture")}
    if not names:
        return None
    flags = cpu_flags()
    for coretype, needs, using in CORETYPES:
        if needs <= flags:
            return None if {name.lower() for name in names} <= using else (", ".join(sorted(names)), coretype)
    return None
