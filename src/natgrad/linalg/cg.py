"""Preconditioned conjugate gradients for symmetric positive definite linear operators."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class CGInfo:
    """Outcome of a :func:`cg` run.

    Attributes
    ----------
    iterations : int
        Number of matrix-vector products with ``A`` after the initial residual.
    residual_norm : float
        ``‖b − A x‖₂`` of the returned ``x`` (the recursively updated residual).
    converged : bool
        Whether ``residual_norm <= max(rtol · ‖b‖₂, atol)``.
    """

    iterations: int
    residual_norm: float
    converged: bool


def _check_tolerances(rtol: float, atol: float, max_iter: int | None) -> None:
    if not rtol >= 0.0:
        raise ValueError(f"rtol must be non-negative, got {rtol!r}")
    if not atol >= 0.0:
        raise ValueError(f"atol must be non-negative, got {atol!r}")
    if max_iter is not None and max_iter < 0:
        raise ValueError(f"max_iter must be non-negative, got {max_iter!r}")


def cg(
    mv: MatVec,
    b: Tensor,
    x0: Tensor | None = None,
    *,
    preconditioner: MatVec | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
) -> tuple[Tensor, CGInfo]:
    """Solve ``A x = b`` by (preconditioned) conjugate gradients.

    Parameters
    ----------
    mv : callable
        ``v ↦ A v`` for a symmetric positive definite ``A``; maps ``(P,)`` to ``(P,)``.
    b : Tensor of shape (P,)
        Right-hand side.
    x0 : Tensor of shape (P,), optional
        Initial guess (zeros by default).
    preconditioner : callable, optional
        ``r ↦ M⁻¹ r`` for a symmetric positive definite ``M ≈ A``.
    rtol, atol : float
        Stop once ``‖b − A x‖₂ <= max(rtol · ‖b‖₂, atol)``.
    max_iter : int, optional
        Maximum number of iterations; ``10 · P`` by default.

    Returns
    -------
    x : Tensor of shape (P,)
    info : CGInfo
        Iterations, final residual norm, and whether the tolerance was met. CG also stops
        (unconverged) if it meets a direction of non-positive curvature ``pᵀ A p <= 0``.

    Raises
    ------
    ValueError
        If ``b`` or ``x0`` is not a finite 1-d tensor of matching length, or a tolerance is
        negative.
    """
    if b.ndim != 1:
        raise ValueError(f"b must be a 1-d tensor, got shape {tuple(b.shape)}")
    if not bool(torch.isfinite(b).all()):
        raise ValueError("b must not contain infs or NaNs")
    _check_tolerances(rtol, atol, max_iter)
    if x0 is not None and (x0.shape != b.shape or not bool(torch.isfinite(x0).all())):
        raise ValueError(f"x0 must be a finite tensor of shape {tuple(b.shape)}")
    limit = 10 * b.numel() if max_iter is None else max_iter
    threshold = max(rtol * float(torch.linalg.vector_norm(b)), atol)
    apply_preconditioner = preconditioner if preconditioner is not None else (lambda r: r)

    x = torch.zeros_like(b) if x0 is None else x0.clone()
    residual = b - mv(x) if x0 is not None else b.clone()
    residual_norm = float(torch.linalg.vector_norm(residual))
    preconditioned = apply_preconditioner(residual)
    direction = preconditioned.clone()
    rho = torch.dot(residual, preconditioned)
    iterations = 0
    while residual_norm > threshold and iterations < limit:
        product = mv(direction)
        curvature = torch.dot(direction, product)
        if not bool(curvature > 0) or not bool(torch.isfinite(curvature)):
            break
        step = rho / curvature
        x = x + step * direction
        residual = residual - step * product
        residual_norm = float(torch.linalg.vector_norm(residual))
        iterations += 1
        preconditioned = apply_preconditioner(residual)
        rho_next = torch.dot(residual, preconditioned)
        direction = preconditioned + (rho_next / rho) * direction
        rho = rho_next
    return x, CGInfo(iterations, residual_norm, residual_norm <= threshold)
