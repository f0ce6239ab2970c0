"""PNMF set-ups that must agree: float32 and float64 counts, dense and sparse input, a full
minibatch and the full batch, a pickled estimator and the original.

The float64 fit on the same counts is the oracle of the float32 fit in the deterministic
``"lower-bound"`` mode (no Monte-Carlo draws): both start from the same initial point and take
the same steps, so they differ by float32 round-off only. In the Monte-Carlo modes float32 and
float64 draws differ (they agree in distribution only) and are not compared.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.models import PNMF
from natgrad.models.pnmf import initial_loadings, initial_posterior

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

DETERMINISTIC = [
    {"training_mode": "natural", "mode": "lower-bound"},
    {"training_mode": "natural", "mode": "lower-bound", "loadings_update": "adam"},
    {"training_mode": "standard", "mode": "lower-bound"},
]
MONTE_CARLO = [
    {"training_mode": "natural", "mode": "expanded", "batch_size": 10},
    {"training_mode": "standard", "mode": "simple"},
]


def poisson_data(seed: int, n_samples: int = 30, n_features: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rate = np.exp(rng.normal(size=(n_samples, 2))) @ rng.gamma(1.0, 2.0, (2, n_features))
    return rng.poisson(rate).astype(np.float64)


def fitted(X, max_iter: int = 30, **params) -> PNMF:
    return PNMF(n_components=2, max_iter=max_iter, random_state=0, **params).fit(X)


# -- float32 and float64 -----------------------------------------------------------------------
def test_initial_draws_do_not_depend_on_the_dtype():
    """One generator draws different numbers in float32 and float64 (torch.rand): the start
    must be the same point in both dtypes, not another random point."""
    column_means = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    starts = {}
    for dtype in (torch.float32, torch.float64):
        generator = torch.Generator().manual_seed(0)
        loadings = initial_loadings(column_means.to(dtype), 2, generator)
        posterior = initial_posterior(20, 2, generator, dtype, torch.device("cpu"))
        assert loadings.dtype == posterior.loc.dtype == dtype
        starts[dtype] = (loadings, posterior.loc, posterior.variance)
    for single, double in zip(starts[torch.float32], starts[torch.float64], strict=True):
        torch.testing.assert_close(single, double.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("params", DETERMINISTIC)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_float32_counts_fit_like_float64_counts(params, seed):
    X = poisson_data(seed)
    single = fitted(X.astype(np.float32), **params)
    double = fitted(X, **params)
    assert single.components_.dtype == np.float32
    scale = np.abs(double.components_).max()
    np.testing.assert_allclose(single.components_, double.components_, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(
        single.variational_mean_, double.variational_mean_, rtol=0, atol=1e-4
    )
    assert single.elbo_ == pytest.approx(double.elbo_, rel=1e-5)


# -- dense and sparse, full minibatch and full batch -------------------------------------------
@pytest.mark.parametrize("params", DETERMINISTIC + MONTE_CARLO)
def test_sparse_counts_fit_and_transform_like_dense_counts(params):
    X = poisson_data(1)
    dense, sparse = fitted(X, **params), fitted(sp.csr_matrix(X), **params)
    np.testing.assert_allclose(sparse.components_, dense.components_, rtol=1e-10, atol=0)
    assert sparse.elbo_ == pytest.approx(dense.elbo_, rel=1e-10)
    np.testing.assert_allclose(
        dense.transform(sp.csc_matrix(X)), dense.transform(X), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize("params", DETERMINISTIC + MONTE_CARLO)
def test_a_minibatch_of_every_sample_is_the_full_batch(params):
    X = poisson_data(2)
    params = {**params, "batch_size": None}
    full = fitted(X, **params)
    whole = fitted(X, **{**params, "batch_size": len(X)})
    np.testing.assert_array_equal(whole.components_, full.components_)
    np.testing.assert_array_equal(whole.variational_mean_, full.variational_mean_)


# -- pickled and restored ----------------------------------------------------------------------
@pytest.mark.parametrize("random_state", [0, "instance"])
@pytest.mark.parametrize("params", [DETERMINISTIC[0], MONTE_CARLO[0]])
def test_a_pickled_estimator_continues_like_the_original(params, random_state):
    """transform, score and a refit of the restored estimator equal the original's, also when
    ``random_state`` is a RandomState whose state the calls advance."""
    X = poisson_data(3)
    seed = np.random.RandomState(5) if random_state == "instance" else random_state
    model = PNMF(n_components=2, max_iter=20, random_state=seed, **params).fit(X)
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.components_, model.components_)
    np.testing.assert_array_equal(restored.transform(X[:10]), model.transform(X[:10]))
    assert restored.score(X) == model.score(X)
    np.testing.assert_array_equal(restored.fit(X).components_, model.fit(X).components_)
