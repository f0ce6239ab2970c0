"""Categorical, Poisson, Gaussian and multivariate Gaussian KL against 400-digit oracles
(:mod:`kl_oracle`), for nearby and for far distributions.

The Bregman form ``A(θ_q) − A(θ_p) − ⟨θ_q − θ_p, η_p⟩`` (Categorical, Poisson) and the closed
forms ``r − 1 − log r`` with a difference of means (Gaussians) cancelled their first-order
terms: negative KLs, or off by factors up to 1e15, for nearby distributions. The forms that
replace them are sums of non-negative terms formed from differences of natural parameters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kl_oracle import categorical_kl, gaussian_kl, multivariate_gaussian_kl, poisson_kl

from natgrad.expfam import Categorical, Gaussian, MultivariateGaussian, Poisson

EPS64 = float(torch.finfo(torch.float64).eps)
SETTINGS = settings(max_examples=120, deadline=None)


def _tensor(value) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


@st.composite
def nearby_or_far(draw: st.DrawFn, values: list[float], low: float, high: float) -> list[float]:
    """Independent values in ``[low, high]``, or ``values`` moved by relative steps
    ``10⁻¹⁴ … 10⁻¹`` (of ``max(1, |value|)``)."""
    if draw(st.booleans()):
        return [draw(st.floats(low, high)) for _ in values]
    exponent = draw(st.floats(-14.0, -1.0))
    steps = [draw(st.floats(-1.0, 1.0)) * 10.0**exponent for _ in values]
    return [v + s * max(1.0, abs(v)) for v, s in zip(values, steps, strict=True)]


@st.composite
def logit_pairs(draw: st.DrawFn) -> tuple[list[float], list[float]]:
    count = draw(st.integers(1, 4))
    theta = [draw(st.floats(-60.0, 60.0)) for _ in range(count)]
    return theta, draw(nearby_or_far(theta, -60.0, 60.0))


@SETTINGS
@given(logit_pairs())
def test_categorical_kl_matches_the_oracle(pair) -> None:
    """Tolerance: a few ulps relative, and the rounding of ``log p_k``, ``log q_k`` (relative
    ``ε |log p_k|`` in ``p_k``) weighted by each class's part of the KL."""
    theta, other_theta = pair
    expected, conditioning = categorical_kl(theta, other_theta)
    result = Categorical(logits=_tensor([*theta, 0.0])).kl(
        Categorical(logits=_tensor([*other_theta, 0.0]))
    )
    assert result.item() >= 0.0
    count = len(theta) + 1
    assert abs(result.item() - expected) <= 8 * EPS64 * (count * expected + conditioning)


@SETTINGS
@given(st.floats(-40.0, 40.0).flatmap(lambda t: st.tuples(st.just(t), nearby_or_far([t], -40, 40))))
def test_poisson_kl_matches_the_oracle(pair) -> None:
    theta, (other_theta,) = pair
    p = Poisson.from_natural(_tensor(theta))
    result = p.kl(Poisson.from_natural(_tensor(other_theta))).item()
    expected = poisson_kl(theta, other_theta)
    assert result >= 0.0
    assert abs(result - expected) <= 8 * EPS64 * expected


@st.composite
def gaussian_pairs(draw: st.DrawFn) -> tuple[list[float], list[float]]:
    """Natural parameters ``(μτ, −τ/2)`` with ``|μ| ≤ 1e3``, ``τ`` from 1e-6 to 1e6."""
    loc, log_precision = draw(st.floats(-1e3, 1e3)), draw(st.floats(-6.0, 6.0))
    precision = 10.0**log_precision
    natural = [loc * precision, -0.5 * precision]
    if draw(st.booleans()):
        other_loc, other_log_precision = draw(st.floats(-1e3, 1e3)), draw(st.floats(-6.0, 6.0))
        other_precision = 10.0**other_log_precision
        return natural, [other_loc * other_precision, -0.5 * other_precision]
    exponent = draw(st.floats(-14.0, -1.0))
    steps = [draw(st.floats(-1.0, 1.0)) * 10.0**exponent for _ in range(2)]
    return natural, [natural[0] + steps[0] * abs(natural[0]), natural[1] * (1.0 + steps[1])]


@SETTINGS
@given(gaussian_pairs())
def test_gaussian_kl_matches_the_oracle(pair) -> None:
    """Tolerance: a few ulps relative, and the rounding of the terms the difference of means
    ``Δμ`` is formed from, times ``∂KL/∂Δμ = τ_q Δμ``: ``(Δτ μ_q − Δθ₁)/τ_p`` where the
    precisions are within a factor ``1 ± ½``, ``μ_p − μ_q`` elsewhere."""
    natural, other_natural = pair
    p = Gaussian.from_natural(*(_tensor(v) for v in natural))
    result = p.kl(Gaussian.from_natural(*(_tensor(v) for v in other_natural))).item()
    expected = gaussian_kl(natural, other_natural)
    precision, other_precision = -2.0 * natural[1], -2.0 * other_natural[1]
    loc, other_loc = natural[0] / precision, other_natural[0] / other_precision
    precision_step = other_precision - precision
    if abs(precision_step) <= 0.5 * precision:
        terms = (abs(precision_step * other_loc) + abs(other_natural[0] - natural[0])) / precision
    else:
        terms = abs(loc) + abs(other_loc)
    conditioning = other_precision * abs(loc - other_loc) * terms
    assert result >= 0.0
    assert abs(result - expected) <= 8 * EPS64 * (expected + conditioning)


def _spd(generator: np.random.Generator, dim: int) -> np.ndarray:
    """A covariance with eigenvalues in ``[0.5, 4]`` (condition number at most 8)."""
    rotation, _ = np.linalg.qr(generator.normal(size=(dim, dim)))
    return (rotation * generator.uniform(0.5, 4.0, size=dim)) @ rotation.T


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**32 - 1), st.one_of(st.none(), st.floats(-14, -1)))
def test_multivariate_gaussian_kl_matches_the_oracle(dim, seed, log_step) -> None:
    """Well-conditioned covariances (the rounding of ``Λ⁻¹`` grows with its condition
    number); the second distribution independent or ``10^{log_step}`` away in ``θ``."""
    generator = np.random.default_rng(seed)
    p = MultivariateGaussian(_tensor(generator.normal(size=dim)), _tensor(_spd(generator, dim)))
    theta1, theta2 = (t.numpy() for t in p.natural_params)
    if log_step is None:
        q = MultivariateGaussian(_tensor(generator.normal(size=dim)), _tensor(_spd(generator, dim)))
        other_theta1, other_theta2 = (t.numpy() for t in q.natural_params)
    else:
        step = generator.normal(size=(dim, dim))
        other_theta2 = theta2 + 10.0**log_step * 0.1 * (step + step.T)
        other_theta1 = theta1 + 10.0**log_step * generator.normal(size=dim)
        q = MultivariateGaussian.from_natural(_tensor(other_theta1), _tensor(other_theta2))
    expected = multivariate_gaussian_kl(
        theta1.tolist(), theta2.tolist(), other_theta1.tolist(), other_theta2.tolist()
    )
    result = p.kl(q).item()
    assert result >= 0.0
    assert abs(result - expected) <= 16 * dim * EPS64 * expected


# The old forms gave (oracle in brackets): Categorical −1.0e-16 (7.2e-25) and 0 (5.6e-36),
# Poisson 8.3e-16 (1.0e-21), Gaussian relative errors 3.1e-10 and 6.0e-9, multivariate
# Gaussian −1.1e-16 (2.8e-21).
def test_nearby_distributions_that_failed() -> None:
    cases = [
        (_categorical([2.0, -1.0]), _categorical([2.0 + 3e-12, -1.0 - 1e-12])),
        (_categorical([40.0, 0.5]), _categorical([40.0 + 1e-9, 0.5])),
        (Poisson.from_natural(_tensor(3.0)), Poisson.from_natural(_tensor(3.0 + 1e-11))),
        (_gaussian(0.0, -0.5), _gaussian(0.0, -0.5 - 1e-9)),
        (_gaussian(1e4, -0.5), _gaussian(1e4 + 1e-8, -0.5 - 2e-9)),
    ]
    for p, q in cases:
        expected = _oracle(p, q)
        assert abs(p.kl(q).item() - expected) <= 16 * EPS64 * expected
    theta1, theta2 = [1.0, -0.5], [[-1.0, 0.2], [0.2, -0.7]]
    other_theta1, other_theta2 = [1.0 + 1e-10, -0.5], [[-1.0 - 1e-10, 0.2], [0.2, -0.7]]
    p = MultivariateGaussian.from_natural(_tensor(theta1), _tensor(theta2))
    q = MultivariateGaussian.from_natural(_tensor(other_theta1), _tensor(other_theta2))
    expected = multivariate_gaussian_kl(theta1, theta2, other_theta1, other_theta2)
    assert abs(p.kl(q).item() - expected) <= 32 * EPS64 * expected


def _gaussian(theta1: float, theta2: float) -> Gaussian:
    return Gaussian.from_natural(_tensor(theta1), _tensor(theta2))


def _categorical(theta: list[float]) -> Categorical:
    return Categorical(logits=_tensor([*theta, 0.0]))


def _oracle(p, q) -> float:
    if isinstance(p, Categorical):
        return categorical_kl(p.natural_params[0].tolist(), q.natural_params[0].tolist())[0]
    if isinstance(p, Poisson):
        return poisson_kl(p.natural_params[0].item(), q.natural_params[0].item())
    natural = [t.item() for t in p.natural_params]
    return gaussian_kl(natural, [t.item() for t in q.natural_params])


def test_kl_of_a_categorical_with_a_vanishing_class_keeps_its_digits() -> None:
    """``p = (½, ½ − 10⁻²⁰, 10⁻²⁰)`` against ``q_3 = 2·10⁻²⁰``: in the minimal logits (relative
    to the vanishing class) both other logits change by ``log 2``, while the KL is 3e-21."""
    theta = [math.log(0.5 / 1e-20), math.log((0.5 - 1e-20) / 1e-20)]
    other_theta = [t - math.log(2.0) for t in theta]
    expected, _ = categorical_kl(theta, other_theta)
    result = _categorical(theta).kl(_categorical(other_theta)).item()
    assert abs(result - expected) <= 16 * EPS64 * expected


FAMILIES = [
    Categorical(logits=_tensor([[3.0, -1.0, 0.5, 0.0], [-30.0, 30.0, 2.0, 0.0]])),
    Poisson.from_natural(_tensor([-30.0, -0.7, 0.0, 4.0, 30.0])),
    Gaussian(_tensor([0.0, -2.0, 30.0]), _tensor([1.0, 0.1, 3.0])),
    MultivariateGaussian(
        _tensor([[0.5, -1.0, 2.0]]),
        _tensor([[[2.0, 0.3, -0.2], [0.3, 1.0, 0.1], [-0.2, 0.1, 0.5]]]),
    ),
]


@pytest.mark.parametrize("p", FAMILIES, ids=lambda p: type(p).__name__)
def test_kl_hessian_at_equal_distributions_is_the_fisher(p) -> None:
    """``∇_θq KL(p ‖ q) = 0`` and ``∇²_θq KL(p ‖ q) = F(θ_p)`` at ``θ_q = θ_p``, per batch entry,
    where every near-branch series is evaluated at 0."""
    family = type(p)
    flat = p.flatten_params(p.natural_params).detach()

    def kl_of(flat_other):
        other = family.from_natural(*p.unflatten_params(flat_other), validate=False)
        return p.kl(other).sum()

    gradient = torch.func.grad(kl_of)(flat)
    torch.testing.assert_close(gradient, torch.zeros_like(gradient), rtol=0, atol=1e-14)
    hessian = torch.autograd.functional.hessian(kl_of, flat)
    batch, size = p.batch_shape.numel(), p.natural_dim
    blocks = hessian.reshape(batch, size, batch, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    torch.testing.assert_close(blocks, p.fisher().reshape(batch, size, size), rtol=1e-12, atol=0)


@pytest.mark.parametrize("p", FAMILIES, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("scale", [1e-7, 0.3, 3.0])
def test_kl_has_first_and_second_derivatives(p, scale) -> None:
    """``gradcheck`` and ``gradgradcheck`` in both arguments, nearby (series branches) and far."""
    generator = torch.Generator().manual_seed(3)
    count = len(p.natural_params)
    first = tuple(t.detach().clone() for t in p.natural_params)
    second = [t + scale * torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in first]
    if isinstance(p, MultivariateGaussian):
        second[1] = first[1] * (1.0 + scale / 10.0)
    if isinstance(p, Gaussian):
        second[1] = first[1] * math.exp(scale / 10.0)
    inputs = tuple(t.requires_grad_(True) for t in (*first, *second))
    family = type(p)

    def objective(*theta):
        distribution = family.from_natural(*theta[:count], validate=False)
        return distribution.kl(family.from_natural(*theta[count:], validate=False))

    assert torch.autograd.gradcheck(objective, inputs)
    assert torch.autograd.gradgradcheck(objective, inputs)


def test_categorical_fisher_keeps_the_variance_of_a_nearly_certain_class() -> None:
    """Two classes are a Bernoulli: ``F = p (1 − p) = σ(θ) σ(−θ)`` (SciPy's ``expit``);
    ``p − p²`` came out 0 at ``θ = 40``."""
    theta = np.array([-40.0, -3.0, 0.0, 8.0, 30.0, 40.0])
    fisher = Categorical(logits=_tensor(np.stack((theta, np.zeros_like(theta)), -1))).fisher()
    expected = scipy.special.expit(theta) * scipy.special.expit(-theta)
    np.testing.assert_allclose(fisher[:, 0, 0].numpy(), expected, rtol=4 * EPS64)


def test_categorical_kl_refuses_different_numbers_of_classes() -> None:
    """The Bregman form broadcast two classes against four and returned a number."""
    p = Categorical(logits=_tensor([0.3, 0.0]))
    q = Categorical(logits=_tensor([0.1, 0.2, -0.4, 0.0]))
    with pytest.raises(ValueError, match="same number of classes, got 2 and 4"):
        p.kl(q)


@pytest.mark.parametrize(
    ("theta", "other_theta"),
    [
        ([-700.0, 0.0], [700.0, 0.0]),
        ([-745.0, 3.0], [0.0, 3.0]),
        ([300.0, -300.0], [-300.0, 300.0]),
        ([0.0, -800.0], [0.0, -1.0]),
    ],
)
def test_categorical_kl_of_extreme_logits_is_finite_and_accurate(theta, other_theta) -> None:
    """Log-ratio shifts past ``exp``'s range take the branch through the log-probabilities."""
    other = _tensor([*other_theta, 0.0]).requires_grad_(True)
    result = _categorical(theta).kl(Categorical(logits=other))
    expected, conditioning = categorical_kl(theta, other_theta)
    assert abs(result.item() - expected) <= 8 * EPS64 * (3 * expected + conditioning)
    (gradient,) = torch.autograd.grad(result, other)
    assert bool(gradient.isfinite().all())


@pytest.mark.parametrize(
    ("theta", "other_theta"),
    [
        ([2.0, -1.0], [2.0 + 2**-18, -1.0]),
        ([30.0, 1.0], [30.0, 1.0 + 2**-15]),
        ([-100.0, 0.0], [100.0, 0.0]),
    ],
)
def test_categorical_kl_in_float32(theta, other_theta) -> None:
    """Relative accuracy of float32 for nearby logits (the Bregman form's absolute error
    ~1e-7 swamped KLs of 1e-12 and 1e-22), finite gradients past ``exp``'s float32 range."""
    other = torch.tensor([*other_theta, 0.0], requires_grad=True)
    result = Categorical(logits=torch.tensor([*theta, 0.0])).kl(Categorical(logits=other))
    expected, _ = categorical_kl(theta, other_theta)
    assert abs(result.item() - expected) <= 1e-6 * expected
    (gradient,) = torch.autograd.grad(result, other)
    assert bool(gradient.isfinite().all())
