"""The rules themselves: one rounding of a 16-bit result passes, wherever the result lies."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

import tolerances
from tolerances import EPS, allowed, check, score_scale, term_scale, unit_in_last_place


SESSION_RECORDS = tolerances.RECORDS  # what the summary reads (the fixture below swaps it per test)


@pytest.fixture(autouse=True)
def _failing_checks_stay_out_of_the_summary(monkeypatch):
    """These tests fail checks on purpose: recorded, they read as an 'all backends' pair at 477 times its
    limit in the conformance summary (the GPU session's of 2026-11-30 did)."""
    monkeypatch.setattr(tolerances, "RECORDS", [])


@pytest.mark.parametrize("dtype,tiny", [("float16", 7e-6), ("bfloat16", 1e-39)])
def test_a_unit_in_the_last_place_grows_below_the_smallest_normal_number(dtype, tiny):
    assert unit_in_last_place(dtype) == unit_in_last_place(dtype, 1.0) == unit_in_last_place(dtype, 0.7) == EPS[dtype]
    assert unit_in_last_place(dtype, tiny) > 8 * EPS[dtype]


@pytest.mark.parametrize("want", [0.7, 1.3e-4, 6.96537157e-06, 2.1e-7])
def test_one_float16_rounding_of_the_result_passes_and_nine_units_fail(want):
    rounded = float(np.float16(want))  # the plain computation exact: a plain error of 0
    check(np.array([rounded]), np.array([want]), "float16", plain_error=0.0)
    off = rounded + 9 * float(np.spacing(np.float16(rounded)))
    with pytest.raises(AssertionError, match="relative error"):
        check(np.array([off]), np.array([want]), "float16", plain_error=0.0)


def test_fixed_limits_of_cancelling_sums_are_relative_to_their_terms():
    """A weighted mean of values that cancel, 1e4 times smaller than its terms: errors of float32 rounding
    of the terms pass, errors of a tenth of a percent of them (a wrong weight, float16 by mistake) fail,
    and an output as large as its terms keeps the fixed limit relative to itself."""
    probs = [np.full((1, 4), 0.25)]
    values = [np.array([[1e-3], [-1e-3], [1.0004e-3], [-1e-3]])]
    want = probs[0] @ values[0]  # 1e-7
    terms = term_scale(probs, values)
    assert terms == pytest.approx(1.0001e-3)
    rounding = want + 8 * 2.0**-24 * 1e-3  # a few float32 roundings of a term
    assert check(rounding, want, "float32", terms=terms) > 1e-5
    with pytest.raises(AssertionError, match="relative error"):
        check(rounding, want, "float32")  # relative to the output alone
    with pytest.raises(AssertionError, match="relative error"):
        check(want + 1e-3 * 1e-3, want, "float32", terms=terms)
    plain = [np.full((1, 2), 0.5)], [np.array([[1.0], [1.0]])]
    assert allowed("float32", None, 1.0, term_scale(*plain)) == 1e-5
    assert allowed("float64", None, 1e-7, terms) == pytest.approx(1e-10 * 1.0001e-3 / 1e-7)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_limits_of_cancelling_sums_allow_half_a_unit_of_their_terms(dtype):
    """A weighted mean 100 times smaller than its terms: an error of a third of a unit of the terms (the
    values rounded to the dtype) passes with an exact plain computation, two units fail, the output
    alone would not allow it, and an output as large as its terms keeps 4 units of itself."""
    unit = EPS[dtype]
    probs = [np.full((1, 2), 0.5)]
    values = [np.array([[1e-2], [-0.98e-2]])]
    want = probs[0] @ values[0]  # 1e-4
    terms = term_scale(probs, values)
    assert terms == pytest.approx(0.99e-2)
    check(want + unit * terms / 3, want, dtype, plain_error=0.0, terms=terms)
    with pytest.raises(AssertionError, match="relative error"):
        check(want + unit * terms / 3, want, dtype, plain_error=0.0)
    with pytest.raises(AssertionError, match="relative error"):
        check(want + 2 * unit * terms, want, dtype, plain_error=0.0, terms=terms)
    assert allowed(dtype, 0.0, 1.0, 1.0) == allowed(dtype, 0.0, 1.0) == 4 * unit
    assert allowed(dtype, 1e-3, 1e-4, terms) == pytest.approx(2e-3 + 0.5 * unit * terms / 1e-4)


def test_fixed_limits_of_probabilities_grow_with_their_scores_sums_of_magnitudes():
    """A probability inherits its score's absolute error: with scores whose sums of magnitudes reach 157
    (seed 20261204's case), an error of a unit of that sum passes in float32, ten units fail, and small
    scores keep the fixed limit; float64 keeps its limit."""
    rng = np.random.default_rng(0)
    wq, wk = rng.standard_normal((2, 2, 4, 4)) * 0.1
    xq, xk = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    want = np.abs(xq @ wq[0]) @ np.abs(xk @ wk[0]).T / 2.0
    assert score_scale(wq, wk, xq, xk) == pytest.approx(max(want.max(), (np.abs(xq @ wq[1]) @ np.abs(xk @ wk[1]).T / 2).max()))
    probs = np.array([0.6, 0.3, 0.1])
    unit = 2.0**-23 * 157
    check(probs + np.array([unit, -unit, 0.0]), probs, "float32", scores=157.0)
    with pytest.raises(AssertionError, match="relative error"):
        check(probs + np.array([10 * unit, 0.0, 0.0]), probs, "float32", scores=157.0)
    assert allowed("float32", None, 1.0, None, 3.0) == 1e-5
    assert allowed("float64", None, 1.0, None, 157.0) == 1e-10


def test_the_summary_joins_what_xdist_workers_checked(tmp_path, monkeypatch, request):
    """Each worker's records reach the controller's summary (each worker used to write its own alone)."""
    summary = next(plugin for plugin in request.config.pluginmanager.get_plugins()
                   if getattr(plugin, "__file__", "").endswith(os.path.join("conformance", "conftest.py")))
    target = tmp_path / "summary"
    monkeypatch.setenv("CROSSATTN_CONFORMANCE_SUMMARY", str(target))

    def session(workerid=None):
        return SimpleNamespace(config=SimpleNamespace(**({"workerinput": {"workerid": workerid}} if workerid else {})))

    for worker, pair in (("gw0", "a vs numpy-float64"), ("gw1", "b vs itself")):
        monkeypatch.setattr(tolerances, "RECORDS", [{"pair": pair, "error": 1e-6, "limit": 1e-5}])
        summary.pytest_sessionfinish(session(worker), 0)
    monkeypatch.setattr(tolerances, "RECORDS", [{"pair": "a vs numpy-float64", "error": 4e-6, "limit": 1e-5}])
    summary.pytest_sessionfinish(session(), 0)
    pairs = json.loads(target.with_suffix(".json").read_text())["pairs"]
    assert pairs["a vs numpy-float64"]["checks"] == 2 and pairs["a vs numpy-float64"]["worst_error"] == 4e-6
    assert pairs["b vs itself"]["checks"] == 1
    assert "| b vs itself | 1 |" in target.with_suffix(".md").read_text()
    assert not list(tmp_path.glob("*.records.json"))


def test_checks_failed_on_purpose_reach_no_summary():
    before = len(SESSION_RECORDS)
    with pytest.raises(AssertionError, match="relative error"):
        check(np.array([1.01]), np.array([1.0]), "float32")
    assert tolerances.RECORDS and tolerances.RECORDS[-1]["error"] == pytest.approx(0.01)
    assert len(SESSION_RECORDS) == before
