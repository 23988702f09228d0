"""The Triton kernels through Triton's real compiler for sm_80 and sm_90, as their launchers launch them, in every
launch configuration kind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")


def test_every_variant_compiles_for_ampere_and_hopper():
    script = Path(__file__).with_name("compile_triton_variants.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler, not the interpreter
    # One process per core (up to 8): the compiles are independent. With an empty Triton cache, as on a
    # fresh CI machine, two processes took 279 s on this project's 2-core CPU, 498 s of CPU time (324 variants;
    # 582 s in a make test run while the VM was slow).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    shards = min(cores, 8)
    runs = [subprocess.Popen([sys.executable, str(script), str(shard), str(shards)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env) for shard in range(shards)]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output
    # fused: 5 shapes x 5 dtype/precisions x 2 (mask and lengths or not) x 2 archs, and heads 256 wide for 99 KiB
    # of shared memory (2 16-bit dtypes x 2, sm_80); two-pass: 2 shapes x 5 x 2 x 2 archs x 2 kernels, and tf32x3
    # for 99 KiB of shared memory (2 shapes x 2 x 2 kernels, sm_80);
    # projection: 2 shapes x 2 precisions x 2 archs; softmax: 3 shapes x 3 dtypes x 2 archs; one-launch fusion:
    # (W1 + 5 dtype/precisions x 2 (similarities or not)) x 2 archs; one-launch attention: 5 x 2 archs;
    # magnitude and unit rows: 5 widths x 3 dtypes x 2 archs each; probabilities: 3 dtypes x 2 archs x 2
    # kernels (scores, normalisation); 64-bit offsets: fused 3 shapes x 2 dtypes, two-pass 2 kernels x 2
    # dtypes, sm_90 only; the fused kernel's TMA loads: 9 launches and one with 64-bit offsets, sm_90 only
    assert "".join(outputs).count("ok ") == 100 + 4 + 80 + 8 + 8 + 18 + 22 + 10 + 30 + 30 + 12 + 10 + 10
