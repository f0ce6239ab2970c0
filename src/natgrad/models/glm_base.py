"""Shared machinery of the GLM estimators: hyper-parameters, fitting, standard errors.

Subclasses (:class:`~natgrad.models.LogisticRegression`,
:class:`~natgrad.models.PoissonRegression`) choose the likelihood, encode the targets and shape
the fitted weights; this base validates the hyper-parameters, builds the
:class:`~natgrad.models.glm_objective.PenalisedGLMObjective`, runs the solver and turns the
inverse Fisher into standard errors.

The covariance and standard errors are computed on first access (or when the estimator is
pickled), not in ``fit``: they need one more Fisher at the fitted parameters, an ``N · D²``
product that a caller wanting only the coefficients should not pay for. Until then the fitted
estimator keeps the objective (its copy of the design, the targets) and the final parameters.

Fitted weights are held as ``weights`` of shape ``(C, D)``: row ``c`` holds the coefficients of
output ``c`` followed, when an intercept is fitted, by its intercept. ``covariance_`` is the
covariance of ``weights.ravel()`` (row-major), the inverse of the **summed** penalised Fisher
``N · F(Θ̂)`` at the fitted parameters (``F`` is the mean over data points), mapped from the
free parameters ``Θ`` to the weights. For an unpenalised fit this is the usual asymptotic
covariance of the maximum-likelihood estimate; with an l2 penalty it is the inverse of the
penalised Fisher (the Laplace-approximation posterior covariance under the Gaussian prior that
the penalty is).

**Sample weights** are frequency weights, as in scikit-learn: the objective is
``Σₙ sₙ nll(yₙ | xₙ) + ½‖w‖² / C`` (solved divided by ``S = Σₙ sₙ``), so weight ``k`` is row
repeated ``k`` times and weight ``0`` a dropped row (such rows are removed before fitting), and
the covariance is ``(Σₙ sₙ Fₙ + penalty)⁻¹ = (S · F(Θ̂))⁻¹``. Fractional weights are read the
same way: the data count as ``S`` observations. For the Binomial and Poisson families, whose
dispersion is fixed at one, this is statsmodels' ``GLM(..., freq_weights=s)`` and equally
``GLM(..., var_weights=s)``: the two kinds give the same estimates and standard errors and
differ only in the residual degrees of freedom, which these estimators do not report. So
multiplying every weight by ``c`` leaves an unpenalised fit unchanged and divides the standard
errors by ``√c``; with ``penalty="l2"`` it equals multiplying ``C`` by ``c`` (as in
scikit-learn's ``LogisticRegression``). The standard errors mean something only when the
weights are on the scale of observation counts: weights normalised to sum to one, or
importance weights of arbitrary scale, must first be rescaled to sum to the number of
observations they stand for (which changes an l2 fit unless ``C`` is divided by the same
factor). Design-based (survey) standard errors need a sandwich estimator, not computed here.

**Sparse X** (SciPy CSR or CSC; other formats are converted to CSR) is held as a
:class:`~natgrad.models.glm_objective.SparseDesign`, never made dense: the outputs and gradients
are sparse products and the ``(D, D)`` Fisher is formed by a sparse product. Its Fisher-scoring
directions always use the float64 Fisher (the float32 Gram of dense designs is not formed).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy import sparse
from scipy.linalg import lapack
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from natgrad._validation import is_integer, is_real
from natgrad._warnings import warn_at_caller
from natgrad.curvature.likelihoods import Likelihood
from natgrad.linalg import damped_solve
from natgrad.models.glm_objective import PenalisedGLMObjective, SparseDesign
from natgrad.models.glm_solvers import SOLVERS, SolverResult, minimise

PENALTIES = (None, "l2")
DEFAULT_LEARNING_RATES = {"fisher": 1.0, "fisher-chord": 1.0, "ngd": 0.5, "gd": 1.0}
DTYPE = torch.float64
ArrayOrSparse = np.ndarray | sparse.sparray | sparse.spmatrix
"""Features ``X``: a dense array or a SciPy sparse matrix or array."""
SPARSE_FORMATS = ["csr", "csc"]
"""The SciPy sparse formats ``X`` is accepted in without conversion (others become CSR)."""
MIN_RECIPROCAL_CONDITION = 1e-14
"""Smallest ``1 / κ₁`` of the summed Fisher at unit diagonal for which ``covariance_`` is computed
without a warning. Below it (about 50 ε) the Fisher is singular to working precision: exactly
collinear, constant or all-zero columns give 1e-16 or a failed Cholesky factor, while columns
correlated to 1 − 1e-12 still give about 1e-13 and standard errors accurate to about 1e-3."""
TRANSPOSE_BLOCK = 512
"""Rows of ``X`` transposed at a time into the design (about 1.4 times faster than at once)."""


class GLMEstimator(BaseEstimator):
    """Base class of the GLM estimators; see the subclasses for the parameters."""

    def __init__(
        self,
        *,
        penalty: str | None = "l2",
        C: float = 1.0,
        fit_intercept: bool = True,
        solver: str = "fisher",
        learning_rate: float | None = None,
        tol: float = 1e-8,
        max_iter: int = 100,
    ) -> None:
        self.penalty = penalty
        self.C = C
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.learning_rate = learning_rate
        self.tol = tol
        self.max_iter = max_iter

    def _check_hyperparameters(self) -> tuple[float, float]:
        """Validate the hyper-parameters; return ``(1 / C or 0, first trial step)``."""
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be None or 'l2', got {self.penalty!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not _is_real(self.C) or not self.C > 0:
            raise ValueError(f"C must be a positive number (np.inf for no penalty), got {self.C!r}")
        if not _is_real(self.tol) or not 0 <= self.tol < math.inf:
            raise ValueError(f"tol must be a finite non-negative number, got {self.tol!r}")
        if not is_integer(self.max_iter) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not isinstance(self.fit_intercept, bool | np.bool_):
            raise TypeError(f"fit_intercept must be a bool, got {self.fit_intercept!r}")
        inverse_C = 0.0 if self.penalty is None else 1.0 / float(self.C)
        return inverse_C, self._first_step()

    def _first_step(self) -> float:
        if self.learning_rate is None:
            return DEFAULT_LEARNING_RATES[self.solver]
        rate = self.learning_rate
        if not _is_real(rate) or not 0 < rate < math.inf:
            raise ValueError(f"learning_rate must be a positive number, got {rate!r}")
        if self.solver in ("fisher", "fisher-chord") and rate != 1.0:
            raise ValueError(
                f"solver={self.solver!r} takes the natural-gradient step of size 1, got "
                f"learning_rate={rate!r}; use solver='ngd' for another step size"
            )
        if self.solver == "ngd" and rate > 1.0:
            raise ValueError(f"solver='ngd' needs learning_rate in (0, 1], got {rate!r}")
        return float(rate)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def _design(self, X: ArrayOrSparse) -> Tensor | SparseDesign:
        """``X`` as a float64 tensor ``(N, D)``, with a trailing column of ones if needed.

        The tensor is the transposed view of a C-contiguous ``(D, N)`` array, the layout in
        which :class:`PenalisedGLMObjective` holds the design. Sparse ``X`` becomes a
        :class:`SparseDesign` (CSR, the ones column implicit).
        """
        if sparse.issparse(X):
            return SparseDesign(X, self.fit_intercept)
        n_samples, n_features = X.shape
        design_t = np.empty((n_features + int(self.fit_intercept), n_samples), dtype=np.float64)
        for start in range(0, n_samples, TRANSPOSE_BLOCK):  # blocks that stay in cache
            design_t[:n_features, start : start + TRANSPOSE_BLOCK] = X[
                start : start + TRANSPOSE_BLOCK
            ].T
        if self.fit_intercept:
            design_t[n_features] = 1.0
        return torch.from_numpy(design_t).T

    def _fit_glm(
        self,
        X: ArrayOrSparse,
        targets: Tensor,
        likelihood: Likelihood,
        output_basis: Tensor,
        sample_weight: np.ndarray | None = None,
        initial_params: Tensor | None = None,
        stop_early: Callable[[Tensor], bool] | None = None,
    ) -> np.ndarray:
        """Fit; set ``n_iter_``, ``n_fisher_``, ``loss_``, ``gradient_norm_``.

        ``sample_weight`` is ``None`` or positive weights checked by :func:`check_sample_weight`
        (zero-weight rows already removed).

        Returns
        -------
        weights : ndarray of shape (C, D)
            Coefficients of each output, followed by its intercept when one is fitted.
        """
        inverse_C, first_step = self._check_hyperparameters()
        # a copy: the user's array may be read-only (a pandas Series), which torch warns about
        weights = None if sample_weight is None else torch.tensor(sample_weight, device="cpu")
        objective = PenalisedGLMObjective(
            self._design(X),
            targets,
            likelihood,
            output_basis,
            inverse_C,
            self.fit_intercept,
            sample_weight=weights,
        )
        if initial_params is None:
            initial_params = torch.zeros(objective.n_params, dtype=DTYPE, device="cpu")
        result = minimise(
            objective, initial_params, self.solver, first_step, self.tol, self.max_iter, stop_early
        )
        self._warn_on(result)
        self.n_iter_ = result.n_iter
        self.n_fisher_ = result.n_fisher
        self.loss_ = result.loss
        self.gradient_norm_ = result.gradient_norm
        self._pending_covariance = (objective, result.params, result.outputs)
        self.__dict__.pop("_covariance", None)
        weights = objective.output_weights(result.params).detach()
        return weights.T.numpy()

    @property
    def covariance_(self) -> np.ndarray:
        """Covariance of the fitted weights, ``(S · F(Θ̂))⁻¹``; see :func:`weight_covariance`.

        Computed on first access and cached.
        """
        if "_covariance" not in self.__dict__:
            check_is_fitted(self)
            self._covariance = weight_covariance(*self._pending_covariance)
            del self._pending_covariance
        return self._covariance

    def _weight_standard_errors(self) -> np.ndarray:
        """Square roots of the diagonal of ``covariance_``, shape ``(R, D)``.

        Row ``r`` holds the standard errors of ``coef_[r]`` followed, when an intercept was
        fitted, by that of ``intercept_[r]`` (``R = 1`` for a 1-d ``coef_``).
        """
        covariance = self.covariance_
        n_rows = np.atleast_2d(self.coef_).shape[0]
        return standard_errors(covariance, (n_rows, len(covariance) // n_rows))

    def __getstate__(self) -> dict:
        """Compute the pending covariance first: a pickle holds it, not the training data."""
        if "_pending_covariance" in self.__dict__:
            _ = self.covariance_  # computes and caches it
        return super().__getstate__()

    def _warn_on(self, result: SolverResult) -> None:
        summary = (
            f"{type(self).__name__}(solver={self.solver!r}): gradient norm "
            f"{result.stopping_norm:.3g} > tol={self.tol:g} after {result.n_iter} iterations"
        )
        if result.status == "max_iter":
            warn_at_caller(f"{summary}; increase max_iter", ConvergenceWarning)
        elif result.status == "line_search_failed":
            warn_at_caller(
                f"{summary}: step halving found no decrease of the penalised loss; stopping",
                ConvergenceWarning,
            )


def weight_covariance(
    objective: PenalisedGLMObjective, params: Tensor, outputs: Tensor | None = None
) -> np.ndarray:
    """Covariance of the weights, ``(S · F(Θ̂))⁻¹`` mapped to ``(C, D)`` row-major order.

    ``S`` is the objective's total sample weight (``N`` without weights), so ``S · F`` is the
    summed penalised Fisher ``Σₙ sₙ Fₙ + penalty``.

    ``outputs`` are the outputs at ``params`` (computed unless given). The inverse comes from
    a Cholesky factor, or :func:`natgrad.linalg.damped_solve` (eigenvalue clamping) when the
    Fisher is numerically singular.

    Warns with a ``RuntimeWarning`` where the Fisher is singular to working precision (see
    ``MIN_RECIPROCAL_CONDITION``).

    Returns
    -------
    ndarray of shape (C·D, C·D)
    """
    summed_fisher = objective.total_weight * objective.fisher(params, outputs)
    reciprocal_condition = unit_diagonal_reciprocal_condition(summed_fisher.numpy())
    if not reciprocal_condition >= MIN_RECIPROCAL_CONDITION:
        warn_at_caller(
            "the Fisher at the fitted weights is singular to working precision (reciprocal "
            f"condition number {reciprocal_condition:.2g} at unit diagonal): a column is "
            "constant, all zero or a combination of others, or the fit diverges. Standard "
            "errors along its null space are not meaningful (set by eigenvalue clamping); "
            "drop such columns or use penalty='l2'",
            RuntimeWarning,
        )
    factor, info = torch.linalg.cholesky_ex(summed_fisher)
    param_covariance = torch.cholesky_inverse(factor) if int(info) == 0 else None
    if param_covariance is None or not bool(torch.isfinite(param_covariance).all()):
        eye = torch.eye(objective.n_params, dtype=summed_fisher.dtype, device="cpu")
        param_covariance = damped_solve(summed_fisher, eye, damping=0.0)
    param_covariance = 0.5 * (param_covariance + param_covariance.T)
    n_rows, n_columns = objective.n_rows, objective.n_columns
    by_row = param_covariance.reshape(n_rows, n_columns, n_rows, n_columns)
    basis_t = objective.output_basis.T
    # [c, i, d, j] = Σ_pq B[c, p] S[i, p, j, q] B[d, q], as two matmuls
    by_output = ((by_row @ basis_t).permute(0, 2, 3, 1) @ basis_t).permute(3, 0, 2, 1)
    size = n_rows * basis_t.shape[1]
    return by_output.reshape(size, size).numpy()


def unit_diagonal_reciprocal_condition(matrix: np.ndarray) -> float:
    """LAPACK's estimate of ``1 / κ₁`` of a symmetric ``matrix`` ``(P, P)`` scaled to unit
    diagonal; ``0.0`` where it is not positive definite to working precision."""
    diagonal = matrix.diagonal()
    if not (diagonal.min() > 0.0 and np.isfinite(diagonal).all()):
        return 0.0
    scale = 1.0 / np.sqrt(diagonal)
    unit_diagonal = matrix * scale[:, None] * scale
    lower, info = lapack.dpotrf(unit_diagonal, lower=1, clean=1)
    if info != 0:
        return 0.0
    one_norm = float(np.abs(unit_diagonal).sum(0).max())
    reciprocal_condition, info = lapack.dpocon(lower, one_norm, uplo="L")
    return float(reciprocal_condition) if info == 0 else 0.0


def check_sample_weight(sample_weight: object, n_samples: int) -> np.ndarray | None:
    """``sample_weight`` as a float64 array of shape ``(n_samples,)``, or ``None`` for ``None``.

    A scalar weighs every row alike. Raises ``ValueError`` naming the offending value for a
    wrong shape, a non-finite or negative weight, or weights that are all zero; ``TypeError``
    for non-numeric weights.
    """
    if sample_weight is None:
        return None
    try:
        weights = np.asarray(sample_weight, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"sample_weight must be numeric, got {sample_weight!r}") from error
    if weights.ndim == 0:
        weights = np.full(n_samples, float(weights))
    if weights.shape != (n_samples,):
        raise ValueError(
            f"sample_weight must have shape ({n_samples},) like y, got shape {weights.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(weights) | (weights < 0))
    if len(bad):
        raise ValueError(
            "sample_weight must be finite and non-negative, got "
            f"sample_weight[{bad[0]}] = {float(weights[bad[0]])!r}"
        )
    if not weights.any():
        raise ValueError(f"sample_weight must not be all zero, got {n_samples} zero weights")
    return weights


def drop_zero_weights(
    X: ArrayOrSparse,
    y: np.ndarray,
    sample_weight: np.ndarray | None,
) -> tuple[ArrayOrSparse, np.ndarray, np.ndarray | None]:
    """``X`` (dense or sparse), ``y`` and weights without the rows of weight zero.

    All three are returned unchanged where no weight is zero.

    A zero frequency weight is an absent row; removing it keeps the fit identical to one on the
    data without it, also for the classes seen and the separation check.
    """
    if sample_weight is None or sample_weight.all():
        return X, y, sample_weight
    kept = sample_weight > 0
    return X[kept], y[kept], sample_weight[kept]


def standard_errors(covariance: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Square roots of the diagonal of ``covariance``, reshaped to ``shape`` ``(C, D)``."""
    return np.sqrt(np.clip(np.diag(covariance), 0.0, None)).reshape(shape)


def _is_real(value: object) -> bool:
    """A real number (:func:`natgrad._validation.is_real`) that is not NaN."""
    return is_real(value) and value == value
