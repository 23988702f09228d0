"""The public ``CrossAttention`` class: the seed's API, batched, ragged and backend-selectable."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from . import _checks, _memory, _overflow, ragged
from .backends import get_backend
from .weights import WEIGHT_NAMES, check_weight, check_weight_set, load_weights, random_weights, save_weights

#: What the check of room for results in host memory suggests (``CrossAttention._check_outputs_fit``).
_OUTPUTS_REMEDY = "pass need_weights=False, or fewer examples per call"
_FUSION_OUTPUTS_REMEDY = "pass need_weights=False or need_similarity=False, or fewer examples per call"


class _Parameter:
    """One of the four weight arrays: read-only when read, validated and copied when assigned.

    Assignment clears the prepared (cast and concatenated) weights, so it takes effect on the next
    call. The arrays handed out are read-only, so no in-place edit can leave a stale copy behind.
    """

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj._weights[self.name]

    def __set__(self, obj, value):
        checked = check_weight(self.name, value, obj._weights[self.name].shape)
        # New dicts, the weights' first: a build from the old weights that is running in another
        # thread then stores into the old cache, never into the one that later calls read.
        obj._weights = {**obj._weights, self.name: checked}
        obj._prepared = {}
        obj._plans = {}  # their prepared weights are the old ones (a plan also checks that it has the current)


class CrossAttention:
    """Bidirectional cross-attention fusion of sequence and structure embeddings.

    Every head has a full D x D projection (the per-head width is D, not D/H), the four parameters
    serve both directions, and scores are scaled by 1/sqrt(D). See SPEC section 1 for the exact
    function; every backend computes it.

    Args:
        embedding_dim: D, the width of every input row. Must be >= 1.
        attention_heads: H, the number of heads. Must be >= 1.
        backend: ``"auto"`` (the fastest available; the choice is in ``.backend`` and the report) or a
            backend name such as ``"numpy"``. An unavailable backend raises; it never falls back.
            ``auto`` takes Triton on a CUDA GPU, else CuPy there, else, with the ``onnx`` extra
            installed, ``"onnx"`` (onnxruntime: 1.2 to 2 times NumPy's speed in float32 and for float16
            on the CPUs measured), else ``"numpy"``. For ``dtype="float64"`` it takes ``"numpy"`` where
            NumPy's OpenBLAS runs AVX-512 kernels (its float64 GEMMs beat onnxruntime's there: 1.2x on
            an Intel Xeon; ``onnx`` was 1.2 to 1.8 times as fast where OpenBLAS ran AVX2 kernels).
        seed: seeds the initial weights (standard normal times 0.1). ``None`` draws from NumPy's global
            generator like the seed implementation, so ``np.random.seed(s)`` before construction
            reproduces ``seed=s``.
        dtype: ``None`` computes in the inputs' dtype (float64 in, float64 out; float32 in, float32 out;
            float16 and bfloat16 are stored in their dtype and accumulated in float32; the CPU backends
            compute float16 arrays and bfloat16 torch tensors in float32 and hand back their dtype).
            A dtype name (``"float32"``, ``"float64"``, ``"float16"``, ``"bfloat16"``) casts every input
            to it and returns it (the CPU backends compute ``"float16"`` in float32 too; the exported
            float16 model's graphs, ``to_onnx(dtype="float16")``, are for deployment). Results come back in the kind
            of the first input: NumPy arrays (array-likes too), torch tensors on that tensor's device,
            or CuPy arrays; bfloat16 results need torch or CuPy inputs.
        float32_precision: how float32 GEMMs may run on a GPU: ``"ieee"`` (default: IEEE float32),
            ``"tf32x3"`` (three TF32 tensor-core products per product, about float32's accuracy: the
            conformance suite holds it to the float32 rules) or ``"tf32"`` (one product, ~1e-3
            relative error). A permission, like torch's ``allow_tf32``: only the Triton backend on a
            GPU has TF32 kernels; the other backends compute IEEE float32, and 16-bit inputs their own
            dtype. ValueError for any other value.

    Attributes:
        query_weights, key_weights, value_weights: (H, D, D) float64, read-only; assign a new array to
            change them.
        output_weights: (H*D, D) float64, read-only; applied to the heads' outputs concatenated
            head 0 first.
        backend: the name of the backend that runs.
        float32_precision: as given.

    Raises:
        TypeError / ValueError: on a bad argument, with a message naming it (the methods: on a bad
            input, including NaN or Inf, or a value or folded weight past the compute dtype's range,
            and a torch tensor that requires grad: no backend computes gradients).
        OverflowError (the methods): when finite inputs overflow the dtype a stage is computed in; the
            message names the result and the dtype. Never Inf or NaN handed back instead.
        ImportError / RuntimeError: when the named backend cannot run here.
        MemoryError: before drawing them, when the weights of ``embedding_dim`` and ``attention_heads``
            (and the copy the model keeps) cannot fit in the memory available; the methods, before
            any work, when results handed back in host memory cannot fit there.
    """

    query_weights = _Parameter()
    key_weights = _Parameter()
    value_weights = _Parameter()
    output_weights = _Parameter()

    def __init__(self, embedding_dim: int = 64, attention_heads: int = 1, *, backend: str = "auto", seed=None, dtype=None,
                 float32_precision: str = "ieee"):
        width = _positive_int(embedding_dim, "embedding_dim")
        heads = _positive_int(attention_heads, "attention_heads")
        # Drawn, then copied by the one check of every way in: twice the weights at once. Refused
        # here: for a typo's embedding_dim=12800 with 8 heads (78 GiB), NumPy would either raise its
        # own MemoryError or, under Linux's overcommit, let the draws through until the OOM killer
        # ended the process.
        square = heads * width * width
        _memory.check_outputs_fit({"the four weights, drawn": 4 * square, "their checked copy": 4 * square},
                                  "float64", remedy="check embedding_dim and attention_heads",
                                  what=f"embedding_dim={width} with attention_heads={heads}")
        self._setup(backend, dtype, float32_precision, random_weights(width, heads, seed))

    @classmethod
    def from_weights(cls, query_weights, key_weights, value_weights, output_weights, **kwargs) -> "CrossAttention":
        """Build from given parameters: Wq, Wk, Wv (H, D, D) and Wo (H*D, D), any float dtype, as NumPy
        arrays, torch tensors on any device (``nn.Parameter`` included) or CuPy arrays. The model keeps a
        float64 copy of their values, a snapshot: later changes to the tensors do not reach it.

        ``kwargs`` are ``backend``, ``dtype`` and ``float32_precision`` as for the constructor. Raises
        ValueError when the shapes do not fit together and TypeError for non-float arrays.
        """
        arrays = dict(zip(WEIGHT_NAMES, (query_weights, key_weights, value_weights, output_weights)))
        return cls._from_arrays(arrays, _settings(kwargs, "from_weights"))

    @classmethod
    def _from_arrays(cls, arrays: dict, settings: tuple, source: str = "") -> "CrossAttention":
        obj = cls.__new__(cls)
        obj._setup(*settings, arrays, source)
        return obj

    def _setup(self, backend, dtype, float32_precision, arrays, source: str = ""):
        # The one check (finiteness, and a private float64 copy) of every way in: 0.47 s at D = 1280,
        # H = 8 on this project's CPU, which ``load`` had paid twice.
        self.embedding_dim, self.attention_heads, self._weights = check_weight_set(arrays, source)
        self.dtype = _checks.normalize_dtype(dtype)
        self._backend = get_backend(backend, float32_precision=float32_precision, dtype=self.dtype)
        if self.dtype is not None and self.dtype not in self._backend.dtypes:
            raise ValueError(
                f"backend {self._backend.name!r} supports dtypes {', '.join(self._backend.dtypes)}; got {self.dtype!r}"
            )
        self._prepared: dict = {}  # compute dtype -> the backend's prepared weights
        self._plans: dict = {}  # the methods' plans (_Plan) by their key (_plan)
        self.is_initialized = True

    def __getstate__(self) -> dict:
        """What pickle and ``copy`` keep: the weights and the settings, so a model can go to another
        process (``multiprocessing`` with spawn or forkserver). The backend is built again there by
        name, as :meth:`from_weights` would (an error if it cannot run there, never a fallback), and
        its prepared weights on the first call: backends hold modules, onnxruntime sessions and device
        arrays, none of which pickles."""
        return {"weights": self._weights, "backend": self.backend, "dtype": self.dtype,
                "float32_precision": self.float32_precision}

    def __setstate__(self, state: dict) -> None:
        self._setup(state["backend"], state["dtype"], state["float32_precision"], state["weights"])

    @property
    def backend(self) -> str:
        """The name of the backend that runs this object's computations."""
        return self._backend.name

    @property
    def float32_precision(self) -> str:
        """How float32 GEMMs may run (``"ieee"``, ``"tf32x3"`` or ``"tf32"``), as given; the backend keeps it."""
        return self._backend.float32_precision

    def __repr__(self):
        return (
            f"CrossAttention(embedding_dim={self.embedding_dim}, attention_heads={self.attention_heads}, "
            f"backend={self.backend!r}, dtype={self.dtype!r}, float32_precision={self.float32_precision!r})"
        )

    # --- files ---------------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write the four parameters to ``path``: safetensors, or npz when the name ends in ``.npz``.
        The file appears whole: a save interrupted (Ctrl-C, a full disk) leaves the previous one as it was."""
        from . import __version__

        metadata = {
            "format": "crossattn_gpu",
            "version": __version__,
            "embedding_dim": str(self.embedding_dim),
            "attention_heads": str(self.attention_heads),
        }
        save_weights(path, self._weights, metadata)

    @classmethod
    def load(cls, path, **kwargs) -> "CrossAttention":
        """Read parameters written by :meth:`save` (or any safetensors/npz file with the four arrays).

        Never unpickles. Raises FileNotFoundError for a missing file, ValueError for a corrupt file,
        missing or extra arrays, or shapes that do not fit together, TypeError for non-float arrays.
        ``kwargs`` (``backend``, ``dtype``, ``float32_precision``) go to :meth:`from_weights`.
        """
        settings = _settings(kwargs, "load")  # before the file is read
        arrays, metadata = load_weights(path)
        obj = cls._from_arrays(arrays, settings, source=str(path))
        for key, actual in (("embedding_dim", obj.embedding_dim), ("attention_heads", obj.attention_heads)):
            if key in metadata and metadata[key] != str(actual):
                raise ValueError(f"{path}: metadata says {key}={metadata[key]} but the arrays have {actual}")
        return obj

    # --- the seed's methods ---------------------------------------------------------------------------

    @_overflow.named_not_warned
    def scaled_dot_product_attention(
        self, queries, keys, values, mask=None, *, query_lengths=None, key_lengths=None, need_weights=None
    ):
        """Softmax(queries keys^T / sqrt(D)) values, for already projected inputs.

        Args:
            queries: (Lq, D) or (B, Lq, D). keys: (Lk, D) or (B, Lk, D). values: (Lk, Dv) or (B, Lk, Dv).
            mask: broadcastable to (Lq, Lk) or (B, Lq, Lk); where it is 0 the score becomes -1e9, so a
                fully masked row has uniform weights (the seed's semantics).
            query_lengths, key_lengths: int (B,) valid lengths of a padded batch: keys past the length
                get exactly zero weight; query rows past it come out as zeros.
            need_weights: return the probabilities; default True for (L, D) inputs (as the seed),
                False for batched inputs.

        Returns:
            (output (…, Lq, Dv), weights (…, Lq, Lk) or None).
        """
        named = {"queries": queries, "keys": keys, "values": values}
        plan_key, plan = self._plan("scaled_dot_product_attention", named.values(), (mask, query_lengths, key_lengths),
                                    (need_weights,))
        if plan is not None:
            return self._planned_call(plan, named)
        batch = self._batch(named, free_width=("values",))
        q, k, v = batch.arrays
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"keys and values must have the same length; got {k.shape[1]} and {v.shape[1]}")
        masked, q_len, k_len = self._ragged(batch, mask, q.shape[1], k.shape[1], query_lengths, key_lengths)
        need_weights = _default_need_weights(need_weights, batch)
        (size, len_q, _), len_k = q.shape, k.shape[1]
        outputs = {"output": size * len_q * v.shape[2],
                   "probabilities (need_weights)": need_weights and size * len_q * len_k}
        self._check_outputs_fit(batch, outputs)
        scale = 1.0 / np.sqrt(self.embedding_dim)
        if plan_key is None:
            parts = self._backend.scaled_dot_product_attention(
                q, k, v, scale=scale, masked=masked, q_lengths=q_len, k_lengths=k_len, need_weights=need_weights,
            )
            return self._sdpa_results(batch, None, parts)
        run = self._backend.sdpa_plan(q, k, v, scale=scale, need_weights=need_weights)
        return self._first_planned_call(plan_key, batch, None, run, CrossAttention._sdpa_results, outputs)

    @_overflow.named_not_warned
    def multi_head_attention(
        self, query_seq, key_seq, value_seq, mask=None, *, query_lengths=None, key_lengths=None, need_weights=None
    ):
        """Multi-head attention: per head, project, attend; concatenate heads; output projection.

        Args:
            query_seq: (Lq, D) or (B, Lq, D). key_seq, value_seq: (Lk, D) or (B, Lk, D).
            mask, query_lengths, key_lengths, need_weights: as in :meth:`scaled_dot_product_attention`.

        Returns:
            (output (…, Lq, D), list of H weight arrays (…, Lq, Lk) or None).
        """
        named = {"query_seq": query_seq, "key_seq": key_seq, "value_seq": value_seq}
        plan_key, plan = self._plan("multi_head_attention", named.values(), (mask, query_lengths, key_lengths),
                                    (need_weights,))
        if plan is not None:
            return self._planned_call(plan, named)
        batch = self._batch(named, magnitude_by_kernel=True)
        xq, xk, xv = batch.arrays
        if xk.shape[1] != xv.shape[1]:
            raise ValueError(f"key_seq and value_seq must have the same length; got {xk.shape[1]} and {xv.shape[1]}")
        masked, q_len, k_len = self._ragged(batch, mask, xq.shape[1], xk.shape[1], query_lengths, key_lengths)
        need_weights = _default_need_weights(need_weights, batch)
        (size, len_q, width), len_k, heads = xq.shape, xk.shape[1], self.attention_heads
        outputs = {"output": size * len_q * width,
                   "probabilities (need_weights)": need_weights and size * heads * len_q * len_k}
        self._check_outputs_fit(batch, outputs)
        weights = self._projection(xq.dtype)
        _overflow.check_weights(weights.magnitudes, batch.stages.projections)
        if plan_key is None:
            by_kernel = {} if batch.pending_magnitude is None else {"magnitude": batch.pending_magnitude}
            parts = self._backend.multi_head_attention(
                xq, xk, xv, weights, masked=masked, q_lengths=q_len, k_lengths=k_len, need_weights=need_weights,
                **by_kernel,
            )
            return self._attention_results(batch, weights, parts)
        run = self._backend.attention_plan(xq, xk, xv, weights, need_weights=need_weights)
        return self._first_planned_call(plan_key, batch, weights, run, CrossAttention._attention_results, outputs)

    @_overflow.named_not_warned
    def fuse_representations(
        self,
        sequential_repr,
        structural_repr,
        *,
        mask=None,
        sequential_lengths=None,
        structural_lengths=None,
        bidirectional: bool = True,
        need_weights=None,
        need_similarity: bool = True,
    ) -> dict:
        """Fuse the two modalities by cross-attention in both directions.

        Args:
            sequential_repr: (Ls, D) or (B, Ls, D). structural_repr: (Lt, D) or (B, Lt, D).
            mask: broadcastable to (…, Ls, Lt), the seed's 0-means-masked mask for the sequential ->
                structural direction; its transpose serves the other direction.
            sequential_lengths, structural_lengths: int (B,) valid lengths of a padded batch.
            bidirectional: also return ``bidirectional_fusion``, the sum of the two fusions; needs
                Ls == Lt (and equal lengths per example). ``bidirectional=False`` returns the two
                directional fusions alone.
            need_weights: return the attention probabilities; default True for (L, D) inputs.
            need_similarity: return the cosine-similarity matrices (… , Ls, Ls) and (…, Lt, Lt).

        Returns:
            dict with ``fused_sequential``, ``fused_structural``, ``bidirectional_fusion``,
            ``attention_weights_seq_to_struct`` (list of H (…, Ls, Lt)), ``attention_weights_struct_to_seq``
            (list of H (…, Lt, Ls)), ``seq_similarity``, ``struct_similarity`` and ``fusion_complete``
            (True). Entries that were not asked for are None.
        """
        named = {"sequential_repr": sequential_repr, "structural_repr": structural_repr}
        plan_key, plan = self._plan("fuse_representations", named.values(), (mask, sequential_lengths, structural_lengths),
                                    (bidirectional, need_weights, need_similarity))
        if plan is not None:
            return self._planned_call(plan, named)
        batch = self._batch(named, magnitude_by_kernel=True)
        xs, xt = batch.arrays
        bidirectional = _checks.check_flag(bidirectional, "bidirectional")
        masked, s_len, t_len = self._ragged(
            batch, mask, xs.shape[1], xt.shape[1], sequential_lengths, structural_lengths,
            names=("sequential_lengths", "structural_lengths"), equal=bidirectional,
        )
        need_weights = _default_need_weights(need_weights, batch)
        need_similarity = _checks.check_flag(need_similarity, "need_similarity")
        (size, len_s, width), len_t, heads = xs.shape, xt.shape[1], self.attention_heads
        outputs = {
            "fused outputs": size * (len_s * (1 + bidirectional) + len_t) * width,
            "probabilities (need_weights)": need_weights and 2 * size * heads * len_s * len_t,
            "similarities (need_similarity)": need_similarity and size * (len_s * len_s + len_t * len_t),
        }
        self._check_outputs_fit(batch, outputs, remedy=_FUSION_OUTPUTS_REMEDY)
        weights = self._projection(xs.dtype)
        _overflow.check_weights(weights.magnitudes, batch.stages.projections)
        if plan_key is None:
            by_kernel = {} if batch.pending_magnitude is None else {"magnitude": batch.pending_magnitude}
            parts = self._backend.fuse(
                xs, xt, weights, masked=masked, s_lengths=s_len, t_lengths=t_len,
                need_weights=need_weights, need_similarity=need_similarity, **by_kernel,
            )
            return self._fusion_results(batch, weights, parts, bidirectional)
        run = self._backend.fusion_plan(xs, xt, weights, need_weights=need_weights, need_similarity=need_similarity)
        results = functools.partial(CrossAttention._fusion_results, bidirectional=bidirectional)
        return self._first_planned_call(plan_key, batch, weights, run, results, outputs, _FUSION_OUTPUTS_REMEDY)

    # --- plans for repeated calls of a layout ----------------------------------------------------------

    def _plan(self, method: str, inputs, absent: tuple, flags: tuple) -> tuple:
        """(key, plan): the key under which a call of ``method`` keeps what it settled (``_Plan``) for the
        next calls alike, and the plan kept there, None where there is none or where the weights it prepared
        are no longer the model's.

        The key holds the ``inputs``' layouts (``backend.layout_key``: shapes, strides, dtypes, devices), the
        ``flags``, the model's dtype and the backend's settings. It is None, and no plan is made, when one of
        ``absent`` is given (a mask or lengths: their values are checked each call), for flags that are
        neither Python bools nor None (their check raises or converts), and for inputs the backend makes no
        plans for.
        """
        # Loops rather than any() over generators: this runs in every call, and W1's host path is its
        # host's time (the generators took 1.4 us more on this project's CPU).
        for given in absent:
            if given is not None:
                return None, None
        for flag in flags:
            if flag is not None and type(flag) is not bool:
                return None, None
        backend = self._backend
        layouts = []
        for x in inputs:
            layout = backend.layout_key(x)
            if layout is None:
                return None, None
            layouts.append(layout)
        key = method, tuple(layouts), flags, self.dtype, backend.plan_settings()
        plan = self._plans.get(key)
        if plan is None or (plan.weights is not None and self._prepared.get(plan.layout.compute) is not plan.weights):
            return key, None
        return key, plan

    def _first_planned_call(self, key, batch: _checks.Batch, weights, run: Callable, results: Callable, outputs: dict,
                            remedy: str = _OUTPUTS_REMEDY):
        """A call that makes its plan (``run``: the backend's, for ``batch``'s layout) runs it, and keeps it
        under ``key`` once the values and the results (``results(model, batch, weights, parts)``) have
        passed."""
        got = results(self, batch, weights, run(*batch.arrays, batch.pending_magnitude))
        plan = _Plan(batch.layout, weights, run, results, outputs, remedy, batch.pending_magnitude is not None)
        plans = self._plans
        if len(plans) >= _PLANS_KEPT:  # a new dict, not a clear(): another thread may be reading this one
            self._plans = plans = {}
        plans[key] = plan
        return got

    def _planned_call(self, plan: "_Plan", named_inputs: dict):
        """A method's call for inputs of a plan's layout: what depends on the layout alone was checked by
        the call that made the plan; the values are checked as every call checks them (NaN, Inf,
        overflow), and so is the room for results handed back in host memory."""
        backend, arrays = self._backend, {}
        for name, x in named_inputs.items():  # (a loop: a comprehension's frame cost 0.2 us more)
            arrays[name] = backend.native(x, name)
        pending = backend.pending_magnitude(*arrays.values()) if plan.magnitude_by_kernel else None
        batch = self._checked_batch(arrays, _checks.check_values(arrays, backend, pending), pending, plan.layout)
        self._check_outputs_fit(batch, plan.outputs, remedy=plan.remedy)
        return plan.results(self, batch, plan.weights, plan.run(*batch.arrays, pending))

    # --- results --------------------------------------------------------------------------------------

    def _attention_results(self, batch: _checks.Batch, weights, parts: tuple) -> tuple:
        """``multi_head_attention``'s result from the backend's (output, probabilities), once the inputs'
        values and the output are checked."""
        out, probs = parts
        magnitude = batch.finish_checks()
        bounds = _overflow.Bounds.folded(magnitude, self.embedding_dim, self.attention_heads, weights.magnitudes)
        _overflow.check_results({"output": out}, magnitude, bounds, batch.stages, self._backend)
        return self._out(out, batch), self._head_list(probs, batch)

    def _sdpa_results(self, batch: _checks.Batch, weights: None, parts: tuple) -> tuple:
        """``scaled_dot_product_attention``'s result (no weights) from the backend's (output, probabilities),
        once the inputs' values and the output are checked."""
        out, probs = parts
        magnitude = batch.finish_checks()
        bounds = _overflow.Bounds.attention(magnitude, self.embedding_dim, 1.0 / np.sqrt(self.embedding_dim))
        _overflow.check_results({"output": out}, magnitude, bounds, batch.stages, self._backend)
        return self._out(out, batch), self._out(probs, batch)

    def _fusion_results(self, batch: _checks.Batch, weights, parts: dict, bidirectional: bool) -> dict:
        """The fusion's dict from the backend's ``parts``, once the inputs' values and the results are
        checked."""
        fused_s, fused_t = parts["fused_sequential"], parts["fused_structural"]
        both = fused_s + fused_t if bidirectional else None
        magnitude = batch.finish_checks()
        bounds = _overflow.Bounds.folded(magnitude, self.embedding_dim, self.attention_heads, weights.magnitudes,
                                         terms=2 if bidirectional else 1)
        results = {"fused_sequential": fused_s, "fused_structural": fused_t, "bidirectional_fusion": both}
        _overflow.check_results(results, magnitude, bounds, batch.stages, self._backend)
        return {
            "fused_sequential": self._out(fused_s, batch),
            "fused_structural": self._out(fused_t, batch),
            "bidirectional_fusion": self._out(both, batch),
            "attention_weights_seq_to_struct": self._head_list(parts["attention_weights_seq_to_struct"], batch),
            "attention_weights_struct_to_seq": self._head_list(parts["attention_weights_struct_to_seq"], batch),
            "seq_similarity": self._out(parts.get("seq_similarity"), batch),
            "struct_similarity": self._out(parts.get("struct_similarity"), batch),
            "fusion_complete": True,
        }

    def fuse_collection(
        self,
        sequential,
        structural,
        *,
        batch_size: int = 64,
        bidirectional: bool = True,
        need_weights: bool = False,
        need_similarity: bool = False,
    ):
        """Fuse many antibodies of different lengths: padded batches of similar lengths, results per antibody.

        Each antibody's results are those of ``fuse_representations`` on its two (L, D) arrays alone (its
        probabilities and similarities too, when asked for), computed in batches of up to ``batch_size``
        antibodies sorted by length, longest first (the first batch sizes the memory the others reuse).
        An antibody shares a batch with longer ones only while the work its padding adds costs less than
        a call of its own on the backend: on the ``onnx`` backend, short antibodies and equal lengths
        share, long ones go alone; on NumPy and on a GPU most share. The arrays may be NumPy arrays (or
        array-likes), torch tensors (padded on their device) or CuPy arrays, each side all of one kind
        on one device, and each side is computed in the promoted dtype of all its arrays. The results
        come back in the kind of the inputs, as views of their batch's results, and are all held at once
        (the fused outputs alone: 3 x L x D values an antibody, 1.8 MB at L = 120, D = 1280 in float32);
        for more, ``iter_collection`` hands them over as they come (``crossattn-gpu fuse`` streams npz
        files).

        Args:
            sequential, structural: two lists (or tuples) of the same length, the i-th entries one
                antibody's (Ls_i, D) and (Lt_i, D) embeddings; or two dicts with the same keys (ids).
            batch_size: antibodies per call of ``fuse_representations`` (memory grows with it).
            bidirectional: also return ``bidirectional_fusion``; needs Ls_i == Lt_i for every antibody.
            need_weights, need_similarity: also return the attention probabilities (lists of H
                (Ls_i, Lt_i) and (Lt_i, Ls_i) arrays) and the cosine similarities (Ls_i, Ls_i) and
                (Lt_i, Lt_i); both cost O(L**2) memory per antibody, so both are off by default.

        Returns:
            A list of result dicts in the order of the inputs, or, for dicts, a dict by id in
            ``sequential``'s order. Each has the keys of ``fuse_representations``' dict, None where not
            asked for. Empty inputs give an empty list or dict.

        Raises:
            TypeError: inputs that are not two lists or two dicts (a single (B, L, D) array belongs to
                ``fuse_representations``, with lengths), an entry that is not floating point, entries of
                mixed kinds or devices, or a tensor that requires grad.
            ValueError: lists of different lengths or dicts with different keys, an entry that is not
                (L, D) with L >= 1 and this model's D, unequal lengths with ``bidirectional``: all checked
                before any work; then what ``fuse_representations`` raises for a batch (NaN, Inf, ...),
                naming the antibodies to look at. OverflowError as there.
            MemoryError: before any work, when the results of the whole collection, returned in host
                memory, cannot fit there.
        """
        collection, options = self._collection(sequential, structural, batch_size, bidirectional, need_weights,
                                               need_similarity)
        keys, as_dicts = collection.keys, isinstance(sequential, Mapping)
        seq_side, struct_side = collection.sides
        if keys and self._backend.results_on_host(self._backend.caller_kind(seq_side.collection[keys[0]])):
            _memory.check_outputs_fit(
                collection.result_elements(options["need_weights"], options["need_similarity"]),
                self.dtype or _checks.result_dtype((seq_side.dtype_name, struct_side.dtype_name)),
                remedy="pass need_weights=False or need_similarity=False, or take the results as they come "
                       "with iter_collection",
            )
        results = dict(collection.fuse(**options))
        ordered = [results[key] for key in keys]
        return dict(zip(keys, ordered)) if as_dicts else ordered

    def iter_collection(
        self,
        sequential,
        structural,
        *,
        batch_size: int = 64,
        bidirectional: bool = True,
        need_weights: bool = False,
        need_similarity: bool = False,
    ):
        """``fuse_collection``'s results as they are computed: for collections whose results do not fit
        in memory at once (write each away, then drop it).

        Takes what ``fuse_collection`` takes and checks it the same way before it returns (TypeError,
        ValueError), except that only each batch's results, not the whole collection's, must fit in
        memory (``fuse_representations``' MemoryError). Returns an iterator of ``(key, results)`` pairs,
        batch by batch, longest antibodies first: ``key`` is the antibody's index in the lists or its id
        in the dicts, ``results`` its dict (views of its batch's results: a batch's memory is freed once
        its antibodies' results are dropped). The errors of a batch (NaN, Inf, overflow) are raised when
        the iterator reaches it, naming the antibodies to look at.
        """
        collection, options = self._collection(sequential, structural, batch_size, bidirectional, need_weights,
                                               need_similarity)
        return collection.fuse(**options)

    def _collection(self, sequential, structural, batch_size, bidirectional, need_weights, need_similarity):
        """The checked ``ragged.Collection`` of two lists or two dicts, and the options of its batches."""
        batch_size = _positive_int(batch_size, "batch_size")
        bidirectional, need_weights, need_similarity = (_checks.check_flag(value, name) for name, value in (
            ("bidirectional", bidirectional), ("need_weights", need_weights), ("need_similarity", need_similarity)))
        collection, _ = ragged.from_lists_or_dicts(self, sequential, structural, bidirectional=bidirectional,
                                                   join_flops=self._backend.call_flops)
        return collection, dict(batch_size=batch_size, need_weights=need_weights, need_similarity=need_similarity)

    def get_attention_weights(self) -> dict[str, np.ndarray]:
        """The parameters (not attention probabilities): query, key, value and output weights."""
        return dict(self._weights)

    def generate_report(self) -> dict:
        """A summary of the configuration and the parameters.

        Returns a dict with ``embedding_dim``, ``attention_heads``, ``is_initialized``, ``backend``,
        ``dtype``, ``float32_precision``, ``parameter_count``, ``weight_norms``, ``summary`` (readable
        multi-line text) and ``report_complete`` (True).
        """
        norms = {name: _frobenius_norm(w) for name, w in self._weights.items()}
        count = sum(w.size for w in self._weights.values())
        lines = [
            "Cross-Attention Report",
            "======================",
            f"Embedding dimension: {self.embedding_dim}",
            f"Attention heads: {self.attention_heads} (each a full {self.embedding_dim}x{self.embedding_dim} projection)",
            f"Parameters: {count:,}",
            f"Backend: {self.backend}",
            f"Compute dtype: {self.dtype or 'same as the inputs'}",
            f"float32 GEMMs: {_PRECISION_TEXT[self.float32_precision]}",
            "Weight norms (Frobenius): " + ", ".join(f"{n.split('_')[0]} {v:.4g}" for n, v in norms.items()),
            f"Initialized: {self.is_initialized}",
        ]
        return {
            "embedding_dim": self.embedding_dim,
            "attention_heads": self.attention_heads,
            "is_initialized": self.is_initialized,
            "backend": self.backend,
            "dtype": self.dtype,
            "float32_precision": self.float32_precision,
            "parameter_count": count,
            "weight_norms": norms,
            "summary": "\n".join(lines),
            "report_complete": True,
        }

    # --- helpers -------------------------------------------------------------------------------------

    def _batch(self, named_inputs: dict, free_width: tuple = (), magnitude_by_kernel: bool = False) -> _checks.Batch:
        """Validate the inputs and return them batched, as backend arrays in the compute dtype.

        Every input must be D wide except those named in ``free_width``. Results go back in the kind of
        the first input (NumPy, torch on its device, CuPy).
        On a GPU the inputs' largest magnitude is read late: call ``finish_checks()`` on the result once
        the work is queued, before handing anything back; it raises for NaN, Inf, or an input too large
        for the compute dtype, and returns that magnitude (for ``_overflow.check_results``).
        ``magnitude_by_kernel`` (a fusion's or a multi-head attention's inputs): where the backend's kernel
        may write that magnitude (``pending_magnitude``), the result's ``pending_magnitude`` goes to the
        backend's ``fuse`` or ``multi_head_attention``.
        """
        backend = self._backend
        arrays = {n: backend.native(x, n) for n, x in named_inputs.items()}
        for name, arr in arrays.items():
            _checks.check_input(arr, name, backend)
        pending = backend.pending_magnitude(*arrays.values()) if magnitude_by_kernel else None
        read_magnitude = _checks.check_values(arrays, backend, pending)
        batched = _checks.check_same_rank(arrays)
        for name, arr in arrays.items():
            if name not in free_width:
                _checks.check_width(arr, name, self.embedding_dim)
        out_dtype = self.dtype or _checks.result_dtype(
            _checks.input_dtype_name(named_inputs[n], a, backend) for n, a in arrays.items()
        )
        if out_dtype not in backend.dtypes:
            raise TypeError(f"backend {backend.name!r} supports dtypes {', '.join(backend.dtypes)}; got {out_dtype}")
        first = next(iter(named_inputs.values()))
        _checks.check_result_kind(first, out_dtype)
        layout = _checks.BatchLayout(batched, out_dtype, backend.compute_dtype(out_dtype), backend.stage_dtypes(out_dtype),
                                     backend.caller_kind(first))
        return self._checked_batch(arrays, read_magnitude, pending, layout)

    def _checked_batch(self, arrays: dict, read_magnitude, pending, layout: _checks.BatchLayout) -> _checks.Batch:
        """The ``Batch`` of checked ``arrays`` (name -> backend array) of ``layout``: cast to the compute
        dtype, batched, their values' check finished by ``finish_checks`` (``read_magnitude``: what
        ``_checks.check_values`` returned for them)."""
        backend = self._backend
        cast = tuple(backend.cast(a if layout.batched else a[None], layout.compute) for a in arrays.values())

        def finish_values() -> float:
            magnitude = read_magnitude()
            _overflow.check_cast(arrays, magnitude, layout.stages.projections, backend)
            return magnitude

        return _checks.Batch(cast, layout, finish_values, pending_magnitude=pending)

    def _ragged(self, batch, mask, len_q, len_k, q_lengths, k_lengths, names=("query_lengths", "key_lengths"),
                equal: bool = False):
        """The mask and the lengths, checked; ``equal`` (the bidirectional fusion's sum): Lq == Lk and
        equal lengths per example too.

        Lengths already on a GPU backend's device (``checks_lengths_late``) are checked there, and the
        verdict is read with the inputs' magnitude once the call's work is queued (``Batch.finish_checks``):
        reading them now would drain the GPU's queue, once per lengths array. The backend clamps
        them into range meanwhile, so no kernel reads past the padding whatever their values. A float
        mask's finiteness is read late in the same way (``_checks.check_mask``).
        """
        size, backend = batch.arrays[0].shape[0], self._backend
        masked = _checks.check_mask(mask, size, len_q, len_k, batch.batched, backend, batch.late_checks)
        if equal:
            _check_equal_lengths(len_q, len_k)
        given = {names[0]: (q_lengths, len_q), names[1]: (k_lengths, len_k)}
        if batch.batched and any(n is not None for n, _ in given.values()) and all(
            n is None or backend.checks_lengths_late(n) for n, _ in given.values()
        ):
            for name, (lengths, _) in given.items():
                if lengths is not None:
                    _checks.check_lengths_shape(tuple(lengths.shape), name, size)
            checked, verdict = backend.late_lengths([n for n, _ in given.values()], [len_q, len_k], equal)

            def on_host():  # the checks below on host copies: they raise, naming what failed
                host = {name: (None if n is None else backend.host(n, name), top) for name, (n, top) in given.items()}
                self._host_lengths(host, size, batch.batched, equal)

            batch.late_checks.append(_checks.late_check(verdict, on_host, "lengths"))
            return (masked, *checked)
        return (masked, *self._host_lengths(given, size, batch.batched, equal))

    def _host_lengths(self, given: dict, size: int, batched: bool, equal: bool) -> list:
        """The lengths (name -> (lengths, padded length)) checked on the host, as int64 arrays or None."""
        checked = [_checks.check_lengths(lengths, name, size, top, batched, self._backend)
                   for name, (lengths, top) in given.items()]
        if equal:
            _check_equal_per_example(size, *[top for _, top in given.values()], *checked)
        return checked

    def _projection(self, dtype):
        """The backend's prepared form of the weights in ``dtype``, built once per assignment."""
        cache, weights = self._prepared, self._weights  # in this order: see _Parameter.__set__
        prepared = cache.get(dtype)
        if prepared is None:
            # Threads that race here all take the first one stored (its onnxruntime sessions, its device copy).
            built = self._backend.prepare_weights(*(weights[n] for n in WEIGHT_NAMES), dtype=dtype)
            prepared = cache.setdefault(dtype, built)
        return prepared

    def _check_outputs_fit(self, batch: _checks.Batch, elements: dict, remedy: str = _OUTPUTS_REMEDY) -> None:
        """MemoryError, before any work, for results handed back in host memory that cannot fit there.
        ``elements``: what -> element count (0 or False for what was not asked for)."""
        if self._backend.results_on_host(batch.caller_kind):
            _memory.check_outputs_fit(elements, batch.out_dtype, remedy)

    def _out(self, x, batch: _checks.Batch):
        """A backend result in the caller's kind and dtype, without the batch axis the front end added."""
        return None if x is None else batch.unbatch(self._backend.to_caller(x, batch.caller_kind, batch.out_dtype))

    def _head_list(self, probs, batch: _checks.Batch):
        """(B, H, Lq, Lk) -> the seed's list of H arrays ((B,) Lq, Lk), or None: views of one conversion
        to the caller's kind and dtype (from a GPU to NumPy, one copy to the host, not one per head)."""
        if probs is None:
            return None
        heads = self._out(probs, batch)
        return [heads[:, h] if batch.batched else heads[h] for h in range(probs.shape[1])]


#: Plans a model keeps (``CrossAttention._first_planned_call``); a new layout past them starts the set anew.
_PLANS_KEPT = 16


@dataclass(frozen=True)
class _Plan:
    """What a call without mask or lengths settled from its inputs' layout and flags, for the next calls
    alike (``CrossAttention._plan``): the inputs' checked layout, the prepared weights it used (None
    for ``scaled_dot_product_attention``; a plan whose weights are no longer the model's is not used), the
    backend's ``run`` for that layout, the method's ``results`` from its parts, and the results' sizes for
    the host-memory check. A small call on a GPU is its host's time (W1), most of which went to checks
    that depend on the layout alone."""

    layout: _checks.BatchLayout  # its compute dtype is the key of the model's prepared weights
    weights: object
    run: Callable  # run(*arrays, pending magnitude) -> the backend's parts
    results: Callable  # results(model, batch, weights, parts) -> what the method returns
    outputs: dict  # what -> element count, for _check_outputs_fit
    remedy: str  # what _check_outputs_fit suggests
    magnitude_by_kernel: bool  # the backend's kernel may write the inputs' magnitude (pending_magnitude)


_PRECISION_TEXT = {
    "ieee": "IEEE float32",
    "tf32x3": "three TF32 tensor-core products (tf32x3) where the backend has them, else IEEE float32",
    "tf32": "one TF32 tensor-core product (tf32) where the backend has it, else IEEE float32",
}


def _frobenius_norm(w: np.ndarray) -> float:
    """||w||_F computed on w / max|w|: the squares of weights past 1e154 overflowed float64 (an Inf norm and
    a RuntimeWarning), and those of weights below 1e-162 underflowed (a norm of 0)."""
    top = float(np.abs(w).max())
    return 0.0 if top == 0 else top * float(np.linalg.norm(w / top))


def _settings(kwargs: dict, method: str) -> tuple:
    """(backend, dtype, float32_precision) from the keyword arguments of ``from_weights`` or ``load``."""
    unexpected = sorted(set(kwargs) - {"backend", "dtype", "float32_precision"})
    if unexpected:
        raise TypeError(f"CrossAttention.{method}() got unexpected keyword arguments: {', '.join(unexpected)} "
                        "(it takes backend, dtype and float32_precision)")
    return kwargs.get("backend", "auto"), kwargs.get("dtype"), kwargs.get("float32_precision", "ieee")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return int(value)


def _default_need_weights(need_weights, batch: _checks.Batch) -> bool:
    return (not batch.batched) if need_weights is None else _checks.check_flag(need_weights, "need_weights")


_BIDIRECTIONAL_HINT = "pass bidirectional=False to get fused_sequential and fused_structural alone"


def _check_equal_lengths(len_s: int, len_t: int) -> None:
    if len_s != len_t:
        raise ValueError(
            f"bidirectional_fusion adds fused_sequential (Ls={len_s}) and fused_structural (Lt={len_t}), "
            f"so it needs Ls == Lt; {_BIDIRECTIONAL_HINT}"
        )


def _check_equal_per_example(batch_size: int, len_s: int, len_t: int, s_len, t_len) -> None:
    if s_len is None and t_len is None:  # whole sequences, and Ls == Lt is checked: no arrays to compare
        return
    s_len = np.full(batch_size, len_s) if s_len is None else s_len
    t_len = np.full(batch_size, len_t) if t_len is None else t_len
    differs = np.flatnonzero(s_len != t_len)
    if differs.size:
        b = int(differs[0])
        raise ValueError(
            "bidirectional_fusion needs equal sequential and structural lengths per example; "
            f"example {b} has {s_len[b]} and {t_len[b]}; {_BIDIRECTIONAL_HINT}"
        )
