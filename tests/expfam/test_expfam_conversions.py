"""Round trips natural ↔ mean ↔ usual parameters, the documented conventions, and Newton."""

from __future__ import annotations

import math

import pytest
import torch
from expfam_cases import DTYPE, FAMILY_NAMES, distributions
from hypothesis import given, settings
from hypothesis import strategies as st

import natgrad.expfam.newton as newton
from natgrad.expfam import (
    Bernoulli,
    Beta,
    Categorical,
    Dirichlet,
    Gamma,
    Gaussian,
    MultivariateGaussian,
    Poisson,
)

SETTINGS = settings(max_examples=8, deadline=None)

USUAL = {
    "gaussian": lambda d: Gaussian(d.loc, d.scale),
    "multivariate_gaussian": lambda d: MultivariateGaussian(d.loc, d.covariance),
    "bernoulli": lambda d: Bernoulli(probs=d.probs),
    "categorical": lambda d: Categorical(probs=d.probs),
    "poisson": lambda d: Poisson(d.rate),
    "gamma": lambda d: Gamma(d.concentration, d.rate),
    "beta": lambda d: Beta(d.a, d.b),
    "dirichlet": lambda d: Dirichlet(d.concentration),
}


def _assert_params_close(actual, expected, rtol: float = 1e-9, atol: float = 1e-10) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_round_trips(name: str) -> None:
    @SETTINGS
    @given(distributions(name))
    def check(cases) -> None:
        (distribution,) = cases
        family = type(distribution)
        theta = distribution.natural_params
        _assert_params_close(family.from_natural(*theta).natural_params, theta, 0, 0)
        _assert_params_close(family.from_mean(*distribution.mean_params).natural_params, theta)
        _assert_params_close(USUAL[name](distribution).natural_params, theta)

    check()


def test_gaussian_conventions() -> None:
    loc = torch.tensor([0.5, -2.0], dtype=DTYPE)
    scale = torch.tensor([2.0, 0.25], dtype=DTYPE)
    q = Gaussian(loc, scale)
    _assert_params_close(q.natural_params, (loc / scale**2, -1 / (2 * scale**2)))
    _assert_params_close(q.mean_params, (loc, loc**2 + scale**2))
    torch.testing.assert_close(q.variance, scale**2)
    torch.testing.assert_close(q.precision, scale**-2)
    torch.testing.assert_close(q.to_torch().mean, loc)
    theta1, theta2 = q.natural_params
    _assert_params_close(Gaussian.from_natural(theta1, theta2).mean_params, q.mean_params)


def test_multivariate_gaussian_conventions() -> None:
    loc = torch.tensor([0.5, -1.0], dtype=DTYPE)
    covariance = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=DTYPE)
    q = MultivariateGaussian(loc, covariance)
    precision = torch.linalg.inv(covariance)
    _assert_params_close(q.natural_params, (precision @ loc, -0.5 * precision))
    _assert_params_close(q.mean_params, (loc, covariance + torch.outer(loc, loc)))
    torch.testing.assert_close(q.precision, precision)


def test_categorical_minimal_parameterisation() -> None:
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=DTYPE)
    q = Categorical(probs=probs)
    (theta,) = q.natural_params
    torch.testing.assert_close(theta, probs[:, :2].log() - probs[:, 2:].log())
    torch.testing.assert_close(q.mean_params[0], probs[:, :2])
    torch.testing.assert_close(q.probs, probs)
    shifted = Categorical(logits=probs.log() + 7.0)
    _assert_params_close(shifted.natural_params, q.natural_params)
    one_hot = q.sufficient_statistics(torch.tensor([2, 0]))[0]
    torch.testing.assert_close(one_hot, torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=DTYPE))


def test_scalar_family_conventions() -> None:
    p = torch.tensor([0.1, 0.7], dtype=DTYPE)
    _assert_params_close(Bernoulli(probs=p).natural_params, (torch.log(p / (1 - p)),))
    _assert_params_close(Bernoulli(probs=p).mean_params, (p,))
    rate = torch.tensor([0.5, 4.0], dtype=DTYPE)
    _assert_params_close(Poisson(rate).natural_params, (rate.log(),))
    _assert_params_close(Poisson(rate).mean_params, (rate,))
    alpha, beta = torch.tensor([0.5, 3.0], dtype=DTYPE), torch.tensor([2.0, 0.1], dtype=DTYPE)
    gamma = Gamma(alpha, beta)
    _assert_params_close(gamma.natural_params, (alpha - 1, -beta))
    _assert_params_close(gamma.mean_params, (torch.digamma(alpha) - beta.log(), alpha / beta))
    x = torch.tensor([0.3, 2.0], dtype=DTYPE)
    _assert_params_close(gamma.sufficient_statistics(x), (x.log(), x))
    _assert_params_close(Beta(alpha, beta).natural_params, (alpha - 1, beta - 1))
    _assert_params_close(
        Beta(alpha, beta).sufficient_statistics(x / 3), ((x / 3).log(), (1 - x / 3).log())
    )
    concentration = torch.tensor([0.5, 2.0, 7.0], dtype=DTYPE)
    _assert_params_close(Dirichlet(concentration).natural_params, (concentration - 1,))


def test_usual_parameters_broadcast() -> None:
    q = Gaussian(torch.zeros(3, 1, dtype=DTYPE), torch.ones(4, dtype=DTYPE))
    assert q.batch_shape == (3, 4)
    assert q.fisher().shape == (3, 4, 2, 2)
    covariance = torch.eye(2, dtype=DTYPE).expand(5, 2, 2)
    mvn = MultivariateGaussian(torch.zeros(2, dtype=DTYPE), covariance)
    assert mvn.batch_shape == (5,)
    assert mvn.fisher().shape == (5, 6, 6)
    assert Dirichlet(torch.ones(4, 3, dtype=DTYPE)).entropy().shape == (4,)


log_uniform = st.floats(math.log(1e-3), math.log(1e4)).map(math.exp)


@settings(max_examples=25, deadline=None)
@given(alpha=log_uniform, beta=log_uniform)
def test_gamma_newton_over_a_wide_range(alpha: float, beta: float) -> None:
    q = Gamma(torch.tensor(alpha, dtype=DTYPE), torch.tensor(beta, dtype=DTYPE))
    recovered = Gamma.from_mean(*q.mean_params)
    torch.testing.assert_close(recovered.concentration, q.concentration, rtol=1e-7, atol=0)
    torch.testing.assert_close(recovered.rate, q.rate, rtol=1e-7, atol=0)


@settings(max_examples=25, deadline=None)
@given(st.lists(log_uniform, min_size=2, max_size=4))
def test_dirichlet_and_beta_newton_over_a_wide_range(concentration: list[float]) -> None:
    alpha = torch.tensor(concentration, dtype=DTYPE)
    recovered = Dirichlet.from_mean(*Dirichlet(alpha).mean_params).concentration
    torch.testing.assert_close(recovered, alpha, rtol=1e-7, atol=0)
    beta = Beta(alpha[0], alpha[1])
    recovered_beta = Beta.from_mean(*beta.mean_params)
    torch.testing.assert_close(recovered_beta.a, alpha[0], rtol=1e-7, atol=0)
    torch.testing.assert_close(recovered_beta.b, alpha[1], rtol=1e-7, atol=0)


@pytest.mark.parametrize(
    "distribution",
    [
        Gamma(
            torch.tensor([0.3, 2.0, 50.0], dtype=DTYPE), torch.tensor([1.0, 0.2, 3.0], dtype=DTYPE)
        ),
        Beta(
            torch.tensor([0.3, 2.0, 40.0], dtype=DTYPE), torch.tensor([5.0, 0.7, 2.0], dtype=DTYPE)
        ),
        Dirichlet(torch.tensor([[0.4, 1.0, 6.0], [3.0, 3.0, 0.5]], dtype=DTYPE)),
    ],
    ids=["gamma", "beta", "dirichlet"],
)
def test_implicit_derivative_of_from_mean_matches_finite_differences(distribution) -> None:
    family = type(distribution)
    eta = tuple(e.detach().requires_grad_(True) for e in distribution.mean_params)
    assert torch.autograd.gradcheck(
        lambda *mean: family.from_mean(*mean).natural_params, eta, eps=1e-6, atol=1e-6
    )


def test_newton_failure_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(newton, "NEWTON_MAX_ITER", 1)
    eta = Gamma(torch.tensor([0.01], dtype=DTYPE), torch.tensor([3.0], dtype=DTYPE)).mean_params
    with pytest.raises(RuntimeError, match="Newton did not converge"):
        Gamma.from_mean(*eta)


def test_from_mean_keeps_float32() -> None:
    q = Gamma(torch.tensor([0.7, 5.0]), torch.tensor([1.5, 0.3]))
    recovered = Gamma.from_mean(*q.mean_params)
    assert recovered.concentration.dtype == torch.float32
    torch.testing.assert_close(recovered.concentration, q.concentration, rtol=1e-4, atol=0)


def test_derived_quantities_are_differentiable() -> None:
    scale = torch.tensor([0.5, 3.0], dtype=DTYPE, requires_grad=True)
    entropy = Gaussian(torch.zeros(2, dtype=DTYPE), scale).entropy().sum()
    (gradient,) = torch.autograd.grad(entropy, scale)
    torch.testing.assert_close(gradient, 1 / scale.detach())
