"""xNES's affine invariance, re-told samples against closed-form updates, seeds and options."""

import math

import numpy as np
import pytest
import torch

from natgrad.es import (
    SNES,
    XNES,
    default_population_size,
    default_snes_rates,
    default_xnes_rates,
    ellipsoid,
    minimize,
    sphere,
)

DTYPE = torch.float64


def utilities(fitness):
    """The paper's ``uₖ = max(0, ln(λ/2 + 1) − ln k) / Σⱼ … − 1/λ`` by rank, lowest value best."""
    size = len(fitness)
    raw = [max(0.0, math.log(size / 2 + 1) - math.log(k)) for k in range(1, size + 1)]
    by_rank = [r / sum(raw) - 1 / size for r in raw]
    order = sorted(range(size), key=lambda index: float(fitness[index]))
    shaped = torch.empty(size, dtype=DTYPE)
    for rank, index in enumerate(order):
        shaped[index] = by_rank[rank]
    return shaped


def test_xnes_is_invariant_to_an_affine_change_of_coordinates():
    """Run xNES on ``f`` in ``x`` and on ``g(y) = f(Ay + b)`` from the mapped start
    (``μ_y = A⁻¹(μ_x − b)``, ``Σ_y = A⁻¹ Σ_x A⁻ᵀ``), telling ``y``-space the mapped samples:
    the distributions stay images of each other under ``x = Ay + b``."""
    generator = torch.Generator().manual_seed(0)
    dim = 3
    transform = torch.randn(dim, dim, generator=generator, dtype=DTYPE) + 2 * torch.eye(dim)
    offset = torch.randn(dim, generator=generator, dtype=DTYPE)
    inverse = torch.linalg.inv(transform)
    scale = abs(float(torch.linalg.det(inverse))) ** (1 / dim)
    start = torch.tensor([1.0, -0.5, 2.0], dtype=DTYPE)
    in_x = XNES(start, 0.7, random_state=3)
    in_y = XNES(inverse @ (start - offset), 0.7 * scale, random_state=4)
    in_y.shape = inverse / scale

    for _ in range(40):
        samples = in_x.ask()
        mapped = (samples - offset) @ inverse.T
        in_x.tell(samples, ellipsoid(samples, 100.0))
        in_y.tell(mapped, ellipsoid(mapped @ transform.T + offset, 100.0))
    assert in_x.sigma < 0.1  # the distribution has moved and shrunk
    torch.testing.assert_close(transform @ in_y.mean + offset, in_x.mean, rtol=1e-9, atol=1e-12)
    image = transform @ in_y.covariance @ transform.T
    torch.testing.assert_close(image, in_x.covariance, rtol=1e-8, atol=1e-14)


def test_samples_told_twice_are_measured_against_the_moved_distribution():
    strategy = SNES([1.0, -2.0], 0.5, random_state=0)
    samples = strategy.ask()
    fitness = sphere(samples)
    strategy.tell(samples, fitness)
    mean, sigma = strategy.mean.clone(), strategy.sigma.clone()
    strategy.tell(samples, fitness)
    noise = (samples - mean) / sigma
    shaped = utilities(fitness)
    torch.testing.assert_close(strategy.mean, mean + strategy.eta_mean * sigma * (shaped @ noise))
    expected_sigma = sigma * torch.exp(0.5 * strategy.eta_sigma * (shaped @ (noise**2 - 1)))
    torch.testing.assert_close(strategy.sigma, expected_sigma)

    strategy = XNES([1.0, -2.0], 0.5, random_state=0)
    samples = strategy.ask()
    strategy.tell(samples, sphere(samples))
    mean, factor = strategy.mean.clone(), strategy.sigma * strategy.shape
    strategy.tell(samples, sphere(samples))
    noise = torch.linalg.solve(factor, (samples - mean).T).T
    expected_mean = mean + strategy.eta_mean * factor @ (utilities(sphere(samples)) @ noise)
    torch.testing.assert_close(strategy.mean, expected_mean)


def test_numpy_seeds_equal_python_seeds_and_bad_min_sigma_is_refused():
    first = XNES([0.5, 0.5], random_state=np.int64(7)).ask()
    assert torch.equal(first, XNES([0.5, 0.5], random_state=7).ask())
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="min_sigma"):
            minimize(sphere, [1.0], min_sigma=bad)


def test_defaults_refuse_a_zero_dimension_and_strategies_an_integer_dtype():
    for default in (default_population_size, default_xnes_rates, default_snes_rates):
        with pytest.raises(ValueError, match="dim"):
            default(0)
    for strategy_class in (XNES, SNES):
        with pytest.raises(TypeError, match="dtype"):
            strategy_class([0.5, 1.5], dtype=torch.int64)


@pytest.mark.parametrize("method", ["xnes", "snes"])
def test_a_start_point_that_requires_grad_is_detached_and_left_alone(method):
    start = torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True)
    result = minimize(sphere, start, method=method, max_evaluations=60, random_state=0)
    plain = minimize(sphere, [1.0, 2.0], method=method, max_evaluations=60, random_state=0)
    assert not result.mean.requires_grad and not result.x.requires_grad
    assert torch.equal(result.mean, plain.mean)
    assert start.tolist() == [1.0, 2.0] and start.grad is None


@pytest.mark.parametrize("strategy_class", [XNES, SNES])
def test_foreign_samples_that_require_grad_leave_no_graph(strategy_class):
    strategy = strategy_class([0.3, -0.4], 1.5, random_state=1)
    reference = strategy_class([0.3, -0.4], 1.5, random_state=1)
    for _ in range(3):
        samples = strategy.ask().float().requires_grad_(True)
        strategy.tell(samples, sphere(samples))
        plain = reference.ask().float()
        reference.tell(plain, sphere(plain))
    assert not strategy.mean.requires_grad and not strategy.covariance.requires_grad
    assert torch.equal(strategy.mean, reference.mean)
