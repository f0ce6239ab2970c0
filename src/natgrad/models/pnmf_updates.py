"""Natural-gradient steps for q(F) and closed-form / stochastic updates for the loadings W.

``q(F) = Π N(μ_il, σ²_il)`` is held as a :class:`natgrad.expfam.Gaussian` in natural
parameters ``θ = (μ/σ², −1/(2σ²))``. Its natural gradient is the plain gradient with respect to
the mean parameters ``η = (μ, μ² + σ²)`` (seed 003), so a natural-gradient step on the loss
``L = −ELBO`` (summed over all entries) with step ``ρ`` is ``θ′ = θ − ρ ∇_η L``. In terms of the
precision ``P = 1/σ²`` and ``∂L/∂η = (g₁, g₂)`` this is

    d = 2 g₂,   P′ = P + ρ d,   μ′ = μ − ρ (g₁ + 2 μ g₂) / P′,

variational online Newton for the ``N(0, 1)`` prior (``P′ = (1 − ρ) P + ρ (1 − E[ℓ″])``).
Two safeguards make ``ρ ≈ 1`` usable:

- when ``d < 0`` (the Monte-Carlo curvature of the convex ``y·log Σ e^F`` term can make the
  estimate indefinite) the precision step takes the positive-definite-safe retraction of Lin,
  Schmidt & Khan (2020), ``P′ = P + ρ d + ρ² d² / (2P) = ((P + ρd)² + P²) / (2P) > 0``; when
  ``d ≥ 0`` the plain step is already positive and the second-order term, which would
  overshoot badly at ``ρ = 1``, is not added;
- the mean step is clipped elementwise to ``|μ′ − μ| ≤ max_mean_step``.

Entries whose new parameters are not finite keep their old values (the step is refused there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from natgrad.expfam import Gaussian


def gaussian_from_moments(mean: Tensor, variance: Tensor) -> Gaussian:
    """``q = N(mean, variance)`` stored in natural parameters ``(μ/σ², −1/(2σ²))``."""
    precision = 1.0 / variance
    return Gaussian.from_natural(precision * mean, -0.5 * precision, validate=False)


def mean_parameter_gradients(
    mean: Tensor, grad_mean: Tensor, grad_variance: Tensor
) -> tuple[Tensor, Tensor]:
    """``(∂L/∂η₁, ∂L/∂η₂)`` from ``∂L/∂μ`` and ``∂L/∂σ²`` (all of ``mean``'s shape).

    The chain rule through ``μ = η₁``, ``σ² = η₂ − η₁²`` in closed form:
    ``∂L/∂η₁ = ∂L/∂μ − 2μ ∂L/∂σ²``, ``∂L/∂η₂ = ∂L/∂σ²``; this avoids the cancellation of forming
    ``η₂ − η₁²`` in floating point.
    """
    return grad_mean - 2.0 * mean * grad_variance, grad_variance


def safe_precision_step(precision: Tensor, direction: Tensor, step_size: float) -> Tensor:
    """``P + ρd`` where ``d ≥ 0``; ``P + ρd + ρ²d²/(2P)`` (always positive) where ``d < 0``."""
    plain = precision + step_size * direction
    retracted = plain + (step_size * direction).square() / (2.0 * precision)
    return torch.where(direction >= 0, plain, retracted)


@dataclass(frozen=True)
class NaturalStep:
    """The result of one natural-gradient step on ``q(F)``.

    Attributes
    ----------
    mean, precision : Tensor
        ``μ′`` and ``P′ = 1/σ′²`` of the updated ``q``.
    n_refused : int
        Number of entries whose step was not finite and was therefore not taken.
    """

    mean: Tensor
    precision: Tensor
    n_refused: int

    @property
    def posterior(self) -> Gaussian:
        """The updated ``q`` in natural parameters."""
        return Gaussian.from_natural(
            self.precision * self.mean, -0.5 * self.precision, validate=False
        )


def natural_gradient_step(
    posterior: Gaussian,
    grad_eta1: Tensor,
    grad_eta2: Tensor,
    step_size: float,
    max_mean_step: float = 1.0,
) -> NaturalStep:
    """One natural-gradient step ``θ′ = θ − ρ ∇_η L`` on a diagonal Gaussian, safeguarded.

    Parameters
    ----------
    posterior : Gaussian
        Current ``q``, batch shape ``(N, L)``.
    grad_eta1, grad_eta2 : Tensor of shape (N, L)
        ``∂L/∂η`` of the loss ``L = −ELBO`` (summed, not averaged, over entries).
    step_size : float
        ``ρ`` in ``(0, 1]``.
    max_mean_step : float
        Elementwise bound on ``|μ′ − μ|``.
    """
    mean = posterior.loc
    grad_mean = grad_eta1 + 2.0 * mean * grad_eta2
    return moment_gradient_step(
        mean, posterior.precision, grad_mean, grad_eta2, step_size, max_mean_step
    )


def moment_gradient_step(
    mean: Tensor,
    precision: Tensor,
    grad_mean: Tensor,
    grad_variance: Tensor,
    step_size: float,
    max_mean_step: float = 1.0,
) -> NaturalStep:
    """:func:`natural_gradient_step` from ``∂L/∂μ`` and ``∂L/∂σ²`` instead of ``∂L/∂η``.

    With ``∂L/∂η₁ = ∂L/∂μ − 2μ ∂L/∂σ²`` and ``∂L/∂η₂ = ∂L/∂σ²`` the step ``θ′ = θ − ρ ∇_η L``
    is ``P′ = P + 2ρ ∂L/∂σ²`` (safeguarded) and ``μ′ = μ − ρ (∂L/∂μ) / P′`` (clipped), so the
    chain rule through ``η`` need not be formed.

    Parameters
    ----------
    mean, precision : Tensor of shape (N, L)
        ``μ`` and ``P = 1/σ²`` of the current ``q``.
    grad_mean, grad_variance : Tensor of shape (N, L)
        ``∂L/∂μ`` and ``∂L/∂σ²`` of the loss ``L = −ELBO`` (summed over entries).
    step_size, max_mean_step : float
        As in :func:`natural_gradient_step`.
    """
    new_precision = safe_precision_step(precision, 2.0 * grad_variance, step_size)
    mean_step = (-step_size * grad_mean / new_precision).clamp(-max_mean_step, max_mean_step)
    new_mean = mean + mean_step
    # θ₁ = P′μ′ is finite iff both are (P′ > 0 checked separately; inf · 0 is nan)
    accepted = torch.isfinite(new_precision * new_mean) & (new_precision > 0)
    n_refused = accepted.numel() - int(accepted.sum())
    if n_refused:
        new_mean = torch.where(accepted, new_mean, mean)
        new_precision = torch.where(accepted, new_precision, precision)
    return NaturalStep(new_mean, new_precision, n_refused)


LOADINGS_FLOOR = 1e-10
"""Lower bound on every ``W_jl``: keeps ``rate_ij ≥ 1e-10 e^{max_l F_il}`` so that the
curvature term ``y / rate²`` stays finite in float32; rates below it are immaterial for counts."""


def multiplicative_loadings(numerator: Tensor, denominator: Tensor) -> Tensor:
    """The loadings maximising the ELBO's minorizer: ``W_jl = numerator_jl / denominator_l``.

    The result is floored at :data:`LOADINGS_FLOOR`.

    Parameters
    ----------
    numerator : Tensor of shape (D, L)
        ``Σ_i y_ij E_q[r_ijl]`` (:func:`natgrad.models.pnmf_elbo.loadings_numerator`).
    denominator : Tensor of shape (L,)
        ``Σ_i E_q[e^{F_il}]``.
    """
    tiny = torch.finfo(numerator.dtype).tiny
    return (numerator / denominator.clamp_min(tiny)).clamp_min(LOADINGS_FLOOR)


def robbins_monro_rate(step: int, delay: float = 1.0, forgetting: float = 0.6) -> float:
    """``ρ_t = (t + delay)^(−forgetting)``; ``Σρ_t = ∞``, ``Σρ_t² < ∞`` for forgetting in (½, 1]."""
    return float((step + delay) ** (-forgetting))


def robbins_monro_update(running: Tensor, estimate: Tensor, rate: float) -> Tensor:
    """``(1 − ρ) running + ρ estimate`` for a global statistic (``estimate`` already × N/B)."""
    return (1.0 - rate) * running + rate * estimate
