"""GLM estimators on inputs a scikit-learn or statsmodels user meets: narrow integer labels,
read-only arrays, singular designs, all-zero counts, features in small units, and warnings
attributed to the user's line."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from scipy import sparse
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression

from natgrad.models import LogisticRegression, PoissonRegression
from natgrad.models.logistic import encode_labels


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        (np.int8, (-100, 100)),
        (np.int16, (-30_000, 30_000)),
        (np.uint64, (2**64 - 2, 2**64 - 1)),
    ],
)
def test_encode_labels_of_narrow_or_huge_integers_is_numpy_unique(dtype, values):
    """``y - y.min()`` in y's own dtype overflows int8 and int16; uint64 exceeds intp."""
    rng = np.random.default_rng(0)
    low, high = values
    size = 80_000 if dtype == np.int16 else 300  # a range up to len(y) takes the counting path
    y = np.array([low, high], dtype=dtype)[(rng.random(size) < 0.5).astype(np.intp)]
    classes, codes = encode_labels(y)
    expected_classes, expected_codes = np.unique(y, return_inverse=True)
    np.testing.assert_array_equal(classes, expected_classes)
    assert classes.dtype == expected_classes.dtype
    np.testing.assert_array_equal(codes, expected_codes)


def test_int8_labels_fit_and_predict_like_sklearn():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 2))
    y = np.where(X[:, 0] + rng.normal(size=300) > 0, 100, -100).astype(np.int8)
    model = LogisticRegression(C=1.0).fit(X, y)
    reference = SklearnLogisticRegression(C=1.0, tol=1e-12).fit(X, y)
    np.testing.assert_array_equal(model.classes_, reference.classes_)
    np.testing.assert_allclose(model.coef_, reference.coef_, atol=1e-6)
    np.testing.assert_array_equal(model.predict(X), reference.predict(X))


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
def test_read_only_inputs_never_reach_torch_uncopied(estimator, monkeypatch):
    """pandas hands out read-only arrays (``np.asarray(series)``); torch warns, once per
    process, when it wraps one, so the wrapping itself is checked."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(50, 2))
    y = rng.poisson(1.0, size=50).astype(float)
    if estimator is LogisticRegression:
        y = (y > 0).astype(int)
    weights = rng.integers(1, 4, size=50).astype(float)
    for array in (X, y, weights):
        array.setflags(write=False)
    for name in ("from_numpy", "as_tensor"):
        monkeypatch.setattr(torch, name, writable_only(getattr(torch, name)))
    weighted = estimator(C=1.0).fit(X, y, sample_weight=weights)
    monkeypatch.undo()
    counts = weights.astype(int)
    repeated = estimator(C=1.0).fit(X.repeat(counts, axis=0), y.repeat(counts))
    np.testing.assert_allclose(np.ravel(weighted.coef_), np.ravel(repeated.coef_), rtol=1e-9)


def writable_only(convert):
    def checked(data, *args, **kwargs):
        if isinstance(data, np.ndarray):
            assert data.flags.writeable, "a read-only array was handed to torch uncopied"
        return convert(data, *args, **kwargs)

    return checked


def singular_designs(X: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "duplicate column": np.column_stack([X, X[:, 0]]),
        "constant column": np.column_stack([X, np.full(len(X), 3.7)]),
        "zero column": np.column_stack([X, np.zeros(len(X))]),
        "combination": np.column_stack([X, X @ np.array([1.0, 2.0, 3.0])]),
    }


def glm_data(estimator, n_samples: int = 80, seed: int = 3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, 3))
    if estimator is LogisticRegression:
        y = (X[:, 0] + rng.logistic(size=n_samples) > 0).astype(int)
        return X, y, sm.families.Binomial()
    return X, rng.poisson(np.exp(0.3 * X[:, 0] + 0.2)).astype(float), sm.families.Poisson()


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
@pytest.mark.parametrize(
    "design", ["duplicate column", "constant column", "zero column", "combination"]
)
def test_standard_errors_of_a_singular_fisher_warn(estimator, design):
    """Exactly collinear columns: the clamped inverse gives finite, arbitrary errors."""
    X, y, _ = glm_data(estimator)
    model = estimator(penalty=None).fit(singular_designs(X)[design], y)
    with pytest.warns(RuntimeWarning, match="singular to working precision") as record:
        _ = model.coef_bse_
    assert record[0].filename == __file__


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
def test_nearly_collinear_standard_errors_match_statsmodels_without_warning(estimator):
    """Columns correlated to 1 − 5e-7: ill-conditioned but identified (no warning)."""
    X, y, family = glm_data(estimator)
    noise = np.random.default_rng(4).normal(size=len(X))
    X = np.column_stack([X, X[:, 0] + 1e-3 * noise])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = estimator(penalty=None).fit(X, y)
        errors = np.append(np.ravel(model.coef_bse_), model.intercept_bse_)
    reference = sm.GLM(y, sm.add_constant(X, prepend=False), family=family).fit(tol=1e-12)
    assert errors.max() > 100.0
    np.testing.assert_allclose(errors, reference.bse, rtol=1e-6)


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
def test_l2_penalty_makes_a_singular_design_regular_without_warning(estimator):
    X, y, _ = glm_data(estimator)
    X = singular_designs(X)["duplicate column"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = estimator(C=0.5).fit(X, y)
        errors = np.append(np.ravel(model.coef_bse_), model.intercept_bse_)
    design = np.column_stack([X, np.ones(len(X))])
    if estimator is LogisticRegression:
        probs = model.predict_proba(X)[:, 1]
        curvature = probs * (1.0 - probs)
    else:
        curvature = model.predict(X)
    summed_fisher = design.T @ (design * curvature[:, None]) + np.diag([2.0] * 4 + [0.0])
    np.testing.assert_allclose(errors, np.sqrt(np.diag(np.linalg.inv(summed_fisher))), rtol=1e-8)


@pytest.mark.parametrize(
    ("estimator", "params", "message"),
    [
        (LogisticRegression, {"max_iter": 1}, "increase max_iter"),
        (PoissonRegression, {"max_iter": 1}, "increase max_iter"),
        (LogisticRegression, {"penalty": None}, "perfectly separated"),
    ],
)
def test_convergence_warnings_name_the_callers_line(estimator, params, message):
    """Python's default filter shows a warning once per line it names: a line inside natgrad
    would hide every later identical warning, whichever user code fitted."""
    X, y, _ = glm_data(estimator)
    if message == "perfectly separated":
        y = (X[:, 0] > 0).astype(int)
    with pytest.warns(ConvergenceWarning, match=message) as record:
        estimator(**params).fit(X, y)
    assert [warning.filename for warning in record] == [__file__]


@pytest.mark.parametrize("penalty", [None, "l2"])
def test_all_zero_counts_warn_that_the_intercept_diverges(penalty):
    """The unpenalised intercept's optimum is −∞ with or without a penalty on the coefficients
    (scikit-learn's PoissonRegressor returns -inf); the weighted gradient's only non-zero term
    is ``exp(intercept)``, so the fit stops at ``exp(b) ≈ tol``."""
    X, _, _ = glm_data(PoissonRegression)
    y = np.zeros(len(X))
    with pytest.warns(ConvergenceWarning, match="every count y is zero") as record:
        model = PoissonRegression(penalty=penalty).fit(X, y)
    assert record[0].filename == __file__
    assert np.exp(model.intercept_) < 10 * model.tol
    assert model.gradient_norm_ <= model.tol


def test_mostly_zero_counts_fit_like_statsmodels_without_the_zero_count_warning():
    X, _, family = glm_data(PoissonRegression)
    y = np.zeros(len(X))
    y[:3] = [1.0, 2.0, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = PoissonRegression(penalty=None).fit(X, y)
    reference = sm.GLM(y, sm.add_constant(X, prepend=False), family=family).fit(tol=1e-12)
    fitted = np.append(model.coef_, model.intercept_)
    np.testing.assert_allclose(fitted, reference.params, rtol=1e-6)


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
@pytest.mark.parametrize("unit", [1e-4, 1e-9])
@pytest.mark.parametrize("layout", ["dense", "sparse", "weighted"])
def test_features_in_small_units_give_the_same_fit_as_statsmodels(estimator, unit, layout):
    """Columns measured in units ``unit`` times smaller have gradients ``unit`` times smaller:
    an absolute ``‖∇L‖ ≤ tol`` held at or near the start (1e-9), far from the optimum."""
    X, y, family = glm_data(estimator, n_samples=200)
    weights = np.random.default_rng(5).integers(1, 4, size=len(y)).astype(float)
    small = X * unit
    if layout == "sparse":
        small = sparse.csr_matrix(small)
    fit_weights = weights if layout == "weighted" else None
    model = estimator(penalty=None).fit(small, y, sample_weight=fit_weights)
    reference = sm.GLM(
        y, sm.add_constant(X, prepend=False), family=family, freq_weights=fit_weights
    ).fit(tol=1e-12)
    fitted = np.append(np.ravel(model.coef_) * unit, model.intercept_)
    np.testing.assert_allclose(fitted, reference.params, rtol=1e-6, atol=1e-9)


def test_multinomial_features_in_small_units_give_the_same_fit_as_statsmodels():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(300, 2))
    y = np.digitize(X[:, 0] - 0.5 * X[:, 1] + rng.logistic(size=300), [-1.0, 1.0])
    model = LogisticRegression(penalty=None).fit(X * 1e-9, y)
    reference = sm.MNLogit(y, sm.add_constant(X, prepend=False)).fit(
        disp=0, method="newton", tol=1e-12
    )
    weights = np.column_stack([model.coef_ * 1e-9, model.intercept_])
    contrasts = (weights[1:] - weights[0]).T  # statsmodels' reference-class parameters
    np.testing.assert_allclose(contrasts, reference.params, rtol=1e-6, atol=1e-9)
