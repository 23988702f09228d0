"""Length bucketing and the progress bar of crossattn_gpu.fuse_files."""

import contextlib
import io
import os
import re

import numpy as np
import pytest
from damaged_npz import DAMAGES, RAISES, write_damaged, write_with_false_shape

from crossattn_gpu import CrossAttention
from crossattn_gpu.fuse_files import Progress, fuse_collections


def test_progress_bar_draws_and_finishes_with_a_newline():
    stream = io.StringIO()
    bar = Progress(4, enabled=True, stream=stream)
    bar.advance(2)
    bar.advance(2)
    text = stream.getvalue()
    assert "2/4 antibodies" in text and text.endswith("4/4 antibodies, " + text.rsplit(", ", 1)[1])
    assert text.endswith("\n")


def test_batch_size_does_not_change_results():
    rng = np.random.default_rng(0)
    seq = {f"id{i}": rng.standard_normal((n, 4)) for i, n in enumerate([1, 7, 3, 7, 2])}
    struct = {k: rng.standard_normal(v.shape) for k, v in seq.items()}
    model = CrossAttention(4, 2, seed=0, backend="numpy")
    one = dict(fuse_collections(model, seq, struct, batch_size=1))
    many = dict(fuse_collections(model, seq, struct, batch_size=5))
    assert one.keys() == many.keys()
    for key in one:
        np.testing.assert_allclose(one[key], many[key], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        dict(fuse_collections(model, seq, struct, batch_size=0))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_embedding_file_reads_headers_first_and_arrays_when_asked(tmp_path, save):
    from crossattn_gpu.fuse_files import EmbeddingFile

    arrays = {"ab1": np.arange(12.0).reshape(3, 4), "ab2": np.ones((5, 4), dtype=np.float32)}
    save(tmp_path / "e.npz", **arrays)
    with EmbeddingFile(tmp_path / "e.npz", "sequence") as emb:
        assert emb.shapes == {"ab1": (3, 4), "ab2": (5, 4)} and emb.dtypes == {"float64", "float32"}
        assert sorted(emb) == ["ab1", "ab2"] and len(emb) == 2
        for key, want in arrays.items():
            np.testing.assert_array_equal(emb[key], want)


@pytest.mark.parametrize(
    "arrays,error,message",
    [
        ({"a": np.ones(4)}, ValueError, "id 'a' has shape (4,); each id needs an (L, D) array"),
        ({}, ValueError, "holds no arrays"),
        ({"a": np.ones((2, 3), dtype=int)}, TypeError, "id 'a' has dtype int64; embeddings must be floating point"),
        ({"a": np.array([[object()]])}, TypeError, "id 'a' has dtype object"),  # pickled objects are never loaded
    ],
)
def test_embedding_file_errors(tmp_path, arrays, error, message):
    from crossattn_gpu.fuse_files import EmbeddingFile

    np.savez(tmp_path / "e.npz", **arrays)
    with pytest.raises(error, match=re.escape(message)):
        with EmbeddingFile(tmp_path / "e.npz", "sequence") as emb:
            [emb[key] for key in emb]


def test_fuse_collections_reads_one_batch_at_a_time():
    """Arrays are read when their batch runs: after the first batch's outputs, only its ids were read."""
    rng = np.random.default_rng(1)
    lengths = {"a": 9, "b": 2, "c": 8, "d": 3}

    class Counting(dict):
        def __init__(self, *args):
            super().__init__(*args)
            self.read = []

        def __getitem__(self, key):
            self.read.append(key)
            return super().__getitem__(key)

    seq = Counting({k: rng.standard_normal((n, 4)) for k, n in lengths.items()})
    struct = Counting({k: rng.standard_normal((n, 4)) for k, n in lengths.items()})
    pairs = fuse_collections(CrossAttention(4, 1, seed=0, backend="numpy"), seq, struct, batch_size=2)
    key, _ = next(pairs)
    assert key.startswith("a/") and sorted(seq.read) == ["a", "c"] and sorted(struct.read) == ["a", "c"]
    assert len(list(pairs)) == 4 * 3 - 1


def test_npz_writer_matches_savez_and_cleans_up(tmp_path):
    from crossattn_gpu.fuse_files import NpzWriter

    arrays = {"x/fused_sequential": np.arange(6.0).reshape(2, 3), "y/fused_structural": np.ones((1, 3), np.float32)}
    with NpzWriter(tmp_path / "out") as out:  # like np.savez, the suffix is added
        for key, value in arrays.items():
            out.write(key, value)
    assert out.path == tmp_path / "out.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]
    with np.load(out.path, allow_pickle=False) as got:
        assert got.files == list(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(got[key], value)
            assert got[key].dtype == value.dtype
    with pytest.raises(RuntimeError):
        with NpzWriter(tmp_path / "failed.npz") as out:
            out.write("a", np.ones(2))
            raise RuntimeError("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_embedding_file_names_an_array_whose_data_is_corrupt(tmp_path):
    from crossattn_gpu.fuse_files import EmbeddingFile

    data = np.arange(8000.0).reshape(2000, 4)  # larger than a read of the header
    np.savez(tmp_path / "e.npz", ab7=data)
    raw = bytearray((tmp_path / "e.npz").read_bytes())
    raw[raw.find(data.tobytes()) + 30000] ^= 0xFF  # the header still reads; the data fails its CRC
    (tmp_path / "e.npz").write_bytes(bytes(raw))
    with EmbeddingFile(tmp_path / "e.npz", "structure") as emb:
        assert emb.shapes == {"ab7": (2000, 4)}
        with pytest.raises(ValueError, match="structure file .*: id 'ab7' cannot be read"):
            emb["ab7"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_embedding_file_names_a_damaged_zip(tmp_path, damage):
    from crossattn_gpu.fuse_files import EmbeddingFile

    path = write_damaged(tmp_path / "e.npz", {"ab7": np.ones((3, 4))}, damage)
    with pytest.raises(ValueError, match=f"structure file {re.escape(str(path))} is not a readable npz file") as caught:
        EmbeddingFile(path, "structure")
    assert type(caught.value.__cause__) is RAISES[damage]


@pytest.mark.parametrize("shape", [(10**11, 4), (4, 4), (2, 4)])
def test_embedding_file_refuses_a_header_that_promises_other_data_at_open(tmp_path, monkeypatch, shape):
    """Found before any batch runs, and before NumPy allocates what the header promises (1.6 TB here)."""
    from crossattn_gpu.fuse_files import EmbeddingFile

    path = write_with_false_shape(tmp_path / "e.npz", {"ab7": np.ones((3, 4), np.float32)}, "ab7", shape)
    monkeypatch.setattr(np.lib.format, "read_array", None)  # nothing is read beyond the headers
    message = f"member 'ab7.npy': its header promises shape {shape} of float32 ({shape[0] * 16} bytes) but it holds 48 bytes"
    with pytest.raises(ValueError, match=re.escape(message)):
        EmbeddingFile(path, "sequence")


@pytest.mark.parametrize("names", [("ab7.npy", "ab7.npy"), ("ab7", "ab7.npy")])
def test_embedding_file_refuses_an_id_held_twice(tmp_path, names):
    import zipfile

    from crossattn_gpu.fuse_files import EmbeddingFile

    member = io.BytesIO()
    np.lib.format.write_array(member, np.ones((3, 4)))
    with pytest.warns(UserWarning, match="Duplicate name") if names[0] == names[1] else contextlib.nullcontext():
        with zipfile.ZipFile(tmp_path / "e.npz", "w") as npz:
            for name in names:
                npz.writestr(name, member.getvalue())
    with pytest.raises(ValueError, match="sequence file .*: id 'ab7' appears twice; each id needs one array"):
        EmbeddingFile(tmp_path / "e.npz", "sequence")


def test_an_embedding_files_ids_are_matched_without_reading_arrays(tmp_path, monkeypatch):
    from crossattn_gpu.fuse_files import EmbeddingFile

    np.savez(tmp_path / "e.npz", ab1=np.ones((3, 4)), ab2=np.ones((5, 4)))
    read = []
    real = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: read.append(1) or real(*a, **k))
    with EmbeddingFile(tmp_path / "e.npz", "sequence") as seq, EmbeddingFile(tmp_path / "e.npz", "structure") as struct:
        assert "ab1" in seq and "ab3" not in seq and read == []
        pairs = fuse_collections(CrossAttention(4, 1, seed=0, backend="numpy"), seq, struct, batch_size=1)
        assert next(pairs)[0].startswith("ab2/") and len(read) == 2  # the first batch's two arrays only


def test_fuse_collections_checks_every_shape_before_running():
    model = CrossAttention(4, 1, seed=0, backend="numpy")
    seq, struct = {"a": np.ones((3, 4)), "b": np.ones(4)}, {"a": np.ones((3, 4)), "b": np.ones((2, 4))}
    with pytest.raises(ValueError, match=re.escape("id 'b': sequence embedding has shape (4,)")):
        next(fuse_collections(model, seq, struct))
    with pytest.raises(ValueError, match="id 'a': structure embedding has width 5, but the model has D=4"):
        next(fuse_collections(model, {"a": np.ones((3, 4))}, {"a": np.ones((3, 5))}))
    with pytest.raises(ValueError, match=re.escape("id 'a': structure embedding is empty (shape (0, 4)); each embedding needs L >= 1")):
        next(fuse_collections(model, {"a": np.ones((3, 4))}, {"a": np.ones((0, 4))}, bidirectional=False))


@pytest.mark.parametrize("backend", ["numpy", "onnx"])
def test_a_failed_batch_names_the_antibodies_to_look_at(backend):
    """Among thousands of antibodies, the error names those whose embeddings hold NaN or Inf (at most
    five, then a count), or the one of the largest magnitude for an input past the dtype."""
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    model = CrossAttention(4, 1, seed=0, backend=backend, dtype="float32")
    rng = np.random.default_rng(0)
    ids = [f"ab{i}" for i in range(9)]
    seq = {key: rng.standard_normal((3 + i % 3, 4)) for i, key in enumerate(ids)}
    struct = {key: rng.standard_normal((3 + i % 3, 4)) for i, key in enumerate(ids)}
    broken = dict(struct, ab4=np.where(np.eye(4) > 0, np.nan, struct["ab4"]))
    with pytest.raises(ValueError, match=r"in the batch with ids .* \(NaN or Inf in id 'ab4'\): structural_repr contains NaN"):
        list(fuse_collections(model, seq, broken))
    everywhere = {key: np.full_like(x, np.inf) for key, x in seq.items()}
    with pytest.raises(ValueError, match=r"\(NaN or Inf in ids ('ab\d', ){4}'ab\d' and 4 more\)"):
        list(fuse_collections(model, everywhere, struct))
    large = dict(seq, ab7=seq["ab7"] * 1e39)
    with pytest.raises(ValueError, match=r"\(largest magnitude .*e\+39, in id 'ab7'\): sequential_repr reaches"):
        list(fuse_collections(model, large, struct))


def test_npz_writer_refuses_a_directory_and_the_inputs(tmp_path):
    from crossattn_gpu.fuse_files import NpzWriter

    with pytest.raises(ValueError, match="is a directory; name the output npz file"):
        NpzWriter(tmp_path)
    np.savez(tmp_path / "seq.npz", a=np.ones((2, 3)))
    for given in ("seq.npz", "seq"):  # the suffix added, it is the input again
        with pytest.raises(ValueError, match="the output .*seq.npz is the sequence file itself"):
            NpzWriter(tmp_path / given, keep={"sequence file": tmp_path / "seq.npz"})
    NpzWriter(tmp_path / "out.npz", keep={"sequence file": tmp_path / "seq.npz"})  # not yet there: fine
    np.testing.assert_array_equal(np.load(tmp_path / "seq.npz")["a"], np.ones((2, 3)))


def test_two_writers_of_one_output_each_leave_a_whole_file(tmp_path):
    """Two runs given the same --out once shared one `.partial` file: the second truncated the first's,
    the first renamed a mix of both into place, and the second then failed."""
    from crossattn_gpu.fuse_files import NpzWriter

    first, second = NpzWriter(tmp_path / "out.npz"), NpzWriter(tmp_path / "out.npz")
    with first:
        first.write("a", np.arange(1000.0))
        with second:
            second.write("b", np.ones((3, 4), np.float32))
            first.write("c", np.zeros(5))
        with np.load(tmp_path / "out.npz", allow_pickle=False) as got:  # the second's, whole
            assert got.files == ["b"]
            np.testing.assert_array_equal(got["b"], np.ones((3, 4), np.float32))
    with np.load(tmp_path / "out.npz", allow_pickle=False) as got:  # then the first's, whole
        assert got.files == ["a", "c"]
        np.testing.assert_array_equal(got["a"], np.arange(1000.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_npz_writer_gives_the_output_the_usual_permissions(tmp_path):
    from crossattn_gpu.fuse_files import NpzWriter

    umask = os.umask(0o022)
    try:
        with NpzWriter(tmp_path / "out.npz") as out:
            out.write("a", np.ones(2))
    finally:
        os.umask(umask)
    assert (tmp_path / "out.npz").stat().st_mode & 0o777 == 0o644


def test_a_failure_closing_the_zip_leaves_no_partial_file(tmp_path):
    from crossattn_gpu.fuse_files import NpzWriter

    with pytest.raises(OSError, match="No space left"):
        with NpzWriter(tmp_path / "out.npz") as out:
            out.write("a", np.ones(2))
            close = out._zip.close

            def close_on_a_full_disk():
                close()
                raise OSError(28, "No space left on device")

            out._zip.close = close_on_a_full_disk
    del out._zip.close  # ZipFile.__del__ calls it again
    assert list(tmp_path.iterdir()) == []
