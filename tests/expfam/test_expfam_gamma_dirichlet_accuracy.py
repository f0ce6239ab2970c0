"""Fisher, KL and entropy of the Gamma, Beta and Dirichlet against mpmath at 80 digits.

The distributions span concentrations 1e-3 … 1e12, far apart, nearby (relative changes down
to 1e-14) and with the same mean. The oracles take the concentrations the objects hold (the
ones they were built from, see :mod:`natgrad.expfam.concentration`) and the rates ``−θ₂``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.expfam import Beta, Dirichlet, Gamma

mpmath = pytest.importorskip("mpmath")
mpmath.mp.dps = 80
SETTINGS = settings(max_examples=40, deadline=None)
EPS64 = float(torch.finfo(torch.float64).eps)
# Away from the same-mean direction the closed forms are accurate to ~1e-13 relative.
RTOL = 1e-12


def _concentrations(concentration: torch.Tensor) -> list:
    return [mpmath.mpf(float(a)) for a in concentration.reshape(-1)]


def _dirichlet_kl_oracle(p: Dirichlet, q: Dirichlet) -> float:
    a, b = _concentrations(p.concentration), _concentrations(q.concentration)
    a0, b0 = sum(a), sum(b)
    value = mpmath.loggamma(a0) - mpmath.loggamma(b0)
    for x, y in zip(a, b, strict=True):
        value += mpmath.loggamma(y) - mpmath.loggamma(x)
        value += (x - y) * (mpmath.digamma(x) - mpmath.digamma(a0))
    return float(value)


def _gamma_kl_oracle(p: Gamma, q: Gamma) -> float:
    (a1,), (a2,) = _concentrations(p.concentration), _concentrations(q.concentration)
    b1, b2 = -mpmath.mpf(p.natural_params[1].item()), -mpmath.mpf(q.natural_params[1].item())
    value = (a1 - a2) * mpmath.digamma(a1) - mpmath.loggamma(a1) + mpmath.loggamma(a2)
    return float(value + a2 * (mpmath.log(b1) - mpmath.log(b2)) + a1 * (b2 - b1) / b1)


def _dirichlet_entropy_oracle(concentration: list) -> float:
    a0, count = sum(concentration), len(concentration)
    value = -mpmath.loggamma(a0) + (a0 - count) * mpmath.digamma(a0)
    for x in concentration:
        value += mpmath.loggamma(x) - (x - 1) * mpmath.digamma(x)
    return float(value)


def _mean_rounding(concentration, other, change, total_change) -> float:
    """Error allowed for rounding the relative changes ``s`` and ``s₀`` (each to ``ε|s|``)
    before subtracting them: ``w = (s₀ − s) α/β`` then has an error ``ε(|s| + |s₀|) α/β``, and
    ``β φ(w) ≈ β w²/2`` one of ``β |w| ε (|s| + |s₀|) α/β``. Large only when ``|w| ≪ |s|``
    (nearly the same mean).
    """
    mean_change = (total_change - change) * concentration / other
    return float(np.sum(8 * EPS64 * concentration * np.abs(mean_change * change)))


def _scales(draw: st.DrawFn, count: int, low: float, high: float) -> np.ndarray:
    exponents = draw(st.lists(st.floats(low, high), min_size=count, max_size=count))
    return 10.0 ** np.array(exponents)


@st.composite
def concentration_pairs(draw: st.DrawFn, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Two concentration vectors: unrelated, nearby per entry, or one scaled copy."""
    first = _scales(draw, count, -3.0, 12.0)
    kind = draw(st.sampled_from(["unrelated", "nearby", "scaled"]))
    if kind == "unrelated":
        return first, _scales(draw, count, -3.0, 12.0)
    steps = _scales(draw, count if kind == "nearby" else 1, -14.0, -0.5)
    signs = np.array(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=1, max_size=1)))
    return first, first * (1.0 + signs * steps)


@SETTINGS
@given(concentration_pairs(1), concentration_pairs(1))
def test_gamma_kl_matches_mpmath(shapes, rates) -> None:
    p = Gamma(torch.tensor(shapes[0]), torch.tensor(rates[0]))
    q = Gamma(torch.tensor(shapes[1]), torch.tensor(rates[1]))
    expected = _gamma_kl_oracle(p, q)
    concentration, other = p.concentration.numpy(), q.concentration.numpy()
    shape_change = ((q.concentration - p.concentration) / p.concentration).numpy()
    rate_change = ((p.natural_params[1] - q.natural_params[1]) / p.rate).numpy()
    rounding = 0.0
    if abs(shape_change[0]) + abs(rate_change[0]) <= 1.0:
        rounding = _mean_rounding(concentration, other, shape_change, rate_change)
    assert abs(p.kl(q).item() - expected) <= RTOL * expected + rounding


@pytest.mark.parametrize("count", [2, 3])
def test_dirichlet_and_beta_kl_match_mpmath(count: int) -> None:
    @SETTINGS
    @given(concentration_pairs(count))
    def check(pair) -> None:
        p, q = Dirichlet(torch.tensor(pair[0])), Dirichlet(torch.tensor(pair[1]))
        expected = _dirichlet_kl_oracle(p, q)
        step = q.concentration - p.concentration
        change = (step / p.concentration).numpy()
        total_change = (step.sum() / p.concentration.sum()).numpy()
        nearby = np.abs(change) + np.abs(total_change) <= 1.0
        rounding = _mean_rounding(
            p.concentration.numpy()[nearby],
            q.concentration.numpy()[nearby],
            change[nearby],
            total_change,
        )
        tolerance = RTOL * expected + rounding
        assert abs(p.kl(q).item() - expected) <= tolerance
        if count == 2:
            beta_p, beta_q = Beta(*torch.tensor(pair[0])), Beta(*torch.tensor(pair[1]))
            assert abs(beta_p.kl(beta_q).item() - expected) <= tolerance

    check()


# KL(p ‖ q) for nearby q; the Bregman form through A(θ) was off by (relative) 4e3, 2e-3, 1
# and 2e8 respectively.
NEARBY_CASES = [
    (Gamma, ((1e6, 1e6), (1e6 + 1, 1e6 + 1))),
    (Gamma, ((3.0, 1.0), (3.0 + 1e-7, 1.0))),
    (Gamma, ((1e12, 1e12), (1.00000001e12, 1e12))),
    (Dirichlet, (((1e8, 1e-3),), ((1e8 + 1, 1e-3),))),
]


@pytest.mark.parametrize(("family", "parameters"), NEARBY_CASES)
def test_kl_of_nearby_distributions_is_accurate(family, parameters) -> None:
    p = family(*(torch.tensor(v, dtype=torch.float64) for v in parameters[0]))
    q = family(*(torch.tensor(v, dtype=torch.float64) for v in parameters[1]))
    oracle = _gamma_kl_oracle if family is Gamma else _dirichlet_kl_oracle
    expected = oracle(p, q)
    assert abs(p.kl(q).item() - expected) <= 1e-12 * expected


@SETTINGS
@given(concentration_pairs(1), concentration_pairs(3))
def test_entropies_match_mpmath(shape_rate, concentrations) -> None:
    gamma = Gamma(torch.tensor(shape_rate[0]), torch.tensor(shape_rate[1]))
    (shape,) = _concentrations(gamma.concentration)
    rate = -mpmath.mpf(gamma.natural_params[1].item())
    expected = shape - mpmath.log(rate) + mpmath.loggamma(shape)
    expected = float(expected + (1 - shape) * mpmath.digamma(shape))
    assert abs(gamma.entropy().item() - expected) <= 1e-13 * max(1.0, abs(expected))
    dirichlet = Dirichlet(torch.tensor(concentrations[0]))
    expected = _dirichlet_entropy_oracle(_concentrations(dirichlet.concentration))
    assert abs(dirichlet.entropy().item() - expected) <= 1e-13 * max(1.0, abs(expected))
    beta = Beta(*torch.tensor(concentrations[0][:2]))
    expected = _dirichlet_entropy_oracle(_concentrations(torch.stack((beta.a, beta.b))))
    assert abs(beta.entropy().item() - expected) <= 1e-13 * max(1.0, abs(expected))


@SETTINGS
@given(st.lists(st.floats(-3.0, 12.0), min_size=3, max_size=3))
def test_fisher_uses_an_accurate_trigamma(exponents: list[float]) -> None:
    """``ψ′`` entries of the Fisher against mpmath (``torch.polygamma`` is off by 5e-10)."""
    dirichlet = Dirichlet(torch.tensor(10.0 ** np.array(exponents)))
    a, b, c = _concentrations(dirichlet.concentration)
    trigamma = [float(mpmath.polygamma(1, x)) for x in (a, b, c, a + b)]
    fisher = Gamma(dirichlet.concentration[0], torch.tensor(2.0)).fisher()
    np.testing.assert_allclose(fisher[0, 0].item(), trigamma[0], rtol=4 * EPS64)
    beta = Beta(*dirichlet.concentration[:2]).fisher().numpy()
    tolerance = 8 * EPS64 * (np.array(trigamma[:2]) + trigamma[3])
    assert np.all(np.abs(np.diag(beta) - (np.array(trigamma[:2]) - trigamma[3])) <= tolerance)
    np.testing.assert_allclose(beta[0, 1], -trigamma[3], rtol=4 * EPS64)
    total = float(mpmath.polygamma(1, a + b + c))
    expected = np.diag(trigamma[:3]) - total
    assert np.all(
        np.abs(dirichlet.fisher().numpy() - expected)
        <= 8 * EPS64 * (np.abs(np.diag(trigamma[:3])) + total)
    )


def test_kl_and_entropy_gradients_match_finite_differences() -> None:
    dtype = torch.float64
    cases = [
        (
            Gamma(torch.tensor([0.7, 30.0], dtype=dtype), torch.tensor([1.5, 0.2], dtype=dtype)),
            Gamma(torch.tensor([0.75, 12.0], dtype=dtype), torch.tensor([1.4, 0.25], dtype=dtype)),
        ),
        (
            Beta(torch.tensor([0.4, 8.0], dtype=dtype), torch.tensor([2.0, 9.0], dtype=dtype)),
            Beta(torch.tensor([0.5, 8.1], dtype=dtype), torch.tensor([6.0, 8.9], dtype=dtype)),
        ),
        (
            Dirichlet(torch.tensor([0.4, 3.0, 12.0], dtype=dtype)),
            Dirichlet(torch.tensor([0.45, 2.0, 30.0], dtype=dtype)),
        ),
    ]
    for p, q in cases:
        family, count = type(p), len(p.natural_params)
        inputs = tuple(t.clone().requires_grad_(True) for t in p.natural_params + q.natural_params)

        def objective(*theta, family=family, count=count):
            first = family.from_natural(*theta[:count], validate=False)
            second = family.from_natural(*theta[count:], validate=False)
            return first.kl(second).sum() + first.entropy().sum()

        assert torch.autograd.gradcheck(objective, inputs)


def test_float32_kl_and_entropy_of_large_shapes() -> None:
    """In float32 the generic forms lose everything at α = 1e6; the closed forms keep ~1e-5."""
    shapes, rates = (1e6, 1.001e6), (2.0, 2.0)
    p = Gamma(torch.tensor(shapes[0]), torch.tensor(rates[0]))
    q = Gamma(torch.tensor(shapes[1]), torch.tensor(rates[1]))
    expected = _gamma_kl_oracle(p, q)
    assert abs(p.kl(q).item() - expected) <= 1e-4 * expected
    shape = mpmath.mpf(shapes[0])
    entropy = shape - mpmath.log(2) + mpmath.loggamma(shape) + (1 - shape) * mpmath.digamma(shape)
    assert abs(p.entropy().item() - float(entropy)) <= 1e-5 * abs(float(entropy))
