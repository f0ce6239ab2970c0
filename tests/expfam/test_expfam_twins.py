"""The same distribution reached two ways must agree: Bernoulli vs two-class Categorical,
Beta vs two-class Dirichlet, Gaussian vs one-dimensional MultivariateGaussian.

Oracles: mpmath (60 digits) for the Bernoulli near ``p = 0`` and ``p = 1``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.expfam import Bernoulli, Beta, Categorical, Dirichlet, Gaussian, MultivariateGaussian

mpmath = pytest.importorskip("mpmath")
mpmath.mp.dps = 60
SETTINGS = settings(max_examples=30, deadline=None)
DTYPE = torch.float64
# Success probabilities 10^e and 1 − 10^e for e in [-15, -0.31] (both tails and the middle).
PROBABILITIES = st.tuples(st.floats(-15.0, -0.31), st.booleans()).map(
    lambda pair: 1.0 - 10.0 ** pair[0] if pair[1] else 10.0 ** pair[0]
)


@SETTINGS
@given(PROBABILITIES, PROBABILITIES)
def test_bernoulli_and_two_class_categorical_match_mpmath(first: float, second: float) -> None:
    """Both twins hold the same logit ``θ``; the oracle is ``p = σ(θ)`` at 60 digits."""
    bernoulli = [Bernoulli(probs=torch.tensor(v, dtype=DTYPE)) for v in (first, second)]
    logits = [b.logits for b in bernoulli]
    categorical = [Categorical(logits=torch.stack((torch.zeros_like(t), t))) for t in logits]
    p, q = (1 / (1 + mpmath.exp(-mpmath.mpf(t.item()))) for t in logits)
    entropy = float(-p * mpmath.log(p) - (1 - p) * mpmath.log(1 - p))
    kl = float(p * mpmath.log(p / q) + (1 - p) * mpmath.log((1 - p) / (1 - q)))
    log_probs = [float(mpmath.log(p)), float(mpmath.log(1 - p))]
    # The KL is still the Bregman form: absolute error about ε·(|θ_p| + |θ_q|).
    kl_tolerance = 1e-12 * kl + 1e-15 * (1 + sum(abs(t.item()) for t in logits))
    outcomes = torch.tensor([1.0, 0.0], dtype=DTYPE)
    # log_softmax rounds 1 + e^θ: the Categorical's log-probabilities are off by about ε.
    for twin, slack in ((bernoulli, 0.0), (categorical, 4e-16)):
        assert abs(twin[0].entropy().item() - entropy) <= 1e-13 * entropy + slack
        assert abs(twin[0].kl(twin[1]).item() - kl) <= kl_tolerance
    np.testing.assert_allclose(
        bernoulli[0].log_prob(outcomes).numpy(), log_probs, rtol=1e-14, atol=4e-15
    )
    np.testing.assert_allclose(
        categorical[0].log_prob(outcomes.long()).numpy(), log_probs, rtol=1e-14, atol=4e-15
    )


@SETTINGS
@given(st.lists(st.floats(-3.0, 9.0), min_size=4, max_size=4), st.floats(0.01, 0.99))
def test_beta_and_two_class_dirichlet_agree(exponents: list[float], x: float) -> None:
    a, b, c, d = (torch.tensor(10.0**e, dtype=DTYPE) for e in exponents)
    beta_p, beta_q = Beta(a, b), Beta(c, d)
    dirichlet_p, dirichlet_q = Dirichlet(torch.stack((a, b))), Dirichlet(torch.stack((c, d)))
    torch.testing.assert_close(beta_p.entropy(), dirichlet_p.entropy(), rtol=1e-14, atol=0)
    torch.testing.assert_close(beta_p.kl(beta_q), dirichlet_p.kl(dirichlet_q), rtol=1e-14, atol=0)
    torch.testing.assert_close(beta_p.fisher(), dirichlet_p.fisher(), rtol=1e-14, atol=0)
    torch.testing.assert_close(
        torch.stack(beta_p.mean_params), dirichlet_p.mean_params[0], rtol=1e-14, atol=0
    )
    point = torch.tensor(x, dtype=DTYPE)
    torch.testing.assert_close(
        beta_p.log_prob(point),
        dirichlet_p.log_prob(torch.stack((point, 1 - point))),
        rtol=1e-12,
        atol=1e-12,
    )


def test_gaussian_and_one_dimensional_multivariate_gaussian_agree() -> None:
    loc, scale = torch.tensor([1e3, -0.5], dtype=DTYPE), torch.tensor([0.5, 2.0], dtype=DTYPE)
    gaussian_p, gaussian_q = Gaussian(loc, scale), Gaussian(loc + 1e-3, 1.02 * scale)
    mvn_p = MultivariateGaussian(loc[:, None], scale.square()[:, None, None])
    mvn_q = MultivariateGaussian((loc + 1e-3)[:, None], (1.02 * scale).square()[:, None, None])
    torch.testing.assert_close(gaussian_p.entropy(), mvn_p.entropy(), rtol=1e-14, atol=0)
    torch.testing.assert_close(gaussian_p.kl(gaussian_q), mvn_p.kl(mvn_q), rtol=1e-12, atol=0)
    torch.testing.assert_close(gaussian_p.fisher(), mvn_p.fisher(), rtol=1e-14, atol=0)
    x = loc + 0.3
    torch.testing.assert_close(
        gaussian_p.log_prob(x), mvn_p.log_prob(x[:, None]), rtol=1e-14, atol=0
    )
