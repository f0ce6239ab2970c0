"""The scalar-option checks of ``natgrad._validation`` against plain comparisons."""

from __future__ import annotations

import decimal
import fractions
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad._validation import (
    finite_float,
    int_at_least,
    integer,
    nonnegative_float,
    nonnegative_int,
    one_of,
    positive_float,
    positive_int,
    real_number,
    unit_interval,
    unit_interval_pair,
)

FEW = settings(max_examples=40, deadline=None)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
ANY_NUMBER = ANY_FLOAT | st.integers(min_value=-(10**6), max_value=10**6)
NOT_NUMBERS = [True, False, np.bool_(True), "1.0", b"1", None, 1 + 0j, [1.0], torch.tensor(1.0)]
NOT_INTEGERS = [*NOT_NUMBERS, 2.0, np.float64(3.0), fractions.Fraction(4, 1), decimal.Decimal(5)]
EDGES = [0.0, -0.0, 1.0, math.nextafter(0.0, -1.0), math.nextafter(1.0, 2.0), math.nan, math.inf]

FLOAT_CHECKS = {
    finite_float: math.isfinite,
    positive_float: lambda v: math.isfinite(v) and v > 0,
    nonnegative_float: lambda v: math.isfinite(v) and v >= 0,
    unit_interval: lambda v: 0 <= v < 1,
}
INT_CHECKS = {
    integer: lambda v: True,
    positive_int: lambda v: v >= 1,
    nonnegative_int: lambda v: v >= 0,
}


def _assert_matches_oracle(check, value, oracle, converted_type: type) -> None:
    """``check`` returns ``value`` as ``converted_type`` where ``oracle`` accepts it; otherwise
    it raises ValueError with a message that names the option and shows ``repr(value)``."""
    if oracle(value):
        checked = check("opt", value)
        assert type(checked) is converted_type
        assert checked == value
    else:
        with pytest.raises(ValueError, match=r"^opt .*" + re.escape(repr(value))):
            check("opt", value)


@pytest.mark.parametrize("check", list(FLOAT_CHECKS), ids=lambda f: f.__name__)
@FEW
@given(value=ANY_NUMBER)
def test_float_checks_accept_exactly_their_range(check, value) -> None:
    _assert_matches_oracle(check, value, FLOAT_CHECKS[check], float)


@pytest.mark.parametrize("check", list(FLOAT_CHECKS), ids=lambda f: f.__name__)
@pytest.mark.parametrize("value", EDGES, ids=repr)
def test_float_checks_at_the_edges(check, value) -> None:
    _assert_matches_oracle(check, value, FLOAT_CHECKS[check], float)


@pytest.mark.parametrize("check", [real_number, *FLOAT_CHECKS], ids=lambda f: f.__name__)
@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
def test_float_checks_refuse_what_is_not_a_real_number(check, value) -> None:
    expected = rf"^opt must be a real number, got .* of type {type(value).__name__}$"
    with pytest.raises(TypeError, match=expected):
        check("opt", value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.float32(0.5), 0.5),
        (np.float64(0.25), 0.25),
        (np.int64(3), 3.0),
        (fractions.Fraction(1, 4), 0.25),
        (7, 7.0),
    ],
    ids=repr,
)
def test_numpy_and_other_real_numbers_become_python_floats(value, expected) -> None:
    for check in (real_number, *FLOAT_CHECKS):
        if FLOAT_CHECKS.get(check, math.isfinite)(expected):
            checked = check("opt", value)
            assert type(checked) is float
            assert checked == expected


def test_the_message_names_option_and_value() -> None:
    with pytest.raises(ValueError, match=r"^lr must be a positive finite number, got nan$"):
        positive_float("lr", math.nan)
    with pytest.raises(ValueError, match=r"^damping must be a non-negative finite number, got -1$"):
        nonnegative_float("damping", -1)
    with pytest.raises(ValueError, match=r"^beta2 must be a number in \(0, 1\], got 0.0$"):
        unit_interval("beta2", 0.0, closed_left=False, closed_right=True)
    with pytest.raises(ValueError, match=r"^n must be a positive integer, got 0$"):
        positive_int("n", 0)
    with pytest.raises(ValueError, match=r"^k must be an integer >= 2, got 1$"):
        int_at_least("k", 1, 2)
    with pytest.raises(TypeError, match=r"^lr must be a real number, got 'fast' of type str$"):
        positive_float("lr", "fast")
    with pytest.raises(TypeError, match=r"^n must be an integer, got 2.0 of type float$"):
        positive_int("n", 2.0)


@FEW
@given(value=ANY_NUMBER)
def test_real_number_accepts_every_real_number(value) -> None:
    checked = real_number("opt", value)
    assert type(checked) is float
    assert checked == value or (math.isnan(value) and math.isnan(checked))


def test_positive_float_allow_none() -> None:
    assert positive_float("max_kl", None, allow_none=True) is None
    assert positive_float("max_kl", 0.5, allow_none=True) == 0.5
    expected = r"^max_kl must be a positive finite number or None, got 0$"
    with pytest.raises(ValueError, match=expected):
        positive_float("max_kl", 0, allow_none=True)
    with pytest.raises(TypeError, match="max_kl"):
        positive_float("max_kl", None)


@pytest.mark.parametrize("closed_left", [True, False])
@pytest.mark.parametrize("closed_right", [True, False])
@FEW
@given(value=ANY_FLOAT | st.sampled_from(EDGES))
def test_unit_interval_closedness(closed_left: bool, closed_right: bool, value: float) -> None:
    above = value >= 0 if closed_left else value > 0
    below = value <= 1 if closed_right else value < 1
    check_kwargs = {"closed_left": closed_left, "closed_right": closed_right}
    if above and below:
        assert unit_interval("opt", value, **check_kwargs) == value
    else:
        interval = ("[" if closed_left else "(") + "0, 1" + ("]" if closed_right else ")")
        with pytest.raises(ValueError, match=re.escape(f"a number in {interval}, got {value!r}")):
            unit_interval("opt", value, **check_kwargs)


@FEW
@given(first=ANY_FLOAT, second=ANY_FLOAT)
def test_unit_interval_pair_checks_both_entries(first: float, second: float) -> None:
    for pair in ((first, second), [first, second], np.array([first, second])):
        if 0 <= first < 1 and 0 <= second < 1:
            checked = unit_interval_pair("betas", pair)
            assert checked == (first, second)
            assert type(checked) is tuple and all(type(b) is float for b in checked)
        else:
            bad = "betas[0]" if not 0 <= first < 1 else "betas[1]"
            with pytest.raises(ValueError, match=re.escape(bad)):
                unit_interval_pair("betas", pair)


@pytest.mark.parametrize("pair", [(), (0.9,), (0.9, 0.99, 0.999)], ids=repr)
def test_unit_interval_pair_wants_two_entries(pair) -> None:
    expected = f"betas must be a pair of numbers in [0, 1), got {pair!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        unit_interval_pair("betas", pair)


@pytest.mark.parametrize("pair", [0.9, "ab", None, (0.9, "0.99"), (True, 0.5)], ids=repr)
def test_unit_interval_pair_refuses_what_is_not_a_pair_of_numbers(pair) -> None:
    with pytest.raises(TypeError, match=r"betas"):
        unit_interval_pair("betas", pair)


@pytest.mark.parametrize("check", list(INT_CHECKS), ids=lambda f: f.__name__)
@FEW
@given(value=st.integers() | st.integers(-3, 3))
def test_int_checks_accept_exactly_their_range(check, value: int) -> None:
    _assert_matches_oracle(check, value, INT_CHECKS[check], int)


@FEW
@given(value=st.integers(-10, 10), minimum=st.integers(-5, 5))
def test_int_at_least(value: int, minimum: int) -> None:
    if value >= minimum:
        assert int_at_least("opt", value, minimum) == value
    else:
        with pytest.raises(ValueError, match=re.escape(f"opt must be an integer >= {minimum}")):
            int_at_least("opt", value, minimum)


@pytest.mark.parametrize("check", [*INT_CHECKS, lambda n, v: int_at_least(n, v, 2)])
@pytest.mark.parametrize("value", NOT_INTEGERS, ids=repr)
def test_int_checks_refuse_what_is_not_an_integer(check, value) -> None:
    expected = rf"^opt must be an integer, got .* of type {type(value).__name__}$"
    with pytest.raises(TypeError, match=expected):
        check("opt", value)


def test_numpy_integers_become_python_ints() -> None:
    for check in INT_CHECKS:
        checked = check("opt", np.int64(3))
        assert type(checked) is int
        assert checked == 3
    assert type(int_at_least("opt", np.int32(4), 2)) is int


@FEW
@given(choices=st.lists(st.text(max_size=3), min_size=1, max_size=4, unique=True), data=st.data())
def test_one_of(choices: list[str], data: st.DataObject) -> None:
    value = data.draw(st.text(max_size=3) | st.sampled_from(choices))
    if value in choices:
        assert one_of("opt", value, tuple(choices)) is value
    else:
        expected = f"opt must be one of {choices!r}, got {value!r}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            one_of("opt", value, tuple(choices))


@pytest.mark.parametrize("value", [["sgd"], None, 0, np.array(["sgd"])], ids=repr)
def test_one_of_refuses_unhashable_and_foreign_values(value) -> None:
    with pytest.raises(ValueError, match="grafting must be one of"):
        one_of("grafting", value, ("sgd", "adam"))
    assert one_of("grafting", None, ("sgd", None)) is None
