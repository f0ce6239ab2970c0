"""KL, entropy and log-density against torch.distributions (and SciPy for the Poisson entropy)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from expfam_cases import DTYPE, FAMILY_NAMES, distributions
from hypothesis import given, settings

from natgrad.expfam import Gaussian, Poisson
from natgrad.expfam.poisson import ENTROPY_ASYMPTOTIC_RATE

SETTINGS = settings(max_examples=8, deadline=None)


def _support_points(distribution) -> torch.Tensor:
    torch.manual_seed(7)
    return distribution.to_torch().sample((3,))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_kl_entropy_and_log_prob_match_torch(name: str) -> None:
    @SETTINGS
    @given(distributions(name, count=2))
    def check(cases) -> None:
        p, q = cases
        reference_p, reference_q = p.to_torch(), q.to_torch()
        assert reference_p.batch_shape == p.batch_shape
        expected_kl = torch.distributions.kl_divergence(reference_p, reference_q)
        torch.testing.assert_close(p.kl(q), expected_kl, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(p.kl(p), torch.zeros_like(expected_kl), rtol=0, atol=1e-10)
        if name != "poisson":
            torch.testing.assert_close(p.entropy(), reference_p.entropy(), rtol=1e-9, atol=1e-10)
        x = _support_points(p)
        torch.testing.assert_close(p.log_prob(x), reference_p.log_prob(x), rtol=1e-9, atol=1e-10)

    check()


def _poisson_entropy_oracle(rate: float) -> float:
    """``−Σ p log p`` with SciPy's log-pmf over ``rate ± 40 sd`` (float64, no cancellation)."""
    spread = 40.0 * np.sqrt(rate) + 50.0
    counts = np.arange(max(0.0, np.floor(rate - spread)), np.ceil(rate + spread) + 1.0)
    log_pmf = scipy.stats.poisson.logpmf(counts, rate)
    return float(-np.sum(np.exp(log_pmf) * log_pmf))


@pytest.mark.parametrize("rate", [1e-3, 0.05, 0.7, 3.0, 25.0, 400.0, 999.0, 1001.0, 4000.0, 1e5])
def test_poisson_entropy_matches_scipy(rate: float) -> None:
    entropy = Poisson(torch.tensor([rate], dtype=DTYPE)).entropy().numpy()
    # The oracle's log-pmf loses ~1e-16·k·log(rate) per term to rounding: loosen for huge rates.
    rtol = 1e-11 if rate <= 1e4 else 1e-9
    np.testing.assert_allclose(entropy, [_poisson_entropy_oracle(rate)], rtol=rtol)
    if rate <= 1000:
        np.testing.assert_allclose(entropy, [scipy.stats.poisson(rate).entropy()], rtol=1e-11)


def test_poisson_entropy_is_continuous_at_the_asymptotic_switch() -> None:
    rates = torch.tensor(
        [ENTROPY_ASYMPTOTIC_RATE * (1 - 1e-12), ENTROPY_ASYMPTOTIC_RATE * (1 + 1e-12)],
        dtype=DTYPE,
    )
    entropy = Poisson(rates).entropy()
    assert abs(entropy[1] - entropy[0]) < 1e-12


def test_poisson_entropy_gradient_matches_finite_differences() -> None:
    rate = torch.tensor([0.3, 12.0, 2500.0], dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: Poisson(r).entropy(), (rate,))


def test_kl_between_different_families_is_refused() -> None:
    with pytest.raises(TypeError, match="two Gaussian"):
        Gaussian(0.0, 1.0).kl(Poisson(1.0))
