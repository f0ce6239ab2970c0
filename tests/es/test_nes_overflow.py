"""A run diverging on an objective unbounded below stops with a ``FloatingPointError`` at the
generation where the search distribution leaves the dtype's range: ``ask`` never returns
non-finite samples and ``tell`` never stores a non-finite mean or step size."""

from __future__ import annotations

import pytest
import torch

from natgrad.es import SNES, XNES, minimize


def unbounded(samples):
    return -(samples.double() ** 2).sum(dim=-1)


@pytest.mark.parametrize("strategy_class", [SNES, XNES])
def test_ask_refuses_samples_that_overflow_float32(strategy_class):
    strategy = strategy_class([0.0, 0.0], 1.0, random_state=0, dtype=torch.float32)
    with pytest.raises(FloatingPointError, match=r"overflow torch\.float32") as caught:
        for _ in range(5000):
            samples = strategy.ask()
            assert bool(torch.isfinite(samples).all())
            strategy.tell(samples, unbounded(samples))
    assert f"generation {strategy.generation + 1}" in str(caught.value)
    assert bool(torch.isfinite(strategy.mean).all())


def test_an_update_that_overflows_is_refused_and_changes_nothing():
    strategy = SNES([0.0, 0.0], 1.0, eta_sigma=1e3, random_state=0, dtype=torch.float32)
    samples = strategy.ask()
    mean, sigma = strategy.mean.clone(), strategy.sigma.clone()
    with pytest.raises(FloatingPointError, match="sigma"):
        strategy.tell(samples, unbounded(samples))
    assert torch.equal(strategy.mean, mean) and torch.equal(strategy.sigma, sigma)
    assert strategy.generation == 0
    strategy.tell(samples, -unbounded(samples))  # the pending samples can still be told
    assert strategy.generation == 1


def test_minimize_reports_the_divergence():
    with pytest.raises(FloatingPointError, match="bounded below"):
        minimize(
            unbounded,
            [0.0, 0.0],
            method="xnes",
            vectorized=True,
            random_state=0,
            dtype=torch.float32,
            max_evaluations=10**6,
        )
