"""LogisticRegression against statsmodels (MLE, standard errors) and scikit-learn (l2)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import statsmodels.api as sm
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import softmax
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression

from natgrad.models import LogisticRegression, glm_solvers
from natgrad.models.logistic import encode_labels


def make_classification(n_samples: int, n_features: int, n_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features))
    weights = rng.normal(scale=0.8, size=(n_features, n_classes))
    logits = X @ weights + rng.normal(scale=0.3, size=n_classes)
    probs = softmax(logits, axis=1)
    y = np.array([rng.choice(n_classes, p=row) for row in probs])
    return X, y


def mean_gradient_norm(model: LogisticRegression, X: np.ndarray, y: np.ndarray) -> float:
    """Independent numpy gradient of the mean penalised loss over all weights ``(K, D)``."""
    labels = np.searchsorted(model.classes_, y)
    probs = model.predict_proba(X)
    if len(model.classes_) == 2:
        residual = probs[:, 1:] - (labels == 1)[:, None]
    else:
        residual = probs - np.eye(len(model.classes_))[labels]
    coef_gradient = residual.T @ X / len(y)
    if model.penalty == "l2":
        coef_gradient += model.coef_ / (model.C * len(y))
    parts = [coef_gradient.ravel()]
    if model.fit_intercept:
        parts.append(residual.mean(axis=0))
    return float(np.linalg.norm(np.concatenate(parts)))


def sklearn_fit(X, y, C, fit_intercept=True):
    return SklearnLogisticRegression(
        C=C, fit_intercept=fit_intercept, tol=1e-12, max_iter=10_000
    ).fit(X, y)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_binary_mle_matches_statsmodels_logit(fit_intercept):
    X, y = make_classification(400, 4, 2, seed=0)
    exog = sm.add_constant(X, prepend=False) if fit_intercept else X
    reference = sm.Logit(y, exog).fit(disp=0, method="newton", tol=1e-12, maxiter=100)
    model = LogisticRegression(penalty=None, fit_intercept=fit_intercept).fit(X, y)
    np.testing.assert_allclose(model.coef_[0], reference.params[:4], atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.coef_bse_[0], reference.bse[:4], atol=1e-6, rtol=0)
    if fit_intercept:
        np.testing.assert_allclose(model.intercept_, reference.params[4:], atol=1e-6)
        np.testing.assert_allclose(model.intercept_bse_, reference.bse[4:], atol=1e-6)
    else:
        np.testing.assert_array_equal(model.intercept_, [0.0])
        np.testing.assert_array_equal(model.intercept_bse_, [0.0])


def test_fisher_scoring_reaches_1e_8_within_10_iterations():
    X, y = make_classification(500, 5, 2, seed=1)
    for penalty in (None, "l2"):
        model = LogisticRegression(penalty=penalty, tol=1e-8).fit(X, y)
        assert model.n_iter_ <= 10
        assert mean_gradient_norm(model, X, y) <= 1e-8
        assert model.gradient_norm_ <= 1e-8


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_fisher_chord_matches_statsmodels_with_fewer_fishers(fit_intercept):
    X, y = make_classification(2000, 5, 2, seed=13)
    exog = sm.add_constant(X, prepend=False) if fit_intercept else X
    reference = sm.Logit(y, exog).fit(disp=0, method="newton", tol=1e-12, maxiter=100)
    fisher = LogisticRegression(penalty=None, fit_intercept=fit_intercept).fit(X, y)
    chord = LogisticRegression(
        penalty=None, fit_intercept=fit_intercept, solver="fisher-chord"
    ).fit(X, y)
    assert fisher.n_fisher_ == fisher.n_iter_
    assert chord.n_fisher_ < fisher.n_fisher_ and chord.n_iter_ <= 10
    assert mean_gradient_norm(chord, X, y) <= 1e-8
    np.testing.assert_allclose(chord.coef_[0], reference.params[:5], atol=1e-6, rtol=0)
    np.testing.assert_allclose(chord.coef_bse_[0], reference.bse[:5], atol=1e-6, rtol=0)
    if fit_intercept:
        np.testing.assert_allclose(chord.intercept_, reference.params[5:], atol=1e-6)
        np.testing.assert_allclose(chord.intercept_bse_, reference.bse[5:], atol=1e-6)


def test_fisher_chord_with_l2_matches_sklearn():
    X, y = make_classification(500, 4, 2, seed=14)
    model = LogisticRegression(C=0.3, solver="fisher-chord").fit(X, y)
    reference = sklearn_fit(X, y, 0.3)
    assert mean_gradient_norm(model, X, y) <= 1e-8
    np.testing.assert_allclose(model.coef_, reference.coef_, atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.intercept_, reference.intercept_, atol=1e-6, rtol=0)


def test_one_fisher_scoring_step_is_the_irls_update(monkeypatch):
    """The float64 step is IRLS's to rounding; the default's float32-Gram direction to 1e-6."""
    X, y = make_classification(200, 3, 2, seed=12)
    C = 0.5
    design = np.column_stack([X, np.ones(len(y))])
    working_weights = np.full(len(y), 0.25)  # p (1 - p) at the zero start, p = 1/2
    penalty = np.diag([1 / C] * 3 + [0.0])
    normal_matrix = design.T @ (design * working_weights[:, None]) + penalty
    update = np.linalg.solve(normal_matrix, design.T @ (y - 0.5))
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        model = LogisticRegression(C=C, max_iter=1).fit(X, y)
    np.testing.assert_allclose(model.coef_[0], update[:3], rtol=1e-6)
    np.testing.assert_allclose(model.intercept_, update[3:], rtol=1e-6)
    monkeypatch.setattr(glm_solvers, "MAX_LOW_PRECISION_CONDITION", 0.0)  # refuse float32
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        model = LogisticRegression(C=C, max_iter=1).fit(X, y)
    np.testing.assert_allclose(model.coef_[0], update[:3], rtol=1e-12)
    np.testing.assert_allclose(model.intercept_, update[3:], rtol=1e-12)


def test_multinomial_mle_matches_statsmodels_mnlogit():
    X, y = make_classification(600, 3, 4, seed=2)
    exog = sm.add_constant(X, prepend=False)
    reference = sm.MNLogit(y, exog).fit(disp=0, method="newton", tol=1e-12, maxiter=100)
    model = LogisticRegression(penalty=None).fit(X, y)
    assert model.n_iter_ <= 10
    assert mean_gradient_norm(model, X, y) <= 1e-8
    weights = np.column_stack([model.coef_, model.intercept_])  # (K, D)
    np.testing.assert_allclose(weights.sum(axis=0), 0.0, atol=1e-12)
    contrasts = (weights[1:] - weights[0]).T  # statsmodels' reference-class params (D, K-1)
    np.testing.assert_allclose(contrasts, reference.params, atol=1e-6, rtol=0)
    n_classes, n_rows = weights.shape
    to_contrasts = np.zeros(((n_classes - 1) * n_rows, n_classes * n_rows))
    for k in range(1, n_classes):
        for i in range(n_rows):
            to_contrasts[(k - 1) * n_rows + i, k * n_rows + i] = 1.0
            to_contrasts[(k - 1) * n_rows + i, i] = -1.0
    contrast_cov = to_contrasts @ model.covariance_ @ to_contrasts.T
    contrast_bse = np.sqrt(np.diag(contrast_cov)).reshape(n_classes - 1, n_rows).T
    np.testing.assert_allclose(contrast_bse, reference.bse, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("C", [0.05, 1.0])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_l2_matches_sklearn(n_classes, C, fit_intercept):
    X, y = make_classification(300, 4, n_classes, seed=3)
    model = LogisticRegression(C=C, fit_intercept=fit_intercept).fit(X, y)
    reference = sklearn_fit(X, y, C, fit_intercept)
    np.testing.assert_allclose(model.coef_, reference.coef_, atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.intercept_, reference.intercept_, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(model.predict(X), reference.predict(X))
    np.testing.assert_allclose(model.predict_proba(X), reference.predict_proba(X), atol=1e-6)
    np.testing.assert_allclose(
        model.predict_log_proba(X), np.log(model.predict_proba(X)), atol=1e-12
    )
    assert model.score(X, y) == reference.score(X, y)


def test_multinomial_without_penalty_predicts_like_sklearn():
    X, y = make_classification(300, 3, 3, seed=4)
    model = LogisticRegression(penalty=None).fit(X, y)
    reference = sklearn_fit(X, y, np.inf)
    np.testing.assert_allclose(model.coef_, reference.coef_, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(model.predict(X), reference.predict(X))


def test_penalised_standard_errors_are_inverse_summed_penalised_fisher():
    X, y = make_classification(200, 3, 2, seed=5)
    C = 0.5
    model = LogisticRegression(C=C).fit(X, y)
    design = np.column_stack([X, np.ones(len(y))])
    probs = model.predict_proba(X)[:, 1]
    summed_fisher = design.T @ (design * (probs * (1 - probs))[:, None])
    summed_fisher += np.diag([1 / C] * 3 + [0.0])
    bse = np.sqrt(np.diag(np.linalg.inv(summed_fisher)))
    np.testing.assert_allclose(model.coef_bse_[0], bse[:3], rtol=1e-10)
    np.testing.assert_allclose(model.intercept_bse_, bse[3:], rtol=1e-10)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize(
    ("solver", "learning_rate", "max_iter"), [("ngd", 0.5, 200), ("gd", None, 20_000)]
)
def test_ngd_and_gd_reach_the_fisher_optimum(n_classes, solver, learning_rate, max_iter):
    X, y = make_classification(200, 3, n_classes, seed=6)
    fisher = LogisticRegression(C=1.0).fit(X, y)
    other = LogisticRegression(
        C=1.0, solver=solver, learning_rate=learning_rate, tol=1e-8, max_iter=max_iter
    ).fit(X, y)
    assert fisher.n_iter_ < other.n_iter_
    np.testing.assert_allclose(other.coef_, fisher.coef_, atol=1e-6)
    np.testing.assert_allclose(other.intercept_, fisher.intercept_, atol=1e-6)


def test_step_halving_keeps_huge_gd_steps_finite():
    X, y = make_classification(100, 3, 2, seed=7)
    model = LogisticRegression(solver="gd", learning_rate=1e8, tol=1e-6, max_iter=5000).fit(X, y)
    assert np.isfinite(model.coef_).all()
    assert mean_gradient_norm(model, X, y) <= 1e-6


def test_perfect_separation_warns_and_stops_finite():
    X = np.array([[-2.0], [-1.0], [-0.5], [0.5], [1.0], [2.0]])
    y = np.array([0, 0, 0, 1, 1, 1])
    with pytest.warns(ConvergenceWarning, match="perfectly separated"):
        model = LogisticRegression(penalty=None).fit(X, y)
    assert np.isfinite(model.coef_).all() and np.isfinite(model.coef_bse_).all()
    np.testing.assert_array_equal(model.predict(X), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LogisticRegression(C=1.0).fit(X, y)


def test_multinomial_perfect_separation_warns():
    X = np.array([[-3.0], [-2.5], [0.0], [0.2], [3.0], [3.5]])
    y = np.array(["a", "a", "b", "b", "c", "c"])
    with pytest.warns(ConvergenceWarning, match="perfectly separated"):
        model = LogisticRegression(penalty=None).fit(X, y)
    np.testing.assert_array_equal(model.predict(X), y)


def test_max_iter_warns():
    X, y = make_classification(100, 3, 2, seed=8)
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        model = LogisticRegression(solver="gd", max_iter=3).fit(X, y)
    assert model.n_iter_ == 3


def test_string_labels_and_numpy_outputs():
    X, y = make_classification(120, 2, 3, seed=9)
    names = np.array(["cat", "dog", "emu"])[y]
    model = LogisticRegression().fit(X, names)
    reference = LogisticRegression().fit(X, y)
    np.testing.assert_array_equal(model.classes_, ["cat", "dog", "emu"])
    np.testing.assert_array_equal(model.predict(X), model.classes_[reference.predict(X)])
    for value in (model.coef_, model.intercept_, model.coef_bse_, model.predict_proba(X)):
        assert isinstance(value, np.ndarray) and value.dtype == np.float64


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"penalty": "l1"}, ValueError, "penalty"),
        ({"C": 0.0}, ValueError, "C must"),
        ({"C": -1.0}, ValueError, "C must"),
        ({"solver": "newton"}, ValueError, "solver"),
        ({"solver": "fisher", "learning_rate": 0.5}, ValueError, "learning_rate"),
        ({"solver": "fisher-chord", "learning_rate": 0.5}, ValueError, "learning_rate"),
        ({"solver": "ngd", "learning_rate": 2.0}, ValueError, "learning_rate"),
        ({"solver": "gd", "learning_rate": -1.0}, ValueError, "learning_rate"),
        ({"tol": -1.0}, ValueError, "tol"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"max_iter": 2.5}, ValueError, "max_iter"),
        ({"fit_intercept": "yes"}, TypeError, "fit_intercept"),
    ],
)
def test_bad_hyperparameters_raise(params, error, match):
    X, y = make_classification(20, 2, 2, seed=10)
    with pytest.raises(error, match=match):
        LogisticRegression(**params).fit(X, y)


def test_bad_data_raises():
    X, y = make_classification(20, 2, 2, seed=11)
    with pytest.raises(ValueError, match="2 classes"):
        LogisticRegression().fit(X, np.zeros(20))
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        LogisticRegression().fit(bad, y)
    with pytest.raises(ValueError, match="Unknown label type"):
        LogisticRegression().fit(X, np.linspace(0, 1, 20))
    with pytest.raises(NotFittedError):
        LogisticRegression().predict(X)
    model = LogisticRegression().fit(X, y)
    with pytest.raises(ValueError, match="features"):
        model.predict(X[:, :1])


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    n_samples=st.integers(15, 60),
    n_features=st.integers(1, 3),
    n_classes=st.integers(2, 4),
    C=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 10_000),
)
def test_random_datasets_converge_to_sklearns_optimum(n_samples, n_features, n_classes, C, seed):
    X, y = make_classification(n_samples, n_features, n_classes, seed)
    if len(np.unique(y)) < 2:
        y[:2] = [0, 1]
    model = LogisticRegression(C=C).fit(X, y)
    assert model.n_iter_ <= 15
    assert mean_gradient_norm(model, X, y) <= 1e-8
    reference = SklearnLogisticRegression(C=C, solver="newton-cholesky", tol=1e-12).fit(X, y)
    np.testing.assert_allclose(model.coef_, reference.coef_, atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.intercept_, reference.intercept_, atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    labels=st.lists(st.integers(-5, 40), min_size=1, max_size=60),
    dtype=st.sampled_from([np.int64, np.int32, np.int8, np.uint8, np.float64]),
)
def test_encode_labels_is_numpy_unique(labels, dtype):
    y = np.array(labels)
    if np.dtype(dtype).kind == "u":
        y = y - y.min()
    y = y.astype(dtype)
    classes, codes = encode_labels(y)
    expected_classes, expected_codes = np.unique(y, return_inverse=True)
    np.testing.assert_array_equal(classes, expected_classes)
    assert classes.dtype == expected_classes.dtype
    np.testing.assert_array_equal(codes, expected_codes)


def test_encode_labels_of_strings_and_wide_ranges_fall_back_to_unique():
    for y in (np.array(["b", "a", "b"]), np.array([0, 10**12, 0])):
        classes, codes = encode_labels(y)
        np.testing.assert_array_equal(classes, np.unique(y))
        np.testing.assert_array_equal(classes[codes], y)
