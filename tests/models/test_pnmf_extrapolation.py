"""Exact (full-batch, lower-bound) natural PNMF training against a float64 reference loop.

The reference below is written from the closed forms of the docs page, on dense ``(N, D, L)``
responsibilities and :func:`natgrad.models.pnmf_elbo.elbo` (autograd-free, no matrix-product
layout tricks), and runs the extrapolation-with-restarts rule of
:mod:`natgrad.models.pnmf_extrapolation` by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.models import pnmf_extrapolation as extrapolation_module
from natgrad.models.pnmf import PNMF, initial_loadings, initial_posterior
from natgrad.models.pnmf_counts import count_matrix
from natgrad.models.pnmf_elbo import elbo
from natgrad.models.pnmf_extrapolation import BlockIterate, Extrapolation, extrapolated
from natgrad.models.pnmf_training import WARMUP_STEPS, FitSettings, FitState, fit_natural
from natgrad.models.pnmf_updates import LOADINGS_FLOOR, gaussian_from_moments

CPU = torch.device("cpu")
DOUBLE = torch.float64


def _iterate(mean, variance, loadings) -> BlockIterate:
    return BlockIterate.from_posterior(gaussian_from_moments(mean, variance), loadings)


def test_extrapolated_point_moves_mean_and_log_loadings_and_keeps_precision():
    generator = torch.Generator().manual_seed(0)
    shape, loadings_shape = (4, 3), (5, 3)
    means = [torch.randn(shape, generator=generator, dtype=DOUBLE) for _ in range(2)]
    variances = [0.1 + torch.rand(shape, generator=generator, dtype=DOUBLE) for _ in range(2)]
    loadings = [
        0.1 + torch.rand(loadings_shape, generator=generator, dtype=DOUBLE) for _ in range(2)
    ]
    previous = _iterate(means[0], variances[0], loadings[0])
    updated = _iterate(means[1], variances[1], loadings[1])
    result = extrapolated(previous, updated, 0.7)
    torch.testing.assert_close(result.posterior.loc, means[1] + 0.7 * (means[1] - means[0]))
    torch.testing.assert_close(result.posterior.variance, variances[1])
    expected_loadings = loadings[1] ** 1.7 / loadings[0] ** 0.7
    torch.testing.assert_close(result.loadings, expected_loadings)


def test_extrapolated_loadings_are_floored():
    mean, variance = torch.zeros(2, 1, dtype=DOUBLE), torch.ones(2, 1, dtype=DOUBLE)
    previous = _iterate(mean, variance, torch.tensor([[1.0], [1.0]], dtype=DOUBLE))
    updated = _iterate(mean, variance, torch.tensor([[1e-9], [2.0]], dtype=DOUBLE))
    result = extrapolated(previous, updated, 1.0)
    torch.testing.assert_close(
        result.loadings, torch.tensor([[LOADINGS_FLOOR], [4.0]], dtype=DOUBLE)
    )


def test_restarts_shrink_beta_and_accepted_points_grow_it_up_to_its_bound():
    iterate = _iterate(torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    rule = Extrapolation(initial_beta=0.5, growth=1.5, shrink=2.0, max_beta=0.9)
    assert rule.accepts(-10.0)  # nothing pending: always accepted, beta unchanged
    assert rule.beta == 0.5
    rule.record(-10.0)
    rule.extrapolate(iterate)  # first iterate: no previous one, nothing pending
    assert rule.point(iterate) is iterate
    rule.extrapolate(iterate)
    assert rule.point(iterate) is not iterate
    assert rule.accepts(-9.0)
    assert rule.beta == pytest.approx(0.75)
    rule.record(-9.0)
    rule.extrapolate(iterate)
    assert rule.accepts(-8.0)
    assert rule.beta == pytest.approx(0.9)
    rule.record(-8.0)
    rule.extrapolate(iterate)
    assert not rule.accepts(-8.5)
    assert rule.beta == pytest.approx(0.45)
    assert rule.n_restarts == 1
    assert rule.point(iterate) is iterate
    rule.extrapolate(iterate)
    assert not rule.accepts(math.nan)
    assert rule.n_restarts == 2


def _reference_block_update(counts, mean, precision, loadings, step_size):
    """The docs' closed forms: one natural step on q(F) (ρ, safe precision, |Δμ| ≤ 1), then W."""
    variance = 1.0 / precision
    weighted = loadings[None] * torch.exp(mean)[:, None, :]  # (N, D, L)
    responsibilities = weighted / weighted.sum(-1, keepdim=True)
    expected_rate = loadings.sum(0) * torch.exp(mean + 0.5 * variance)
    direction = 1.0 + expected_rate - precision
    plain = precision + step_size * direction
    new_precision = torch.where(
        direction >= 0, plain, plain + (step_size * direction) ** 2 / (2.0 * precision)
    )
    mean_gradient = (counts[:, :, None] * responsibilities).sum(1) - expected_rate - mean
    new_mean = mean + (step_size * mean_gradient / new_precision).clamp(-1.0, 1.0)
    weighted = loadings[None] * torch.exp(new_mean)[:, None, :]
    responsibilities = weighted / weighted.sum(-1, keepdim=True)
    numerator = (counts[:, :, None] * responsibilities).sum(0)
    denominator = torch.exp(new_mean + 0.5 / new_precision).sum(0)
    new_loadings = (numerator / denominator).clamp_min(LOADINGS_FLOOR)
    return new_mean, new_precision, new_loadings


def _reference_fit(counts_array, mean, precision, loadings, n_iter):
    """Block updates from extrapolated points with restarts, as the module docstring states."""
    counts = torch.as_tensor(counts_array)
    data = count_matrix(counts_array, DOUBLE, CPU)

    def value(mean, precision, loadings):
        return float(elbo(data, loadings, mean, 1.0 / precision, "lower-bound", 1))

    beta, last_value, history = extrapolation_module.INITIAL_BETA, -math.inf, []
    previous = pending = None
    for iteration in range(n_iter):
        point = (mean, precision, loadings) if pending is None else pending
        current = value(*point)
        if pending is not None:
            if current >= last_value:
                beta = min(extrapolation_module.MAX_BETA, beta * extrapolation_module.GROWTH)
            else:
                beta /= extrapolation_module.SHRINK
                point = (mean, precision, loadings)
                current = value(*point)
        last_value = current
        history.append(current)
        step_size = min(1.0, (iteration + 1) / WARMUP_STEPS)
        mean, precision, loadings = _reference_block_update(counts, *point, step_size)
        pending = None
        if previous is not None:
            moved_mean = mean + beta * (mean - previous[0])
            moved_loadings = loadings * (loadings / previous[2]) ** beta
            pending = (moved_mean, precision, moved_loadings.clamp_min(LOADINGS_FLOOR))
        previous = (mean, precision, loadings)
    return mean, precision, loadings, history


def _natgrad_fit(counts_array, posterior, loadings, n_iter, sparse):
    data = count_matrix(sp.csr_matrix(counts_array) if sparse else counts_array, DOUBLE, CPU)
    settings = FitSettings(
        mode="lower-bound",
        n_draws=1,
        step_size=1.0,
        max_iter=n_iter,
        tol=0.0,
        batch_size=None,
        update_loadings=True,
        generator=torch.Generator().manual_seed(0),
    )
    return fit_natural(data, FitState(loadings=loadings, posterior=posterior), settings)


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_samples=st.integers(2, 9),
    n_features=st.integers(1, 7),
    n_components=st.integers(1, 4),
    sparse=st.booleans(),
)
def test_exact_natural_training_equals_the_reference_loop(
    seed, n_samples, n_features, n_components, sparse
):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(4.0, (n_samples, n_features)).astype(np.float64)
    generator = torch.Generator().manual_seed(seed)
    column_means = torch.as_tensor(counts.mean(0))
    loadings = initial_loadings(column_means, n_components, generator)
    posterior = initial_posterior(n_samples, n_components, generator, DOUBLE, CPU)
    n_iter = 12
    mean, precision, expected_loadings, history = _reference_fit(
        counts, posterior.loc, posterior.precision, loadings, n_iter
    )
    state = _natgrad_fit(counts, posterior, loadings, n_iter, sparse)
    np.testing.assert_allclose(state.history, history, rtol=1e-10)
    torch.testing.assert_close(state.posterior.loc, mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(state.posterior.precision, precision, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(state.loadings, expected_loadings, rtol=1e-9, atol=1e-12)


def test_exact_training_restarts_and_its_elbo_trace_is_the_accepted_values():
    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.gamma(1.0, 3.0, (40, 1)) * rng.gamma(1.0, 1.0, (1, 12)))
    model = PNMF(
        3, training_mode="natural", mode="lower-bound", max_iter=300, tol=0.0, random_state=0
    )
    restarts = []
    model.fit(counts.astype(np.float64), callback=lambda i, v, s: restarts.append(s.n_restarts))
    assert restarts[-1] > 0
    assert model.n_restarts_ == restarts[-1]
    assert np.all(np.diff(restarts) >= 0)
    # every extrapolated point kept is at least as good as the point before it
    assert model.elbo_history_[-1] >= model.elbo_history_[:10].max()
