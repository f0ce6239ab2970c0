"""The branches of :mod:`natgrad.expfam.special` evaluated only where they are taken.

Batches on both sides of a switch point (``ASYMPTOTIC_START`` = 10, the nearby bound ``¼ x``
of the Bregman divergence of ``μ``) give the same values, and the same gradients, whether each
branch is evaluated on its own entries (batches of ``SPLIT_SIZE`` or more), both everywhere,
or only the one a batch takes, and the values on both sides of the switch agree with mpmath at
60 digits. The coarse ``μ``, ``μ′`` of the entropies are checked against their stated absolute
accuracy, and the entropies' derivatives against SciPy's trigamma (``torch.digamma``'s own
derivative is off by 5e-10).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.expfam import Beta, Dirichlet, Gamma, special
from natgrad.expfam.special import (
    ASYMPTOTIC_START,
    stirling_remainder_bregman,
    stirling_remainder_coarse_derivatives,
    stirling_remainder_derivatives,
    trigamma,
)

mpmath = pytest.importorskip("mpmath")
mpmath.mp.dps = 60
SETTINGS = settings(max_examples=40, deadline=None)
EPS64 = float(torch.finfo(torch.float64).eps)
DTYPE = torch.float64
#: Arguments on both sides of ASYMPTOTIC_START, down to 1e-6 and up to 1e6.
ACROSS_THE_SWITCH = st.lists(st.floats(-6.0, 6.0), min_size=2, max_size=12)


def _remainder(x: float, derivative: int) -> float:
    value = mpmath.mpf(x)
    if derivative == 0:
        return float(
            mpmath.loggamma(value)
            - (value - 0.5) * mpmath.log(value)
            + value
            - mpmath.log(2 * mpmath.pi) / 2
        )
    return float(mpmath.digamma(value) - mpmath.log(value) + 1 / (2 * value))


def _split_and_whole(monkeypatch: pytest.MonkeyPatch, function, *arguments) -> tuple:
    """``function(*arguments)`` with every mixed batch split, then with none split."""
    monkeypatch.setattr(special, "SPLIT_SIZE", 0)
    split = function(*arguments)
    monkeypatch.setattr(special, "SPLIT_SIZE", math.inf)
    whole = function(*arguments)
    return split, whole


def _switch_points() -> torch.Tensor:
    """Both neighbours of ASYMPTOTIC_START and of 1 (where the table's closed form starts)."""
    points = [ASYMPTOTIC_START, 1.0]
    below = [math.nextafter(p, 0.0) for p in points]
    return torch.tensor(points + below + [ASYMPTOTIC_START * (1 + 1e-9), 3.0], dtype=DTYPE)


@SETTINGS
@given(ACROSS_THE_SWITCH)
def test_split_and_whole_batches_agree(exponents: list[float]) -> None:
    """Same ``μ, μ′, μ″`` and ``ψ′`` whichever way a mixed batch is taken."""
    x = torch.tensor([10.0**e for e in exponents], dtype=DTYPE)
    with pytest.MonkeyPatch.context() as monkeypatch:
        for function in (stirling_remainder_derivatives, trigamma):
            split, whole = _split_and_whole(monkeypatch, function, x)
            torch.testing.assert_close(split, whole, rtol=2 * EPS64, atol=0)


@SETTINGS
@given(ACROSS_THE_SWITCH)
def test_single_entries_and_mixed_batches_agree(exponents: list[float]) -> None:
    """An entry alone takes one branch only; in a batch across ASYMPTOTIC_START both are
    evaluated."""
    x = torch.tensor([10.0**e for e in exponents], dtype=DTYPE)
    for function in (
        stirling_remainder_coarse_derivatives,
        special.stirling_remainder_coarse,
        stirling_remainder_derivatives,
    ):
        batch = function(x)
        for index in range(len(exponents)):
            alone = function(x[index : index + 1])
            torch.testing.assert_close(alone[..., 0], batch[..., index], rtol=2 * EPS64, atol=0)


@SETTINGS
@given(ACROSS_THE_SWITCH, st.lists(st.floats(-3.0, 0.5), min_size=12, max_size=12))
def test_bregman_split_and_whole_batches_agree(exponents, step_exponents) -> None:
    """Nearby (quadrature) and far (difference) entries in one batch, taken both ways."""
    x = torch.tensor([10.0**e for e in exponents], dtype=DTYPE)
    signs = torch.tensor([(-1.0) ** k for k in range(len(exponents))], dtype=DTYPE)
    factors = torch.tensor([10.0**e for e in step_exponents[: len(exponents)]], dtype=DTYPE)
    difference = x * (signs * factors).clamp(min=-0.9)
    y = x + difference
    with pytest.MonkeyPatch.context() as monkeypatch:
        split, whole = _split_and_whole(monkeypatch, stirling_remainder_bregman, x, y, difference)
    # The far entries are differences μ(y) − μ(x) − (y − x) μ′(x) that cancel, and a split
    # batch sums fewer shifts in another order: the two agree to a few ulps of the terms
    # (|μ(x)| ≈ ½ |log x| for small x), not of the result (28 ulps at x ≈ 4e-5, y ≈ 1.3 x).
    allowed = 4 * EPS64 * whole.abs() + 4 * EPS64 * (1.0 + x.log().abs())
    assert bool(((split - whole).abs() <= allowed).all()), (split, whole)


def test_values_on_both_sides_of_the_switch_match_mpmath() -> None:
    """``μ``, ``μ′`` (accurate and coarse) at the neighbours of the switch points."""
    x = _switch_points()
    accurate = stirling_remainder_derivatives(x)
    coarse = stirling_remainder_coarse_derivatives(x)
    for index, point in enumerate(x.tolist()):
        for derivative in (0, 1):
            expected = _remainder(point, derivative)
            assert abs(accurate[derivative, index].item() - expected) <= 8 * EPS64 * abs(expected)
            tolerance = 8 * EPS64 * abs(expected) if point >= ASYMPTOTIC_START else 2e-15
            assert abs(coarse[derivative, index].item() - expected) <= tolerance


@SETTINGS
@given(st.floats(-8.0, 12.0))
def test_coarse_remainder_meets_its_absolute_accuracy(exponent: float) -> None:
    """Below ASYMPTOTIC_START a few ulps of the largest term of ``log Γ(x) − (x − ½) log x + x``
    and of ``ψ(x) − log x + 1/(2x)``; at or above it a few ulps relative."""
    x = 10.0**exponent
    value, slope = stirling_remainder_coarse_derivatives(torch.tensor([x], dtype=DTYPE))[:, 0]
    expected_value, expected_slope = _remainder(x, 0), _remainder(x, 1)
    if x >= ASYMPTOTIC_START:
        value_scale, slope_scale = abs(expected_value), abs(expected_slope)
    else:
        value_scale = abs(math.lgamma(x)) + abs((x - 0.5) * math.log(x)) + x
        slope_scale = abs(scipy.special.digamma(x)) + abs(math.log(x)) + 0.5 / x
    assert abs(value.item() - expected_value) <= 8 * EPS64 * value_scale
    assert abs(slope.item() - expected_slope) <= 8 * EPS64 * slope_scale


def test_split_batches_have_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """gradcheck and gradgradcheck through the split (indexed) path of every dispatch."""
    monkeypatch.setattr(special, "SPLIT_SIZE", 0)
    x = torch.tensor([0.3, 4.0, 9.5, 12.0, 40.0], dtype=DTYPE, requires_grad=True)
    y = torch.tensor([0.31, 8.0, 9.6, 30.0, 41.0], dtype=DTYPE, requires_grad=True)

    def bregman(x, y):
        return stirling_remainder_bregman(x, y, y - x)

    for function, inputs in ((stirling_remainder_derivatives, (x,)), (bregman, (x, y))):
        assert torch.autograd.gradcheck(function, inputs)
        assert torch.autograd.gradgradcheck(function, inputs)


@SETTINGS
@given(st.floats(-3.0, 3.0))
def test_gamma_entropy_derivative_uses_an_accurate_trigamma(exponent: float) -> None:
    """``dH/dα = 1 + (1 − α) ψ′(α)`` for unit rate, on both sides of ASYMPTOTIC_START."""
    shape = torch.tensor(10.0**exponent, dtype=DTYPE, requires_grad=True)
    (gradient,) = torch.autograd.grad(Gamma(shape, torch.tensor(1.0, dtype=DTYPE)).entropy(), shape)
    alpha = shape.item()
    trigamma_value = float(scipy.special.polygamma(1, alpha))
    expected = 1.0 + (1.0 - alpha) * trigamma_value
    scale = 1.0 + abs(1.0 - alpha) * trigamma_value
    assert abs(gradient.item() - expected) <= 8 * EPS64 * scale


def test_entropy_second_derivatives_in_forward_and_reverse_mode() -> None:
    """``torch.func.hessian`` (forward over reverse) of the entropies matches autograd's."""
    concentration = torch.tensor([0.5, 3.0, 30.0], dtype=DTYPE)

    def entropies(values: torch.Tensor) -> torch.Tensor:
        rate = torch.ones(3, dtype=DTYPE)
        stacked = torch.stack((values, values.flip(0)), -1)
        return (
            Gamma(values, rate).entropy().sum()
            + Beta(values, values.flip(0)).entropy().sum()
            + Dirichlet(stacked).entropy().sum()
        )

    forward = torch.func.hessian(entropies)(concentration)
    reverse = torch.autograd.functional.hessian(entropies, concentration)
    torch.testing.assert_close(forward, reverse, rtol=1e-12, atol=0)
    polygamma = scipy.special.polygamma
    alpha = concentration.numpy()
    gamma_only = -polygamma(1, alpha) + (1 - alpha) * polygamma(2, alpha)
    gamma_hessian = torch.func.hessian(
        lambda values: Gamma(values, torch.ones(3, dtype=DTYPE)).entropy().sum()
    )(concentration)
    np.testing.assert_allclose(np.diag(gamma_hessian.numpy()), gamma_only, rtol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_series_coefficients_first_made_inside_a_transform_stay_usable(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached series coefficients, first made inside ``torch.func.hessian`` (a fresh
    cache), are plain tensors: the transform's Hessian is autograd's, and later calls, inside
    a transform or not, still work (a coefficient wrapped at the transform's level escaped it,
    and every later call failed)."""
    fresh = functools.lru_cache(maxsize=32)(special._coefficients.__wrapped__)
    monkeypatch.setattr(special, "_coefficients", fresh)
    concentration = torch.tensor([0.5, 3.0, 30.0], dtype=dtype)

    def entropy(values: torch.Tensor) -> torch.Tensor:
        return Gamma(values, torch.ones(3, dtype=dtype)).entropy().sum()

    inside = torch.func.hessian(entropy)(concentration)
    assert fresh.cache_info().currsize == 1
    again = torch.func.hessian(entropy)(concentration)
    reverse = torch.autograd.functional.hessian(entropy, concentration)
    torch.testing.assert_close(inside, reverse)
    torch.testing.assert_close(again, reverse)
    plain = entropy(concentration.to(torch.float64)).item()
    expected = scipy.stats.gamma(concentration.double().numpy()).entropy().sum()
    assert math.isclose(plain, expected, rel_tol=1e-12)


def _kl_and_entropy(family, first: tuple[torch.Tensor, ...], second: tuple[torch.Tensor, ...]):
    p = family.from_natural(*first, validate=False)
    return p.kl(family.from_natural(*second, validate=False)), p.entropy()


@pytest.mark.parametrize("family", [Gamma, Beta, Dirichlet])
def test_kl_and_entropy_stay_vmappable(family) -> None:
    """Under ``torch.func.vmap`` the value-dependent shortcuts are off: mapped over a batch on
    both sides of the switch points, the KL and entropy equal the batched call."""
    concentrations = torch.tensor([3e-3, 0.7, 4.0, 9.9, 10.1, 60.0, 4e4], dtype=DTYPE)
    if family is Gamma:
        first = (concentrations - 1.0, -torch.linspace(0.5, 3.0, 7, dtype=DTYPE))
        second = (1.2 * concentrations - 1.0, -torch.linspace(0.6, 2.0, 7, dtype=DTYPE))
    else:
        columns = 2 if family is Beta else 3
        grid = torch.stack([concentrations.roll(shift) for shift in range(columns)], -1)
        first, second = (grid - 1.0,), (grid.flip(0) - 1.0,)
        if family is Beta:
            first, second = tuple(first[0].unbind(-1)), tuple(second[0].unbind(-1))
    batched = _kl_and_entropy(family, first, second)
    mapped = torch.func.vmap(
        lambda *both: _kl_and_entropy(family, both[: len(first)], both[len(first) :])
    )(*first, *second)
    for expected, found in zip(batched, mapped, strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-13, atol=0.0)
