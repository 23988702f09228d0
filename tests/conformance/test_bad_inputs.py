"""One catalogue of bad inputs, given to every backend: the same exception type and a message that
names the problem, and no poisoned state afterwards (the next good call is still right)."""

from __future__ import annotations

import numpy as np
import pytest

from crossattn_gpu import CrossAttention
from runnable import BACKENDS, NOT_RUN, backend_options, model_for

D = 8
rng = np.random.default_rng(0)
S, T = rng.standard_normal((2, 5, D)), rng.standard_normal((2, 5, D))


def nan_at(x):
    x = x.copy()
    x[0, 0, 0] = np.nan
    return x


def inf_at(x):
    x = x.copy()
    x[1, 2, 3] = -np.inf
    return x


class DeviceArray:  # anything that says it lives on a GPU
    __cuda_array_interface__ = {"shape": (5, D), "typestr": "<f4", "data": (0, False), "version": 3}


# (id, method, args, kwargs, exception, message)
CATALOGUE = [
    ("rank-1", "fuse_representations", (S[0, 0], T[0]), {}, ValueError, "rank 1"),
    ("rank-0", "fuse_representations", (np.float64(1.0), T[0]), {}, ValueError, r"rank 0 with shape \(\)"),
    ("rank-4", "fuse_representations", (S[None], T[None]), {}, ValueError, "rank 4"),
    ("wrong-D", "fuse_representations", (S[..., :7], T), {}, ValueError, "last dimension 7"),
    ("int-dtype", "fuse_representations", (S.astype(np.int32), T), {}, TypeError, "floating point"),
    ("bool-dtype", "fuse_representations", (S > 0, T), {}, TypeError, "floating point"),
    ("complex", "fuse_representations", (S + 1j, T), {}, TypeError, "complex"),
    ("strings", "fuse_representations", (np.full((5, D), "a"), T[0]), {}, TypeError, "floating point|numeric"),
    ("ragged-list", "fuse_representations", ([[1.0, 2.0], [3.0]], T[0]), {}, (TypeError, ValueError), "array|inhomogeneous|numeric"),
    ("none", "fuse_representations", (None, T[0]), {}, TypeError, "numeric array; got NoneType"),
    ("empty-L", "fuse_representations", (S[:, :0], T), {}, ValueError, "empty axis L"),
    ("empty-B", "fuse_representations", (S[:0], T[:0]), {}, ValueError, "empty axis B .* needs B >= 1"),
    ("nan", "fuse_representations", (nan_at(S), T), {}, ValueError, "contains NaN"),
    ("inf", "fuse_representations", (S, inf_at(T)), {}, ValueError, "contains Inf"),
    ("mixed-rank", "fuse_representations", (S, T[0]), {}, ValueError, "all be"),
    ("batch-mismatch", "fuse_representations", (S, np.concatenate([T, T])), {}, ValueError, "batch sizes differ"),
    ("unequal-L-bidirectional", "fuse_representations", (S, T[:, :4]), {}, ValueError, "Ls == Lt"),
    ("mask-shape", "fuse_representations", (S, T), {"mask": np.ones((4, 5))}, ValueError, "does not broadcast"),
    ("mask-rank", "fuse_representations", (S, T), {"mask": np.ones((1, 2, 5, 5))}, ValueError, "mask has rank 4"),
    ("mask-nan", "fuse_representations", (S, T), {"mask": np.full((5, 5), np.nan)}, ValueError, "mask contains NaN"),
    ("lengths-too-long", "fuse_representations", (S, T), {"sequential_lengths": [5, 6]}, ValueError, "must lie in 1..5"),
    ("lengths-zero", "fuse_representations", (S, T), {"sequential_lengths": [0, 5]}, ValueError, "must lie in 1..5"),
    ("lengths-negative", "fuse_representations", (S, T), {"structural_lengths": [-2, 5]}, ValueError, "must lie in 1..5"),
    ("lengths-float", "fuse_representations", (S, T), {"sequential_lengths": [5.0, 4.0]}, TypeError, "integer array"),
    ("lengths-past-64-bits", "fuse_representations", (S, T), {"sequential_lengths": [2**70, 5]}, TypeError, "past 64 bits"),
    ("lengths-shape", "fuse_representations", (S, T), {"sequential_lengths": [5]}, ValueError, r"shape \(2,\)"),
    ("lengths-unbatched", "fuse_representations", (S[0], T[0]), {"sequential_lengths": [5]}, ValueError, "applies to batched"),
    ("lengths-differ-bidirectional", "fuse_representations", (S, T), {"sequential_lengths": [5, 4]}, ValueError, "example 1 has 4 and 5"),
    ("device-array", "fuse_representations", (DeviceArray(), T[0]), {}, TypeError, "on a GPU|CuPy|numeric"),
    ("masked-array", "fuse_representations", (np.ma.masked_greater(S, 1.0), T), {}, TypeError, "masked array with masked entries"),
    ("need-weights-string", "fuse_representations", (S, T), {"need_weights": "no"}, TypeError, "need_weights must be True or False"),
    ("bidirectional-none", "fuse_representations", (S, T), {"bidirectional": None}, TypeError, "bidirectional must be True or False"),
    ("need-similarity-int", "fuse_representations", (S, T), {"need_similarity": 0}, TypeError, "need_similarity must be True or False"),
    ("mha-need-weights-list", "multi_head_attention", (S, T, T), {"need_weights": []}, TypeError, "need_weights must be True or False"),
    ("keys-values-length", "multi_head_attention", (S, T, T[:, :4]), {}, ValueError, "same length"),
    ("sdpa-keys-width", "scaled_dot_product_attention", (S, T[..., :3], T), {}, ValueError, "keys has last dimension 3"),
]
if np.dtype(np.longdouble).itemsize > 8:  # x86's 80-bit long double (elsewhere it may be float64 itself)
    CATALOGUE.append(("long-double", "fuse_representations", (S.astype(np.longdouble), T), {}, TypeError,
                      "floating point .* got dtype float(96|128)"))


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("name,method,args,kwargs,error,message", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(backend, dtype, name, method, args, kwargs, error, message):
    if dtype == "bfloat16":
        pytest.skip("the catalogue uses NumPy inputs")
    ref = CrossAttention(D, 2, seed=0, backend="numpy")
    model, fresh = model_for(backend, ref), model_for(backend, ref)
    with pytest.raises(error, match=message):
        getattr(model, method)(*args, **kwargs)
    # no poisoned state: the next good call gives exactly what a fresh object gives
    good = (S.astype(dtype), T.astype(dtype))
    after = model.fuse_representations(*good)["fused_sequential"]
    np.testing.assert_array_equal(after, fresh.fuse_representations(*good)["fused_sequential"])


#: Where the exported model's messages differ from CrossAttention's (its D is named as in its metadata).
EXPORTED_MESSAGES = {"wrong-D": "has width 7, but the model has D=8", "device-array": "on a GPU, but OnnxFusion takes host"}
#: The catalogue's entries for OnnxFusion: fuse_representations' with the keywords it takes (its outputs
#: are fixed when it is exported).
EXPORTED_CATALOGUE = [entry for entry in CATALOGUE if entry[1] == "fuse_representations"
                      and set(entry[3]) <= {"mask", "sequential_lengths", "structural_lengths"}]


@pytest.fixture(scope="module")
def exported_path(tmp_path_factory):
    if NOT_RUN.get("onnx-float32") is not None:
        pytest.skip(NOT_RUN["onnx-float32"])
    from crossattn_gpu.export import to_onnx

    return to_onnx(CrossAttention(D, 2, seed=0), tmp_path_factory.mktemp("exported") / "fusion.onnx", mask=True)


@pytest.mark.parametrize("name,method,args,kwargs,error,message", EXPORTED_CATALOGUE, ids=[c[0] for c in EXPORTED_CATALOGUE])
def test_bad_input_to_the_exported_model(exported_path, name, method, args, kwargs, error, message):
    """The same catalogue given to the deployed model, ``to_onnx`` then ``OnnxFusion``."""
    from crossattn_gpu.export import OnnxFusion

    fusion, fresh = OnnxFusion(exported_path), OnnxFusion(exported_path)
    with pytest.raises(error, match=EXPORTED_MESSAGES.get(name, message)):
        fusion(*args, **kwargs)
    after = fusion(S, T)["fused_sequential"]
    np.testing.assert_array_equal(after, fresh(S, T)["fused_sequential"])


def test_the_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 20


@pytest.mark.parametrize("seed,error", [("abc", TypeError), (-1, ValueError), (2**32, ValueError), (1.5, TypeError)])
def test_bad_seeds_are_named(seed, error):
    with pytest.raises(error, match=r"seed must be None or an integer in 0\.\.2\*\*32 - 1"):
        CrossAttention(D, 2, seed=seed, backend="numpy")


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_bad_weights_files(tmp_path, backend, dtype):
    np.savez(tmp_path / "short.npz", query_weights=np.zeros((2, D, D)))
    with pytest.raises(ValueError, match="missing key_weights"):
        CrossAttention.load(tmp_path / "short.npz", **backend_options(backend))
    w = CrossAttention(D, 2, seed=0).get_attention_weights()
    np.savez(tmp_path / "shape.npz", **{**w, "output_weights": np.zeros((D, D))})
    with pytest.raises(ValueError, match=r"output_weights .* must have shape \(16, 8\)"):
        CrossAttention.load(tmp_path / "shape.npz", **backend_options(backend))
