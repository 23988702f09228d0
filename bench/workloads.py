"""The fixed workloads, their inputs, and the FLOP count every result is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    batch: int
    len_s: int
    len_t: int
    width: int
    heads: int
    ragged: tuple[int, int] | None = None  # lengths drawn uniformly from this closed range

    def lengths(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-example lengths (the same for both modalities), fixed by a seed; None when not ragged."""
        if self.ragged is None:
            return None
        low, high = self.ragged
        lengths = np.random.default_rng(7).integers(low, high + 1, size=self.batch)
        return lengths, lengths

    def inputs(self, copies: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """``copies`` independent float64 input pairs (B, Ls, D), (B, Lt, D), standard normal."""
        rng = np.random.default_rng(seed)
        shape_s, shape_t = (self.batch, self.len_s, self.width), (self.batch, self.len_t, self.width)
        return [(rng.standard_normal(shape_s), rng.standard_normal(shape_t)) for _ in range(copies)]

    def flops(self) -> float:
        """FLOPs of the direct formulation (SPEC section 1), both directions, counting only real rows.

        Per direction with Lq query rows and Lk key rows, per example: projections of queries, keys and
        values (2 * L * D * H*D each), scores and P @ V (2 * H * Lq * Lk * D each), and the output
        projection (2 * Lq * H*D * D). Softmax and similarities are not counted.
        """
        lengths = self.lengths()
        if lengths is None:
            len_s = np.full(self.batch, self.len_s)
            len_t = np.full(self.batch, self.len_t)
        else:
            len_s, len_t = lengths
        d, hd = self.width, self.heads * self.width
        total = 0.0
        for lq, lk in ((len_s, len_t), (len_t, len_s)):
            lq, lk = lq.astype(np.float64), lk.astype(np.float64)
            projections = 2 * d * hd * (lq + 2 * lk) + 2 * lq * hd * d
            attention = 2 * 2 * self.heads * lq * lk * d
            total += float(np.sum(projections + attention))
        return total

    def io_bytes(self, itemsize: int) -> float:
        """Bytes that any implementation must move: inputs, weights and the two fused outputs."""
        d, hd = self.width, self.heads * self.width
        activations = 2 * self.batch * (self.len_s + self.len_t) * d  # read inputs, write outputs
        weights = 4 * d * hd
        return float((activations + weights) * itemsize)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("W1", "seed demo (latency)", 1, 10, 10, 64, 2),
        Workload("W2", "Fv screen", 512, 256, 256, 128, 4),
        Workload("W3", "language-model width", 64, 256, 256, 1280, 8),
        Workload("W4", "long", 4, 4096, 4096, 256, 4),
        Workload("W5", "ragged, lengths 200..256", 512, 256, 256, 128, 4, ragged=(200, 256)),
        Workload("W2c", "Fv screen, CPU scale", 64, 256, 256, 128, 4),
        Workload("W3c", "language-model width, CPU scale", 4, 256, 256, 1280, 8),
    )
}

DEFAULT_CPU = ("W1", "W2c", "W3c")
DEFAULT_GPU = ("W1", "W2", "W3", "W4", "W5")
