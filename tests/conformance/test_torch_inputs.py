"""torch tensors on every backend (SPEC section 2: torch in, torch out on the same device): the results
come back as tensors on the first input's device, in the dtype the call computes, with the values that
NumPy inputs give; bfloat16 CPU tensors work on the host backends (computed in float32); a tensor that
requires grad is refused everywhere, since no backend computes gradients."""

from __future__ import annotations

import numpy as np
import pytest

from crossattn_gpu import CrossAttention
from runnable import BACKENDS, backend_options, model_for

torch = pytest.importorskip("torch")

D, H = 12, 3
rng = np.random.default_rng(11)
S, T = rng.standard_normal((2, 7, D)), rng.standard_normal((2, 5, D))
KWARGS = dict(sequential_lengths=np.array([7, 3]), structural_lengths=np.array([5, 2]), bidirectional=False,
              need_weights=True, mask=np.tri(7, 5))
ONE_PER_BACKEND = [p for p in BACKENDS if p.values[1] == "float32"]
HOST_BACKENDS = [p for p in ONE_PER_BACKEND if p.values[0] in ("numpy", "onnx")]
OUTPUTS = ("fused_sequential", "fused_structural", "seq_similarity", "struct_similarity")


def model(backend):
    return model_for(backend, CrossAttention(D, H, seed=5, backend="numpy"))


def tensor_outputs(out):
    yield from ((key, out[key]) for key in OUTPUTS)
    for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq"):
        yield from ((f"{key}[{h}]", w) for h, w in enumerate(out[key]))


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_cpu_tensors_in_cpu_tensors_out_with_numpys_values(backend, dtype):
    if dtype == "bfloat16":
        pytest.skip("bfloat16 here means GPU tensors; CPU ones: test_bfloat16_cpu_tensors_on_the_host_backends")
    m = model(backend)
    want = m.fuse_representations(S.astype(dtype), T.astype(dtype), **KWARGS)
    s, t = torch.from_numpy(S.astype(dtype)), torch.from_numpy(T.astype(dtype))
    got = m.fuse_representations(s, t, **{**KWARGS, "mask": torch.from_numpy(KWARGS["mask"])})
    for key, value in tensor_outputs(got):
        assert isinstance(value, torch.Tensor) and value.device.type == "cpu", key
        assert value.dtype == getattr(torch, dtype), key
    np.testing.assert_array_equal(got["fused_sequential"].numpy(), want["fused_sequential"])
    np.testing.assert_array_equal(got["attention_weights_struct_to_seq"][2].numpy(), want["attention_weights_struct_to_seq"][2])
    out, weights = m.multi_head_attention(s, t, t, need_weights=True)
    assert isinstance(out, torch.Tensor) and isinstance(weights[0], torch.Tensor)
    out, weights = m.scaled_dot_product_attention(s, t, t, need_weights=True)
    assert isinstance(out, torch.Tensor) and isinstance(weights, torch.Tensor)


@pytest.mark.parametrize("backend,dtype", HOST_BACKENDS)
def test_bfloat16_cpu_tensors_on_the_host_backends(backend, dtype):
    """Computed in float32 (NumPy has no bfloat16), handed back in bfloat16: exactly the float32 call on
    the same values, rounded."""
    m = model(backend)
    s, t = torch.from_numpy(S).bfloat16(), torch.from_numpy(T).bfloat16()
    got = m.fuse_representations(s, t, **KWARGS)
    want = m.fuse_representations(s.float(), t.float(), **KWARGS)
    for key, value in tensor_outputs(got):
        assert value.dtype == torch.bfloat16 and value.device.type == "cpu", key
    for key in OUTPUTS:
        assert torch.equal(got[key], want[key].bfloat16()), key
    # a bfloat16 input with a float32 one computes and returns float32, as for the GPU backends
    assert m.fuse_representations(s, t.float(), **KWARGS)["fused_sequential"].dtype == torch.float32


@pytest.mark.parametrize("backend,dtype", ONE_PER_BACKEND)
def test_bfloat16_results_for_numpy_inputs_are_refused_before_any_work(backend, dtype):
    options = backend_options(backend)
    if "bfloat16" not in CrossAttention(D, H, seed=5, **options)._backend.dtypes:
        pytest.skip(f"{backend} has no bfloat16 here")
    m = CrossAttention(D, H, seed=5, dtype="bfloat16", **options)
    with pytest.raises(TypeError, match="bfloat16 results cannot be returned as NumPy arrays"):
        m.fuse_representations(S, T)


@pytest.mark.parametrize("backend,dtype", ONE_PER_BACKEND)
def test_tensors_that_require_grad_are_refused(backend, dtype):
    m = model(backend)
    s, t = torch.from_numpy(S).float(), torch.from_numpy(T).float()
    needs_grad = s.clone().requires_grad_(True)
    with pytest.raises(TypeError, match=r"sequential_repr is a torch tensor that requires grad.*sequential_repr\.detach\(\)"):
        m.fuse_representations(needs_grad, t, bidirectional=False)
    with pytest.raises(TypeError, match="structural_repr is a torch tensor that requires grad"):
        m.fuse_representations(t, needs_grad, bidirectional=False)
    with pytest.raises(TypeError, match="value_seq is a torch tensor that requires grad"):
        m.multi_head_attention(s, t, t.clone().requires_grad_(True))
    with pytest.raises(TypeError, match="mask is a torch tensor that requires grad"):
        m.fuse_representations(s, t, bidirectional=False, mask=torch.ones(7, 5, requires_grad=True))
    with torch.no_grad():  # the remedy the message gives
        out = m.fuse_representations(needs_grad.detach(), t, bidirectional=False)["fused_sequential"]
    assert not out.requires_grad
