"""bench/host_path.py: a few calls under Triton's interpreter (it refuses to run without it)."""

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

from bench import host_path  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402


@pytest.mark.skipif(not interpreter_mode(), reason="times the host path under Triton's interpreter")
def test_prints_the_medians_and_restores_the_launches(capsys):
    launch, matmul = host_path.InterpretedFunction.__getitem__, host_path.TritonBackend._matmul
    sdpa = host_path.torch.nn.functional.scaled_dot_product_attention
    assert host_path.main(["--calls", "5", "--repeats", "1"]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert set(printed) == {"numpy_w1_us", "triton_host_path_us", "triton_attention_host_path_us",
                            "triton_sdpa_host_path_us", "w2_until_first_launch_us"}
    assert all(float(v) > 0 for v in printed.values())
    assert host_path.InterpretedFunction.__getitem__ is launch and host_path.TritonBackend._matmul is matmul
    assert host_path.torch.nn.functional.scaled_dot_product_attention is sdpa


@pytest.mark.skipif(not interpreter_mode(), reason="times the host path under Triton's interpreter")
def test_the_time_to_the_first_launch_stops_there_and_needs_a_launch():
    ran_after = []

    def call():
        host_path.TritonBackend._matmul(None, None, None)
        ran_after.append(True)

    assert host_path.until_first_launch_us(call, 3) > 0 and not ran_after
    with pytest.raises(RuntimeError, match="launched nothing"):
        host_path.until_first_launch_us(lambda: None, 1)


@pytest.mark.skipif(interpreter_mode(), reason="the refusal shows only without the interpreter")
def test_refuses_without_the_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        host_path.measure(1)


@pytest.mark.skipif(not interpreter_mode(), reason="launches made no-ops under Triton's interpreter")
def test_a_launch_made_a_no_op_zeroes_the_magnitudes_the_front_end_reads():
    import torch

    from crossattn_gpu.kernels import magnitude, small_fusion

    partials, magnitudes = torch.full((3,), float("nan")), torch.full((1, 2), float("nan"))
    x = torch.ones(1, 2, 3)
    host_path.no_launch(magnitude._magnitude_fwd)(x, x, x, partials, *[1] * 26, BLOCK_R=8, BLOCK_C=4)
    assert partials.tolist() == [0.0] * 3
    names = list(host_path.inspect.signature(small_fusion._small_fusion_fwd.fn).parameters)
    args = [None] * names.index("Magnitudes") + [magnitudes]  # the launch reads no argument past it
    host_path.no_launch(small_fusion._small_fusion_fwd)(*args, STORE_MAGNITUDE=False)
    assert magnitudes.isnan().all()  # not asked for: left alone
    host_path.no_launch(small_fusion._small_fusion_fwd)(*args, STORE_MAGNITUDE=True)
    assert magnitudes.tolist() == [[0.0, 0.0]]
