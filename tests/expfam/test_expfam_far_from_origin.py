"""Gaussian KL, entropy and log-density far from the origin, where ``A(θ)`` is huge.

The Bregman form ``A(θ_q) − A(θ_p) − ⟨θ_q − θ_p, η_p⟩`` cancels terms of size ``μ²/σ²``;
the oracles are SciPy and the closed forms evaluated in float64 on the usual parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from natgrad.expfam import Gaussian, MultivariateGaussian

# (dtype, loc, shift of the second mean, rtol): |μ|/σ large enough that the Bregman form is off.
CASES = [(torch.float64, 1e6, 1e-2, 1e-6), (torch.float32, 1e3, 1e-1, 1e-2)]


def gaussian_kl_oracle(loc_p, scale_p, loc_q, scale_q) -> np.ndarray:
    ratio = (scale_p / scale_q) ** 2
    return 0.5 * (ratio - 1.0 - np.log(ratio)) + (loc_p - loc_q) ** 2 / (2.0 * scale_q**2)


@pytest.mark.parametrize(("dtype", "loc", "shift", "rtol"), CASES)
def test_gaussian_far_from_the_origin(dtype, loc, shift, rtol) -> None:
    loc_p, scale_p = np.array([loc, -loc]), np.array([2.0, 0.5])
    loc_q, scale_q = loc_p + shift, scale_p * 1.001
    p = Gaussian(torch.tensor(loc_p, dtype=dtype), torch.tensor(scale_p, dtype=dtype))
    q = Gaussian(torch.tensor(loc_q, dtype=dtype), torch.tensor(scale_q, dtype=dtype))
    expected = gaussian_kl_oracle(loc_p, scale_p, loc_q, scale_q)
    np.testing.assert_allclose(p.kl(q).double().numpy(), expected, rtol=rtol)
    entropy = scipy.stats.norm(loc_p, scale_p).entropy()
    np.testing.assert_allclose(p.entropy().double().numpy(), entropy, rtol=rtol)
    x = loc_p + np.array([0.75, -1.5])
    log_density = scipy.stats.norm(loc_p, scale_p).logpdf(x)
    log_prob = p.log_prob(torch.tensor(x, dtype=dtype)).double().numpy()
    np.testing.assert_allclose(log_prob, log_density, rtol=rtol)


def mvn_kl_oracle(loc_p, cov_p, loc_q, cov_q) -> float:
    precision_q = np.linalg.inv(cov_q)
    difference = loc_p - loc_q
    _, log_det_q = np.linalg.slogdet(cov_q)
    _, log_det_p = np.linalg.slogdet(cov_p)
    trace = np.trace(precision_q @ cov_p)
    shift = difference @ precision_q @ difference
    return 0.5 * (trace - len(loc_p) + log_det_q - log_det_p + shift)


@pytest.mark.parametrize(("dtype", "loc", "shift", "rtol"), CASES)
def test_multivariate_gaussian_far_from_the_origin(dtype, loc, shift, rtol) -> None:
    loc_p = np.array([loc, -0.5 * loc, 0.3 * loc])
    cov_p = np.array([[2.0, 0.3, 0.1], [0.3, 1.0, -0.2], [0.1, -0.2, 0.5]])
    loc_q, cov_q = loc_p + shift * np.array([1.0, -2.0, 0.5]), cov_p * 1.002 + 0.001 * np.eye(3)
    p = MultivariateGaussian(torch.tensor(loc_p, dtype=dtype), torch.tensor(cov_p, dtype=dtype))
    q = MultivariateGaussian(torch.tensor(loc_q, dtype=dtype), torch.tensor(cov_q, dtype=dtype))
    expected = mvn_kl_oracle(loc_p, cov_p, loc_q, cov_q)
    np.testing.assert_allclose(p.kl(q).double().item(), expected, rtol=10 * rtol)
    reference = scipy.stats.multivariate_normal(loc_p, cov_p)
    np.testing.assert_allclose(p.entropy().double().item(), reference.entropy(), rtol=rtol)
    x = loc_p + np.array([[0.5, -1.0, 0.25], [-1.0, 0.0, 0.75]])
    log_prob = p.log_prob(torch.tensor(x, dtype=dtype)).double().numpy()
    np.testing.assert_allclose(log_prob, reference.logpdf(x), rtol=rtol)


def test_closed_form_kl_gradients_match_finite_differences() -> None:
    """The closed forms stay differentiable in the natural parameters of both arguments."""
    dtype = torch.float64
    gaussian_p = Gaussian(torch.tensor([0.3, -1.0], dtype=dtype), torch.tensor([0.8, 1.5]))
    gaussian_q = Gaussian(torch.tensor([1.0, 0.5], dtype=dtype), torch.tensor([1.2, 0.7]))
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=dtype)
    mvn_p = MultivariateGaussian(torch.tensor([0.2, -0.4], dtype=dtype), cov)
    mvn_q = MultivariateGaussian(torch.tensor([-0.5, 0.1], dtype=dtype), cov + 0.2 * cov.T @ cov)
    for p, q in [(gaussian_p, gaussian_q), (mvn_p, mvn_q)]:
        family = type(p)
        inputs = tuple(t.clone().requires_grad_(True) for t in p.natural_params + q.natural_params)
        count = len(p.natural_params)

        def kl(*theta, family=family, count=count):
            first = family.from_natural(*theta[:count], validate=False)
            second = family.from_natural(*theta[count:], validate=False)
            return first.kl(second).sum() + first.entropy().sum()

        assert torch.autograd.gradcheck(kl, inputs)
