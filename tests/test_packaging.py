"""Package layout and optional dependencies."""

import importlib

import pytest

from crossattn_gpu import _optional


def test_top_level_folders_import_as_subpackages():
    kernels = importlib.import_module("crossattn_gpu.kernels")
    export = importlib.import_module("crossattn_gpu.export")
    assert kernels.__file__.replace("\\", "/").endswith("kernels/__init__.py")
    assert export.__file__.replace("\\", "/").endswith("export/__init__.py")


def test_missing_extra_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'crossattn_gpu\[onnx\]'"):
        _optional.EXTRA_FOR_MODULE["crossattn_gpu_no_such_module"] = "onnx"
        try:
            _optional.require("crossattn_gpu_no_such_module", "the ONNX export")
        finally:
            del _optional.EXTRA_FOR_MODULE["crossattn_gpu_no_such_module"]


def test_importing_the_package_needs_only_numpy():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('torch', 'triton', 'cupy', 'onnx', 'onnxruntime'): sys.modules[name] = None\n"
        "import crossattn_gpu\n"
        "m = crossattn_gpu.CrossAttention(4, 1, seed=0)\n"
        "print(m.backend)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "numpy"
