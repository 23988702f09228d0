"""The rules themselves: one rounding of a 16-bit result passes, wherever the result lies."""

import numpy as np
import pytest

from tolerances import EPS, check, unit_in_last_place


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
