"""Sparse ``X`` (SciPy CSR / CSC) for LogisticRegression and PoissonRegression.

Oracles: the same estimator on ``X.toarray()`` (the dense path with its float64 Fisher: the
dense path's float32 Gram is switched off so that both take the same steps), to a relative
1e-10; scikit-learn's LogisticRegression / PoissonRegressor on the same sparse ``X``, to 1e-6;
dense NumPy / torch products for :class:`SparseDesign`. Also: ``X`` is never made dense, and
bad input is refused as scikit-learn refuses it.
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import sparse
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression
from sklearn.linear_model import PoissonRegressor

from natgrad.curvature.likelihoods import get_likelihood
from natgrad.models import LogisticRegression, PoissonRegression, glm_solvers
from natgrad.models.glm_objective import PenalisedGLMObjective, SparseDesign, sum_to_zero_basis

FAMILIES = ("binary", "multiclass", "poisson")
SETTINGS = settings(max_examples=4, deadline=None)
MAX_CONDITION = 1e5
"""Examples whose covariance is worse conditioned are skipped for the 1e-10 comparisons."""


def sparse_matrix(rng: np.random.Generator, n_samples: int, n_features: int, density: float):
    """Random sparse ``(n_samples, n_features)`` CSR with at least 6 entries in every column."""
    X = sparse.random(
        n_samples, n_features, density=density, random_state=rng, data_rvs=rng.standard_normal
    )
    rows = (np.arange(6)[:, None] * n_features + np.arange(n_features)) % n_samples
    columns = np.broadcast_to(np.arange(n_features), rows.shape)
    floor = sparse.coo_matrix(
        (rng.standard_normal(rows.size), (rows.ravel(), columns.ravel())), X.shape
    )
    return (X + floor).tocsr()


@st.composite
def problems(draw, family: str):
    """``(X, y, sample_weight)``: sparse ``X`` in CSR or CSC, targets of ``family``."""
    n_samples = draw(st.integers(40, 90))
    n_features = draw(st.integers(1, 6))
    density = draw(st.floats(0.05, 0.6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    X = sparse_matrix(rng, n_samples, n_features, density).asformat(
        draw(st.sampled_from(["csr", "csc"]))
    )
    weights = rng.integers(0, 4, size=n_samples).astype(float)
    weights[:3] = 1.0  # the rows that guarantee every class below
    if family == "poisson":
        rates = np.exp(0.4 * (X @ rng.normal(size=n_features)) + 0.3)
        return X, rng.poisson(rates).astype(float), weights
    n_classes = 2 if family == "binary" else 3
    logits = X @ rng.normal(scale=0.8, size=(n_features, n_classes))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    uniform = rng.random(n_samples)[:, None]
    y = (uniform > np.cumsum(probs / probs.sum(1, keepdims=True), axis=1)).sum(1)
    y[:n_classes] = np.arange(n_classes)
    return X, np.minimum(y, n_classes - 1), weights


def estimator_for(family: str, **params):
    return PoissonRegression(**params) if family == "poisson" else LogisticRegression(**params)


def fit_quietly(model, X, y, sample_weight=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # separation: both paths alike
        return model.fit(X, y, sample_weight=sample_weight)


def dense_float64_fit(model, X, y, sample_weight=None):
    """Fit on ``X.toarray()`` with the float64 Fisher throughout (as the sparse path)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(glm_solvers, "MAX_LOW_PRECISION_CONDITION", 0.0)
        return fit_quietly(model, X.toarray(), y, sample_weight)


def fitted_weights(model) -> np.ndarray:
    return np.append(np.ravel(model.coef_), np.ravel(model.intercept_))


def standard_errors(model) -> np.ndarray:
    return np.append(np.ravel(model.coef_bse_), np.ravel(model.intercept_bse_))


def assert_relative(actual, expected, rtol=1e-10):
    """Equal to ``rtol`` relative to the largest magnitude of ``expected``."""
    expected = np.asarray(expected, dtype=float)
    scale = float(np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def well_conditioned(model) -> bool:
    """Whether the covariance's condition number is below ``MAX_CONDITION``.

    Any two float64 computations of the fit (here: dense and sparse products) may differ by
    about ``eps · κ``; unpenalised fits on quasi-separated data reach ``κ ~ 1e8`` or more.
    The softmax's covariance of ``K`` rows has ``D`` zero eigenvalues (the weights of each
    feature sum to zero); ``κ`` is that of the others.
    """
    eigenvalues = np.linalg.eigvalsh(model.covariance_)
    n_classes = len(getattr(model, "classes_", ()))
    free = eigenvalues[len(eigenvalues) // n_classes :] if n_classes > 2 else eigenvalues
    return bool(free[-1] < MAX_CONDITION * free[0])


def assert_same_fit(sparse_model, dense_model, X, family):
    assert sparse_model.n_iter_ == dense_model.n_iter_
    assert sparse_model.n_fisher_ == dense_model.n_fisher_
    assert_relative(fitted_weights(sparse_model), fitted_weights(dense_model))
    assert_relative(standard_errors(sparse_model), standard_errors(dense_model))
    dense_X = X.toarray()
    if family == "poisson":
        assert_relative(sparse_model.predict(X), dense_model.predict(dense_X))
        return
    np.testing.assert_array_equal(sparse_model.predict(X), dense_model.predict(dense_X))
    assert_relative(sparse_model.decision_function(X), dense_model.decision_function(dense_X))
    assert_relative(sparse_model.predict_proba(X), dense_model.predict_proba(dense_X))


# -- the sparse fit equals the dense fit ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("penalty", ["l2", None])
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_fit_equals_dense_fit(family, fit_intercept, penalty, weighted):
    @SETTINGS
    @given(problem=problems(family), C=st.sampled_from([0.1, 1.0, 10.0]))
    def check(problem, C):
        X, y, weights = problem
        weights = weights if weighted else None
        params = {"penalty": penalty, "C": C, "fit_intercept": fit_intercept}
        sparse_model = fit_quietly(estimator_for(family, **params), X, y, weights)
        dense_model = dense_float64_fit(estimator_for(family, **params), X, y, weights)
        assume(well_conditioned(dense_model))
        assert_same_fit(sparse_model, dense_model, X, family)
        assert sparse_model.score(X, y, weights) == pytest.approx(
            dense_model.score(X.toarray(), y, weights), rel=1e-10
        )

    check()


@pytest.mark.parametrize("solver", glm_solvers.SOLVERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_solver_takes_the_dense_steps_on_sparse_X(solver, family):
    @SETTINGS
    @given(problem=problems(family))
    def check(problem):
        X, y, weights = problem
        params = {"solver": solver, "max_iter": 8 if solver == "gd" else 100}
        sparse_model = fit_quietly(estimator_for(family, **params), X, y, weights)
        dense_model = dense_float64_fit(estimator_for(family, **params), X, y, weights)
        assume(well_conditioned(dense_model))
        assert_same_fit(sparse_model, dense_model, X, family)

    check()


# -- scikit-learn on the same sparse X -----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_sparse_fit_matches_sklearn_on_sparse_X(family, fit_intercept, weighted):
    @SETTINGS
    @given(problem=problems(family), C=st.sampled_from([0.1, 1.0, 10.0]))
    def check(problem, C):
        X, y, weights = problem
        weights = weights if weighted else None
        model = estimator_for(family, C=C, fit_intercept=fit_intercept, tol=1e-11)
        model.fit(X, y, sample_weight=weights)
        if family == "poisson":
            total = len(y) if weights is None else weights.sum()
            reference = PoissonRegressor(
                alpha=1.0 / (C * total),
                fit_intercept=fit_intercept,
                solver="newton-cholesky",
                tol=1e-12,
                max_iter=1000,
            )
        else:
            reference = SklearnLogisticRegression(
                C=C, fit_intercept=fit_intercept, solver="newton-cholesky", tol=1e-12, max_iter=1000
            )
        reference.fit(X, y, sample_weight=weights)
        np.testing.assert_allclose(fitted_weights(model), fitted_weights(reference), atol=1e-6)
        np.testing.assert_allclose(model.predict(X), reference.predict(X), atol=1e-6)

    check()


# -- X is never made dense -----------------------------------------------------------------------
def test_sparse_path_never_densifies_X(monkeypatch):
    """Fit, predict and standard errors on a tall X whose dense copy would be 64 MB.

    Every SciPy ``toarray`` / ``todense`` of a matrix with ``N`` rows raises, and the peak of
    NumPy's allocations stays far below the size of a dense ``X``.
    """
    n_samples, n_features = 200_000, 40
    rng = np.random.default_rng(0)
    rows = rng.choice(n_samples, size=10 * n_features, replace=False)
    columns = np.repeat(np.arange(n_features), 10)
    X = sparse.csr_matrix(
        (rng.standard_normal(len(rows)), (rows, columns)), (n_samples, n_features)
    )
    logits = X @ rng.normal(size=n_features) - 0.5
    y = (rng.random(n_samples) < 1.0 / (1.0 + np.exp(-logits))).astype(int)
    counts = rng.poisson(np.exp(0.3 * logits)).astype(float)

    def refuse_tall(method):
        def guarded(self, *args, **kwargs):
            if self.shape[0] >= n_samples:
                raise AssertionError(f"a dense copy of the {self.shape} design was made")
            return method(self, *args, **kwargs)

        return guarded

    formats = (sparse.csr_matrix, sparse.csc_matrix, sparse.coo_matrix)
    formats += (sparse.csr_array, sparse.csc_array, sparse.coo_array)
    for cls in formats:
        for name in ("toarray", "todense"):
            monkeypatch.setattr(cls, name, refuse_tall(getattr(cls, name)))
    dense_bytes = n_samples * n_features * 8
    tracemalloc.start()
    try:
        model = LogisticRegression(C=10.0).fit(X, y)
        _ = model.coef_bse_, model.predict_proba(X), model.score(X, y)
        poisson = PoissonRegression(C=10.0).fit(X.tocsc(), counts)
        _ = poisson.coef_bse_, poisson.predict(X), poisson.score(X, counts)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < dense_bytes / 4
    assert model.n_iter_ <= 10 and poisson.n_iter_ <= 10


# -- SparseDesign and the objective against dense products ---------------------------------------
@pytest.mark.parametrize("fit_intercept", [True, False])
@settings(max_examples=6, deadline=None)
@given(
    n_samples=st.integers(5, 30),
    n_features=st.integers(1, 5),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_sparse_design_products_equal_dense_products(
    fit_intercept, n_samples, n_features, density, seed
):
    rng = np.random.default_rng(seed)
    X = sparse.random(n_samples, n_features, density=density, random_state=rng)
    design = SparseDesign(X, fit_intercept)
    dense = X.toarray()
    if fit_intercept:
        dense = np.column_stack([dense, np.ones(n_samples)])
    assert design.shape == dense.shape
    weights = rng.standard_normal((dense.shape[1], 3))
    values = rng.standard_normal(n_samples)  # either sign
    residuals = rng.standard_normal((n_samples, 3))
    np.testing.assert_allclose(design.times(weights), dense @ weights, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(design.times(weights[:, 0]), dense @ weights[:, 0], atol=1e-12)
    np.testing.assert_allclose(design.transpose_times(residuals), dense.T @ residuals, atol=1e-12)
    np.testing.assert_allclose(design.transpose_times(values), dense.T @ values, atol=1e-12)
    np.testing.assert_allclose(design.gram(values), dense.T @ (values[:, None] * dense), atol=1e-12)
    tensor = torch.tensor(weights, requires_grad=True)
    output_gradient = torch.from_numpy(residuals)
    (design.matmul(tensor) * output_gradient).sum().backward()
    np.testing.assert_allclose(tensor.grad.numpy(), dense.T @ residuals, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["bernoulli", "categorical", "poisson"])
def test_sparse_objective_equals_dense_objective(likelihood):
    rng = np.random.default_rng(3)
    X = sparse_matrix(rng, 60, 4, 0.3)
    n_outputs = 3 if likelihood == "categorical" else 1
    if n_outputs == 1:
        basis = torch.ones(1, 1, dtype=torch.float64)
        targets = torch.from_numpy(rng.integers(0, 2, 60).astype(float))
    else:
        basis = sum_to_zero_basis(3)
        targets = torch.from_numpy(rng.integers(0, 3, 60))
    dense = torch.from_numpy(np.column_stack([X.toarray(), np.ones(60)]))
    weights = torch.from_numpy(rng.uniform(0.5, 2.0, 60))
    arguments = (targets, get_likelihood(likelihood), basis, 0.7, True)
    sparse_objective = PenalisedGLMObjective(SparseDesign(X, True), *arguments, weights)
    dense_objective = PenalisedGLMObjective(dense, *arguments, weights)
    params = torch.from_numpy(rng.normal(size=sparse_objective.n_params))
    sparse_point, dense_point = sparse_objective.point(params), dense_objective.point(params)
    assert sparse_point.loss == pytest.approx(dense_point.loss, rel=1e-13)
    for method in ("gradient", "point_fisher"):
        np.testing.assert_allclose(
            getattr(sparse_objective, method)(sparse_point),
            getattr(dense_objective, method)(dense_point),
            rtol=1e-12,
            atol=1e-14,
        )
    torch.testing.assert_close(sparse_objective.outputs(params), dense_objective.outputs(params))
    if n_outputs == 3:
        vector = torch.from_numpy(rng.normal(size=sparse_objective.n_params))
        outputs = dense_point.outputs
        torch.testing.assert_close(
            sparse_objective.fisher_product(outputs)(vector),
            dense_objective.fisher_product(outputs)(vector),
        )
        torch.testing.assert_close(
            sparse_objective.kronecker_preconditioner(outputs)(vector),
            dense_objective.kronecker_preconditioner(outputs)(vector),
        )
    else:
        assert sparse_objective.low_precision_fisher(sparse_point) is None
        assert isinstance(dense_objective.low_precision_fisher(dense_point), tuple)


# -- input handling ------------------------------------------------------------------------------
@pytest.mark.parametrize("to_format", ["coo", "lil", "dok", "csc"])
def test_other_sparse_formats_and_integer_data_fit_like_csr(to_format):
    rng = np.random.default_rng(1)
    X = sparse.csr_matrix(rng.poisson(0.4, size=(80, 4)))  # integer entries
    y = (np.asarray(X.sum(1)).ravel() + rng.integers(0, 2, 80)) % 2
    reference = LogisticRegression().fit(X, y)
    model = LogisticRegression().fit(X.asformat(to_format), y)
    np.testing.assert_array_equal(model.coef_, reference.coef_)
    np.testing.assert_array_equal(
        model.predict_proba(X.asformat(to_format)), reference.predict_proba(X)
    )


def test_duplicate_entries_are_summed_and_X_is_left_unchanged():
    columns = np.array([1, 1, 0, 1, 0, 0, 1, 0])  # row 0 twice column 1, row 2 unsorted
    values = np.array([1.0, 2.0, -1.0, 0.5, 1.5, 2.0, -0.5, 1.0])
    X = sparse.csr_matrix((values, columns, np.array([0, 2, 3, 5, 6, 7, 8])), shape=(6, 2))
    stored = X.data.copy()
    y = np.array([0, 1, 1, 0, 1, 0])
    model = dense_float64_fit(LogisticRegression(), X, y)
    sparse_model = LogisticRegression().fit(X, y)
    assert_relative(fitted_weights(sparse_model), fitted_weights(model))
    np.testing.assert_array_equal(X.data, stored)
    assert X.nnz == len(values)


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
def test_sparse_y_is_refused_like_sklearn(estimator):
    X = sparse.random(10, 2, density=0.5, format="csr", random_state=0)
    y = sparse.csr_matrix(np.array([[0.0, 1.0] * 5]).T)
    with pytest.raises(TypeError, match="Sparse data was passed for y"):
        estimator().fit(X, y)


@pytest.mark.parametrize("estimator", [LogisticRegression, PoissonRegression])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_sparse_X_is_refused(estimator, bad):
    X = sparse.random(10, 2, density=0.5, format="csr", random_state=0)
    X.data[0] = bad
    with pytest.raises(ValueError, match=r"NaN|infinity"):
        estimator().fit(X, np.arange(10) % 2)
    fitted = estimator().fit(sparse.eye(10, 2, format="csr"), np.arange(10) % 2)
    with pytest.raises(ValueError, match=r"NaN|infinity"):
        fitted.predict(X)


def test_negative_counts_with_sparse_X_are_refused():
    X = sparse.random(10, 2, density=0.5, format="csr", random_state=0)
    with pytest.raises(ValueError, match="non-negative targets"):
        PoissonRegression().fit(X, np.arange(10) - 1.0)


def test_sparse_X_with_other_feature_count_is_refused_at_predict():
    model = LogisticRegression().fit(sparse.eye(10, 3, format="csr"), np.arange(10) % 2)
    with pytest.raises(ValueError, match="features"):
        model.predict(sparse.eye(10, 2, format="csr"))
