"""Invalid parameters raise clear errors naming the offending value."""

from __future__ import annotations

import math

import pytest
import torch

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

NAN, INF = math.nan, math.inf


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


INVALID = [
    (lambda: Gaussian(0.0, -1.0), "scale must be positive"),
    (lambda: Gaussian(0.0, 0.0), "scale must be positive"),
    (lambda: Gaussian(NAN, 1.0), "loc must be finite"),
    (lambda: Gaussian(0.0, INF), "scale must be finite"),
    (lambda: Gaussian(t([0.0, 0.0, 0.0]), t([1.0, 1.0])), "do not broadcast"),
    (lambda: Gaussian.from_natural(0.0, 0.0), "theta2 < 0"),
    (lambda: Gaussian.from_natural(0.0, 1.5), "theta2 < 0"),
    (lambda: Gaussian.from_natural(NAN, -1.0), "finite"),
    (lambda: Gaussian.from_mean(0.0, -1.0), r"eta2 > eta1\*\*2"),
    (lambda: Gaussian.from_mean(2.0, 4.0), r"eta2 > eta1\*\*2"),
    (lambda: MultivariateGaussian(t([0, 0]), t([[1, 2], [2, 1]])), "positive definite"),
    (lambda: MultivariateGaussian(t([0, 0]), t([[1, 0.5], [0, 1]])), "symmetric"),
    (lambda: MultivariateGaussian(t([0, 0]), torch.eye(3)), "trailing shape"),
    (lambda: MultivariateGaussian(t([0, NAN]), torch.eye(2)), "finite"),
    (lambda: MultivariateGaussian.from_natural(t([0, 0]), torch.eye(2)), "positive definite"),
    (lambda: MultivariateGaussian.from_mean(t([1, 0]), torch.eye(2)), "positive definite"),
    (lambda: Bernoulli(probs=1.2), "strictly between 0 and 1"),
    (lambda: Bernoulli(probs=-0.1), "strictly between 0 and 1"),
    (lambda: Bernoulli(probs=0.0), "strictly between 0 and 1"),
    (lambda: Bernoulli(probs=1.0), "strictly between 0 and 1"),
    (lambda: Bernoulli(logits=NAN), "finite"),
    (lambda: Bernoulli(), "exactly one"),
    (lambda: Bernoulli(probs=0.5, logits=0.0), "exactly one"),
    (lambda: Bernoulli.from_mean(1.5), "0 < eta < 1"),
    (lambda: Categorical(probs=t([0.5, 0.6])), "sum to one"),
    (lambda: Categorical(probs=t([1.2, -0.2])), "positive"),
    (lambda: Categorical(probs=t([0.0, 1.0])), "positive"),
    (lambda: Categorical(probs=t([1.0])), "at least 2"),
    (lambda: Categorical(logits=t([0.0, INF])), "finite"),
    (lambda: Categorical.from_mean(t([0.6, 0.5])), r"sum\(eta\) < 1"),
    (lambda: Poisson(-1.0), "rate must be positive"),
    (lambda: Poisson(0.0), "rate must be positive"),
    (lambda: Poisson.from_mean(0.0), "eta > 0"),
    (lambda: Gamma(-1.0, 1.0), "must be positive"),
    (lambda: Gamma(1.0, 0.0), "must be positive"),
    (lambda: Gamma.from_natural(-1.5, -1.0), "theta1 > -1"),
    (lambda: Gamma.from_mean(1.0, 2.0), r"log\(eta2\) > eta1"),
    (lambda: Beta(0.0, 1.0), "must be positive"),
    (lambda: Beta.from_natural(0.0, -2.0), "theta2 > -1"),
    (lambda: Beta.from_mean(-0.1, -0.1), r"exp\(eta1\) \+ exp\(eta2\) < 1"),
    (lambda: Dirichlet(t([1.0])), "at least 2"),
    (lambda: Dirichlet(t([1.0, -1.0])), "must be positive"),
    (lambda: Dirichlet.from_mean(t([0.0, -1.0])), r"sum\(exp\(eta\)\) < 1"),
]


@pytest.mark.parametrize(("build", "message"), INVALID)
def test_invalid_parameters_raise(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_error_names_the_offending_entry() -> None:
    with pytest.raises(ValueError, match=r"scale\[0, 1\] = -2.0"):
        Gaussian(t([[0.0, 1.0]]), t([1.0, -2.0]))
    with pytest.raises(ValueError, match=r"theta1\[1\] = 1.0, theta2\[1\] = 2.0"):
        Gaussian.from_natural(t([0.0, 1.0]), t([-1.0, 2.0]))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Gaussian(torch.tensor([1j]), 1.0), "real floating-point"),
        (lambda: Poisson(torch.tensor([True])), "real floating-point"),
        (lambda: Gaussian.from_natural(1.0), "takes 2 parameters"),
        (lambda: Gaussian("zero", 1.0), "tensor or a number"),
        (
            lambda: Categorical(probs=t([0.5, 0.5])).sufficient_statistics(t([0.0])),
            "integer class indices",
        ),
    ],
)
def test_wrong_types_raise(build, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        build()


def test_validation_can_be_skipped() -> None:
    q = Gaussian.from_natural(0.0, 1.0, validate=False)
    assert torch.isnan(q.scale)


def test_integer_parameters_become_floating_point() -> None:
    q = Poisson(torch.tensor([1, 3]))
    assert q.rate.dtype == torch.get_default_dtype()
    torch.testing.assert_close(q.rate, torch.tensor([1.0, 3.0]))


def test_unflatten_checks_the_size() -> None:
    q = Gaussian(t([0.0]), t([1.0]))
    with pytest.raises(ValueError, match="last dimension of 2"):
        q.unflatten_params(t([[1.0, 2.0, 3.0]]))
