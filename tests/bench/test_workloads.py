"""Workload definitions and the FLOP count of the direct formulation."""

import numpy as np

from bench.workloads import WORKLOADS, Workload


def test_the_issue_workloads():
    shapes = {n: (w.batch, w.len_s, w.len_t, w.width, w.heads) for n, w in WORKLOADS.items()}
    assert shapes["W1"] == (1, 10, 10, 64, 2)
    assert shapes["W2"] == (512, 256, 256, 128, 4)
    assert shapes["W3"] == (64, 256, 256, 1280, 8)
    assert shapes["W4"] == (4, 4096, 4096, 256, 4)
    assert shapes["W2c"][0] == 64 and shapes["W3c"][0] == 4
    lengths, _ = WORKLOADS["W5"].lengths()
    assert len(lengths) == 512 and lengths.min() >= 200 and lengths.max() <= 256


def test_flops_by_hand_for_the_seed_demo():
    # per direction: Q, K, V projections 2*L*D*HD each, scores and P@V 2*H*L*L*D each, output 2*L*HD*D
    d, hd, length, heads = 64, 128, 10, 2
    per_direction = 3 * 2 * length * d * hd + 2 * 2 * heads * length * length * d + 2 * length * hd * d
    assert WORKLOADS["W1"].flops() == 2 * per_direction


def test_ragged_flops_count_only_real_rows():
    ragged = Workload("r", "", 3, 8, 8, 4, 2, ragged=(2, 8))
    lengths, _ = ragged.lengths()
    total = sum(Workload("one", "", 1, int(n), int(n), 4, 2).flops() for n in lengths)
    assert np.isclose(ragged.flops(), total)


def test_inputs_are_independent_copies():
    pairs = WORKLOADS["W1"].inputs(copies=3)
    assert len(pairs) == 3 and pairs[0][0].shape == (1, 10, 64)
    assert not np.array_equal(pairs[0][0], pairs[1][0])
