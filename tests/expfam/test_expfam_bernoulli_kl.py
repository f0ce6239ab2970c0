"""Bernoulli KL against a 700-digit oracle (Python's ``decimal``), near ``p → 0``, ``p → 1``
and for nearby ``p ≈ q``, where the Bregman form through ``A(θ) = log(1 + eᶿ)`` cancelled.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.expfam import Bernoulli

EPS64 = float(torch.finfo(torch.float64).eps)
SETTINGS = settings(max_examples=200, deadline=None)


def _kl_oracle(logit: float, other_logit: float) -> float:
    """``p log(p/q) + (1 − p) log((1 − p)/(1 − q))`` at 700 digits (``e⁻⁷⁰⁰`` fits)."""
    with decimal.localcontext() as context:
        context.prec = 700
        a, b = Decimal(logit), Decimal(other_logit)
        p, q = 1 / (1 + (-a).exp()), 1 / (1 + (-b).exp())
        p_bar, q_bar = 1 / (1 + a.exp()), 1 / (1 + b.exp())
        return float(p * (p / q).ln() + p_bar * (p_bar / q_bar).ln())


def _kl(logit: float, other_logit: float, dtype=torch.float64) -> float:
    p = Bernoulli(logits=torch.tensor(logit, dtype=dtype))
    return p.kl(Bernoulli(logits=torch.tensor(other_logit, dtype=dtype))).item()


@st.composite
def logit_pairs(draw: st.DrawFn) -> tuple[float, float]:
    """Logits from −700 to 700 (``p`` down to 1e-304 or ``1 − p`` as small), with the second
    one far, or a relative step ``10⁻¹⁴ … 10⁻¹`` away."""
    logit = draw(st.floats(-700.0, 700.0))
    if draw(st.booleans()):
        return logit, draw(st.floats(-700.0, 700.0))
    step = 10.0 ** draw(st.floats(-14.0, -1.0)) * max(1.0, abs(logit))
    return logit, logit + draw(st.sampled_from([-1.0, 1.0])) * step


@SETTINGS
@given(logit_pairs())
def test_kl_matches_a_700_digit_oracle(pair: tuple[float, float]) -> None:
    expected = _kl_oracle(*pair)
    result = _kl(*pair)
    assert result >= 0.0
    assert abs(result - expected) <= 8 * EPS64 * expected + 1e-300


# The Bregman form gave −1.3e-15 (oracle 2.3e-27), 4.1e-20 (4.1e-31), −4.9e-17 (2.1e-25)
# and, at p → 1 with q far, lost all digits.
@pytest.mark.parametrize(
    ("logit", "other_logit"),
    [
        (10.0, 10.000000000009999),
        (20.0, 20.000000000019998),
        (2.0, 2.0000000000020002),
        (0.0, 1e-12),
        (-1.0, -1.000000001),
        (36.0, 30.0),
        (40.0, 45.0),
        (-40.0, -39.9999996),
    ],
)
def test_kl_of_nearby_or_nearly_certain_distributions(logit, other_logit) -> None:
    expected = _kl_oracle(logit, other_logit)
    assert abs(_kl(logit, other_logit) - expected) <= 8 * EPS64 * expected


def test_kl_in_float32_keeps_its_relative_accuracy() -> None:
    """Nearby logits in float32: the Bregman form's absolute error ~1e-7 swamps a KL of 1e-12."""
    logit, other_logit = 3.0, 3.0 + 2.0**-18
    expected = _kl_oracle(logit, other_logit)
    result = _kl(logit, other_logit, torch.float32)
    assert abs(result - expected) <= 1e-5 * expected


def test_kl_hessian_at_equal_distributions_is_the_fisher() -> None:
    """``∇²_b KL(σ(a) ‖ σ(b))`` at ``b = a`` is ``p(1 − p)`` (SciPy's ``expit``), also where
    ``p`` is near 0 or 1; so is ``fisher()``, whose ``p(1 − p)`` was 0.1 % off at ``θ = 30``."""
    logits = torch.tensor([-30.0, -3.0, 0.0, 0.5, 8.0, 30.0], dtype=torch.float64)
    p = Bernoulli(logits=logits)

    def kl_of(other_logits):
        return p.kl(Bernoulli(logits=other_logits, validate=False)).sum()

    gradient = torch.func.grad(kl_of)(logits)
    torch.testing.assert_close(gradient, torch.zeros_like(gradient), rtol=0, atol=1e-30)
    hessian = torch.autograd.functional.hessian(kl_of, logits)
    variance = scipy.special.expit(logits.numpy()) * scipy.special.expit(-logits.numpy())
    np.testing.assert_allclose(hessian.diagonal().numpy(), variance, rtol=1e-12)
    np.testing.assert_allclose(p.fisher()[..., 0, 0].numpy(), variance, rtol=4 * EPS64)
    others = logits + torch.tensor([0.3, -2.0, 1e-9, 5.0, -0.5, 700.0], dtype=torch.float64)
    inputs = (logits.clone().requires_grad_(True), others.requires_grad_(True))

    def objective(first, second):
        return Bernoulli(logits=first).kl(Bernoulli(logits=second))

    assert torch.autograd.gradcheck(objective, inputs)
    assert torch.autograd.gradgradcheck(objective, inputs)
