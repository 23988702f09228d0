"""ONNX backend: every operation runs as an exported ONNX graph in onnxruntime.

It lets the conformance tests treat the deployed model as one more backend, and ``auto`` takes it on a
CPU (``usable_by_auto``). Host arrays in, NumPy arrays (or torch CPU tensors) out, as with the NumPy
backend.

The graphs come from ``crossattn_gpu.export`` (opset 17, the portable decomposition), in float64 or
float32: float16 and bfloat16 are computed in float32 graphs and the results cast back, as NumPy
computes them (``NumpyBackend.compute_dtype``). The exported float16 model's graphs
(``to_onnx(dtype="float16")``: float16 GEMMs, softmax in float32) were slower and less accurate on
onnxruntime's CPU provider: W2c with dtype="float16", medians of 9, 69.8 / 78.9 ms at 6.1e-4 from
float64, against 68.9 / 70.4 ms at 3.0e-4 in float32 graphs (W3c: 330 / 338 ms at 2.2e-3 against
308 / 288 ms at 3.7e-4). The conformance suite runs them as a test backend of its own
(``tests/conformance/runnable.py``).

The graphs are built once per weights, dtype and variant (mask or not, probabilities or not,
similarities or not); assigning new weights rebuilds them. The weights reach onnxruntime as arrays,
outside the graph (``OnnxSession``'s ``initializers``), so no size of weights meets protobuf's 2 GiB
cap. Each variant's session keeps its own copy of them, prepacked for onnxruntime's GEMMs: D = 1280,
H = 8 (100 MB of folded float32 weights) took ~110 MB of resident memory a variant on this project's
CPU (~210 MB when the weights went through the graph). Handing every session one shared copy
(``SessionOptions.add_initializer``) saved nothing there. Models small enough for one-thread runs
(H x D**2 up to ``runner.SERIAL_RUN_WORK``, 8 MiB of folded float32 weights) get a second session per
variant for them.
"""

from __future__ import annotations

import threading
from functools import cached_property

import numpy as np

from .._blas import openblas_runs_avx512
from .._optional import require
from ..folding import FoldMagnitudes, fold_magnitudes, fold_named
from ..weights import weights_digest
from .numpy_backend import NumpyBackend

OPSET = 17

#: An onnxruntime run of one direction's attention holds its (b, H, Lq, Lk) scores and a few tensors
#: of their size at once. Past this many score elements for one example (64 MiB in float32) the queries
#: run in blocks (the keys whole), so memory stays bounded whatever L is: one example of L = 8192,
#: D = 64, H = 4 had taken 4.4 GB of resident memory on this project's CPU, and longer ones could only
#: run out of it.
RUN_SCORE_ELEMENTS = 1 << 24

#: ... blocks of at least this many queries: each run projects the whole of its keys' values again.
MIN_QUERY_BLOCK = 256


def query_blocks(heads: int, len_q: int, len_k: int) -> list[slice]:
    """The blocks of queries one direction's attention runs in (one block while the scores fit)."""
    if heads * len_q * len_k <= RUN_SCORE_ELEMENTS:
        return [slice(0, len_q)]
    rows = max(MIN_QUERY_BLOCK, RUN_SCORE_ELEMENTS // (heads * len_k))
    return [slice(start, min(start + rows, len_q)) for start in range(0, len_q, rows)]


class OnnxPrepared:
    """The weights of one CrossAttention in one dtype, and the sessions built from them."""

    def __init__(self, arrays: dict, dtype: str):
        self.arrays, self.dtype, self.sessions = arrays, dtype, {}
        self._building = threading.Lock()

    @cached_property
    def folded(self):
        """The folded weights (``crossattn_gpu.folding``), computed once for every graph built here."""
        return fold_named(self.arrays)

    @cached_property
    def magnitudes(self) -> FoldMagnitudes:
        """``folding.fold_magnitudes`` of the folded weights, for the overflow bounds."""
        heads, width, _ = self.arrays["query_weights"].shape
        return fold_magnitudes(self.folded, heads, width)

    @cached_property
    def digest(self):
        """``weights_digest`` of the weights, for every graph's metadata, computed once."""
        return weights_digest(self.arrays)

    def session(self, key: tuple, build):
        """The session of ``key``, made once from ``build(external)``, a graph whose weights go to the
        dict ``external`` instead of into the model (``OnnxSession``'s ``initializers``). Once also when
        several threads ask at the same time: at D = 1280, H = 8 a session takes ~1 s and ~110 MB."""
        session = self.sessions.get(key)
        if session is None:
            with self._building:
                session = self.sessions.get(key)
                if session is None:
                    from ..export.runner import OnnxSession

                    external = {}
                    session = self.sessions[key] = OnnxSession(build(external), initializers=external)
        return session


class OnnxBackend(NumpyBackend):
    """Runs the seed's operations as ONNX graphs in onnxruntime (CUDA provider when offered, else CPU)."""

    name = "onnx"
    dtypes = ("float64", "float32", "float16", "bfloat16")
    #: ``NumpyBackend.call_flops`` for onnxruntime, whose pool shares one example's GEMMs among the cores:
    #: padding pays less than with NumPy. On this project's 2-core CPU (``python -m bench.collection``,
    #: bench/NOTES.md) 2e6 was at or below a loop of per-antibody calls on every case, and unlimited
    #: padding (64 consecutive antibodies a call) up to 1.2x slower than the loop.
    call_flops = 2e6

    def __init__(self):
        require("onnx", "backend 'onnx'")
        require("onnxruntime", "backend 'onnx'")
        self._sdpa = {}  # dtype name -> OnnxPrepared without weights, for its sessions

    @staticmethod
    def usable_by_auto(dtype: str | None = None) -> bool:
        """``auto`` takes onnxruntime (behind the GPU backends) when it is installed, except for a model
        whose dtype is fixed to float64 where NumPy's OpenBLAS runs AVX-512 kernels: there NumPy's float64
        GEMMs are the faster.

        Measured through ``CrossAttention`` on this project's 2-vCPU VMs, the two backends alternating:

        * AMD EPYC (AVX-512; NumPy's OpenBLAS runs its AVX2 Haswell kernels there, MLAS its AVX-512
          ones), onnx against NumPy: float32 about twice as fast (W2c 68 against 144 ms, W3c 310
          against 574 ms), float64 1.2x to 1.8x (W2c 228 against 280 ms, W3c 683 against 1131 ms, B =
          16, L = 120, D = 1280, H = 8 1160 against 2125 ms, W1 0.069 against 0.086 ms), float16
          (computed in float32 graphs) 2.2x (dtype="float16": W2c 69-70 against 155-161 ms, W3c 288-308
          against 561-573 ms).
        * Intel Xeon (family 6, model 207; OpenBLAS's SkylakeX kernels), medians of three rounds, ms,
          onnx against NumPy: float32 B = 16, L = 120, D = 1280, H = 8 1176 against 1403, W2c 181
          against 229, B = 256, L = 100, D = 64, H = 2 43.0 against 59.5, W1 0.139 against 0.174
          (1.19x to 1.38x); float64 the same shapes 2978 against 2420, 516 against 407, 152 against
          120 (NumPy 1.23x to 1.27x the faster) and W1 0.222 against 0.242. A 2048 x 2048 float64 GEMM
          ran at 80 GFLOP/s in onnxruntime and 104 in NumPy there (float32: 159 and 191).

        A model whose dtype follows its inputs takes onnx: float32 inputs, the usual embeddings, are the
        faster there on both machines. Each kind of call's first run builds a session: +60 ms at D =
        128; at D = 1280, H = 8 +1.0 s for the first, which also folds the weights, and +0.23 s for each
        further kind.
        """
        if dtype == "float64" and openblas_runs_avx512():
            return False
        try:
            OnnxBackend()
        except ImportError:
            return False
        return True

    @staticmethod
    def cast(x, dtype):
        if x.dtype == dtype:  # most casts (a W1 call's two), before the import's ~1 us of lookups
            return x
        from ..export.runner import host_cast  # large float16 conversions: exact, 13-26x NumPy's speed

        return host_cast(x, dtype)

    @staticmethod
    def to_caller(x, kind: str, dtype_name: str):
        if dtype_name == "float16":  # (bfloat16 goes through torch: np.dtype("bfloat16") may be ml_dtypes')
            from ..export.runner import host_cast

            x = host_cast(x, np.float16)
        return NumpyBackend.to_caller(x, kind, dtype_name)

    def prepare_weights(self, query, key, value, output, dtype) -> OnnxPrepared:
        arrays = {"query_weights": query, "key_weights": key, "value_weights": value, "output_weights": output}
        return OnnxPrepared(arrays, np.dtype(dtype).name)

    # --- plans (``FoldedFusion.fusion_plan`` and the others): the session and the run's shape settled once

    def fusion_plan(self, xs, xt, weights, *, need_weights: bool, need_similarity: bool):
        """``fuse`` without mask or lengths, its session and its run's shape settled once where one graph
        takes both directions (``fuse``)."""
        heads, width = weights.arrays["query_weights"].shape[:2]
        if heads * xs.shape[1] * xt.shape[1] > RUN_SCORE_ELEMENTS:
            return super().fusion_plan(xs, xt, weights, need_weights=need_weights, need_similarity=need_similarity)
        session = self._fusion_session(weights, False, need_weights, need_similarity, False)
        shape = (max(xs.shape[1], xt.shape[1]), width, heads)

        def run(xs, xt, magnitude):
            return _fusion_parts(session.run({"sequential_repr": xs, "structural_repr": xt}, shape=shape, checked=True))

        return run

    def attention_plan(self, xq, xk, xv, weights, *, need_weights: bool):
        """``multi_head_attention`` without mask or lengths, its session and its run's shape settled once
        where its queries run in one block (``query_blocks``)."""
        heads = weights.arrays["query_weights"].shape[0]
        if len(query_blocks(heads, xq.shape[1], xk.shape[1])) != 1:
            return super().attention_plan(xq, xk, xv, weights, need_weights=need_weights)
        return self._one_block_plan(weights, xq, xk, heads, need_weights, sdpa=False)

    def sdpa_plan(self, q, k, v, *, scale: float, need_weights: bool):
        """``scaled_dot_product_attention`` likewise (its graph has the scale of its width)."""
        if len(query_blocks(1, q.shape[1], k.shape[1])) != 1:
            return super().sdpa_plan(q, k, v, scale=scale, need_weights=need_weights)
        run = self._one_block_plan(self._sdpa_weights(q.dtype), q, k, 1, need_weights, sdpa=True)
        return lambda q, k, v, magnitude: _first_head(run(q, k, v, magnitude))

    def _one_block_plan(self, weights, xq, xk, heads: int, need_weights: bool, sdpa: bool):
        (_, len_q, width), len_k = xq.shape, xk.shape[1]
        session = self._attention_session(weights, width, xq.dtype.name, False, need_weights, False, sdpa)
        shape = (max(len_q, len_k), width, heads)

        def run(xq, xk, xv, magnitude):
            result = session.run({"query_seq": xq, "key_seq": xk, "value_seq": xv}, shape=shape, checked=True)
            return result["output"], result.get("attention_weights")

        return run

    # --- the operations ----------------------------------------------------------------------------

    def _attention_session(self, weights, width: int, dtype: str, masked: bool, need_weights: bool, lengths: bool,
                           sdpa: bool):
        from ..export.onnx_export import build_attention_model

        arrays = None if sdpa else weights.arrays
        key = ("sdpa" if sdpa else "mha", masked, need_weights, width, lengths)
        return weights.session(key, lambda external: build_attention_model(
            arrays, width, opset=OPSET, dtype=dtype, mask=masked, attention_weights=need_weights,
            folded=None if sdpa else weights.folded, digest=None if sdpa else weights.digest, lengths=lengths,
            external=external))

    def _attention(self, weights, xq, xk, xv, masked, q_lengths, k_lengths, need_weights, sdpa: bool):
        """One direction's attention, its queries in blocks (``query_blocks``) when they are many."""
        width = xq.shape[-1]
        lengths = q_lengths is not None or k_lengths is not None
        session = self._attention_session(weights, width, xq.dtype.name, masked is not None, need_weights, lengths,
                                          sdpa)
        heads = 1 if sdpa else weights.arrays["query_weights"].shape[0]
        outputs, probabilities = [], []
        for rows in query_blocks(heads, xq.shape[1], xk.shape[1]):
            block = xq[:, rows]
            # A block's query lengths count from its first row; a block past an example's length gets
            # 0, and its rows come out zero as padded rows do.
            block_lengths = None if q_lengths is None else np.clip(q_lengths - rows.start, 0, block.shape[1])
            block_masked = None if masked is None or masked.shape[1] == 1 else masked[:, rows]
            feeds = _feeds(
                {"query_seq": block, "key_seq": xk, "value_seq": xv},
                {"query_lengths": (block, block_lengths), "key_lengths": (xk, k_lengths)},
                masked if block_masked is None else block_masked,
            )
            result = session.run(feeds, shape=(max(block.shape[1], xk.shape[1]), width, heads), checked=True)
            outputs.append(result["output"])
            probabilities.append(result.get("attention_weights"))
        if len(outputs) == 1:
            return outputs[0], probabilities[0]
        return np.concatenate(outputs, axis=1), None if not need_weights else np.concatenate(probabilities, axis=2)

    def scaled_dot_product_attention(self, q, k, v, *, scale, masked, q_lengths, k_lengths, need_weights):
        parts = self._attention(self._sdpa_weights(q.dtype), q, k, v, masked, q_lengths, k_lengths, need_weights,
                                sdpa=True)
        return _first_head(parts)

    def _sdpa_weights(self, dtype) -> OnnxPrepared:
        """The sessions of ``scaled_dot_product_attention`` in ``dtype``, which has no weights."""
        return self._sdpa.setdefault(dtype.name, OnnxPrepared({}, dtype.name))

    def multi_head_attention(self, xq, xk, xv, weights, *, masked, q_lengths, k_lengths, need_weights):
        return self._attention(weights, xq, xk, xv, masked, q_lengths, k_lengths, need_weights, sdpa=False)

    def fuse(self, xs, xt, weights, *, masked, s_lengths, t_lengths, need_weights, need_similarity):
        heads = weights.arrays["query_weights"].shape[0]
        if heads * xs.shape[1] * xt.shape[1] > RUN_SCORE_ELEMENTS:  # both directions' queries in blocks
            return self._fuse_by_direction(xs, xt, weights, masked=masked, s_lengths=s_lengths, t_lengths=t_lengths,
                                           need_weights=need_weights, need_similarity=need_similarity)
        lengths = s_lengths is not None or t_lengths is not None
        session = self._fusion_session(weights, masked is not None, need_weights, need_similarity, lengths)
        feeds = _feeds(
            {"sequential_repr": xs, "structural_repr": xt},
            {"sequential_lengths": (xs, s_lengths), "structural_lengths": (xt, t_lengths)},
            masked,
        )
        heads, width = weights.arrays["query_weights"].shape[:2]
        return _fusion_parts(session.run(feeds, shape=(max(xs.shape[1], xt.shape[1]), width, heads), checked=True))

    def _fusion_session(self, weights, masked: bool, need_weights: bool, need_similarity: bool, lengths: bool):
        from ..export.onnx_export import build_fusion_model

        key = ("fuse", masked, need_weights, need_similarity, lengths)
        return weights.session(key, lambda external: build_fusion_model(
            weights.arrays, opset=OPSET, dtype=weights.dtype, lengths=lengths, mask=masked,
            similarity=need_similarity, attention_weights=need_weights, bidirectional=False, folded=weights.folded,
            digest=weights.digest, external=external))

    def _fuse_by_direction(self, xs, xt, weights, *, masked, s_lengths, t_lengths, need_weights, need_similarity):
        """The fusion of examples too long for one graph: each direction through the multi-head graph,
        whose queries run in blocks, and the similarities through a graph of their own."""
        seq_to_struct = self._attention(weights, xs, xt, xt, masked, s_lengths, t_lengths, need_weights, sdpa=False)
        masked_ts = None if masked is None else masked.swapaxes(-1, -2)
        struct_to_seq = self._attention(weights, xt, xs, xs, masked_ts, t_lengths, s_lengths, need_weights, sdpa=False)
        similarity = self._similarity_graph(weights, xs.shape[-1]) if need_similarity else None
        return self._fusion_result(xs, xt, seq_to_struct, struct_to_seq, s_lengths, t_lengths, similarity)

    def _similarity_graph(self, weights, width: int):
        """``similarity(x, lengths, fused)`` (``_fusion_result``'s) through ``build_similarity_model``'s
        graph, built once per weights."""
        from ..export.onnx_export import build_similarity_model

        session = weights.session(("similarity",), lambda external: build_similarity_model(
            width, opset=OPSET, dtype=weights.dtype))

        def similarity(x, lengths, fused):
            rows = self._zero_padded_rows(x, lengths, axis=1)
            shape = (max(rows.shape[1], fused.shape[1]), width, 1)  # examples in slices on the CPU
            return session.run({"rows": rows, "fused": fused}, shape=shape, checked=True)["similarity"]

        return similarity


def _fusion_parts(result: dict) -> dict:
    """``fuse``'s parts from the fusion graph's outputs."""
    return {
        "fused_sequential": result["fused_sequential"],
        "fused_structural": result["fused_structural"],
        "attention_weights_seq_to_struct": result.get("attention_weights_seq_to_struct"),
        "attention_weights_struct_to_seq": result.get("attention_weights_struct_to_seq"),
        "seq_similarity": result.get("seq_similarity"),
        "struct_similarity": result.get("struct_similarity"),
    }


def _first_head(parts: tuple) -> tuple:
    """``scaled_dot_product_attention``'s (output, probabilities) from its one-head graph's."""
    out, probs = parts
    return out, None if probs is None else probs[:, 0]


def _feeds(inputs: dict, lengths: dict, masked) -> dict:
    """The inputs, the lengths when any is given (the full length for one not given) and the mask
    (True = kept) by name. Without lengths the graph has no length inputs, and none of their work (a
    pass over the scores and one over the outputs: W2c 108 -> 100 ms, sessions run alternately)."""
    feeds = dict(inputs)
    if any(given is not None for _, given in lengths.values()):
        for name, (x, given) in lengths.items():
            feeds[name] = np.full(x.shape[0], x.shape[1], dtype=np.int64) if given is None else given
    if masked is not None:
        len_q, len_k = (x.shape[1] for x, _ in lengths.values())
        feeds["mask"] = np.broadcast_to(~masked, (masked.shape[0], len_q, len_k))
    return feeds
