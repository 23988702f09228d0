"""The seed's multi-head attention and bidirectional fusion, written once for every backend.

A backend supplies four building blocks on its own arrays, in the folded formulation of
``crossattn_gpu.folding``:

* ``_project(x, weights, parts)``: every head's folded queries ('q'), values ('v') or both ('qv') of
  x (B, L, D), as (B, H, L, D) arrays;
* ``_attend(q, x_keys, v, masked, q_lengths, k_lengths, need_weights)``: the multi-head output
  (B, Lq, D), padded query rows zero, and the probabilities (B, H, Lq, Lk) or None;
* ``_zero_padded_rows(x, lengths, axis)``: a copy of x with rows past the lengths set to zero;
* ``_cosine_similarity(a, b)``: (B, La, Lb), zero rows giving 0.

and may replace ``_project_pair(xs, xt, weights)``, both inputs' queries and values (two ``_project``
calls here), to take them in one GEMM.
"""

from __future__ import annotations


class FoldedFusion:
    def multi_head_attention(self, xq, xk, xv, weights, *, masked, q_lengths, k_lengths, need_weights):
        (q,) = self._project(xq, weights, "q")
        (v,) = self._project(xv, weights, "v")
        return self._attend(q, xk, v, masked, q_lengths, k_lengths, need_weights)

    def _project_pair(self, xs, xt, weights):
        return self._project(xs, weights, "qv"), self._project(xt, weights, "qv")

    def fuse(self, xs, xt, weights, *, masked, s_lengths, t_lengths, need_weights, need_similarity):
        (qs, vs), (qt, vt) = self._project_pair(xs, xt, weights)
        fused_s, probs_st = self._attend(qs, xt, vt, masked, s_lengths, t_lengths, need_weights)
        masked_ts = None if masked is None else masked.swapaxes(-1, -2)
        fused_t, probs_ts = self._attend(qt, xs, vs, masked_ts, t_lengths, s_lengths, need_weights)
        result = {
            "fused_sequential": fused_s,
            "fused_structural": fused_t,
            "attention_weights_seq_to_struct": probs_st,
            "attention_weights_struct_to_seq": probs_ts,
        }
        if need_similarity:
            # Padded input rows may hold anything; they must not show in the similarity.
            xs = self._zero_padded_rows(xs, s_lengths, axis=1)
            xt = self._zero_padded_rows(xt, t_lengths, axis=1)
            result["seq_similarity"] = self._cosine_similarity(xs, fused_s)
            result["struct_similarity"] = self._cosine_similarity(xt, fused_t)
        return result
