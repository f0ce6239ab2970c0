"""Poisson regression (log link) fitted by Fisher scoring."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.base import RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import d2_tweedie_score
from sklearn.utils.validation import check_is_fitted, validate_data

from natgrad._warnings import warn_at_caller
from natgrad.curvature.likelihoods import get_likelihood
from natgrad.models.glm_base import (
    DTYPE,
    SPARSE_FORMATS,
    ArrayOrSparse,
    GLMEstimator,
    check_sample_weight,
    drop_zero_weights,
)


class PoissonRegression(RegressorMixin, GLMEstimator):
    """Poisson regression with log link, fitted by Fisher scoring, natural-gradient or GD.

    Model ``y ~ Poisson(exp(x·w + b))``. Minimises ``Σₙ sₙ nll(yₙ | xₙ) + ½‖w‖² / C`` (intercept
    not penalised; sample weights ``sₙ`` default to one), internally divided by ``S = Σₙ sₙ``:
    the solvers see the mean penalised loss and the mean Fisher
    ``F = X̃ᵀ diag(s ⊙ exp f) X̃ / S`` (plus ``I / (C S)``), ``∇²A`` taken from the
    Poisson likelihood of :mod:`natgrad.curvature.likelihoods`. Fisher scoring is the
    natural-gradient step of size one; for the canonical log link it is Newton's method.

    **Relation to scikit-learn.** ``sklearn.linear_model.PoissonRegressor(alpha=α)`` minimises
    ``(1/N) Σ ½ deviance + ½ α ‖w‖²``, and half the Poisson deviance differs from the negative
    log-likelihood by a constant, so it is this model with ``C = 1 / (α N)`` (``α = 1 / (C N)``);
    with sample weights it minimises ``(1/S) Σ sₙ ½ devianceₙ + ½ α ‖w‖²``, this model with
    ``C = 1 / (α S)``. ``penalty=None`` matches ``statsmodels.GLM(y, X, family=Poisson())``.

    **Sample weights** are frequency weights: weight ``k`` equals the row repeated ``k`` times,
    weight ``0`` a dropped row (such rows are removed), and ``covariance_`` is
    ``(Σₙ sₙ Fₙ + penalty)⁻¹``, statsmodels' ``GLM(..., freq_weights=s)`` and, with the
    Poisson's dispersion fixed at one, equally ``GLM(..., var_weights=s)``. Fractional weights
    too count the data as ``S = Σₙ sₙ`` observations: multiplying every weight by ``c`` leaves
    an unpenalised fit unchanged and divides the standard errors by ``√c``, and with
    ``penalty="l2"`` equals multiplying ``C`` by ``c`` (unlike ``PoissonRegressor``, whose
    penalty is on the mean loss and whose fit does not change). Rescale weights of arbitrary
    scale to sum to the number of observations they stand for before reading the standard
    errors (see :mod:`natgrad.models.glm_base`).

    Parameters
    ----------
    penalty : {"l2", None}, default="l2"
    C : float, default=1.0
        Inverse penalty strength on the summed loss; ``np.inf`` means no penalty.
    fit_intercept : bool, default=True
    solver : {"fisher", "fisher-chord", "ngd", "gd"}, default="fisher"
        As in :class:`~natgrad.models.LogisticRegression` (including the float32 Fisher for
        the direction where it is well conditioned and ``X`` is dense).
    learning_rate : float, optional
        As in :class:`~natgrad.models.LogisticRegression`.
    tol : float, default=1e-8
        Stop when the Euclidean norm of the gradient of the mean penalised loss is ``<= tol``,
        the components of a feature with root mean square ``r < 1`` divided by ``r`` (its
        gradient in units where ``r = 1``): features in small units (1e-8, say) otherwise
        meet ``tol`` at the start, and the fit depends on their units.
    max_iter : int, default=100

    Attributes
    ----------
    coef_ : ndarray of shape (n_features,)
    intercept_ : float
        ``0.0`` when ``fit_intercept=False``.
    coef_bse_ : ndarray of shape (n_features,)
    intercept_bse_ : float
        Standard errors from the inverse summed penalised Fisher (statsmodels' ``bse`` for an
        unpenalised fit); ``0.0`` for an intercept not fitted.
    covariance_ : ndarray of shape (D, D)
        Covariance of ``[coef_, intercept_]`` (intercept only when fitted). It and the
        standard errors are computed on first access (one more Fisher, ``N · D²``), not by
        ``fit``; until then the estimator keeps a copy of the training design.
    n_iter_ : int
    n_fisher_ : int
        Number of Fisher matrices formed (fewer than ``n_iter_`` for ``"fisher-chord"``).
    loss_ : float
        Final mean penalised loss (negative log-likelihood including ``log y!``).
    gradient_norm_ : float
    n_features_in_ : int

    Warns
    -----
    ConvergenceWarning
        When ``max_iter`` is reached, when step halving finds no decrease, or when every count
        is zero and an intercept is fitted (its optimum is ``-inf``, penalty or not: the fit
        stops where the gradient norm reaches ``tol``). Not detected: a combination of the
        columns that is zero wherever the count is positive and non-negative elsewhere; the
        coefficients along it then grow until the gradient norm reaches ``tol``.
    RuntimeWarning
        On first access of ``covariance_`` or the standard errors, when the Fisher at the
        fitted weights is singular to working precision (exactly collinear, constant or
        all-zero columns without a penalty): the errors along its null space are arbitrary.
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.positive_only = True
        return tags

    def fit(
        self, X: ArrayOrSparse, y: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> PoissonRegression:
        """Fit to features ``X`` ``(N, n_features)`` and counts ``y >= 0`` ``(N,)``.

        ``X`` may be a SciPy sparse matrix or array (CSR or CSC as given, other formats
        converted to CSR); it is never made dense, and its Fisher-scoring directions use the
        float64 Fisher (see :mod:`natgrad.models.glm_base`).

        ``y`` need not be integer (the Poisson quasi-likelihood is used as is).
        ``sample_weight`` ``(N,)`` (or a scalar): non-negative frequency weights, not all zero;
        ``None`` weighs every row one.
        """
        X, y = validate_data(
            self, X, y, accept_sparse=SPARSE_FORMATS, dtype=np.float64, y_numeric=True
        )
        if np.any(y < 0):
            raise ValueError(
                f"PoissonRegression needs non-negative targets y, got minimum {y.min()!r}"
            )
        weights = check_sample_weight(sample_weight, len(y))
        X, y, weights = drop_zero_weights(X, y, weights)
        targets = torch.tensor(y, dtype=DTYPE, device="cpu")
        fitted = self._fit_glm(
            X,
            targets,
            get_likelihood("poisson"),
            torch.ones(1, 1, dtype=DTYPE, device="cpu"),
            sample_weight=weights,
            initial_params=self._initial_params(X.shape[1], y, weights),
        )[0]
        n_features = X.shape[1]
        self.coef_ = fitted[:n_features]
        self.intercept_ = float(fitted[n_features]) if self.fit_intercept else 0.0
        if self.fit_intercept and not y.any():
            warn_at_caller(
                "PoissonRegression: every count y is zero, so the optimal intercept is -inf; "
                "stopping where the gradient norm reached tol, at intercept_ "
                f"{self.intercept_:.3g}",
                ConvergenceWarning,
            )
        return self

    @property
    def coef_bse_(self) -> np.ndarray:
        """Standard errors of ``coef_``, shape ``(n_features,)`` (computed on first access)."""
        return self._weight_standard_errors()[0, : self.n_features_in_]

    @property
    def intercept_bse_(self) -> float:
        """Standard error of ``intercept_``; ``0.0`` for an intercept not fitted."""
        errors = self._weight_standard_errors()[0]
        return float(errors[self.n_features_in_]) if len(errors) > self.n_features_in_ else 0.0

    def _initial_params(
        self, n_features: int, y: np.ndarray, sample_weight: np.ndarray | None
    ) -> torch.Tensor:
        """Zero coefficients; the intercept at ``log(mean y)`` (weighted by ``sample_weight``)
        when it is fitted and finite."""
        params = torch.zeros(n_features + int(self.fit_intercept), dtype=DTYPE, device="cpu")
        mean_count = float(np.average(y, weights=sample_weight))
        if self.fit_intercept and mean_count > 0:
            params[-1] = math.log(mean_count)
        return params

    def predict(self, X: ArrayOrSparse) -> np.ndarray:
        """Expected counts ``exp(X w + b)``, shape ``(N,)``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, accept_sparse=SPARSE_FORMATS, dtype=np.float64)
        return np.exp(X @ self.coef_ + self.intercept_)

    def score(
        self, X: ArrayOrSparse, y: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> float:
        """Fraction of Poisson deviance explained, D² (as ``PoissonRegressor.score``).

        Weighted by ``sample_weight`` ``(N,)`` if given (validated as in :meth:`fit`).
        """
        predictions = self.predict(X)
        weights = check_sample_weight(sample_weight, len(predictions))
        return float(d2_tweedie_score(y, predictions, sample_weight=weights, power=1))
