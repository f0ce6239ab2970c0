"""Fisher scoring, natural-gradient and gradient descent on a penalised GLM objective.

Every solver iterates ``Θ ← Θ − t · d`` with

- ``"fisher"``: ``d = F(Θ)⁻¹ ∇L(Θ)`` and first trial step ``t = 1`` (Fisher scoring, IRLS: the
  natural gradient with step one);
- ``"fisher-chord"``: Fisher scoring that solves with the Cholesky factor of the last Fisher it
  formed again (a chord step: Shamanskii's variant of Newton's method) while the previous step
  divided ‖∇L‖ by at least ``1 / CHORD_CONTRACTION``, and forms a fresh Fisher otherwise or
  when a chord step finds no decrease. Near the optimum, where the Fisher hardly changes, it
  trades an ``N · D²`` Fisher for a step that converges linearly instead of quadratically,
  often one more iteration. For the softmax (CG solves, no factor) it is ``"fisher"``;
- ``"ngd"``: the same direction with first trial step ``t = learning_rate``;
- ``"gd"``: ``d = ∇L(Θ)`` with first trial step ``t = learning_rate``.

``L`` and ``F`` are the mean penalised loss and Fisher of
:class:`~natgrad.models.glm_objective.PenalisedGLMObjective`. The Fisher system is solved by
Cholesky (with :func:`natgrad.linalg.damped_solve`'s eigenvalue clamping where it fails) for the
scalar likelihoods, and for the softmax by conjugate gradients with Fisher-vector products
and a Kronecker preconditioner (the ``(D·P)²`` Fisher is never formed), to a relative residual
``min(CG_FORCING, ‖∇L‖^½)`` (an inexact Newton method of order 1.5) or an absolute residual
of ``CG_ATOL_FRACTION · tol``, in the norm of the stopping test below; the dense solve is the
fallback where CG does not converge.

**Mixed precision** (scalar likelihoods with a dense design, on unless
``mixed_precision=False``; a sparse design always uses the float64 Fisher): the Fisher for
the direction has its data Gram formed in float32
(:meth:`~natgrad.models.glm_objective.PenalisedGLMObjective.low_precision_fisher`), then is
scaled to unit diagonal, factorised in float64, and used only if LAPACK's condition estimate is
at most ``MAX_LOW_PRECISION_CONDITION``. The direction is then that of an inexact Newton method
with a relative error of about ``1e-6 · κ``; the gradient, the loss and the convergence test
stay float64, so the fixed point and the ``‖∇L‖ ≤ tol`` criterion are unchanged. Where the
estimate is larger or the factorisation fails, the float64 Fisher is formed instead, and for
the rest of the fit.

Each step is safeguarded by step halving: ``t`` is halved until the penalised loss is finite
and decreases sufficiently (Armijo), so a step never writes a non-finite value into ``Θ``. The
outputs of a trial point are ``f(Θ) − t · X̃ d Bᵀ``, so each trial costs one loss evaluation
and no product with ``X̃``; the gradient is computed only at the accepted point. Iteration
stops when ``‖∇L‖₂ ≤ tol``, after ``max_iter`` steps, when the line search fails, or when
``stop_early(f)`` says so (used for perfect separation). The gradient's components of a column
of ``X̃`` with root mean square ``r < 1`` are divided by ``r`` in this test
(:meth:`~natgrad.models.glm_objective.PenalisedGLMObjective.stopping_norm`): such a column's
gradient is ``r`` times that of the same column in units of root mean square one, so features
measured in small units (1e-8 say) would otherwise meet ``tol`` at the starting point.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import lapack
from torch import Tensor

from natgrad.linalg import cg, damped_solve
from natgrad.models.glm_objective import GLMPoint, PenalisedGLMObjective

SOLVERS = ("fisher", "fisher-chord", "ngd", "gd")
ARMIJO_FRACTION = 1e-4
"""Fraction of the predicted decrease ``t · ∇Lᵀd`` a step must achieve."""
MAX_HALVINGS = 50
ROUNDOFF_SLACK = 64 * sys.float_info.epsilon
"""Relative loss increase tolerated as floating-point noise when accepting a step."""
CG_FORCING = 0.1
"""Largest relative CG residual of a softmax Fisher solve (``‖∇L‖^½`` once that is smaller)."""
CG_ATOL_FRACTION = 0.1
"""CG stops once its residual is below this fraction of ``tol``: the next gradient is about
that residual (plus a term quadratic in the step), so solving further gains nothing."""
CHORD_CONTRACTION = 0.03
"""``"fisher-chord"`` reuses a Fisher factor after a step that multiplied ‖∇L‖ by at most this.

0.1 saved more Fishers but took up to 11 iterations to 1e-8 on the benchmark problems; with
0.03 none took more than 10 (plain Fisher scoring: 4–10), with one or two Fishers fewer."""
MAX_LOW_PRECISION_CONDITION = 1e3
"""Largest condition estimate of the unit-diagonal Fisher for which a float32 Gram is used.

Its entries' relative errors are about 1e-6 (float32 sums over 10⁴ samples), so the direction's
relative error stays below about 1e-3 and Newton's last steps are not slowed noticeably."""


@dataclass
class SolverResult:
    """Outcome of :func:`minimise`.

    Attributes
    ----------
    params : Tensor of shape (D·P,)
        The final parameters.
    outputs : Tensor of shape (N, C)
        The model outputs at ``params``.
    n_iter : int
        Number of accepted steps.
    loss : float
        Final mean penalised loss.
    gradient_norm : float
        ``‖∇L‖₂`` at ``params``.
    status : str
        ``"converged"``, ``"max_iter"``, ``"line_search_failed"`` or ``"stopped_early"``.
    n_fisher : int
        Number of Fisher systems set up: dense Fishers formed, or CG solves for the softmax
        (``0`` for ``"gd"``; fewer than ``n_iter`` for ``"fisher-chord"`` where it reuses).
    stopping_norm : float
        The norm compared with ``tol``: ``objective.stopping_norm(∇L)`` at ``params``.
    """

    params: Tensor
    outputs: Tensor
    n_iter: int
    loss: float
    gradient_norm: float
    status: str
    n_fisher: int
    stopping_norm: float


@dataclass
class CholeskyFactor:
    """Cholesky factor of a Fisher ``F = D L Lᵀ D``, ``D = diag(1 / inverse_scale)``.

    Attributes
    ----------
    lower : ndarray of shape (D·P, D·P)
        Lower triangular ``L``, float64.
    inverse_scale : ndarray of shape (D·P,), optional
        ``1 / D``; ``None`` for ``D = I`` (``F = L Lᵀ``).
    low_precision : bool
        Whether ``L Lᵀ`` came from a float32 Gram (see :func:`low_precision_factor`).
    """

    lower: np.ndarray
    inverse_scale: np.ndarray | None = None
    low_precision: bool = False

    def solve(self, rhs: Tensor) -> Tensor | None:
        """``F⁻¹ rhs`` (LAPACK ``dpotrs``), shape ``(D·P,)``; ``None`` if it is not finite."""
        values = rhs.detach().numpy()
        if self.inverse_scale is not None:
            values = values * self.inverse_scale
        solution, info = lapack.dpotrs(self.lower, values, lower=1)
        if info != 0 or not np.isfinite(solution).all():
            return None
        if self.inverse_scale is not None:
            solution *= self.inverse_scale
        return torch.from_numpy(solution).to(rhs.dtype)


def cholesky_factor(fisher: Tensor) -> CholeskyFactor | None:
    """The Cholesky factor of ``fisher`` (LAPACK ``dpotrf``); ``None`` where it fails.

    LAPACK is called directly on a NumPy view: for these small systems call overhead is most
    of the cost.
    """
    matrix = fisher.detach().numpy().astype(np.float64, copy=False)
    lower, info = lapack.dpotrf(matrix, lower=1, clean=1)
    return CholeskyFactor(lower) if info == 0 else None


def low_precision_factor(
    objective: PenalisedGLMObjective, point: GLMPoint
) -> CholeskyFactor | None:
    """The factor of the Fisher at ``point`` with its data Gram formed in float32.

    ``F ≈ diag(c) M diag(c)`` from the objective is scaled to unit diagonal,
    ``A = diag(a) M diag(a)`` with ``a = diag(M)^-½``, and factorised in float64. ``None``
    (use the float64 Fisher) where the objective has no such Gram, ``M``'s diagonal is not
    positive, the factorisation fails, or LAPACK's estimate of ``A``'s 1-norm condition number
    exceeds ``MAX_LOW_PRECISION_CONDITION``.
    """
    approximation = objective.low_precision_fisher(point)
    if approximation is None:
        return None
    matrix, column_scale = approximation
    diagonal = matrix.diagonal()
    if not diagonal.min() > 0.0:
        return None
    unit_scale = 1.0 / np.sqrt(diagonal)
    unit_diagonal = matrix * unit_scale[:, None] * unit_scale
    lower, info = lapack.dpotrf(unit_diagonal, lower=1, clean=1)
    if info != 0:
        return None
    one_norm = float(np.abs(unit_diagonal).sum(0).max())
    reciprocal_condition, info = lapack.dpocon(lower, one_norm, uplo="L")
    if info != 0 or not reciprocal_condition * MAX_LOW_PRECISION_CONDITION >= 1.0:
        return None
    return CholeskyFactor(lower, unit_scale / column_scale, low_precision=True)


def natural_direction(
    objective: PenalisedGLMObjective,
    point: GLMPoint,
    gradient: Tensor,
    tol: float = 0.0,
    low_precision: bool = False,
) -> Tensor:
    """``F(Θ)⁻¹ ∇L(Θ)`` with the mean penalised Fisher at ``point``, shape ``(D·P,)``.

    For the softmax, by CG to a residual ``max(min(CG_FORCING, ‖∇L‖^½) · ‖∇L‖,
    CG_ATOL_FRACTION · tol)`` (``tol`` the solver's gradient tolerance; both norms those of
    the stopping test, see :func:`cg_direction`). ``low_precision``:
    try :func:`low_precision_factor` first (scalar likelihoods).
    """
    return natural_direction_and_factor(objective, point, gradient, tol, low_precision)[0]


def natural_direction_and_factor(
    objective: PenalisedGLMObjective,
    point: GLMPoint,
    gradient: Tensor,
    tol: float = 0.0,
    low_precision: bool = False,
) -> tuple[Tensor, CholeskyFactor | None]:
    """:func:`natural_direction` and the Cholesky factor of the Fisher it solved with.

    The factor is ``None`` where the direction came from CG or the eigenvalue-clamped solve;
    its ``low_precision`` says whether the float32 Gram was used.
    """
    if objective.n_columns > 1:
        direction = cg_direction(objective, point, gradient, tol)
        if direction is not None:
            return direction, None
    if low_precision:
        factor = low_precision_factor(objective, point)
        direction = None if factor is None else factor.solve(gradient)
        if direction is not None:
            return direction, factor
    fisher = objective.point_fisher(point)
    factor = cholesky_factor(fisher)
    direction = None if factor is None else factor.solve(gradient)
    if direction is None:
        return damped_solve(fisher, gradient, damping=0.0), None
    return direction, factor


def cg_direction(
    objective: PenalisedGLMObjective, point: GLMPoint, gradient: Tensor, tol: float
) -> Tensor | None:
    """``F⁻¹ ∇L`` of the softmax by preconditioned CG; ``None`` where CG does not converge.

    CG runs on the system scaled by ``S = objective.stopping_scale`` (``S F S z = S ∇L``,
    ``d = S z``), so its residual is measured in the norm of the stopping test: unscaled, the
    components of a column in small units would hardly count in it.
    """
    product = objective.fisher_product(point.outputs)
    preconditioner = objective.kronecker_preconditioner(point.outputs)
    scale = objective.stopping_scale
    if scale is not None:
        unscaled_product, unscaled_preconditioner = product, preconditioner

        def product(vector: Tensor) -> Tensor:
            return scale * unscaled_product(scale * vector)

        def preconditioner(residual: Tensor) -> Tensor:
            return unscaled_preconditioner(residual / scale) / scale

        gradient = scale * gradient
    direction, info = cg(
        product,
        gradient,
        preconditioner=preconditioner,
        rtol=min(CG_FORCING, math.sqrt(float(torch.linalg.vector_norm(gradient)))),
        atol=CG_ATOL_FRACTION * tol,
        max_iter=objective.n_params,
    )
    if not info.converged:
        return None
    return direction if scale is None else scale * direction


def backtrack(
    objective: PenalisedGLMObjective,
    point: GLMPoint,
    gradient: Tensor,
    direction: Tensor,
    first_step: float,
) -> GLMPoint | None:
    """Step halving from ``first_step`` along ``−direction``; ``None`` if no step is accepted.

    A trial ``Θ − t d`` is accepted when its loss is finite and at most
    ``L(Θ) − ARMIJO_FRACTION · t · ∇Lᵀd`` (plus a floating-point slack of ``ROUNDOFF_SLACK``
    relative to ``|L(Θ)|``). Returns the accepted point.
    """
    slope = float(gradient @ direction)
    if not math.isfinite(slope) or slope <= 0.0:
        return None
    slack = ROUNDOFF_SLACK * (1.0 + abs(point.loss))
    output_direction = objective.outputs_no_grad(direction)
    step = first_step
    for _ in range(MAX_HALVINGS):
        trial = objective.point(
            torch.add(point.params, direction, alpha=-step),
            torch.add(point.outputs, output_direction, alpha=-step),
        )
        if trial.loss <= point.loss - ARMIJO_FRACTION * step * slope + slack:
            return trial
        step *= 0.5
    return None


def chord_step(
    objective: PenalisedGLMObjective,
    point: GLMPoint,
    gradient: Tensor,
    factor: CholeskyFactor | None,
    first_step: float,
) -> GLMPoint | None:
    """:func:`backtrack` along the direction that ``factor``, an earlier Fisher's, gives.

    ``None`` when there is no factor, its solve is not finite, or step halving finds no
    decrease.
    """
    direction = None if factor is None else factor.solve(gradient)
    if direction is None:
        return None
    return backtrack(objective, point, gradient, direction, first_step)


def minimise(
    objective: PenalisedGLMObjective,
    initial_params: Tensor,
    solver: str,
    learning_rate: float,
    tol: float,
    max_iter: int,
    stop_early: Callable[[Tensor], bool] | None = None,
    mixed_precision: bool = True,
) -> SolverResult:
    """Minimise ``objective`` from ``initial_params`` with ``solver`` (see the module docstring).

    Parameters
    ----------
    objective : PenalisedGLMObjective
    initial_params : Tensor of shape (D·P,)
    solver : {"fisher", "fisher-chord", "ngd", "gd"}
    learning_rate : float
        First trial step of each iteration (``1`` for Fisher scoring).
    tol : float
        Stop when ``objective.stopping_norm(∇L)`` is at most ``tol``: the gradient norm of the
        mean penalised loss, with the components of columns of root mean square below one
        divided by it (so it is at least ``‖∇L‖₂``).
    max_iter : int
        Maximum number of steps.
    stop_early : callable, optional
        Called with the outputs ``(N, C)`` after each accepted step; ``True`` stops the
        iteration.
    mixed_precision : bool, default=True
        Try the float32 Gram for the Fisher directions of scalar likelihoods until it is
        refused once (see the module docstring); ``False``: always the float64 Fisher.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    point = objective.point(initial_params)
    gradient = objective.gradient(point)
    n_iter, n_fisher, status = 0, 0, "max_iter"
    factor, previous_norm = None, math.inf
    low_precision = mixed_precision and objective.n_columns == 1
    while True:
        gradient_norm = float(torch.linalg.vector_norm(gradient))
        stopping_norm = objective.stopping_norm(gradient)
        if stopping_norm <= tol:
            status = "converged"
            break
        if n_iter >= max_iter:
            break
        accepted = None
        if solver == "fisher-chord" and gradient_norm <= CHORD_CONTRACTION * previous_norm:
            accepted = chord_step(objective, point, gradient, factor, learning_rate)
        if accepted is None:  # no chord step taken, or it found no decrease
            if solver == "gd":
                direction = gradient
            else:
                direction, factor = natural_direction_and_factor(
                    objective, point, gradient, tol, low_precision
                )
                low_precision = low_precision and factor is not None and factor.low_precision
                n_fisher += 1
            accepted = backtrack(objective, point, gradient, direction, learning_rate)
        if accepted is None:
            status = "line_search_failed"
            break
        point, previous_norm = accepted, gradient_norm
        gradient = objective.gradient(point)
        n_iter += 1
        if stop_early is not None and stop_early(point.outputs):
            gradient_norm = float(torch.linalg.vector_norm(gradient))
            stopping_norm = objective.stopping_norm(gradient)
            status = "stopped_early"
            break
    return SolverResult(
        point.params,
        point.outputs,
        n_iter,
        point.loss,
        gradient_norm,
        status,
        n_fisher,
        stopping_norm,
    )
