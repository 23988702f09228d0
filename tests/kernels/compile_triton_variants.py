"""Compile kernels/attention.py's kernel with Triton's real compiler (to PTX and a cubin through
ptxas) for sm_80 and sm_90, for every constexpr path: no GPU is needed, and the interpreter, which
the other kernel tests use, cannot catch what only the compiler checks (types, layouts, scf.if).

Run as a script, without TRITON_INTERPRET: ``python compile_triton_variants.py``. Prints one line per
variant and exits 1 on any failure.
"""

import inspect
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from crossattn_gpu.kernels import attention as kernel_module

POINTER_TYPES = {"Mask": "*u8", "KLen": "*i32", "Lse": "*fp32", "Acc": "*fp32"}
SCALARS = {"num_heads": "i32", "len_q": "i32", "len_k": "i32", "dim_k": "i32", "dim_v": "i32",
           "qk_scale": "fp32", "mask_fill": "fp32"}


def compile_variant(dtype: str, precision: str, arch: int, single: bool, even: bool, extras: bool) -> None:
    fn = kernel_module._attention_fwd
    names = list(inspect.signature(fn.fn).parameters)
    signature = {}
    for name in names:
        if name in ("Q", "K", "V", "Out"):
            signature[name] = f"*{dtype}"
        elif name in POINTER_TYPES:
            signature[name] = POINTER_TYPES[name]
        elif name.startswith("stride_"):
            signature[name] = "i64"
        elif name in SCALARS:
            signature[name] = SCALARS[name]
        else:
            signature[name] = "constexpr"
    block_d = 128 if dtype != "fp32" else 64
    constexprs = dict(HAS_MASK=extras, HAS_KLEN=extras, BLOCK_M=64, BLOCK_N=64, BLOCK_DK=block_d, BLOCK_DV=block_d,
                      SINGLE_DK=single, SINGLE_DV=single, EVEN_M=even, EVEN_N=even, EVEN_DK=even, EVEN_DV=even,
                      INPUT_PRECISION=precision)
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8, "num_stages": 2})


def main() -> int:
    failures = 0
    types = [("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee")]
    for (dtype, precision), arch, single, even, extras in itertools.product(types, [80, 90], [True, False],
                                                                             [True, False], [True, False]):
        label = f"{dtype}/{precision} sm_{arch} single={single} even={even} mask+lengths={extras}"
        try:
            compile_variant(dtype, precision, arch, single, even, extras)
            print(f"ok   {label}")
        except Exception as exc:  # report every failing variant, then fail
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}".splitlines()[0])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
