"""Series lengths chosen by dtype (:class:`natgrad.expfam.special.SeriesTerms`).

Float32 sums fewer terms (and starts the asymptotic series at 5, with 5 quadrature nodes): each
count is claimed to be the smallest whose truncation error stays below ``ε₃₂/16`` relative.
The truncation alone is measured by evaluating the float32 counts in float64 arithmetic against
mpmath at 60 digits (so rounding adds only a few float64 ulps); one term fewer must break the
bound (the counts are the smallest). Float32 evaluations are then checked against mpmath.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kl_oracle import gaussian_kl, poisson_kl

from natgrad.expfam import Dirichlet, Gamma, Gaussian, Poisson, special
from natgrad.expfam.special import (
    DOUBLE_TERMS,
    SINGLE_TERMS,
    SeriesTerms,
    series_terms,
    stirling_remainder_bregman,
    stirling_remainder_derivatives,
    trigamma,
    x_minus_log1p_small,
)

mpmath = pytest.importorskip("mpmath")
mpmath.mp.dps = 60
EPS32 = float(torch.finfo(torch.float32).eps)
EPS64 = float(torch.finfo(torch.float64).eps)
#: The claimed truncation error of the float32 counts, relative.
TRUNCATION = EPS32 / 16
SETTINGS = settings(max_examples=40, deadline=None)

# Grids over each series' whole range: φ on [−½, ½]; Stirling's remainder across the closed
# form below 1, the shifted brackets, the float32 start 5 and the float64 start 10.
PHI_POINTS = np.concatenate([np.linspace(-0.5, 0.5, 200), [-0.5, -0.4999, 1e-3, -1e-3]])
REMAINDER_POINTS = np.concatenate([np.logspace(-3, 6, 181), np.linspace(0.9, 12.0, 223)])


def _mp_phi(x: float):
    value = mpmath.mpf(x)
    return value - mpmath.log1p(value)


def _mp_remainder(x: float, derivative: int):
    value = mpmath.mpf(x)
    if derivative == 0:
        log_gamma = mpmath.loggamma(value)
        return log_gamma - (value - 0.5) * mpmath.log(value) + value - mpmath.log(2 * mpmath.pi) / 2
    if derivative == 1:
        return mpmath.digamma(value) - mpmath.log(value) + 1 / (2 * value)
    return mpmath.polygamma(1, value) - 1 / value - 1 / (2 * value**2)


def _relative_errors(result: torch.Tensor, expected: list) -> np.ndarray:
    exact = np.array([float(v) for v in expected])
    return np.abs(result.double().numpy() - exact) / np.abs(exact)


@pytest.fixture
def float32_terms_in_float64(monkeypatch):
    """Make float64 use a given :class:`SeriesTerms` (float32's by default): the result is
    then the truncated series with float64 rounding."""
    special._coefficients.cache_clear()

    def use(terms: SeriesTerms) -> None:
        special._coefficients.cache_clear()
        monkeypatch.setattr(special, "series_terms", lambda dtype: terms)

    use(SINGLE_TERMS)
    yield use
    monkeypatch.undo()
    special._coefficients.cache_clear()


def _phi_error() -> float:
    result = x_minus_log1p_small(torch.tensor(PHI_POINTS))
    return float(_relative_errors(result, [_mp_phi(x) for x in PHI_POINTS]).max())


def _remainder_error() -> float:
    table = stirling_remainder_derivatives(torch.tensor(REMAINDER_POINTS))
    return max(
        float(_relative_errors(table[d], [_mp_remainder(x, d) for x in REMAINDER_POINTS]).max())
        for d in range(3)
    )


def _bregman_error() -> float:
    """Nearby pairs ``|y − x| ≤ x/4`` (the quadrature), with an exact step."""
    x = np.repeat(np.logspace(-3, 6, 37), 2)
    step = np.tile([-0.25, 0.25], 37) * x
    result = stirling_remainder_bregman(torch.tensor(x), torch.tensor(x + step), torch.tensor(step))
    expected = []
    for first, difference in zip(x, step, strict=True):
        second = mpmath.mpf(first) + mpmath.mpf(difference)
        slope = _mp_remainder(first, 1)
        divergence = _mp_remainder(second, 0) - _mp_remainder(first, 0)
        expected.append(divergence - mpmath.mpf(difference) * slope)
    return float(_relative_errors(result, expected).max())


ERRORS = {"log_ratio": _phi_error, "remainder": _remainder_error, "nodes": _bregman_error}


@pytest.mark.parametrize("field", ["log_ratio", "remainder", "nodes"])
def test_float32_counts_truncate_below_the_claim(float32_terms_in_float64, field) -> None:
    assert ERRORS[field]() <= TRUNCATION + 16 * EPS64


def test_float32_bracket_count_truncates_below_the_claim(float32_terms_in_float64) -> None:
    """The brackets ``b(x + j)`` sit between 1 and the start: Stirling's remainder on
    ``[1, 5]`` is a sum of them and the asymptotic series (whose own error is tested above)."""
    assert _remainder_error() <= TRUNCATION + 16 * EPS64


@pytest.mark.parametrize(
    "fewer",
    [
        ("log_ratio", dataclasses.replace(SINGLE_TERMS, log_ratio=SINGLE_TERMS.log_ratio - 1)),
        ("remainder", dataclasses.replace(SINGLE_TERMS, remainder=SINGLE_TERMS.remainder - 1)),
        ("remainder", dataclasses.replace(SINGLE_TERMS, bracket=SINGLE_TERMS.bracket - 1)),
        ("nodes", dataclasses.replace(SINGLE_TERMS, nodes=SINGLE_TERMS.nodes - 1)),
    ],
)
def test_float32_counts_are_the_smallest(float32_terms_in_float64, fewer) -> None:
    field, terms = fewer
    float32_terms_in_float64(terms)
    assert ERRORS[field]() > TRUNCATION


@pytest.mark.parametrize(
    ("dtype", "terms"),
    [
        (torch.float64, DOUBLE_TERMS),
        (torch.float32, SINGLE_TERMS),
        (torch.float16, SINGLE_TERMS),
        (torch.bfloat16, SINGLE_TERMS),
    ],
)
def test_series_terms_by_dtype(dtype, terms) -> None:
    assert series_terms(dtype) == terms


@SETTINGS
@given(st.lists(st.floats(-0.5, 0.5, allow_nan=False), min_size=1, max_size=16))
def test_float32_phi_matches_mpmath(values: list[float]) -> None:
    """4 ulps of ``φ``, or float32's smallest normal where ``φ ≈ x²/2`` underflows."""
    x = torch.tensor(values, dtype=torch.float32)
    result = x_minus_log1p_small(x)
    assert result.dtype == torch.float32
    exact = np.array([float(_mp_phi(float(v))) for v in x])
    tolerance = 4 * EPS32 * exact + torch.finfo(torch.float32).tiny
    assert np.all(np.abs(result.double().numpy() - exact) <= tolerance)


@SETTINGS
@given(st.lists(st.floats(0.0, 8.0, allow_nan=False), min_size=1, max_size=8))
def test_float32_remainder_and_trigamma_match_mpmath(exponents: list[float]) -> None:
    """``μ``, ``μ′``, ``μ″`` and ``ψ′`` in float32 for ``x ≥ 1`` to 4 ulps (the closed form
    below 1 predates the float32 counts)."""
    x = torch.tensor(10.0 ** np.array(exponents), dtype=torch.float32)
    inputs = [float(v) for v in x]
    table = stirling_remainder_derivatives(x)
    for d in range(3):
        errors = _relative_errors(table[d], [_mp_remainder(v, d) for v in inputs])
        assert errors.max() <= 4 * EPS32
    expected = [mpmath.polygamma(1, mpmath.mpf(v)) for v in inputs]
    assert _relative_errors(trigamma(x), expected).max() <= 4 * EPS32


@SETTINGS
@given(
    st.lists(st.floats(0.0, 4.0), min_size=3, max_size=3),
    st.lists(st.floats(-0.5, 0.5), min_size=3, max_size=3),
)
def test_float32_concentration_kls_match_float64(exponents, log_factors) -> None:
    """Gamma and Dirichlet KLs in float32 for concentrations ``1 … 1e4`` (the shifted and
    asymptotic series) against the float64 path (itself tested against mpmath) at the same
    float32 inputs: within 8 ulps of the size of their terms, ``KL + Σ α (Δα/α)²``."""
    concentration = torch.tensor(10.0 ** np.array(exponents), dtype=torch.float32)
    other = concentration * torch.exp(torch.tensor(log_factors, dtype=torch.float32))
    rate = concentration.flip(0)
    size = (
        concentration.double()
        * ((other.double() - concentration.double()) / concentration.double()).square()
    )
    cases = [
        (Gamma(concentration, rate), Gamma(other, rate), size),
        (Dirichlet(concentration), Dirichlet(other), size.sum()),
    ]
    for p, q, terms in cases:
        result = p.kl(q)
        assert result.dtype == torch.float32
        if isinstance(p, Gamma):
            expected = Gamma(concentration.double(), rate.double()).kl(
                Gamma(other.double(), rate.double())
            )
        else:
            expected = Dirichlet(concentration.double()).kl(Dirichlet(other.double()))
        tolerance = 8 * EPS32 * (expected + terms)
        assert bool(((result.double() - expected).abs() <= tolerance).all())


@SETTINGS
@given(
    st.floats(-3.0, 3.0),
    st.floats(-0.9, 0.9),
    st.floats(-3.0, 3.0),
    st.floats(0.1, 10.0),
    st.floats(-0.6, 0.6),
)
def test_float32_poisson_and_gaussian_kls_match_decimal(
    log_rate, log_step, loc, scale, log_scale_step
) -> None:
    """The φ series in float32 through the Poisson and Gaussian KLs, against 60-digit
    oracles at the float32 natural parameters."""
    theta = torch.tensor([log_rate, log_rate + log_step], dtype=torch.float32)
    result = Poisson.from_natural(theta[:1]).kl(Poisson.from_natural(theta[1:]))
    expected = poisson_kl(float(theta[0]), float(theta[1]))
    assert abs(result.item() - expected) <= 8 * EPS32 * expected
    scales = torch.tensor([scale, scale * np.exp(log_scale_step)], dtype=torch.float32)
    p = Gaussian(torch.tensor(loc, dtype=torch.float32), scales[0])
    q = Gaussian(torch.tensor(loc, dtype=torch.float32), scales[1])
    natural = [float(v) for v in p.natural_params]
    other_natural = [float(v) for v in q.natural_params]
    expected = gaussian_kl(natural, other_natural)
    assert abs(p.kl(q).item() - expected) <= 8 * EPS32 * expected
