"""ONNX graphs of the seed's operations, built node by node with ``onnx.helper``.

Why build the graph directly rather than trace it through torch's exporter: the semantics that make
this library's function (the seed's -1e9 mask fill that leaves a fully masked row uniform, padded keys
with exactly zero weight, padded query rows set to zero, dynamic B and L) are a handful of explicit
``Where`` nodes here, in any opset from 14 on, with no torch in the export path and nothing a tracer
could specialise to the example shapes. The same builder also emits the ``Attention`` operator of
opset 23.

Two flavours of the attention core:
* opset < 23: MatMul / Softmax decomposition. A float16 model's scores are cast to float32 before the
  mask fill and the softmax, so it applies the seed's -1e9 (which float16 cannot hold) without Inf or
  NaN; float32 and float64 models keep their own dtype throughout.
* opset >= 23: the ``Attention`` operator with an additive float mask (-1e9, or -3e4 in float16, for
  masked scores; -inf for padded keys). An additive fill is the seed's replacement only when a row
  keeps a key; rows whose every valid key is masked are uniform in the seed, so they are set to the
  mean of the values over the valid keys.
The projections are folded (SPEC section 4, ``crossattn_gpu.folding``) when the model is built:
queries take A_h = Wq[h] Wk[h]^T / sqrt(D), the raw inputs are every head's keys, values take
U_h = Wv[h] Wo_h, and the output is the sum of the heads' outputs (taken in float32, or float64). That is half
the projection FLOPs of the direct formulation, with no output MatMul: onnxruntime on this project's
2-core CPU, float32, W3c (D = 1280) 543 -> 296 ms, W2c 151 -> 131 ms. The Attention operator wants
as many key heads as value heads, so there the raw keys are expanded over the heads.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MASK_FILL = -1e9
_FLOAT16_MASK_FILL = -3e4  # finite in float16 and far below any real score
ELEMENT_TYPES = {"float64": TensorProto.DOUBLE, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
MIN_OPSET = 14
ATTENTION_OPSET = 23


#: The external-data location of weights kept out of the model (``GraphBuilder(external=...)``): no file
#: of that name is ever read, since the session receives the arrays themselves.
IN_MEMORY = "crossattn_gpu-in-memory"


class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs, with unique names.

    With ``external`` (a dict), the weights stay out of the model: each one's initializer refers to
    external data at ``IN_MEMORY``, and ``external`` receives its array (name -> C-contiguous array in
    the model's dtype) for ``OnnxSession(..., initializers=external)``.
    """

    def __init__(self, dtype: str, external: dict | None = None):
        self.dtype = dtype
        self.elem = ELEMENT_TYPES[dtype]
        # Softmax, the heads' sum and the similarities run in float32 for float16 models, else in the
        # model's dtype.
        self.acc = "float64" if dtype == "float64" else "float32"
        self.acc_elem = ELEMENT_TYPES[self.acc]
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self.external = external
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list, hint: str | None = None, **attrs) -> str:
        out = self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def const(self, value, dtype=None, hint: str = "const") -> str:
        """An initializer holding ``value`` (default: the model's float dtype)."""
        arr = np.asarray(value, dtype=dtype or np.dtype(self.dtype))
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if self.external is None:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        tensor = TensorProto(name=name, data_type=self.elem, dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", IN_MEMORY), ("offset", "0"), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        self.external[name] = array
        return name

    def add_input(self, name: str, elem, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def add_output(self, name: str, source: str, elem, shape) -> None:
        self.nodes.append(helper.make_node("Identity", [source], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def model(self, opset: int, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "crossattn_gpu", self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="crossattn_gpu")
        model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime releases of 2024 on
        helper.set_model_props(model, metadata)
        return model

    # --- small composites ----------------------------------------------------------------------------

    def dim(self, x: str, axis: int) -> str:
        """Dimension ``axis`` of x as a 1-element int64 tensor."""
        return self.op("Gather", [self.op("Shape", [x]), self.const([axis], np.int64)], axis=0)

    def valid_positions(self, x: str, lengths: str) -> str:
        """(B, L) bool: position < lengths[b], for x of shape (B, L, ...)."""
        length = self.op("Squeeze", [self.dim(x, 1), self.const([0], np.int64)])
        positions = self.op("Range", [self.const(0, np.int64), length, self.const(1, np.int64)])
        return self.op(
            "Less",
            [self.op("Unsqueeze", [positions, self.const([0], np.int64)]), self.op("Unsqueeze", [lengths, self.const([1], np.int64)])],
        )

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        return self.op("Unsqueeze", [x, self.const(axes, np.int64)])

    def zero_rows(self, x: str, valid: str | None) -> str:
        """x (B, L, ...) with rows at invalid positions set to zero."""
        if valid is None:
            return x
        return self.op("Where", [self.unsqueeze(valid, [2]), x, self.const(0.0)])

    def split_heads(self, x: str, heads: int, width: int) -> str:
        """(B, L, H*W) -> (B, H, L, W)."""
        shaped = self.op("Reshape", [x, self.const([0, 0, heads, width], np.int64)])
        return self.op("Transpose", [shaped], perm=[0, 2, 1, 3])

    def to_acc(self, x: str) -> str:
        """x in the accumulation dtype ``acc``."""
        return x if self.dtype == self.acc else self.op("Cast", [x], to=self.acc_elem)

    def to_model_dtype(self, x: str) -> str:
        """x, in the accumulation dtype, back in the model's dtype."""
        return x if self.dtype == self.acc else self.op("Cast", [x], to=self.elem)


def attention_core(g: GraphBuilder, q, k, v, *, scale: float, keep, k_valid, opset: int, need_probs: bool):
    """softmax(scale q k^T, masked) v for q (B, H, Lq, W), k and v (B, H, Lk, W').

    ``keep``: bool (Bm, 1, Lq, Lk) or None, False where the seed's mask is 0. ``k_valid``: bool (B, Lk)
    or None. Returns (output (B, H, Lq, W'), probabilities (B, H, Lq, Lk) in ``g.acc`` or None).
    """
    key_ok = None if k_valid is None else g.unsqueeze(k_valid, [1, 2])  # (B, 1, 1, Lk)

    def scores():
        """The scaled scores, in ``g.acc``, with the seed's fill where masked and -inf past the key lengths.

        The fills are a Mul by the mask (1 or 0) and an Add of a bias without the heads' axis (0, the
        seed's -1e9, or -inf past the length): for finite scores that is exactly the replacement,
        and onnxruntime adds and multiplies far faster than it selects with a broadcast condition
        (64 x 4 x 256 x 256 float32 scores on this project's CPU: Where 14.4 ms, Add 2.8 ms).
        """
        raw = g.to_acc(g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]))
        if scale != 1.0:  # the folded graphs carry the scale in their weights
            raw = g.op("Mul", [raw, g.const(scale, g.acc)])
        bias = None
        if key_ok is not None:
            bias = g.op("Where", [key_ok, g.const(0.0, g.acc), g.const(-np.inf, g.acc)])
        if keep is not None:
            raw = g.op("Mul", [raw, g.op("Cast", [keep], to=g.acc_elem)])
            fill = g.op("Where", [keep, g.const(0.0, g.acc), g.const(MASK_FILL, g.acc)])
            bias = fill if bias is None else g.op("Add", [fill, bias])
        return raw if bias is None else g.op("Add", [raw, bias])

    if opset < ATTENTION_OPSET and g.dtype == g.acc:
        # The product (Lq x W') is normalised rather than the weights (Lq x Lk), as the NumPy backend
        # does: the weights are not rounded before the product. On a drawn case whose heads nearly
        # cancel (D = 1, H = 2) that took the error from 2.4e-5 to 1.9e-5 (the plain float32 seed:
        # 1.2e-5), and W2c from 149 to 141 ms. Not for float16, where the unnormalised product (up to
        # Lk times a value) could overflow.
        s = scores()
        axes = {"axes": [-1]} if opset < 18 else {}
        row_max = g.op("ReduceMax", [s] + ([] if opset < 18 else [g.const([-1], np.int64)]), keepdims=1, **axes)
        e = g.op("Exp", [g.op("Sub", [s, row_max])])
        total = g.op("ReduceSum", [e, g.const([-1], np.int64)], keepdims=1)
        out = g.op("Div", [g.op("MatMul", [e, v]), total])
        return out, (g.op("Div", [e, total]) if need_probs else None)

    probs = g.op("Softmax", [scores()], axis=-1) if (need_probs or opset < ATTENTION_OPSET) else None
    if opset < ATTENTION_OPSET:
        return g.op("MatMul", [g.to_model_dtype(probs), v]), probs

    fill = _FLOAT16_MASK_FILL if g.dtype == "float16" else MASK_FILL
    inputs = [q, k, v]
    if keep is not None or key_ok is not None:
        additive = g.const(0.0)
        if keep is not None:
            additive = g.op("Where", [keep, additive, g.const(fill)])
        if key_ok is not None:
            additive = g.op("Where", [key_ok, additive, g.const(-np.inf)])
        # onnxruntime wants the mask's query axis in full: (B or 1, 1, Lq, Lk).
        one = g.const([1], np.int64)
        inputs.append(g.op("Expand", [additive, g.op("Concat", [one, one, g.dim(q, 2), one], axis=0)]))
    out = g.op("Attention", inputs, scale=float(scale))
    if keep is None:
        return out, probs
    # Rows whose every valid key is masked: the seed's -1e9 makes them uniform over the valid keys.
    kept = keep if key_ok is None else g.op("And", [keep, key_ok])
    any_kept = g.op("ReduceMax", [g.op("Cast", [kept], to=TensorProto.FLOAT), g.const([-1], np.int64)], keepdims=1)
    if key_ok is None:
        mean_v = g.op("ReduceMean", [v, g.const([2], np.int64)], keepdims=1)
    else:
        weights = g.op("Cast", [g.op("Transpose", [key_ok], perm=[0, 1, 3, 2])], to=g.elem)  # (B, 1, Lk, 1)
        total = g.op("ReduceSum", [g.op("Mul", [v, weights]), g.const([2], np.int64)], keepdims=1)
        mean_v = g.op("Div", [total, g.op("ReduceSum", [weights, g.const([2], np.int64)], keepdims=1)])
    return g.op("Where", [g.op("Greater", [any_kept, g.const(0.0, np.float32)]), out, mean_v]), probs


#: Widest heads (D) whose folded projections are one batched MatMul against (1, H, D, D) weights, which
#: gives the heads' (B, H, L, D) at once; wider heads take a 2-D MatMul against (D, H*D) weights (which
#: onnxruntime pre-packs) and a transpose into heads. onnxruntime 1.32 on this project's 2-core CPU,
#: float32, one input's queries and values, 2-D / batched: D = 64 4.0 / 2.4 ms, 128 13.6 / 9.1, 256
#: 10.1 / 8.8, 640 31.3 / 28.9, 768 42.4 / 42.1, 896 43.2 / 45.3, 1024 35.7 / 40.2, 1280 (H = 8) 112 / 126.
#: One MatMul for both parts and a Split (the earlier graph) was slower than either: 19.1 ms at D = 128.
BATCHED_HEADS_MAX_WIDTH = 768


def head_weights(block: np.ndarray, heads: int, width: int) -> np.ndarray:
    """A (D, H*D) block of folded weights, [A_0 .. A_H-1] or [U_0 .. U_H-1], in the layout that
    ``project_heads`` multiplies: (1, H, D, D) up to ``BATCHED_HEADS_MAX_WIDTH``, else (D, H*D)."""
    if width > BATCHED_HEADS_MAX_WIDTH:
        return block
    return block.reshape(width, heads, width).transpose(1, 0, 2)[None]


def project_heads(g: GraphBuilder, x: str, weights: list[str], heads: int, width: int) -> list[str]:
    """x (B, L, D) times each of the ``head_weights`` initializers named in ``weights``: (B, H, L, D) each."""
    if width > BATCHED_HEADS_MAX_WIDTH:
        return [g.split_heads(g.op("MatMul", [x, w]), heads, width) for w in weights]
    x = g.unsqueeze(x, [1])  # (B, 1, L, D): MatMul broadcasts it over the heads
    return [g.op("MatMul", [x, w]) for w in weights]


def folded_multi_head(g: GraphBuilder, q, xk, v, *, heads: int, width: int, keep, q_valid, k_valid,
                      opset: int, need_probs: bool):
    """The seed's multi-head attention from folded projections (``project_heads``): queries ``q`` =
    X_q A_h and values ``v`` = X_v U_h, both (B, H, L, D); the raw ``xk`` (B, Lk, D) are every head's
    keys. Returns ((B, Lq, D), probs or None)."""
    k = g.unsqueeze(xk, [1])  # (B, 1, Lk, D): MatMul broadcasts it over the heads
    if opset >= ATTENTION_OPSET:  # the Attention operator wants as many key heads as value heads
        k = g.op("Expand", [k, g.const([1, heads, 1, 1], np.int64)])
    out, probs = attention_core(g, q, k, v, scale=1.0, keep=keep, k_valid=k_valid, opset=opset, need_probs=need_probs)
    # The output projection is inside the values: the output is the heads' sum (in ``g.acc``).
    out = g.to_model_dtype(g.op("ReduceSum", [g.to_acc(out), g.const([1], np.int64)], keepdims=0))
    return g.zero_rows(out, q_valid), zero_prob_rows(g, probs, q_valid)


def zero_prob_rows(g: GraphBuilder, probs, q_valid):
    """Probabilities (B, H, Lq, Lk) with the rows of padded queries set to zero (``q_valid`` (B, Lq))."""
    if probs is None or q_valid is None:
        return probs
    return g.op("Where", [g.unsqueeze(q_valid, [1, 3]), probs, g.const(0.0, g.acc)])


def cosine_similarity(g: GraphBuilder, a: str, b: str, opset: int) -> str:
    """(B, La, D) x (B, Lb, D) -> (B, La, Lb) in ``g.acc``; a zero row gives 0.

    Each row is divided by its largest magnitude first (floored at the smallest positive number, so a
    zero row stays zero), so that its squares neither overflow nor underflow: unscaled, rows of
    magnitude 1e-20 lost precision to subnormal squares and rows of 1e-30 or 1e20 came out wrong. A
    scaled row that is not zero has a norm of at least 1, so flooring the norm at 1 changes only zero
    rows.
    """
    def along_rows(op: str, x: str) -> str:
        # Before opset 18 these reductions take their axes as an attribute, from it as an input.
        if opset < 18:
            return g.op(op, [x], axes=[-1], keepdims=1)
        return g.op(op, [x, g.const([-1], np.int64)], keepdims=1)

    def unit_rows(x):
        x = g.to_acc(x)
        # The largest magnitude from a max and a min (no temporary), and ReduceSumSquare for the norm.
        # The similarities of W2c's (64, 256, 128) pair, medians of 60 alternating runs, two sessions
        # each: unscaled 13.6 / 14.7 ms, scaled this way 13.5 / 13.3 (with Abs and Mul: 16.0 / 13.6).
        top = g.op("Max", [along_rows("ReduceMax", x), g.op("Neg", [along_rows("ReduceMin", x)])])
        x = g.op("Div", [x, g.op("Max", [top, g.const(np.finfo(g.acc).smallest_subnormal, g.acc)])])
        norm = g.op("Sqrt", [along_rows("ReduceSumSquare", x)])
        return g.op("Div", [x, g.op("Max", [norm, g.const(1.0, g.acc)])])

    return g.op("MatMul", [unit_rows(a), g.op("Transpose", [unit_rows(b)], perm=[0, 2, 1])])
