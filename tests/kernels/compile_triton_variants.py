"""Compile the Triton kernels (kernels/attention.py's fused kernel, kernels/attention_two_pass.py's two
passes, kernels/projection.py's TF32 GEMM, kernels/softmax_heads.py's softmax, kernels/small_fusion.py's
one-launch fusion, kernels/small_attention.py's one-launch attention, kernels/magnitude.py's
reduction, kernels/unit_rows.py's rows and kernels/probabilities.py's normalisation) with Triton's real
compiler (to PTX and a cubin through ptxas) for sm_80 and sm_90, in the launch configuration each
launcher picks for a shape of every kind, with and without mask and both lengths, and check that each fits
the chip's shared memory: no GPU is needed, and the interpreter, which the other kernel tests use,
cannot catch what only the compiler checks (types, layouts, scf.if, shared memory). For sm_90, the
chip this project runs on, Triton's own ptxas also reports each variant's registers and spills: the
projection GEMM's and the softmax's configurations were chosen to spill nothing there (255 registers
in tf32x3 at 128 x 64 x 32 tiles, 4 warps; the softmax's largest block 254 in float32), and the
one-launch fusion's longest sequences by dtype likewise (``small_fusion.MAX_BLOCK_L``, which the
one-launch attention shares), and the magnitude's, the unit rows' and the probabilities' blocks; a spill of
theirs fails. The attention operators' configurations spill (the fused kernel up to 2 KB in
float32, the two-pass operator's second pass up to 1.4 KB) and were still the fastest measured on an
H200, so their spills are only reported.

Run as a script, without TRITON_INTERPRET: ``python compile_triton_variants.py [SHARD SHARDS]`` (every
SHARDS-th variant from the SHARD-th; default all). Prints one line per variant and exits 1 on any failure.
"""

import inspect
import itertools
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from crossattn_gpu.kernels import attention as kernel_module
from crossattn_gpu.kernels import attention_two_pass as two_pass_module
from crossattn_gpu.kernels import magnitude as magnitude_module
from crossattn_gpu.kernels import probabilities as probabilities_module
from crossattn_gpu.kernels import projection as projection_module
from crossattn_gpu.kernels import small_attention as small_attention_module
from crossattn_gpu.kernels import small_fusion as small_fusion_module
from crossattn_gpu.kernels import softmax_heads as softmax_module
from crossattn_gpu.kernels import unit_rows as unit_rows_module

POINTER_TYPES = {"A": "*fp32", "B": "*fp32", "C": "*fp32", "Mask": "*u8", "KLen": "*i32", "QLen": "*i32", "Lse": "*fp32",
                 "Acc": "*fp32", "Scores": "*fp32", "RowMax": "*fp32", "RowInvSum": "*fp32", "SLen": "*i32",
                 "TLen": "*i32", "SimS": "*fp32", "SimT": "*fp32", "Magnitudes": "*fp32", "Partials": "*fp32",
                 "Lengths": "*i32", "Units": "*fp32"}
SCALARS = {"rows": "i32", "cols": "i32", "length": "i32", "depth": "i32", "num_heads": "i32", "len_q": "i32", "len_k": "i32", "dim_k": "i32", "dim_v": "i32",
           "rows_padded": "i32", "blocks_m": "i32", "blocks_n": "i32", "blocks_dv": "i32", "qk_scale": "fp32", "mask_fill": "fp32",
           "scale_log2": "fp32", "len_s": "i32", "len_t": "i32", "dim": "i32", "blocks_0": "i32", "blocks_01": "i32",
           **{f"{name}_{index}": "i32" for name in ("rows", "cols") for index in range(3)},
           **{f"size_{index}{axis}": "i32" for index in range(3) for axis in (1, 2)}}


#: (Lq, Lk, Dk, Dv) whose fused launch configurations are compiled: every branch of launch_config.
SHAPES = {"tiny": (3, 17, 8, 8), "W2": (256, 256, 128, 128), "D256": (4096, 4096, 256, 256),
          "W3": (256, 256, 1280, 1280), "Dk<Dv": (17, 33, 24, 300)}
#: The shapes of the two-pass operator: W3 and a short one (its smallest blocks).
TWO_PASS_SHAPES = {"W3": (256, 256, 1280, 1280), "Dk<Dv": (17, 33, 24, 300)}
#: (M, K, N) of the TF32 projection GEMM: a tiny one (masked edges) and W2's (full tiles).
PROJECTION_SHAPES = {"tiny": (3, 17, 5), "W2": (131072, 128, 1024)}
#: (H, Lk) of the softmax: W3's (full blocks), odd ones (masked heads and keys, ragged), the largest block.
SOFTMAX_SHAPES = {"W3": (8, 256), "odd": (3, 17), "largest": (16, 1024)}
#: Triton's name of each dtype, its size, and the float32 dot precision.
DTYPES = [("fp32", 4, "ieee"), ("fp32", 4, "tf32x3"), ("fp32", 4, "tf32"), ("fp16", 2, "ieee"), ("bf16", 2, "ieee")]
#: The fused shapes and the dtypes compiled with 64-bit offsets too (WIDE_OFFSETS).
WIDE_SHAPES = ("W2", "D256", "W3")
WIDE_DTYPES = [("fp32", 4, "ieee"), ("bf16", 2, "ieee")]
#: Shared memory a block may take: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def registers_and_spills(ptx: str, arch: int) -> tuple[int, int]:
    """Registers per thread and bytes of spill stores, from Triton's ptxas (-v) on the kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        done = subprocess.run([get_ptxas(arch).path, "-v", f"-arch=sm_{arch}a", source.name, "-o", "/dev/null"],
                              capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    return registers, int(re.search(r"(\d+) bytes spill stores", done.stderr).group(1))


def compile_kernel(fn, dtype: str, constexprs: dict, options: dict, arch: int) -> tuple[int, int | None, int]:
    """Compile one @triton.jit kernel with q/k/v/out in ``dtype``; returns its shared memory in bytes,
    and on sm_90 its registers per thread and its bytes of spill stores (else None and 0)."""
    names = list(inspect.signature(fn.fn).parameters)
    signature = {}
    for name in names:
        if name in ("Q", "K", "V", "Out", "Probs", "Xs", "Xt", "Xq", "Xk", "Xv", "W", "OutS", "OutT", "ProbsS",
                    "ProbsT", "X0", "X1", "X2", "X"):
            signature[name] = f"*{dtype}"
        elif name in POINTER_TYPES:
            signature[name] = POINTER_TYPES[name]
        elif name.startswith("stride_"):
            signature[name] = "i64"
        elif name in SCALARS:
            signature[name] = SCALARS[name]
        else:
            signature[name] = "constexpr"
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    registers, spills = registers_and_spills(compiled.asm["ptx"], arch) if arch == 90 else (None, 0)
    return compiled.metadata.shared, registers, spills


def fused_variants(dtype: str, cfg: dict, shape: tuple, extras: bool, wide: bool = False) -> list:
    """(kernel, constexprs) of the fused kernel as the launcher would use them."""
    len_q, len_k, dim_k, dim_v = shape
    constexprs = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    constexprs.update(HAS_MASK=extras, HAS_KLEN=extras, HAS_QLEN=extras, SINGLE_DK=dim_k <= cfg["BLOCK_DK"],
                      SINGLE_DV=dim_v <= cfg["BLOCK_DV"], EVEN_M=len_q % cfg["BLOCK_M"] == 0,
                      EVEN_N=len_k % cfg["BLOCK_N"] == 0 and not extras, EVEN_DK=dim_k % cfg["BLOCK_DK"] == 0,
                      EVEN_DV=dim_v % cfg["BLOCK_DV"] == 0,
                      # The fusion's head sum needs Dv in one chunk; compiled here with mask and lengths,
                      # and without the lse, as the fusion launches it when no probabilities are asked.
                      SUM_HEADS=extras and dim_v <= cfg["BLOCK_DV"], STORE_LSE=not extras, WIDE_OFFSETS=wide)
    return [(kernel_module._attention_fwd, constexprs)]


def two_pass_variants(dtype: str, cfg: dict, shape: tuple, extras: bool, wide: bool = False) -> list:
    """(kernel, constexprs) of both passes as the launcher would use them (heads summed with extras)."""
    len_q, len_k, dim_k, dim_v = shape
    even = {"EVEN_M": len_q % cfg["BLOCK_M"] == 0, "EVEN_N": len_k % cfg["BLOCK_N"] == 0 and not extras}
    common = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"], "INPUT_PRECISION": cfg["INPUT_PRECISION"],
              "HAS_KLEN": extras, "HAS_QLEN": extras, "WIDE_OFFSETS": wide, **even}
    scores = {**common, "HAS_MASK": extras, "BLOCK_DK": cfg["BLOCK_DK"], "EVEN_DK": dim_k % cfg["BLOCK_DK"] == 0,
              "STORE_LSE": not extras}
    values = {**common, "BLOCK_DV": cfg["BLOCK_DV"], "EVEN_DV": dim_v % cfg["BLOCK_DV"] == 0, "SUM_HEADS": extras}
    return [(two_pass_module._attention_fwd_scores, scores), (two_pass_module._attention_fwd_probs_values, values)]


def projection_variants() -> list:
    """(label, kernel, constexprs, options) of the TF32 projection GEMM, float32 only."""
    found = []
    for (name, (rows, depth, cols)), precision in itertools.product(PROJECTION_SHAPES.items(), ("tf32x3", "tf32")):
        cfg = projection_module.launch_config(rows, cols, depth)
        constexprs = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        constexprs.update(EVEN_M=rows % cfg["BLOCK_M"] == 0, EVEN_N=cols % cfg["BLOCK_N"] == 0,
                          EVEN_K=depth % cfg["BLOCK_K"] == 0, INPUT_PRECISION=precision)
        options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        found.append((f"fp32/{precision} {name}", projection_module._matmul_fwd, constexprs, options))
    return found


def softmax_variants() -> list:
    """(label, kernel, dtype of the probabilities, constexprs, options) of the heads' softmax."""
    found = []
    for (name, (heads, len_k)), dtype in itertools.product(SOFTMAX_SHAPES.items(), ("fp32", "fp16", "bf16")):
        cfg = softmax_module.launch_config(heads, len_k)
        constexprs = {"BLOCK_H": cfg["BLOCK_H"], "BLOCK_K": cfg["BLOCK_K"], "EVEN_H": heads == cfg["BLOCK_H"],
                      "EVEN_K": len_k == cfg["BLOCK_K"], "HAS_KLEN": name == "odd", "HAS_QLEN": name == "odd"}
        found.append((f"{dtype} {name}", softmax_module._softmax_heads_fwd, dtype, constexprs,
                      {"num_warps": cfg["num_warps"]}))
    return found


def small_fusion_variants() -> list:
    """(label, kernel, dtype, constexprs, options) of the one-launch fusion, writing the inputs' magnitudes:
    W1's shape (float32, as the harness calls it), and in every dtype and precision the longest sequences it takes at D = 64 with
    mask, lengths, probabilities and similarities, and in 16 bits, whose sequences are longer without
    the similarities, without them (its largest blocks)."""
    found = []
    shapes = [("W1", (10, 10, 64), "fp32", 4, "ieee", False, False)]
    shapes += [("longest", None, dtype, itemsize, precision, True, True) for dtype, itemsize, precision in DTYPES]
    shapes += [("longest", None, dtype, 2, "ieee", True, False) for dtype in ("fp16", "bf16")]
    for name, shape, dtype, itemsize, precision, extras, similarity in shapes:
        if shape is None:
            longest = small_fusion_module.longest(itemsize, precision, similarity)
            shape = (longest, longest - 1, small_fusion_module.MAX_BLOCK_D)
        cfg = small_fusion_module.launch_config(*shape, itemsize, precision)
        constexprs = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        # The inputs' magnitudes always: the front end asks for them (``KernelMagnitude``).
        constexprs.update(HAS_MASK=extras, HAS_SLEN=extras, HAS_TLEN=extras, STORE_PROBS=extras, STORE_SIM=similarity,
                          STORE_MAGNITUDE=True)
        found.append((f"{dtype}/{cfg['INPUT_PRECISION']} {name} {shape} mask+lengths+probabilities={extras} "
                      f"similarities={similarity}",
                      small_fusion_module._small_fusion_fwd, dtype, constexprs,
                      {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}))
    return found


def small_attention_variants() -> list:
    """(label, kernel, dtype, constexprs, options) of the one-launch multi-head attention in every dtype and
    precision, at the longest sequences it takes (the fusion's, without similarities) at D = 64, with mask,
    lengths, probabilities and the inputs' magnitudes, values apart from the keys."""
    found = []
    for dtype, itemsize, precision in DTYPES:
        longest = small_fusion_module.longest(itemsize, precision)
        shape = (longest, longest - 1, small_fusion_module.MAX_BLOCK_D)
        cfg = small_fusion_module.launch_config(*shape, itemsize, precision)
        constexprs = {"BLOCK_Q": cfg["BLOCK_S"], "BLOCK_K": cfg["BLOCK_T"], "BLOCK_D": cfg["BLOCK_D"], "HAS_MASK": True,
                      "HAS_QLEN": True, "HAS_KLEN": True, "STORE_PROBS": True, "STORE_MAGNITUDE": True,
                      "VALUES_ARE_KEYS": False, "INPUT_PRECISION": cfg["INPUT_PRECISION"]}
        found.append((f"{dtype}/{cfg['INPUT_PRECISION']} longest {shape} mask+lengths+probabilities+magnitudes",
                      small_attention_module._small_attention_fwd, dtype, constexprs,
                      {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}))
    return found


def magnitude_variants() -> list:
    """(label, kernel, dtype, constexprs, options) of the magnitude's reduction in each dtype, for rows of 5
    (its narrowest blocks, 1024 rows x 8 columns), 64 and at least 128 columns (its widest, 64 x 128)."""
    found = []
    for cols, dtype in itertools.product((5, 64, 1280), ("fp32", "fp16", "bf16")):
        cfg = magnitude_module.launch_config(cols)
        found.append((f"{dtype} D={cols}", magnitude_module._magnitude_fwd, dtype,
                      {"BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": cfg["BLOCK_C"]}, {"num_warps": cfg["num_warps"]}))
    return found


def unit_rows_variants() -> list:
    """(label, kernel, dtype, constexprs, options) of the unit rows in each dtype, with lengths, for rows of 5
    (blocks of 512 rows x 8 columns), 128 (32 x 128) and 1280 (8 x 512, three steps a pass)."""
    found = []
    for cols, dtype in itertools.product((5, 128, 1280), ("fp32", "fp16", "bf16")):
        cfg = unit_rows_module.launch_config(cols)
        found.append((f"{dtype} D={cols} lengths", unit_rows_module._unit_rows_fwd, dtype,
                      {"HAS_LENGTHS": True, "BLOCK_R": cfg["BLOCK_R"], "BLOCK_C": cfg["BLOCK_C"]},
                      {"num_warps": cfg["num_warps"]}))
    return found


def probabilities_variants() -> list:
    """(label, kernel, dtype, constexprs, options) of the probabilities' normalisation in each output dtype,
    with both lengths, in the two-pass operator's blocks for W2's shape (128 x 64, 8 warps), which it takes."""
    cfg = two_pass_module.launch_config(256, 256, 128, 128, 2)
    return [(f"{dtype} W2 lengths", probabilities_module._probabilities_fwd, dtype,
             {"HAS_KLEN": True, "HAS_QLEN": True, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]},
             {"num_warps": cfg["num_warps"]}) for dtype in ("fp32", "fp16", "bf16")]


def variants() -> list:
    """Every variant to compile: (label, kernel, dtype, constexprs, options, arch, whether a spill fails)."""
    found = [(f"{fn.fn.__name__} {label} sm_{arch}", fn, "fp32", constexprs, options, arch, True)
             for (label, fn, constexprs, options), arch in itertools.product(projection_variants(), [80, 90])]
    found += [(f"{fn.fn.__name__} {label} sm_{arch}", fn, dtype, constexprs, options, arch, True)
              for (label, fn, dtype, constexprs, options), arch in itertools.product(softmax_variants(), [80, 90])]
    found += [(f"{fn.fn.__name__} {label} sm_{arch}", fn, dtype, constexprs, options, arch, True)
              for (label, fn, dtype, constexprs, options), arch in itertools.product(
                  small_fusion_variants() + small_attention_variants() + magnitude_variants() + unit_rows_variants()
                  + probabilities_variants(), [80, 90])]
    plans = [(kernel_module, SHAPES, fused_variants), (two_pass_module, TWO_PASS_SHAPES, two_pass_variants)]
    runs = [(plan, dtype, arch, extras, False) for plan, dtype, arch, extras in itertools.product(
        plans, DTYPES, [80, 90], [False, True])]
    # 64-bit offsets inside an example (WIDE_OFFSETS, for examples whose rows pass 2**31 elements), with mask
    # and lengths, on sm_90: they compile, and how far they spill is reported.
    wide_plans = [(kernel_module, {k: SHAPES[k] for k in WIDE_SHAPES}, fused_variants),
                  (two_pass_module, {"W3": TWO_PASS_SHAPES["W3"]}, two_pass_variants)]
    runs += [(plan, dtype, 90, True, True) for plan, dtype in itertools.product(wide_plans, WIDE_DTYPES)]
    for (module, shapes, kernel_variants), (dtype, itemsize, precision), arch, extras, wide in runs:
        for name, shape in shapes.items():
            cfg = module.launch_config(*shape, itemsize, precision=precision)
            options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
            for fn, constexprs in kernel_variants(dtype, cfg, shape, extras, wide):
                label = (f"{fn.fn.__name__} {dtype}/{cfg['INPUT_PRECISION']} {name} sm_{arch} mask+lengths={extras}"
                         + " 64-bit offsets" * wide)
                found.append((label, fn, dtype, constexprs, options, arch, False))
    return found


def main(shard: int = 0, shards: int = 1) -> int:
    """Compile every ``shards``-th variant from the ``shard``-th (the test runs one process per core)."""
    failures = 0
    for label, fn, dtype, constexprs, options, arch, spills_fail in variants()[shard::shards]:
        try:
            shared, registers, spills = compile_kernel(fn, dtype, constexprs, options, arch)
            if shared > SHARED_LIMIT[arch]:
                raise RuntimeError(f"needs {shared} bytes of shared memory; sm_{arch} has {SHARED_LIMIT[arch]}")
            if spills and spills_fail:
                raise RuntimeError(f"spills {spills} bytes of registers")
            print(f"ok   {label} shared={shared} registers={registers} spills={spills}")
        except Exception as exc:  # report every failing variant, then fail
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}".splitlines()[0])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*map(int, sys.argv[1:3])))
