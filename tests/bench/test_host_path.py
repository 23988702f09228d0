"""bench/host_path.py: a few calls under Triton's interpreter (it refuses to run without it)."""

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

from bench import host_path  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402


@pytest.mark.skipif(not interpreter_mode(), reason="times the host path under Triton's interpreter")
def test_prints_both_medians_and_restores_the_launches(capsys):
    launch = host_path.InterpretedFunction.__getitem__
    assert host_path.main(["--calls", "5", "--repeats", "1"]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert set(printed) == {"numpy_w1_us", "triton_host_path_us"}
    assert all(float(v) > 0 for v in printed.values())
    assert host_path.InterpretedFunction.__getitem__ is launch


@pytest.mark.skipif(interpreter_mode(), reason="the refusal shows only without the interpreter")
def test_refuses_without_the_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        host_path.measure(1)
