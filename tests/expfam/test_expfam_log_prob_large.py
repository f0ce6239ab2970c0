"""``log_prob`` of the Gamma, Beta and Dirichlet up to concentrations 1e12, against 60-digit
``decimal`` oracles (:mod:`decimal_oracle`).

Near the mean the generic ``⟨θ, T(x)⟩ − A(θ)`` cancelled terms of size ``α log α`` (errors
2e-9 at ``α = 1e6``, 2e-3 at ``1e12``). The tolerance is a few ulps of ``1 + |log p|`` plus the
condition number of ``log p`` in ``x`` (``|x ∂ log p/∂x|``, the error of rounding ``x``); far
from the mean, where the generic form is kept, a few ulps of the sum of its terms' sizes.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats
import torch
from decimal_oracle import beta_log_density, dirichlet_log_density, gamma_log_density
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from natgrad.expfam import Beta, Dirichlet, Gamma

EPS64 = float(torch.finfo(torch.float64).eps)
SETTINGS = settings(max_examples=60, deadline=None)
LOG_CONCENTRATIONS = st.floats(-1.0, 12.0)
# Standard deviations from the mean; beyond ±0.5 relative the generic form is used.
OFFSETS = st.floats(-6.0, 6.0)


def _tensor(value) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def _gamma_tolerance(x: float, shape: float, rate: float, expected: float) -> float:
    if abs(rate * x / shape - 1.0) <= 0.5:
        return 16 * EPS64 * (1.0 + abs(expected) + abs(shape - 1.0 - rate * x))
    terms = abs((shape - 1) * math.log(x)) + abs(shape * math.log(rate)) + rate * x
    return 8 * EPS64 * (1.0 + terms + abs(math.lgamma(shape)))


@SETTINGS
@given(LOG_CONCENTRATIONS, st.floats(-3.0, 3.0), OFFSETS)
def test_gamma_log_prob_matches_decimal(log_shape, log_rate, offset) -> None:
    shape, rate = 10.0**log_shape, 10.0**log_rate
    mean = shape / rate
    x = max(mean * (1.0 + offset / math.sqrt(shape)), mean * 1e-3)
    expected = gamma_log_density(x, shape, rate)
    result = Gamma(_tensor(shape), _tensor(rate)).log_prob(_tensor(x)).item()
    assert abs(result - expected) <= _gamma_tolerance(x, shape, rate, expected)


def _beta_tolerance(x: float, a: float, b: float, expected: float) -> float:
    mean = a / (a + b)
    if abs(x - mean) <= 0.5 * min(mean, 1.0 - mean):
        conditioning = abs(a - 1.0 - (a + b - 2.0) * x) / (1.0 - x)
        return 16 * EPS64 * (1.0 + abs(expected) + conditioning)
    terms = abs((a - 1) * math.log(x)) + abs((b - 1) * math.log1p(-x))
    return (
        8
        * EPS64
        * (1.0 + terms + abs(math.lgamma(a)) + abs(math.lgamma(b)) + abs(math.lgamma(a + b)))
    )


@SETTINGS
@given(LOG_CONCENTRATIONS, st.floats(-2.0, 2.0), OFFSETS)
def test_beta_log_prob_matches_decimal(log_a, log_ratio, offset) -> None:
    a = 10.0**log_a
    b = a * 10.0**log_ratio
    mean = a / (a + b)
    spread = math.sqrt(mean * (1.0 - mean) / (a + b + 1.0))
    x = min(max(mean + offset * spread, 1e-300), 1.0 - 2**-53)
    x = max(x, mean * 1e-3) if x < mean else min(x, 1.0 - (1.0 - mean) * 1e-3)
    expected = beta_log_density(x, a, b)
    result = Beta(_tensor(a), _tensor(b)).log_prob(_tensor(x)).item()
    assert abs(result - expected) <= _beta_tolerance(x, a, b, expected)


def _simplex_point(concentration: np.ndarray, offsets: list[float]) -> np.ndarray | None:
    """A point near the mean whose coordinates are multiples of 2⁻⁵³ summing to exactly 1, or
    ``None`` where the offsets overshoot (small concentrations) and leave no last coordinate."""
    mean = concentration / concentration.sum()
    spread = np.sqrt(mean * (1.0 - mean) / (concentration.sum() + 1.0))
    head = np.clip(mean[:-1] + np.array(offsets) * spread[:-1], mean[:-1] * 1e-3, None)
    head = np.round(head * 2.0**53) / 2.0**53
    if head.sum() >= 1.0:
        return None
    point = np.append(head, 1.0 - head.sum())
    assert sum(Fraction(v) for v in point) == 1 and np.all(point > 0)
    return point


@SETTINGS
@given(
    st.lists(LOG_CONCENTRATIONS, min_size=3, max_size=3),
    st.lists(st.floats(-3.0, 3.0), min_size=2, max_size=2),
)
def test_dirichlet_log_prob_matches_decimal(log_concentrations, offsets) -> None:
    concentration = 10.0 ** np.array(log_concentrations)
    # Keep the last coordinate away from 0 so that the head offsets leave a valid point.
    concentration[-1] = concentration.max()
    x = _simplex_point(concentration, offsets)
    assume(x is not None)
    expected = dirichlet_log_density(x, concentration)
    result = Dirichlet(_tensor(concentration)).log_prob(_tensor(x)).item()
    mean = concentration / concentration.sum()
    if np.all(np.abs(x - mean) <= 0.5 * mean):
        count = len(x)
        conditioning = np.abs(concentration - 1.0 - (concentration.sum() - count) * x).sum()
        tolerance = 16 * EPS64 * (1.0 + abs(expected) + conditioning)
    else:
        terms = np.abs((concentration - 1.0) * np.log(x)).sum()
        lgammas = sum(abs(math.lgamma(v)) for v in concentration)
        tolerance = 8 * EPS64 * (1.0 + terms + lgammas + abs(math.lgamma(concentration.sum())))
    assert abs(result - expected) <= tolerance


@pytest.mark.parametrize("concentration", [1e6, 1e9, 1e12])
def test_log_prob_at_the_mode_of_huge_concentrations(concentration) -> None:
    """The cases that failed: all three families at their mean, for ``α = 1e6 … 1e12``."""
    gamma = Gamma(_tensor(concentration), _tensor(2.0)).log_prob(_tensor(concentration / 2))
    expected = gamma_log_density(concentration / 2, concentration, 2.0)
    assert abs(gamma.item() - expected) <= 64 * EPS64 * (1.0 + abs(expected))
    beta = Beta(_tensor(concentration), _tensor(3 * concentration)).log_prob(_tensor(0.25))
    expected = beta_log_density(0.25, concentration, 3 * concentration)
    assert abs(beta.item() - expected) <= 64 * EPS64 * (1.0 + abs(expected))
    alphas = concentration * np.array([1.0, 2.0, 5.0])
    x = np.array([1.0, 2.0, 5.0]) / 8.0
    dirichlet = Dirichlet(_tensor(alphas)).log_prob(_tensor(x))
    expected = dirichlet_log_density(x, alphas)
    assert abs(dirichlet.item() - expected) <= 64 * EPS64 * (1.0 + abs(expected))


def test_decimal_oracle_agrees_with_scipy_for_moderate_concentrations() -> None:
    """Where SciPy is accurate (α ≤ 100) it agrees with the decimal oracle to 1e-13."""
    for shape, rate, x in [(0.3, 2.0, 0.05), (4.5, 0.5, 7.0), (80.0, 3.0, 30.0)]:
        expected = scipy.stats.gamma.logpdf(x, shape, scale=1.0 / rate)
        assert abs(gamma_log_density(x, shape, rate) - expected) <= 1e-13 * (1 + abs(expected))
    for a, b, x in [(0.5, 0.7, 0.2), (3.0, 40.0, 0.1), (90.0, 60.0, 0.55)]:
        expected = scipy.stats.beta.logpdf(x, a, b)
        assert abs(beta_log_density(x, a, b) - expected) <= 1e-13 * (1 + abs(expected))
    concentration, x = np.array([0.4, 3.0, 25.0]), np.array([0.125, 0.25, 0.625])
    expected = scipy.stats.dirichlet.logpdf(x, concentration)
    assert abs(dirichlet_log_density(x, concentration) - expected) <= 1e-13 * (1 + abs(expected))


def test_log_prob_keeps_sample_shapes_and_gradients() -> None:
    """Sample dimensions broadcast over the batch; gradients in θ and x are finite where the
    two forms meet and at the boundary of the support's open interior."""
    gamma = Gamma(_tensor([2.0, 1e8]).requires_grad_(True), _tensor([1.0, 3.0]))
    x = _tensor([[1.0, 1e8 / 3], [0.5, 1e8 / 6], [3.0, 1e8 / 2]]).requires_grad_(True)
    log_prob = gamma.log_prob(x)
    assert log_prob.shape == (3, 2)
    gradients = torch.autograd.grad(log_prob.sum(), (x,))
    assert all(bool(g.isfinite().all()) for g in gradients)
    dirichlet = Dirichlet(_tensor([[2.0, 3.0, 5.0]]))
    points = torch.distributions.Dirichlet(_tensor([2.0, 3.0, 5.0])).sample((4,))
    torch.testing.assert_close(
        dirichlet.log_prob(points), dirichlet.to_torch().log_prob(points), rtol=1e-12, atol=0
    )
