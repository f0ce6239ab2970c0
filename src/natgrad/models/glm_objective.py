"""The penalised negative log-likelihood of a generalised linear model, its gradient and Fisher.

A GLM here has design matrix ``X̃`` of shape ``(N, D)`` (the features, plus a trailing column of
ones when an intercept is fitted) and parameters ``Θ`` of shape ``(D, P)``. Its outputs, the
natural parameters of the likelihood, are ``f = X̃ Θ Bᵀ`` of shape ``(N, C)``, where the fixed
``(C, P)`` matrix ``B`` has orthonormal columns: the identity for the scalar likelihoods
(Bernoulli, Poisson; ``C = P = 1``) and a basis of the sum-to-zero vectors of ``R^K`` for the
softmax (``C = K``, ``P = K − 1``), which removes the softmax's invariance to adding the same
number to every logit (see :func:`sum_to_zero_basis`).

The objective is the **mean** over data points, weighted by sample weights ``sₙ >= 0`` (all
one unless given) with total ``S = Σₙ sₙ`` (``S = N`` without weights):

    L(Θ) = (1/S) Σₙ sₙ nll(fₙ, yₙ) + (1 / (2 C_reg S)) ‖Θ_coef‖²

(``Θ_coef``: the rows of ``Θ`` that multiply features, never the intercept), i.e. scikit-learn's
``Σₙ sₙ nll + ½‖w‖² / C`` divided by ``S``: integer weights are repeated rows. Its Fisher, also a
weighted mean over data points, is

    F(Θ) = (1/S) Σₙ sₙ (x̃ₙ x̃ₙᵀ) ⊗ (Bᵀ ∇²A(fₙ) B) + (1 / (C_reg S)) · diag(penalty mask) ⊗ I_P,

with ``∇²A(fₙ)`` the per-sample Fisher of the outputs from
:meth:`natgrad.curvature.likelihoods.Likelihood.natural_hessian`. For these canonical-link
likelihoods it equals the Hessian of ``L``, so a natural-gradient step of size one is a Newton
step (Fisher scoring, IRLS). Parameters are flattened row-major: index ``i · P + p`` holds
``Θ[i, p]``.

Everything is in closed form, without automatic differentiation: the gradient is
``X̃ᵀ diag(s / S) (∇A(f) − T(y)) B`` (plus the penalty's) from
:meth:`~natgrad.curvature.likelihoods.Likelihood.nll_gradient`, and the solvers evaluate the
loss, gradient and Fisher of one :class:`GLMPoint` from its outputs ``f``, computed once.
For the Bernoulli and Poisson likelihoods the loss is evaluated together with the per-sample
means ``∇A(f)`` and the roots of the variances ``∇²A(f)`` (one exponential per sample), which
the point keeps for its gradient and Fisher.

:meth:`PenalisedGLMObjective.low_precision_fisher` forms the data Gram of a scalar likelihood in
float32, from a copy of the design with unit-norm columns, for the solvers' Newton
**direction** only: its error is relative to the column scales, so badly scaled columns do not
hurt it, nearly collinear ones do (the solver checks the condition and falls back to
:meth:`~PenalisedGLMObjective.point_fisher`, the float64 Fisher). Gradients, losses and the
standard errors' Fisher are float64.

A **sparse design** (:class:`SparseDesign`, ``X`` as a SciPy CSR matrix) takes the place of the
dense tensor where the estimators are given sparse ``X``: products with ``X̃`` and ``X̃ᵀ`` are
sparse matrix products, the Fisher's data Gram is formed by a sparse product and only then made
dense ``(D, D)``, and the intercept's row and column come from column sums; ``X`` is never made
dense. Such an objective has no float32 Gram (:meth:`~PenalisedGLMObjective.low_precision_fisher`
returns ``None``), so the solvers use the float64 Fisher throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.linalg import blas
from torch import Tensor

from natgrad.curvature.likelihoods import BernoulliLikelihood, Likelihood, PoissonLikelihood

GRAM_ROW_MULTIPLE = 4
"""The float32 design's rows are padded with zeros to a multiple of this.

NumPy forms ``S Sᵀ`` with BLAS ``ssyrk``, whose OpenBLAS kernels handle some row counts poorly:
for ``N = 10⁴`` samples, 21 rows took 208 µs and the same rows padded to 24 took 153 µs (7: 130
→ 40 µs, 15: 212 → 96 µs); row counts one more than a multiple of 8 lose 2–17 % instead
(9: 67 → 78 µs, 65: 837 → 860 µs). Padding never changes the Gram's leading block."""


def sum_to_zero_basis(n_classes: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """An orthonormal basis of ``{v ∈ R^K : Σ v = 0}``, shape ``(K, K − 1)``.

    Built from the QR factorisation of the centred identity; the columns are orthonormal, so
    ``‖Θ Bᵀ‖ = ‖Θ‖`` and an l2 penalty on the sum-to-zero logit weights is an l2 penalty on ``Θ``.
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    centred = torch.eye(n_classes, dtype=dtype, device="cpu") - 1.0 / n_classes
    basis, _ = torch.linalg.qr(centred[:, : n_classes - 1])
    return basis.contiguous()


def mean_log_factorial(counts: np.ndarray, mean_weights: np.ndarray | None = None) -> float:
    """``mean(log Γ(y + 1))`` over ``counts`` (``log y!`` for integer counts), a float.

    ``mean_weights`` (same length, summing to one) make it the weighted mean
    ``Σₙ wₙ log Γ(yₙ + 1)``; ``None`` is the plain mean. Small integer counts (at most the
    number of counts), the usual case, index a table of cumulative ``log k`` (several times
    faster than ``lgamma``); others go through ``lgamma``.
    """
    values = counts.reshape(-1)
    if len(values) == 0:
        return 0.0
    largest = float(values.max())
    if values.min() >= 0 and largest <= len(values) and np.array_equal(values, np.floor(values)):
        log_factorials = np.zeros(int(largest) + 1)
        np.cumsum(np.log(np.arange(1, int(largest) + 1)), out=log_factorials[1:])
        terms = log_factorials[values.astype(np.int64)]
    else:
        terms = torch.lgamma(torch.from_numpy(values) + 1.0).numpy()
    return float(terms.mean() if mean_weights is None else terms @ mean_weights)


class SparseDesign:
    """The design ``X̃ = [X, 1]`` (ones column only with an intercept) of a sparse ``X``.

    Holds ``X`` ``(N, F)`` and ``Xᵀ`` ``(F, N)`` as CSR float64 matrices (sorted, without
    duplicate entries); the column of ones is implicit. No method forms a dense ``(N, F)`` array.

    Parameters
    ----------
    features : scipy.sparse matrix or array of shape (N, F)
        Any SciPy sparse format; copied, never modified.
    fit_intercept : bool
        Whether ``X̃`` has the trailing column of ones.

    Attributes
    ----------
    shape : tuple of int
        ``(N, D)`` with ``D = F + fit_intercept``.
    dtype : torch.dtype
        ``torch.float64``.
    """

    dtype = torch.float64

    def __init__(self, features: sparse.sparray | sparse.spmatrix, fit_intercept: bool) -> None:
        matrix = sparse.csr_matrix(features, dtype=np.float64, copy=True)
        matrix.sum_duplicates()  # also sorts the indices
        self.features = matrix
        self.features_t = matrix.T.tocsr()
        self.fit_intercept = bool(fit_intercept)
        self.n_features = matrix.shape[1]
        self.shape = (matrix.shape[0], self.n_features + int(self.fit_intercept))
        self._entry_rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))

    def times(self, weights: np.ndarray) -> np.ndarray:
        """``X̃ W`` for ``W`` of shape ``(D,)`` or ``(D, C)``; shape ``(N,)`` or ``(N, C)``."""
        product = np.asarray(self.features @ weights[: self.n_features])
        if self.fit_intercept:
            product += weights[self.n_features]
        return product

    def transpose_times(self, values: np.ndarray) -> np.ndarray:
        """``X̃ᵀ R`` for ``R`` of shape ``(N,)`` or ``(N, C)``; shape ``(D,)`` or ``(D, C)``."""
        product = np.asarray(self.features_t @ values)
        if not self.fit_intercept:
            return product
        return np.concatenate([product, values.sum(0, keepdims=True)])

    def gram(self, values: np.ndarray) -> np.ndarray:
        """``X̃ᵀ diag(values) X̃`` for ``values`` of shape ``(N,)`` (either sign), ``(D, D)``.

        ``Xᵀ (diag(values) X)`` is a sparse product (``X`` scaled in its stored entries),
        made dense only as the ``(F, F)`` result and symmetrised; the intercept's column is
        ``Xᵀ values`` and its corner ``Σ values``.
        """
        matrix = self.features
        scaled = sparse.csr_matrix(
            (matrix.data * values[self._entry_rows], matrix.indices, matrix.indptr),
            shape=matrix.shape,
        )
        with np.errstate(invalid="ignore", over="ignore"):
            block = (self.features_t @ scaled).toarray()
            gram = np.empty(self.shape[1:] * 2)
            gram[: self.n_features, : self.n_features] = 0.5 * (block + block.T)
            if self.fit_intercept:
                column = self.features_t @ values
                gram[: self.n_features, -1] = column
                gram[-1, : self.n_features] = column
                gram[-1, -1] = values.sum()
        return gram

    def matmul(self, weights: Tensor) -> Tensor:
        """``X̃ W`` for a tensor ``W`` ``(D, C)``, differentiable in ``W``; shape ``(N, C)``."""
        return _SparseDesignProduct.apply(weights, self)


class _SparseDesignProduct(torch.autograd.Function):
    """``W ↦ X̃ W`` for a :class:`SparseDesign`, with the backward ``G ↦ X̃ᵀ G``."""

    @staticmethod
    def forward(weights: Tensor, design: SparseDesign) -> Tensor:
        return torch.from_numpy(design.times(weights.detach().numpy()))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.design = inputs[1]

    @staticmethod
    def backward(ctx, output_gradient: Tensor) -> tuple[Tensor, None]:
        values = output_gradient.detach().numpy()
        return torch.from_numpy(ctx.design.transpose_times(values)), None


@dataclass
class GLMPoint:
    """Parameters of a GLM with their outputs and mean penalised loss.

    Attributes
    ----------
    params : Tensor of shape (D·P,)
    outputs : Tensor of shape (N, C)
        ``f = X̃ Θ Bᵀ`` at ``params``.
    loss : float
        ``L(Θ)``; ``inf`` where it is not finite.
    means, variance_roots : ndarray of shape (N,), optional
        ``∇A(fₙ)`` and ``√∇²A(fₙ)`` of a Bernoulli or Poisson likelihood, computed with the
        loss (``None`` for other likelihoods); unused where the loss is not finite.
    """

    params: Tensor
    outputs: Tensor
    loss: float
    means: np.ndarray | None = None
    variance_roots: np.ndarray | None = None


class PenalisedGLMObjective:
    """(Weighted) mean penalised negative log-likelihood of a GLM, with its gradient and Fisher.

    Parameters
    ----------
    design : Tensor of shape (N, D), or SparseDesign
        Features, with a trailing column of ones when ``fit_intercept`` (a
        :class:`SparseDesign` holds its ones column implicitly).
    targets : Tensor of shape (N,)
        Targets in the form ``likelihood.nll`` accepts (class indices, 0/1 labels, counts).
    likelihood : Likelihood
        The likelihood whose natural parameters the outputs are.
    output_basis : Tensor of shape (C, P)
        Orthonormal columns mapping the ``P`` parameter columns to the ``C`` outputs.
    inverse_C : float
        ``1 / C`` of the l2 penalty ``½‖w‖² / C`` on the summed loss; ``0`` for no penalty.
    fit_intercept : bool
        Whether the last column of ``design`` is the (unpenalised) intercept column.
    sample_weight : Tensor of shape (N,), optional
        Frequency weights ``sₙ >= 0`` with a positive sum ``S``; ``None`` weighs every row
        one. Equal weights only set ``S`` (the data terms are then plain means, computed
        without weights).

    Attributes
    ----------
    total_weight : float
        ``S = Σₙ sₙ`` (``N`` without weights): the mean's denominator, by which the penalty
        and the summed Fisher ``S · F`` of the standard errors scale.
    """

    def __init__(
        self,
        design: Tensor | SparseDesign,
        targets: Tensor,
        likelihood: Likelihood,
        output_basis: Tensor,
        inverse_C: float,
        fit_intercept: bool,
        sample_weight: Tensor | None = None,
    ) -> None:
        self.design = design
        self._sparse_design = design if isinstance(design, SparseDesign) else None
        if self._sparse_design is None:
            # X̃ᵀ held C-contiguous (no copy when ``design`` is already the transpose of such
            # an array, as the estimators pass it): the Gram ``(X̃ᵀ ⊙ w) X̃`` and ``X̃ᵀ r`` then
            # run on contiguous rows; X̃ itself is its transposed view, which BLAS takes as is.
            self._design_t_array = np.ascontiguousarray(design.detach().cpu().numpy().T)
            self._design_array = self._design_t_array.T
        self.targets = targets
        self.likelihood = likelihood
        self.output_basis = output_basis.contiguous()
        self.n_samples, self.n_rows = design.shape
        self.n_columns = output_basis.shape[1]
        self.inverse_C = inverse_C
        self.total_weight, self._mean_weights = self._check_sample_weight(sample_weight)
        penalised_rows = torch.ones(self.n_rows, dtype=design.dtype, device="cpu")
        if fit_intercept:
            penalised_rows[-1] = 0.0
        self.penalty_diagonal = (inverse_C / self.total_weight) * penalised_rows.repeat_interleave(
            self.n_columns
        )
        # NumPy views for the closed-form evaluations: few, cheap calls per solver iteration
        self._basis_array = self.output_basis.numpy()
        self._penalty_array = self.penalty_diagonal.numpy()
        # Bernoulli / Poisson: targets as an (N,) array, and y / N (or y ⊙ s / S) for the y·f term
        self._scalar_family = None
        if isinstance(likelihood, BernoulliLikelihood | PoissonLikelihood) and self.n_columns == 1:
            self._scalar_family = likelihood.name
            self._target_values = targets.detach().reshape(-1).to(design.dtype).numpy()
            self._scaled_targets = self._mean_terms(self._target_values)
            self._mean_target = float(self._scaled_targets.sum())
        # intercept-only parameters give every sample the same output if the column is ones
        self._ones_intercept = fit_intercept and (
            self._sparse_design is not None or bool((self._design_t_array[-1] == 1.0).all())
        )
        self._mean_log_factorial = 0.0
        if isinstance(likelihood, PoissonLikelihood):
            # nll = exp f − y f + log y!: the last term does not depend on Θ, so its mean is
            # computed once here instead of at every loss evaluation (lgamma is costly)
            counts = targets.detach().reshape(-1).to(design.dtype).numpy()
            self._mean_log_factorial = mean_log_factorial(counts, self._mean_weights)
        self._unit_design_t: np.ndarray | None = None  # float32 copy, built on first use
        self._column_norms: np.ndarray | None = None
        self._stopping_scale = self._small_column_scale()

    def _check_sample_weight(self, sample_weight: Tensor | None) -> tuple[float, np.ndarray | None]:
        """``(S, s / S)``; the second is ``None`` without weights or when they are all equal."""
        if sample_weight is None:
            return float(self.n_samples), None
        values = sample_weight.detach().to(self.design.dtype).cpu().numpy()
        if values.shape != (self.n_samples,):
            raise ValueError(
                f"sample_weight must have shape ({self.n_samples},), got {values.shape}"
            )
        total = float(values.sum())
        if not (np.isfinite(values).all() and values.min() >= 0.0 and total > 0.0):
            raise ValueError(
                "sample_weight must be finite and non-negative with a positive sum, got "
                f"minimum {float(values.min())!r}, sum {total!r}"
            )
        if values.min() == values.max():
            return total, None
        return total, values / total

    def _small_column_scale(self) -> np.ndarray | None:
        """``1 / rmsⱼ`` for the columns of ``X̃`` whose (weighted) root mean square is in
        ``(0, 1)``, else ``1``, repeated over the ``P`` parameter columns, shape ``(D·P,)``;
        ``None`` where no column has such a scale."""
        mean_weights = self._mean_weights
        if mean_weights is None:
            mean_weights = np.full(self.n_samples, 1.0 / self.n_samples)
        if self._sparse_design is not None:
            design_t = self._sparse_design.features_t
            mean_squares = np.asarray(design_t.multiply(design_t) @ mean_weights).reshape(-1)
            if self._sparse_design.fit_intercept:
                mean_squares = np.append(mean_squares, 1.0)
        else:
            design_t = self._design_t_array
            mean_squares = np.einsum("ij,ij,j->i", design_t, design_t, mean_weights)
        small = (mean_squares > 0.0) & (mean_squares < 1.0)
        if not small.any():
            return None
        scale = np.where(small, 1.0 / np.sqrt(np.where(small, mean_squares, 1.0)), 1.0)
        return np.repeat(scale, self.n_columns)

    @property
    def stopping_scale(self) -> Tensor | None:
        """The factors of :meth:`stopping_norm`, shape ``(D·P,)``; ``None`` where all are one."""
        if self._stopping_scale is None:
            return None
        return torch.from_numpy(self._stopping_scale)

    def stopping_norm(self, gradient: Tensor) -> float:
        """``‖g‖₂`` with ``gⱼ`` divided by the root mean square of its column of ``X̃`` where
        that is below one: the gradient norm the fit would have with such columns rescaled to
        a root mean square of one, at least ``‖g‖₂``; the same whatever units such columns are
        measured in."""
        values = gradient.detach().numpy()
        if self._stopping_scale is not None:
            values = values * self._stopping_scale
        return float(np.linalg.norm(values))

    @property
    def n_params(self) -> int:
        """Number of free parameters ``D · P``."""
        return self.n_rows * self.n_columns

    def output_weights(self, params: Tensor) -> Tensor:
        """``W = Θ Bᵀ``, shape ``(D, C)``: the weights of each output, for flat ``params``."""
        return params.reshape(self.n_rows, self.n_columns) @ self.output_basis.T

    def outputs(self, params: Tensor) -> Tensor:
        """Natural parameters ``f = X̃ Θ Bᵀ``, shape ``(N, C)``, for flat ``params`` ``(D·P,)``."""
        if self._sparse_design is not None:
            return self._sparse_design.matmul(self.output_weights(params))
        return self.design @ self.output_weights(params)

    def outputs_no_grad(self, params: Tensor) -> Tensor:
        """:meth:`outputs` without automatic differentiation.

        The products with the design go through NumPy's BLAS: for these tall, skinny shapes it
        was about twice as fast as PyTorch's on the machine where the benchmark ran.
        """
        values = params.detach().numpy()
        if not values.any():  # the usual starting point
            return torch.zeros(
                self.n_samples, len(self._basis_array), dtype=params.dtype, device="cpu"
            )
        weights = values.reshape(self.n_rows, self.n_columns) @ self._basis_array.T
        with np.errstate(invalid="ignore", over="ignore"):  # inf loss: the result is not used
            return torch.from_numpy(self._design_times(weights))

    def _design_times(self, weights: np.ndarray) -> np.ndarray:
        """``X̃ W`` for ``W`` of shape ``(D, C)``, shape ``(N, C)`` (dense or sparse design)."""
        if self._sparse_design is None:
            return self._design_array @ weights
        return self._sparse_design.times(weights)

    def _design_t_times(self, values: np.ndarray) -> np.ndarray:
        """``X̃ᵀ R`` for ``R`` of shape ``(N,)`` or ``(N, C)`` (dense or sparse design)."""
        if self._sparse_design is None:
            return self._design_t_array @ values
        return self._sparse_design.transpose_times(values)

    def per_sample_nll(self, params: Tensor) -> Tensor:
        """Negative log-likelihood of each data point, shape ``(N,)``."""
        return self.likelihood.nll(self.outputs(params), self.targets)

    def penalty(self, params: Tensor) -> Tensor:
        """``(1 / (2 C S)) ‖Θ_coef‖²``, a scalar."""
        return 0.5 * (self.penalty_diagonal * params.square()).sum()

    # -- closed-form evaluation at a point ------------------------------------------------------
    def point(self, params: Tensor, outputs: Tensor | None = None) -> GLMPoint:
        """``params`` with their outputs (computed unless given) and loss ``L(Θ)``.

        For the Bernoulli and Poisson likelihoods also the per-sample means and variance roots.
        """
        means = roots = None
        values = params.detach().numpy()
        with torch.no_grad():
            common = None if outputs is not None else self._common_output(values)
            if common is not None:  # only the intercept is non-zero: the usual start
                outputs = torch.full((self.n_samples, 1), common, dtype=params.dtype, device="cpu")
                loss, means, roots = self._common_scalar_terms(common)
            else:
                if outputs is None:
                    outputs = self.outputs_no_grad(params)
                if self._scalar_family is None:
                    loss = float(self._mean_nll(outputs))
                else:
                    loss, means, roots = self._scalar_terms(outputs[:, 0].detach().numpy())
        if self.inverse_C:
            loss += 0.5 * float(self._penalty_array @ (values * values))
        loss = loss if math.isfinite(loss) else math.inf
        return GLMPoint(params, outputs, loss, means, roots)

    def _common_output(self, values: np.ndarray) -> float | None:
        """The output every sample shares when no feature weight is non-zero, else ``None``.

        Only for the Bernoulli and Poisson likelihoods (``None`` otherwise), and with a non-zero
        intercept only when the intercept column is all ones.
        """
        if self._scalar_family is None:
            return None
        if not values.any():
            return 0.0
        if not self._ones_intercept or values[:-1].any():
            return None
        return float(values[-1] * self._basis_array[0, 0])

    def _mean_terms(self, values: np.ndarray) -> np.ndarray:
        """``values / N``, or ``values ⊙ s / S`` with sample weights, shape ``(N,)``."""
        if self._mean_weights is None:
            return values / self.n_samples
        return values * self._mean_weights

    def _mean(self, values: np.ndarray) -> float:
        """``(1/S) Σₙ sₙ valuesₙ`` for ``values`` of shape ``(N,)``."""
        if self._mean_weights is None:
            return float(values.sum()) / self.n_samples
        return float(self._mean_weights @ values)

    def _scalar_terms(self, outputs: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """Mean nll, means ``∇A(f)`` and variance roots ``√∇²A(f)`` for outputs ``(N,)``
        (Bernoulli or Poisson), in a few passes that share one exponential.

        Bernoulli, with ``h = exp(−|f| / 2)`` and ``e = h²``: ``nll = log(1 + e) + max(f, 0)
        − y f`` (``log`` of an argument in ``[1, 2]``: absolute error below ``eps``; the mean
        of ``max(f, 0)`` is ``(mean f + mean |f|) / 2``), ``σ(|f|) = 1 / (1 + e)``,
        ``σ(−|f|) = e σ(|f|)``, the mean ``σ(f)`` is one of them by the sign of ``f`` and the
        variance root ``√(σ(f) σ(−f)) = h σ(|f|)``. Poisson, with ``h = exp(f / 2)``:
        ``nll = h² − y f + log y!``, mean ``h²`` and variance root ``h``.
        """
        with np.errstate(invalid="ignore", over="ignore"):
            if self._scalar_family == "poisson":
                roots = torch.exp(torch.from_numpy(outputs) * 0.5).numpy()
                rates = roots * roots
                loss = self._mean(rates) - float(self._scaled_targets @ outputs)
                return loss + self._mean_log_factorial, rates, roots
            magnitudes = np.abs(outputs)
            roots = torch.exp(torch.from_numpy(magnitudes) * -0.5).numpy()  # h, then h σ(|f|)
            smaller = roots * roots  # e, then σ(−|f|)
            denominators = smaller + 1.0
            log_terms = torch.log(torch.from_numpy(denominators)).numpy()
            larger = np.reciprocal(denominators, out=denominators)  # σ(|f|)
            smaller *= larger
            roots *= larger
            loss = (
                self._mean(log_terms)
                + 0.5 * (self._mean(outputs) + self._mean(magnitudes))
                - float(self._scaled_targets @ outputs)
            )
            return loss, np.where(outputs >= 0.0, larger, smaller), roots

    def _common_scalar_terms(self, output: float) -> tuple[float, np.ndarray, np.ndarray]:
        """:meth:`_scalar_terms` for outputs all equal to ``output``, from one evaluation."""
        with np.errstate(over="ignore"):
            if self._scalar_family == "poisson":
                root = float(np.exp(0.5 * output))
                mean = root * root
                loss = mean - output * self._mean_target + self._mean_log_factorial
            else:
                root = math.exp(-0.5 * abs(output))
                damped = root * root
                larger = 1.0 / (1.0 + damped)
                loss = math.log1p(damped) + max(output, 0.0) - output * self._mean_target
                mean = larger if output >= 0.0 else damped * larger
                root *= larger
        means = np.full(self.n_samples, mean)
        return loss, means, np.full(self.n_samples, root)

    def _mean_nll(self, outputs: Tensor) -> Tensor:
        """``(1/S) Σₙ sₙ nll(fₙ, yₙ)`` for outputs ``(N, C)`` through ``likelihood.nll``."""
        terms = self.likelihood.nll(outputs, self.targets)
        if self._mean_weights is None:
            return terms.mean()
        return torch.from_numpy(self._mean_weights) @ terms

    def gradient(self, point: GLMPoint) -> Tensor:
        """``∇L = X̃ᵀ diag(s / S) (∇A(f) − T(y)) B + penalty``, flat, shape ``(D·P,)``."""
        with np.errstate(invalid="ignore", over="ignore"):
            if point.means is not None:  # scalar likelihood: B = [[b]]
                residual = point.means - self._target_values
                scale = float(self._basis_array[0, 0])
                if self._mean_weights is None:
                    scale /= self.n_samples
                else:
                    residual *= self._mean_weights
                gradient = self._design_t_times(residual) * scale
            else:
                residual = self.likelihood.nll_gradient(point.outputs, self.targets).numpy()
                residual = residual * (
                    1.0 / self.n_samples
                    if self._mean_weights is None
                    else self._mean_weights[:, None]
                )
                gradient = (self._design_t_times(residual) @ self._basis_array).reshape(-1)
        if self.inverse_C:
            gradient += self._penalty_array * point.params.detach().numpy()
        return torch.from_numpy(gradient)

    def loss_and_gradient(self, params: Tensor) -> tuple[float, Tensor]:
        """``L(Θ)`` and its gradient ``∇L``, shape ``(D·P,)``.

        Where the loss is not finite it is reported as ``inf`` and the gradient is not used.
        """
        point = self.point(params.detach())
        return point.loss, self.gradient(point)

    def fisher(self, params: Tensor, outputs: Tensor | None = None) -> Tensor:
        """The mean penalised Fisher ``F(Θ)`` above, shape ``(D·P, D·P)``, float64.

        ``outputs`` (``f`` at ``params``) are computed unless given.
        """
        with torch.no_grad():
            if outputs is None:
                outputs = self.outputs_no_grad(params)
            if self.n_columns == 1:
                roots = self.likelihood.natural_hessian_sqrt(outputs)[:, 0, 0].numpy()
                fisher = self._scalar_data_gram(roots)
            else:
                basis = self.output_basis
                output_fisher = self.likelihood.natural_hessian(outputs)
                fisher = self._data_fisher(basis.T @ output_fisher @ basis).numpy()
        fisher[np.diag_indices_from(fisher)] += self._penalty_array
        return torch.from_numpy(fisher)

    def point_fisher(self, point: GLMPoint) -> Tensor:
        """:meth:`fisher` at ``point``, from its cached variance roots where it has them."""
        if point.variance_roots is None:
            return self.fisher(point.params, point.outputs)
        fisher = self._scalar_data_gram(point.variance_roots)
        fisher[np.diag_indices_from(fisher)] += self._penalty_array
        return torch.from_numpy(fisher)

    def _weighted_roots(self, roots: np.ndarray) -> tuple[np.ndarray, float]:
        """``(r, k)`` with ``X̃ᵀ diag(rₙ²) X̃ · k`` the data Fisher of a scalar likelihood.

        ``r`` are the variance roots ``√∇²A(f)`` (times ``√(s / S)`` with sample weights) and
        ``k = b² / N`` (``b²`` with weights), ``b`` the 1 × 1 output basis.
        """
        scale = float(self._basis_array[0, 0]) ** 2
        if self._mean_weights is None:
            return roots, scale / self.n_samples
        return roots * np.sqrt(self._mean_weights), scale

    def _scalar_data_gram(self, roots: np.ndarray) -> np.ndarray:
        """The data part of :meth:`fisher` for a scalar likelihood with variance roots ``roots``
        ``(N,)``, float64, shape ``(D, D)``."""
        roots, scale = self._weighted_roots(roots)
        if self._sparse_design is not None:
            return self._sparse_design.gram(roots * roots) * scale
        if roots.min() == roots.max():  # equal outputs (the usual start): no scaled copy
            return self._gram(self._design_t_array, scale * float(roots[0]) ** 2)
        return self._gram(self._design_t_array * roots, scale)

    def low_precision_fisher(self, point: GLMPoint) -> tuple[np.ndarray, np.ndarray] | None:
        """``(M, c)`` with ``F(Θ) ≈ diag(c) M diag(c)``, the data Gram formed in float32.

        ``M = X̂ᵀ diag(ρ²) X̂ + diag(penalty / c²)`` (float64, shape ``(D, D)``), where
        ``X̂ = X̃ diag(1 / ‖X̃ columns‖)`` is held in float32 and ``ρ`` are the Fisher weights'
        roots divided by their largest, so no float32 value overflows; ``c`` (shape ``(D,)``)
        puts the column norms and that largest root back. Each entry of ``M`` has a relative
        error of about float32's ``eps`` times ``√(Mᵢᵢ Mⱼⱼ)``: a Newton direction from it is
        accurate to about ``eps₃₂ · κ`` with ``κ`` the condition number of ``M`` scaled to unit
        diagonal, independent of the columns' scales. ``None`` for other than a scalar
        likelihood's point with variance roots, a sparse design, or weights that are not finite
        or all zero.
        """
        if point.variance_roots is None or self._sparse_design is not None:
            return None
        roots, scale = self._weighted_roots(point.variance_roots)
        largest = float(roots.max())
        if not 0.0 < largest < math.inf:  # also catches NaN
            return None
        unit_design_t, column_norms = self._float32_unit_design()
        if roots.min() == largest:
            scaled = unit_design_t
        else:
            relative_roots = np.empty(len(roots), dtype=np.float32)
            np.multiply(roots, 1.0 / largest, out=relative_roots, casting="same_kind")
            scaled = np.multiply(unit_design_t, relative_roots)
        gram = (scaled @ scaled.T)[: self.n_rows, : self.n_rows].astype(np.float64)
        column_scale = (largest * math.sqrt(scale)) * column_norms
        if self.inverse_C:
            gram[np.diag_indices_from(gram)] += self._penalty_array / column_scale**2
        return gram, column_scale

    def _float32_unit_design(self) -> tuple[np.ndarray, np.ndarray]:
        """X̃ᵀ with unit-norm rows (zero rows left zero) in float32, and the norms, ``(D,)``.

        The rows are padded with zero rows to a multiple of ``GRAM_ROW_MULTIPLE``: the padded
        Gram's leading ``D × D`` block is the Gram, and it is faster to form (see there).
        """
        if self._unit_design_t is None:
            design_t = self._design_t_array
            norms = np.sqrt(np.einsum("ij,ij->i", design_t, design_t))
            norms[~(norms > 0.0)] = 1.0
            padded_rows = -(-self.n_rows // GRAM_ROW_MULTIPLE) * GRAM_ROW_MULTIPLE
            unit = np.zeros((padded_rows, self.n_samples), dtype=np.float32)
            np.multiply(
                design_t, (1.0 / norms)[:, None], out=unit[: self.n_rows], casting="same_kind"
            )
            self._unit_design_t, self._column_norms = unit, norms
        return self._unit_design_t, self._column_norms

    @staticmethod
    def _gram(scaled_design_t: np.ndarray, scale: float) -> np.ndarray:
        """``scale · S Sᵀ`` for ``S`` of shape ``(D, N)``, shape ``(D, D)``.

        A symmetric rank-``N`` update (BLAS ``dsyrk``: half the flops of a matmul) whose lower
        triangle is mirrored.
        """
        with np.errstate(invalid="ignore", over="ignore"):
            lower = blas.dsyrk(scale, scaled_design_t.T, trans=1, lower=1)  # upper part zero
            symmetric = lower + lower.T
        symmetric.flat[:: len(symmetric) + 1] = lower.diagonal()
        return symmetric

    def _scalar_data_fisher(self, weights: Tensor) -> Tensor:
        """``X̃ᵀ diag(s ⊙ w) X̃ / S`` for per-sample curvatures ``w`` of shape ``(N,)``.

        For ``w >= 0`` ``Rᵀ R / S`` with ``R = diag(√(s ⊙ w)) X̃`` (see :meth:`_gram`); for
        values of either sign one matmul.
        """
        values = weights.detach().numpy()
        scale = 1.0 / self.n_samples
        if self._mean_weights is not None:
            values, scale = values * self._mean_weights, 1.0
        if self._sparse_design is not None:
            return torch.from_numpy(self._sparse_design.gram(values) * scale)
        with np.errstate(invalid="ignore", over="ignore"):
            if values.min() >= 0.0:
                return torch.from_numpy(self._gram(self._design_t_array * np.sqrt(values), scale))
            scaled = self._design_t_array * (values * scale)
            return torch.from_numpy(scaled @ self._design_array)

    def _data_fisher(self, column_fisher: Tensor) -> Tensor:
        """``(1/S) Σₙ sₙ (x̃ₙ x̃ₙᵀ) ⊗ Gₙ`` for symmetric per-sample ``Gₙ`` of shape ``(N, P, P)``.

        Block ``(p, q)`` is ``X̃ᵀ diag(s ⊙ G[:, p, q] / S) X̃``; by symmetry only ``p <= q`` is
        formed.
        """
        size, rows = self.n_columns, self.n_rows
        fisher = torch.empty(rows, size, rows, size, dtype=self.design.dtype, device="cpu")
        for p in range(size):
            for q in range(p, size):
                block = self._scalar_data_fisher(column_fisher[:, p, q])
                fisher[:, p, :, q] = block
                fisher[:, q, :, p] = block
        return fisher.reshape(self.n_params, self.n_params)

    # -- matrix-free Fisher for the softmax ------------------------------------------------------
    def fisher_product(self, outputs: Tensor) -> Callable[[Tensor], Tensor]:
        """``v ↦ F(Θ) v`` at the point with logits ``outputs`` ``(N, K)``, never forming ``F``.

        Uses ``∇²A(f) u = p ⊙ u − p (pᵀu)`` of the softmax (``p = softmax(f)``): two products
        with ``X̃`` per call. Only for the categorical likelihood.
        """
        probs = torch.softmax(outputs, dim=-1).numpy()
        # p ⊙ s / S (sample weights folded into the left factor of ∇²A(f) u), or p / N
        if self._mean_weights is None:
            scaled_probs = probs / self.n_samples
        else:
            scaled_probs = probs * self._mean_weights[:, None]
        basis = self.output_basis.numpy()
        penalty = self.penalty_diagonal.numpy()
        shape = (self.n_rows, self.n_columns)

        def product(vector: Tensor) -> Tensor:  # in NumPy: see outputs_no_grad
            values = vector.detach().numpy()
            logit_change = self._design_times(values.reshape(shape) @ basis.T)
            weighted = scaled_probs * (logit_change - (probs * logit_change).sum(-1, keepdims=True))
            data_part = self._design_t_times(weighted) @ basis
            return torch.from_numpy(data_part.reshape(-1) + penalty * values)

        return product

    def kronecker_preconditioner(self, outputs: Tensor) -> Callable[[Tensor], Tensor]:
        """``r ↦ M⁻¹ r`` for a Kronecker approximation ``M ≈ F(Θ)`` (softmax only).

        ``M = (X̃ᵀ diag(s ⊙ t) X̃ / S) ⊗ (Σₙ sₙ Gₙ / Σₙ sₙ tₙ) + (1 / (C S)) I`` with
        ``Gₙ = Bᵀ ∇²A(fₙ) B`` and ``tₙ = tr Gₙ``: samples weigh in the feature Gram by their
        curvature, and the Kronecker product has the trace of the data Fisher. The penalty is
        applied to every row (the intercept too), so ``M`` is a Kronecker sum that two small
        eigendecompositions invert. Eigenvalues are floored at ``√eps`` times the largest.
        """
        probs = torch.softmax(outputs, dim=-1)
        traces = 1.0 - probs.square().sum(-1)  # tr ∇²A(f); equals tr Gₙ as B spans 1^⊥
        gram = self._scalar_data_fisher(traces)
        row_values, row_vectors = torch.linalg.eigh(0.5 * (gram + gram.T))
        weighted_probs = probs
        if self._mean_weights is not None:
            sample_weights = torch.from_numpy(self._mean_weights)
            weighted_probs, traces = probs * sample_weights[:, None], traces * sample_weights
        summed_hessian = torch.diag(weighted_probs.sum(0)) - weighted_probs.T @ probs
        column_values, column_vectors = torch.linalg.eigh(
            self.output_basis.T @ summed_hessian @ self.output_basis / traces.sum()
        )
        eigenvalues = row_values.clamp_min(0.0)[:, None] * column_values.clamp_min(0.0)[None, :]
        eigenvalues = eigenvalues + self.inverse_C / self.total_weight
        floor = math.sqrt(torch.finfo(eigenvalues.dtype).eps) * float(eigenvalues.max())
        inverse_values = 1.0 / eigenvalues.clamp_min(floor)

        def apply(residual: Tensor) -> Tensor:
            rotated = row_vectors.T @ residual.reshape(self.n_rows, self.n_columns) @ column_vectors
            return (row_vectors @ (rotated * inverse_values) @ column_vectors.T).reshape(-1)

        return apply
