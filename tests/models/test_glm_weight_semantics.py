"""What the GLMs' standard errors mean under sample weights, and how a common factor on every
weight acts on the fit, for every solver and penalty, dense and sparse ``X``.

Oracles: statsmodels' GLM with ``freq_weights`` and with ``var_weights`` (the Binomial and
Poisson dispersion is fixed at one, so both kinds give the same standard errors), for
fractional weights at several scales; scikit-learn's LogisticRegression (a factor on the
weights is a factor on ``C``); and the unscaled fit itself (the closed-form law: an unpenalised
fit is unchanged and its standard errors are divided by ``√c``).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import statsmodels.api as sm
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression

from natgrad.models import LogisticRegression, PoissonRegression

SOLVER_LAYOUTS = [
    ("fisher", "dense"),
    ("fisher-chord", "dense"),
    ("ngd", "dense"),
    ("gd", "dense"),
    ("fisher", "csr"),
    ("gd", "csr"),
]
MAX_ITER = 30
"""Enough for Fisher scoring; the slower solvers stop early (a ConvergenceWarning), but a
common factor leaves the mean objective they descend unchanged, so their iterates agree too."""


def binary_data(seed: int = 0, n_samples: int = 120):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, 3))
    y = (rng.random(n_samples) < expit(X @ [1.0, -1.0, 0.5])).astype(int)
    return X, y, rng.uniform(0.1, 3.0, size=n_samples)


def multiclass_data(seed: int = 1, n_samples: int = 120):
    X, _, weights = binary_data(seed, n_samples)
    return X, np.random.default_rng(seed).integers(0, 3, size=n_samples), weights


def count_data(seed: int = 2, n_samples: int = 120):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, 3))
    y = rng.poisson(np.exp(X @ [0.3, -0.2, 0.1] + 0.3)).astype(float)
    return X, y, rng.uniform(0.1, 3.0, size=n_samples)


CASES = {
    "binary": (LogisticRegression, binary_data),
    "multiclass": (LogisticRegression, multiclass_data),
    "poisson": (PoissonRegression, count_data),
}


def flat(model) -> np.ndarray:
    return np.append(np.ravel(model.coef_), np.ravel(model.intercept_))


def errors(model) -> np.ndarray:
    return np.append(np.ravel(model.coef_bse_), np.ravel(model.intercept_bse_))


# -- statsmodels: freq_weights and var_weights, fractional, at any scale -----------------------
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
@pytest.mark.parametrize(
    ("case", "family"), [("binary", sm.families.Binomial()), ("poisson", sm.families.Poisson())]
)
def test_fractional_weights_match_statsmodels_freq_and_var_weights(case, family, scale):
    estimator, data = CASES[case]
    X, y, weights = data()
    weights = scale * weights
    model = estimator(penalty=None).fit(X, y, sample_weight=weights)
    design = sm.add_constant(X, prepend=False)
    for kind in ("freq_weights", "var_weights"):
        reference = sm.GLM(y, design, family=family, **{kind: weights}).fit(tol=1e-12)
        np.testing.assert_allclose(flat(model), reference.params, rtol=0, atol=1e-7)
        np.testing.assert_allclose(errors(model), reference.bse, rtol=1e-6, atol=0)


# -- a common factor on every weight ---------------------------------------------------------
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize(("solver", "layout"), SOLVER_LAYOUTS)
@pytest.mark.parametrize("case", CASES)
@settings(max_examples=2, deadline=None)
@given(factor=st.floats(1e-3, 1e3))
def test_unpenalised_fit_ignores_a_common_factor_and_errors_shrink_by_its_root(
    case, solver, layout, factor
):
    estimator, data = CASES[case]
    X, y, weights = data()
    X = sp.csr_matrix(X) if layout == "csr" else X
    options = {"penalty": None, "solver": solver, "max_iter": MAX_ITER}
    plain = estimator(**options).fit(X, y, sample_weight=weights)
    scaled = estimator(**options).fit(X, y, sample_weight=factor * weights)
    np.testing.assert_allclose(flat(scaled), flat(plain), rtol=0, atol=1e-7)
    np.testing.assert_allclose(errors(scaled), errors(plain) / np.sqrt(factor), rtol=1e-6)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize(("solver", "layout"), SOLVER_LAYOUTS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("factor", [1e-3, 7.0])
def test_l2_fit_with_a_common_factor_on_the_weights_is_the_fit_with_that_factor_on_C(
    case, solver, layout, factor
):
    estimator, data = CASES[case]
    X, y, weights = data()
    X = sp.csr_matrix(X) if layout == "csr" else X
    options = {"penalty": "l2", "solver": solver, "max_iter": MAX_ITER}
    scaled = estimator(C=0.5, **options).fit(X, y, sample_weight=factor * weights)
    stronger = estimator(C=0.5 * factor, **options).fit(X, y, sample_weight=weights)
    np.testing.assert_allclose(flat(scaled), flat(stronger), rtol=0, atol=1e-7)
    np.testing.assert_allclose(errors(scaled) * np.sqrt(factor), errors(stronger), rtol=1e-6)


@pytest.mark.parametrize("case", ["binary", "multiclass"])
def test_scikit_learn_logistic_regression_also_reads_a_factor_on_the_weights_as_one_on_C(case):
    """The oracle that an l2 fit *should* change with the weights' scale, as ours does."""
    X, y, weights = CASES[case][1]()
    options = {"tol": 1e-12, "max_iter": 10_000}
    reference = SklearnLogisticRegression(C=0.5, **options).fit(X, y, sample_weight=7.0 * weights)
    model = LogisticRegression(C=0.5).fit(X, y, sample_weight=7.0 * weights)
    unscaled = LogisticRegression(C=0.5).fit(X, y, sample_weight=weights)
    np.testing.assert_allclose(model.coef_, reference.coef_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.intercept_, reference.intercept_, rtol=0, atol=1e-6)
    assert not np.allclose(model.coef_, unscaled.coef_, rtol=0, atol=1e-3)
