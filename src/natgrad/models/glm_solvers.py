"""Fisher scoring, natural-gradient and gradient descent on a penalised GLM objective.

Every solver iterates ``Θ ← Θ − t · d`` with

- ``"fisher"``: ``d = F(Θ)⁻¹ ∇L(Θ)`` and first trial step ``t = 1`` (Fisher scoring, IRLS: the
  natural gradient with step one);
- ``"ngd"``: the same direction with first trial step ``t = learning_rate``;
- ``"gd"``: ``d = ∇L(Θ)`` with first trial step ``t = learning_rate``.

``L`` and ``F`` are the mean penalised loss and Fisher of
:class:`~natgrad.models.glm_objective.PenalisedGLMObjective`; the Fisher system is solved by
:func:`natgrad.linalg.damped_solve`. Each step is safeguarded by step halving: ``t`` is halved
until the penalised loss is finite and decreases sufficiently (Armijo), so a step never writes a
non-finite value into ``Θ``. Iteration stops when ``‖∇L‖₂ ≤ tol``, after ``max_iter`` steps, when
the line search fails, or when ``stop_early(Θ)`` says so (used for perfect separation).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from natgrad.linalg import damped_solve
from natgrad.models.glm_objective import PenalisedGLMObjective

SOLVERS = ("fisher", "ngd", "gd")
ARMIJO_FRACTION = 1e-4
"""Fraction of the predicted decrease ``t · ∇Lᵀd`` a step must achieve."""
MAX_HALVINGS = 50
ROUNDOFF_SLACK = 64 * sys.float_info.epsilon
"""Relative loss increase tolerated as floating-point noise when accepting a step."""


@dataclass
class SolverResult:
    """Outcome of :func:`minimise`.

    Attributes
    ----------
    params : Tensor of shape (D·P,)
        The final parameters.
    n_iter : int
        Number of accepted steps.
    loss : float
        Final mean penalised loss.
    gradient_norm : float
        ``‖∇L‖₂`` at ``params``.
    status : str
        ``"converged"``, ``"max_iter"``, ``"line_search_failed"`` or ``"stopped_early"``.
    """

    params: Tensor
    n_iter: int
    loss: float
    gradient_norm: float
    status: str


def natural_direction(objective: PenalisedGLMObjective, params: Tensor, gradient: Tensor) -> Tensor:
    """``F(Θ)⁻¹ ∇L(Θ)`` with the mean penalised Fisher, shape ``(D·P,)``."""
    return damped_solve(objective.fisher(params), gradient, damping=0.0)


def backtrack(
    objective: PenalisedGLMObjective,
    params: Tensor,
    loss: float,
    gradient: Tensor,
    direction: Tensor,
    first_step: float,
) -> tuple[Tensor, float, Tensor] | None:
    """Step halving from ``first_step`` along ``−direction``; ``None`` if no step is accepted.

    A trial ``Θ − t d`` is accepted when its loss is finite and at most
    ``L(Θ) − ARMIJO_FRACTION · t · ∇Lᵀd`` (plus a floating-point slack of ``ROUNDOFF_SLACK``
    relative to ``|L(Θ)|``). Returns the accepted parameters, their loss and gradient.
    """
    slope = float(gradient @ direction)
    if not math.isfinite(slope) or slope <= 0.0:
        return None
    slack = ROUNDOFF_SLACK * (1.0 + abs(loss))
    step = first_step
    for _ in range(MAX_HALVINGS):
        trial = params - step * direction
        trial_loss, trial_gradient = objective.loss_and_gradient(trial)
        if trial_loss <= loss - ARMIJO_FRACTION * step * slope + slack:
            return trial, trial_loss, trial_gradient
        step *= 0.5
    return None


def minimise(
    objective: PenalisedGLMObjective,
    initial_params: Tensor,
    solver: str,
    learning_rate: float,
    tol: float,
    max_iter: int,
    stop_early: Callable[[Tensor], bool] | None = None,
) -> SolverResult:
    """Minimise ``objective`` from ``initial_params`` with ``solver`` (see the module docstring).

    Parameters
    ----------
    objective : PenalisedGLMObjective
    initial_params : Tensor of shape (D·P,)
    solver : {"fisher", "ngd", "gd"}
    learning_rate : float
        First trial step of each iteration (``1`` for Fisher scoring).
    tol : float
        Stop when the gradient norm of the mean penalised loss is at most ``tol``.
    max_iter : int
        Maximum number of steps.
    stop_early : callable, optional
        Called with the parameters after each accepted step; ``True`` stops the iteration.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    params = initial_params
    loss, gradient = objective.loss_and_gradient(params)
    n_iter, status = 0, "max_iter"
    while True:
        gradient_norm = float(torch.linalg.vector_norm(gradient))
        if gradient_norm <= tol:
            status = "converged"
            break
        if n_iter >= max_iter:
            break
        if solver == "gd":
            direction = gradient
        else:
            direction = natural_direction(objective, params, gradient)
        accepted = backtrack(objective, params, loss, gradient, direction, learning_rate)
        if accepted is None:
            status = "line_search_failed"
            break
        params, loss, gradient = accepted
        n_iter += 1
        if stop_early is not None and stop_early(params):
            gradient_norm = float(torch.linalg.vector_norm(gradient))
            status = "stopped_early"
            break
    return SolverResult(params, n_iter, loss, gradient_norm, status)
