"""Package layout and optional dependencies."""

import importlib
import importlib.metadata
import re
import sys
import types

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


def test_minimum_versions_are_the_extras_floors():
    floors = {}
    for requirement in importlib.metadata.requires("crossattn_gpu"):
        name, floor = re.match(r"([\w.-]+)\s*(?:>=\s*([\d.]+))?", requirement).groups()
        module = name.split("-cuda")[0]  # cupy-cuda12x and cupy-cuda13x install the module cupy
        if floor:
            floors[module] = min(floors.get(module, floor), floor, key=_optional.release)
    assert {module: floors.get(module) for module in _optional.MINIMUM_VERSIONS} == _optional.MINIMUM_VERSIONS


@pytest.mark.parametrize("version,too_old", [
    ("3.4.0", True), ("2.9.1+cu128", True), ("3.5", False), ("3.5.0", False), ("3.10.0", False),
    ("3.6.0.dev20261201", False), ("unknown", False),
])
def test_a_release_older_than_the_floor_names_the_floor(monkeypatch, version, too_old):
    module = types.ModuleType("crossattn_gpu_old_module")
    module.__version__ = version
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(_optional.EXTRA_FOR_MODULE, module.__name__, "triton")
    monkeypatch.setitem(_optional.MINIMUM_VERSIONS, module.__name__, "3.5")
    if too_old:
        message = (f"crossattn_gpu_old_module >= 3.5 is needed for backend 'triton', and this is "
                   f"crossattn_gpu_old_module {version}: pip install --upgrade 'crossattn_gpu[triton]'")
        with pytest.raises(ImportError, match=re.escape(message)):
            _optional.require(module.__name__, "backend 'triton'")
    else:
        assert _optional.require(module.__name__, "backend 'triton'") is module


def test_importing_the_package_needs_only_numpy():
    import subprocess

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
