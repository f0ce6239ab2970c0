"""The penalised negative log-likelihood of a generalised linear model, its gradient and Fisher.

A GLM here has design matrix ``X̃`` of shape ``(N, D)`` (the features, plus a trailing column of
ones when an intercept is fitted) and parameters ``Θ`` of shape ``(D, P)``. Its outputs, the
natural parameters of the likelihood, are ``f = X̃ Θ Bᵀ`` of shape ``(N, C)``, where the fixed
``(C, P)`` matrix ``B`` has orthonormal columns: the identity for the scalar likelihoods
(Bernoulli, Poisson; ``C = P = 1``) and a basis of the sum-to-zero vectors of ``R^K`` for the
softmax (``C = K``, ``P = K − 1``), which removes the softmax's invariance to adding the same
number to every logit (see :func:`sum_to_zero_basis`).

The objective is the **mean** over data points

    L(Θ) = (1/N) Σₙ nll(fₙ, yₙ) + (1 / (2 C_reg N)) ‖Θ_coef‖²

(``Θ_coef``: the rows of ``Θ`` that multiply features, never the intercept), i.e. scikit-learn's
``Σₙ nll + ½‖w‖² / C`` divided by ``N``. Its Fisher, also a mean over data points, is

    F(Θ) = (1/N) Σₙ (x̃ₙ x̃ₙᵀ) ⊗ (Bᵀ ∇²A(fₙ) B) + (1 / (C_reg N)) · diag(penalty mask) ⊗ I_P,

with ``∇²A(fₙ)`` the per-sample Fisher of the outputs from
:meth:`natgrad.curvature.likelihoods.Likelihood.natural_hessian`. For these canonical-link
likelihoods it equals the Hessian of ``L``, so a natural-gradient step of size one is a Newton
step (Fisher scoring, IRLS). Parameters are flattened row-major: index ``i · P + p`` holds
``Θ[i, p]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad.curvature.likelihoods import Likelihood


def sum_to_zero_basis(n_classes: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """An orthonormal basis of ``{v ∈ R^K : Σ v = 0}``, shape ``(K, K − 1)``.

    Built from the QR factorisation of the centred identity; the columns are orthonormal, so
    ``‖Θ Bᵀ‖ = ‖Θ‖`` and an l2 penalty on the sum-to-zero logit weights is an l2 penalty on ``Θ``.
    """
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    centred = torch.eye(n_classes, dtype=dtype) - 1.0 / n_classes
    basis, _ = torch.linalg.qr(centred[:, : n_classes - 1])
    return basis.contiguous()


class PenalisedGLMObjective:
    """Mean penalised negative log-likelihood of a GLM, with its gradient and Fisher.

    Parameters
    ----------
    design : Tensor of shape (N, D)
        Features, with a trailing column of ones when ``fit_intercept``.
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
    """

    def __init__(
        self,
        design: Tensor,
        targets: Tensor,
        likelihood: Likelihood,
        output_basis: Tensor,
        inverse_C: float,
        fit_intercept: bool,
    ) -> None:
        self.design = design
        self.design_t = design.T.contiguous()
        self.targets = targets
        self.likelihood = likelihood
        self.output_basis = output_basis.contiguous()
        self.n_samples, self.n_rows = design.shape
        self.n_columns = output_basis.shape[1]
        penalised_rows = torch.ones(self.n_rows, dtype=design.dtype)
        if fit_intercept:
            penalised_rows[-1] = 0.0
        self.penalty_diagonal = (inverse_C / self.n_samples) * penalised_rows.repeat_interleave(
            self.n_columns
        )

    @property
    def n_params(self) -> int:
        """Number of free parameters ``D · P``."""
        return self.n_rows * self.n_columns

    def output_weights(self, params: Tensor) -> Tensor:
        """``W = Θ Bᵀ``, shape ``(D, C)``: the weights of each output, for flat ``params``."""
        return params.reshape(self.n_rows, self.n_columns) @ self.output_basis.T

    def outputs(self, params: Tensor) -> Tensor:
        """Natural parameters ``f = X̃ Θ Bᵀ``, shape ``(N, C)``, for flat ``params`` ``(D·P,)``."""
        return self.design @ self.output_weights(params)

    def per_sample_nll(self, params: Tensor) -> Tensor:
        """Negative log-likelihood of each data point, shape ``(N,)``."""
        return self.likelihood.nll(self.outputs(params), self.targets)

    def penalty(self, params: Tensor) -> Tensor:
        """``(1 / (2 C N)) ‖Θ_coef‖²``, a scalar."""
        return 0.5 * (self.penalty_diagonal * params.square()).sum()

    def loss_and_gradient(self, params: Tensor) -> tuple[float, Tensor]:
        """``L(Θ)`` and its gradient ``∇L``, shape ``(D·P,)``, by automatic differentiation.

        Where the loss is not finite it is reported as ``inf`` and the gradient is not used.
        """
        point = params.detach().requires_grad_(True)
        value = self.per_sample_nll(point).mean() + self.penalty(point)
        (gradient,) = torch.autograd.grad(value, point)
        loss = float(value.detach())
        return (loss if math.isfinite(loss) else math.inf), gradient

    def fisher(self, params: Tensor) -> Tensor:
        """The mean penalised Fisher ``F(Θ)`` above, shape ``(D·P, D·P)``."""
        with torch.no_grad():
            output_fisher = self.likelihood.natural_hessian(self.outputs(params))
            basis = self.output_basis
            column_fisher = basis.T @ output_fisher @ basis
            fisher = self._data_fisher(column_fisher)
        return fisher + torch.diag(self.penalty_diagonal)

    def _data_fisher(self, column_fisher: Tensor) -> Tensor:
        """``(1/N) Σₙ (x̃ₙ x̃ₙᵀ) ⊗ Gₙ`` for symmetric per-sample ``Gₙ`` of shape ``(N, P, P)``.

        Block ``(p, q)`` is ``X̃ᵀ diag(G[:, p, q] / N) X̃``; by symmetry only ``p <= q`` is formed.
        """
        size, rows = self.n_columns, self.n_rows
        weights = column_fisher / self.n_samples
        fisher = torch.empty(rows, size, rows, size, dtype=self.design.dtype)
        for p in range(size):
            for q in range(p, size):
                block = (self.design_t * weights[:, p, q]) @ self.design_t.T
                fisher[:, p, :, q] = block
                fisher[:, q, :, p] = block
        return fisher.reshape(self.n_params, self.n_params)
