"""Trigamma, ``x − log(1 + x)`` and Stirling's remainder against SciPy and mpmath.

``torch.polygamma(1, x)`` is off by up to 5e-10 relative in float64 on ``0 < x < 1000``; the
oracles here are ``scipy.special.polygamma`` (1e-15) and mpmath at 60 digits.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.expfam.special import (
    stirling_remainder,
    stirling_remainder_bregman,
    trigamma,
    x_minus_log1p,
)

mpmath = pytest.importorskip("mpmath")
mpmath.mp.dps = 60
SETTINGS = settings(max_examples=60, deadline=None)
EPS64 = float(torch.finfo(torch.float64).eps)
# Arguments 10^e for e in [-8, 12]: small, moderate, and very large.
LOG_ARGUMENTS = st.floats(-8.0, 12.0, allow_nan=False)


def _mpmath_remainder(x: float, derivative: int):
    """``μ(x) = log Γ(x) − (x − ½) log x + x − ½ log 2π`` or a derivative, at 60 digits."""
    value = mpmath.mpf(x)
    if derivative == 0:
        return (
            mpmath.loggamma(value)
            - (value - 0.5) * mpmath.log(value)
            + value
            - mpmath.log(2 * mpmath.pi) / 2
        )
    if derivative == 1:
        return mpmath.digamma(value) - mpmath.log(value) + 1 / (2 * value)
    return mpmath.polygamma(1, value) - 1 / value - 1 / (2 * value**2)


@SETTINGS
@given(st.lists(LOG_ARGUMENTS, min_size=1, max_size=8))
def test_trigamma_matches_mpmath_in_float64(exponents: list[float]) -> None:
    x = 10.0 ** np.array(exponents)
    expected = np.array([float(mpmath.polygamma(1, mpmath.mpf(v))) for v in x])
    np.testing.assert_allclose(trigamma(torch.tensor(x)).numpy(), expected, rtol=4 * EPS64)


@SETTINGS
@given(st.lists(st.floats(-6.0, 12.0, allow_nan=False), min_size=1, max_size=8))
def test_trigamma_matches_mpmath_in_float32(exponents: list[float]) -> None:
    x = torch.tensor(10.0 ** np.array(exponents), dtype=torch.float32)
    result = trigamma(x)
    assert result.dtype == torch.float32
    expected = np.array([float(mpmath.polygamma(1, mpmath.mpf(float(v)))) for v in x])
    np.testing.assert_allclose(result.double().numpy(), expected, rtol=1e-6)


def test_trigamma_matches_scipy_on_a_grid() -> None:
    x = np.concatenate([np.logspace(-8, 0, 41), np.logspace(0, 3, 61), np.logspace(3, 12, 19)])
    expected = scipy.special.polygamma(1, x)
    np.testing.assert_allclose(trigamma(torch.tensor(x)).numpy(), expected, rtol=4 * EPS64)


def test_trigamma_gradient_is_tetragamma() -> None:
    x = torch.tensor([1e-6, 0.3, 1.0, 7.5, 9.999, 10.0, 42.0, 1e5], requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    (gradient,) = torch.autograd.grad(trigamma(x64).sum(), x64)
    expected = scipy.special.polygamma(2, x64.detach().numpy())
    np.testing.assert_allclose(gradient.numpy(), expected, rtol=1e-13)
    assert torch.autograd.gradcheck(trigamma, (x64[1:5],))


def test_trigamma_falls_back_to_torch_off_the_positive_axis() -> None:
    x = torch.tensor([-2.5, -0.3, 0.0, float("nan")], dtype=torch.float64)
    torch.testing.assert_close(trigamma(x), torch.polygamma(1, x), equal_nan=True)


@SETTINGS
@given(st.floats(-15.0, 3.0), st.booleans())
def test_x_minus_log1p_matches_mpmath(exponent: float, negative: bool) -> None:
    x = -min(10.0**exponent, 1.0 - 1e-9) if negative else 10.0**exponent
    value = mpmath.mpf(x)
    expected = float(value - mpmath.log1p(value))
    result = x_minus_log1p(torch.tensor([x], dtype=torch.float64)).item()
    assert abs(result - expected) <= 4 * EPS64 * expected


def test_x_minus_log1p_uses_the_ratio_near_minus_one() -> None:
    """``1 + x`` formed from ``x = −1 + 10⁻²⁰`` is 0: the quotient passed instead keeps it."""
    ratio = torch.tensor([1e-20], dtype=torch.float64)
    result = x_minus_log1p(ratio - 1.0, ratio).item()
    expected = float(mpmath.mpf(1e-20) - 1 - mpmath.log(mpmath.mpf(1e-20)))
    assert abs(result - expected) <= 4 * EPS64 * expected


@SETTINGS
@given(LOG_ARGUMENTS, st.sampled_from([0, 1, 2]))
def test_stirling_remainder_matches_mpmath(exponent: float, derivative: int) -> None:
    x = 10.0**exponent
    expected = float(_mpmath_remainder(x, derivative))
    result = stirling_remainder(torch.tensor([x], dtype=torch.float64), derivative).item()
    assert abs(result - expected) <= 8 * EPS64 * abs(expected)


@SETTINGS
@given(st.floats(-6.0, 11.0), st.floats(-14.0, 3.0), st.booleans())
def test_stirling_remainder_bregman_matches_mpmath(
    exponent: float, step_exponent: float, negative: bool
) -> None:
    """Nearby points (integral) and far ones (difference), oracle at 60 digits."""
    x = 10.0**exponent
    factor = -min(10.0**step_exponent, 0.9) if negative else 10.0**step_exponent
    y = x + x * factor
    difference = y - x
    expected = float(
        _mpmath_remainder(y, 0)
        - _mpmath_remainder(x, 0)
        - (mpmath.mpf(y) - mpmath.mpf(x)) * _mpmath_remainder(x, 1)
    )
    result = stirling_remainder_bregman(
        *(torch.tensor([v], dtype=torch.float64) for v in (x, y, difference))
    ).item()
    # The difference form (|y − x| > x/4) cancels terms of size |μ(x)| + |(y − x) μ′(x)|.
    scale = abs(float(_mpmath_remainder(x, 0))) + abs(difference * float(_mpmath_remainder(x, 1)))
    tolerance = 1e-14 * expected + (16 * EPS64 * scale if abs(factor) > 0.25 else 0.0)
    assert abs(result - expected) <= tolerance


def test_stirling_remainder_rejects_an_unknown_derivative() -> None:
    with pytest.raises(ValueError, match="derivative must be 0, 1 or 2, got 3"):
        stirling_remainder(torch.ones(1), 3)
