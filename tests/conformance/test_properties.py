"""Property-based shapes: every backend, and the exported model, against the float64 reference on drawn awkward cases.

200 examples per backend by default (100 under Triton's interpreter); set CROSSATTN_HYPOTHESIS_EXAMPLES
(``make test-slow`` sets 2000) for more. The same cases every run, unless CROSSATTN_HYPOTHESIS_SEED
names a seed: then fresh cases drawn from it, to explore beyond them. A failure shrinks to a minimal
case, which hypothesis prints.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import reference  # noqa: E402
from crossattn_gpu import CrossAttention  # noqa: E402
from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from plain_yardstick import fuse_yardstick  # noqa: E402
from runnable import BACKENDS, NOT_RUN, as_received, model_for, to_backend, to_numpy  # noqa: E402
from tolerances import check, score_scale, term_scale  # noqa: E402

EXAMPLES = int(os.environ.get("CROSSATTN_HYPOTHESIS_EXAMPLES", "200"))
#: Under Triton's interpreter a drawn case costs 0.5 to 0.8 s: the three interpreter backends took 356 s of
#: the main suite's 800 s at 200 cases each on this project's 2-core CPU, which kept CI near its 20
#: minutes. There they draw half as many unless CROSSATTN_HYPOTHESIS_EXAMPLES is set; on a GPU, all.
INTERPRETER_EXAMPLES = int(os.environ.get("CROSSATTN_HYPOTHESIS_EXAMPLES", "100"))
SEED = os.environ.get("CROSSATTN_HYPOTHESIS_SEED")
LENGTHS = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 13, 17, 31]), st.integers(1, 40))
WIDTHS = st.one_of(st.sampled_from([1, 2, 3, 8, 24, 64]), st.sampled_from([100, 257, 300]), st.integers(1, 48))


@st.composite
def fusion_cases(draw):
    batched = draw(st.booleans())
    batch = draw(st.integers(1, 4)) if batched else 1
    len_s, len_t, width = draw(LENGTHS), draw(LENGTHS), draw(WIDTHS)
    heads = draw(st.integers(1, 4 if width <= 64 else 2))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 2.0]))  # row norms up to ~35 at D = 300
    xs, xt = scale * rng.standard_normal((batch, len_s, width)), scale * rng.standard_normal((batch, len_t, width))
    mask = None
    if draw(st.booleans()):
        mask = rng.random((batch if draw(st.booleans()) else 1, len_s, len_t)) > draw(st.sampled_from([0.0, 0.3, 0.9]))
        if draw(st.booleans()):
            mask[..., 0, :] = False  # a fully masked row
    s_len = t_len = None
    if batched and draw(st.booleans()):
        s_len = rng.integers(1, len_s + 1, size=batch)
        t_len = rng.integers(1, len_t + 1, size=batch)
        if batch > 1 and draw(st.booleans()):
            s_len[0] = t_len[0] = 1  # one example of length 1 among longer ones
    if not batched:
        xs, xt, mask = xs[0], xt[0], None if mask is None else mask[0]
    return {"width": width, "heads": heads, "seed": seed, "xs": xs, "xt": xt, "mask": mask, "s_len": s_len, "t_len": t_len}


#: Cases that drawing from other seeds found at or past a limit, run first on every backend whatever the
#: seed: seed 20261215's float16 structural output 107 times smaller than its terms (tolerances.py, the
#: 16-bit rule), which failed the Triton backend by 3.5x before the rule allowed for the terms' rounding.
KNOWN_CASES = [
    {"width": 1, "heads": 2, "seed": 50, "xs": np.array([[[0.4863814], [-0.47739198]]]),
     "xt": np.array([[[0.66933962], [-1.38729454], [1.66588843]]]),
     "mask": np.array([[[False, False, False], [False, False, True]]]), "s_len": np.array([2]), "t_len": np.array([2])},
]


def head_values(model, x):
    """Every head's values times its block of the output projection, x Wv[h] Wo_h, in float64: what the
    head's probabilities weigh into the fused output."""
    _, _, wv, wo = reference.params(model)
    width = wv.shape[1]
    return [np.asarray(x, dtype=np.float64) @ wv[h] @ wo[h * width : (h + 1) * width] for h in range(len(wv))]


def check_case(case: dict, dtype: str, ref: CrossAttention, received: tuple, want: dict, got: dict) -> None:
    """``got``, a backend's fusion of ``received`` (the case's inputs as rounded to ``dtype``), against
    ``want``, the reference's: the fused outputs and the sequential -> structural probabilities (a list
    of heads), by the rules of tolerances.py."""
    def yardstick():
        xs, xt = (x if x.ndim == 3 else x[None] for x in received)
        s_len = case["s_len"] if case["s_len"] is not None else [xs.shape[1]] * len(xs)
        t_len = case["t_len"] if case["t_len"] is not None else [xt.shape[1]] * len(xt)
        mask = case["mask"] if case["mask"] is None or case["mask"].ndim == 3 else case["mask"][None]
        keys = ("fused_sequential", "fused_structural")
        return fuse_yardstick(want, keys, reference.params(ref), xs, xt, mask, s_len, t_len,
                              "float32" if dtype == "float32" else dtype)

    # float64 has a fixed limit; float32 measures the plain error only when the fixed one is missed.
    yard = None if dtype == "float64" else yardstick if dtype == "float32" else yardstick()
    wq, wk = reference.params(ref)[:2]
    scores = {"seq_to_struct": score_scale(wq, wk, *received), "struct_to_seq": score_scale(wq, wk, *received[::-1])}
    for key, direction, values in (("fused_sequential", "seq_to_struct", received[1]),
                                   ("fused_structural", "struct_to_seq", received[0])):
        terms = term_scale(want[f"attention_weights_{direction}"], head_values(ref, values))
        check(to_numpy(got[key]), want[key], dtype, yard, what=key, terms=terms, scores=scores[direction])
    for g, w in zip(to_numpy(got["attention_weights_seq_to_struct"]), want["attention_weights_seq_to_struct"]):
        check(g, w, dtype, yard, what="attention_weights_seq_to_struct", scores=scores["seq_to_struct"])


def drawn(property_holds, examples: int = EXAMPLES):
    """``property_holds`` run on ``KNOWN_CASES``, then on ``examples`` drawn cases, with this module's settings."""
    for case in KNOWN_CASES:
        property_holds = example(case)(property_holds)
    run = settings(max_examples=examples, deadline=None, derandomize=SEED is None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(
        given(fusion_cases())(property_holds))
    (run if SEED is None else seed(int(SEED))(run))()


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_drawn_fusions_match_the_reference(backend, dtype):
    def property_holds(case):
        ref = CrossAttention(case["width"], case["heads"], seed=case["seed"], backend="numpy")
        kwargs = dict(mask=case["mask"], sequential_lengths=case["s_len"], structural_lengths=case["t_len"],
                      bidirectional=False, need_weights=True)
        received = as_received(case["xs"], dtype), as_received(case["xt"], dtype)
        want = ref.fuse_representations(*received, **kwargs)
        got = model_for(backend, ref).fuse_representations(*(to_backend(x, dtype) for x in received), **kwargs)
        check_case(case, dtype, ref, received, want, got)

    drawn(property_holds, INTERPRETER_EXAMPLES if backend.startswith("triton") and interpreter_mode() else EXAMPLES)


@pytest.mark.skipif(NOT_RUN.get("onnx-float32") is not None, reason=str(NOT_RUN.get("onnx-float32")))
@pytest.mark.parametrize("backend,dtype", [("OnnxFusion", dtype) for dtype in ("float32", "float16")])
def test_drawn_fusions_of_the_exported_model_match_the_reference(tmp_path, backend, dtype):
    """The deployed model, ``to_onnx`` then ``OnnxFusion``, on the same cases: exported with the inputs
    and outputs each case needs (lengths, mask, bidirectional_fusion only for equal lengths), in the
    case's dtype (float16 computes in the float16 graphs). Its graphs are the onnx backend's, whose
    float64 ones meet these cases above; what is new here is OnnxFusion's handling of the inputs."""
    from crossattn_gpu.export import OnnxFusion, to_onnx

    def property_holds(case):
        ref = CrossAttention(case["width"], case["heads"], seed=case["seed"], backend="numpy")
        received = as_received(case["xs"], dtype), as_received(case["xt"], dtype)
        want = ref.fuse_representations(*received, mask=case["mask"], sequential_lengths=case["s_len"],
                                        structural_lengths=case["t_len"], bidirectional=False, need_weights=True)
        equal = received[0].shape[-2] == received[1].shape[-2] and np.array_equal(case["s_len"], case["t_len"])
        path = to_onnx(ref, tmp_path / "fusion.onnx", dtype=dtype, lengths=case["s_len"] is not None,
                       mask=case["mask"] is not None, attention_weights=True, bidirectional=equal)
        lengths = {} if case["s_len"] is None else {"sequential_lengths": case["s_len"],
                                                    "structural_lengths": case["t_len"]}
        got = OnnxFusion(path)(*(to_backend(x, dtype) for x in received), mask=case["mask"], **lengths)
        probabilities = np.moveaxis(got["attention_weights_seq_to_struct"], -3, 0)  # heads first, as want's list
        check_case(case, dtype, ref, received, want, {**got, "attention_weights_seq_to_struct": probabilities})

    drawn(property_holds)
