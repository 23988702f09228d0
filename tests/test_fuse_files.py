"""Length bucketing and the progress bar of crossattn_gpu.fuse_files."""

import io

import numpy as np

from crossattn_gpu import CrossAttention
from crossattn_gpu.fuse_files import Progress, fuse_collections, length_batches


def test_batches_group_similar_lengths():
    lengths = {"a": 50, "b": 3, "c": 49, "d": 4, "e": 48}
    seq = {k: np.zeros((n, 2)) for k, n in lengths.items()}
    assert length_batches(sorted(seq), seq, seq, 2) == [["a", "c"], ["e", "d"], ["b"]]  # longest first


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
    one = fuse_collections(model, seq, struct, batch_size=1)
    many = fuse_collections(model, seq, struct, batch_size=5)
    assert one.keys() == many.keys()
    for key in one:
        np.testing.assert_allclose(one[key], many[key], rtol=1e-12, atol=1e-14)
