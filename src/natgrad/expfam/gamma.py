"""Gamma distribution ``p(x) = βᵅ xᵅ⁻¹ e⁻ᵝˣ / Γ(α)`` on ``x > 0``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad.expfam.base import ExponentialFamily, Params, require, require_finite
from natgrad.expfam.newton import NewtonMeanInversion
from natgrad.expfam.special import (
    stirling_remainder,
    stirling_remainder_bregman,
    trigamma,
    x_minus_log1p,
)

_HALF_LOG_TWO_PI_E = 0.5 * (1.0 + math.log(2.0 * math.pi))


class Gamma(NewtonMeanInversion, ExponentialFamily):
    """A batch of Gamma distributions with shape ``α > 0`` and rate ``β > 0``.

    Parameters
    ----------
    concentration : Tensor
        Shape parameters ``α > 0``, any shape.
    rate : Tensor
        Rate parameters ``β > 0``, broadcastable with ``concentration``.
    validate : bool
        Check that the parameters are finite and positive.

    Notes
    -----
    Scalar events.

    - ``T(x) = (log x, x)``; natural parameters ``θ = (α − 1, −β)`` with ``θ₁ > −1``,
      ``θ₂ < 0``; base measure ``h = 1``.
    - ``A(θ) = log Γ(θ₁ + 1) − (θ₁ + 1) log(−θ₂)``.
    - Mean parameters ``η = (ψ(α) − log β, α/β)``; the mean space is ``log η₂ > η₁``.
    - ``F(θ) = [[ψ′(α), 1/β], [1/β, α/β²]]``.
    - ``from_mean`` has no closed form: it solves ``log α − ψ(α) = log η₂ − η₁`` by the guarded
      Newton iteration of :mod:`natgrad.expfam.newton` (start: Minka's approximation).
    - ``ψ′`` is :func:`natgrad.expfam.special.trigamma` (``torch.polygamma`` is only accurate to
      about 5e-10). ``kl`` and ``entropy`` use forms through Stirling's remainder ``μ`` with no
      cancellation (the generic forms through ``A(θ)`` cancel terms of size ``α log α`` and lose
      up to all digits for large ``α`` or nearby distributions).
    """

    natural_event_ndims = (0, 0)
    natural_names = ("theta1", "theta2")
    mean_names = ("eta1", "eta2")
    natural_domain = "theta1 > -1 and theta2 < 0"
    mean_domain = "eta2 > 0 and log(eta2) > eta1"

    def __init__(
        self, concentration: Tensor | float, rate: Tensor | float, *, validate: bool = True
    ) -> None:
        concentration, rate = self._prepare((concentration, rate), ("concentration", "rate"))
        if validate:
            values = {"concentration": concentration, "rate": rate}
            require_finite("Gamma", values)
            positive = (concentration.detach() > 0) & (rate.detach() > 0)
            require(positive, "Gamma: concentration and rate must be positive", values)
        self._init_natural((concentration - 1.0, -rate))

    @classmethod
    def log_partition_fn(cls, *theta: Tensor) -> Tensor:
        theta1, theta2 = theta
        return torch.lgamma(theta1 + 1.0) - (theta1 + 1.0) * torch.log(-theta2)

    @classmethod
    def _mean_from_natural(cls, *theta: Tensor) -> Params:
        concentration, rate = theta[0] + 1.0, -theta[1]
        return torch.digamma(concentration) - torch.log(rate), concentration / rate

    @classmethod
    def _initial_natural(cls, *eta: Tensor) -> Params:
        """Minka's start ``α ≈ (3 − s + √((s − 3)² + 24s)) / (12s)``, ``s = log η₂ − η₁``."""
        gap = torch.log(eta[1]) - eta[0]
        concentration = (3.0 - gap + torch.sqrt((gap - 3.0).square() + 24.0 * gap)) / (12.0 * gap)
        return concentration - 1.0, -concentration / eta[1]

    @classmethod
    def _fisher_from_natural(cls, *theta: Tensor) -> Tensor:
        concentration, rate = theta[0] + 1.0, -theta[1]
        off_diagonal = 1.0 / rate
        rows = (
            torch.stack((trigamma(concentration), off_diagonal), -1),
            torch.stack((off_diagonal, concentration / rate.square()), -1),
        )
        return torch.stack(rows, -2)

    @classmethod
    def _natural_in_domain(cls, *theta: Tensor) -> Tensor:
        return (theta[0] > -1) & (theta[1] < 0)

    @classmethod
    def _mean_in_domain(cls, *eta: Tensor) -> Tensor:
        return (eta[1] > 0) & (torch.log(eta[1]) > eta[0])

    @property
    def concentration(self) -> Tensor:
        """Shape parameters ``α = θ₁ + 1``, shape ``batch_shape``."""
        return self._natural[0] + 1.0

    @property
    def rate(self) -> Tensor:
        """Rate parameters ``β = −θ₂``, shape ``batch_shape``."""
        return -self._natural[1]

    def entropy(self) -> Tensor:
        """``H = ½ log α − log β + ½(1 + log 2π) − 1/(2α) + μ(α) + (1 − α) μ′(α)``.

        This is ``α − log β + log Γ(α) + (1 − α) ψ(α)`` with Stirling's formula, where ``μ`` is
        :func:`~natgrad.expfam.special.stirling_remainder`; shape ``batch_shape``.
        """
        concentration = self.concentration
        remainder = stirling_remainder(concentration)
        slope = stirling_remainder(concentration, derivative=1)
        return (
            0.5 * torch.log(concentration)
            - torch.log(self.rate)
            + _HALF_LOG_TWO_PI_E
            - 0.5 / concentration
            + remainder
            + (1.0 - concentration) * slope
        )

    def _kl_same_family(self, other: ExponentialFamily) -> Tensor:
        """``KL(p ‖ q) = α_q φ(m_p/m_q − 1) + ½ φ(α_q/α_p − 1) + D_μ(α_q, α_p)``.

        ``m = α/β`` is the mean, ``φ(x) = x − log(1 + x)`` and ``D_μ`` the Bregman divergence
        of Stirling's remainder (:mod:`natgrad.expfam.special`); all three terms are
        non-negative, so nothing cancels. For nearby distributions the relative changes are
        formed from differences of the natural parameters (exact there), otherwise from
        quotients.
        """
        concentration, rate = self.concentration, self.rate
        other_concentration, other_rate = other.natural_params[0] + 1.0, -other.natural_params[1]
        shape_step = other.natural_params[0] - self._natural[0]
        shape_change = shape_step / concentration
        rate_change = (self._natural[1] - other.natural_params[1]) / rate
        mean_ratio = (concentration / rate) / (other_concentration / other_rate)
        mean_change = torch.where(
            rate_change.abs() + shape_change.abs() <= 1.0,
            (rate_change - shape_change) * concentration / other_concentration,
            mean_ratio - 1.0,
        )
        shape_ratio = other_concentration / concentration
        return (
            other_concentration * x_minus_log1p(mean_change, mean_ratio)
            + 0.5 * x_minus_log1p(shape_change, shape_ratio)
            + stirling_remainder_bregman(concentration, other_concentration, shape_step)
        )

    def sufficient_statistics(self, x: Tensor) -> Params:
        """``T(x) = (log x, x)``, each of ``x``'s shape."""
        return torch.log(x), x

    def to_torch(self) -> torch.distributions.Gamma:
        """``torch.distributions.Gamma(concentration, rate)``."""
        return torch.distributions.Gamma(self.concentration, self.rate, validate_args=False)
