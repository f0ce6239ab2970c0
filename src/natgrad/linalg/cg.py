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
        Number of CG steps, one product with ``A`` each. Recomputing the true residual
        (for ``x0``, and after each run of steps) costs one more product, not counted here.
    residual_norm : float
        ``‖b − A x‖₂`` of the returned ``x``, recomputed as ``b − A x`` (the recursively
        updated residual of CG drifts from it in finite precision).
    converged : bool
        Whether ``residual_norm <= max(rtol · ‖b‖₂, atol)``.
    stagnated : bool
        Whether CG stopped because a restart from the true residual did not halve it: the
        residual has reached the round-off floor of the dtype (only with
        ``stop_on_stagnation=True``).
    """

    iterations: int
    residual_norm: float
    converged: bool
    stagnated: bool = False


def _check_tolerances(rtol: float, atol: float, max_iter: int | None) -> None:
    if not rtol >= 0.0:
        raise ValueError(f"rtol must be non-negative, got {rtol!r}")
    if not atol >= 0.0:
        raise ValueError(f"atol must be non-negative, got {atol!r}")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 0):
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")


def _check_vectors(b: Tensor, x0: Tensor | None) -> None:
    if b.ndim != 1:
        raise ValueError(f"b must be a 1-d tensor, got shape {tuple(b.shape)}")
    if not b.is_floating_point():
        raise ValueError(f"b must be a floating-point tensor, got dtype {b.dtype}")
    if not bool(torch.isfinite(b).all()):
        raise ValueError("b must not contain infs or NaNs")
    if x0 is not None and (x0.shape != b.shape or not bool(torch.isfinite(x0).all())):
        raise ValueError(f"x0 must be a finite tensor of shape {tuple(b.shape)}")


def _apply(name: str, operator: MatVec, vector: Tensor) -> Tensor:
    """``operator(vector)``, refused unless it keeps the shape and dtype of ``vector``."""
    product = operator(vector)
    if not isinstance(product, Tensor) or (product.shape, product.dtype) != (
        vector.shape,
        vector.dtype,
    ):
        got = (
            f"shape {tuple(product.shape)}, dtype {product.dtype}"
            if isinstance(product, Tensor)
            else type(product).__name__
        )
        raise ValueError(
            f"{name} must map a tensor of shape {tuple(vector.shape)} and dtype {vector.dtype} "
            f"to one of the same shape and dtype, got {got}"
        )
    return product


def _iterate(
    mv: MatVec,
    preconditioner: MatVec,
    x: Tensor,
    residual: Tensor,
    threshold: float,
    budget: int,
) -> tuple[Tensor, Tensor, int, bool]:
    """At most ``budget`` CG steps from ``(x, residual)``; returns ``x``, the recursive
    residual, the number of steps and whether CG broke down (``pᵀAp <= 0`` or ``rᵀM⁻¹r <= 0``).
    """
    preconditioned = _apply("preconditioner", preconditioner, residual)
    direction = preconditioned.clone()
    rho = torch.dot(residual, preconditioned)
    steps = 0
    while float(torch.linalg.vector_norm(residual)) > threshold and steps < budget:
        if not bool(rho > 0):
            return x, residual, steps, True
        product = _apply("mv", mv, direction)
        curvature = torch.dot(direction, product)
        if not bool(curvature > 0) or not bool(torch.isfinite(curvature)):
            return x, residual, steps, True
        step = rho / curvature
        x = x + step * direction
        residual = residual - step * product
        steps += 1
        preconditioned = _apply("preconditioner", preconditioner, residual)
        rho_next = torch.dot(residual, preconditioned)
        direction = preconditioned + (rho_next / rho) * direction
        rho = rho_next
    return x, residual, steps, False


def cg(
    mv: MatVec,
    b: Tensor,
    x0: Tensor | None = None,
    *,
    preconditioner: MatVec | None = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_iter: int | None = None,
    stop_on_stagnation: bool = False,
) -> tuple[Tensor, CGInfo]:
    """Solve ``A x = b`` by (preconditioned) conjugate gradients.

    Parameters
    ----------
    mv : callable
        ``v ↦ A v`` for a symmetric positive definite ``A``; maps ``(P,)`` to ``(P,)`` in the
        dtype of ``b``.
    b : Tensor of shape (P,)
        Right-hand side (floating point). A zero ``b`` returns the exact solution ``0`` at
        once (``x0`` is then ignored).
    x0 : Tensor of shape (P,), optional
        Initial guess (zeros by default).
    preconditioner : callable, optional
        ``r ↦ M⁻¹ r`` for a symmetric positive definite ``M ≈ A``.
    rtol, atol : float
        Stop once ``‖b − A x‖₂ <= max(rtol · ‖b‖₂, atol)``. CG tracks the residual
        recursively; when that estimate meets the tolerance, or CG stops, the true residual
        ``b − A x`` is computed (one more product with ``A``); if it misses the tolerance and
        steps are left, CG restarts from it.
    max_iter : int, optional
        Maximum number of CG steps; ``10 · P`` by default.
    stop_on_stagnation : bool, default False
        Stop, unconverged, once a restart does not halve the true residual norm: a tolerance
        below the round-off floor of the dtype (about ``ε · ‖A‖ · ‖x‖``) cannot be met, and
        further steps only spend products. The ``x`` with the smallest true residual is returned.

    Returns
    -------
    x : Tensor of shape (P,)
    info : CGInfo
        Iterations, final residual norm, and whether the tolerance was met. CG also stops
        (unconverged) if it meets a direction of non-positive curvature ``pᵀ A p <= 0`` or a
        residual with ``rᵀ M⁻¹ r <= 0`` (a preconditioner that is not positive definite).

    Raises
    ------
    ValueError
        If ``b`` or ``x0`` is not a finite floating-point 1-d tensor of matching length, a
        tolerance is negative, or ``mv`` or ``preconditioner`` changes the shape or dtype.
    """
    _check_vectors(b, x0)
    _check_tolerances(rtol, atol, max_iter)
    if not bool(b.any()):
        return torch.zeros_like(b), CGInfo(0, 0.0, True)
    limit = 10 * b.numel() if max_iter is None else max_iter
    threshold = max(rtol * float(torch.linalg.vector_norm(b)), atol)
    apply_preconditioner = preconditioner if preconditioner is not None else (lambda r: r)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    residual = b.clone() if x0 is None else b - _apply("mv", mv, x)
    best_x, best_norm = x, float(torch.linalg.vector_norm(residual))
    iterations = 0
    while True:
        x, residual, steps, broke_down = _iterate(
            mv, apply_preconditioner, x, residual, threshold, limit - iterations
        )
        iterations += steps
        if steps:
            residual = b - _apply("mv", mv, x)
        residual_norm = float(torch.linalg.vector_norm(residual))
        done = residual_norm <= threshold or broke_down or steps == 0 or iterations >= limit
        stagnated = stop_on_stagnation and not done and residual_norm > 0.5 * best_norm
        if residual_norm < best_norm:
            best_x, best_norm = x, residual_norm
        if done or stagnated:
            break
    if stop_on_stagnation:
        x, residual_norm = best_x, best_norm
    return x, CGInfo(iterations, residual_norm, residual_norm <= threshold, stagnated)
