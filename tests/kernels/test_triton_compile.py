"""The Triton kernels through Triton's real compiler for sm_80 and sm_90, in every launch configuration kind."""

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
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    # fused: 5 shapes x 5 dtype/precisions x 2 archs x 2; two-pass: 2 kernels x 2 shapes x 5 x 2 x 2;
    # projection: 2 shapes x 2 precisions x 2 archs; 64-bit offsets: fused 3 shapes x 2 dtypes, two-pass
    # 2 kernels x 2 dtypes, sm_90 only
    assert done.stdout.count("ok ") == 100 + 80 + 8 + 6 + 4
