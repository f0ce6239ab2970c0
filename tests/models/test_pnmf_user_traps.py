"""Traps a scikit-learn user can fall into with PNMF: fitted state, input forms, warnings."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.special import gammaln
from sklearn.exceptions import ConvergenceWarning

from natgrad.models import PNMF
from natgrad.models.pnmf_counts import count_matrix

SHORT = {"n_components": 2, "training_mode": "natural", "mode": "lower-bound", "random_state": 0}


def poisson_data(n_samples=30, n_features=8, seed=0):
    rng = np.random.default_rng(seed)
    rate = np.exp(rng.normal(size=(n_samples, 2))) @ rng.gamma(1.0, 2.0, (2, n_features))
    return rng.poisson(rate).astype(np.float64)


def quiet_fit(model, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X)


def quiet_transform(model, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.transform(X)


def test_transform_uses_the_fitted_n_components_after_set_params():
    X = poisson_data()
    model = quiet_fit(PNMF(**SHORT, max_iter=10), X)
    before = quiet_transform(model, X)
    model.set_params(n_components=3)
    np.testing.assert_array_equal(quiet_transform(model, X), before)
    np.testing.assert_allclose(model.inverse_transform(before), before @ model.components_)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"E": True}, "E must be an integer >= 1, got True"),
        ({"max_iter": True}, "max_iter must be an integer >= 1, got True"),
        ({"batch_size": True}, "batch_size must be None or an integer >= 1, got True"),
        ({"tol": True}, "tol must be >= 0, got True"),
        ({"learning_rate": "0.1"}, "learning_rate must be None or a number > 0, got '0.1'"),
        ({"learning_rate": "fast"}, "learning_rate must be None or a number > 0, got 'fast'"),
    ],
)
def test_boolean_and_string_parameters_raise_naming_the_value(params, message):
    with pytest.raises(ValueError, match=message):
        PNMF(n_components=1, **{"max_iter": 2, **params}).fit(np.ones((4, 3)))


@pytest.mark.parametrize(
    "device",
    [
        "cuda:99",
        pytest.param(
            "mps",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS present"),
        ),
    ],
)
def test_unavailable_device_raises_naming_it(device):
    with pytest.raises(ValueError, match=f"device '{device}' is not available"):
        PNMF(n_components=1, max_iter=2, device=device).fit(np.ones((4, 3)))


def test_inverse_transform_validates_activations_and_accepts_sparse():
    model = quiet_fit(PNMF(**SHORT, max_iter=5), poisson_data())
    activations = np.random.default_rng(1).gamma(1.0, 1.0, (4, 2))
    oracle = activations @ model.components_  # NumPy's float64 product
    np.testing.assert_allclose(model.inverse_transform(sp.csr_matrix(activations)), oracle)
    with pytest.raises(ValueError, match="Negative values"):
        model.inverse_transform(-activations)
    with pytest.raises(ValueError, match="NaN"):
        model.inverse_transform(np.full((4, 2), np.nan))


def test_duplicate_coo_entries_are_summed_before_the_count_checks():
    X = poisson_data()
    X[0, 0], X[1, 1] = 1.0, 3.0
    rows, cols = np.nonzero(X)
    single = ~(((rows == 0) & (cols == 0)) | ((rows == 1) & (cols == 1)))
    # the count 1 at (0, 0) stored as 0.5 + 0.5, the count 3 at (1, 1) as -1 + 4
    duplicates = np.array([[0, 0, 0.5], [0, 0, 0.5], [1, 1, -1.0], [1, 1, 4.0]])
    coo = sp.coo_matrix(
        (
            np.r_[X[rows, cols][single], duplicates[:, 2]],
            (np.r_[rows[single], duplicates[:, 0]], np.r_[cols[single], duplicates[:, 1]]),
        ),
        shape=X.shape,
    )
    np.testing.assert_array_equal(coo.toarray(), X)  # SciPy's own sum of the duplicates
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sparse_fit = quiet_fit(PNMF(**SHORT, max_iter=10), coo)
    dense_fit = quiet_fit(PNMF(**SHORT, max_iter=10), X)
    np.testing.assert_allclose(sparse_fit.components_, dense_fit.components_, rtol=1e-10)


def test_stopping_at_max_iter_warns_and_a_converged_fit_does_not():
    X = poisson_data()
    with pytest.warns(ConvergenceWarning, match="W and q\\(F\\) stopped at max_iter=3"):
        model = PNMF(**SHORT, max_iter=3).fit(X)
    assert not model.converged_
    with pytest.warns(ConvergenceWarning, match="q\\(F\\) with W fixed stopped at max_iter=3"):
        model.transform(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = PNMF(**SHORT, max_iter=2000, tol=1e-3).fit(X)
    assert model.converged_
    assert model.n_iter_ < 2000


def test_feature_names_out_and_pandas_output():
    X = poisson_data()
    frame = pd.DataFrame(X, columns=[f"gene{j}" for j in range(8)], index=range(100, 130))
    model = quiet_fit(PNMF(**SHORT, max_iter=5), frame)
    # scikit-learn's convention for transformers that make their own features (PCA, NMF)
    np.testing.assert_array_equal(model.get_feature_names_out(), ["pnmf0", "pnmf1"])
    expected = quiet_transform(model, frame)
    output = quiet_transform(model.set_output(transform="pandas"), frame)
    assert list(output.columns) == ["pnmf0", "pnmf1"]
    assert list(output.index) == list(frame.index)
    np.testing.assert_array_equal(output.to_numpy(), expected)


@pytest.mark.parametrize("training_mode", ["standard", "natural"])
def test_numpy_integer_parameters_fit_like_python_integers(training_mode):
    X = poisson_data()
    params = {"n_components": 2, "E": 3, "max_iter": 3, "batch_size": 10}
    kwargs = {"training_mode": training_mode, "random_state": 0}
    python_fit = quiet_fit(PNMF(**params, **kwargs), X)
    numpy_fit = quiet_fit(PNMF(**{k: np.int64(v) for k, v in params.items()}, **kwargs), X)
    np.testing.assert_array_equal(numpy_fit.components_, python_fit.components_)


def untidy_csr(X):
    """``X`` as CSR: row 0 reversed plus a stored zero, ``X[1, 1]`` stored as ``1 + rest``."""
    rows = [[(j, y) for j, y in enumerate(row) if y != 0] for row in X]
    rows[0] = [*reversed(rows[0]), (0, 0.0)]
    rows[1] = [(j, y) for j, y in rows[1] if j != 1] + [(1, 1.0), (1, X[1, 1] - 1.0)]
    entries = [entry for row in rows for entry in row]
    indices = np.array([j for j, _ in entries], dtype=np.int32)
    data = np.array([y for _, y in entries])
    indptr = np.cumsum([0] + [len(row) for row in rows])
    return sp.csr_matrix((data, indices, indptr), shape=X.shape)


def test_fit_leaves_an_untidy_sparse_input_unchanged_and_sums_its_duplicates():
    X = poisson_data()
    X[1, 1] = 4.0
    counts = untidy_csr(X)
    np.testing.assert_array_equal(counts.toarray(), X)  # SciPy's own sum of the duplicates
    data, indices, indptr = counts.data.copy(), counts.indices.copy(), counts.indptr.copy()
    sparse_fit = quiet_fit(PNMF(**SHORT, max_iter=10), counts)
    np.testing.assert_array_equal(counts.data, data)
    np.testing.assert_array_equal(counts.indices, indices)
    np.testing.assert_array_equal(counts.indptr, indptr)
    dense_fit = quiet_fit(PNMF(**SHORT, max_iter=10), X)
    np.testing.assert_allclose(sparse_fit.components_, dense_fit.components_, rtol=1e-10)


def test_count_matrix_sums_duplicates_and_drops_zeros_in_a_copy():
    X = poisson_data()
    X[1, 1] = 4.0
    counts = count_matrix(untidy_csr(X), torch.float64, torch.device("cpu"))
    np.testing.assert_array_equal(counts.to_dense_numpy(), X)
    assert float(counts.log_factorial) == pytest.approx(gammaln(X + 1.0).sum(), rel=1e-12)
    tidy = sp.csr_matrix(X)
    tidy.data[0] = 0.0  # a stored zero in an otherwise canonical matrix
    data, indptr = tidy.data.copy(), tidy.indptr.copy()
    stored = count_matrix(tidy, torch.float64, torch.device("cpu")).values
    assert len(stored) == len(data) - 1  # the stored zero is dropped, in a copy
    np.testing.assert_array_equal(tidy.data, data)
    np.testing.assert_array_equal(tidy.indptr, indptr)
