"""PoissonRegression against statsmodels' GLM (MLE, standard errors) and PoissonRegressor."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import PoissonRegressor

from natgrad.models import PoissonRegression


def make_counts(n_samples: int, n_features: int, seed: int, scale: float = 0.4):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features))
    log_rate = X @ rng.normal(scale=scale, size=n_features) + 1.0
    return X, rng.poisson(np.exp(log_rate)).astype(float)


def mean_gradient_norm(model: PoissonRegression, X: np.ndarray, y: np.ndarray) -> float:
    """Independent numpy gradient of the mean penalised loss."""
    residual = model.predict(X) - y
    coef_gradient = X.T @ residual / len(y)
    if model.penalty == "l2":
        coef_gradient += model.coef_ / (model.C * len(y))
    parts = [coef_gradient] + ([[residual.mean()]] if model.fit_intercept else [])
    return float(np.linalg.norm(np.concatenate(parts)))


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_mle_matches_statsmodels_glm(fit_intercept):
    X, y = make_counts(400, 4, seed=0)
    exog = sm.add_constant(X, prepend=False) if fit_intercept else X
    reference = sm.GLM(y, exog, family=sm.families.Poisson()).fit(tol=1e-12)
    model = PoissonRegression(penalty=None, fit_intercept=fit_intercept).fit(X, y)
    assert model.n_iter_ <= 10
    assert mean_gradient_norm(model, X, y) <= 1e-8
    np.testing.assert_allclose(model.coef_, reference.params[:4], atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.coef_bse_, reference.bse[:4], atol=1e-6, rtol=0)
    if fit_intercept:
        assert model.intercept_ == pytest.approx(reference.params[4], abs=1e-6)
        assert model.intercept_bse_ == pytest.approx(reference.bse[4], abs=1e-6)
    else:
        assert model.intercept_ == 0.0 and model.intercept_bse_ == 0.0


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_fisher_chord_matches_statsmodels_glm_with_fewer_fishers(fit_intercept):
    X, y = make_counts(2000, 4, seed=13)
    exog = sm.add_constant(X, prepend=False) if fit_intercept else X
    reference = sm.GLM(y, exog, family=sm.families.Poisson()).fit(tol=1e-12)
    fisher = PoissonRegression(penalty=None, fit_intercept=fit_intercept).fit(X, y)
    chord = PoissonRegression(penalty=None, fit_intercept=fit_intercept, solver="fisher-chord").fit(
        X, y
    )
    assert fisher.n_fisher_ == fisher.n_iter_
    assert chord.n_fisher_ < fisher.n_fisher_ and chord.n_iter_ <= 10
    assert mean_gradient_norm(chord, X, y) <= 1e-8
    np.testing.assert_allclose(chord.coef_, reference.params[:4], atol=1e-6, rtol=0)
    np.testing.assert_allclose(chord.coef_bse_, reference.bse[:4], atol=1e-6, rtol=0)
    if fit_intercept:
        assert chord.intercept_ == pytest.approx(reference.params[4], abs=1e-6)
        assert chord.intercept_bse_ == pytest.approx(reference.bse[4], abs=1e-6)


@pytest.mark.parametrize("C", [0.01, 1.0])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_l2_matches_sklearn_with_alpha_equal_one_over_C_n(C, fit_intercept):
    X, y = make_counts(300, 3, seed=1)
    model = PoissonRegression(C=C, fit_intercept=fit_intercept).fit(X, y)
    reference = PoissonRegressor(
        alpha=1.0 / (C * len(y)), fit_intercept=fit_intercept, tol=1e-12, max_iter=10_000
    ).fit(X, y)
    np.testing.assert_allclose(model.coef_, reference.coef_, atol=1e-5, rtol=0)
    assert model.intercept_ == pytest.approx(reference.intercept_, abs=1e-5)
    np.testing.assert_allclose(model.predict(X), reference.predict(X), rtol=1e-5)
    assert model.score(X, y) == pytest.approx(reference.score(X, y), abs=1e-8)


@pytest.mark.parametrize(
    ("solver", "learning_rate", "max_iter"), [("ngd", 0.3, 500), ("gd", 0.1, 20_000)]
)
def test_ngd_and_gd_reach_the_fisher_optimum(solver, learning_rate, max_iter):
    X, y = make_counts(200, 3, seed=2)
    fisher = PoissonRegression(C=1.0).fit(X, y)
    other = PoissonRegression(
        C=1.0, solver=solver, learning_rate=learning_rate, tol=1e-8, max_iter=max_iter
    ).fit(X, y)
    assert fisher.n_iter_ < other.n_iter_
    np.testing.assert_allclose(other.coef_, fisher.coef_, atol=1e-6)
    assert other.intercept_ == pytest.approx(fisher.intercept_, abs=1e-6)


def test_overflowing_first_step_is_halved_not_nan():
    rng = np.random.default_rng(3)
    X = rng.normal(scale=30.0, size=(50, 2))
    y = rng.poisson(np.exp(np.clip(0.1 * X[:, 0], None, 8))).astype(float)
    model = PoissonRegression(penalty=None, solver="gd", learning_rate=1e6, max_iter=50)
    with pytest.warns(ConvergenceWarning):
        model.fit(X, y)
    assert np.isfinite(model.coef_).all() and np.isfinite(model.loss_)
    converged = PoissonRegression(penalty=None, max_iter=200).fit(X, y)
    assert mean_gradient_norm(converged, X, y) <= 1e-8


def test_all_zero_counts_stay_finite():
    X, _ = make_counts(30, 2, seed=4)
    with pytest.warns(ConvergenceWarning, match="every count y is zero"):
        model = PoissonRegression(C=1.0).fit(X, np.zeros(30))
    assert np.isfinite(model.coef_).all() and np.isfinite(model.intercept_)


def test_bad_input_raises():
    X, y = make_counts(20, 2, seed=5)
    with pytest.raises(ValueError, match="non-negative"):
        PoissonRegression().fit(X, y - 5.0)
    with pytest.raises(ValueError, match="penalty"):
        PoissonRegression(penalty="elasticnet").fit(X, y)
    with pytest.raises(ValueError, match="C must"):
        PoissonRegression(C=float("nan")).fit(X, y)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        PoissonRegression().fit(X, y[:-1])


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    n_samples=st.integers(10, 60),
    n_features=st.integers(1, 3),
    penalty=st.sampled_from([None, "l2"]),
    seed=st.integers(0, 10_000),
)
def test_random_datasets_reach_a_stationary_point(n_samples, n_features, penalty, seed):
    X, y = make_counts(n_samples, n_features, seed)
    model = PoissonRegression(penalty=penalty, C=1.0).fit(X, y)
    assert mean_gradient_norm(model, X, y) <= 1e-8
    assert np.isfinite(model.coef_bse_).all()
