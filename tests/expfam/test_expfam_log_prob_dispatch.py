"""``log_prob`` of the Gamma, Beta and Dirichlet evaluates Stirling's form only at the entries
that need it (concentration, or total, at least ``STIRLING_START``, near the mean) and the
generic form elsewhere: batches that mix both agree entry by entry with one-entry batches and
with the 60-digit oracles, and differentiate through both forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from decimal_oracle import beta_log_density, dirichlet_log_density, gamma_log_density

from natgrad.expfam import Beta, Dirichlet, Gamma
from natgrad.expfam.base import ExponentialFamily
from natgrad.expfam.concentration import STIRLING_START

EPS64 = float(torch.finfo(torch.float64).eps)


def _tensor(value) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


# Per family: parameters of a batch of 4 (below the threshold, above it, huge, huge) and
# points of shape (2, 4): row 0 near every mean, row 1 far from the last two.
CASES = {
    "gamma": (
        lambda params: Gamma(*params),
        (_tensor([3.0, 40.0, 1e8, 1e12]), _tensor([2.0, 0.5, 3.0, 1.0])),
        _tensor([[1.4, 81.0, 1e8 / 3, 1e12], [0.2, 60.0, 1e8, 2e12]]),
    ),
    "beta": (
        lambda params: Beta(*params),
        (_tensor([2.0, 30.0, 1e8, 1e12]), _tensor([3.0, 10.0, 3e8, 1e12])),
        _tensor([[0.4, 0.74, 0.25, 0.5], [0.9, 0.6, 0.1, 0.9]]),
    ),
}


def _gamma_oracle(params, x) -> np.ndarray:
    shape, rate = (p.tolist() for p in params)
    return np.array(
        [
            [gamma_log_density(v, a, b) for v, a, b in zip(row, shape, rate, strict=True)]
            for row in x
        ]
    )


def _beta_oracle(params, x) -> np.ndarray:
    a, b = (p.tolist() for p in params)
    return np.array(
        [[beta_log_density(v, s, t) for v, s, t in zip(row, a, b, strict=True)] for row in x]
    )


ORACLES = {"gamma": _gamma_oracle, "beta": _beta_oracle}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mixed_batches_agree_with_single_entries_and_the_oracle(name) -> None:
    build, params, x = CASES[name]
    result = build(params).log_prob(x)
    for row in range(x.shape[0]):
        for column in range(x.shape[1]):
            single = build(tuple(p[column : column + 1] for p in params))
            expected = single.log_prob(x[row, column : column + 1]).item()
            assert abs(result[row, column].item() - expected) <= 4 * EPS64 * (1 + abs(expected))
    expected = ORACLES[name](params, x.tolist())
    # Near the mean of the huge concentrations the generic form was off by 1e-9 to 1e-3.
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-13, atol=1e-13)


def test_dirichlet_mixed_batch_agrees_with_the_oracle() -> None:
    concentration = _tensor([[0.5, 2.0, 3.0], [4.0, 8.0, 20.0], [1e9, 2e9, 5e9]])
    x = _tensor([[[0.125, 0.25, 0.625], [0.125, 0.25, 0.625], [0.125, 0.25, 0.625]]])
    x = torch.cat((x, _tensor([[[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [0.6, 0.2, 0.2]]])))
    result = Dirichlet(concentration).log_prob(x)
    expected = [
        [
            dirichlet_log_density(point, alphas)
            for point, alphas in zip(row, concentration.tolist(), strict=True)
        ]
        for row in x.tolist()
    ]
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mixed_batches_have_first_and_second_derivatives(name) -> None:
    build, params, x = CASES[name]
    # Concentrations 1 … 100, small enough for finite differences, on both sides of the
    # threshold (the Beta's means, and so its points, are unchanged).
    scale = _tensor([1.0, 1.0, 1e-6, 1e-10])
    if name == "beta":
        values = (params[0] * scale, params[1] * scale, x)
    else:
        values = (params[0] * scale, params[1], x * scale)
    inputs = tuple(t.clone().requires_grad_(True) for t in values)

    def objective(*values):
        return build(values[:-1]).log_prob(values[-1])

    assert torch.autograd.gradcheck(objective, inputs)
    assert torch.autograd.gradgradcheck(objective, inputs)


def test_the_generic_form_is_kept_below_the_threshold() -> None:
    """Below ``STIRLING_START`` the generic form is as accurate and is used alone."""
    below = STIRLING_START * 0.99
    gamma = Gamma(_tensor([0.5, below]), _tensor([1.0, 2.0]))
    x = _tensor([0.4, below / 2.0])
    assert torch.equal(gamma.log_prob(x), ExponentialFamily.log_prob(gamma, x))
    beta = Beta(_tensor([0.5, below / 2]), _tensor([2.0, below / 2]))
    x = _tensor([0.2, 0.5])
    assert torch.equal(beta.log_prob(x), ExponentialFamily.log_prob(beta, x))
    dirichlet = Dirichlet(_tensor([[1.0, 2.0, below - 3.0]]))
    x = _tensor([[0.1, 0.3, 0.6]])
    assert torch.equal(dirichlet.log_prob(x), ExponentialFamily.log_prob(dirichlet, x))
