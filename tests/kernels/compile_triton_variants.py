"""Compile the Triton kernels exactly as their launchers launch them, with Triton's real compiler (to PTX
and a cubin through ptxas) for sm_80 and sm_90, and check what only the compiler can: types, layouts,
shared memory, registers. No GPU is needed.

Each launcher (kernels/attention.py's fused attention, kernels/attention_two_pass.py's two passes,
kernels/projection.py's TF32 GEMM, kernels/softmax_heads.py's softmax, kernels/small_fusion.py's one-launch
fusion, kernels/small_attention.py's one-launch attention, kernels/magnitude.py's reduction,
kernels/unit_rows.py's rows and kernels/probabilities.py's normalisation) is called on CPU torch tensors
of a shape of every kind its launch configuration distinguishes, with and without mask and lengths, with
``JITFunction.run`` recording each launch instead of running it. Each recorded launch is then compiled
the way Triton's JIT compiles it on a GPU: the JIT's own binder specialises the arguments (an integer
equal to 1 becomes a constant, integers and pointers divisible by 16 carry that alignment), and that
decides which loads are vectorised and which are pipelined into shared memory. Compiling with every
stride unspecialised, as this test did before 2026-11-30, found the fused kernel's W2 tiles at 32 KiB of
shared memory and its loads never pipelined, where the launch compiles to 112 KiB with the key and value
loads pipelined (num_stages), and missed spills of the magnitude's and unit rows' narrow rows.

Every variant must fit the chip's shared memory: on sm_90 H100's 227 KiB; on sm_80 the 99 KiB of sm_86,
sm_89 and sm_120 (A10, L4, L40S, RTX 30x0 to 50x0), whose compiles sm_80's stand for (sm_89's took the
same shared memory in every variant on 2026-11-30, sm_86's and sm_120's the same or less in those
checked), except the configurations for GPUs with A100's 163 KiB or more (the fused kernel's for 16-bit
heads 129 to 256 wide, the two-pass operator's for tf32x3), held to that (their smaller ones for the others
are compiled too). For sm_90, the chip this project runs on, Triton's own ptxas also reports registers and
spills: the launch configurations of every kernel but the attention operators' were chosen to spill
nothing there, and a spill of theirs fails. The
attention operators' configurations (the fused kernel, both passes of the two-pass one) spill in some
variants and were still the fastest measured on an H200, so their spills are only reported.

Run as a script, without TRITON_INTERPRET: ``python compile_triton_variants.py [SHARD SHARDS]`` (every
SHARDS-th variant from the SHARD-th; default all). Prints one line per variant and exits 1 on any failure.
"""

import contextlib
import inspect
import itertools
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, create_function_from_signature

from crossattn_gpu.kernels import attention as fused_module
from crossattn_gpu.kernels import attention_two_pass as two_pass_module
from crossattn_gpu.kernels import magnitude as magnitude_module
from crossattn_gpu.kernels import probabilities as probabilities_module
from crossattn_gpu.kernels import projection as projection_module
from crossattn_gpu.kernels import small_attention as small_attention_module
from crossattn_gpu.kernels import small_fusion as small_fusion_module
from crossattn_gpu.kernels import softmax_heads as softmax_module
from crossattn_gpu.kernels import unit_rows as unit_rows_module

ARCHS = (80, 90)
#: Shared memory a block may take: on sm_80 the 99 KiB of sm_86, sm_89 and sm_120, whose compiles sm_80's
#: stand for; H100/H200 (sm_90) 227 KiB. Launch configurations for GPUs with A100's 163 KiB or more
#: (``attention.HEADS_256_SHARED_MEMORY``, ``attention_two_pass.TF32X3_TWO_STAGES_SHARED_MEMORY``) are held
#: to that on sm_80.
SMALL_SHARED_MEMORY = 99 * 1024
SHARED_LIMIT = {80: SMALL_SHARED_MEMORY, 90: 227 * 1024}
LARGE_SHARED_LIMIT = {**SHARED_LIMIT, 80: fused_module.HEADS_256_SHARED_MEMORY}
#: The kernels whose spills are only reported (see above); any other kernel's spill fails.
MAY_SPILL = {"_attention_fwd", "_attention_fwd_tma", "_attention_fwd_scores", "_attention_fwd_probs_values"}

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Triton's name of each dtype and the float32 dot precision.
DTYPES = [("fp32", "ieee"), ("fp32", "tf32x3"), ("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee")]
#: (Lq, Lk, Dk, Dv) of the fused kernel: every branch of its launch_config (W3 with that config forced,
#: though its launcher would hand W3 to the two-pass operator).
SHAPES = {"tiny": (3, 17, 8, 8), "W2": (256, 256, 128, 128), "D256": (4096, 4096, 256, 256),
          "W3": (256, 256, 1280, 1280), "Dk<Dv": (17, 33, 24, 300)}
#: The shapes of the two-pass operator: W3 and a short one (its smallest blocks).
TWO_PASS_SHAPES = {"W3": SHAPES["W3"], "Dk<Dv": SHAPES["Dk<Dv"]}
#: (M, K, N) of the TF32 projection GEMM: a tiny one (masked edges) and W2's (full tiles).
PROJECTION_SHAPES = {"tiny": (3, 17, 5), "W2": (131072, 128, 1024)}
#: (H, Lk) of the softmax: W3's (full blocks), odd ones (masked heads and keys, ragged), the largest block.
SOFTMAX_SHAPES = {"W3": (8, 256), "odd": (3, 17), "largest": (16, 1024)}
#: Row widths of the magnitude and the unit rows: one column, narrow rows of odd widths (element-wise
#: loads, the most rows a block), and aligned ones up to ESM-2 650M's.
ROW_WIDTHS = (1, 5, 33, 128, 1280)
#: The fused shapes and the dtypes compiled with 64-bit offsets too (WIDE_OFFSETS), sm_90 only.
WIDE_SHAPES = ("W2", "D256", "W3")
WIDE_DTYPES = [("fp32", "ieee"), ("bf16", "ieee")]
BATCH, HEADS = 2, 2


@contextlib.contextmanager
def recorded_launches():
    """Every Triton launch inside the block recorded as (kernel, args, kwargs), and not run."""
    launches, run = [], JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run


@contextlib.contextmanager
def wide_offsets():
    """The launchers inside the block take 64-bit offsets, as for examples past 2**31 elements."""
    modules = (fused_module, two_pass_module, probabilities_module)
    saved = [module.needs_wide_offsets for module in modules]
    for module in modules:
        module.needs_wide_offsets = lambda *tensors: True
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.needs_wide_offsets = original


def compile_as_launched(fn: JITFunction, args: tuple, kwargs: dict, arch: int):
    """``fn`` compiled for sm_``arch`` as ``fn[grid](*args, **kwargs)`` compiles it on such a GPU: the steps of
    ``JITFunction.run`` up to its compile, with the target given instead of read from a device."""
    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    kwargs = {**kwargs, "debug": kwargs.get("debug", fn.debug) or knobs.runtime.debug}
    if hasattr(knobs.compilation, "instrumentation_mode"):  # an option from Triton 3.6 on
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def registers_and_spills(ptx: str, arch: int) -> tuple[int, int]:
    """Registers per thread and bytes of spill stores, from Triton's ptxas (-v) on the kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        ptxas = get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()  # Triton 3.5: no arch
        done = subprocess.run([ptxas.path, "-v", f"-arch=sm_{arch}a", source.name, "-o", "/dev/null"],
                              capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
    return registers, int(re.search(r"(\d+) bytes spill stores", done.stderr).group(1))


def empty(*shape, dtype="fp32"):
    return torch.empty(shape, dtype=TORCH_DTYPES.get(dtype, dtype))


def lengths(size: int) -> torch.Tensor:
    return torch.full((BATCH,), size, dtype=torch.int32)


def mask_and_lengths(len_q: int, len_k: int) -> dict:
    """A mask and both lengths, checked by the caller (the front end's launches)."""
    return {"masked": empty(BATCH, len_q, len_k, dtype=torch.uint8), "k_lengths": lengths(len_k),
            "q_lengths": lengths(len_q), "lengths_checked": True}


def queries_keys_values(shape: tuple, dtype: str) -> tuple:
    """q (B, H, Lq, Dk), keys shared by the heads (B, 1, Lk, Dk) as the fusion's, v (B, H, Lk, Dv)."""
    len_q, len_k, dim_k, dim_v = shape
    return (empty(BATCH, HEADS, len_q, dim_k, dtype=dtype), empty(BATCH, 1, len_k, dim_k, dtype=dtype),
            empty(BATCH, HEADS, len_k, dim_v, dtype=dtype))


def needs_large_shared_memory(module, config: dict, shape: tuple, dtype: str, precision: str) -> bool:
    """Whether ``config``, from the attention ``module``'s launch_config, is its one for GPUs with A100's
    shared memory or more."""
    smaller = module.launch_config(*shape, TORCH_DTYPES[dtype].itemsize, precision, SMALL_SHARED_MEMORY)
    return config != smaller


def attention_plans() -> list:
    """(label, launch) of both attention operators: without extras as ``multi_head_attention`` launches them
    (heads written, lse), with mask and lengths as the fusion does (heads summed, no lse); and the fused
    kernel's configuration for 16-bit heads 129 to 256 wide on GPUs with 99 KiB of shared memory (sm_80's
    compile stands for theirs)."""
    plans = []
    for (name, shape), (dtype, precision), extras in itertools.product(SHAPES.items(), DTYPES, (False, True)):
        config = fused_module.launch_config(*shape, TORCH_DTYPES[dtype].itemsize, precision)
        plans.append((f"{dtype}/{config['INPUT_PRECISION']} {name} mask+lengths={extras}",
                      lambda shape=shape, dtype=dtype, precision=precision, extras=extras, config=config:
                      fused_module.attention(*queries_keys_values(shape, dtype), scale=0.1, precision=precision,
                                             config=config, sum_heads=extras, need_lse=not extras,
                                             **(mask_and_lengths(*shape[:2]) if extras else {})),
                      ARCHS, LARGE_SHARED_LIMIT
                      if needs_large_shared_memory(fused_module, config, shape, dtype, precision) else SHARED_LIMIT))
    for dtype, extras in itertools.product(("fp16", "bf16"), (False, True)):
        shape = SHAPES["D256"]
        config = fused_module.launch_config(*shape, 2, shared_memory=SMALL_SHARED_MEMORY)
        plans.append((f"{dtype}/ieee D256 mask+lengths={extras} for 99 KiB of shared memory",
                      lambda shape=shape, dtype=dtype, extras=extras, config=config:
                      fused_module.attention(*queries_keys_values(shape, dtype), scale=0.1, config=config,
                                             sum_heads=extras, need_lse=not extras,
                                             **(mask_and_lengths(*shape[:2]) if extras else {})),
                      (80,), SHARED_LIMIT))
    for (name, shape), (dtype, precision), extras in itertools.product(TWO_PASS_SHAPES.items(), DTYPES,
                                                                      (False, True)):
        itemsize = TORCH_DTYPES[dtype].itemsize
        config = two_pass_module.launch_config(*shape, itemsize, precision)
        configs = [(config, "", ARCHS, SHARED_LIMIT)]
        if needs_large_shared_memory(two_pass_module, config, shape, dtype, precision):
            small = two_pass_module.launch_config(*shape, itemsize, precision, SMALL_SHARED_MEMORY)
            configs = [(config, "", ARCHS, LARGE_SHARED_LIMIT),
                       (small, " for 99 KiB of shared memory", (80,), SHARED_LIMIT)]
        for config, suffix, archs, limits in configs:
            plans.append((f"{dtype}/{precision} {name} mask+lengths={extras}{suffix}",
                          lambda shape=shape, dtype=dtype, extras=extras, config=config:
                          two_pass_module.attention_two_pass(*queries_keys_values(shape, dtype), scale=0.1,
                                                             config=config, sum_heads=extras, need_lse=not extras,
                                                             **(mask_and_lengths(*shape[:2]) if extras else {})),
                          archs, limits))
    return plans


#: The fused kernel's TMA loads (``_attention_fwd_tma``; sm_90 only) as bench/sweep_triton.py times them:
#: (label, shape, dtype, precision, BLOCK_M, BLOCK_N, num_warps, num_stages, warp-specialised, heads summed).
TMA_LAUNCHES = [
    *[(f"W2 {blocks}", SHAPES["W2"], dtype, "ieee", *tiles, summed)
      for dtype in ("bf16", "fp16")
      for blocks, tiles, summed in (("64x64 heads summed", (64, 64, 4, 3, False), True),
                                    ("64x64 heads written", (64, 64, 4, 3, False), False),
                                    ("64x64 warp-specialised", (64, 64, 4, 3, True), True))],
    ("D256 128x64", SHAPES["D256"], "bf16", "ieee", 128, 64, 8, 2, False, True),
    ("D256 64x64 warp-specialised", SHAPES["D256"], "bf16", "ieee", 64, 64, 4, 2, True, True),
    ("D64", (256, 256, 64, 64), "fp32", "tf32x3", 64, 64, 4, 3, False, True),
]


def tma_plans() -> list:
    """(label, launch) of the fused kernel's TMA loads, as ``TMA_LAUNCHES`` lists them."""
    plans = []
    for label, shape, dtype, precision, block_m, block_n, warps, stages, specialised, summed in TMA_LAUNCHES:
        config = {**fused_module.launch_config(*shape, TORCH_DTYPES[dtype].itemsize, precision), "BLOCK_M": block_m,
                  "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages, "TMA": True,
                  "WARP_SPECIALIZE": specialised}
        plans.append((f"{dtype}/{precision} TMA {label}",
                      lambda shape=shape, dtype=dtype, config=config, summed=summed:
                      fused_module.attention(*queries_keys_values(shape, dtype), scale=0.1, config=config,
                                             sum_heads=summed, need_lse=not summed)))
    return plans


def wide_plans() -> list:
    """(label, launch) of the attention operators with 64-bit offsets, mask and lengths."""
    plans = []
    for name, (dtype, precision) in itertools.product(WIDE_SHAPES, WIDE_DTYPES):
        shape = SHAPES[name]
        config = fused_module.launch_config(*shape, TORCH_DTYPES[dtype].itemsize, precision)
        plans.append((f"{dtype}/{precision} {name} mask+lengths 64-bit offsets",
                      lambda shape=shape, dtype=dtype, config=config:
                      fused_module.attention(*queries_keys_values(shape, dtype), scale=0.1, config=config,
                                             sum_heads=True, need_lse=False, **mask_and_lengths(*shape[:2]))))
    for dtype, precision in WIDE_DTYPES:
        shape = TWO_PASS_SHAPES["W3"]
        plans.append((f"{dtype}/{precision} W3 mask+lengths 64-bit offsets",
                      lambda shape=shape, dtype=dtype:
                      two_pass_module.attention_two_pass(*queries_keys_values(shape, dtype), scale=0.1, sum_heads=True,
                                                         need_lse=False, **mask_and_lengths(*shape[:2]))))
    plans += [(f"{label} 64-bit offsets", launch) for label, launch in tma_plans()[:1]]
    return plans


def small_plans() -> list:
    """(label, launch) of the one-launch fusion and attention, writing the inputs' magnitudes as the front end
    asks: W1's call (float32), and in every dtype and precision the longest sequences they take at
    D = 64 with mask, lengths and probabilities, the fusion with and without the similarities (16-bit
    sequences are longer without)."""
    dim = small_fusion_module.MAX_BLOCK_D
    weights = {dtype: empty(dim, 2 * HEADS * dim, dtype=dtype) for dtype in TORCH_DTYPES}
    plans = [("fp32/ieee W1", lambda: small_fusion_module.small_fusion(
        empty(1, 10, 64), empty(1, 10, 64), empty(64, 4 * 64), heads=2, magnitudes=empty(1, 2)))]
    for (dtype, precision), similarity in itertools.product(DTYPES, (True, False)):
        longest = small_fusion_module.longest(TORCH_DTYPES[dtype].itemsize, precision, similarity)
        plans.append((f"{dtype}/{precision} longest ({longest}, {longest - 1}, {dim}) mask+lengths+probabilities "
                      f"similarities={similarity}",
                      lambda dtype=dtype, precision=precision, similarity=similarity, longest=longest:
                      small_fusion_module.small_fusion(
                          empty(BATCH, longest, dim, dtype=dtype), empty(BATCH, longest - 1, dim, dtype=dtype),
                          weights[dtype], heads=HEADS, masked=empty(BATCH, longest, longest - 1, dtype=torch.uint8),
                          s_lengths=lengths(longest), t_lengths=lengths(longest - 1), need_probs=True,
                          need_similarity=similarity, precision=precision, lengths_checked=True,
                          magnitudes=empty(BATCH, 2))))
    for dtype, precision in DTYPES:
        longest = small_fusion_module.longest(TORCH_DTYPES[dtype].itemsize, precision)
        plans.append((f"{dtype}/{precision} longest ({longest}, {longest - 1}, {dim}) mask+lengths+probabilities",
                      lambda dtype=dtype, precision=precision, longest=longest:
                      small_attention_module.small_attention(
                          empty(BATCH, longest, dim, dtype=dtype), empty(BATCH, longest - 1, dim, dtype=dtype),
                          empty(BATCH, longest - 1, dim, dtype=dtype), weights[dtype], heads=HEADS,
                          masked=empty(BATCH, longest, longest - 1, dtype=torch.uint8), q_lengths=lengths(longest),
                          k_lengths=lengths(longest - 1), need_probs=True, precision=precision, lengths_checked=True,
                          magnitudes=empty(BATCH, 3))))
    return plans


def other_plans() -> list:
    """(label, launch) of the projection GEMM, the heads' softmax, the magnitude, the unit rows and the
    probabilities."""
    plans = [(f"fp32/{precision} {name}", lambda shape=shape, precision=precision:
              projection_module.matmul(empty(*shape[:2]), empty(*shape[1:]), precision=precision))
             for (name, shape), precision in itertools.product(PROJECTION_SHAPES.items(), ("tf32x3", "tf32"))]
    for (name, (heads, len_k)), dtype in itertools.product(SOFTMAX_SHAPES.items(), TORCH_DTYPES):
        odd = name == "odd"
        ragged = {"k_lengths": lengths(len_k), "q_lengths": lengths(5), "lengths_checked": True} if odd else {}
        plans.append((f"{dtype} {name}", lambda heads=heads, len_k=len_k, dtype=dtype, ragged=ragged:
                      softmax_module.softmax_heads(empty(BATCH, 5, heads, len_k), out_dtype=TORCH_DTYPES[dtype],
                                                   **ragged)))
    for cols, dtype in itertools.product(ROW_WIDTHS, TORCH_DTYPES):
        plans.append((f"{dtype} D={cols}, three arrays",
                      lambda cols=cols, dtype=dtype: magnitude_module.largest_magnitudes(
                          empty(BATCH, 7, cols, dtype=dtype), empty(BATCH, 3, cols, dtype=dtype), empty(5, cols))))
        plans.append((f"{dtype} D={cols} lengths", lambda cols=cols, dtype=dtype: unit_rows_module.unit_rows(
            empty(BATCH, 7, cols, dtype=dtype), lengths(7))))
    for dtype in TORCH_DTYPES:
        shape = SHAPES["W2"]
        plans.append((f"{dtype} W2 mask+lengths", lambda shape=shape, dtype=dtype: probabilities_module.probabilities(
            *queries_keys_values(shape, dtype)[:2], scale=0.1, **mask_and_lengths(*shape[:2]))))
    return plans


def variants() -> list:
    """Every variant to compile: (label, kernel, args, kwargs, arch, shared memory it may take). A plan is
    (label, launch), compiled for both archs within ``SHARED_LIMIT``, or (label, launch, archs, limits)."""
    plans = [(plan, False) for plan in attention_plans() + small_plans() + other_plans()]
    plans += [((*plan, (90,), SHARED_LIMIT), False) for plan in tma_plans()]
    plans += [((*plan, (90,), SHARED_LIMIT), True) for plan in wide_plans()]
    found = []
    for plan, wide in plans:
        label, launch, archs, limits = plan if len(plan) == 4 else (*plan, ARCHS, SHARED_LIMIT)
        with recorded_launches() as launches, wide_offsets() if wide else contextlib.nullcontext():
            launch()
        if not launches:
            raise RuntimeError(f"{label}: the launcher launched nothing")
        for (fn, args, kwargs), arch in itertools.product(launches, archs):
            found.append((f"{fn.__name__} {label} sm_{arch}", fn, args, kwargs, arch, limits[arch]))
    return found


def main(shard: int = 0, shards: int = 1) -> int:
    """Compile every ``shards``-th variant from the ``shard``-th (the test runs one process per core)."""
    failures = 0
    for label, fn, args, kwargs, arch, shared_limit in variants()[shard::shards]:
        try:
            compiled = compile_as_launched(fn, args, kwargs, arch)
            shared = compiled.metadata.shared
            if shared > shared_limit:
                raise RuntimeError(f"needs {shared} bytes of shared memory; it may take {shared_limit} on sm_{arch}")
            registers, spills = registers_and_spills(compiled.asm["ptx"], arch) if arch == 90 else (None, 0)
            if spills and fn.__name__ not in MAY_SPILL:
                raise RuntimeError(f"spills {spills} bytes of registers ({registers} registers)")
            print(f"ok   {label} shared={shared} registers={registers} spills={spills}")
        except Exception as exc:  # report every failing variant, then fail
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}".splitlines()[0])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*map(int, sys.argv[1:3])))
