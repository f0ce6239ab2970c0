"""The three PNMF ELBO estimators against Gauss–Hermite and Monte-Carlo oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.polynomial.hermite_e import hermegauss
from scipy.special import gammaln, logsumexp

from natgrad.models.pnmf_counts import count_matrix
from natgrad.models.pnmf_elbo import elbo
from natgrad.models.pnmf_gradients import elbo_gradients

CPU = torch.device("cpu")


def make_problem(seed: int, n_samples: int = 4, n_features: int = 3, n_components: int = 2):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, (n_samples, n_features)).astype(np.float64)
    loadings = rng.uniform(0.2, 2.0, (n_features, n_components))
    mean = rng.normal(0.0, 0.7, (n_samples, n_components))
    variance = rng.uniform(0.05, 0.8, (n_samples, n_components))
    return counts, loadings, mean, variance


def quadrature_elbo(counts, loadings, mean, variance, n_nodes: int = 40) -> float:
    """The exact ELBO for two components by a tensor Gauss–Hermite rule (NumPy/SciPy only)."""
    nodes, weights = hermegauss(n_nodes)
    weights = weights / weights.sum()
    grid = np.stack(np.meshgrid(nodes, nodes, indexing="ij"), -1).reshape(-1, 2)
    grid_weights = np.outer(weights, weights).reshape(-1)
    total = 0.0
    for i in range(counts.shape[0]):
        factors = mean[i] + np.sqrt(variance[i]) * grid
        log_rate = logsumexp(factors[:, None, :] + np.log(loadings)[None], axis=-1)
        log_lik = counts[i] * log_rate - np.exp(log_rate) - gammaln(counts[i] + 1.0)
        total += grid_weights @ log_lik.sum(-1)
    kl = 0.5 * (variance + mean**2 - 1.0 - np.log(variance)).sum()
    return float(total - kl)


def torch_elbo(counts, loadings, mean, variance, mode, n_draws, seed, sparse=False):
    data = count_matrix(sp.csr_matrix(counts) if sparse else counts, torch.float64, CPU)
    generator = torch.Generator().manual_seed(seed)
    value = elbo(
        data,
        torch.as_tensor(loadings),
        torch.as_tensor(mean),
        torch.as_tensor(variance),
        mode,
        n_draws,
        generator,
    )
    return float(value)


@pytest.mark.parametrize("mode", ["simple", "expanded"])
def test_monte_carlo_modes_match_quadrature(mode):
    counts, loadings, mean, variance = make_problem(0)
    exact = quadrature_elbo(counts, loadings, mean, variance)
    estimate = torch_elbo(counts, loadings, mean, variance, mode, 200_000, seed=1)
    assert estimate == pytest.approx(exact, abs=0.05)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_lower_bound_is_below_the_exact_elbo(seed):
    counts, loadings, mean, variance = make_problem(seed)
    exact = quadrature_elbo(counts, loadings, mean, variance)
    bound = torch_elbo(counts, loadings, mean, variance, "lower-bound", 1, seed=0)
    assert bound <= exact + 1e-9


def test_lower_bound_closed_form():
    counts, loadings, mean, variance = make_problem(3, n_components=3)
    log_rate = logsumexp(mean[:, None, :] + np.log(loadings)[None], axis=-1)
    rate = np.exp(mean + variance / 2) @ loadings.T
    kl = 0.5 * (variance + mean**2 - 1.0 - np.log(variance)).sum()
    expected = (counts * log_rate - rate - gammaln(counts + 1)).sum() - kl
    bound = torch_elbo(counts, loadings, mean, variance, "lower-bound", 1, seed=0)
    assert bound == pytest.approx(expected, rel=1e-12)


def test_simple_mode_is_the_average_poisson_log_prob():
    counts, loadings, mean, variance = make_problem(4)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn((5, *mean.shape), generator=generator, dtype=torch.float64)
    factors = torch.as_tensor(mean) + torch.as_tensor(variance).sqrt() * noise
    rate = torch.exp(factors) @ torch.as_tensor(loadings).T
    log_prob = torch.distributions.Poisson(rate).log_prob(torch.as_tensor(counts)).sum() / 5
    q = torch.distributions.Normal(torch.as_tensor(mean), torch.as_tensor(variance).sqrt())
    prior = torch.distributions.Normal(0.0, 1.0)
    expected = float(log_prob - torch.distributions.kl_divergence(q, prior).sum())
    assert torch_elbo(counts, loadings, mean, variance, "simple", 5, seed=7) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("mode", ["simple", "expanded", "lower-bound"])
def test_sparse_and_dense_counts_agree(mode):
    counts, loadings, mean, variance = make_problem(5, n_samples=6, n_features=5)
    counts[counts < 3] = 0.0
    dense = torch_elbo(counts, loadings, mean, variance, mode, 4, seed=2)
    sparse = torch_elbo(counts, loadings, mean, variance, mode, 4, seed=2, sparse=True)
    assert sparse == pytest.approx(dense, rel=1e-12)


def autograd_reference(counts, loadings, mean, variance, mode, n_draws, seed):
    data = count_matrix(counts, torch.float64, CPU)
    tensors = [torch.tensor(a, requires_grad=True) for a in (loadings, mean, variance)]
    generator = torch.Generator().manual_seed(seed)
    value = elbo(data, *tensors, mode, n_draws, generator)
    return (value, *torch.autograd.grad(value, tensors))


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode", ["simple", "expanded", "lower-bound"])
def test_closed_form_gradients_match_autograd_with_the_same_draws(mode, sparse):
    counts, loadings, mean, variance = make_problem(6, n_samples=5, n_features=4, n_components=3)
    counts[0, 1] = 0.0
    value, grad_loadings, grad_mean, grad_variance = autograd_reference(
        counts, loadings, mean, variance, mode, 6, seed=3
    )
    data = count_matrix(sp.csr_matrix(counts) if sparse else counts, torch.float64, CPU)
    result = elbo_gradients(
        data,
        torch.as_tensor(loadings),
        torch.as_tensor(mean),
        torch.as_tensor(variance),
        mode,
        6,
        torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(result.value, value.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(result.grad_mean, grad_mean, rtol=1e-10, atol=1e-10)
    loadings_grad = result.log_term_loadings_grad - result.rate_term_loadings_grad
    torch.testing.assert_close(loadings_grad, grad_loadings, rtol=1e-10, atol=1e-10)
    if mode == "lower-bound":
        torch.testing.assert_close(result.grad_variance, grad_variance, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["simple", "expanded"])
def test_price_variance_gradient_matches_reparameterisation_in_expectation(mode):
    counts, loadings, mean, variance = make_problem(8)
    n_draws = 100_000
    *_, reparameterised = autograd_reference(counts, loadings, mean, variance, mode, n_draws, 1)
    data = count_matrix(counts, torch.float64, CPU)
    price = elbo_gradients(
        data,
        torch.as_tensor(loadings),
        torch.as_tensor(mean),
        torch.as_tensor(variance),
        mode,
        n_draws,
        torch.Generator().manual_seed(2),
    ).grad_variance
    scale = float(reparameterised.abs().max())
    torch.testing.assert_close(price, reparameterised, rtol=0.0, atol=0.03 * scale)


def test_variance_gradient_matches_quadrature_derivative():
    counts, loadings, mean, variance = make_problem(9)
    data = count_matrix(counts, torch.float64, CPU)
    price = elbo_gradients(
        data,
        torch.as_tensor(loadings),
        torch.as_tensor(mean),
        torch.as_tensor(variance),
        "expanded",
        200_000,
        torch.Generator().manual_seed(5),
    ).grad_variance.numpy()
    step = 1e-5
    shifted = variance.copy()
    shifted[1, 0] += step
    lower = variance.copy()
    lower[1, 0] -= step
    derivative = (
        quadrature_elbo(counts, loadings, mean, shifted)
        - quadrature_elbo(counts, loadings, mean, lower)
    ) / (2 * step)
    assert price[1, 0] == pytest.approx(derivative, abs=0.02 * max(1.0, math.fabs(derivative)))


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_samples=st.integers(1, 7),
    n_features=st.integers(1, 6),
    n_components=st.integers(1, 4),
    mode=st.sampled_from(["simple", "expanded", "lower-bound"]),
    sparse=st.booleans(),
)
def test_closed_form_gradients_match_autograd_over_shapes(
    seed, n_samples, n_features, n_components, mode, sparse
):
    counts, loadings, mean, variance = make_problem(seed, n_samples, n_features, n_components)
    counts[0, 0] = 0.0
    value, grad_loadings, grad_mean, grad_variance = autograd_reference(
        counts, loadings, mean, variance, mode, 3, seed=seed
    )
    data = count_matrix(sp.csr_matrix(counts) if sparse else counts, torch.float64, CPU)
    result = elbo_gradients(
        data,
        torch.as_tensor(loadings),
        torch.as_tensor(mean),
        torch.as_tensor(variance),
        mode,
        3,
        torch.Generator().manual_seed(seed),
    )
    torch.testing.assert_close(result.value, value.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(result.grad_mean, grad_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.loadings_grad, grad_loadings, rtol=1e-10, atol=1e-10)
    if mode == "lower-bound":
        torch.testing.assert_close(result.grad_variance, grad_variance, rtol=1e-10, atol=1e-10)
