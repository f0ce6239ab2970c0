"""Concentrations far below 1 in float32: ``θ = α − 1`` alone rounded them (``α = 1e-6`` came
back 1.3 % off, ``α = 1e-8`` as 0 with a NaN entropy); the families keep them as given.

The reference is the same computation in float64 from the same float32 inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from natgrad.expfam import Beta, Dirichlet, Gamma

SMALL = [1e-4, 1e-6, 1e-8, 1e-12]


def _both(value) -> tuple[torch.Tensor, torch.Tensor]:
    single = torch.tensor(np.asarray(value, dtype=np.float32))
    return single, single.double()


def _quantities(p, q, x) -> list[torch.Tensor]:
    return [*p.mean_params, p.fisher(), p.entropy(), p.log_prob(x), p.kl(q), q.kl(p)]


def _assert_close(single: list[torch.Tensor], double: list[torch.Tensor]) -> None:
    for result, reference in zip(single, double, strict=True):
        assert result.dtype == torch.float32
        assert bool(result.isfinite().all())
        # atol: ψ(b) − ψ(a + b) is 0 in float32 once a + b rounds to b (a = 1e-12).
        np.testing.assert_allclose(result.double().numpy(), reference.numpy(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("concentration", SMALL)
def test_gamma_keeps_a_small_concentration(concentration) -> None:
    (alpha, alpha64), (rate, rate64) = _both(concentration), _both(2.0)
    p32, q32 = Gamma(alpha, rate), Gamma(3 * alpha, rate)
    p64, q64 = Gamma(alpha64, rate64), Gamma(3 * alpha64, rate64)
    assert torch.equal(p32.concentration, alpha)
    x32, x64 = _both(1e-3)
    _assert_close(_quantities(p32, q32, x32), _quantities(p64, q64, x64))


@pytest.mark.parametrize("concentration", SMALL)
def test_beta_and_dirichlet_keep_small_concentrations(concentration) -> None:
    (a, a64), (b, b64) = _both(concentration), _both(0.5)
    p32, q32 = Beta(a, b), Beta(2 * a, b)
    p64, q64 = Beta(a64, b64), Beta(2 * a64, b64)
    assert torch.equal(p32.a, a)
    x32, x64 = _both(0.25)
    _assert_close(_quantities(p32, q32, x32), _quantities(p64, q64, x64))
    alphas, alphas64 = _both([concentration, 0.5, 2.0])
    p32, q32 = Dirichlet(alphas), Dirichlet(alphas * torch.tensor([2.0, 1.0, 1.0]))
    p64, q64 = Dirichlet(alphas64), Dirichlet(alphas64 * torch.tensor([2.0, 1.0, 1.0]).double())
    assert torch.equal(p32.concentration, alphas)
    points, points64 = _both([0.25, 0.25, 0.5])
    _assert_close(_quantities(p32, q32, points), _quantities(p64, q64, points64))


def test_distributions_built_either_way_agree() -> None:
    """An instance from ``θ`` and one from ``α = θ + 1`` are the same distribution (exact for
    this ``θ``): KL 0 both ways, and the nearby-KL steps are exact in both routes."""
    theta = torch.tensor([-0.75, 2.5, 40.0], dtype=torch.float64)
    rate = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    from_natural = Gamma.from_natural(theta, -rate)
    from_concentration = Gamma(theta + 1.0, rate)
    zeros = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(from_natural.kl(from_concentration), zeros, rtol=0, atol=0)
    torch.testing.assert_close(from_concentration.kl(from_natural), zeros, rtol=0, atol=0)
    step = torch.tensor([1e-9, 1e-9, 1e-9], dtype=torch.float64)
    nearby_natural = Gamma.from_natural(theta + step, -rate)
    nearby_concentration = Gamma(theta + 1.0 + step, rate)
    torch.testing.assert_close(
        from_natural.kl(nearby_natural),
        from_concentration.kl(nearby_concentration),
        rtol=1e-6,
        atol=0,
    )
