"""Saving and loading weights: safetensors and npz, never pickle, every array checked."""

import json
import os
import re
import struct

import numpy as np
import pytest
from damaged_npz import DAMAGES, RAISES, write_damaged, write_with_false_shape

from crossattn_gpu import CrossAttention
from crossattn_gpu.weights import WEIGHT_NAMES


@pytest.fixture
def model():
    return CrossAttention(6, 3, seed=4)


@pytest.mark.parametrize("name", ["w.safetensors", "w.npz"])
def test_round_trip(tmp_path, model, name):
    path = tmp_path / name
    model.save(path)
    loaded = CrossAttention.load(path, backend="numpy", dtype="float32")
    assert (loaded.embedding_dim, loaded.attention_heads, loaded.dtype) == (6, 3, "float32")
    for key, value in model.get_attention_weights().items():
        assert np.array_equal(getattr(loaded, key), value)


@pytest.mark.parametrize("name,writer", [("w.safetensors", "crossattn_gpu.weights._write_safetensors"),
                                         ("w.npz", "numpy.savez")])
def test_an_interrupted_save_leaves_the_previous_file_whole(tmp_path, model, monkeypatch, name, writer):
    """Saving over last epoch's weights and stopped half-way (Ctrl-C, a full disk) had left a truncated
    file in their place."""
    path = tmp_path / name
    model.save(path)

    def interrupted(f, *args, **kwargs):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, interrupted)
    with pytest.raises(KeyboardInterrupt):
        CrossAttention(6, 3, seed=5).save(path)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no partial file left either
    for key, value in CrossAttention.load(path).get_attention_weights().items():
        assert np.array_equal(value, model.get_attention_weights()[key])


def test_safetensors_files_interoperate_with_the_safetensors_package(tmp_path, model):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    ours = tmp_path / "ours.safetensors"
    model.save(ours)
    read_back = safetensors_numpy.load_file(str(ours))
    assert np.array_equal(read_back["output_weights"], model.output_weights)
    theirs = tmp_path / "theirs.safetensors"
    safetensors_numpy.save_file({k: v.astype(np.float32) for k, v in model.get_attention_weights().items()}, str(theirs))
    loaded = CrossAttention.load(theirs)
    assert np.array_equal(loaded.key_weights, model.key_weights.astype(np.float32))


def write_safetensors(path, header: dict, data: bytes):
    write_safetensors_text(path, json.dumps(header), data)


def write_safetensors_text(path, header: str, data: bytes):
    encoded = header.encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def test_bfloat16_safetensors_are_read(tmp_path, model):
    arrays = {k: v.astype(np.float32) for k, v in model.get_attention_weights().items()}
    header, blob = {}, b""
    for k, v in arrays.items():
        bits = (v.view(np.uint32) >> 16).astype("<u2").tobytes()  # truncate to bfloat16
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [len(blob), len(blob) + len(bits)]}
        blob += bits
    path = tmp_path / "bf16.safetensors"
    write_safetensors(path, header, blob)
    loaded = CrossAttention.load(path)
    assert np.allclose(loaded.query_weights, model.query_weights, rtol=1e-2, atol=1e-3)


def test_missing_extra_and_misshapen_arrays_are_named(tmp_path, model):
    weights = model.get_attention_weights()
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in weights.items() if k != "key_weights"})
    with pytest.raises(ValueError, match="missing key_weights"):
        CrossAttention.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "extra.npz", **weights, bias=np.zeros(6))
    with pytest.raises(ValueError, match="unexpected bias"):
        CrossAttention.load(tmp_path / "extra.npz")
    np.savez(tmp_path / "shape.npz", **{**weights, "value_weights": np.zeros((3, 6, 5))})
    with pytest.raises(ValueError, match=r"value_weights in .*shape.npz must have shape \(3, 6, 6\)"):
        CrossAttention.load(tmp_path / "shape.npz")
    np.savez(tmp_path / "dtype.npz", **{**weights, "output_weights": np.zeros((18, 6), dtype=np.int32)})
    with pytest.raises(TypeError, match="output_weights .* real floating-point"):
        CrossAttention.load(tmp_path / "dtype.npz")


def test_load_names_an_unknown_keyword_before_reading_the_file(tmp_path):
    with pytest.raises(TypeError, match=r"CrossAttention.load\(\) got unexpected keyword arguments: heads, seed"):
        CrossAttention.load(tmp_path / "not-there.npz", seed=0, heads=2)  # not FileNotFoundError: never read


def test_pickled_npz_is_refused(tmp_path, model):
    weights = model.get_attention_weights()
    np.savez(tmp_path / "pickled.npz", **{**weights, "query_weights": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="not a readable npz weights file"):
        CrossAttention.load(tmp_path / "pickled.npz")


def test_metadata_must_agree_with_arrays(tmp_path, model):
    path = tmp_path / "w.safetensors"
    model.save(path)
    blob = path.read_bytes()
    patched = blob.replace(b'"attention_heads":"3"', b'"attention_heads":"4"')
    path.write_bytes(patched)
    with pytest.raises(ValueError, match="metadata says attention_heads=4 but the arrays have 3"):
        CrossAttention.load(path)


@pytest.mark.parametrize(
    "mangle,message",
    [
        (lambda b: b[:5], "shorter than the 8-byte header length"),
        (lambda b: b[:-10], "inconsistent shape"),
        (lambda b: struct.pack("<Q", 10**12) + b[8:], "header length"),
        (lambda b: b[:8] + b"\xff" * 20 + b[28:], "header is not JSON"),
        (lambda b: b"PK\x03\x04" + b[4:], "not a readable npz"),
        (lambda b: b"", "shorter than"),
    ],
)
def test_corrupt_files_give_clear_errors(tmp_path, model, mangle, message):
    path = tmp_path / "w.safetensors"
    model.save(path)
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        CrossAttention.load(path)


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_npz_weights_are_named(tmp_path, model, damage):
    path = write_damaged(tmp_path / "w.npz", model.get_attention_weights(), damage)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a readable npz weights file") as caught:
        CrossAttention.load(path)
    assert type(caught.value.__cause__) is RAISES[damage]


def test_npz_weights_whose_header_promises_other_data_are_refused_before_reading(tmp_path, model):
    path = write_with_false_shape(tmp_path / "w.npz", model.get_attention_weights(), "key_weights", (10**11, 6, 6))
    message = "member 'key_weights.npy': its header promises shape (100000000000, 6, 6) of float64"
    with pytest.raises(ValueError, match=re.escape(message)):  # not MemoryError: 26 TiB asked of NumPy
        CrossAttention.load(path)


def test_npz_weights_holding_a_name_twice_are_refused(tmp_path, model):
    import io
    import zipfile

    weights = model.get_attention_weights()
    with zipfile.ZipFile(tmp_path / "w.npz", "w") as npz:
        for name, array in [*weights.items(), ("key_weights", 2 * weights["key_weights"])]:
            member = io.BytesIO()
            np.lib.format.write_array(member, array)
            member_name = f"{name}.npy" if f"{name}.npy" not in npz.namelist() else name  # two names, one id
            npz.writestr(member_name, member.getvalue())
    with pytest.raises(ValueError, match="w.npz is not a readable npz weights file: key_weights appears twice"):
        CrossAttention.load(tmp_path / "w.npz")


def test_damaged_safetensors_are_refused_not_loaded(tmp_path, model):
    """safetensors has no checksum: ``save`` stores the data's CRC-32 in the metadata and ``load``
    checks it. Single bits flipped anywhere: each copy is refused, or loads the very same weights."""
    path = tmp_path / "w.safetensors"
    model.save(path)
    raw = path.read_bytes()
    rng = np.random.default_rng(11)
    refused = 0
    for position in rng.choice(len(raw), size=150, replace=False):
        damaged = bytearray(raw)
        damaged[position] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(damaged))
        try:
            loaded = CrossAttention.load(path)
        except ValueError:
            refused += 1
            continue
        for name, array in model.get_attention_weights().items():
            assert np.array_equal(getattr(loaded, name), array), f"byte {position} changed: {name} loaded changed"
    assert refused >= 140


def test_a_weight_changed_in_the_file_is_named(tmp_path, model):
    path = tmp_path / "w.safetensors"
    model.save(path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # the last byte of output_weights
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="w.safetensors is not a valid safetensors or npz weights file: its data "
                                         "does not match the data_crc32 stored when it was saved: the file is damaged"):
        CrossAttention.load(path)


def test_files_saved_without_a_crc_still_load(tmp_path, model):
    """Files of other tools, and of crossattn_gpu before it stored the CRC-32, have none to check."""
    weights = model.get_attention_weights()
    header, blob = {"__metadata__": {"format": "crossattn_gpu", "version": "0.1.0"}}, b""
    for name, array in weights.items():
        header[name] = {"dtype": "F64", "shape": list(array.shape), "data_offsets": [len(blob), len(blob) + array.nbytes]}
        blob += array.astype("<f8").tobytes()
    write_safetensors(tmp_path / "w.safetensors", header, blob)
    loaded = CrossAttention.load(tmp_path / "w.safetensors")
    assert all(np.array_equal(getattr(loaded, name), array) for name, array in weights.items())


def test_a_header_longer_than_the_cap_is_refused_before_it_is_parsed(tmp_path, model, monkeypatch):
    from crossattn_gpu import weights

    path = tmp_path / "w.safetensors"
    model.save(path)
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    monkeypatch.setattr(weights, "_MAX_HEADER_BYTES", header_len - 1)
    message = f"header length {header_len} exceeds the {header_len - 1} bytes a weights header may take"
    with pytest.raises(ValueError, match=message):
        CrossAttention.load(path)


def test_saved_safetensors_data_is_8_byte_aligned(tmp_path):
    """The header is padded with spaces so that the data starts 8-byte aligned (float64 arrays read in
    place), whatever the metadata's length."""
    for width in (1, 2, 3, 5, 8):
        path = tmp_path / f"w{width}.safetensors"
        CrossAttention(width, 1, seed=0).save(path)
        (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert (8 + header_len) % 8 == 0, width


def test_header_with_wrong_dtype_or_offsets(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"query_weights": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(ValueError, match="dtype I32"):
        CrossAttention.load(tmp_path / "a.safetensors")
    write_safetensors(tmp_path / "b.safetensors", {"query_weights": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 8)
    with pytest.raises(ValueError, match="inconsistent"):
        CrossAttention.load(tmp_path / "b.safetensors")
    write_safetensors(tmp_path / "c.safetensors", {"query_weights": [1, 2]}, b"")
    with pytest.raises(ValueError, match="lacks dtype"):
        CrossAttention.load(tmp_path / "c.safetensors")
    write_safetensors(tmp_path / "d.safetensors", [1, 2], b"")
    with pytest.raises(ValueError, match="header is not a JSON object"):
        CrossAttention.load(tmp_path / "d.safetensors")
    write_safetensors(tmp_path / "e.safetensors", {"__metadata__": ["embedding_dim", 4]}, b"")
    with pytest.raises(ValueError, match="__metadata__ is not a JSON object"):
        CrossAttention.load(tmp_path / "e.safetensors")


@pytest.mark.parametrize("shape,offsets,message", [
    ([2.0], [0, 8], "lacks dtype, shape or data_offsets as integers"),  # int() would have taken 2.9 as 2
    (["2"], [0, 8], "as integers"),
    ([True, 8], [0, 32], "as integers"),
    ([2], [0, "1e999"], "as integers"),  # json reads 1e999 as infinity, which int() cannot convert
    ([2], [0, 8, 16], "as integers"),
    ([2**32, 2**32], [0, 0], r"inconsistent shape \[4294967296, 4294967296\]"),  # 2**64 elements, 0 in int64
    ([-2, -4], [0, 32], r"inconsistent shape \[-2, -4\]"),  # a count that matches the data, from negative sizes
])
def test_shapes_and_offsets_must_be_exact_integers(tmp_path, shape, offsets, message):
    path = tmp_path / "w.safetensors"
    header = json.dumps({"query_weights": {"dtype": "F32", "shape": shape, "data_offsets": offsets}})
    write_safetensors_text(path, header.replace('"1e999"', "1e999"), b"\0" * 32)
    with pytest.raises(ValueError, match=message):
        CrossAttention.load(path)


def test_saving_over_a_folder_or_into_none_names_the_path(tmp_path, model):
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match=f"is a folder; name a file to write: '{re.escape(str(tmp_path))}/folder'"):
        model.save(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match=f"no such folder to write into: '{re.escape(str(tmp_path))}/none'"):
        model.save(tmp_path / "none" / "w.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


@pytest.mark.parametrize("name", ["w.safetensors", "w.npz"])
def test_a_bytes_path_loads(tmp_path, model, name):
    model.save(tmp_path / name)
    loaded = CrossAttention.load(os.fsencode(tmp_path / name))
    assert np.array_equal(loaded.value_weights, model.value_weights)


@pytest.mark.parametrize("query", ["abc", None, np.ones((3, 6, 6), dtype=np.int32)])
def test_query_weights_that_are_not_floats_are_named_before_their_shape(model, query):
    weights = model.get_attention_weights()
    with pytest.raises(TypeError, match="query_weights must be a real floating-point array; got dtype"):
        CrossAttention.from_weights(query, weights["key_weights"], weights["value_weights"], weights["output_weights"])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        CrossAttention.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", ["w.safetensors", "w.npz"])
def test_load_checks_each_array_once_and_names_the_file(tmp_path, model, monkeypatch, name):
    from crossattn_gpu import attention, weights

    checked = []
    monkeypatch.setattr(attention, "check_weight_set", lambda arrays, source="": checked.append(source)
                        or weights.check_weight_set(arrays, source))
    path = tmp_path / name
    model.save(path)
    CrossAttention.load(path)
    assert checked == [str(path)]  # a load had checked (and copied) every array twice: 0.47 s at D = 1280, H = 8
    bad = model.get_attention_weights()
    bad["value_weights"] = bad["value_weights"].copy()
    bad["value_weights"][1, 2, 3] = np.nan
    np.savez(tmp_path / "nan.npz", **bad)
    with pytest.raises(ValueError, match=r"value_weights in .*nan.npz contains NaN or Inf"):
        CrossAttention.load(tmp_path / "nan.npz")


def test_weights_digest_is_sha256_of_names_shapes_and_float64_bytes(model):
    import hashlib

    from crossattn_gpu.weights import weights_digest

    weights = model.get_attention_weights()
    want = hashlib.sha256()
    for name in WEIGHT_NAMES:
        data = np.ascontiguousarray(weights[name], dtype="<f8")
        want.update(f"{name}{data.shape}".encode() + data.tobytes())
    assert weights_digest(weights) == want.hexdigest()  # exported models carry it: the format must not drift
    other_layouts = {k: np.asfortranarray(v).astype(">f8") for k, v in weights.items()}
    assert weights_digest(other_layouts) == want.hexdigest()


def test_torch_tensors_give_their_values_parameters_included(model):
    """``from_weights`` and assignment take torch tensors, parameters that require grad too: the model
    keeps a float64 copy of their values (bfloat16 widened exactly); what cannot be read is named."""
    torch = pytest.importorskip("torch")
    arrays = model.get_attention_weights()
    params = [torch.nn.Parameter(torch.from_numpy(np.array(arrays[n]))) for n in WEIGHT_NAMES]
    copy = CrossAttention.from_weights(*params, backend="numpy")
    for name in WEIGHT_NAMES:
        np.testing.assert_array_equal(getattr(copy, name), arrays[name])
    halves = CrossAttention.from_weights(*(p.detach().bfloat16() for p in params), backend="numpy")
    np.testing.assert_array_equal(halves.key_weights, params[1].detach().bfloat16().double().numpy())
    copy.value_weights = params[2] * 2  # a result that requires grad
    np.testing.assert_array_equal(copy.value_weights, 2 * arrays["value_weights"])
    with pytest.raises(TypeError, match="query_weights could not be read as an array: .*meta"):
        CrossAttention.from_weights(params[0].to("meta"), *params[1:], backend="numpy")
