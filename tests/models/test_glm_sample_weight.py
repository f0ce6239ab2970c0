"""Sample weights of the GLM estimators and objective.

Oracles: scikit-learn's LogisticRegression / PoissonRegressor with the same weights (l2),
statsmodels' GLM with ``freq_weights`` (coefficients and standard errors), the same data with
rows repeated or dropped, and torch.func derivatives of the weighted loss.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.special import gammaln, softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression
from sklearn.linear_model import PoissonRegressor
from sklearn.metrics import accuracy_score, d2_tweedie_score
from torch.func import grad, hessian

from natgrad.curvature.likelihoods import get_likelihood
from natgrad.models import LogisticRegression, PoissonRegression
from natgrad.models.glm_objective import (
    PenalisedGLMObjective,
    mean_log_factorial,
    sum_to_zero_basis,
)


def classification_data(n_samples: int, n_classes: int, seed: int, n_features: int = 3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features))
    logits = X @ rng.normal(scale=0.8, size=(n_features, n_classes))
    y = np.array([rng.choice(n_classes, p=row) for row in softmax(logits, axis=1)])
    weights = rng.integers(0, 4, size=n_samples).astype(float)
    return X, y, weights


def count_data(n_samples: int, seed: int, n_features: int = 3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features))
    y = rng.poisson(np.exp(X @ rng.normal(scale=0.4, size=n_features) + 0.5)).astype(float)
    weights = rng.integers(0, 4, size=n_samples).astype(float)
    return X, y, weights


def weights_and_intercept(model) -> np.ndarray:
    return np.append(np.ravel(model.coef_), np.ravel(model.intercept_))


def standard_errors(model) -> np.ndarray:
    return np.append(np.ravel(model.coef_bse_), np.ravel(model.intercept_bse_))


# -- scikit-learn's weighted objective ---------------------------------------------------------
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_logistic_matches_sklearn_with_weights(n_classes, fit_intercept):
    X, y, _ = classification_data(150, n_classes, seed=n_classes)
    weights = np.random.default_rng(5).uniform(0.1, 3.0, size=len(y))
    reference = SklearnLogisticRegression(
        C=0.3, fit_intercept=fit_intercept, tol=1e-12, max_iter=10_000
    ).fit(X, y, sample_weight=weights)
    model = LogisticRegression(C=0.3, fit_intercept=fit_intercept).fit(X, y, sample_weight=weights)
    np.testing.assert_allclose(model.coef_, reference.coef_, atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.intercept_, reference.intercept_, atol=1e-6, rtol=0)
    unweighted = LogisticRegression(C=0.3, fit_intercept=fit_intercept).fit(X, y)
    assert not np.allclose(unweighted.coef_, model.coef_, atol=1e-3)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_poisson_matches_sklearn_poisson_regressor_with_weights(fit_intercept):
    X, y, _ = count_data(150, seed=3)
    weights = np.random.default_rng(6).uniform(0.1, 3.0, size=len(y))
    alpha = 0.05
    reference = PoissonRegressor(
        alpha=alpha, fit_intercept=fit_intercept, tol=1e-12, max_iter=10_000
    ).fit(X, y, sample_weight=weights)
    model = PoissonRegression(C=1.0 / (alpha * weights.sum()), fit_intercept=fit_intercept)
    model.fit(X, y, sample_weight=weights)
    np.testing.assert_allclose(model.coef_, reference.coef_, atol=1e-6, rtol=0)
    assert model.intercept_ == pytest.approx(reference.intercept_, abs=1e-6)


# -- frequency weights: statsmodels' freq_weights ----------------------------------------------
@pytest.mark.parametrize(
    ("estimator", "data", "family"),
    [
        (LogisticRegression, lambda: classification_data(300, 2, seed=7), sm.families.Binomial()),
        (PoissonRegression, lambda: count_data(300, seed=8), sm.families.Poisson()),
    ],
)
def test_unpenalised_fit_matches_statsmodels_freq_weights(estimator, data, family):
    X, y, weights = data()
    reference = sm.GLM(
        y, sm.add_constant(X, prepend=False), family=family, freq_weights=weights
    ).fit(tol=1e-12)
    model = estimator(penalty=None).fit(X, y, sample_weight=weights)
    np.testing.assert_allclose(weights_and_intercept(model), reference.params, atol=1e-6, rtol=0)
    np.testing.assert_allclose(standard_errors(model), reference.bse, atol=1e-6, rtol=0)


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
def test_constant_weights_keep_the_mle_and_shrink_errors_by_root_weight(estimator):
    X, y, _ = (
        classification_data(200, 2, seed=9)
        if estimator is LogisticRegression
        else count_data(200, seed=9)
    )
    plain = estimator(penalty=None).fit(X, y)
    tripled = estimator(penalty=None).fit(X, y, sample_weight=np.full(len(y), 3.0))
    np.testing.assert_allclose(weights_and_intercept(tripled), weights_and_intercept(plain))
    np.testing.assert_allclose(standard_errors(tripled), standard_errors(plain) / np.sqrt(3.0))


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
def test_unit_weights_are_the_unweighted_fit_exactly(estimator):
    X, y, _ = (
        classification_data(120, 3, seed=10)
        if estimator is LogisticRegression
        else count_data(120, seed=10)
    )
    plain = estimator(C=0.5).fit(X, y)
    weighted = estimator(C=0.5).fit(X, y, sample_weight=np.ones(len(y)))
    np.testing.assert_array_equal(weights_and_intercept(weighted), weights_and_intercept(plain))
    np.testing.assert_array_equal(weighted.covariance_, plain.covariance_)
    assert weighted.n_iter_ == plain.n_iter_


# -- integer weights are repeated rows, zero weights dropped rows -------------------------------
def repeated(X, y, weights):
    counts = weights.astype(int)
    return X.repeat(counts, axis=0), y.repeat(counts)


LOGISTIC_CASES = [
    (LogisticRegression, {"solver": solver}, n_classes)
    for solver in ("fisher", "fisher-chord", "ngd")
    for n_classes in (2, 3)
] + [(LogisticRegression, {"solver": "gd", "max_iter": 15}, 2)]
POISSON_CASES = [
    (PoissonRegression, {"solver": solver}, None) for solver in ("fisher", "fisher-chord", "ngd")
] + [(PoissonRegression, {"solver": "gd", "max_iter": 15, "learning_rate": 0.1}, None)]


@pytest.mark.parametrize(("estimator", "params", "n_classes"), LOGISTIC_CASES + POISSON_CASES)
def test_integer_weights_equal_repeated_rows(estimator, params, n_classes):
    """Same iterates up to rounding: ``gd`` stopped after 15 steps agrees as well."""
    if estimator is LogisticRegression:
        X, y, weights = classification_data(60, n_classes, seed=11)
    else:
        X, y, weights = count_data(60, seed=11)
    assert (weights == 0).any() and (weights > 1).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        weighted = estimator(C=2.0, **params).fit(X, y, sample_weight=weights)
        expanded = estimator(C=2.0, **params).fit(*repeated(X, y, weights))
    np.testing.assert_allclose(
        weights_and_intercept(weighted), weights_and_intercept(expanded), rtol=1e-9, atol=1e-11
    )
    np.testing.assert_allclose(weighted.covariance_, expanded.covariance_, rtol=1e-8, atol=1e-12)
    assert weighted.n_iter_ == expanded.n_iter_
    assert weighted.loss_ == pytest.approx(expanded.loss_, rel=1e-10)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), n_classes=st.sampled_from([2, 4]))
@example(seed=2328, n_classes=2)  # an intercept of 0.025 that differs by 4e-11 (1.7e-9 relative)
def test_random_integer_weights_equal_repeated_rows(seed, n_classes):
    """The two fits round differently on their way to the optimum, so they agree to round-off
    on the scale of the coefficients (not of each coefficient: a small one may differ by more,
    relatively)."""
    X, y, weights = classification_data(40, n_classes, seed=seed)
    if len(np.unique(y[weights > 0])) < 2:
        return
    weighted = LogisticRegression(C=1.0).fit(X, y, sample_weight=weights)
    expanded = LogisticRegression(C=1.0).fit(*repeated(X, y, weights))
    np.testing.assert_array_equal(weighted.classes_, expanded.classes_)
    expected = weights_and_intercept(expanded)
    np.testing.assert_allclose(
        weights_and_intercept(weighted), expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max()
    )


def test_zero_weight_rows_are_dropped_with_their_classes():
    X, y, _ = classification_data(90, 3, seed=12)
    weights = (y != 2).astype(float)
    model = LogisticRegression().fit(X, y, sample_weight=weights)
    dropped = LogisticRegression().fit(X[y != 2], y[y != 2])
    np.testing.assert_array_equal(model.classes_, [0, 1])
    np.testing.assert_allclose(weights_and_intercept(model), weights_and_intercept(dropped))


def test_separation_check_ignores_zero_weight_rows():
    """The weighted rows are separable, a zero-weight row is not: separation is reported."""
    X = np.array([[-2.0], [-1.0], [1.0], [2.0], [3.0]])
    y = np.array([0, 0, 1, 1, 0])
    with pytest.warns(ConvergenceWarning, match="separated"):
        LogisticRegression(penalty=None).fit(X, y, sample_weight=[1.0, 2.0, 1.0, 1.0, 0.0])


def test_one_class_left_after_zero_weights_is_an_error_naming_the_class():
    X, y, _ = classification_data(20, 2, seed=13)
    with pytest.raises(ValueError, match="1 class"):
        LogisticRegression().fit(X, y, sample_weight=(y == 1).astype(float))


# -- validation ---------------------------------------------------------------------------------
BAD_WEIGHTS = [
    (np.ones(7), r"shape \(8,\).*\(7,\)"),
    (np.ones((8, 1)), r"shape \(8,\).*\(8, 1\)"),
    (np.array([1.0] * 7 + [-0.5]), r"sample_weight\[7\] = -0.5"),
    (np.array([1.0, np.nan] + [1.0] * 6), r"sample_weight\[1\] = nan"),
    (np.array([np.inf] + [1.0] * 7), r"sample_weight\[0\] = inf"),
    (np.zeros(8), "all zero"),
    (-1.0, r"sample_weight\[0\] = -1.0"),
]


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
@pytest.mark.parametrize(("weights", "message"), BAD_WEIGHTS)
def test_bad_weights_raise_value_error_naming_the_value(estimator, weights, message):
    X, y, _ = classification_data(8, 2, seed=14)
    with pytest.raises(ValueError, match=message):
        estimator().fit(X, y, sample_weight=weights)
    fitted = estimator().fit(X, y)
    with pytest.raises(ValueError, match=message):
        fitted.score(X, y, sample_weight=weights)


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
def test_non_numeric_weights_raise_type_error(estimator):
    X, y, _ = classification_data(4, 2, seed=15)
    with pytest.raises(TypeError, match="numeric"):
        estimator().fit(X, y, sample_weight=["a", "b", "c", "d"])


def test_scalar_weight_weighs_every_row_alike():
    X, y, _ = count_data(50, seed=16)
    model = PoissonRegression(C=1.0).fit(X, y, sample_weight=2.0)
    reference = PoissonRegression(C=1.0).fit(X, y, sample_weight=np.full(len(y), 2.0))
    np.testing.assert_array_equal(weights_and_intercept(model), weights_and_intercept(reference))


# -- score ---------------------------------------------------------------------------------------
def test_weighted_scores_match_sklearn_metrics():
    X, y, weights = classification_data(80, 3, seed=17)
    classifier = LogisticRegression().fit(X, y)
    expected = accuracy_score(y, classifier.predict(X), sample_weight=weights)
    assert classifier.score(X, y, sample_weight=weights) == pytest.approx(expected, rel=1e-15)
    assert classifier.score(X, y, sample_weight=weights) != classifier.score(X, y)
    X, y, weights = count_data(80, seed=17)
    regressor = PoissonRegression().fit(X, y)
    expected = d2_tweedie_score(y, regressor.predict(X), sample_weight=weights, power=1)
    assert regressor.score(X, y, sample_weight=weights) == pytest.approx(expected, rel=1e-15)


# -- the weighted objective against torch.func --------------------------------------------------
N_SAMPLES = 11


def weighted_objective(kind: str, inverse_C: float, fit_intercept: bool):
    generator = torch.Generator().manual_seed(2)
    design = torch.randn(N_SAMPLES, 3, generator=generator, dtype=torch.float64)
    if fit_intercept:
        design = torch.cat([design, torch.ones(N_SAMPLES, 1, dtype=torch.float64)], dim=1)
    if kind == "categorical":
        targets = torch.randint(0, 4, (N_SAMPLES,), generator=generator)
        basis = sum_to_zero_basis(4)
    else:
        high = 2 if kind == "bernoulli" else 6
        targets = torch.randint(0, high, (N_SAMPLES,), generator=generator).double()
        basis = torch.ones(1, 1, dtype=torch.float64)
    weights = torch.rand(N_SAMPLES, generator=generator, dtype=torch.float64) * 3.0
    weights[0] = 0.0
    objective = PenalisedGLMObjective(
        design, targets, get_likelihood(kind), basis, inverse_C, fit_intercept, weights
    )
    params = 0.5 * torch.randn(objective.n_params, generator=generator, dtype=torch.float64)
    return objective, weights, params


def summed_loss_oracle(objective: PenalisedGLMObjective, weights: torch.Tensor, inverse_C: float):
    """``Σ sₙ nllₙ + ½‖Θ_coef‖² / C``, divided by ``S``: scikit-learn's objective, from scratch."""
    penalised = torch.ones(objective.n_rows, dtype=torch.float64)
    if objective.n_rows == 4:  # fit_intercept: the last design column
        penalised[-1] = 0.0
    mask = penalised.repeat_interleave(objective.n_columns)

    def loss(params: torch.Tensor) -> torch.Tensor:
        summed = weights @ objective.per_sample_nll(params)
        return (summed + 0.5 * inverse_C * (mask * params.square()).sum()) / weights.sum()

    return loss


WEIGHTED_CASES = [
    (kind, inverse_C, fit_intercept)
    for kind in ("bernoulli", "categorical", "poisson")
    for inverse_C in (0.0, 2.0)
    for fit_intercept in (True, False)
]


@pytest.mark.parametrize(("kind", "inverse_C", "fit_intercept"), WEIGHTED_CASES)
def test_weighted_loss_gradient_and_fisher_match_autograd(kind, inverse_C, fit_intercept):
    objective, weights, params = weighted_objective(kind, inverse_C, fit_intercept)
    oracle = summed_loss_oracle(objective, weights, inverse_C)
    loss, gradient = objective.loss_and_gradient(params)
    assert objective.total_weight == pytest.approx(float(weights.sum()), rel=1e-15)
    assert loss == pytest.approx(float(oracle(params)), rel=1e-12)
    torch.testing.assert_close(gradient, grad(oracle)(params))
    torch.testing.assert_close(objective.fisher(params), hessian(oracle)(params))  # canonical link


@pytest.mark.parametrize("inverse_C", [0.0, 2.0])
def test_weighted_softmax_fisher_product_matches_dense_fisher(inverse_C):
    objective, _, params = weighted_objective("categorical", inverse_C, True)
    vectors = torch.randn(objective.n_params, 5, dtype=torch.float64)
    product = objective.fisher_product(objective.outputs(params))
    products = torch.stack([product(vector) for vector in vectors.T], dim=1)
    torch.testing.assert_close(products, objective.fisher(params) @ vectors)


def test_weighted_kronecker_preconditioner_is_exact_when_samples_share_one_fisher():
    """At ``Θ = 0`` without intercept every softmax is uniform, so ``M = F`` with weights too."""
    objective, _, _ = weighted_objective("categorical", 2.0, False)
    params = torch.zeros(objective.n_params, dtype=torch.float64)
    fisher = objective.fisher(params)
    apply = objective.kronecker_preconditioner(objective.outputs(params))
    vectors = torch.randn(objective.n_params, 4, dtype=torch.float64)
    applied = torch.stack([apply(vector) for vector in (fisher @ vectors).T], dim=1)
    torch.testing.assert_close(applied, vectors)


def test_weighted_mean_log_factorial_equals_lgamma():
    counts = np.array([0.0, 1.0, 2.0, 7.0, 3.0, 2.5])
    weights = np.array([0.1, 0.3, 0.2, 0.1, 0.2, 0.1])
    expected = float(weights @ gammaln(counts + 1.0))
    assert mean_log_factorial(counts, weights) == pytest.approx(expected, rel=1e-13)
    assert mean_log_factorial(counts[:4], weights[:4] / weights[:4].sum()) == pytest.approx(
        float(weights[:4] @ gammaln(counts[:4] + 1.0)) / weights[:4].sum(), rel=1e-13
    )


def test_objective_rejects_bad_weights():
    objective, weights, _ = weighted_objective("poisson", 1.0, True)
    arguments = (objective.design, objective.targets, objective.likelihood)
    rest = (objective.output_basis, 1.0, True)
    with pytest.raises(ValueError, match=r"shape \(11,\)"):
        PenalisedGLMObjective(*arguments, *rest, weights[:5])
    with pytest.raises(ValueError, match="non-negative"):
        PenalisedGLMObjective(*arguments, *rest, -weights)
