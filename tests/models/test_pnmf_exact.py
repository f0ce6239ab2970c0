"""The fused dense lower-bound loop against the generic estimator and the float64 reference.

Oracles: :func:`natgrad.models.pnmf_elbo.elbo` (the ELBO), the closed-form gradients of
:mod:`natgrad.models.pnmf_gradients` with :func:`natgrad.models.pnmf_updates.moment_gradient_step`
and :func:`natgrad.models.pnmf_updates.multiplicative_loadings` (one natural step, one W step),
and the generic training loop on the same counts stored sparse (the whole fit).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.models.pnmf import initial_loadings, initial_posterior
from natgrad.models.pnmf_counts import count_matrix
from natgrad.models.pnmf_elbo import elbo
from natgrad.models.pnmf_exact import (
    SCALAR_SHIFT_RANGE,
    DenseLowerBound,
    FactorTerms,
    refuse_non_finite,
)
from natgrad.models.pnmf_gradients import elbo_gradients
from natgrad.models.pnmf_training import FitSettings, FitState, fit_exact_dense, fit_natural
from natgrad.models.pnmf_updates import moment_gradient_step, multiplicative_loadings

CPU = torch.device("cpu")
DOUBLE = torch.float64


def _terms(mean, precision):
    """Factor terms of (N, L) moments, held components by samples."""
    mean, precision = mean.T.contiguous(), precision.T.contiguous()
    return FactorTerms(mean, precision, 1.0 / precision)


def _problem(seed, n_samples=7, n_features=5, n_components=3, mean_spread=1.0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, (n_samples, n_features)).astype(np.float64)
    mean = torch.as_tensor(rng.normal(0.0, mean_spread, (n_samples, n_components)))
    precision = torch.as_tensor(rng.uniform(0.5, 3.0, (n_samples, n_components)))
    loadings = torch.as_tensor(rng.gamma(1.0, 1.0, (n_features, n_components)))
    return counts, mean, precision, loadings


@pytest.mark.parametrize("mean_spread", [1.0, 40.0])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), step_size=st.sampled_from([1.0 / 3.0, 1.0]))
def test_bound_natural_step_and_loadings_step_match_the_generic_estimators(
    mean_spread, seed, step_size
):
    counts_array, mean, precision, loadings = _problem(seed, mean_spread=mean_spread)
    counts = count_matrix(counts_array, DOUBLE, CPU)
    bound = DenseLowerBound(counts)
    terms = _terms(mean, precision)
    # a spread of 40 per entry puts some rows' means more than 50 apart: one shift per row
    assert isinstance(terms.shift, float) == (mean.max() - mean.min() <= SCALAR_SHIFT_RANGE)
    value = bound.value(terms, loadings)
    expected = elbo(counts, loadings, mean, 1.0 / precision, "lower-bound", 1)
    assert value == pytest.approx(float(expected), rel=1e-12, abs=1e-9)

    new_mean, new_precision = bound.natural_step(terms, loadings, step_size)
    new_mean, new_precision, refused = refuse_non_finite(terms, new_mean, new_precision)
    gradients = elbo_gradients(counts, loadings, mean, 1.0 / precision, "lower-bound", 1)
    step = moment_gradient_step(
        mean, precision, -gradients.grad_mean, -gradients.grad_variance, step_size
    )
    assert refused == step.n_refused == 0
    torch.testing.assert_close(new_mean.T, step.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_precision.T, step.precision, rtol=1e-12, atol=1e-12)

    new_terms = FactorTerms(new_mean, new_precision, 1.0 / new_precision)
    new_loadings = bound.loadings_step(new_terms, loadings)
    at_new = elbo_gradients(
        counts,
        loadings,
        new_mean.T,
        1.0 / new_precision.T,
        "lower-bound",
        1,
        need_value=False,
        need_posterior_grads=False,
    )
    expected_loadings = multiplicative_loadings(
        loadings * at_new.log_term_loadings_grad, at_new.rate_term_loadings_grad
    )
    torch.testing.assert_close(new_loadings, expected_loadings, rtol=1e-12, atol=1e-15)


def test_moved_terms_equal_terms_computed_from_scratch():
    _, mean, precision, _ = _problem(5)
    terms = _terms(mean, precision)
    moved = terms.moved(terms.mean + 0.3)
    fresh = _terms(mean + 0.3, precision)
    assert moved.kl == pytest.approx(fresh.kl, rel=1e-14)
    torch.testing.assert_close(moved.exp_factors.T, torch.exp(mean + 0.3 + 0.5 / precision))
    torch.testing.assert_close(moved.shifted_exp, fresh.shifted_exp)


def test_non_finite_entries_of_the_natural_step_are_refused_like_the_generic_step():
    counts_array, mean, precision, loadings = _problem(2)
    mean[1, 2] = float("inf")
    counts = count_matrix(counts_array, DOUBLE, CPU)
    terms = _terms(mean, precision)
    bound = DenseLowerBound(counts)
    assert np.isnan(bound.value(terms, loadings))  # the step reads the rates left by value()
    new_mean, new_precision = bound.natural_step(terms, loadings, 1.0)
    new_mean, new_precision, refused = refuse_non_finite(terms, new_mean, new_precision)
    gradients = elbo_gradients(counts, loadings, mean, 1.0 / precision, "lower-bound", 1)
    step = moment_gradient_step(
        mean, precision, -gradients.grad_mean, -gradients.grad_variance, 1.0
    )
    assert refused == step.n_refused > 0
    torch.testing.assert_close(new_mean.T, step.mean, equal_nan=True)
    torch.testing.assert_close(new_precision.T, step.precision, equal_nan=True)


def test_dense_counts_are_required():
    counts = count_matrix(sp.csr_matrix(np.ones((2, 2))), DOUBLE, CPU)
    with pytest.raises(ValueError, match="dense"):
        DenseLowerBound(counts)


def _fit(counts_array, n_iter, sparse, fit, callback=None):
    rng_generator = torch.Generator().manual_seed(1)
    column_means = torch.as_tensor(counts_array.mean(0))
    loadings = initial_loadings(column_means, 3, rng_generator)
    posterior = initial_posterior(counts_array.shape[0], 3, rng_generator, DOUBLE, CPU)
    data = count_matrix(sp.csr_matrix(counts_array) if sparse else counts_array, DOUBLE, CPU)
    fit_settings = FitSettings(
        mode="lower-bound",
        n_draws=1,
        step_size=1.0,
        max_iter=n_iter,
        tol=0.0,
        batch_size=None,
        update_loadings=True,
        generator=torch.Generator().manual_seed(0),
        callback=callback,
    )
    return fit(data, FitState(loadings=loadings, posterior=posterior), fit_settings)


def test_fused_fit_equals_the_generic_loop_restarts_included():
    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.gamma(1.0, 3.0, (40, 1)) * rng.gamma(1.0, 1.0, (1, 12)))
    counts = counts.astype(np.float64)
    seen = []
    fused = _fit(counts, 150, False, fit_exact_dense, lambda i, v, s: seen.append(s.posterior.loc))
    generic = _fit(counts, 150, True, fit_natural)
    assert fused.n_restarts == generic.n_restarts > 0
    np.testing.assert_allclose(fused.history, generic.history, rtol=1e-9)
    torch.testing.assert_close(fused.posterior.loc, generic.posterior.loc, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(fused.loadings, generic.loadings, rtol=1e-7, atol=1e-10)
    # the callback sees every block iterate; the last is the fitted q
    assert len(seen) == 150
    torch.testing.assert_close(seen[-1], fused.posterior.loc)
