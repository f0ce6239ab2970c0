"""The natural gradient F(θ)⁻¹∇_θL equals the mean-parameter gradient ∇_ηL (seed 003)."""

from __future__ import annotations

import math

import pytest
import torch
from expfam_cases import DTYPE, FAMILY_NAMES, distributions
from hypothesis import given, settings

from natgrad.expfam import Gaussian, MultivariateGaussian, mean_parameter_gradient

SETTINGS = settings(max_examples=6, deadline=None)


def _symmetrised(distribution, theta):
    """Make the loss depend on ``θ₂`` only through its symmetric part (MVN)."""
    if isinstance(distribution, MultivariateGaussian):
        return theta[0], 0.5 * (theta[1] + theta[1].mT)
    return theta


def _nonlinear_loss(distribution, weights: torch.Tensor):
    """A smooth loss of the natural parameters that mixes all of them nonlinearly."""

    def loss(*theta: torch.Tensor) -> torch.Tensor:
        flat = distribution.flatten_params(_symmetrised(distribution, theta))
        return (weights * torch.tanh(0.3 * flat)).sum() + 0.05 * flat.square().sum().square()

    return loss


def _brute_force_natural_gradient(distribution, loss) -> torch.Tensor:
    """``F(θ)⁻¹ ∇_θ L`` by a dense (pseudo-)solve with ``fisher()`` (test oracle only)."""
    theta = tuple(t.detach().requires_grad_(True) for t in distribution.natural_params)
    gradient = distribution.flatten_params(torch.autograd.grad(loss(*theta), theta))
    fisher = distribution.fisher()
    return (torch.linalg.pinv(fisher, hermitian=True) @ gradient.unsqueeze(-1)).squeeze(-1)


def _finite_difference_mean_gradient(distribution, loss, step: float = 1e-6) -> torch.Tensor:
    """``∇_η L(θ(η))`` by central differences through ``from_mean`` (test oracle only)."""
    family = type(distribution)
    eta = distribution.flatten_params(distribution.mean_params)
    gradient = torch.zeros_like(eta)
    for index in range(eta.numel()):
        shift = torch.zeros_like(eta).reshape(-1)
        shift[index] = step
        shift = shift.reshape(eta.shape)
        values = []
        for sign in (1.0, -1.0):
            mean = distribution.unflatten_params(eta + sign * shift)
            values.append(loss(*family.from_mean(*mean, validate=False).natural_params))
        gradient.reshape(-1)[index] = (values[0] - values[1]) / (2 * step)
    return gradient


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_mean_gradient_equals_natural_gradient(name: str) -> None:
    @SETTINGS
    @given(distributions(name))
    def check(cases) -> None:
        (distribution,) = cases
        generator = torch.Generator().manual_seed(0)
        weights = torch.randn(
            (*distribution.batch_shape, distribution.natural_dim), generator=generator, dtype=DTYPE
        )
        loss = _nonlinear_loss(distribution, weights)
        natural = mean_parameter_gradient(loss, type(distribution), distribution.natural_params)
        for part, theta in zip(natural, distribution.natural_params, strict=True):
            assert part.shape == theta.shape
        flat_natural = distribution.flatten_params(natural)
        expected = _brute_force_natural_gradient(distribution, loss)
        torch.testing.assert_close(flat_natural, expected, rtol=1e-7, atol=1e-9)

    check()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_mean_gradient_matches_finite_differences_in_mean_coordinates(name: str) -> None:
    @settings(max_examples=3, deadline=None)
    @given(distributions(name))
    def check(cases) -> None:
        (distribution,) = cases
        weights = torch.linspace(-1, 1, distribution.natural_dim, dtype=DTYPE)
        loss = _nonlinear_loss(distribution, weights)
        natural = mean_parameter_gradient(loss, type(distribution), distribution.natural_params)
        expected = _finite_difference_mean_gradient(distribution, loss)
        torch.testing.assert_close(
            distribution.flatten_params(natural), expected, rtol=1e-5, atol=1e-6
        )

    check()


def _regression_data(count: int = 12, features: int = 3):
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(count, features, generator=generator, dtype=DTYPE)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE)[:features]
    targets = inputs @ weights + 0.3 * torch.randn(count, generator=generator, dtype=DTYPE)
    return inputs, targets


NOISE_VARIANCE = 0.25
PRIOR_VARIANCE = 2.0


def _expected_log_likelihood(inputs, targets, loc, covariance_diag_term) -> torch.Tensor:
    residual = targets - inputs @ loc
    squared = residual.square().sum() + covariance_diag_term
    count = targets.numel()
    return -0.5 * squared / NOISE_VARIANCE - 0.5 * count * math.log(2 * math.pi * NOISE_VARIANCE)


def test_mean_field_gaussian_elbo_natural_gradient() -> None:
    """Bayesian linear regression with a diagonal Gaussian q(w): −ELBO as a loss of θ."""
    inputs, targets = _regression_data()
    prior = Gaussian(torch.zeros(3, dtype=DTYPE), PRIOR_VARIANCE**0.5)

    def negative_elbo(theta1: torch.Tensor, theta2: torch.Tensor) -> torch.Tensor:
        q = Gaussian.from_natural(theta1, theta2, validate=False)
        trace_term = (inputs.square().sum(0) * q.variance).sum()
        fit = _expected_log_likelihood(inputs, targets, q.loc, trace_term)
        return q.kl(prior).sum() - fit

    q = Gaussian(torch.tensor([0.3, -0.2, 0.1], dtype=DTYPE), torch.tensor([0.5, 1.0, 2.0]))
    natural = mean_parameter_gradient(negative_elbo, Gaussian, q.natural_params)
    expected = _brute_force_natural_gradient(q, negative_elbo)
    torch.testing.assert_close(q.flatten_params(natural), expected, rtol=1e-10, atol=1e-12)


def test_conjugate_natural_gradient_step_reaches_the_exact_posterior() -> None:
    """With a full-covariance q(w), one natural-gradient step of size 1 on −ELBO gives the
    closed-form Gaussian posterior (natural parameters add up in conjugate models)."""
    inputs, targets = _regression_data()

    def negative_elbo(theta1: torch.Tensor, theta2: torch.Tensor) -> torch.Tensor:
        q = MultivariateGaussian.from_natural(theta1, theta2, validate=False)
        loc, covariance = q.loc, q.covariance
        trace_term = torch.trace(inputs.T @ inputs @ covariance)
        fit = _expected_log_likelihood(inputs, targets, loc, trace_term)
        prior = MultivariateGaussian(torch.zeros(3, dtype=DTYPE), PRIOR_VARIANCE * torch.eye(3))
        return q.kl(prior) - fit

    q = MultivariateGaussian(
        torch.tensor([0.3, -0.2, 0.1], dtype=DTYPE),
        torch.tensor([[1.0, 0.2, 0.0], [0.2, 0.5, 0.1], [0.0, 0.1, 2.0]], dtype=DTYPE),
    )
    step = mean_parameter_gradient(negative_elbo, MultivariateGaussian, q.natural_params)
    updated = tuple(t - s for t, s in zip(q.natural_params, step, strict=True))
    precision = inputs.T @ inputs / NOISE_VARIANCE + torch.eye(3, dtype=DTYPE) / PRIOR_VARIANCE
    posterior_loc = torch.linalg.solve(precision, inputs.T @ targets / NOISE_VARIANCE)
    torch.testing.assert_close(updated[0], precision @ posterior_loc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(updated[1], -0.5 * precision, rtol=1e-10, atol=1e-12)


def test_constant_loss_has_zero_natural_gradient() -> None:
    q = Gaussian(torch.tensor([0.5], dtype=DTYPE), torch.tensor([2.0], dtype=DTYPE))
    step = mean_parameter_gradient(
        lambda theta1, theta2: torch.tensor(1.0, dtype=DTYPE), Gaussian, q.natural_params
    )
    assert all(s.shape == (1,) and not s.any() for s in step)


def test_non_scalar_loss_is_refused() -> None:
    q = Gaussian(torch.zeros(2, dtype=DTYPE), torch.ones(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="one element"):
        mean_parameter_gradient(lambda theta1, theta2: theta1, Gaussian, q.natural_params)


def test_invalid_natural_parameters_are_refused() -> None:
    theta = (torch.zeros(2, dtype=DTYPE), torch.tensor([-1.0, 0.5], dtype=DTYPE))
    with pytest.raises(ValueError, match="theta2 < 0"):
        mean_parameter_gradient(lambda theta1, theta2: theta1.sum(), Gaussian, theta)
