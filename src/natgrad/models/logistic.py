"""Logistic regression (binary and multinomial) fitted by Fisher scoring."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit, softmax
from sklearn.base import ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

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
from natgrad.models.glm_objective import sum_to_zero_basis


class LogisticRegression(ClassifierMixin, GLMEstimator):
    """Logistic regression fitted by Fisher scoring (IRLS), natural-gradient or gradient descent.

    Minimises scikit-learn's objective ``Σₙ sₙ nll(yₙ | xₙ) + ½‖w‖² / C`` (the intercept is not
    penalised; sample weights ``sₙ`` default to one), internally divided by ``S = Σₙ sₙ``: the
    solvers see the mean penalised loss and the mean Fisher
    ``F = X̃ᵀ diag(s) blockdiag(∇²A(fₙ)) X̃ / S`` (plus the penalty's ``I / (C S)``), where
    ``∇²A`` is the Bernoulli (two classes) or softmax (more classes) Fisher of the logits from
    :mod:`natgrad.curvature.likelihoods`. Fisher scoring is the natural-gradient step of size
    one, ``Θ ← Θ − F⁻¹∇L``; for the canonical logit link it is Newton's method.

    **Identifiability of the multinomial model.** The softmax is unchanged when the same vector
    is added to every class's weights, so with ``K`` classes the weights are restricted to the
    sum-to-zero subspace: ``W = Θ Bᵀ`` with ``Θ`` of shape ``(D, K − 1)`` and ``B`` an
    orthonormal basis of ``{v ∈ R^K : Σ v = 0}``. The Fisher is taken over these ``(K − 1) · D``
    free parameters, where it is positive definite (whenever the features have full rank).
    Because ``B`` is orthonormal the l2 penalty is unchanged. The l2-penalised optimum of the
    ``K · D`` over-parameterised problem has coefficients summing to zero over classes anyway,
    and of its equivalent intercept vectors we report the one summing to zero, as scikit-learn
    does; so ``coef_``, ``intercept_`` and the predictions equal scikit-learn's multinomial
    fit. Without penalty they are the centred version of statsmodels' ``MNLogit``
    reference-class parameters: ``coef_[k] − coef_[0]`` is statsmodels' column ``k − 1``, and
    its standard errors follow from ``covariance_``.

    **Sample weights** are frequency weights, with scikit-learn's semantics (its
    ``LogisticRegression(C=C).fit(X, y, sample_weight=s)`` has the same optimum): weight ``k``
    equals the row repeated ``k`` times, weight ``0`` a dropped row (such rows are removed, and
    ``classes_`` are those of the remaining rows), and ``covariance_`` is
    ``(Σₙ sₙ Fₙ + penalty)⁻¹``, statsmodels' ``GLM(..., freq_weights=s)`` and, with the
    Binomial's dispersion fixed at one, equally ``GLM(..., var_weights=s)``. Fractional weights
    too count the data as ``S = Σₙ sₙ`` observations: multiplying every weight by ``c`` leaves
    an unpenalised fit unchanged and divides the standard errors by ``√c``, and with
    ``penalty="l2"`` equals multiplying ``C`` by ``c`` (as in scikit-learn). Rescale weights
    of arbitrary scale to sum to the number of observations they stand for before reading the
    standard errors (see :mod:`natgrad.models.glm_base`).

    Parameters
    ----------
    penalty : {"l2", None}, default="l2"
        ``None`` fits the maximum-likelihood estimate.
    C : float, default=1.0
        Inverse penalty strength (scikit-learn's convention); ``np.inf`` means no penalty.
    fit_intercept : bool, default=True
        Fit an unpenalised intercept per class.
    solver : {"fisher", "fisher-chord", "ngd", "gd"}, default="fisher"
        ``"fisher"``: natural-gradient step of size one (Fisher scoring); ``"fisher-chord"``:
        Fisher scoring that reuses the last Fisher's Cholesky factor while the gradient norm
        falls at least 30-fold per step (fewer ``N · D²`` Fisher evaluations, sometimes one
        more iteration; see :mod:`natgrad.models.glm_solvers`; multiclass fits, whose Fisher
        systems CG solves without a factor, are plain ``"fisher"``); ``"ngd"``: natural
        gradient with step ``learning_rate``; ``"gd"``: gradient descent with step
        ``learning_rate`` on the mean loss. Every step is safeguarded by step halving. For
        two classes and dense ``X`` the Fisher that gives the direction is formed in float32
        (an inexact Newton direction, relative error about 1e-6 × its condition number) when
        its condition estimate is at most 1e3, else in float64 (always for sparse ``X``);
        gradients, losses, the stopping test and the standard errors are float64 (see
        :mod:`natgrad.models.glm_solvers`).
    learning_rate : float, optional
        First trial step size; default 1 for ``"fisher"`` and ``"fisher-chord"`` (the only
        value they accept), 0.5 for ``"ngd"`` (which needs ``(0, 1]``) and 1 for ``"gd"``.
    tol : float, default=1e-8
        Stop when the Euclidean norm of the gradient of the mean penalised loss is ``<= tol``,
        the components of a feature with root mean square ``r < 1`` divided by ``r`` (its
        gradient in units where ``r = 1``): features in small units (1e-8, say) otherwise
        meet ``tol`` at the start, and the fit depends on their units.
    max_iter : int, default=100
        Maximum number of steps.

    Attributes
    ----------
    classes_ : ndarray of shape (K,)
    coef_ : ndarray of shape (1, n_features) for two classes, (K, n_features) otherwise
    intercept_ : ndarray of shape (1,) or (K,)
        Zeros when ``fit_intercept=False``.
    coef_bse_, intercept_bse_ : ndarrays shaped like ``coef_`` and ``intercept_``
        Standard errors: square roots of the diagonal of ``covariance_``. Unpenalised binary
        fits match statsmodels' ``Logit(...).fit().bse``. Zero for an intercept not fitted.
    covariance_ : ndarray of shape (R·D, R·D)
        Covariance of the stacked rows ``[coef_[r], intercept_[r]]`` (intercept only when
        fitted; ``R`` rows of ``coef_``): the inverse of the summed (sample-weighted)
        penalised Fisher at the fitted weights. It and the standard errors are computed on
        first access (one more Fisher, ``N · D²``), not by ``fit``; until then the estimator
        keeps a copy of the training design.
    n_iter_ : int
        Number of steps taken.
    n_fisher_ : int
        Number of Fisher systems set up (dense Fishers formed, or CG solves for the softmax);
        ``n_iter_`` for ``"fisher"`` and ``"ngd"``, fewer for ``"fisher-chord"``, 0 for ``"gd"``.
    loss_ : float
        Final mean penalised loss.
    gradient_norm_ : float
        Euclidean norm of the gradient of the mean penalised loss at the solution.
    n_features_in_ : int

    Warns
    -----
    ConvergenceWarning
        When ``max_iter`` is reached, when step halving finds no decrease, or when the classes
        are perfectly separated without a penalty (the maximum-likelihood estimate does not
        exist; the fit stops at the first separating weights). Quasi-complete separation is
        not detected: some coefficients then grow until the gradient norm reaches ``tol``, with
        very large standard errors.
    RuntimeWarning
        On first access of ``covariance_`` or the standard errors, when the Fisher at the
        fitted weights is singular to working precision (exactly collinear, constant or
        all-zero columns without a penalty): the errors along its null space are arbitrary.
    """

    def fit(
        self, X: ArrayOrSparse, y: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> LogisticRegression:
        """Fit to features ``X`` ``(N, n_features)`` and labels ``y`` ``(N,)``.

        ``X`` may be a SciPy sparse matrix or array (CSR or CSC as given, other formats
        converted to CSR); it is never made dense, and its Fisher-scoring directions use the
        float64 Fisher (see :mod:`natgrad.models.glm_base`).

        ``sample_weight`` ``(N,)`` (or a scalar): non-negative frequency weights, not all zero;
        ``None`` weighs every row one.
        """
        X, y = validate_data(self, X, y, accept_sparse=SPARSE_FORMATS, dtype=np.float64)
        if y.dtype.kind not in "biu":  # 1-d integer labels are always binary or multiclass
            check_classification_targets(y)
        weights = check_sample_weight(sample_weight, len(y))
        X, y, weights = drop_zero_weights(X, y, weights)
        self.classes_, labels = encode_labels(y)
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise ValueError(
                "LogisticRegression needs samples of at least 2 classes, "
                f"got 1 class: {self.classes_}"
            )
        if n_classes == 2:
            likelihood = get_likelihood("bernoulli")
            targets = torch.as_tensor(labels, dtype=DTYPE, device="cpu")
            basis = torch.ones(1, 1, dtype=DTYPE, device="cpu")
        else:
            likelihood = get_likelihood("categorical")
            targets = torch.as_tensor(labels, dtype=torch.long, device="cpu")
            basis = sum_to_zero_basis(n_classes, DTYPE)
        fitted = self._fit_glm(
            X,
            targets,
            likelihood,
            basis,
            sample_weight=weights,
            stop_early=self._stop_if_separated(labels),
        )
        n_features = X.shape[1]
        self.coef_ = fitted[:, :n_features]
        if self.fit_intercept:
            self.intercept_ = fitted[:, n_features]
        else:
            self.intercept_ = np.zeros(fitted.shape[0])
        return self

    def score(
        self, X: ArrayOrSparse, y: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> float:
        """Accuracy of :meth:`predict` on ``(X, y)``, weighted by ``sample_weight`` if given."""
        predictions = self.predict(X)
        weights = check_sample_weight(sample_weight, len(predictions))
        return float(accuracy_score(y, predictions, sample_weight=weights))

    @property
    def coef_bse_(self) -> np.ndarray:
        """Standard errors of ``coef_``, same shape (computed on first access)."""
        return self._weight_standard_errors()[:, : self.n_features_in_]

    @property
    def intercept_bse_(self) -> np.ndarray:
        """Standard errors of ``intercept_``, shape ``(R,)``; zeros for an intercept not fitted."""
        errors = self._weight_standard_errors()
        if errors.shape[1] > self.n_features_in_:
            return errors[:, self.n_features_in_]
        return np.zeros(errors.shape[0])

    def _stop_if_separated(self, labels: np.ndarray):
        """Early stop for an unpenalised fit once every training point is strictly separated."""
        if self.penalty is not None and np.isfinite(self.C):
            return None
        label_tensor = torch.as_tensor(labels, dtype=torch.long, device="cpu")
        signs = 2.0 * labels.astype(np.float64) - 1.0  # binary: margins are signs · logits

        def separated(logits: Tensor) -> bool:
            if logits.shape[1] == 1:
                if not float((signs * logits[:, 0].numpy()).min()) > 0.0:
                    return False
            else:
                observed = logits.gather(1, label_tensor.unsqueeze(1))
                others = logits.scatter(1, label_tensor.unsqueeze(1), -torch.inf)
                if not bool((observed[:, 0] > others.max(dim=1).values).all()):
                    return False
            warn_at_caller(
                "LogisticRegression(penalty=None): the classes are perfectly separated, so the "
                "maximum-likelihood estimate does not exist; stopping at separating weights. "
                "Use penalty='l2' for a finite optimum.",
                ConvergenceWarning,
            )
            return True

        return separated

    def decision_function(self, X: ArrayOrSparse) -> np.ndarray:
        """Logits: shape ``(N,)`` (log-odds of ``classes_[1]``) for two classes, else ``(N, K)``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, accept_sparse=SPARSE_FORMATS, dtype=np.float64)
        scores = X @ self.coef_.T + self.intercept_
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict_proba(self, X: ArrayOrSparse) -> np.ndarray:
        """Class probabilities, shape ``(N, K)``, columns in the order of ``classes_``."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            positive = expit(scores)
            return np.column_stack([1.0 - positive, positive])
        return softmax(scores, axis=1)

    def predict_log_proba(self, X: ArrayOrSparse) -> np.ndarray:
        """Logarithm of :meth:`predict_proba`, shape ``(N, K)``."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            scores = np.column_stack([np.zeros_like(scores), scores])
        return scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)

    def predict(self, X: ArrayOrSparse) -> np.ndarray:
        """Most probable class of each row, shape ``(N,)``."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            return self.classes_[(scores > 0).astype(int)]
        return self.classes_[np.argmax(scores, axis=1)]


def encode_labels(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(y, return_inverse=True)``: the sorted classes and each label's index.

    Integer labels spanning at most ``len(y)`` values are counted with ``np.bincount`` instead
    of sorted or hashed (about half the time for the usual 0/1 or 0…K−1 labels).
    """
    if y.dtype.kind not in "iu" or len(y) == 0:
        return np.unique(y, return_inverse=True)
    low, high = int(y.min()), int(y.max())
    if high - low > len(y) or high > np.iinfo(np.intp).max:
        return np.unique(y, return_inverse=True)
    offsets = y.astype(np.intp) - low  # not y - low: int8 labels -100 and 100 would overflow
    present = np.bincount(offsets, minlength=high - low + 1) > 0
    classes = (np.flatnonzero(present) + low).astype(y.dtype)
    if len(classes) == high - low + 1:  # every value in the range occurs
        return classes, offsets
    return classes, (np.cumsum(present) - 1)[offsets]
