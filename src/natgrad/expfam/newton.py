"""Mean → natural parameters by a guarded Newton iteration, with implicit differentiation.

For Gamma, Beta and Dirichlet the map ``η → θ`` has no closed form. It is the maximiser of the
strictly concave function ``ℓ(θ) = ⟨θ, η⟩ − A(θ)`` (the maximum-likelihood problem with
sufficient statistics ``η``), whose gradient is ``η − ∇A(θ)`` and whose Hessian is ``−F(θ)``.
Newton's method ``θ ← θ + t F(θ)⁻¹ (η − ∇A(θ))`` is run in float64 with a backtracking line
search that keeps ``θ`` inside the natural parameter space and accepts a step that increases
``ℓ`` enough (Armijo) or shrinks the residual; near the solution it converges quadratically.

Convergence: once every entry of the residual satisfies
``|η − ∇A(θ)| ≤ NEWTON_TOLERANCE · (1 + |η|)``, ``NEWTON_POLISH_STEPS`` more Newton steps are
taken (quadratic convergence takes the residual from there to rounding level, which resolves
``θ`` as well as ``η`` determines it). If the residual test still fails after
``NEWTON_MAX_ITER`` iterations, a ``RuntimeError`` naming the offending ``η`` is raised.
How well ``η`` determines ``θ`` depends on the conditioning: e.g. a Gamma with ``α = 10⁷`` has
``log η₂ − η₁ ≈ 1/(2α)``, so rounding in ``η`` alone limits ``α`` to about 1e-8 relative.

Derivatives: ``∂θ/∂η = F(θ)⁻¹`` (implicit-function theorem on ``∇A(θ) = η``), so the backward
pass maps an incoming ``∂L/∂θ`` to ``∂L/∂η = F(θ)⁻¹ ∂L/∂θ`` with one solve per event (dense
``d × d`` for Gamma and Beta, ``O(K)`` by Sherman–Morrison for the Dirichlet).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from natgrad.expfam.base import Params, first_failure, flatten_event, unflatten_event

if TYPE_CHECKING:
    from natgrad.expfam.base import ExponentialFamily

NEWTON_TOLERANCE = 1e-10
NEWTON_POLISH_STEPS = 2
NEWTON_MAX_ITER = 100
_MAX_HALVINGS = 60
_ARMIJO = 1e-4


def solve_natural_from_mean(
    family: type[ExponentialFamily], eta: Params, theta_init: Params
) -> Params:
    """Natural parameters ``θ`` with ``∇A(θ) = η``, by guarded Newton (see module docstring).

    Parameters
    ----------
    family : type of ExponentialFamily
        The family (its closed-form mean, Fisher, log-partition and natural domain are used).
    eta : tuple of Tensor
        Mean parameters inside the mean parameter space, shapes ``batch_shape + event_i``.
    theta_init : tuple of Tensor
        A starting point inside the natural parameter space, same shapes.

    Returns
    -------
    tuple of Tensor
        ``θ`` in the dtype and on the device of ``eta``, detached from any graph. The
        iteration itself runs in float64 (on the CPU for devices without float64).

    Raises
    ------
    RuntimeError
        If the residual does not reach the tolerance within ``NEWTON_MAX_ITER`` iterations.
    """
    ndims = family.natural_event_ndims
    batch_shape = eta[0].shape[: eta[0].ndim - ndims[0]]
    work = _float64_device(eta[0].device)
    eta64 = [e.detach().to(work, torch.float64) for e in eta]
    target = flatten_event(eta64, ndims).reshape(-1, _dim(eta, ndims))
    theta = flatten_event([t.detach().to(work, torch.float64) for t in theta_init], ndims)
    theta = theta.reshape(target.shape)
    like = [e.reshape(-1, *e.shape[e.ndim - n :]) for e, n in zip(eta64, ndims, strict=True)]

    def unflat(flat: Tensor) -> Params:
        return unflatten_event(flat, like, ndims)

    def objective(flat: Tensor) -> Tensor:
        return (flat * target).sum(-1) - family.log_partition_fn(*unflat(flat))

    def residual_of(flat: Tensor) -> Tensor:
        return target - flatten_event(family._mean_from_natural(*unflat(flat)), ndims)

    polished = 0
    for iteration in range(NEWTON_MAX_ITER + 1):
        residual = residual_of(theta)
        accurate = (residual.abs() <= NEWTON_TOLERANCE * (1.0 + target.abs())).all(-1)
        polished = polished + 1 if bool(accurate.all()) else 0
        if polished > NEWTON_POLISH_STEPS:
            break
        if iteration == NEWTON_MAX_ITER:
            if polished:
                break
            _raise_not_converged(family, residual, target, batch_shape)
        step = _newton_step(family, unflat(theta), residual)
        theta = _line_search(family, theta, step, residual, objective, residual_of, unflat)
    return tuple(
        s.reshape((*batch_shape, *s.shape[1:])).to(e.device, e.dtype)
        for s, e in zip(unflat(theta), eta, strict=True)
    )


def _float64_device(device: torch.device) -> torch.device:
    """``device``, or the CPU where ``device`` has no float64 (Apple MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


def _dim(params: Params, ndims: tuple[int, ...]) -> int:
    return sum(math.prod(p.shape[p.ndim - n :]) for p, n in zip(params, ndims, strict=True))


def _newton_step(family: type[ExponentialFamily], theta: Params, residual: Tensor) -> Tensor:
    """``F⁻¹ r`` per row; rows whose ``F`` is numerically singular take ``r / diag(F)``."""
    newton = family._fisher_solve(theta, residual)
    diagonal_step = residual / family._fisher_diagonal(theta)
    return torch.where(newton.isfinite().all(-1, keepdim=True), newton, diagonal_step)


def _line_search(family, theta, step, residual, objective, residual_of, unflat) -> Tensor:
    """Backtracking over ``t = 2⁻ᵏ``: accept the first ``θ + tΔ`` inside the domain that
    satisfies Armijo's condition on ``ℓ`` or shrinks the largest residual entry by ``1 − 10⁻⁴t``.

    The residual test takes over near the solution, where the change in ``ℓ`` falls below the
    rounding error of ``A(θ)`` and Armijo's test can no longer be decided.
    """
    start = objective(theta)
    slope = (residual * step).sum(-1)
    size = residual.abs().amax(-1)
    fraction = torch.ones_like(start)
    accepted = torch.zeros_like(start, dtype=torch.bool)
    for _ in range(_MAX_HALVINGS):
        candidate = theta + fraction[:, None] * step
        inside = family._natural_in_domain(*unflat(candidate))
        safe = torch.where(inside[:, None], candidate, theta)
        armijo = objective(safe) - start >= _ARMIJO * fraction * slope
        shrinks = residual_of(safe).abs().amax(-1) <= (1.0 - _ARMIJO * fraction) * size
        good = inside & (armijo | shrinks)
        theta = torch.where((good & ~accepted)[:, None], candidate, theta)
        accepted = accepted | good
        if bool(accepted.all()):
            break
        fraction = torch.where(accepted, fraction, 0.5 * fraction)
    return theta


def _raise_not_converged(family, residual: Tensor, target: Tensor, batch_shape) -> None:
    converged = (residual.abs() <= NEWTON_TOLERANCE * (1.0 + target.abs())).all(-1)
    index = first_failure(converged.reshape(batch_shape))
    row = int(converged.logical_not().nonzero()[0, 0])
    raise RuntimeError(
        f"{family.__name__}.from_mean: Newton did not converge in {NEWTON_MAX_ITER} iterations "
        f"at batch index {list(index)} (flattened eta = {target[row].tolist()}, "
        f"|residual| = {residual[row].abs().max().item():.3g})"
    )


class _ImplicitNaturalFromMean(torch.autograd.Function):
    """``θ(η)`` with a known forward value and the implicit-function-theorem backward."""

    @staticmethod
    def forward(ctx: Any, family: type[ExponentialFamily], count: int, *tensors: Tensor):
        theta = tensors[count:]
        ctx.family = family
        ctx.save_for_backward(*theta)
        return tuple(t.clone() for t in theta)

    @staticmethod
    def backward(ctx: Any, *grad_theta: Tensor):
        family = ctx.family
        theta = ctx.saved_tensors
        ndims = family.natural_event_ndims
        flat_grad = flatten_event(grad_theta, ndims)
        flat_grad_eta = family._fisher_solve(theta, flat_grad)
        if bool((flat_grad.isfinite() & ~flat_grad_eta.isfinite()).any()):
            raise RuntimeError(
                f"{family.__name__}: the Fisher F(θ) is singular to working precision, so the "
                "derivative of θ(η) = F(θ)⁻¹ is undefined there; use float64 or less extreme η"
            )
        grad_eta = unflatten_event(flat_grad_eta, theta, ndims)
        return (None, None, *grad_eta, *(None for _ in theta))


def natural_from_mean_implicit(
    family: type[ExponentialFamily], eta: Params, theta: Params | None = None
) -> Params:
    """Differentiable ``θ(η)``: Newton forward (skipped if ``theta`` is given), implicit backward.

    Parameters
    ----------
    family : type of ExponentialFamily
        The family.
    eta : tuple of Tensor
        Mean parameters.
    theta : tuple of Tensor, optional
        The natural parameters of ``eta`` if already known.
    """
    if theta is None:
        theta = solve_natural_from_mean(family, eta, family._initial_natural(*eta))
    theta = tuple(t.detach() for t in theta)
    return _ImplicitNaturalFromMean.apply(family, len(eta), *eta, *theta)


class NewtonMeanInversion:
    """Mixin for families with no closed-form ``η → θ`` (Gamma, Beta, Dirichlet).

    ``θ(η)`` comes from :func:`natural_from_mean_implicit`: Newton's method forward, the
    implicit-function theorem backward. The family supplies ``_initial_natural`` (the start).
    """

    @classmethod
    def _natural_from_mean(cls, *eta: Tensor) -> Params:
        return natural_from_mean_implicit(cls, eta)

    @classmethod
    def _natural_from_mean_at(cls, eta: Params, theta: Params) -> Params:
        return natural_from_mean_implicit(cls, eta, theta)
