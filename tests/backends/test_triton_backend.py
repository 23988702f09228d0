"""backend='triton' against backend='numpy' (the reference), on the GPU or under Triton's interpreter."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from crossattn_gpu import CrossAttention  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from plans import fuse_more_layouts_than_kept, whole_paths  # noqa: E402

ON_GPU = torch.cuda.is_available() and not interpreter_mode()
if not ON_GPU and not interpreter_mode():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


def models(width, heads, seed=0, **options):
    ref = CrossAttention(width, heads, seed=seed, backend="numpy")
    tri = CrossAttention.from_weights(**ref.get_attention_weights(), backend="triton", **options)
    return ref, tri


def close(got, want, rtol):
    got = got.detach().cpu().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.abs(got - want).max() <= rtol * max(np.abs(want).max(), 1e-30)


def test_backend_name_and_auto_choice():
    _, tri = models(8, 1)
    assert tri.backend == "triton" and tri.generate_report()["backend"] == "triton"
    assert CrossAttention(8, 1).backend != "triton" or ON_GPU  # auto never picks the interpreter


@pytest.mark.skipif(ON_GPU, reason="a GPU computes bfloat16")
def test_a_dtype_the_backend_lacks_is_named_before_any_work():
    """Triton's interpreter does no bfloat16 arithmetic, so the backend there offers no bfloat16."""
    _, tri = models(8, 1)
    x = torch.ones((2, 3, 8), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="backend 'triton' supports dtypes float64, float32, float16; got bfloat16"):
        tri.fuse_representations(x, x)
    with pytest.raises(ValueError, match="backend 'triton' supports dtypes float64, float32, float16; got 'bfloat16'"):
        models(8, 1, dtype="bfloat16")


@pytest.mark.parametrize("length_s,length_t,width,heads", [(10, 10, 64, 2), (1, 1, 1, 1), (3, 17, 8, 3), (113, 5, 24, 1), (17, 17, 100, 2)])
def test_fuse_2d_numpy_in_numpy_out(length_s, length_t, width, heads):
    rng = np.random.default_rng(0)
    ref, tri = models(width, heads)
    seq, struct = rng.standard_normal((length_s, width)), rng.standard_normal((length_t, width))
    want = ref.fuse_representations(seq, struct, bidirectional=length_s == length_t)
    got = tri.fuse_representations(seq, struct, bidirectional=length_s == length_t)
    assert isinstance(got["fused_sequential"], np.ndarray) and got["fused_sequential"].dtype == np.float64
    for key in ("fused_sequential", "fused_structural", "seq_similarity", "struct_similarity"):
        close(got[key], want[key], 1e-5)  # float64 inputs are computed in float32 on this backend
    for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq"):
        for g, w in zip(got[key], want[key]):
            close(g, w, 1e-5)


@pytest.mark.parametrize("width,heads", [(24, 3), (1280, 2)])
def test_ragged_masked_batch_torch_in_torch_out(width, heads):
    rng = np.random.default_rng(1)
    ref, tri = models(width, heads)
    s_len, t_len = np.array([17, 1, 9]), np.array([3, 13, 13])
    seq = rng.standard_normal((3, 17, width)).astype(np.float32)
    struct = rng.standard_normal((3, 13, width)).astype(np.float32)
    mask = rng.random((3, 17, 13)) > 0.3
    mask[:, 0] = False  # fully masked rows
    kwargs = dict(mask=mask, sequential_lengths=s_len, structural_lengths=t_len, bidirectional=False, need_weights=True)
    want = ref.fuse_representations(seq, struct, **kwargs)
    got = tri.fuse_representations(
        torch.tensor(seq, device=DEVICE), torch.tensor(struct, device=DEVICE), **{**kwargs, "mask": torch.tensor(mask, device=DEVICE)}
    )
    assert isinstance(got["fused_sequential"], torch.Tensor) and got["fused_sequential"].device.type == DEVICE
    for key in ("fused_sequential", "fused_structural", "seq_similarity", "struct_similarity"):
        close(got[key], want[key], 1e-5)
    for h in range(heads):
        close(got["attention_weights_seq_to_struct"][h], want["attention_weights_seq_to_struct"][h], 1e-5)
        close(got["attention_weights_struct_to_seq"][h], want["attention_weights_struct_to_seq"][h], 1e-5)


def test_fuse_collection_pads_on_the_device():
    """Antibodies of lengths 1, 3 and 17 as tensors on the device: padded there, results there, each
    the reference's result for its own two arrays."""
    rng = np.random.default_rng(2)
    ref, tri = models(24, 3)
    seq = [rng.standard_normal((n, 24)).astype(np.float32) for n in (17, 1, 3, 17)]
    struct = [rng.standard_normal((n, 24)).astype(np.float32) for n in (5, 3, 1, 17)]
    on_device = [[torch.tensor(x, device=DEVICE) for x in side] for side in (seq, struct)]
    got = tri.fuse_collection(*on_device, batch_size=3, bidirectional=False, need_weights=True, need_similarity=True)
    for result, xs, xt in zip(got, seq, struct):
        want = ref.fuse_representations(xs, xt, bidirectional=False)
        assert result["fused_sequential"].device.type == DEVICE and result["fused_sequential"].dtype == torch.float32
        for key in ("fused_sequential", "fused_structural", "seq_similarity", "struct_similarity"):
            close(result[key], want[key], 1e-5)
        for h in range(3):
            close(result["attention_weights_struct_to_seq"][h], want["attention_weights_struct_to_seq"][h], 1e-5)


@pytest.mark.parametrize("width,heads", [(24, 3), (300, 2)])
def test_tf32x3_fusion_keeps_float32_accuracy(width, heads):
    """Projections and attention on TF32 tensor cores, three products each (emulated under the
    interpreter: tests/tensor_cores.py), within the float32 bound of 1e-5 on every output."""
    rng = np.random.default_rng(2)
    ref, tri = models(width, heads, float32_precision="tf32x3")
    seq = rng.standard_normal((3, 17, width)).astype(np.float32)
    struct = rng.standard_normal((3, 13, width)).astype(np.float32)
    mask = rng.random((3, 17, 13)) > 0.3
    kwargs = dict(mask=mask, sequential_lengths=[17, 1, 9], structural_lengths=[3, 13, 13], bidirectional=False,
                  need_weights=True)
    want = ref.fuse_representations(seq, struct, **kwargs)
    got = tri.fuse_representations(seq, struct, **kwargs)
    for key in ("fused_sequential", "fused_structural", "seq_similarity", "struct_similarity"):
        close(got[key], want[key], 1e-5)
    for h in range(heads):
        close(got["attention_weights_seq_to_struct"][h], want["attention_weights_seq_to_struct"][h], 1e-5)


def test_float32_precision_reaches_projections_and_kernel():
    """tf32 (one product) misses float32's accuracy in the projections' GEMM and in the attention
    kernel alike; IEEE and tf32x3 do not. 16-bit inputs ignore the option."""
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.standard_normal((2, 40, 64)), dtype=torch.float32, device=DEVICE)
    weights = torch.tensor(rng.standard_normal((64, 96)), dtype=torch.float32, device=DEVICE)
    want = x.double().reshape(80, 64) @ weights.double()
    errors = {}
    for precision in ("ieee", "tf32x3", "tf32"):
        backend = models(64, 2, float32_precision=precision)[1]._backend
        got = backend._matmul(x.reshape(80, 64), weights).double()
        errors[precision] = float((got - want).abs().max() / want.abs().max())
        assert backend._kernel_options() == {"precision": precision}
    assert errors["ieee"] < 1e-6 and errors["tf32x3"] < 1e-6 < 1e-4 < errors["tf32"]
    half = models(64, 2, float32_precision="tf32")[1]._backend._matmul(x.half().reshape(80, 64), weights.half())
    assert half.dtype == torch.float16


def test_probabilities_come_from_their_own_kernel_and_the_attention_computes_no_lse(monkeypatch):
    """The probabilities, when asked, come from kernels/probabilities.py (its own row maximum and sum),
    one call a direction, so the attention kernel never computes an lse (W4: its 0.25 MiB were the
    fusion's whole excess over torch SDPA's peak memory); a fused kernel's direction is one call."""
    ref, tri = models(8, 2)
    backend = tri._backend
    monkeypatch.setattr(backend, "one_launch_flops", 0)  # these examples would take it
    asked, rebuilt = [], []
    kernel, probabilities = backend.kernel.attention, backend.probabilities.probabilities
    monkeypatch.setattr(backend.kernel, "attention", lambda *a, **kw: asked.append(kw["need_lse"]) or kernel(*a, **kw))
    monkeypatch.setattr(backend.probabilities, "probabilities",
                        lambda *a, **kw: rebuilt.append(kw["q_lengths"] is not None) or probabilities(*a, **kw))
    rng = np.random.default_rng(4)
    # float16: unmasked float32 fusions without probabilities do not reach the kernels (they take SDPA).
    seq, struct = rng.standard_normal((2, 5, 8)).astype(np.float16), rng.standard_normal((2, 6, 8)).astype(np.float16)
    lengths = dict(sequential_lengths=np.array([5, 2]), structural_lengths=np.array([1, 6]))
    for need_weights in (False, True):
        got = tri.fuse_representations(seq, struct, bidirectional=False, need_weights=need_weights, **lengths)
        want = ref.fuse_representations(seq, struct, bidirectional=False, need_weights=need_weights, **lengths)
        close(got["fused_sequential"], want["fused_sequential"], 2e-3)
    assert asked == [False] * 4 and rebuilt == [True, True]
    for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq"):
        for head in range(2):
            close(got[key][head], want[key][head], 2e-3)


def test_batches_past_the_memory_bound_run_in_blocks(monkeypatch):
    """A batch whose projections pass DEVICE_BLOCK_ELEMENTS runs in blocks of examples (here 2, 2 and
    1), with per-example masks and lengths (host or device) sliced, a shared mask kept, and every
    output joined."""
    from crossattn_gpu.backends import device_common

    rng = np.random.default_rng(7)
    ref, tri = models(8, 2)
    seq = torch.tensor(rng.standard_normal((5, 6, 8)), dtype=torch.float32, device=DEVICE)
    struct = torch.tensor(rng.standard_normal((5, 4, 8)), dtype=torch.float32, device=DEVICE)
    lengths = dict(sequential_lengths=np.array([6, 1, 3, 5, 2]), structural_lengths=np.array([4, 2, 1, 4, 3]))
    monkeypatch.setattr(device_common, "DEVICE_BLOCK_ELEMENTS", 2 * 6 * 2 * 2 * 8)
    blocks = tri._backend._example_blocks(5, 6, device_common.DeviceFoldedWeights(heads=2, width=8, query_value=None, magnitudes=None))
    assert [b.stop - b.start for b in blocks] == [2, 2, 1]
    on_device = {name: torch.tensor(n, device=DEVICE) for name, n in lengths.items()}  # checked late, sliced too
    for mask, given in ((rng.random((5, 6, 4)) > 0.3, lengths), (rng.random((6, 4)) > 0.3, on_device)):
        kwargs = dict(mask=mask, bidirectional=False, need_weights=True, **lengths)
        want = ref.fuse_representations(seq.cpu().numpy(), struct.cpu().numpy(), **kwargs)
        got = tri.fuse_representations(seq, struct, **{**kwargs, **given, "mask": torch.tensor(mask, device=DEVICE)})
        for key in ("fused_sequential", "fused_structural", "seq_similarity", "struct_similarity"):
            close(got[key], want[key], 1e-5)
        for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq"):
            close(torch.stack(got[key]), np.stack(want[key]), 1e-5)
    out, probs = tri.multi_head_attention(seq, struct, struct, need_weights=True, key_lengths=lengths["structural_lengths"])
    want_out, want_probs = ref.multi_head_attention(seq.cpu().numpy(), struct.cpu().numpy(), struct.cpu().numpy(),
                                                    need_weights=True, key_lengths=lengths["structural_lengths"])
    close(out, want_out, 1e-5)
    close(torch.stack(probs), np.stack(want_probs), 1e-5)


@pytest.mark.parametrize("length_q,length_k,width,heads", [(3, 130, 8, 1), (130, 17, 64, 2)])
def test_sdpa_and_mha(length_q, length_k, width, heads):
    rng = np.random.default_rng(2)
    ref, tri = models(width, heads)
    q, k = rng.standard_normal((2, length_q, width)), rng.standard_normal((2, length_k, width))
    v = rng.standard_normal((2, length_k, width))
    lengths = np.array([length_k, max(1, length_k // 3)])
    for method in ("scaled_dot_product_attention", "multi_head_attention"):
        want_out, want_w = getattr(ref, method)(q, k, v, key_lengths=lengths, need_weights=True)
        got_out, got_w = getattr(tri, method)(q, k, v, key_lengths=lengths, need_weights=True)
        close(got_out, want_out, 1e-5)
        for g, w in zip(got_w if isinstance(got_w, list) else [got_w], want_w if isinstance(want_w, list) else [want_w]):
            close(g, w, 1e-5)


def counted_routes(monkeypatch, backend) -> list:
    """The list to which every attention call appends its route: "gemm" (``softmax_heads``, between the
    GEMMs), "kernel", "sdpa", or "one launch" (a ``small_fusion.SmallFusion`` launch: both directions in one;
    a ``small_attention.SmallAttention`` launch: a multi-head attention, projections included). The kernel
    modules are shared by every backend, so all are counted."""
    calls = []
    for module, name, label in [(backend.softmax_heads, "softmax_heads", "gemm"), (backend.kernel, "attention", "kernel"),
                                (torch.nn.functional, "scaled_dot_product_attention", "sdpa"),
                                (backend.small_fusion.SmallFusion, "_launch", "one launch"),
                                (backend.small_attention.SmallAttention, "_launch", "one launch")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _l=label, **k: calls.append(_l) or _f(*a, **k))
    return calls


def check_fusion_routes(ref, tri, calls, seq, struct, cases) -> None:
    """For each (kwargs, dtype, routes): the one-way fusions' routes, sequential to structural then back,
    and their results against NumPy's."""
    for kwargs, dtype, routes in cases:
        calls.clear()
        got = tri.fuse_representations(torch.tensor(seq, dtype=dtype, device=DEVICE),
                                       torch.tensor(struct, dtype=dtype, device=DEVICE), bidirectional=False, **kwargs)
        assert calls == routes, (kwargs, dtype)
        want = ref.fuse_representations(seq, struct, bidirectional=False, **kwargs)
        for key in ("fused_sequential", "fused_structural"):
            close(got[key], want[key], 1e-5 if dtype == torch.float32 else 2e-3)


def test_unmasked_float32_heads_sums_take_sdpa_and_the_rest_the_kernels(monkeypatch):
    """float32 fusions without mask or probabilities attend through torch's SDPA (faster on an H200, see
    ``TritonBackend._attention``), key lengths as its additive mask, where SDPA runs its memory-efficient
    kernel or the keys are at most twice as many as the heads are wide; every other call through this
    library's kernels."""
    ref, tri = models(24, 3)
    backend = tri._backend
    efficient = [False]  # whether SDPA could run its memory-efficient kernel: never on the CPU
    monkeypatch.setattr(backend, "_efficient_sdpa", lambda *args: efficient[0])
    calls = counted_routes(monkeypatch, backend)
    rng = np.random.default_rng(6)
    seq, struct = rng.standard_normal((3, 17, 24)), rng.standard_normal((3, 9, 24))
    mask = rng.random((3, 17, 9)) > 0.3
    check_fusion_routes(ref, tri, calls, seq, struct, [
        ({}, torch.float32, ["sdpa", "sdpa"]),
        ({"mask": mask}, torch.float32, ["kernel", "kernel"]),
        ({"structural_lengths": np.array([9, 1, 4])}, torch.float32, ["sdpa", "sdpa"]),
        ({"sequential_lengths": np.array([17, 3, 1]), "structural_lengths": np.array([2, 9, 4])}, torch.float32,
         ["sdpa", "sdpa"]),
        ({"need_weights": True}, torch.float32, ["kernel", "kernel"]),
        ({}, torch.float16, ["one launch"]),  # 16-bit examples this short: see the next test
    ])
    narrow_ref, narrow = models(8, 2)  # heads 8 wide; the same kernel module, still counted
    monkeypatch.setattr(narrow._backend, "_efficient_sdpa", lambda *args: efficient[0])
    seq, struct = rng.standard_normal((2, 17, 8)), rng.standard_normal((2, 16, 8))
    # Towards the structure's 16 keys (twice the width): SDPA whatever its kernel; back towards the
    # sequence's 17: SDPA only in its memory-efficient kernel, else the kernels, whose memory does not
    # grow with the keys.
    for efficient[0], routes in ((False, ["sdpa", "kernel"]), (True, ["sdpa", "sdpa"])):
        check_fusion_routes(narrow_ref, narrow, calls, seq, struct, [
            ({}, torch.float32, routes),
            ({"sequential_lengths": np.array([17, 5])}, torch.float32, routes),
        ])


def test_float32_attention_without_mask_or_probabilities_takes_sdpa(monkeypatch):
    """``scaled_dot_product_attention`` routes as the fusions' heads do: float32 without mask or
    probabilities through torch's SDPA (ragged too) where it runs its memory-efficient kernel or the keys
    are at most twice as many as the values are wide; the rest through the kernel."""
    ref, tri = models(16, 2)
    monkeypatch.setattr(tri._backend, "_efficient_sdpa", lambda *args: False)  # as on the CPU
    calls = counted_routes(monkeypatch, tri._backend)
    rng = np.random.default_rng(13)
    q, k, v = rng.standard_normal((2, 9, 16)), rng.standard_normal((2, 40, 16)), rng.standard_normal((2, 40, 12))
    mask = rng.random((2, 9, 20)) > 0.3
    for keys, kwargs, dtype, route in [
        (20, {}, torch.float32, "sdpa"),  # 20 keys, values 12 wide
        (20, {"key_lengths": np.array([20, 3]), "query_lengths": np.array([9, 2])}, torch.float32, "sdpa"),
        (40, {}, torch.float32, "kernel"),
        (20, {"mask": mask}, torch.float32, "kernel"),
        (20, {"need_weights": True}, torch.float32, "kernel"),
        (20, {}, torch.float16, "kernel"),
    ]:
        calls.clear()
        args = (q, k[:, :keys], v[:, :keys])
        got, _ = tri.scaled_dot_product_attention(*(torch.tensor(a, dtype=dtype, device=DEVICE) for a in args),
                                                  **kwargs)
        assert calls == [route], (keys, kwargs, dtype)
        want, _ = ref.scaled_dot_product_attention(*args, **kwargs)
        close(got, want, 1e-5 if dtype == torch.float32 else 2e-3)


def test_long_16bit_heads_129_to_256_wide_take_flash_sdpa(monkeypatch):
    """16-bit heads wider than 128 and at most 256 wide over long sequences, without mask, probabilities
    or key lengths, attend through torch's SDPA where it can run flash attention (see
    ``TritonBackend.sdpa_16bit_min_length``); the rest through the kernels. Query lengths do not keep a
    direction from SDPA: its padded rows, whose float16 projections overflow here, come out zero."""
    ref, tri = models(130, 2)
    backend = tri._backend
    monkeypatch.setattr(backend, "sdpa_16bit_min_length", 17)  # "long", at an interpreter's size
    flash = [True]  # whether SDPA could run flash attention: never on the CPU
    monkeypatch.setattr(backend, "_flash_sdpa", lambda *args: flash[0])
    calls = counted_routes(monkeypatch, backend)
    rng = np.random.default_rng(14)
    seq, struct = rng.standard_normal((2, 17, 130)), rng.standard_normal((2, 19, 130))
    mask = rng.random((2, 17, 19)) > 0.3
    loud_padding = seq.copy()
    loud_padding[1, 3:] = 6e4 * np.sign(rng.standard_normal(loud_padding[1, 3:].shape))  # finite in float16
    check_fusion_routes(ref, tri, calls, seq, struct, [
        ({}, torch.float16, ["sdpa", "sdpa"]),
        ({"structural_lengths": np.array([19, 4])}, torch.float16, ["kernel", "sdpa"]),  # keys padded towards it
        ({"mask": mask}, torch.float16, ["kernel", "kernel"]),
        ({"need_weights": True}, torch.float16, ["kernel", "kernel"]),
    ])
    check_fusion_routes(ref, tri, calls, loud_padding, struct, [
        ({"sequential_lengths": np.array([17, 3])}, torch.float16, ["sdpa", "kernel"]),
    ])
    flash[0] = False
    check_fusion_routes(ref, tri, calls, seq, struct, [({}, torch.float16, ["kernel", "kernel"])])
    flash[0] = True
    monkeypatch.setattr(backend, "sdpa_16bit_min_length", 18)  # the sequence's 17 queries, then keys: short
    check_fusion_routes(ref, tri, calls, seq, struct, [({}, torch.float16, ["kernel", "kernel"])])
    narrow_ref, narrow = models(128, 1)  # W2's width, where the kernel won; the same kernel module
    monkeypatch.setattr(narrow._backend, "sdpa_16bit_min_length", 17)
    monkeypatch.setattr(narrow._backend, "_flash_sdpa", lambda *args: True)
    check_fusion_routes(narrow_ref, narrow, calls, seq[..., :128], struct[..., :128],
                        [({}, torch.float16, ["kernel", "kernel"])])
    # The model's scaled_dot_product_attention likewise: one head 130 wide, 17 queries, 19 keys.
    monkeypatch.setattr(backend, "sdpa_16bit_min_length", 17)
    q, k, v = seq[:1], struct[:1], rng.standard_normal((1, 19, 130))
    half = [torch.tensor(x, dtype=torch.float16, device=DEVICE) for x in (q, k, v)]
    for kwargs, route in (({}, "sdpa"), ({"query_lengths": np.array([5])}, "sdpa"),
                          ({"key_lengths": np.array([4])}, "kernel")):
        calls.clear()
        got, _ = tri.scaled_dot_product_attention(*half, **kwargs)
        assert calls == [route], kwargs
        close(got, ref.scaled_dot_product_attention(q, k, v, **kwargs)[0], 2e-3)


def test_sdpa_kernel_questions_take_the_backends_arguments():
    """The route tests stand in for ``_flash_sdpa`` and ``_efficient_sdpa``, which ask torch only on a GPU.
    The question itself is asked here, on the CPU, in this torch, of the arguments the backend gives SDPA
    (keys and values shared by the heads, expanded; key lengths as an additive bias broadcast over heads
    and queries): torch must build its ``SDPAParams`` from them and answer, with a no on the CPU."""
    _, tri = models(130, 2)
    backend = tri._backend
    q = torch.randn(2, 2, 17, 130, dtype=torch.float16)
    keys = torch.randn(2, 1, 19, 130, dtype=torch.float16).expand(-1, 2, -1, -1)
    bias = torch.zeros(2, 19, dtype=torch.float16)[:, None, None, :]
    for args in ((q, keys, keys, None), (q.float(), keys.float(), keys.float(), bias.float())):
        params = backend._sdpa_params(*args)
        assert torch.backends.cuda.can_use_flash_attention(params, False) is False
        assert torch.backends.cuda.can_use_efficient_attention(params, False) is False
    assert not backend._flash_sdpa(q, keys, keys) and not backend._efficient_sdpa(q, keys, keys, None)


def test_fusions_through_sdpa_project_each_direction_before_its_attention(monkeypatch):
    """SDPA holds a direction's heads' outputs before their sum: where a fusion's attention takes it and
    the projections are large, each direction's queries and values are projected just before its
    attention, so that one direction's projections are in memory at a time (W4's peak memory target);
    small ones project both inputs at once, one GEMM each. Wide heads, whose queries and values take
    GEMMs of their own anyway, project by direction whatever the route."""
    def record_projections(backend):  # into ``calls``: "qv of 17", the parts and the input's length
        project = backend._project
        monkeypatch.setattr(backend, "_project", lambda x, weights, parts: calls.append(
            f"{parts} of {x.shape[1]}") or project(x, weights, parts))

    ref, tri = models(24, 3)
    backend = tri._backend
    calls = counted_routes(monkeypatch, backend)
    record_projections(backend)
    monkeypatch.setattr(backend, "one_launch_flops", 0)  # these examples would take it
    rng = np.random.default_rng(15)
    seq, struct = rng.standard_normal((2, 17, 24)), rng.standard_normal((2, 9, 24))
    mask = rng.random((2, 17, 9)) > 0.3
    both = ["qv of 17", "qv of 9"]
    by_direction = ["q of 17", "v of 9", "sdpa", "q of 9", "v of 17", "sdpa"]
    check_fusion_routes(ref, tri, calls, seq, struct, [({}, torch.float32, both + ["sdpa", "sdpa"])])
    monkeypatch.setattr(backend, "split_projections_bytes", 2 * 72 * (34 + 18) * 4)  # these, to the byte
    check_fusion_routes(ref, tri, calls, seq, struct, [
        ({}, torch.float32, by_direction),
        ({"structural_lengths": np.array([9, 2])}, torch.float32, by_direction),
        ({"mask": mask}, torch.float32, both + ["kernel", "kernel"]),
        ({"need_weights": True}, torch.float32, both + ["kernel", "kernel"]),
        ({}, torch.float16, both + ["kernel", "kernel"]),  # 16 bits this short: the kernels
    ])
    monkeypatch.setattr(backend, "split_projections_bytes", 2 * 72 * (34 + 18) * 4 + 1)
    check_fusion_routes(ref, tri, calls, seq, struct, [({}, torch.float32, both + ["sdpa", "sdpa"])])
    wide_ref, wide = models(300, 1)
    record_projections(wide._backend)
    wide_seq, wide_struct = rng.standard_normal((1, 5, 300)), rng.standard_normal((1, 4, 300))
    check_fusion_routes(wide_ref, wide, calls, wide_seq, wide_struct, [
        ({}, torch.float16, ["q of 5", "v of 4", "gemm", "q of 4", "v of 5", "gemm"]),
        ({"mask": mask[:1, :5, :4]}, torch.float16, ["q of 5", "v of 4", "kernel", "q of 4", "v of 5", "kernel"]),
    ])


@gpu_only
def test_long_bfloat16_fusions_take_flash_sdpa_within_torchs_memory(monkeypatch):
    """W4 at half its batch (B = 2, L = 4096, D = 256, H = 4, bfloat16: 64 MiB of projections, the bound
    for projecting by direction): both directions through SDPA (flash attention), each projected just
    before its attention, so that the call's peak memory stays within that of the same fusion in torch
    (batched projections and SDPA, the benchmark's peer), and its error within twice torch's."""
    ref, tri = models(256, 4)
    calls = counted_routes(monkeypatch, tri._backend)
    rng = np.random.default_rng(16)
    seq, struct = rng.standard_normal((2, 4096, 256)), rng.standard_normal((2, 4096, 256))
    inputs = [torch.tensor(x, dtype=torch.bfloat16, device=DEVICE) for x in (seq, struct)]
    weights = {n: torch.tensor(w, dtype=torch.bfloat16, device=DEVICE) for n, w in ref.get_attention_weights().items()}
    heads, width = 4, 256
    cat = {n: weights[n].permute(1, 0, 2).reshape(width, heads * width) for n in ("query_weights", "key_weights",
                                                                                 "value_weights")}

    def torch_sdpa(xq, xkv):
        q, k, v = (x.view(2, -1, heads, width).transpose(1, 2) for x in (
            xq @ cat["query_weights"], xkv @ cat["key_weights"], xkv @ cat["value_weights"]))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=width**-0.5)
        return o.transpose(1, 2).reshape(2, -1, heads * width) @ weights["output_weights"]

    def peak(run):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = run()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before

    got, ours = peak(lambda: tri.fuse_representations(*inputs, bidirectional=False, need_similarity=False))
    assert calls == ["sdpa", "sdpa"]
    with torch.inference_mode():
        plain, theirs = peak(lambda: (torch_sdpa(*inputs), torch_sdpa(*inputs[::-1])))
    assert ours <= theirs, (ours / 2**20, theirs / 2**20)
    want = ref.fuse_representations(seq, struct, bidirectional=False, need_similarity=False)
    for key, yardstick in zip(("fused_sequential", "fused_structural"), plain):
        err = np.abs(got[key].double().cpu().numpy() - want[key]).max()
        assert np.isfinite(err) and err <= 2 * np.abs(yardstick.double().cpu().numpy() - want[key]).max()


@pytest.mark.parametrize("method", ["fuse_representations", "multi_head_attention", "multi_head_attention_kv",
                                    "scaled_dot_product_attention"])
def test_sdpa_route_ignores_the_padding(monkeypatch, method):
    """SDPA multiplies the padding: a padded value row whose float32 projection overflows (inputs near
    float32's largest value are finite, so they pass the input check) would put Inf times a probability
    of 0, NaN, into every output row, and so would a padded key whose score overflows to Inf (Inf plus
    SDPA's -inf mask; `scaled_dot_product_attention` takes the keys as they are). The inputs' padded rows
    are zeroed before it, so padding of any finite size changes nothing, and the rows past the query
    lengths come out zero."""
    weights = CrossAttention(16, 2, seed=0, backend="numpy").get_attention_weights()
    weights["output_weights"] = weights["output_weights"] * 8  # the values' gain 0.72 -> 5.8
    weights["query_weights"] = weights["query_weights"] * 4  # queries that take a padded key's score to Inf
    ref, tri = (CrossAttention.from_weights(**weights, backend=name) for name in ("numpy", "triton"))
    backend = tri._backend
    monkeypatch.setattr(backend, "_efficient_sdpa", lambda *args: True)  # the long keys too, as on a GPU
    calls = counted_routes(monkeypatch, backend)
    rng = np.random.default_rng(11)
    xs, xt = rng.standard_normal((3, 40, 16)), rng.standard_normal((3, 37, 16))
    s_len, t_len = np.array([40, 6, 1]), np.array([3, 37, 20])
    for x, lengths in ((xs, s_len), (xt, t_len)):
        for b, length in enumerate(lengths):
            x[b, length:] = 3e38  # finite, but its values' projections pass float32's largest value
    if method == "fuse_representations":
        kwargs = dict(sequential_lengths=s_len, structural_lengths=t_len, bidirectional=False, need_similarity=False)
        got = tri.fuse_representations(torch.tensor(xs, dtype=torch.float32, device=DEVICE),
                                       torch.tensor(xt, dtype=torch.float32, device=DEVICE), **kwargs)
        want = ref.fuse_representations(xs, xt, **kwargs)
        pairs, padded = [(got[k], want[k]) for k in ("fused_sequential", "fused_structural")], got["fused_sequential"]
    else:
        values = xt if method == "multi_head_attention" else rng.standard_normal(xt.shape)
        if method != "multi_head_attention":
            for b, length in enumerate(t_len):
                values[b, length:] = 3e38
        args = [torch.tensor(a, dtype=torch.float32, device=DEVICE) for a in (xs, xt, values)]
        if method == "multi_head_attention":
            args[2] = args[1]  # the keys as values: one array
        kwargs = dict(query_lengths=s_len, key_lengths=t_len)
        name = "scaled_dot_product_attention" if method == "scaled_dot_product_attention" else "multi_head_attention"
        got, _ = getattr(tri, name)(*args, **kwargs)
        want, _ = getattr(ref, name)(xs, xt, values, **kwargs)
        pairs, padded = [(got, want)], got
    assert calls == ["sdpa"] * len(pairs)
    for g, w in pairs:
        close(g, w, 1e-5)
    assert not padded[1, 6:].any() and not padded[2, 1:].any()


@gpu_only
def test_long_float32_keys_take_sdpa_in_its_memory_efficient_kernel(monkeypatch):
    """On a GPU torch runs the shared keys expanded over the heads, with or without the key lengths' mask,
    in its memory-efficient kernel: long float32 sequences attend through SDPA, and their scores are never
    held in memory (here 4 heads x 4096 x 4096 in float32, 256 MiB a direction)."""
    ref, tri = models(64, 4)
    calls = counted_routes(monkeypatch, tri._backend)
    rng = np.random.default_rng(12)
    seq, struct = rng.standard_normal((1, 4096, 64)), rng.standard_normal((1, 4096, 64))
    inputs = [torch.tensor(x, dtype=torch.float32, device=DEVICE) for x in (seq, struct)]
    for lengths in ({}, dict(sequential_lengths=np.array([4000]), structural_lengths=np.array([1001]))):
        calls.clear()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        got = tri.fuse_representations(*inputs, bidirectional=False, need_similarity=False, **lengths)
        torch.cuda.synchronize()
        assert calls == ["sdpa", "sdpa"]
        assert torch.cuda.max_memory_allocated() - before < 64 * 2**20
        want = ref.fuse_representations(seq, struct, bidirectional=False, need_similarity=False, **lengths)
        for key in ("fused_sequential", "fused_structural"):
            close(got[key], want[key], 1e-5)


def test_small_fusions_take_one_launch(monkeypatch):
    """Fusions of examples within ``small_fusion.fits`` (float32 up to 16 long, TF32 32, 16-bit 64, or 32
    with the similarities; heads up to 64 wide), up to ``one_launch_flops``, run in one launch,
    projections included, with masks, lengths (host or device), probabilities, similarities and the
    bidirectional sum; longer examples or more FLOPs take the other routes. W1 (the seed's demo) calls
    no GEMM."""
    from torch.profiler import ProfilerActivity, profile

    ref, tri = models(64, 2)
    calls = counted_routes(monkeypatch, tri._backend)
    rng = np.random.default_rng(12)
    seq, struct = rng.standard_normal((1, 10, 64)), rng.standard_normal((1, 10, 64))
    check_fusion_routes(ref, tri, calls, seq, struct, [
        ({}, torch.float32, ["one launch"]),
        ({"need_weights": True}, torch.float32, ["one launch"]),
    ])
    w1 = [torch.tensor(x, dtype=torch.float32, device=DEVICE) for x in (seq, struct)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tri.fuse_representations(*w1, bidirectional=False, need_similarity=False)
    assert not {e.key for e in prof.key_averages()} & {"aten::mm", "aten::matmul", "aten::bmm"}

    ref, tri = models(24, 3)
    calls = counted_routes(monkeypatch, tri._backend)
    seq, struct = rng.standard_normal((3, 40, 24)), rng.standard_normal((3, 7, 24))
    mask = rng.random((3, 40, 7)) > 0.3
    s_len, t_len = np.array([40, 3, 1]), np.array([7, 1, 5])
    check_fusion_routes(ref, tri, calls, seq, struct, [
        ({"mask": mask, "sequential_lengths": s_len, "structural_lengths": t_len, "need_similarity": False},
         torch.float16, ["one launch"]),
        ({"mask": mask[:1, :1], "need_similarity": False}, torch.float16, ["one launch"]),  # broadcast mask
        ({"mask": mask}, torch.float16, ["kernel", "kernel"]),  # with the similarities: past 16-bit's 32
        ({}, torch.float32, ["sdpa", "sdpa"]),  # 40 queries: past float32's 16
    ])
    s_len = np.minimum(s_len, 7)  # float32 below: 7 x 7 examples, each length 1 in one direction
    short = [torch.tensor(x, dtype=torch.float32, device=DEVICE) for x in (seq[:, :7], struct)]
    want = ref.fuse_representations(seq[:, :7], struct, sequential_lengths=s_len, structural_lengths=t_len,
                                     need_similarity=True, bidirectional=False)
    for lengths in ((s_len, t_len), tuple(torch.tensor(n, device=DEVICE) for n in (s_len, t_len))):  # host, device
        calls.clear()
        got = tri.fuse_representations(*short, sequential_lengths=lengths[0], structural_lengths=lengths[1],
                                       need_similarity=True, bidirectional=False)
        assert calls == ["one launch"]
        for key in ("fused_sequential", "fused_structural", "seq_similarity", "struct_similarity"):
            close(got[key], want[key], 1e-5)
    # The probabilities from the same launch, with a mask and both lengths: zero past either length.
    kwargs = dict(mask=mask[:, :7], sequential_lengths=s_len, structural_lengths=t_len, need_weights=True,
                  bidirectional=False)
    calls.clear()
    got = tri.fuse_representations(*short, **kwargs)
    assert calls == ["one launch"]
    want = ref.fuse_representations(seq[:, :7], struct, **kwargs)
    for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq", "fused_sequential"):
        close(got[key], want[key], 1e-5)

    _, tf32x3 = models(24, 3, float32_precision="tf32x3")
    calls = counted_routes(monkeypatch, tf32x3._backend)
    pair = [torch.tensor(x[:, :32], dtype=torch.float32, device=DEVICE) for x in (seq, seq)]
    got = tf32x3.fuse_representations(*pair)
    assert calls == ["one launch"]
    close(got["bidirectional_fusion"], ref.fuse_representations(seq[:, :32], seq[:, :32])["bidirectional_fusion"], 1e-5)

    fusion_flops = tf32x3._backend.small_fusion.flops(3, 32, 32, 24, 3)
    for bound, routes in ((fusion_flops, ["one launch"]), (fusion_flops - 1, ["sdpa", "sdpa"]), (0, ["sdpa", "sdpa"])):
        monkeypatch.setattr(tf32x3._backend, "one_launch_flops", bound)
        calls.clear()
        tf32x3.fuse_representations(*pair, bidirectional=False, need_similarity=False)
        assert calls == routes, bound


def test_repeated_fusions_keep_what_their_first_call_settled(monkeypatch):
    """A fusion without mask or lengths keeps what its call settled from the inputs' layout and flags
    (``CrossAttention._plan``), the one launch's configuration included where it takes it: the
    next calls of that layout skip the checks of shapes, dtypes and routes, not those of the values, and
    give the very results the whole path gives. Another layout (shape, strides, dtype, rank), other flags,
    new weights, another one-launch bound, NumPy inputs, a mask or lengths take the whole path."""
    import crossattn_gpu.attention as front_end

    ref, tri = models(16, 2)
    whole = whole_paths(monkeypatch, tri)
    calls = counted_routes(monkeypatch, tri._backend)
    rng = np.random.default_rng(21)

    def device(*arrays, dtype=torch.float32):
        return [torch.tensor(x, dtype=dtype, device=DEVICE) for x in arrays]

    def fused(model, xs, xt, **kwargs):
        got = model.fuse_representations(xs, xt, **kwargs)
        return {key: value for key, value in got.items() if key != "fusion_complete"}

    def same(a, b):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], list):
                assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
            else:
                assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key

    layouts = {"W1": lambda: device(rng.standard_normal((2, 9, 16)), rng.standard_normal((2, 9, 16))),
               "strided": lambda: [x.transpose(1, 2).contiguous().transpose(1, 2)
                                   for x in device(rng.standard_normal((2, 9, 16)), rng.standard_normal((2, 9, 16)))],
               "float16": lambda: device(rng.standard_normal((2, 9, 16)), rng.standard_normal((2, 9, 16)),
                                         dtype=torch.float16),
               "2-D": lambda: device(rng.standard_normal((9, 16)), rng.standard_normal((7, 16))),
               "long": lambda: device(rng.standard_normal((2, 40, 16)), rng.standard_normal((2, 40, 16)))}
    for name, draw in layouts.items():
        bidirectional = name != "2-D"
        for flags in ({"need_similarity": False}, {"need_weights": True}):
            count = len(whole)
            for _ in range(3):
                xs, xt = draw()
                calls.clear()
                got = fused(tri, xs, xt, bidirectional=bidirectional, **flags)
                routes = list(calls)
                calls.clear()
                _, whole_path = models(16, 2)  # a new model: its first call takes the whole path
                same(got, fused(whole_path, xs, xt, bidirectional=bidirectional, **flags))
                assert routes == calls and (routes == ["one launch"]) == (name != "long"), (name, flags, routes)
                want = ref.fuse_representations(*(x.double().cpu().numpy() for x in (xs, xt)),
                                                bidirectional=bidirectional, **flags)
                close(got["fused_sequential"], want["fused_sequential"], 1e-5 if xs.dtype == torch.float32 else 2e-3)
            assert len(whole) == count + 1, (name, flags)  # the first call of a layout and flags alone

    # The values are checked in every call: NaN, Inf, and an input past the compute dtype's range.
    xs, xt = layouts["W1"]()
    fused(tri, xs, xt)
    for bad, message in ((float("nan"), "sequential_repr contains NaN"), (float("inf"), "sequential_repr contains Inf")):
        poisoned = xs.clone()
        poisoned[1, 3, 5] = bad
        with pytest.raises(ValueError, match=message):
            tri.fuse_representations(poisoned, xt)
    half = CrossAttention.from_weights(**ref.get_attention_weights(), backend="triton", dtype="float16")
    half.fuse_representations(xs, xt)
    loud = xs.clone()
    loud[0, 0, 0] = 1e5
    with pytest.raises(ValueError, match="sequential_repr reaches 1e[+]05 in magnitude, past float16's largest"):
        half.fuse_representations(loud, xt)

    # New weights, another bound of the one launch: the whole path again, with the new ones.
    count = len(whole)
    tri.value_weights = ref.value_weights * 2
    new_ref = CrossAttention.from_weights(**tri.get_attention_weights(), backend="numpy")
    close(tri.fuse_representations(xs, xt)["fused_sequential"],
          new_ref.fuse_representations(*(x.double().cpu().numpy() for x in (xs, xt)))["fused_sequential"], 1e-5)
    monkeypatch.setattr(tri._backend, "one_launch_flops", 0)
    calls.clear()
    tri.fuse_representations(xs, xt)
    assert calls == ["sdpa", "sdpa"] and len(whole) == count + 2
    monkeypatch.undo()

    # No plan: NumPy inputs, a mask, lengths, flags that are not bools, a tensor that requires grad.
    _, tri = models(16, 2)
    whole = whole_paths(monkeypatch, tri)
    seq, struct = rng.standard_normal((2, 9, 16)), rng.standard_normal((2, 9, 16))
    xs, xt = device(seq, struct)
    for kwargs in ({"mask": np.ones((9, 9))}, {"sequential_lengths": np.array([9, 4]), "structural_lengths": np.array([9, 4])},
                   {"bidirectional": np.True_}):
        for _ in range(2):
            tri.fuse_representations(xs, xt, **kwargs)
    for _ in range(2):
        tri.fuse_representations(seq, struct)
    assert len(whole) == 8
    with pytest.raises(TypeError, match="requires grad"):
        tri.fuse_representations(xs.requires_grad_(), xt)

    # A model keeps a bounded number of plans, and each call's results are its own.
    def close_to_numpy(got, xs, xt):
        want = ref.fuse_representations(xs, xt, need_similarity=False)
        close(got["bidirectional_fusion"], want["bidirectional_fusion"], 1e-5)

    longest = front_end._PLANS_KEPT + 3
    fuse_more_layouts_than_kept(tri, rng.standard_normal((2, longest, 16)), rng.standard_normal((2, longest, 16)),
                                device, close_to_numpy)


@pytest.mark.parametrize("method", ["multi_head_attention", "scaled_dot_product_attention"])
def test_repeated_attentions_keep_what_their_first_call_settled(monkeypatch, method):
    """``multi_head_attention`` and ``scaled_dot_product_attention`` keep plans as the fusion does, the one
    launch made once where a multi-head attention takes it (``small_attention.SmallAttention``): the next
    calls of a layout take the same route and give the same bits as the whole path, keys given as the
    values too, with the values checked each call. Another layout, new weights, another one-launch bound,
    NumPy inputs, a mask, lengths, flags that are not bools take the whole path."""
    ref, tri = models(16, 2)
    whole = whole_paths(monkeypatch, tri)
    calls = counted_routes(monkeypatch, tri._backend)
    rng = np.random.default_rng(23)
    one_launch = method == "multi_head_attention"

    def device(*shapes, dtype=torch.float32):
        return [torch.tensor(rng.standard_normal(shape), dtype=dtype, device=DEVICE) for shape in shapes]

    def same(got, want):
        for a, b in zip(got, want):
            if isinstance(a, list):
                assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
            else:
                assert (a is None and b is None) or torch.equal(a, b)

    layouts = {"small": lambda: device((2, 9, 16), (2, 7, 16), (2, 7, 16)),
               "strided": lambda: [x.transpose(1, 2).contiguous().transpose(1, 2)
                                   for x in device((2, 9, 16), (2, 7, 16), (2, 7, 16))],
               "float16": lambda: device((2, 9, 16), (2, 7, 16), (2, 7, 16), dtype=torch.float16),
               "2-D": lambda: device((9, 16), (7, 16), (7, 16)),
               "keys as values": lambda: (lambda q, k: [q, k, k])(*device((2, 9, 16), (2, 7, 16))),
               "long": lambda: device((2, 40, 16), (2, 40, 16), (2, 40, 16))}
    for name, draw in layouts.items():
        for flags in ({}, {"need_weights": True}):
            count = len(whole)
            for _ in range(3):
                inputs = draw()
                calls.clear()
                got = getattr(tri, method)(*inputs, **flags)
                routes = list(calls)
                calls.clear()
                _, whole_path = models(16, 2)  # a new model: its first call takes the whole path
                same(got, getattr(whole_path, method)(*inputs, **flags))
                assert routes == calls and (routes == ["one launch"]) == (one_launch and name != "long"), (name, routes)
                want, _ = getattr(ref, method)(*(x.double().cpu().numpy() for x in inputs), **flags)
                close(got[0], want, 1e-5 if inputs[0].dtype == torch.float32 else 2e-3)
            # The first call of a layout and flags alone; keys as values are laid out as "small" is, whose
            # plans serve them.
            assert len(whole) == count + (name != "keys as values"), (name, flags)

    # The values are checked in every call: NaN, Inf, and an input past the compute dtype's range.
    q, k, v = layouts["small"]()
    getattr(tri, method)(q, k, v)
    for bad, message in ((float("nan"), "contains NaN"), (float("inf"), "contains Inf")):
        poisoned = v.clone()
        poisoned[1, 3, 5] = bad
        with pytest.raises(ValueError, match=f"(value_seq|values) {message}"):
            getattr(tri, method)(q, k, poisoned)
    half = CrossAttention.from_weights(**ref.get_attention_weights(), backend="triton", dtype="float16")
    getattr(half, method)(q, k, v)
    loud = k.clone()
    loud[0, 0, 0] = 1e5
    with pytest.raises(ValueError, match="(key_seq|keys) reaches 1e[+]05 in magnitude, past float16's largest"):
        getattr(half, method)(q, loud, v)

    # New weights, another bound of the one launch: the whole path again.
    count = len(whole)
    tri.value_weights = ref.value_weights * 2
    new_ref = CrossAttention.from_weights(**tri.get_attention_weights(), backend="numpy")
    close(getattr(tri, method)(q, k, v)[0],
          getattr(new_ref, method)(*(x.double().cpu().numpy() for x in (q, k, v)))[0], 1e-5)
    monkeypatch.setattr(tri._backend, "one_launch_flops", 0)
    calls.clear()
    getattr(tri, method)(q, k, v)
    assert "one launch" not in calls and len(whole) == count + 2

    # No plan: NumPy inputs, a mask, lengths, flags that are not bools, a tensor that requires grad.
    count = len(whole)
    for kwargs in ({"mask": np.ones((9, 7))}, {"query_lengths": np.array([9, 4]), "key_lengths": np.array([7, 2])},
                   {"need_weights": np.False_}):
        for _ in range(2):
            getattr(tri, method)(q, k, v, **kwargs)
    for _ in range(2):
        getattr(tri, method)(*(x.cpu().numpy() for x in (q, k, v)))
    assert len(whole) == count + 8
    with pytest.raises(TypeError, match="requires grad"):
        getattr(tri, method)(q.requires_grad_(), k, v)


def test_a_planned_sdpa_settles_its_route_and_follows_torchs_switches(monkeypatch):
    """A ``scaled_dot_product_attention`` that attends through torch's SDPA settles that route in its plan: the
    next calls of its layout ask nothing about it (``_sdpa_takes``, which on a GPU asks torch whether SDPA
    can run its flash or memory-efficient kernel) and give the whole path's bits. Turning either of
    those kernels off or on in torch makes a new plan, since the answers may change."""
    _, tri = models(16, 2)
    backend = tri._backend
    whole = whole_paths(monkeypatch, tri)
    asked = []
    takes = backend._sdpa_takes
    monkeypatch.setattr(backend, "_sdpa_takes", lambda *a: asked.append(1) or takes(*a))
    calls = counted_routes(monkeypatch, backend)
    q, k, v = (torch.randn(shape, device=DEVICE) for shape in ((2, 9, 16), (2, 7, 16), (2, 7, 16)))
    first = tri.scaled_dot_product_attention(q, k, v, need_weights=False)[0]
    assert (calls, len(asked), len(whole)) == (["sdpa"], 1, 1)
    for _ in range(2):
        assert torch.equal(tri.scaled_dot_product_attention(q, k, v, need_weights=False)[0], first)
    assert (calls, len(asked), len(whole)) == (["sdpa"] * 3, 1, 1)
    cuda = torch.backends.cuda
    for switch, enabled in ((cuda.enable_flash_sdp, cuda.flash_sdp_enabled),
                            (cuda.enable_mem_efficient_sdp, cuda.mem_efficient_sdp_enabled)):
        state = enabled()
        try:
            switch(not state)
            tri.scaled_dot_product_attention(q, k, v, need_weights=False)
        finally:
            switch(state)
    assert len(whole) == 3


def test_planned_calls_from_threads(monkeypatch):
    """Fusions and multi-head attentions of two layouts each from four threads on one model: each call gets
    its own results, whichever thread made or replaced the plans. (Triton's interpreter runs one kernel at
    a time: it is not thread-safe.)"""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    ref, tri = models(16, 2)
    if interpreter_mode():
        one_at_a_time = threading.Lock()
        for launcher in (tri._backend.small_fusion.SmallFusion, tri._backend.small_attention.SmallAttention):
            def serial(self, *args, _launch=launcher._launch, **kwargs):
                with one_at_a_time:
                    return _launch(self, *args, **kwargs)

            monkeypatch.setattr(launcher, "_launch", serial)
    rng = np.random.default_rng(22)
    pairs = [(rng.standard_normal((2, n, 16)), rng.standard_normal((2, n, 16))) for n in (5, 9, 5, 9, 5, 9, 5, 9)]
    wants = [ref.fuse_representations(*pair, need_similarity=False)["fused_sequential"] if index % 4 < 2
             else ref.multi_head_attention(pair[0], pair[1], pair[1])[0] for index, pair in enumerate(pairs)]

    def call(index):
        xs, xt = (torch.tensor(x, dtype=torch.float32, device=DEVICE) for x in pairs[index])
        if index % 4 < 2:
            return tri.fuse_representations(xs, xt, need_similarity=False)["fused_sequential"]
        return tri.multi_head_attention(xs, xt, xt)[0]

    with ThreadPoolExecutor(4) as pool:
        for got, want in zip(pool.map(call, list(range(len(pairs))) * 2), wants * 2):
            close(got, want, 1e-5)


def test_small_multi_head_attentions_take_one_launch(monkeypatch):
    """``multi_head_attention`` on examples within ``small_fusion.fits``, up to ``one_launch_flops``, runs in
    one launch (``kernels/small_attention.py``), projections included, with masks, lengths (host or
    device), probabilities and the seed's 2-D call; longer examples or more FLOPs take the other routes."""
    ref, tri = models(24, 3)
    calls = counted_routes(monkeypatch, tri._backend)
    rng = np.random.default_rng(14)
    xq, xk, xv = rng.standard_normal((3, 9, 24)), rng.standard_normal((3, 13, 24)), rng.standard_normal((3, 13, 24))
    mask = rng.random((3, 9, 13)) > 0.3
    ragged = {"query_lengths": np.array([9, 1, 4]), "key_lengths": np.array([13, 2, 1])}
    on_device = {name: torch.tensor(n, device=DEVICE) for name, n in ragged.items()}
    for kwargs, dtype in (({}, torch.float32), ({"mask": mask, **ragged, "need_weights": True}, torch.float32),
                          ({"mask": mask, **on_device, "need_weights": True}, torch.float32),
                          ({"mask": mask[:1, :1], **ragged}, torch.float16)):
        calls.clear()
        out, probs = tri.multi_head_attention(*(torch.tensor(x, dtype=dtype, device=DEVICE) for x in (xq, xk, xv)),
                                              **kwargs)
        assert calls == ["one launch"], kwargs
        host = {name: np.asarray(n) for name, n in kwargs.items() if name.endswith("lengths")}
        want_out, want_probs = ref.multi_head_attention(xq, xk, xv, **{**kwargs, **host})
        close(out, want_out, 1e-5 if dtype == torch.float32 else 2e-3)
        for got, want in zip(probs or [], want_probs or []):
            close(got, want, 1e-5)
        assert (probs is None) == (want_probs is None)
    calls.clear()
    out, probs = tri.multi_head_attention(*(torch.tensor(x[0], dtype=torch.float32, device=DEVICE)
                                            for x in (xq, xk, xv)))
    assert calls == ["one launch"] and len(probs) == 3  # the seed's 2-D call: probabilities by default
    want_out, want_probs = ref.multi_head_attention(xq[0], xk[0], xv[0])
    close(out, want_out, 1e-5)
    close(probs[2], want_probs[2], 1e-5)

    inputs = [torch.tensor(x, dtype=torch.float32, device=DEVICE) for x in (xq, xk, xv)]
    longer = [torch.cat([x, x], 1) for x in inputs]  # 18 queries: past float32's 16
    attention_flops = tri._backend.small_attention.flops(3, 9, 13, 24, 3)
    for inputs, bound, one_launch in ((longer, math.inf, False), (inputs, attention_flops, True),
                                      (inputs, attention_flops - 1, False)):
        monkeypatch.setattr(tri._backend, "one_launch_flops", bound)
        calls.clear()
        tri.multi_head_attention(*inputs)
        assert calls and ("one launch" in calls) == one_launch


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
def test_one_launch_writes_the_inputs_magnitude(monkeypatch):
    """On the one-launch routes the kernels write the inputs' largest magnitude for the front end's check
    (``KernelMagnitude``): W1, the seed's 2-D call and small multi-head attentions reduce nothing apart,
    and NaN or Inf anywhere, padding included, is still the ValueError that names the input.
    Inputs cast to the compute dtype (the check is of the caller's values) and other routes reduce apart,
    once the projections are queued: in one launch of kernels/magnitude.py, or with torch's norms for
    float64 inputs, which that kernel leaves to torch."""
    from torch.profiler import ProfilerActivity, profile

    ref, tri = models(64, 2)
    backend = tri._backend
    launches = []
    matmul, largest = backend._matmul, backend.magnitude.unchecked_largest_magnitudes
    monkeypatch.setattr(backend, "_matmul", lambda a, b: launches.append("mm") or matmul(a, b))
    monkeypatch.setattr(backend.magnitude, "unchecked_largest_magnitudes",
                        lambda arrays: launches.append("magnitude") or largest(arrays))
    rng = np.random.default_rng(13)
    seq, struct = rng.standard_normal((1, 10, 64)), rng.standard_normal((1, 10, 64))
    w1 = [torch.tensor(x, dtype=torch.float32, device=DEVICE) for x in (seq, struct)]
    torch_reduction = {"aten::linalg_vector_norm", "aten::maximum"}

    def reductions(model, *inputs, **kwargs) -> set:
        launches.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.fuse_representations(*inputs, **kwargs)
        found = {e.key for e in prof.key_averages()} & torch_reduction
        return found | ({"kernels.magnitude"} if "magnitude" in launches else set())

    assert not reductions(tri, *w1, bidirectional=False, need_similarity=False)
    assert not reductions(tri, w1[0][0], w1[1][0])  # the seed's 2-D call: probabilities and similarities too
    assert reductions(tri, *(t.double() for t in w1)) == torch_reduction  # computed in float32
    longer = [t.repeat(1, 2, 1) for t in w1]  # 20 long: past float32's 16
    assert reductions(tri, *longer) == {"kernels.magnitude"}
    assert launches[:3] == ["mm", "mm", "magnitude"]  # after both projections
    lengths = {"sequential_lengths": np.array([4]), "structural_lengths": np.array([4])}
    want = ref.fuse_representations(seq, struct, **lengths)
    for position, value, name, what in (((0, 3, 0), np.nan, "sequential_repr", "NaN"),
                                        ((1, 9, 63), np.inf, "structural_repr", "Inf"),  # in the padding
                                        ((0, 9, 5), -np.inf, "sequential_repr", "Inf")):
        bad = [t.clone() for t in w1]
        bad[position[0]][(0,) + position[1:]] = value
        with pytest.raises(ValueError, match=f"{name} contains {what}; inputs must be finite"):
            tri.fuse_representations(*bad, **lengths)
        clean = tri.fuse_representations(*w1, **lengths)  # a failed call leaves nothing behind
        close(clean["bidirectional_fusion"], want["bidirectional_fusion"], 1e-5)
    # multi_head_attention likewise, of its three inputs: the values' padding too, and values that are the keys.
    mha_lengths = {"query_lengths": np.array([10]), "key_lengths": np.array([3])}
    launches.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tri.multi_head_attention(w1[0], w1[1], w1[1], **mha_lengths)
        tri.multi_head_attention(w1[0][0], w1[1][0], w1[0][0])
    assert not {e.key for e in prof.key_averages()} & torch_reduction and not launches
    for index, name in ((0, "query_seq"), (1, "key_seq"), (2, "value_seq")):
        bad = [w1[0], w1[1], w1[1].clone()]
        bad[index] = bad[index].clone()
        bad[index][0, 9, 0] = np.nan  # past the key length for the keys and values
        with pytest.raises(ValueError, match=f"{name} contains NaN; inputs must be finite"):
            tri.multi_head_attention(*bad, **mha_lengths)
    _, narrow = models(64, 2, dtype="float16")
    loud = [t.clone() for t in w1]
    loud[0][0, 9, 0] = 1e5  # finite in float32, past float16's largest
    with pytest.raises(ValueError, match="sequential_repr reaches 1e[+]05 in magnitude, past float16's largest"):
        narrow.fuse_representations(*loud)


@pytest.mark.parametrize("value", [65520.0 - 2.0**-9, float(np.nextafter(65520.0, 0))])
def test_float64_inputs_that_torch_casts_to_inf_in_float16_are_named(value):
    """torch casts float64 to float16 through float32, rounding twice: these values, which NumPy's one
    rounding takes to 65504, become Inf, and with small weights no stage's bound would call for a check of
    the results, which came back NaN. The check of the inputs refuses them before the cast."""
    ref = CrossAttention(8, 2, seed=0, backend="numpy")
    small = CrossAttention.from_weights(**{k: v * 1e-4 for k, v in ref.get_attention_weights().items()},
                                        backend="triton", dtype="float16")
    xs, xt = np.ones((4, 8)), np.ones((4, 8))
    assert torch.isinf(torch.tensor(value, dtype=torch.float64).to(torch.float16))
    xs[1, 2] = value
    with pytest.raises(ValueError, match="sequential_repr reaches 6.55e[+]04 in magnitude, past float16's largest"):
        small.fuse_representations(xs, xt, need_similarity=False)
    xs[1, 2] = 65519.99609375  # float32's value below: 65504 in float16 either way, and computed
    got = small.fuse_representations(xs, xt, need_similarity=False)["fused_sequential"]
    assert np.isfinite(np.asarray(got, dtype=np.float64)).all()


def test_wide_heads_sums_take_two_gemms_and_the_rest_the_kernels(monkeypatch):
    """Heads wider than 256 whose queries and keys are no more than the heads are wide, without mask or
    probabilities, attend as two GEMMs around kernels/softmax_heads.py (see
    ``TritonBackend._gemm_head_sum``), in 16 bits and float32, ragged ones too; masks and probabilities
    do not. Padding whose float16 projections overflow leaves no trace: it is zeroed first."""
    ref, tri = models(300, 3)
    calls = counted_routes(monkeypatch, tri._backend)
    rng = np.random.default_rng(8)
    seq, struct = rng.standard_normal((3, 17, 300)), rng.standard_normal((3, 9, 300))
    mask = rng.random((3, 17, 9)) > 0.3
    s_len, t_len = np.array([17, 5, 1]), np.array([9, 1, 4])
    padded_seq, padded_struct = seq.copy(), struct.copy()
    for x, lengths in ((padded_seq, s_len), (padded_struct, t_len)):
        for b, n in enumerate(lengths):
            x[b, n:] = 6e4 * np.sign(rng.standard_normal(x[b, n:].shape))  # finite in float16; its projections are not
    ragged = {"sequential_lengths": s_len, "structural_lengths": t_len}
    check_fusion_routes(ref, tri, calls, seq, struct, [
        ({}, torch.float16, ["gemm", "gemm"]),
        ({"mask": mask}, torch.float16, ["kernel", "kernel"]),
        ({"structural_lengths": t_len}, torch.float16, ["gemm", "gemm"]),
        ({"need_weights": True}, torch.float16, ["kernel", "kernel"]),
        ({}, torch.float32, ["gemm", "gemm"]),
        ({"mask": mask}, torch.float32, ["kernel", "kernel"]),
        (ragged, torch.float32, ["gemm", "gemm"]),
    ])
    check_fusion_routes(ref, tri, calls, padded_seq, padded_struct, [(ragged, torch.float16, ["gemm", "gemm"])])
    calls.clear()
    half = [torch.tensor(x, dtype=torch.float16, device=DEVICE) for x in (seq, struct, padded_struct)]
    out, _ = tri.multi_head_attention(*half, key_lengths=t_len)
    assert calls == ["gemm"]
    close(out, ref.multi_head_attention(seq, struct, padded_struct, key_lengths=t_len)[0], 2e-3)


def test_the_gemm_route_needs_wide_heads_short_sequences_and_rows_of_heads():
    """``_gemm_route`` on shapes alone (no work): its boundaries."""
    backend = models(8, 1)[1]._backend

    def route(batch=2, heads=3, len_q=17, len_k=9, width=300, dtype=torch.float16, layout="rows", shared_keys=True):
        q = torch.empty(batch, len_q, heads, width, dtype=dtype).transpose(1, 2)
        if layout == "heads":  # (B, H, L, D) in memory: no (L x H, D) view
            q = torch.empty(batch, heads, len_q, width, dtype=dtype)
        k = torch.empty(batch, 1 if shared_keys else heads, len_k, width, dtype=dtype)
        v = torch.empty(batch, len_k, heads, width, dtype=dtype).transpose(1, 2)
        return backend._gemm_route(q, k, v)

    assert route() and route(len_q=300, len_k=300) and route(heads=16, len_k=300, width=1024)
    assert not route(width=256)  # the fused kernel holds a 16-bit head in one chunk
    assert route(dtype=torch.float32) and not route(dtype=torch.float32, width=256)
    assert not route(len_k=301) and not route(len_q=301)
    # One query's heads x keys (padded: 16 x 1024, 32 x 1024) within softmax_heads' block, then past it.
    assert route(heads=16, len_k=600, width=1280) and not route(heads=17, len_k=600, width=1280)
    assert not route(layout="heads") and not route(shared_keys=False)


def test_float16_within_twice_plain_error():
    rng = np.random.default_rng(3)
    ref, tri = models(64, 2)
    seq, struct = rng.standard_normal((4, 40, 64)), rng.standard_normal((4, 40, 64))
    exact = ref.fuse_representations(seq, struct)["bidirectional_fusion"]
    got = tri.fuse_representations(torch.tensor(seq, dtype=torch.float16, device=DEVICE), torch.tensor(struct, dtype=torch.float16, device=DEVICE))
    assert got["bidirectional_fusion"].dtype == torch.float16
    plain = ref.fuse_representations(seq.astype(np.float16), struct.astype(np.float16))["bidirectional_fusion"]
    # the yardstick: NumPy with float16 storage, computed in float32
    err = np.abs(got["bidirectional_fusion"].double().cpu().numpy() - exact).max()
    yard = np.abs(plain.astype(np.float64) - exact).max()
    assert err <= 2 * yard, (err, yard)


def test_bad_inputs_get_the_same_errors_as_numpy():
    _, tri = models(8, 1)
    with pytest.raises(ValueError, match="sequential_repr contains NaN"):
        tri.fuse_representations(np.full((3, 8), np.nan), np.ones((3, 8)))
    with pytest.raises(TypeError, match="must be floating point"):
        tri.fuse_representations(torch.ones(3, 8, dtype=torch.int64), torch.ones(3, 8))
    with pytest.raises(ValueError, match="has last dimension 7"):
        tri.fuse_representations(torch.ones(3, 7), torch.ones(3, 8))
    with pytest.raises(ValueError, match="structural_lengths must lie in 1..3"):
        tri.fuse_representations(torch.ones(2, 3, 8), torch.ones(2, 3, 8), structural_lengths=torch.tensor([3, 4]))
    assert tri.fuse_representations(np.ones((3, 8)), np.ones((3, 8)))["fusion_complete"]


def late_magnitude(backend, *arrays) -> float:
    """``largest_magnitude``'s answer: a function to call on a GPU (read late), the value itself here."""
    magnitude = backend.largest_magnitude(*arrays)
    assert callable(magnitude) == ON_GPU
    return magnitude() if ON_GPU else magnitude


def test_largest_magnitude_is_exact_and_flags_nan_and_inf():
    _, tri = models(8, 1)
    backend = tri._backend
    huge = torch.full((2, 5, 8), 3e38, device=DEVICE)  # finite; a sum of its elements would overflow
    huge[0, 0, 0] = -3.25e38
    assert late_magnitude(backend, huge, torch.ones(2, 5, 8, device=DEVICE)) == np.float32(3.25e38)
    assert backend.all_finite(huge)
    assert late_magnitude(backend, torch.full((4, 8), -6e4, dtype=torch.float16, device=DEVICE)) == 60000.0
    for bad in (float("nan"), float("inf"), float("-inf")):
        arr = torch.ones(2, 5, 8, device=DEVICE)
        arr[1, 3, 7] = bad
        magnitude = late_magnitude(backend, huge, arr)
        assert math.isnan(magnitude) if bad != bad else magnitude == math.inf
        assert not backend.all_finite(huge, arr)
    both = torch.ones(6, device=DEVICE)
    both[0], both[1] = float("inf"), float("nan")
    assert math.isnan(late_magnitude(backend, both))
    # float64 values may pass float32's range: torch's norms reduce them, exactly, in float64.
    wide = torch.full((3, 4), -1e300, dtype=torch.float64, device=DEVICE)
    assert late_magnitude(backend, wide, huge) == 1e300 and backend.all_finite(wide)


def test_the_inputs_magnitude_is_one_launch_for_up_to_three_arrays(monkeypatch):
    """kernels/magnitude.py reduces up to three float32 and 16-bit arrays in one launch, an array given
    twice once; float64 and a fourth array go to torch's norms (the front end hands it at most three)."""
    _, tri = models(8, 1)
    backend = tri._backend
    launches = []
    largest = backend.magnitude.unchecked_largest_magnitudes
    monkeypatch.setattr(backend.magnitude, "unchecked_largest_magnitudes",
                        lambda arrays: launches.append(len(arrays)) or largest(arrays))
    arrays = [torch.full((2, 3, 8), float(n), device=DEVICE) for n in (1, -5, 2)]
    arrays[1] = arrays[1].half()
    assert late_magnitude(backend, *arrays) == 5.0 and launches == [3]
    assert late_magnitude(backend, *arrays, arrays[0].clone()) == 5.0 and launches == [3]  # four: torch
    assert late_magnitude(backend, arrays[0], arrays[0].double()) == 1.0 and launches == [3]
    assert late_magnitude(backend, *arrays, arrays[1]) == 5.0 and launches == [3, 3]  # read once, four given
    launches.clear()
    tri.multi_head_attention(*(torch.ones(2, n, 8, device=DEVICE) for n in (20, 30)), arrays[0].new_ones(2, 30, 8))
    key = torch.ones(2, 30, 8, device=DEVICE)
    tri.multi_head_attention(torch.ones(2, 20, 8, device=DEVICE), key, key)  # the keys as values: read once
    assert launches == [3, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_similarities_take_one_launch_a_side(monkeypatch, dtype):
    """Off the one-launch route, each of the four sides of the similarities (both inputs, padded rows zero,
    and both fused outputs) becomes unit rows in one launch of kernels/unit_rows.py, the inputs' lengths
    taken by the kernel: no torch elementwise pass over the rows, and no `where` for the padding. (A mask
    keeps the attention in the kernels: float32 fusions without one attend through SDPA, whose inputs'
    padding is zeroed first and heads summed after, torch passes this test would count.)"""
    from torch.profiler import ProfilerActivity, profile

    ref, tri = models(16, 2)
    backend = tri._backend
    calls = []
    unit_rows = backend.unit_rows.unit_rows
    monkeypatch.setattr(backend.unit_rows, "unit_rows",
                        lambda x, lengths=None: calls.append(lengths is not None) or unit_rows(x, lengths))
    rng = np.random.default_rng(5)
    seq, struct = rng.standard_normal((3, 40, 16)), rng.standard_normal((3, 33, 16))  # past 16-bit's 32
    lengths = dict(sequential_lengths=np.array([40, 7, 1]), structural_lengths=np.array([2, 33, 30]))
    mask = rng.random((3, 40, 33)) > 0.2
    inputs = [torch.tensor(x, dtype=dtype, device=DEVICE) for x in (seq, struct)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = tri.fuse_representations(*inputs, mask=mask, bidirectional=False, **lengths)
    assert calls == [True, False, True, False]
    elementwise = {"aten::abs", "aten::div", "aten::sum", "aten::sqrt", "aten::where"}
    assert not {e.key for e in prof.key_averages()} & elementwise
    want = ref.fuse_representations(*(x.cpu().double().numpy() for x in inputs), mask=mask, bidirectional=False,
                                    **lengths)
    for key in ("seq_similarity", "struct_similarity"):
        close(got[key], want[key], 1e-5 if dtype == torch.float32 else 2e-3)
        for b, n in enumerate(lengths["sequential_lengths" if key == "seq_similarity" else "structural_lengths"]):
            assert torch.all(got[key][b, n:] == 0) and torch.all(got[key][b, :, n:] == 0)


def test_a_ragged_fusion_reads_from_the_device_once():
    """Each read of a device value by the host is a synchronisation: the finiteness verdict of both
    inputs is read once, and the kernel launches take the front end's checked lengths on trust."""
    from torch.profiler import ProfilerActivity, profile

    _, tri = models(16, 2)
    xs, xt = torch.randn(3, 9, 16, device=DEVICE), torch.randn(3, 7, 16, device=DEVICE)
    lengths = dict(sequential_lengths=np.array([9, 4, 1]), structural_lengths=np.array([7, 7, 2]))
    tri.fuse_representations(xs, xt, bidirectional=False, **lengths)  # compile outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = tri.fuse_representations(xs, xt, bidirectional=False, **lengths)
    reads = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
    assert reads == 1
    ref, _ = models(16, 2)
    want = ref.fuse_representations(xs.cpu().numpy(), xt.cpu().numpy(), bidirectional=False, **lengths)
    close(got["fused_sequential"], want["fused_sequential"], 1e-5)
    close(got["fused_structural"], want["fused_structural"], 1e-5)


@pytest.mark.parametrize("in_kernel", [True, False], ids=["triton", "kernel-without-query-lengths"])
def test_the_kernels_zero_padded_queries_themselves(monkeypatch, in_kernel):
    """Ragged queries reach the kernel, which writes their padded rows as zeros (no pass over the output
    after it). A kernel without query lengths (the CUDA C one of the CuPy backend, which shares this code)
    gets its rows zeroed after it. float16 here: float32 fusions without mask or probabilities may attend
    through SDPA, which zeroes those rows after it (``test_sdpa_route_ignores_the_padding``)."""
    ref, tri = models(16, 2)
    backend = tri._backend
    monkeypatch.setattr(backend, "kernel_takes_query_lengths", in_kernel)
    zeroed, seen = [], []
    zero_rows, attention = backend._zero_padded_rows, backend.kernel.attention
    monkeypatch.setattr(backend, "_zero_padded_rows",
                        lambda x, lengths, axis: zeroed.append(lengths is not None) or zero_rows(x, lengths, axis))

    def recording(q, k, v, *, q_lengths=None, **kwargs):
        seen.append(q_lengths is not None)
        return attention(q, k, v, q_lengths=q_lengths, **kwargs)

    monkeypatch.setattr(backend.kernel, "attention", recording)
    rng = np.random.default_rng(3)
    xs, xt = rng.standard_normal((3, 70, 16)).astype(np.float16), rng.standard_normal((3, 7, 16)).astype(np.float16)
    s_len, t_len = np.array([70, 4, 1]), np.array([7, 7, 2])  # 70 queries: blocks wholly past 4 and 1
    kwargs = dict(bidirectional=False, need_similarity=False)
    for lengths, kernel_calls, zeroed_after in [
        (dict(sequential_lengths=s_len, structural_lengths=t_len), [in_kernel] * 2, [] if in_kernel else [True] * 2),
        (dict(sequential_lengths=s_len), [in_kernel, False], [] if in_kernel else [True, False]),
    ]:
        zeroed.clear(), seen.clear()
        got = tri.fuse_representations(torch.tensor(xs, device=DEVICE), torch.tensor(xt, device=DEVICE), **lengths,
                                       **kwargs)
        assert (seen, zeroed) == (kernel_calls, zeroed_after)
        want = ref.fuse_representations(xs, xt, **lengths, **kwargs)
        for key in ("fused_sequential", "fused_structural"):
            close(got[key], want[key], 2e-3)
        assert not got["fused_sequential"][1, 4:].any() and not got["fused_sequential"][2, 1:].any()
    # Probabilities rebuilt from the lse, which the rows of a block past its length do not have: zeros too.
    lengths = dict(sequential_lengths=s_len, structural_lengths=t_len, need_weights=True, **kwargs)
    got = tri.fuse_representations(torch.tensor(xs, device=DEVICE), torch.tensor(xt, device=DEVICE), **lengths)
    want = ref.fuse_representations(xs, xt, **lengths)
    for key in ("attention_weights_seq_to_struct", "attention_weights_struct_to_seq"):
        for g, w in zip(got[key], want[key]):
            close(g, w, 2e-3)


DEVICE_LENGTH_CASES = [  # method, lengths (query or sequential, key or structural), bidirectional
    ("fuse_representations", ([9, 4, 1], [7, 7, 2]), False),
    ("fuse_representations", ([9, 4, 1], None), False),
    ("fuse_representations", ([7, 4, 1], [7, 4, 1]), True),
    ("fuse_representations", (None, [7, 7, 7]), True),
    ("multi_head_attention", ([9, 4, 1], [7, 7, 2]), None),
    ("scaled_dot_product_attention", (None, [1, 7, 3]), None),
]


def call_with_lengths(model, method, xs, xt, lengths, bidirectional):
    if method == "fuse_representations":
        if bidirectional:
            xs = xs[:, : xt.shape[1]]
        s_len, t_len = lengths
        return model.fuse_representations(xs, xt, sequential_lengths=s_len, structural_lengths=t_len,
                                          bidirectional=bidirectional, need_weights=True)
    q_len, k_len = lengths
    out, probs = getattr(model, method)(xs, xt, xt, query_lengths=q_len, key_lengths=k_len, need_weights=True)
    return {"output": out, "probabilities": probs[0] if isinstance(probs, list) else probs}


def host_reads(monkeypatch, backend) -> list:
    """The names ``backend.host`` is called with from now on (a GPU array's copy to the host)."""
    names, host = [], backend.host
    monkeypatch.setattr(backend, "host", lambda x, name: names.append(name) or host(x, name))
    return names


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
@pytest.mark.parametrize("method,lengths,bidirectional", DEVICE_LENGTH_CASES)
def test_device_lengths_are_checked_on_the_device(monkeypatch, method, lengths, bidirectional, dtype):
    """Lengths on the device are never copied to the host (on a GPU each copy drains the queue), and
    give what host lengths give."""
    ref, tri = models(16, 2)
    rng = np.random.default_rng(2)
    xs, xt = rng.standard_normal((3, 9, 16)).astype(np.float32), rng.standard_normal((3, 7, 16)).astype(np.float32)
    host_lengths = [None if n is None else np.array(n) for n in lengths]
    want = call_with_lengths(ref, method, xs, xt, host_lengths, bidirectional)
    device_lengths = [None if n is None else torch.tensor(n, dtype=dtype, device=DEVICE) for n in lengths]
    reads = host_reads(monkeypatch, tri._backend)
    got = call_with_lengths(tri, method, torch.tensor(xs, device=DEVICE), torch.tensor(xt, device=DEVICE),
                            device_lengths, bidirectional)
    assert reads == []
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            close(got[key], value, 1e-5)


BAD_DEVICE_LENGTHS = [  # lengths (sequential, structural), bidirectional, the message host lengths get
    (([6, 3], [5, 5]), False, "sequential_lengths must lie in 1..5"),
    (([0, 3], [5, 5]), False, "sequential_lengths must lie in 1..5 .* from 0 to 3"),
    (([5, 3], [-2, 5]), False, "structural_lengths must lie in 1..5 .* from -2 to 5"),
    (([5, 3], [5, 4]), True, "example 1 has 3 and 4"),
    (([5, 5], None), True, None),
    (([5, 4], None), True, "example 1 has 4 and 5"),
    (([9, 3], [5, 4]), True, "sequential_lengths must lie in 1..5"),  # range before equality, as on the host
    (([5, 3, 3], [5, 5]), False, r"sequential_lengths must have shape \(2,\)"),
]


@pytest.mark.parametrize("lengths,bidirectional,message", BAD_DEVICE_LENGTHS)
def test_bad_device_lengths_get_the_host_errors_and_never_reach_a_kernel(monkeypatch, lengths, bidirectional, message):
    _, tri = models(8, 1)
    backend = tri._backend
    seen = []
    attention = backend.kernel.attention

    def recording(q, k, v, *, k_lengths=None, **kwargs):
        seen.append(None if k_lengths is None else (int(k_lengths.min()), int(k_lengths.max()), k.shape[2]))
        return attention(q, k, v, k_lengths=k_lengths, **kwargs)

    monkeypatch.setattr(backend.kernel, "attention", recording)
    xs, xt = torch.randn(2, 5, 8, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE)
    s_len, t_len = (None if n is None else torch.tensor(n, device=DEVICE) for n in lengths)

    def call():
        return tri.fuse_representations(xs, xt, sequential_lengths=s_len, structural_lengths=t_len,
                                        bidirectional=bidirectional, need_similarity=False)

    if message is None:
        assert call()["fusion_complete"]
    else:
        host = [None if n is None else np.array(n) for n in lengths]
        with pytest.raises(ValueError, match=message):  # the message of host lengths, the same text
            tri.fuse_representations(xs.cpu().numpy(), xt.cpu().numpy(), sequential_lengths=host[0],
                                     structural_lengths=host[1], bidirectional=bidirectional, need_similarity=False)
        with pytest.raises(ValueError, match=message):
            call()
    assert all(1 <= low and high <= length for low, high, length in filter(None, seen))
    ok = torch.tensor([5, 2], device=DEVICE)
    tri.fuse_representations(xs, xt, sequential_lengths=ok, structural_lengths=ok)  # no state left behind


def test_late_lengths_clamps_and_flags():
    _, tri = models(8, 1)
    backend = tri._backend

    def verdict(lengths, tops, equal, dtype=torch.int64):
        given = [None if n is None else torch.tensor(n, dtype=dtype, device=DEVICE) for n in lengths]
        clamped, failed = backend.late_lengths(given, tops, equal)
        assert callable(failed) == ON_GPU  # read late on a GPU
        assert all(c is None or c.dtype == torch.int32 for c in clamped)  # the kernels' dtype
        failed = failed() if ON_GPU else failed
        return [None if c is None else c.cpu().tolist() for c in clamped], failed

    assert verdict(([0, 9, 3], [2, 2, 2]), [5, 4], False) == ([[1, 5, 3], [2, 2, 2]], True)
    assert verdict(([1, 5], None), [5, 4], False) == ([[1, 5], None], False)
    assert verdict((None, [4, 4]), [4, 4], True) == ([None, [4, 4]], False)
    assert verdict((None, [4, 3]), [4, 4], True) == ([None, [4, 3]], True)
    assert verdict(([2, 3], [2, 3]), [4, 4], True) == ([[2, 3], [2, 3]], False)
    assert verdict(([255, 0], [2, 3]), [300, 300], False, torch.uint8) == ([[255, 1], [2, 3]], True)  # widened first
    assert backend.checks_lengths_late(torch.ones(2, dtype=torch.int32, device=DEVICE))
    for dtype in (torch.float32, torch.float64, torch.bool):
        assert not backend.checks_lengths_late(torch.ones(2, dtype=dtype, device=DEVICE))
    assert not backend.checks_lengths_late(np.ones(2, dtype=np.int64))


@gpu_only
def test_device_lengths_never_drain_the_queue():
    """On a GPU: the ragged fusion with device lengths waits for events only, never for a stream."""
    from torch.profiler import ProfilerActivity, profile

    _, tri = models(16, 2)
    xs, xt = torch.randn(3, 9, 16, device=DEVICE), torch.randn(3, 7, 16, device=DEVICE)
    lengths = dict(sequential_lengths=torch.tensor([9, 4, 1], device=DEVICE),
                   structural_lengths=torch.tensor([7, 7, 2], device=DEVICE))
    tri.fuse_representations(xs, xt, bidirectional=False, **lengths)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        tri.fuse_representations(xs, xt, bidirectional=False, **lengths)
    names = [e.key for e in prof.key_averages()]
    assert not [n for n in names if n in ("cudaStreamSynchronize", "cudaDeviceSynchronize")], names


@pytest.mark.skipif(ON_GPU, reason="the interpreter's limits")
def test_bfloat16_is_refused_under_the_interpreter():
    with pytest.raises(ValueError, match="backend 'triton' supports dtypes"):
        CrossAttention(8, 1, backend="triton", dtype="bfloat16")


def test_without_gpu_or_interpreter_triton_is_a_clear_error():
    if ON_GPU:
        pytest.skip("this machine has a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from crossattn_gpu import CrossAttention\nCrossAttention(8, 1, backend='triton')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode != 0
    assert "backend 'triton' needs a CUDA GPU" in done.stderr and "TRITON_INTERPRET=1" in done.stderr


def test_read_only_inputs_give_no_warning(tmp_path):
    """A read-only memmap (``np.load(..., mmap_mode="r")``) and a read-only mask are copied to the device
    without torch's warning about non-writable arrays (in a process of its own: torch warns once)."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "seq.npy", rng.standard_normal((2, 5, 8)))
    np.save(tmp_path / "mask.npy", rng.random((5, 5)) > 0.3)
    code = (
        "import numpy as np\nfrom crossattn_gpu import CrossAttention\n"
        f"seq = np.load({str(tmp_path / 'seq.npy')!r}, mmap_mode='r')\n"
        f"mask = np.load({str(tmp_path / 'mask.npy')!r}, mmap_mode='r')\n"
        "model = CrossAttention(8, 2, seed=0, backend='triton')\n"
        "got = model.fuse_representations(seq, seq, mask=mask)['fused_sequential']\n"
        "want = CrossAttention(8, 2, seed=0, backend='numpy').fuse_representations(np.array(seq), np.array(seq), "
        "mask=np.array(mask))['fused_sequential']\n"
        "assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()\n"
    )
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@gpu_only
def test_bfloat16_on_gpu():
    rng = np.random.default_rng(4)
    ref, tri = models(128, 4)
    seq, struct = rng.standard_normal((8, 100, 128)), rng.standard_normal((8, 100, 128))
    exact = ref.fuse_representations(seq, struct)["bidirectional_fusion"]
    got = tri.fuse_representations(torch.tensor(seq, dtype=torch.bfloat16, device="cuda"), torch.tensor(struct, dtype=torch.bfloat16, device="cuda"))
    err = np.abs(got["bidirectional_fusion"].double().cpu().numpy() - exact).max()
    # yardstick: the direct formulation in plain torch bfloat16
    w = {k: torch.tensor(v, dtype=torch.bfloat16, device="cuda") for k, v in ref.get_attention_weights().items()}

    def mha(xq, xk):
        outs = []
        for h in range(4):
            q, k, v = xq @ w["query_weights"][h], xk @ w["key_weights"][h], xk @ w["value_weights"][h]
            outs.append(torch.softmax((q @ k.transpose(-1, -2)) / 128**0.5, dim=-1) @ v)
        return torch.cat(outs, -1) @ w["output_weights"]

    ts, tt = (torch.tensor(x, dtype=torch.bfloat16, device="cuda") for x in (seq, struct))
    plain = (mha(ts, tt) + mha(tt, ts)).double().cpu().numpy()
    assert err <= 2 * np.abs(plain - exact).max()


@gpu_only
def test_cupy_in_cupy_out():
    """CuPy arrays in, CuPy arrays out on the inputs' GPU (inputs on another GPU than the backend's are
    copied to it, as torch tensors are: a kernel must not be handed another device's memory)."""
    cupy = pytest.importorskip("cupy")
    ref, tri = models(16, 2)
    rng = np.random.default_rng(5)
    seq, struct = rng.standard_normal((2, 9, 16)).astype(np.float32), rng.standard_normal((2, 9, 16)).astype(np.float32)
    got = tri.fuse_representations(cupy.asarray(seq), cupy.asarray(struct))
    assert isinstance(got["fused_sequential"], cupy.ndarray)
    assert got["fused_sequential"].device.id == cupy.asarray(seq).device.id
    close(cupy.asnumpy(got["fused_sequential"]), ref.fuse_representations(seq, struct)["fused_sequential"], 1e-5)
