"""∇A(θ) = η and ∇²A(θ) = fisher() = Cov[T(x)] for every family."""

from __future__ import annotations

import pytest
import torch
from expfam_cases import FAMILY_NAMES, distributions, fixed, flat_hessian
from hypothesis import given, settings

SETTINGS = settings(max_examples=8, deadline=None)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_gradient_of_log_partition_is_mean(name: str) -> None:
    @SETTINGS
    @given(distributions(name))
    def check(cases) -> None:
        (distribution,) = cases
        theta = tuple(t.detach().requires_grad_(True) for t in distribution.natural_params)
        log_partition = type(distribution).log_partition_fn(*theta)
        assert log_partition.shape == distribution.batch_shape
        gradients = torch.autograd.grad(log_partition.sum(), theta)
        for gradient, mean in zip(gradients, distribution.mean_params, strict=True):
            torch.testing.assert_close(gradient, mean, rtol=1e-10, atol=1e-12)

    check()


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_hessian_of_log_partition_is_fisher(name: str) -> None:
    @SETTINGS
    @given(distributions(name))
    def check(cases) -> None:
        (distribution,) = cases
        fisher = distribution.fisher()
        d = distribution.natural_dim
        assert fisher.shape == (*distribution.batch_shape, d, d)
        for index in torch.cartesian_prod(*(torch.arange(s) for s in distribution.batch_shape)):
            position = tuple(index.reshape(-1).tolist())
            expected = flat_hessian(distribution, position)
            torch.testing.assert_close(fisher[position], expected, rtol=1e-9, atol=1e-11)

    check()


def _sample_statistics(distribution, count: int) -> torch.Tensor:
    torch.manual_seed(1234)
    samples = distribution.to_torch().sample((count,))
    return distribution.flatten_params(distribution.sufficient_statistics(samples))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_fisher_is_covariance_of_sufficient_statistics(name: str) -> None:
    """Monte Carlo: mean and covariance of ``T(x)`` within 5 standard errors of ``η``, ``F``."""
    distribution = fixed(name)
    count = 40_000
    statistics = _sample_statistics(distribution, count)
    sample_mean = statistics.mean(0)
    centred = statistics - sample_mean
    mean = distribution.flatten_params(distribution.mean_params)
    mean_error = statistics.std(0) / count**0.5
    assert ((sample_mean - mean).abs() <= 5 * mean_error + 1e-12).all()
    products = centred.unsqueeze(-1) * centred.unsqueeze(-2)
    sample_covariance = products.mean(0)
    covariance_error = products.std(0) / count**0.5
    gap = (sample_covariance - distribution.fisher()).abs()
    assert (gap <= 5 * covariance_error + 1e-12).all(), gap / covariance_error


def test_monte_carlo_check_detects_a_wrong_fisher() -> None:
    """The Monte Carlo tolerance is tight enough to reject a Fisher that is off by 5%."""
    distribution = fixed("gamma")
    count = 40_000
    statistics = _sample_statistics(distribution, count)
    centred = statistics - statistics.mean(0)
    products = centred.unsqueeze(-1) * centred.unsqueeze(-2)
    covariance_error = products.std(0) / count**0.5
    gap = (products.mean(0) - 1.05 * distribution.fisher()).abs()
    assert not (gap <= 5 * covariance_error).all()
