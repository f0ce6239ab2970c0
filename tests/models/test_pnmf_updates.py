"""Natural-gradient steps on q(F) and the multiplicative update of W, against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from natgrad.expfam import Gaussian
from natgrad.models.pnmf_counts import count_matrix
from natgrad.models.pnmf_elbo import elbo
from natgrad.models.pnmf_gradients import elbo_gradients
from natgrad.models.pnmf_updates import (
    gaussian_from_moments,
    mean_parameter_gradients,
    moment_gradient_step,
    multiplicative_loadings,
    natural_gradient_step,
    safe_precision_step,
)

CPU = torch.device("cpu")
DOUBLE = torch.float64


def random_posterior(seed: int, shape=(3, 2), min_variance: float = 0.1) -> Gaussian:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=generator, dtype=DOUBLE)
    variance = min_variance + torch.rand(shape, generator=generator, dtype=DOUBLE)
    return gaussian_from_moments(mean, variance)


def test_mean_parameter_gradients_match_autograd_through_eta():
    posterior = random_posterior(0)
    eta1, eta2 = (t.clone().requires_grad_(True) for t in posterior.mean_params)

    def loss_of(mean, variance):
        return (mean.sin() * variance + mean.square() * variance.log()).sum()

    loss = loss_of(eta1, eta2 - eta1.square())
    expected = torch.autograd.grad(loss, (eta1, eta2))
    mean = posterior.loc.clone().requires_grad_(True)
    variance = posterior.variance.clone().requires_grad_(True)
    grad_mean, grad_variance = torch.autograd.grad(loss_of(mean, variance), (mean, variance))
    result = mean_parameter_gradients(posterior.loc, grad_mean, grad_variance)
    for got, want in zip(result, expected, strict=True):
        torch.testing.assert_close(got, want)


def gaussian_likelihood_gradients(posterior: Gaussian, targets, noise_variance):
    """∂L/∂μ, ∂L/∂σ² of L = −E_q[log N(y | F, s²)] + KL(q ‖ N(0, 1)) (closed form)."""
    mean, variance = posterior.loc, posterior.variance
    grad_mean = -(targets - mean) / noise_variance + mean
    grad_variance = 0.5 / noise_variance + 0.5 * (1.0 - 1.0 / variance)
    return grad_mean, grad_variance


def test_unit_step_solves_a_conjugate_gaussian_problem_exactly():
    posterior = random_posterior(1)
    targets = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 3.0]], dtype=DOUBLE)
    noise_variance = 0.3
    grad_mean, grad_variance = gaussian_likelihood_gradients(posterior, targets, noise_variance)
    grads = mean_parameter_gradients(posterior.loc, grad_mean, grad_variance)
    result = natural_gradient_step(posterior, *grads, step_size=1.0, max_mean_step=1e9)
    exact_precision = 1.0 + 1.0 / noise_variance
    torch.testing.assert_close(
        result.posterior.precision, torch.full_like(targets, exact_precision)
    )
    torch.testing.assert_close(result.posterior.loc, targets / noise_variance / exact_precision)
    assert result.n_refused == 0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), step_size=st.floats(0.05, 1.0))
def test_step_equals_inverse_fisher_times_natural_parameter_gradient(seed, step_size):
    # precision < 1 + 1/s² = 3, so the precision step d is positive and no retraction applies
    posterior = random_posterior(seed, min_variance=0.4)
    theta1, theta2 = (t.clone().requires_grad_(True) for t in posterior.natural_params)
    targets = torch.linspace(-1.0, 2.0, 6, dtype=DOUBLE).reshape(3, 2)
    noise_variance = 0.5
    # The loss as a function of θ, through the Gaussian's own natural -> mean map.
    variance = -0.5 / theta2
    mean = theta1 * variance
    loss = (
        ((targets - mean).square() + variance) / (2 * noise_variance)
        + 0.5 * (variance + mean.square() - 1.0 - variance.log())
    ).sum()
    grad_theta = torch.stack(torch.autograd.grad(loss, (theta1, theta2)), -1)
    fisher = posterior.fisher()
    natural_direction = torch.linalg.solve(fisher, grad_theta.unsqueeze(-1)).squeeze(-1)
    new_theta1, new_theta2 = (
        torch.stack(posterior.natural_params, -1) - step_size * natural_direction
    ).unbind(-1)
    expected = Gaussian.from_natural(new_theta1, new_theta2)
    grad_mean, grad_variance = gaussian_likelihood_gradients(posterior, targets, noise_variance)
    grads = mean_parameter_gradients(posterior.loc, grad_mean, grad_variance)
    result = natural_gradient_step(posterior, *grads, step_size, max_mean_step=1e9).posterior
    torch.testing.assert_close(result.precision, expected.precision)
    torch.testing.assert_close(result.loc, expected.loc)


@settings(max_examples=30, deadline=None)
@given(
    precision=st.floats(1e-3, 1e3),
    direction=st.floats(-1e4, 1e4),
    step_size=st.floats(1e-3, 1.0),
)
def test_safe_precision_step_stays_positive(precision, direction, step_size):
    result = safe_precision_step(
        torch.tensor(precision, dtype=DOUBLE), torch.tensor(direction, dtype=DOUBLE), step_size
    )
    assert float(result) > 0
    if direction >= 0:
        assert float(result) == pytest.approx(precision + step_size * direction)
    else:
        expected = (
            precision + step_size * direction + (step_size * direction) ** 2 / (2 * precision)
        )
        assert float(result) == pytest.approx(expected)


def test_mean_step_is_clipped_and_non_finite_steps_are_refused():
    posterior = random_posterior(2)
    grad_eta1 = torch.full((3, 2), -1e6, dtype=DOUBLE)
    grad_eta1[0, 0] = float("nan")
    grad_eta2 = torch.zeros((3, 2), dtype=DOUBLE)
    result = natural_gradient_step(posterior, grad_eta1, grad_eta2, step_size=1.0)
    assert result.n_refused == 1
    step = result.posterior.loc - posterior.loc
    assert float(step[0, 0]) == 0.0
    torch.testing.assert_close(step.flatten()[1:], torch.ones(5, dtype=DOUBLE))


def lower_bound_problem(seed: int, variance_range=(0.1, 0.5)):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(4.0, (6, 5)).astype(np.float64)
    data = count_matrix(counts, DOUBLE, CPU)
    loadings = torch.as_tensor(rng.uniform(0.1, 1.5, (5, 3)))
    posterior = gaussian_from_moments(
        torch.as_tensor(rng.normal(0, 0.5, (6, 3))),
        torch.as_tensor(rng.uniform(*variance_range, (6, 3))),
    )
    return counts, data, loadings, posterior


def test_lower_bound_step_matches_the_closed_form_von_update():
    # σ² ≥ 1, so P ≤ 1 < 1 + Σ_j W_jl e^{μ+σ²/2}: the precision grows and the plain step applies
    counts, data, loadings, posterior = lower_bound_problem(0, variance_range=(1.0, 2.0))
    rho = 0.7
    gradients = elbo_gradients(data, loadings, posterior.loc, posterior.variance, "lower-bound", 1)
    grads = mean_parameter_gradients(posterior.loc, -gradients.grad_mean, -gradients.grad_variance)
    result = natural_gradient_step(posterior, *grads, rho, max_mean_step=1e9).posterior
    mean, variance, precision = (
        t.numpy() for t in (posterior.loc, posterior.variance, posterior.precision)
    )
    weights = loadings.numpy()
    expected_rate = np.exp(mean + variance / 2) * weights.sum(0)
    responsibilities = weights[None] * np.exp(mean)[:, None, :]
    responsibilities /= responsibilities.sum(-1, keepdims=True)
    new_precision = (1 - rho) * precision + rho * (1 + expected_rate)
    drive = (counts[..., None] * responsibilities).sum(1) - expected_rate - mean
    np.testing.assert_allclose(result.precision.numpy(), new_precision, rtol=1e-12)
    np.testing.assert_allclose(result.loc.numpy(), mean + rho * drive / new_precision, rtol=1e-10)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000))
def test_multiplicative_update_does_not_decrease_the_lower_bound(seed):
    _, data, loadings, posterior = lower_bound_problem(seed)
    mean, variance = posterior.loc, posterior.variance
    gradients = elbo_gradients(data, loadings, mean, variance, "lower-bound", 1)
    updated = multiplicative_loadings(
        loadings * gradients.log_term_loadings_grad, gradients.rate_term_loadings_grad
    )
    before = float(elbo(data, loadings, mean, variance, "lower-bound", 1))
    after = float(elbo(data, updated, mean, variance, "lower-bound", 1))
    assert after >= before - 1e-9


def test_multiplicative_updates_reach_the_maximum_found_by_lbfgs():
    _, data, loadings, posterior = lower_bound_problem(3)
    mean, variance = posterior.loc, posterior.variance

    def negative_bound(flat: np.ndarray) -> tuple[float, np.ndarray]:
        weights = torch.tensor(flat.reshape(5, 3), requires_grad=True)
        value = -elbo(data, weights, mean, variance, "lower-bound", 1)
        return float(value.detach()), torch.autograd.grad(value, weights)[0].numpy().ravel()

    optimum = minimize(
        negative_bound,
        loadings.numpy().ravel(),
        jac=True,
        method="L-BFGS-B",
        bounds=[(1e-12, None)] * 15,
        options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 10_000},
    )
    for _ in range(2000):
        gradients = elbo_gradients(data, loadings, mean, variance, "lower-bound", 1)
        loadings = multiplicative_loadings(
            loadings * gradients.log_term_loadings_grad, gradients.rate_term_loadings_grad
        )
    reached = float(elbo(data, loadings, mean, variance, "lower-bound", 1))
    assert reached == pytest.approx(-optimum.fun, rel=1e-7)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), step_size=st.floats(0.05, 1.0))
def test_moment_gradient_step_equals_the_step_through_mean_parameters(seed, step_size):
    posterior = random_posterior(seed, shape=(4, 3))
    generator = torch.Generator().manual_seed(seed + 1)
    grad_mean = torch.randn((4, 3), generator=generator, dtype=DOUBLE)
    grad_variance = torch.randn((4, 3), generator=generator, dtype=DOUBLE)  # some d < 0
    grads = mean_parameter_gradients(posterior.loc, grad_mean, grad_variance)
    expected = natural_gradient_step(posterior, *grads, step_size, max_mean_step=0.5)
    result = moment_gradient_step(
        posterior.loc, posterior.precision, grad_mean, grad_variance, step_size, 0.5
    )
    torch.testing.assert_close(result.mean, expected.mean)
    torch.testing.assert_close(result.precision, expected.precision)
    assert (result.precision > 0).all()
