"""The NES estimates are natural gradients: F⁻¹ ∇ E[f] with the expfam Fisher as the oracle.

On ``f(x) = xᵀQx + bᵀx`` the expected fitness is linear in the mean parameters,
``E[f] = tr(Q η₂) + bᵀη₁``; the oracle differentiates it with respect to the natural
parameters ``θ`` (through :mod:`natgrad.expfam`), solves with ``F(θ)`` from
:meth:`~natgrad.expfam.ExponentialFamily.fisher`, and pushes ``dθ`` to the estimator's
coordinates. The Monte-Carlo estimate with weights ``f(xₖ)/n`` must agree within 5 standard
errors.
"""

import torch
from torch.func import jvp

from natgrad.es import snes_natural_gradient, xnes_natural_gradient
from natgrad.expfam import Gaussian, MultivariateGaussian

DTYPE = torch.float64
NUM_SAMPLES = 50_000


def quadratic_problem(dim, seed):
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(dim, dim, generator=generator, dtype=DTYPE)
    curvature = root @ root.T / dim + 0.5 * torch.eye(dim, dtype=DTYPE)
    linear = torch.randn(dim, generator=generator, dtype=DTYPE)
    return curvature, linear, generator


def quadratic(samples, curvature, linear):
    return torch.einsum("ki,ij,kj->k", samples, curvature, samples) + samples @ linear


def assert_within_standard_errors(per_sample, estimate, oracle, z_score=5.0):
    standard_error = per_sample.std(dim=0) / per_sample.shape[0] ** 0.5
    assert torch.allclose(estimate, per_sample.mean(dim=0), rtol=1e-10, atol=1e-12)
    excess = (estimate - oracle).abs() - z_score * standard_error
    assert bool((excess <= 0).all()), (estimate, oracle, standard_error)


def xnes_oracle(mean, covariance, curvature, linear):
    """``(dμ, dΣ)`` from ``pinv(F(θ)) ∇_θ E[f]`` for the full-covariance Gaussian."""
    family = MultivariateGaussian(mean, covariance)
    theta = [t.detach().clone().requires_grad_(True) for t in family.natural_params]
    eta1, eta2 = MultivariateGaussian.from_natural(*theta).mean_params
    expected = torch.trace(curvature @ eta2) + linear @ eta1
    gradient = family.flatten_params(torch.autograd.grad(expected, theta))
    direction = torch.linalg.pinv(family.fisher(), hermitian=True) @ gradient
    tangent = family.unflatten_params(direction)

    def moments(theta1, theta2):
        cov = torch.linalg.inv(-(theta2 + theta2.T))
        return cov @ theta1, cov

    _, (d_mean, d_cov) = jvp(moments, tuple(t.detach() for t in theta), tangent)
    return d_mean, d_cov


def test_xnes_estimate_is_natural_gradient_of_expected_fitness():
    dim = 2
    curvature, linear, generator = quadratic_problem(dim, seed=0)
    mean = torch.tensor([0.5, -1.0], dtype=DTYPE)
    factor = torch.tensor([[1.2, 0.0], [0.4, 0.7]], dtype=DTYPE)
    covariance = factor @ factor.T
    d_mean, d_cov = xnes_oracle(mean, covariance, curvature, linear)
    # cross-check of the oracle: dμ = Σ(2Qμ + b), dΣ = 2ΣQΣ
    torch.testing.assert_close(d_mean, covariance @ (2 * curvature @ mean + linear))
    torch.testing.assert_close(d_cov, 2 * covariance @ curvature @ covariance)

    noise = torch.randn(NUM_SAMPLES, dim, generator=generator, dtype=DTYPE)
    fitness = quadratic(mean + noise @ factor.T, curvature, linear)
    grad_delta, grad_m = xnes_natural_gradient(noise, fitness / NUM_SAMPLES)
    estimate = torch.cat([factor @ grad_delta, (factor @ grad_m @ factor.T).reshape(-1)])

    outer = noise.unsqueeze(-1) * noise.unsqueeze(-2) - torch.eye(dim, dtype=DTYPE)
    per_sample_m = factor @ (fitness[:, None, None] * outer) @ factor.T
    per_sample = torch.cat(
        [fitness[:, None] * noise @ factor.T, per_sample_m.reshape(NUM_SAMPLES, -1)], dim=1
    )
    oracle = torch.cat([d_mean, d_cov.reshape(-1)])
    assert_within_standard_errors(per_sample, estimate, oracle)


def snes_oracle(mean, scale, curvature, linear):
    """``(dμ, d log σ)`` from ``F(θ)⁻¹ ∇_θ E[f]`` for independent univariate Gaussians."""
    family = Gaussian(mean, scale)
    theta = [t.detach().clone().requires_grad_(True) for t in family.natural_params]
    eta1, eta2 = Gaussian.from_natural(*theta).mean_params
    off_diagonal = curvature - torch.diag(curvature.diagonal())
    expected = curvature.diagonal() @ eta2 + eta1 @ off_diagonal @ eta1 + linear @ eta1
    gradient = torch.stack(torch.autograd.grad(expected, theta), dim=-1)
    direction = torch.linalg.solve(family.fisher(), gradient.unsqueeze(-1)).squeeze(-1)

    def coordinates(theta1, theta2):
        return -theta1 / (2 * theta2), -0.5 * torch.log(-2 * theta2)

    _, (d_mean, d_log_scale) = jvp(
        coordinates, tuple(t.detach() for t in theta), (direction[:, 0], direction[:, 1])
    )
    return d_mean, d_log_scale


def test_snes_estimate_is_natural_gradient_of_expected_fitness():
    dim = 3
    curvature, linear, generator = quadratic_problem(dim, seed=1)
    mean = torch.tensor([0.3, -0.8, 1.1], dtype=DTYPE)
    scale = torch.tensor([0.6, 1.3, 0.9], dtype=DTYPE)
    d_mean, d_log_scale = snes_oracle(mean, scale, curvature, linear)
    # cross-check of the oracle: dμ = σ²(2Qμ + b), d log σ = σ² diag(Q)
    torch.testing.assert_close(d_mean, scale**2 * (2 * curvature @ mean + linear))
    torch.testing.assert_close(d_log_scale, scale**2 * curvature.diagonal())

    noise = torch.randn(NUM_SAMPLES, dim, generator=generator, dtype=DTYPE)
    fitness = quadratic(mean + scale * noise, curvature, linear)
    grad_mean, grad_sigma = snes_natural_gradient(noise, fitness / NUM_SAMPLES)
    estimate = torch.cat([scale * grad_mean, grad_sigma / 2])
    per_sample = fitness[:, None] * torch.cat([scale * noise, (noise**2 - 1) / 2], dim=1)
    oracle = torch.cat([d_mean, d_log_scale])
    assert_within_standard_errors(per_sample, estimate, oracle)


def test_oracle_comparison_rejects_the_plain_gradient():
    """The 5-standard-error check has power: the plain gradient ``∇_μ E[f]`` is rejected."""
    dim = 2
    curvature, linear, generator = quadratic_problem(dim, seed=0)
    mean = torch.tensor([0.5, -1.0], dtype=DTYPE)
    factor = torch.tensor([[1.2, 0.0], [0.4, 0.7]], dtype=DTYPE)
    d_mean, _ = xnes_oracle(mean, factor @ factor.T, curvature, linear)
    noise = torch.randn(NUM_SAMPLES, dim, generator=generator, dtype=DTYPE)
    fitness = quadratic(mean + noise @ factor.T, curvature, linear)
    grad_delta, _ = xnes_natural_gradient(noise, fitness / NUM_SAMPLES)
    plain = torch.linalg.solve(factor.T, grad_delta)  # E[f Σ⁻¹(x − μ)] = A⁻ᵀ E[f z]
    per_sample = fitness[:, None] * torch.linalg.solve(factor.T, noise.T).T
    standard_error = per_sample.std(dim=0) / NUM_SAMPLES**0.5
    assert bool(((plain - d_mean).abs() > 5 * standard_error).any())
