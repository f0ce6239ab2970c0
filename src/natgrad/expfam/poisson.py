"""Poisson distribution ``p(x) = λˣ e⁻λ / x!`` on ``x ∈ {0, 1, 2, ...}``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad.expfam.base import ExponentialFamily, Params, require, require_finite
from natgrad.expfam.special import weighted_log_ratio_divergence

#: Rates above this use the asymptotic series of the entropy (error below 1e-13 there).
ENTROPY_ASYMPTOTIC_RATE = 1000.0
#: The exact entropy sums ``p(k) log k!`` over ``λ ± (12√λ + 30)`` (tail mass < 1e-30).
_ENTROPY_WINDOW_SDS = 12.0
_ENTROPY_WINDOW_PAD = 30.0


class Poisson(ExponentialFamily):
    """A batch of Poisson distributions with rates ``λ > 0``.

    Parameters
    ----------
    rate : Tensor
        Rates ``λ > 0``, any shape.
    validate : bool
        Check that the rates are finite and positive.

    Notes
    -----
    Scalar events. ``T(x) = x``, natural parameter ``θ = log λ``, mean parameter ``η = λ``,
    ``A(θ) = eᶿ``, base measure ``h(x) = 1/x!``, ``F(θ) = λ`` (shape ``batch_shape + (1, 1)``).
    ``torch.distributions.Poisson`` has no entropy; :meth:`entropy` sums ``−p(k) log p(k)``
    directly for ``λ ≤ ENTROPY_ASYMPTOTIC_RATE`` (the form ``A − θη + E[log x!]`` would lose
    digits to cancellation) and uses ``½ log(2πeλ) − 1/(12λ) − 1/(24λ²) − 19/(360λ³)`` above it.
    ``kl`` is ``λ_p φ(λ_q/λ_p − 1)`` with ``φ(x) = x − log(1 + x) ≥ 0`` and
    ``λ_q/λ_p − 1 = expm1(θ_q − θ_p)``, accurate to a few ulps relative; the Bregman form
    ``λ_q − λ_p − λ_p (θ_q − θ_p)`` came out negative, or off by factors up to 1e14, for
    nearby rates.
    """

    natural_event_ndims = (0,)
    natural_names = ("theta",)
    mean_names = ("eta",)
    natural_domain = "a finite theta"
    mean_domain = "eta > 0"

    def __init__(self, rate: Tensor | float, *, validate: bool = True) -> None:
        (rate,) = self._prepare((rate,), ("rate",))
        if validate:
            require_finite("Poisson", {"rate": rate})
            require(rate.detach() > 0, "Poisson: rate must be positive", {"rate": rate})
        self._init_natural((torch.log(rate),))

    @classmethod
    def log_partition_fn(cls, *theta: Tensor) -> Tensor:
        return torch.exp(theta[0])

    @classmethod
    def _mean_from_natural(cls, *theta: Tensor) -> Params:
        return (torch.exp(theta[0]),)

    @classmethod
    def _natural_from_mean(cls, *eta: Tensor) -> Params:
        return (torch.log(eta[0]),)

    @classmethod
    def _fisher_from_natural(cls, *theta: Tensor) -> Tensor:
        return torch.exp(theta[0])[..., None, None]

    @classmethod
    def _natural_in_domain(cls, *theta: Tensor) -> Tensor:
        return theta[0].isfinite()

    @classmethod
    def _mean_in_domain(cls, *eta: Tensor) -> Tensor:
        return eta[0] > 0

    @property
    def rate(self) -> Tensor:
        """Rates ``λ = eᶿ``, shape ``batch_shape``."""
        return torch.exp(self._natural[0])

    def _kl_same_family(self, other: ExponentialFamily) -> Tensor:
        """``λ_p φ(e^Δ − 1)`` with ``Δ = θ_q − θ_p`` (see the class notes)."""
        step = other.natural_params[0] - self._natural[0]
        return weighted_log_ratio_divergence(self.rate, torch.exp(other.natural_params[0]), step)

    def sufficient_statistics(self, x: Tensor) -> Params:
        """``T(x) = x`` (as floating point), ``x``'s shape."""
        return (x.to(self.dtype),)

    def log_base_measure(self, x: Tensor) -> Tensor:
        """``log h(x) = −log x!``."""
        return -torch.lgamma(x.to(self.dtype) + 1.0)

    def entropy(self) -> Tensor:
        """Entropy ``−Σ_k p(k) log p(k)``, shape ``batch_shape`` (see the class notes)."""
        rate = self.rate
        small = rate <= ENTROPY_ASYMPTOTIC_RATE
        exact = _entropy_by_summation(torch.where(small, rate, torch.ones_like(rate)))
        asymptotic = _entropy_asymptotic(torch.where(small, 2.0 * ENTROPY_ASYMPTOTIC_RATE, rate))
        return torch.where(small, exact, asymptotic)

    def to_torch(self) -> torch.distributions.Poisson:
        """``torch.distributions.Poisson(rate)``."""
        return torch.distributions.Poisson(self.rate, validate_args=False)


def _entropy_by_summation(rate: Tensor) -> Tensor:
    """``−Σ_k p(k) log p(k)`` over a window of ``k`` holding all but 1e-30 of the mass."""
    if rate.numel() == 0:
        return rate.clone()
    half_width = _ENTROPY_WINDOW_SDS * rate.detach().sqrt() + _ENTROPY_WINDOW_PAD
    start = torch.clamp(torch.floor(rate.detach() - half_width), min=0.0)
    width = int(torch.ceil(2.0 * half_width.max()).item()) + 1
    counts = start[..., None] + torch.arange(width, dtype=rate.dtype, device=rate.device)
    log_pmf = counts * torch.log(rate)[..., None] - rate[..., None] - torch.lgamma(counts + 1.0)
    return -(torch.exp(log_pmf) * log_pmf).sum(-1)


def _entropy_asymptotic(rate: Tensor) -> Tensor:
    """``½ log(2πeλ) − 1/(12λ) − 1/(24λ²) − 19/(360λ³)``, accurate to ~1e-13 for λ ≥ 1000."""
    return (
        0.5 * torch.log(2.0 * math.pi * math.e * rate)
        - 1.0 / (12.0 * rate)
        - 1.0 / (24.0 * rate.square())
        - 19.0 / (360.0 * rate.pow(3))
    )
