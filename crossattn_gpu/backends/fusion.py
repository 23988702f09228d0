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
calls here), to take them in one GEMM; ``_projects_by_direction(...)`` (here never), to project each
direction's queries and values just before its attention instead, one direction's in memory at a time;
and ``_input_similarity(x, lengths, fused)``, the similarities of x's rows (its padded rows zero) and the
fused rows (``_zero_padded_rows`` and ``_cosine_similarity`` here), to zero the padding on the way.

A large batch may run in blocks of whole examples (every example is computed on its own either way):
a backend that wants blocks returns more than one from ``_example_blocks`` and supplies
``_run_blocks`` (how the blocks run: in turn, or on worker threads) and ``_concatenate``.

A backend whose calls of one layout repeat (the front end keeps a plan per layout) opts in with
``layout_key``, and may settle its route once in ``fusion_plan``, ``attention_plan`` and ``sdpa_plan``
(``plan_settings``: what else the route depends on).
"""

from __future__ import annotations


class FoldedFusion:
    #: How float32 GEMMs may run (``kernels.contract.FLOAT32_PRECISIONS``), set by ``get_backend``: a
    #: permission, as torch's ``allow_tf32`` is. Only a backend with TF32 kernels (Triton on a GPU)
    #: uses it; the others compute IEEE float32.
    float32_precision = "ieee"

    def pending_magnitude(self, *arrays):
        """A call's inputs' largest magnitude that this backend's kernel would write itself (see
        ``TritonBackend.pending_magnitude``), handed to ``fuse`` or ``multi_head_attention`` as
        ``magnitude``: here None, never."""
        return None

    def layout_key(self, x):
        """A hashable layout of the input ``x`` (its kind, shape, strides, dtype, device) under which the front
        end keeps a plan (``CrossAttention._plan``), or None where this backend makes none for such an
        input: here never (a backend opts in)."""
        return None

    def plan_settings(self) -> tuple:
        """This backend's settings that a plan (``fusion_plan``, ``attention_plan``, ``sdpa_plan``) depends on
        besides its inputs' layout and weights."""
        return ()

    def fusion_plan(self, xs, xt, weights, *, need_weights: bool, need_similarity: bool):
        """``run(xs, xt, magnitude)``: what ``fuse`` does without mask or lengths, for inputs laid out as xs
        and xt with these weights. The front end keeps it for the next calls of that layout, which then skip
        its checks of the layout (``CrossAttention._plan``); a backend may settle its route here
        too (``TritonBackend.fusion_plan``)."""
        def run(xs, xt, magnitude):
            by_kernel = {} if magnitude is None else {"magnitude": magnitude}
            return self.fuse(xs, xt, weights, masked=None, s_lengths=None, t_lengths=None, need_weights=need_weights,
                             need_similarity=need_similarity, **by_kernel)

        return run

    def attention_plan(self, xq, xk, xv, weights, *, need_weights: bool):
        """``run(xq, xk, xv, magnitude)``: what ``multi_head_attention`` does without mask or lengths, for
        inputs laid out as xq, xk and xv with these weights, kept by the front end as ``fusion_plan``'s
        is (``TritonBackend.attention_plan`` settles its route here)."""
        def run(xq, xk, xv, magnitude):
            by_kernel = {} if magnitude is None else {"magnitude": magnitude}
            return self.multi_head_attention(xq, xk, xv, weights, masked=None, q_lengths=None, k_lengths=None,
                                             need_weights=need_weights, **by_kernel)

        return run

    def sdpa_plan(self, q, k, v, *, scale: float, need_weights: bool):
        """``run(q, k, v, magnitude)``: what ``scaled_dot_product_attention`` does without mask or lengths,
        for inputs laid out as q, k and v (``magnitude``: always None, the inputs' magnitude is reduced
        apart), kept by the front end as ``fusion_plan``'s is."""
        def run(q, k, v, magnitude):
            return self.scaled_dot_product_attention(q, k, v, scale=scale, masked=None, q_lengths=None, k_lengths=None,
                                                     need_weights=need_weights)

        return run

    def checks_lengths_late(self, lengths) -> bool:
        """Whether this backend checks these lengths' values on its device, read late (``late_lengths``),
        instead of the front end on the host: here never."""
        return False

    def multi_head_attention(self, xq, xk, xv, weights, *, masked, q_lengths, k_lengths, need_weights,
                             magnitude=None):
        """``magnitude``: as in ``fuse``, of xq, xk and xv."""
        blocks = self._example_blocks(xq.shape[0], max(xq.shape[1], xk.shape[1]), weights)
        if len(blocks) == 1:
            return self._multi_head_attention_block(xq, xk, xv, weights, masked=masked, q_lengths=q_lengths,
                                                    k_lengths=k_lengths, need_weights=need_weights,
                                                    magnitude=magnitude)
        if magnitude is not None:
            magnitude.reduce()
        batched = dict(xq=xq, xk=xk, xv=xv, masked=masked, q_lengths=q_lengths, k_lengths=k_lengths)
        return self._in_example_blocks(self._multi_head_attention_block, blocks, weights, batched,
                                       need_weights=need_weights)

    def fuse(self, xs, xt, weights, *, masked, s_lengths, t_lengths, need_weights, need_similarity, magnitude=None):
        """``magnitude``: this backend's ``pending_magnitude`` of xs and xt, which a block's kernel may
        write; any other route reduces it once its first work (the projections) is queued."""
        blocks = self._example_blocks(xs.shape[0], max(xs.shape[1], xt.shape[1]), weights)
        if len(blocks) == 1:
            return self._fuse_block(xs, xt, weights, masked=masked, s_lengths=s_lengths, t_lengths=t_lengths,
                                    need_weights=need_weights, need_similarity=need_similarity, magnitude=magnitude)
        if magnitude is not None:
            magnitude.reduce()
        batched = dict(xs=xs, xt=xt, masked=masked, s_lengths=s_lengths, t_lengths=t_lengths)
        return self._in_example_blocks(self._fuse_block, blocks, weights, batched,
                                       need_weights=need_weights, need_similarity=need_similarity)

    # --- one block of examples ----------------------------------------------------------------------

    def _multi_head_attention_block(self, xq, xk, xv, weights, *, masked, q_lengths, k_lengths, need_weights,
                                    magnitude=None):
        return self._direction(xq, xk, xv, weights, masked, q_lengths, k_lengths, need_weights, magnitude)

    def _direction(self, xq, xk, xv, weights, masked, q_lengths, k_lengths, need_weights, magnitude=None):
        """One multi-head attention from its inputs: xq's folded queries, xv's folded values, xk the keys.
        Its projections are dropped when it returns."""
        (q,) = self._project(xq, weights, "q")
        (v,) = self._project(xv, weights, "v")
        if magnitude is not None:  # after the projections' launch, as in _fuse_block
            magnitude.reduce()
        return self._attend(q, xk, v, masked, q_lengths, k_lengths, need_weights)

    def _project_pair(self, xs, xt, weights):
        return self._project(xs, weights, "qv"), self._project(xt, weights, "qv")

    def _projects_by_direction(self, xs, xt, weights, masked, need_weights) -> bool:
        """Whether a fusion projects each direction's queries and values just before its attention
        (``_direction``), so that one direction's projections are in memory at a time, instead of both
        inputs' queries and values at once (``_project_pair``: fewer, wider GEMMs). Here never."""
        return False

    def _fuse_block(self, xs, xt, weights, *, masked, s_lengths, t_lengths, need_weights, need_similarity,
                    magnitude=None):
        masked_ts = None if masked is None else masked.swapaxes(-1, -2)
        if self._projects_by_direction(xs, xt, weights, masked, need_weights):
            seq_to_struct = self._direction(xs, xt, xt, weights, masked, s_lengths, t_lengths, need_weights, magnitude)
            struct_to_seq = self._direction(xt, xs, xs, weights, masked_ts, t_lengths, s_lengths, need_weights)
        else:
            (qs, vs), (qt, vt) = self._project_pair(xs, xt, weights)
            if magnitude is not None:  # after the projections' launch: they no longer wait for the host's reduction
                magnitude.reduce()
            seq_to_struct = self._attend(qs, xt, vt, masked, s_lengths, t_lengths, need_weights)
            struct_to_seq = self._attend(qt, xs, vs, masked_ts, t_lengths, s_lengths, need_weights)
        similarity = self._input_similarity if need_similarity else None
        return self._fusion_result(xs, xt, seq_to_struct, struct_to_seq, s_lengths, t_lengths, similarity)

    def _input_similarity(self, x, lengths, fused):
        """The cosine similarities (B, L, L) of x's rows, padded rows zero, and the fused rows."""
        return self._cosine_similarity(self._zero_padded_rows(x, lengths, axis=1), fused)

    def _fusion_result(self, xs, xt, seq_to_struct, struct_to_seq, s_lengths, t_lengths, similarity) -> dict:
        """The fusion's outputs from its two directions' (output, probabilities), with the similarities
        ``similarity(x, lengths, fused)`` computes (as ``_input_similarity``; None: none asked for)."""
        (fused_s, probs_st), (fused_t, probs_ts) = seq_to_struct, struct_to_seq
        result = {
            "fused_sequential": fused_s,
            "fused_structural": fused_t,
            "attention_weights_seq_to_struct": probs_st,
            "attention_weights_struct_to_seq": probs_ts,
        }
        if similarity is not None:
            # Padded input rows may hold anything; they must not show in the similarity.
            result["seq_similarity"] = similarity(xs, s_lengths, fused_s)
            result["struct_similarity"] = similarity(xt, t_lengths, fused_t)
        return result

    # --- blocks of examples ---------------------------------------------------------------------------

    def _example_blocks(self, batch: int, length: int, weights) -> list[slice]:
        """Blocks of examples for sequences up to ``length``: here the whole batch at once."""
        return [slice(0, batch)]

    def _in_example_blocks(self, run, blocks: list[slice], weights, batched: dict, **fixed):
        """``run(**batched, weights=weights, **fixed)`` on each block of examples, outputs joined.

        ``batched``: arrays leading with the batch axis, None, or a mask leading with 1 (never sliced).
        ``run`` returns an array, None, or a tuple or dict of them, each leading with the batch axis.
        """
        batch = blocks[-1].stop
        parts = [None] * len(blocks)

        def run_block(index: int) -> None:
            rows = blocks[index]
            sliced = {name: x[rows] if x is not None and x.shape[0] == batch else x for name, x in batched.items()}
            parts[index] = run(**sliced, weights=weights, **fixed)

        self._run_blocks(run_block, len(blocks))
        return self._join(parts)

    def _run_blocks(self, run_block, count: int) -> None:
        for index in range(count):
            run_block(index)

    def _concatenate(self, arrays: list):
        raise NotImplementedError

    def _join(self, parts: list):
        """The blocks' outputs joined along the batch: arrays, None, or tuples or dicts of them."""
        first = parts[0]
        if first is None:
            return None
        if isinstance(first, dict):
            return {key: self._join([part[key] for part in parts]) for key in first}
        if isinstance(first, tuple):
            return tuple(self._join(list(items)) for items in zip(*parts))
        return self._concatenate(parts)
