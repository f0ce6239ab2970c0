"""Twin set-ups of xNES/SNES that must agree exactly: ranking is done in the fitness's precision,
not the strategy's dtype; a copied strategy continues as the original does."""

import copy

import pytest
import torch

from natgrad.es import SNES, XNES, minimize, sphere


@pytest.mark.parametrize("strategy_class", [XNES, SNES])
def test_float32_strategy_ranks_float64_fitness_in_float64(strategy_class):
    """``10 + 1e-9 k`` are distinct in float64 but all round to 10 in float32; their ranks,
    hence the update, must be those of ``1e-9 k`` (fitness shaping sees only ranks)."""
    ranks = torch.tensor([3.0, 0.0, 5.0, 1.0, 6.0, 2.0, 4.0], dtype=torch.float64)
    moved = []
    for offset in (0.0, 10.0):
        strategy = strategy_class([1.0, 2.0, 3.0], random_state=0, dtype=torch.float32)
        samples = strategy.ask()
        strategy.tell(samples, offset + 1e-9 * ranks)
        moved.append(strategy.mean)
    assert torch.equal(moved[0], moved[1])
    assert not torch.equal(moved[0], torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("method", ["xnes", "snes"])
def test_minimize_in_float32_is_invariant_to_adding_a_constant(method):
    """``f`` and ``10 + f`` rank alike in float64 (the values here stay above 1e-12); rounded
    to float32 they tied once ``f < 1e-6`` and the runs parted (measured after 600
    evaluations)."""
    runs = [
        minimize(
            lambda x, offset=offset: offset + float(sphere(x.double())),
            [2.0] * 3,
            method=method,
            max_evaluations=900,
            random_state=0,
            dtype=torch.float32,
        )
        for offset in (0.0, 10.0)
    ]
    assert torch.equal(runs[0].mean, runs[1].mean) and torch.equal(runs[0].x, runs[1].x)
    assert runs[0].fun == float(sphere(runs[0].x.double())) < 1e-9


@pytest.mark.parametrize("strategy_class", [XNES, SNES])
def test_a_deep_copy_mid_run_continues_exactly_as_the_original(strategy_class):
    original = strategy_class([1.0, 2.0, 3.0], random_state=1)
    for _ in range(5):
        samples = original.ask()
        original.tell(samples, sphere(samples))
    copied = copy.deepcopy(original)
    for strategy in (original, copied):
        for _ in range(5):
            samples = strategy.ask()
            strategy.tell(samples, sphere(samples))
    assert torch.equal(original.mean, copied.mean)
    assert torch.equal(original.covariance, copied.covariance)
    assert original.generation == copied.generation == 10
