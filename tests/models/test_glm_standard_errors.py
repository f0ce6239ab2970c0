"""Standard errors of the GLM estimators: computed on first access, cached, pickled, refitted."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy.special import expit
from sklearn.exceptions import NotFittedError

from natgrad.models import LogisticRegression, PoissonRegression


def logistic_data(n_samples: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, 3))
    y = (rng.random(n_samples) < expit(X @ np.array([1.0, -0.5, 0.2]) + 0.3)).astype(int)
    return X, y


def poisson_data(n_samples: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, 3))
    return X, rng.poisson(np.exp(X @ np.array([0.3, -0.2, 0.1]) + 0.5)).astype(float)


def inverse_fisher_errors(X: np.ndarray, fisher_weights: np.ndarray, C: float) -> np.ndarray:
    """Closed form: sqrt diag of ``(X̃ᵀ diag(w) X̃ + diag(1/C, …, 1/C, 0))⁻¹``."""
    design = np.column_stack([X, np.ones(len(X))])
    summed_fisher = design.T @ (design * fisher_weights[:, None])
    summed_fisher += np.diag([1.0 / C] * X.shape[1] + [0.0])
    return np.sqrt(np.diag(np.linalg.inv(summed_fisher)))


def fitted_errors(model) -> np.ndarray:
    return np.append(np.ravel(model.coef_bse_), np.ravel(model.intercept_bse_))


def test_fit_defers_the_covariance_and_first_access_matches_the_closed_form():
    X, y = logistic_data()
    model = LogisticRegression(C=2.0).fit(X, y)
    assert "_covariance" not in vars(model)
    probs = model.predict_proba(X)[:, 1]
    expected = inverse_fisher_errors(X, probs * (1 - probs), C=2.0)
    np.testing.assert_allclose(fitted_errors(model), expected, rtol=1e-10)
    assert "_covariance" in vars(model) and "_pending_covariance" not in vars(model)
    assert model.covariance_ is model.covariance_  # cached, not recomputed


def test_poisson_standard_errors_match_the_closed_form():
    X, y = poisson_data()
    model = PoissonRegression(C=0.5).fit(X, y)
    expected = inverse_fisher_errors(X, model.predict(X), C=0.5)
    np.testing.assert_allclose(fitted_errors(model), expected, rtol=1e-10)


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
def test_unfitted_estimator_has_no_standard_errors(estimator):
    model = estimator()
    for name in ("coef_bse_", "intercept_bse_", "covariance_"):
        assert not hasattr(model, name)
        with pytest.raises(NotFittedError):
            getattr(model, name)


@pytest.mark.parametrize(
    ("estimator", "data"), [(LogisticRegression, logistic_data), (PoissonRegression, poisson_data)]
)
@pytest.mark.parametrize("access_before_pickling", [True, False])
def test_pickle_holds_the_standard_errors_not_the_training_data(
    estimator, data, access_before_pickling
):
    X, y = data(n_samples=5000)
    model = estimator(C=1.0).fit(X, y)
    expected = fitted_errors(estimator(C=1.0).fit(X, y))
    if access_before_pickling:
        _ = model.coef_bse_
    payload = pickle.dumps(model)
    assert len(payload) < X.nbytes / 4
    restored = pickle.loads(payload)
    np.testing.assert_array_equal(fitted_errors(restored), expected)
    np.testing.assert_array_equal(fitted_errors(model), expected)


@pytest.mark.parametrize(
    ("estimator", "data"), [(LogisticRegression, logistic_data), (PoissonRegression, poisson_data)]
)
def test_refitting_replaces_cached_standard_errors(estimator, data):
    first_X, first_y = data(seed=1)
    second_X, second_y = data(n_samples=200, seed=2)
    model = estimator(C=1.0).fit(first_X, first_y)
    first = fitted_errors(model)
    model.fit(second_X, second_y)
    second = fitted_errors(estimator(C=1.0).fit(second_X, second_y))
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(fitted_errors(model), second)
