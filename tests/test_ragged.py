"""CrossAttention.fuse_collection and crossattn_gpu.ragged: antibodies of different lengths, fused in
padded batches, each with the results of a call on its own two arrays."""

import re

import numpy as np
import pytest

from crossattn_gpu import CrossAttention
from crossattn_gpu.ragged import fusion_flops, length_batches

BACKENDS = ["numpy", pytest.param("onnx", marks=pytest.mark.skipif(
    pytest.importorskip("importlib.util").find_spec("onnxruntime") is None, reason="needs the onnx extra"))]


def pairs(seq_lengths, struct_lengths, width, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    seq = [rng.standard_normal((n, width)).astype(dtype) for n in seq_lengths]
    struct = [rng.standard_normal((n, width)).astype(dtype) for n in struct_lengths]
    return seq, struct


def assert_same_results(got: dict, want: dict, rtol: float):
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value is None or isinstance(value, bool):
            assert got[key] is value, key
            continue
        values, got_values = (value, got[key]) if isinstance(value, list) else ([value], [got[key]])
        assert len(got_values) == len(values), key
        for g, w in zip(got_values, values):
            assert type(g) is type(w) and g.shape == w.shape and g.dtype == w.dtype, key
            scale = max(float(np.abs(np.asarray(w, dtype=np.float64)).max()), 1e-300)
            assert np.abs(np.asarray(g, dtype=np.float64) - np.asarray(w, dtype=np.float64)).max() <= rtol * scale, key


def test_fusion_flops_counts_the_folded_fusion():
    width, heads, len_s, len_t = 8, 3, 5, 7
    per_direction = [2 * len_q * width * heads * width + 2 * len_k * width * heads * width  # query, value projections
                     + 2 * 2 * heads * len_q * len_k * width  # scores, probabilities times values
                     for len_q, len_k in ((len_s, len_t), (len_t, len_s))]
    assert fusion_flops(len_s, len_t, width, heads) == sum(per_direction)


def test_batches_cut_by_size_in_length_order_when_padding_is_free():
    lengths = {"a": 50, "b": 3, "c": 49, "d": 4, "e": 48}
    batches = length_batches(sorted(lengths), lengths, lengths, 2, width=4, heads=1, join_flops=float("inf"))
    assert batches == [["a", "c"], ["e", "d"], ["b"]]  # longest first
    # the longer of an antibody's two lengths orders them; ties keep the given order
    seq, struct = {"x": 1, "y": 5, "z": 2, "w": 9}, {"x": 5, "y": 1, "z": 9, "w": 2}
    assert length_batches(["x", "y", "z", "w"], seq, struct, 3, width=4, heads=1, join_flops=float("inf")) == [
        ["z", "w", "x"], ["y"]]


def test_an_antibody_joins_a_batch_while_its_padding_costs_less_than_a_call():
    lengths = {"long": 100, "same": 100, "near": 99, "short": 40, "shorter": 39}
    keys = list(lengths)
    alone = length_batches(keys, lengths, lengths, 64, width=16, heads=2, join_flops=0)
    assert alone == [["long", "same"], ["near"], ["short"], ["shorter"]]  # only equal lengths share for free
    near_cost = 2 * fusion_flops(100, 100, 16, 2) - fusion_flops(99, 99, 16, 2) - fusion_flops(100, 100, 16, 2)
    assert length_batches(keys, lengths, lengths, 64, width=16, heads=2, join_flops=near_cost) == [
        ["long", "same", "near"], ["short", "shorter"]]
    assert length_batches(keys, lengths, lengths, 64, width=16, heads=2, join_flops=near_cost - 1)[0] == ["long", "same"]
    assert length_batches(keys, lengths, lengths, 2, width=16, heads=2, join_flops=float("inf")) == [
        ["long", "same"], ["near", "short"], ["shorter"]]  # and never past batch_size


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_each_antibody_gets_the_results_of_its_own_call(backend, batch_size):
    """Lq != Lk, L = 1, 3, 17, lengths repeated and not: probabilities and similarities too, in order."""
    model = CrossAttention(8, 3, seed=0, backend=backend)
    seq, struct = pairs([1, 17, 3, 17, 2, 5, 3], [4, 17, 1, 3, 17, 5, 2], 8)
    got = model.fuse_collection(seq, struct, batch_size=batch_size, bidirectional=False, need_weights=True,
                                need_similarity=True)
    assert isinstance(got, list) and len(got) == len(seq)
    for result, xs, xt in zip(got, seq, struct):
        assert_same_results(result, model.fuse_representations(xs, xt, bidirectional=False), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dicts_by_id_bidirectional_float32(backend):
    model = CrossAttention(16, 2, seed=1, backend=backend)
    seq, struct = pairs([9, 1, 30, 9], [9, 1, 30, 9], 16, dtype=np.float32)
    ids = ["ab3", "ab1", "ab0", "ab2"]
    got = model.fuse_collection(dict(zip(ids, seq)), dict(zip(reversed(ids), reversed(struct))), batch_size=2)
    assert list(got) == ids  # sequential's order
    for key, xs, xt in zip(ids, seq, struct):
        want = model.fuse_representations(xs, xt, need_weights=False, need_similarity=False)
        assert got[key]["bidirectional_fusion"].dtype == np.float32
        assert_same_results(got[key], want, rtol=1e-6)


def test_results_are_in_the_kind_and_promoted_dtype_of_the_inputs():
    torch = pytest.importorskip("torch")
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    seq, struct = pairs([3, 5, 4], [3, 5, 4], 8, dtype=np.float32)
    as_torch = [torch.from_numpy(x) for x in seq], [torch.from_numpy(x) for x in struct]
    got = model.fuse_collection(*as_torch, batch_size=2)
    for result, xs, xt in zip(got, *as_torch):
        assert_same_results(result, model.fuse_representations(xs, xt, need_weights=False, need_similarity=False), 1e-6)
    bf16 = model.fuse_collection([x.bfloat16() for x in as_torch[0]], [x.bfloat16() for x in as_torch[1]])
    assert all(r["fused_sequential"].dtype == torch.bfloat16 for r in bf16)
    # One dtype for the whole side: a float16 antibody beside float32 ones comes back in float32,
    # whichever batch it lands in.
    mixed = model.fuse_collection([seq[0].astype(np.float16), *seq[1:]], struct, batch_size=1)
    assert [r["fused_structural"].dtype for r in mixed] == [np.float32] * 3
    nested = model.fuse_collection([x.tolist() for x in seq], struct)  # array-likes read as NumPy arrays
    assert_same_results(nested[1], model.fuse_collection([x.astype(np.float64) for x in seq], struct)[1], rtol=0)


def test_iter_collection_hands_over_each_antibody_once_longest_first():
    model = CrossAttention(8, 2, seed=0, backend="numpy")
    seq, struct = pairs([3, 9, 1, 9, 5], [3, 9, 1, 9, 5], 8)
    ids = ["c", "a", "e", "b", "d"]
    pairs_out = list(model.iter_collection(dict(zip(ids, seq)), dict(zip(ids, struct)), batch_size=2))
    assert [key for key, _ in pairs_out] == ["a", "b", "d", "c", "e"]
    whole = model.fuse_collection(dict(zip(ids, seq)), dict(zip(ids, struct)), batch_size=2)
    for key, result in pairs_out:
        assert_same_results(result, whole[key], rtol=0)
    with pytest.raises(ValueError, match=re.escape("structural[1] has width 4")):  # checked before it returns
        model.iter_collection(seq[:2], [struct[0], np.ones((9, 4))])
    assert list(model.iter_collection([], [])) == []


def test_torch_tensors_are_padded_in_one_copy_as_numpy_pads_them():
    torch = pytest.importorskip("torch")
    from crossattn_gpu.ragged import Side

    rng = np.random.default_rng(3)
    arrays = {key: rng.standard_normal((n, 5)).astype(np.float32) for key, n in zip("abcd", (4, 1, 7, 2))}
    tensors = {"a": torch.from_numpy(arrays["a"]).half(),  # promoted to float32, like the rest
               "b": torch.from_numpy(arrays["b"]),
               "c": torch.from_numpy(np.asfortranarray(arrays["c"])),  # not contiguous in C order
               "d": torch.from_numpy(arrays["d"])}
    keys = ["c", "a", "d", "b"]
    want, want_lengths = Side({k: v.astype(np.float32) if k != "a" else v.astype(np.float16) for k, v in arrays.items()},
                              "{key}").pad(keys)
    got, lengths = Side(tensors, "{key}").pad(keys)
    assert got.dtype == torch.float32 and got.shape == (4, 7, 5)
    np.testing.assert_array_equal(lengths, [7, 4, 2, 1])
    np.testing.assert_array_equal(lengths, want_lengths)
    np.testing.assert_array_equal(got.numpy(), want)


def test_empty_collections_give_empty_results():
    model = CrossAttention(4, 1, seed=0, backend="numpy")
    assert model.fuse_collection([], []) == [] and model.fuse_collection({}, {}) == {}


def test_every_entry_is_checked_before_any_work():
    model = CrossAttention(4, 1, seed=0, backend="numpy")
    calls = []
    model.fuse_representations = lambda *args, **kwargs: calls.append(args)
    seq, struct = pairs([30, 2, 3], [30, 2, 3], 4)
    for bad_struct in ([*struct[:2], np.ones((3, 5))], [*struct[:2], np.ones((3, 4), dtype=int)]):
        with pytest.raises((ValueError, TypeError), match=r"structural\[2\]"):
            model.fuse_collection(seq, bad_struct, batch_size=1)
    assert calls == []


FOUR = [np.ones((2, 4))] * 2


@pytest.mark.parametrize("seq,struct,kwargs,error,message", [
    (np.ones((2, 3, 4)), np.ones((2, 3, 4)), {}, TypeError,
     "sequential and structural must be two lists (or tuples) of (L, D) arrays, or two dicts of them by id; got "
     "ndarray and ndarray. For one padded (B, L, D) batch, call fuse_representations"),
    (FOUR, {"a": FOUR[0]}, {}, TypeError, "got list and dict"),
    (FOUR, FOUR[:1], {}, ValueError, "sequential holds 2 antibodies and structural 1; each antibody needs an entry in both"),
    (FOUR[:1], FOUR, {}, ValueError, "sequential holds 1 antibody and structural 2; each antibody needs an entry in both"),
    ({"a": FOUR[0], "b": FOUR[0]}, {"b": FOUR[0], "c": FOUR[0]}, {}, ValueError,
     "both sides must hold the same antibody ids: 1 only in sequential ('a'); 1 only in structural ('c')"),
    ({f"id{i}": FOUR[0] for i in range(8)}, {"id0": FOUR[0]}, {}, ValueError,
     "both sides must hold the same antibody ids: 7 only in sequential ('id1', 'id2', 'id3', 'id4', 'id5' and 2 more)"),
    ([np.ones(4)], FOUR[:1], {}, ValueError, "sequential[0] has shape (4,); each embedding must be an (L, D) array"),
    (FOUR, [FOUR[0], np.ones((0, 4))], {"bidirectional": False}, ValueError,
     "structural[1] is empty (shape (0, 4)); each embedding needs L >= 1"),
    (FOUR, [FOUR[0], np.ones((2, 5))], {}, ValueError, "structural[1] has width 5, but the model has D=4"),
    ([FOUR[0], np.ones((3, 4))], FOUR, {}, ValueError,
     "item 1: sequence length 3 != structure length 2; bidirectional fusion needs equal lengths (bidirectional=False"),
    ({"x": np.ones((3, 4))}, {"x": FOUR[0]}, {}, ValueError, "id 'x': sequence length 3 != structure length 2"),
    ([FOUR[0], np.ones((2, 4), dtype=np.int64)], FOUR, {}, TypeError,
     "sequential[1] has dtype int64; embeddings must be floating point"),
    ([np.array([[None] * 4])], FOUR[:1], {}, TypeError, "sequential[0] must be a numeric array; got an object array"),
    (FOUR, FOUR, {"batch_size": 0}, ValueError, "batch_size must be >= 1; got 0"),
    (FOUR, FOUR, {"batch_size": 2.0}, TypeError, "batch_size must be an integer; got float"),
    (FOUR, FOUR, {"need_weights": 1}, TypeError, "need_weights must be True or False"),
    (FOUR, FOUR, {"bidirectional": "no"}, TypeError, "bidirectional must be True or False"),
])
def test_bad_collections_are_named(seq, struct, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        CrossAttention(4, 1, seed=0, backend="numpy").fuse_collection(seq, struct, **kwargs)


def test_mixed_kinds_and_grad_are_named():
    torch = pytest.importorskip("torch")
    model = CrossAttention(4, 1, seed=0, backend="numpy")
    with pytest.raises(TypeError, match=re.escape(
            "sequential[1] is a torch tensor on cpu, but sequential[0] is a numpy ndarray; the embeddings of one "
            "side must be of one kind on one device")):
        model.fuse_collection([FOUR[0], torch.ones(2, 4)], FOUR)
    with pytest.raises(TypeError, match=re.escape("structural[0] is a torch tensor that requires grad") + ".*"
                       + re.escape("pass structural[0].detach()")):
        model.fuse_collection([torch.ones(2, 4)], [torch.ones(2, 4, requires_grad=True)])


def test_device_arrays_of_other_libraries_are_refused_not_copied():
    class DeviceArray:  # what DLPack says of a GPU array (a JAX one, say)
        shape, dtype = (2, 4), np.dtype("float32")

        def __dlpack_device__(self):
            return (2, 0)  # kDLCUDA

    with pytest.raises(TypeError, match=r"sequential\[0\] is a \w+ DeviceArray on a device; a collection pads torch "
                                        r"tensors and CuPy arrays on their device"):
        CrossAttention(4, 1, seed=0, backend="numpy").fuse_collection([DeviceArray()], FOUR[:1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_batch_names_the_items_to_look_at(backend):
    model = CrossAttention(4, 1, seed=0, backend=backend, dtype="float32")
    seq, struct = pairs([3, 4, 5, 3, 4], [3, 4, 5, 3, 4], 4)
    seq[3] = np.where(np.eye(3, 4) > 0, np.nan, seq[3])
    with pytest.raises(ValueError, match=r"in the batch with items .* \(NaN or Inf in item 3\): sequential_repr contains NaN"):
        model.fuse_collection(seq, struct, batch_size=5)
    seq[3], struct[1] = seq[0], struct[1] * 1e39
    with pytest.raises(ValueError, match=r"\(largest magnitude .*e\+39, in item 1\): structural_repr reaches"):
        model.fuse_collection(seq, struct, batch_size=2)
