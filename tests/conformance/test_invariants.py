"""Invariants every backend keeps: key order, batch independence, equal scores, masked rows, ragged,
collections, pickling."""

from __future__ import annotations

import numpy as np
import pytest

from crossattn_gpu import CrossAttention
from runnable import BACKENDS, model_for, to_backend, to_numpy
from tolerances import check_same

D, H = 12, 3


pytestmark = pytest.mark.parametrize("backend,dtype", BACKENDS)


@pytest.fixture
def setup(backend, dtype):
    return model_for(backend, CrossAttention(D, H, seed=3, backend="numpy")), dtype


def inputs(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_permuting_keys_with_their_values_changes_nothing(setup):
    model, dtype = setup
    q, k = inputs(2, 6, D), inputs(2, 9, D, seed=1)
    perm = np.random.default_rng(2).permutation(9)
    out, _ = model.multi_head_attention(to_backend(q, dtype), to_backend(k, dtype), to_backend(k, dtype))
    out_p, _ = model.multi_head_attention(to_backend(q, dtype), to_backend(k[:, perm], dtype), to_backend(k[:, perm], dtype))
    check_same(to_numpy(out), to_numpy(out_p), dtype, "key permutation")


def test_batch_elements_are_independent(setup):
    model, dtype = setup
    s, t = inputs(3, 7, D), inputs(3, 7, D, seed=1)
    t2 = t.copy()
    t2[1] = inputs(7, D, seed=5)  # change example 1 only
    a = to_numpy(model.fuse_representations(to_backend(s, dtype), to_backend(t, dtype))["fused_sequential"])
    b = to_numpy(model.fuse_representations(to_backend(s, dtype), to_backend(t2, dtype))["fused_sequential"])
    check_same(a[[0, 2]], b[[0, 2]], dtype, "examples 0 and 2")
    assert np.abs(a[1] - b[1]).max() > 1e-3


def test_equal_scores_give_the_mean_of_the_values(setup):
    model, dtype = setup
    v = inputs(2, 5, D, seed=3)
    out, weights = model.scaled_dot_product_attention(
        to_backend(np.zeros((2, 4, D)), dtype), to_backend(inputs(2, 5, D), dtype), to_backend(v, dtype),
        key_lengths=[5, 3], need_weights=True,
    )
    want = np.stack([np.broadcast_to(v[0].mean(0), (4, D)), np.broadcast_to(v[1, :3].mean(0), (4, D))])
    check_same(to_numpy(out), want, dtype, "mean of values")
    check_same(to_numpy(weights)[1, :, :3], np.full((4, 3), 1 / 3), dtype, "uniform weights")


def test_a_fully_masked_row_is_uniform(setup):
    model, dtype = setup
    mask = np.ones((4, 6))
    mask[2] = 0
    _, weights = model.multi_head_attention(
        to_backend(inputs(4, D), dtype), to_backend(inputs(6, D, seed=1), dtype), to_backend(inputs(6, D, seed=1), dtype), mask,
    )
    for head in to_numpy(weights):
        check_same(head[2], np.full(6, 1 / 6), dtype, "fully masked row")


def test_only_a_masks_zeros_mask(setup):
    """The seed's ``mask == 0``: any other value, negative, fractional or large, keeps its position, as
    True does in a boolean mask (integer masks likewise)."""
    model, dtype = setup
    s, t = to_backend(inputs(2, 5, D), dtype), to_backend(inputs(2, 6, D, seed=1), dtype)
    values = np.random.default_rng(7).choice([0.0, -1.0, 0.5, -0.25, 3.0, 1.0], size=(2, 5, 6))
    values[0, 1] = 0.0  # a fully masked row too
    want = model.fuse_representations(s, t, mask=values != 0, bidirectional=False)
    for mask in (values, (4 * values).astype(np.int8)):
        got = model.fuse_representations(s, t, mask=mask, bidirectional=False)
        for key in ("fused_sequential", "fused_structural"):
            check_same(to_numpy(got[key]), to_numpy(want[key]), dtype, f"{mask.dtype} mask: {key}")


def test_a_ragged_batch_equals_its_examples_unpadded(setup):
    model, dtype = setup
    s, t = inputs(3, 9, D), inputs(3, 7, D, seed=1)
    s_len, t_len = np.array([9, 1, 4]), np.array([2, 7, 7])
    got = model.fuse_representations(to_backend(s, dtype), to_backend(t, dtype), sequential_lengths=s_len,
                                     structural_lengths=t_len, bidirectional=False)
    for b in range(3):
        one = model.fuse_representations(to_backend(s[b, :s_len[b]], dtype), to_backend(t[b, :t_len[b]], dtype),
                                         bidirectional=False)
        check_same(to_numpy(got["fused_sequential"])[b, :s_len[b]], to_numpy(one["fused_sequential"]), dtype, f"example {b}")
        check_same(to_numpy(got["struct_similarity"])[b, :t_len[b], :t_len[b]], to_numpy(one["struct_similarity"]), dtype,
                   f"similarity {b}")
        assert not to_numpy(got["fused_sequential"])[b, s_len[b]:].any()


def test_a_collection_equals_its_antibodies_fused_alone(setup):
    """fuse_collection: lengths 1, 3, 9 and 9, in padded batches of two, each as its own call."""
    model, dtype = setup
    seq = [to_backend(inputs(n, D, seed=n), dtype) for n in (9, 1, 3, 9)]
    struct = [to_backend(inputs(n, D, seed=10 + n), dtype) for n in (2, 7, 3, 9)]
    got = model.fuse_collection(seq, struct, batch_size=2, bidirectional=False, need_weights=True, need_similarity=True)
    for i, (xs, xt) in enumerate(zip(seq, struct)):
        one = model.fuse_representations(xs, xt, bidirectional=False)
        for key in ("fused_sequential", "fused_structural", "seq_similarity", "attention_weights_struct_to_seq"):
            assert np.shape(to_numpy(got[i][key])) == np.shape(to_numpy(one[key])), f"item {i}: {key}"
            check_same(to_numpy(got[i][key]), to_numpy(one[key]), dtype, f"item {i}: {key}")


def test_strided_and_non_contiguous_inputs_are_read_correctly(setup):
    model, dtype = setup
    base = to_backend(inputs(2, 11, 3 * D, seed=4), dtype)
    seq = base[:, ::2, :D]  # every other row, a slice of the columns: neither C- nor F-contiguous
    struct = base[:, 1::2, D : 2 * D]
    assert not (seq.flags.c_contiguous if isinstance(seq, np.ndarray) else seq.is_contiguous())

    def contiguous(x):
        return np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x.contiguous()

    got = model.fuse_representations(seq, struct, bidirectional=False)
    want = model.fuse_representations(contiguous(seq), contiguous(struct), bidirectional=False)
    check_same(to_numpy(got["fused_sequential"]), to_numpy(want["fused_sequential"]), dtype, "strided inputs")


def test_byte_order_and_memory_layout_change_nothing(setup):
    model, dtype = setup
    if dtype == "bfloat16":
        pytest.skip("bfloat16 inputs are torch tensors: no byte order to choose")
    s, t = inputs(2, 7, D).astype(dtype), inputs(2, 7, D, seed=1).astype(dtype)
    want = model.fuse_representations(s, t)["fused_sequential"]
    swapped = s.astype(s.dtype.newbyteorder())  # the same values, big-endian on this machine
    strided = np.asfortranarray(t)
    got = model.fuse_representations(swapped, strided)["fused_sequential"]
    # a BLAS may sum a Fortran-ordered operand in another order: rounding, nothing more
    check_same(to_numpy(got), to_numpy(want), dtype, "byte order and layout")


def test_a_pickled_model_computes_what_the_model_computes(setup):
    """Pickled (for ``multiprocessing``) after a call: the backend's sessions and device arrays stay
    behind, and the copy prepares its own."""
    import pickle

    model, dtype = setup
    s, t = to_backend(inputs(2, 6, D), dtype), to_backend(inputs(2, 6, D, seed=1), dtype)
    want = to_numpy(model.fuse_representations(s, t)["bidirectional_fusion"])
    clone = pickle.loads(pickle.dumps(model))
    assert repr(clone) == repr(model)
    check_same(to_numpy(clone.fuse_representations(s, t)["bidirectional_fusion"]), want, dtype, "pickled model")
