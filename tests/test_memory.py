"""Outputs too large for the host's memory: a MemoryError before any work, never the OOM killer."""

import os

import numpy as np
import pytest

from crossattn_gpu import CrossAttention, _memory


def test_small_outputs_are_never_checked(monkeypatch):
    def unread():
        raise AssertionError("memory figures read for a small call")

    monkeypatch.setattr(_memory, "available_bytes", unread)
    _memory.check_outputs_fit({"probabilities": _memory.CHECKED_FROM_BYTES // 8 - 1}, "float64", "pass less")


def test_outputs_past_the_memory_available_are_refused_with_their_sizes(monkeypatch):
    monkeypatch.setattr(_memory, "available_bytes", lambda: 3 << 30)
    elements = {"fused outputs": 1000, "probabilities (need_weights)": 1 << 30, "similarities": 0}
    with pytest.raises(MemoryError, match=r"need 4.00 GiB of float32 \(probabilities \(need_weights\) 4.00 GiB\), "
                                          r"more than the 3.00 GiB of memory available; pass less"):
        _memory.check_outputs_fit(elements, "float32", "pass less")
    _memory.check_outputs_fit(elements, "float16", "pass less")  # 2 GiB: fits
    total = 2 * (1000 + (1 << 30))
    monkeypatch.setattr(_memory, "available_bytes", lambda: total)  # just fits
    _memory.check_outputs_fit(elements, "float16", "pass less")
    monkeypatch.setattr(_memory, "available_bytes", lambda: total - 1)
    with pytest.raises(MemoryError, match="float16"):
        _memory.check_outputs_fit(elements, "float16", "pass less")
    monkeypatch.setattr(_memory, "available_bytes", lambda: None)  # unknown (not Linux): not refused
    _memory.check_outputs_fit(elements, "float64", "pass less")


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads /proc/meminfo")
def test_available_memory_is_read_and_capped_by_a_cgroup_limit(tmp_path, monkeypatch):
    available = _memory.available_bytes()
    assert available is not None and 0 < available
    (tmp_path / "max").write_text("1073741824\n")
    (tmp_path / "current").write_text("268435456\n")
    (tmp_path / "unlimited").write_text("max\n")
    monkeypatch.setattr(_memory, "CGROUP_FILES", ((str(tmp_path / "unlimited"), str(tmp_path / "current")),
                                                  (str(tmp_path / "max"), str(tmp_path / "current"))))
    assert _memory.available_bytes() == min(available, 3 << 28)  # 1 GiB limit, 256 MiB used
    (tmp_path / "over").write_text("1073741825\n")  # usage past the limit (reclaim pending): no room, not less
    monkeypatch.setattr(_memory, "CGROUP_FILES", ((str(tmp_path / "max"), str(tmp_path / "over")),))
    assert _memory.available_bytes() == 0


def test_available_memory_counts_free_swap_and_no_cgroup_limit(tmp_path, monkeypatch):
    (tmp_path / "meminfo").write_text("MemTotal:       2048000 kB\nMemAvailable:    1000 kB\nSwapFree:         500 kB\n")
    monkeypatch.setattr(_memory, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(_memory, "CGROUP_FILES", ())
    assert _memory.available_bytes() == 1500 * 1024
    (tmp_path / "v1-none").write_text("9223372036854771712\n")  # cgroup v1's "no limit": ~2**63
    (tmp_path / "current").write_text("268435456\n")
    monkeypatch.setattr(_memory, "CGROUP_FILES", ((str(tmp_path / "v1-none"), str(tmp_path / "current")),))
    assert _memory.available_bytes() == 1500 * 1024
    monkeypatch.setattr(_memory, "CGROUP_FILES", ())
    (tmp_path / "meminfo").write_text("MemAvailable:    1000 kB\n")  # no swap line: none
    assert _memory.available_bytes() == 1000 * 1024
    monkeypatch.setattr(_memory, "MEMINFO", str(tmp_path / "absent"))  # not Linux: unknown
    assert _memory.available_bytes() is None


@pytest.fixture
def tight_memory(monkeypatch):
    monkeypatch.setattr(_memory, "CHECKED_FROM_BYTES", 0)
    monkeypatch.setattr(_memory, "available_bytes", lambda: 20_000)


def test_each_method_refuses_outputs_that_cannot_fit(tight_memory):
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    x = np.random.default_rng(0).standard_normal((40, 8))  # (40, 40) probabilities: 12.8 kB per head
    with pytest.raises(MemoryError, match=r"probabilities \(need_weights\).*pass need_weights=False or "
                                          r"need_similarity=False, or fewer examples per call"):
        model.fuse_representations(x, x)  # the seed's defaults: probabilities and similarities
    with pytest.raises(MemoryError, match="similarities"):
        model.fuse_representations(x, x, need_weights=False)
    model.fuse_representations(x, x, need_weights=False, need_similarity=False)  # 3 x 2.6 kB
    with pytest.raises(MemoryError, match=r"pass need_weights=False, or fewer"):
        model.multi_head_attention(x, x, x)
    model.multi_head_attention(x, x, x, need_weights=False)
    with pytest.raises(MemoryError, match=r"probabilities"):
        model.scaled_dot_product_attention(np.ones((80, 8)), np.ones((80, 8)), np.ones((80, 8)))
    model.scaled_dot_product_attention(x, x, x, need_weights=False)


def test_weights_that_cannot_fit_are_refused_before_they_are_drawn(monkeypatch):
    monkeypatch.setattr(_memory, "available_bytes", lambda: 24 << 30)
    drawn = []
    monkeypatch.setattr(np.random, "randn", lambda *shape: drawn.append(shape))
    with pytest.raises(MemoryError, match=r"embedding_dim=12800 with attention_heads=8 need 78.12 GiB of float64 "
                                          r"\(the four weights, drawn 39.06 GiB, their checked copy 39.06 GiB\), more "
                                          r"than the 24.00 GiB of memory available; check embedding_dim"):
        CrossAttention(12800, 8)
    with pytest.raises(MemoryError, match=r"embedding_dim=1000000000000000000000 with attention_heads=1 need over "
                                          r"2\*\*70 bytes"):
        CrossAttention(10**21, 1)  # sizes past a float's range are named too
    assert drawn == []


def test_a_collection_is_refused_for_all_its_results_together(tight_memory):
    """Each batch alone fits; the collection's results, all held at once, do not: refused before any work."""
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    calls = []
    model.fuse_representations = lambda *args, **kwargs: calls.append(args)
    pairs = [np.ones((20, 8))] * 20  # 20 x 3 x 20 x 8 float64: 76.8 kB of fused outputs
    with pytest.raises(MemoryError, match=r"fused outputs .*or take the results as they come with iter_collection"):
        model.fuse_collection(pairs, pairs, batch_size=1)
    with pytest.raises(MemoryError, match=r"probabilities \(need_weights\)"):
        model.fuse_collection(pairs[:2], pairs[:2], need_weights=True)  # 2 x 2 heads x 2 x 20 x 20 x 8 bytes
    assert calls == []
    del model.fuse_representations
    model.fuse_collection(pairs[:2], pairs[:2], bidirectional=False)  # 2 x 2 x 20 x 8 x 8 bytes: fits
    assert len(list(model.iter_collection(pairs, pairs, batch_size=1))) == 20  # one antibody at a time: fits


def test_results_left_on_a_gpu_are_not_held_to_the_hosts_memory():
    torch = pytest.importorskip("torch")
    from crossattn_gpu.backends.cupy_backend import CupyBackend
    from crossattn_gpu.backends.triton_backend import TritonBackend

    for backend in (TritonBackend, CupyBackend):
        assert backend.results_on_host(("numpy", None))
        assert backend.results_on_host(("torch", torch.device("cpu")))
        assert not backend.results_on_host(("torch", torch.device("cuda", 0)))
        assert not backend.results_on_host(("cupy", None))


def test_onnx_fusion_refuses_outputs_that_cannot_fit(tmp_path, tight_memory):
    pytest.importorskip("onnxruntime")
    from crossattn_gpu.export import OnnxFusion, to_onnx

    path = to_onnx(CrossAttention(8, 2, seed=0), tmp_path / "fusion.onnx", attention_weights=True)
    x = np.random.default_rng(0).standard_normal((1, 40, 8)).astype(np.float32)
    with pytest.raises(MemoryError, match=r"attention_weights_seq_to_struct .*export the model without attention "
                                          r"weights or similarities, or pass fewer examples per call"):
        OnnxFusion(path)(x, x)
    OnnxFusion(path)(x[:, :10], x[:, :10])
