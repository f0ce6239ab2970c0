"""Gamma distribution ``p(x) = βᵅ xᵅ⁻¹ e⁻ᵝˣ / Γ(α)`` on ``x > 0``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad.expfam.base import ExponentialFamily, Params, require, require_finite
from natgrad.expfam.concentration import (
    STIRLING_START,
    ConcentrationFamily,
    evaluate_where,
    mean_change,
)
from natgrad.expfam.newton import NewtonMeanInversion
from natgrad.expfam.special import (
    stirling_remainder_bregman,
    stirling_remainder_coarse,
    stirling_remainder_coarse_derivatives,
    trigamma,
    x_minus_log1p,
    x_minus_log1p_small,
)

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
_HALF_LOG_TWO_PI_E = 0.5 + _HALF_LOG_TWO_PI
#: ``log_prob`` uses Stirling's form where ``|βx/α − 1| ≤`` this.
NEAR_MODE = 0.5


class Gamma(NewtonMeanInversion, ConcentrationFamily):
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
    - ``log_prob`` near the mean (``|βx/α − 1| ≤ ½``) for ``α ≥ STIRLING_START`` (10) is
      ``−α φ(βx/α − 1) + ½ log α − log x − ½ log 2π − μ(α)`` with ``φ(s) = s − log(1 + s)``:
      the generic ``(α − 1) log x + α log β − βx − log Γ(α)`` cancels terms of size
      ``α log α`` (2e-3 off at ``α = 1e12``; this form stays within a few ulps of
      ``1 + |log p| + |α − 1 − βx|``, the last term being the rounding of ``x``: 7e-11 there).
      Farther out ``|log p| ≥ 0.09 α`` and the generic form keeps its relative accuracy; below
      ``α = 10`` it is as accurate (:data:`~natgrad.expfam.concentration.STIRLING_START`).
    - Built from ``concentration``, it keeps it and derives everything from it
      (:mod:`natgrad.expfam.concentration`): ``θ₁ = α − 1`` alone loses ``α < 1`` in float32.
    """

    natural_event_ndims = (0, 0)
    natural_names = ("theta1", "theta2")
    mean_names = ("eta1", "eta2")
    natural_domain = "theta1 > -1 and theta2 < 0"
    mean_domain = "eta2 > 0 and log(eta2) > eta1"
    concentration_count = 1

    def __init__(
        self, concentration: Tensor | float, rate: Tensor | float, *, validate: bool = True
    ) -> None:
        concentration, rate = self._prepare((concentration, rate), ("concentration", "rate"))
        if validate:
            values = {"concentration": concentration, "rate": rate}
            require_finite("Gamma", values)
            positive = (concentration.detach() > 0) & (rate.detach() > 0)
            require(positive, "Gamma: concentration and rate must be positive", values)
        self._init_concentrations((concentration,), (concentration - 1.0, -rate))

    @classmethod
    def log_partition_fn(cls, *theta: Tensor) -> Tensor:
        return _log_partition(theta[0] + 1.0, -theta[1])

    @classmethod
    def _mean_from_natural(cls, *theta: Tensor) -> Params:
        return _mean(theta[0] + 1.0, -theta[1])

    @classmethod
    def _initial_natural(cls, *eta: Tensor) -> Params:
        """Minka's start ``α ≈ (3 − s + √((s − 3)² + 24s)) / (12s)``, ``s = log η₂ − η₁``."""
        gap = torch.log(eta[1]) - eta[0]
        concentration = (3.0 - gap + torch.sqrt((gap - 3.0).square() + 24.0 * gap)) / (12.0 * gap)
        return concentration - 1.0, -concentration / eta[1]

    @classmethod
    def _fisher_from_natural(cls, *theta: Tensor) -> Tensor:
        return _fisher(theta[0] + 1.0, -theta[1])

    @classmethod
    def _natural_in_domain(cls, *theta: Tensor) -> Tensor:
        return (theta[0] > -1) & (theta[1] < 0)

    @classmethod
    def _mean_in_domain(cls, *eta: Tensor) -> Tensor:
        return (eta[1] > 0) & (torch.log(eta[1]) > eta[0])

    @property
    def concentration(self) -> Tensor:
        """Shape parameters ``α`` (as given, else ``θ₁ + 1``), shape ``batch_shape``."""
        return self._concentrations()[0]

    @property
    def rate(self) -> Tensor:
        """Rate parameters ``β = −θ₂``, shape ``batch_shape``."""
        return -self._natural[1]

    @property
    def mean_params(self) -> Params:
        """``η = (ψ(α) − log β, α/β)``, from the concentration."""
        return _mean(self.concentration, self.rate)

    def log_partition(self) -> Tensor:
        """``A = log Γ(α) − α log β``, shape ``batch_shape``."""
        return _log_partition(self.concentration, self.rate)

    def fisher(self) -> Tensor:
        """``F = [[ψ′(α), 1/β], [1/β, α/β²]]``, shape ``batch_shape + (2, 2)``."""
        return _fisher(self.concentration, self.rate)

    def entropy(self) -> Tensor:
        """``H = ½ log α − log β + ½(1 + log 2π) − 1/(2α) + μ(α) + (1 − α) μ′(α)``.

        This is ``α − log β + log Γ(α) + (1 − α) ψ(α)`` with Stirling's formula, where ``μ`` is
        Stirling's remainder (:mod:`natgrad.expfam.special`), free of the cancellation of terms
        of size ``α log α``; ``μ`` and ``μ′`` need only an absolute accuracy here and come from
        :func:`~natgrad.expfam.special.stirling_remainder_coarse_derivatives`. Shape
        ``batch_shape``.
        """
        concentration = self.concentration
        table = stirling_remainder_coarse_derivatives(concentration)
        return (
            0.5 * torch.log(concentration)
            - torch.log(self.rate)
            + _HALF_LOG_TWO_PI_E
            - 0.5 / concentration
            + table[0]
            + (1.0 - concentration) * table[1]
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
        other_concentration, other_rate = other.concentration, other.rate
        (shape_step,) = self._concentration_steps(other)
        shape_change = shape_step / concentration
        rate_change = (self._natural[1] - other.natural_params[1]) / rate
        mean_ratio = (concentration / rate) / (other_concentration / other_rate)
        relative_mean_change = mean_change(
            rate_change, shape_change, concentration, other_concentration, mean_ratio
        )
        shape_ratio = other_concentration / concentration
        changes = x_minus_log1p(
            torch.stack((relative_mean_change, shape_change)),
            torch.stack((mean_ratio, shape_ratio)),
        )
        return (
            other_concentration * changes[0]
            + 0.5 * changes[1]
            + stirling_remainder_bregman(concentration, other_concentration, shape_step)
        )

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)``, shape ``x``'s leading shape; see the class notes for its two forms.

        Stirling's form is evaluated only at the entries that need it.
        """
        concentration, rate = self.concentration, self.rate
        large = concentration.detach() >= STIRLING_START
        if not bool(large.any()):
            return super().log_prob(x)
        change = rate.detach() * x.detach() / concentration.detach() - 1.0
        return evaluate_where(
            large & (change.abs() <= NEAR_MODE),
            _log_prob_near_mode,
            (concentration, rate, x),
            lambda: super(Gamma, self).log_prob(x),
        )

    def sufficient_statistics(self, x: Tensor) -> Params:
        """``T(x) = (log x, x)``, each of ``x``'s shape."""
        return torch.log(x), x

    def to_torch(self) -> torch.distributions.Gamma:
        """``torch.distributions.Gamma(concentration, rate)``."""
        return torch.distributions.Gamma(self.concentration, self.rate, validate_args=False)


def _log_prob_near_mode(concentration: Tensor, rate: Tensor, x: Tensor) -> Tensor:
    """``−α φ(βx/α − 1) + ½ log α − log x − ½ log 2π − μ(α)``, for ``|βx/α − 1| ≤ ½``."""
    return (
        (0.5 * torch.log(concentration) - torch.log(x))
        - (_HALF_LOG_TWO_PI + stirling_remainder_coarse(concentration))
        - concentration * x_minus_log1p_small(rate * x / concentration - 1.0)
    )


def _log_partition(concentration: Tensor, rate: Tensor) -> Tensor:
    return torch.lgamma(concentration) - concentration * torch.log(rate)


def _mean(concentration: Tensor, rate: Tensor) -> Params:
    return torch.digamma(concentration) - torch.log(rate), concentration / rate


def _fisher(concentration: Tensor, rate: Tensor) -> Tensor:
    off_diagonal = 1.0 / rate
    rows = (
        torch.stack((trigamma(concentration), off_diagonal), -1),
        torch.stack((off_diagonal, concentration / rate.square()), -1),
    )
    return torch.stack(rows, -2)
