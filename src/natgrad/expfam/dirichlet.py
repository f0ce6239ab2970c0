"""Dirichlet distribution ``p(x) = Γ(α₀) / Π Γ(α_k) · Π x_k^{α_k − 1}`` on the simplex."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad.expfam.base import (
    ExponentialFamily,
    Params,
    as_float_tensor,
    require,
    require_finite,
)
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

_EULER_GAMMA = 0.5772156649015329
_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
_HALF_LOG_TWO_PI_E = 0.5 + _HALF_LOG_TWO_PI
#: ``log_prob`` uses Stirling's form where every ``|x_k/m_k − 1| ≤`` this (``m = α/α₀``).
NEAR_MEAN = 0.5
_INVERSE_DIGAMMA_STEPS = 5


def inverse_digamma(value: Tensor) -> Tensor:
    """``x > 0`` with ``ψ(x) = value``: Minka's starting point and five Newton steps."""
    start = torch.where(
        value >= -2.22,
        torch.exp(value) + 0.5,
        -1.0 / (value + _EULER_GAMMA),
    )
    result = start
    for _ in range(_INVERSE_DIGAMMA_STEPS):
        result = result - (torch.digamma(result) - value) / trigamma(result)
    return result


def dirichlet_kl(concentration: Tensor, other_concentration: Tensor, step: Tensor) -> Tensor:
    """``KL(Dir(α) ‖ Dir(β))`` without cancellation; last dimension = the ``K`` classes.

    With ``s = (β − α)/α``, ``s₀ = (β₀ − α₀)/α₀`` and ``w = (s₀ − s) α/β`` (``β₀ = Σ β``),
    ``KL = Σ β φ(w) + ½ (Σ φ(s) − φ(s₀)) + Σ D_μ(β, α) − D_μ(β₀, α₀)``, where
    ``φ(x) = x − log(1 + x)`` and ``D_μ`` is the Bregman divergence of Stirling's remainder
    (:mod:`natgrad.expfam.special`). The first sum is ``β₀`` times the KL between the mean
    vectors, the second is non-negative by Jensen; the ``D_μ`` terms are ``O(1/α)`` smaller.

    Parameters
    ----------
    concentration, other_concentration : Tensor
        ``α`` and ``β``, shape ``batch_shape + (K,)``.
    step : Tensor
        ``β − α`` formed from the natural parameters (exact for nearby distributions).

    Returns
    -------
    Tensor
        Shape ``batch_shape``.
    """
    count = concentration.shape[-1]
    total, total_step = concentration.sum(-1, keepdim=True), step.sum(-1, keepdim=True)
    other_total = other_concentration.sum(-1, keepdim=True)
    change, total_change = step / concentration, total_step / total
    total_ratio = other_total / total
    mean_ratio = (concentration / other_concentration) * total_ratio
    relative_mean_change = mean_change(
        total_change, change, concentration, other_concentration, mean_ratio
    )
    ratio = other_concentration / concentration
    phi = x_minus_log1p(
        torch.cat((relative_mean_change, change, total_change), -1),
        torch.cat((mean_ratio, ratio, total_ratio), -1),
    )
    mean_term = (other_concentration * phi[..., :count]).sum(-1)
    spread_term = 0.5 * (phi[..., count:-1].sum(-1) - phi[..., -1])
    remainders = stirling_remainder_bregman(
        torch.cat((concentration, total), -1),
        torch.cat((other_concentration, other_total), -1),
        torch.cat((step, total_step), -1),
    )
    return mean_term + spread_term + remainders[..., :-1].sum(-1) - remainders[..., -1]


def dirichlet_entropy(concentration: Tensor) -> Tensor:
    """Entropy of ``Dir(α)`` through Stirling's formula; last dimension = the ``K`` classes.

    ``H = ½ Σ log(α/α₀) − ½(K − 1) log α₀ + (K − 1)·½(1 + log 2π) + K/(2α₀) − ½ Σ 1/α
    + Σ (μ(α) + (1 − α) μ′(α)) − μ(α₀) − (K − α₀) μ′(α₀)``, which is
    ``Σ log Γ(α) − log Γ(α₀) + (α₀ − K) ψ(α₀) − Σ (α − 1) ψ(α)`` without its cancellation
    of terms of size ``α log α``. ``μ`` and ``μ′`` need only an absolute accuracy here and come
    from :func:`~natgrad.expfam.special.stirling_remainder_coarse_derivatives`.

    Returns
    -------
    Tensor
        Shape ``batch_shape``.
    """
    count = concentration.shape[-1]
    total = concentration.sum(-1, keepdim=True)
    logs = 0.5 * torch.log(concentration / total).sum(-1)
    reciprocals = 0.5 * count / total[..., 0] - 0.5 * concentration.reciprocal().sum(-1)
    table = stirling_remainder_coarse_derivatives(torch.cat((concentration, total), -1))
    weights = torch.cat((1.0 - concentration, count - total), -1)
    terms = table[0] + weights * table[1]
    return (
        logs
        - 0.5 * (count - 1) * torch.log(total[..., 0])
        + (count - 1) * _HALF_LOG_TWO_PI_E
        + reciprocals
        + terms[..., :-1].sum(-1)
        - terms[..., -1]
    )


def dirichlet_log_prob(concentration: Tensor, x: Tensor) -> Tensor:
    """``log p(x)`` of ``Dir(α)`` near its mean, without cancellation; last dimension = classes.

    With ``m = α/α₀`` and ``s = x/m − 1``: ``log p = −Σ α φ(s) − Σ log x + ½ Σ log α
    − ½ log α₀ − (K − 1) ½ log 2π − Σ μ(α) + μ(α₀)`` (Stirling's formula, ``φ(s) = s −
    log(1 + s) ≥ 0``, ``μ`` :func:`~natgrad.expfam.special.stirling_remainder_coarse`). The
    linear terms ``Σ α s = α₀ (Σ x − 1)`` vanish on the simplex and are left out, so a point
    whose coordinates sum to ``1 ± ε`` is taken as the point of the simplex it rounds.

    Parameters
    ----------
    concentration : Tensor
        ``α``, shape ``batch_shape + (K,)``.
    x : Tensor
        Points with ``|x/m − 1| ≤ ½``, broadcastable with ``concentration``.

    Returns
    -------
    Tensor
        The broadcast leading shape.
    """
    count = concentration.shape[-1]
    total = concentration.sum(-1, keepdim=True)
    mean = concentration / total
    change = (x - mean) / mean
    remainders = stirling_remainder_coarse(torch.cat((concentration, total), -1))
    logs = 0.5 * torch.log(concentration).sum(-1) - 0.5 * torch.log(total[..., 0])
    return (
        (logs - torch.log(x).sum(-1))
        - ((count - 1) * _HALF_LOG_TWO_PI + remainders[..., :-1].sum(-1) - remainders[..., -1])
        - (concentration * x_minus_log1p_small(change)).sum(-1)
    )


def initial_concentration(mean_log: Tensor) -> Tensor:
    """Starting point for ``ψ(α) − ψ(α₀) = η`` (last dimension = the ``K`` classes).

    With ``ψ(a) ≈ log a − 1/(2a)`` the total is ``α₀ ≈ (K − 1) / (2 (1 − Σ exp η))``; each
    ``α_k = ψ⁻¹(ψ(α₀) + η_k)`` (Minka's fixed-point step); Newton's method corrects the rest.
    """
    count = mean_log.shape[-1]
    gap = 1.0 - torch.exp(mean_log).sum(-1, keepdim=True)
    total = (count - 1) / (2.0 * gap)
    return inverse_digamma(torch.digamma(total) + mean_log)


class Dirichlet(NewtonMeanInversion, ConcentrationFamily):
    """A batch of Dirichlet distributions over the ``(K − 1)``-simplex.

    Parameters
    ----------
    concentration : Tensor
        Concentrations ``α > 0``, shape ``batch_shape + (K,)`` with ``K ≥ 2``.
    validate : bool
        Check that the concentrations are finite and positive.

    Notes
    -----
    - ``T(x) = log x`` (all ``K`` coordinates); natural parameters ``θ = α − 1 > −1``;
      base measure ``h = 1``.
    - ``A(θ) = Σ_k log Γ(α_k) − log Γ(α₀)`` with ``α₀ = Σ_k α_k``.
    - Mean parameters ``η = ψ(α) − ψ(α₀)``; the mean space is ``Σ_k exp(η_k) < 1``.
    - ``F(θ) = diag(ψ′(α)) − ψ′(α₀) 11ᵀ``; solves with it (the Newton steps of ``from_mean``
      and the backward pass of ``θ(η)``) use Sherman–Morrison, ``O(K)`` per event.
    - ``from_mean`` has no closed form: it uses the guarded Newton iteration of
      :mod:`natgrad.expfam.newton`.
    - ``ψ′`` is :func:`natgrad.expfam.special.trigamma`; ``kl`` and ``entropy`` are
      :func:`dirichlet_kl` and :func:`dirichlet_entropy`, which avoid the cancellation of
      terms of size ``α log α`` in the generic forms through ``A(θ)``.
    - ``log_prob`` where every ``|x_k/m_k − 1| ≤ ½`` (``m = α/α₀``, the mean) and
      ``α₀ ≥ STIRLING_START`` (10) is :func:`dirichlet_log_prob`: the generic
      ``Σ (α − 1) log x − A(θ)`` cancels terms of size ``α₀ log α₀``. Farther out
      ``|log p| ≥ 0.09 min(α)`` and the generic form is kept; below ``α₀ = 10`` it is as
      accurate (:data:`~natgrad.expfam.concentration.STIRLING_START`).
    - Built from ``concentration``, it keeps it and derives everything from it
      (:mod:`natgrad.expfam.concentration`): ``θ = α − 1`` alone loses ``α < 1`` in float32.
    """

    natural_event_ndims = (1,)
    natural_names = ("theta",)
    mean_names = ("eta",)
    natural_domain = "theta > -1 with at least 2 entries"
    mean_domain = "sum(exp(eta)) < 1 with at least 2 entries"
    concentration_count = 1

    def __init__(self, concentration: Tensor, *, validate: bool = True) -> None:
        concentration = as_float_tensor(concentration, "concentration")
        if concentration.ndim < 1 or concentration.shape[-1] < 2:
            raise ValueError(
                "Dirichlet: concentration needs a last dimension of at least 2, "
                f"got shape {tuple(concentration.shape)}"
            )
        if validate:
            values = {"concentration": concentration}
            require_finite("Dirichlet", values)
            positive = (concentration.detach() > 0).all(-1)
            require(positive, "Dirichlet: concentration must be positive", values)
        self._init_concentrations((concentration,), (concentration - 1.0,))

    @classmethod
    def log_partition_fn(cls, *theta: Tensor) -> Tensor:
        return _log_partition(theta[0] + 1.0)

    @classmethod
    def _mean_from_natural(cls, *theta: Tensor) -> Params:
        return (_mean_log(theta[0] + 1.0),)

    @classmethod
    def _initial_natural(cls, *eta: Tensor) -> Params:
        return (initial_concentration(eta[0]) - 1.0,)

    @classmethod
    def _fisher_from_natural(cls, *theta: Tensor) -> Tensor:
        return _fisher(theta[0] + 1.0)

    @classmethod
    def _fisher_solve(cls, theta: Params, rhs: Tensor) -> Tensor:
        """``F⁻¹r`` in ``O(K)`` by Sherman–Morrison on ``F = D − c 11ᵀ``, ``D = diag(ψ′(α))``,
        ``c = ψ′(α₀)``: ``F⁻¹r = D⁻¹r + D⁻¹1 · c 1ᵀD⁻¹r / (1 − c 1ᵀD⁻¹1)``.

        Rows where the denominator is not positive (singular to working precision) are NaN.
        """
        concentration = theta[0] + 1.0
        inverse_diagonal = 1.0 / trigamma(concentration)
        total = trigamma(concentration.sum(-1, keepdim=True))
        denominator = 1.0 - total * inverse_diagonal.sum(-1, keepdim=True)
        scaled = inverse_diagonal * rhs
        correction = total * scaled.sum(-1, keepdim=True) / denominator
        solution = scaled + inverse_diagonal * correction
        return torch.where(denominator > 0, solution, math.nan)

    @classmethod
    def _fisher_diagonal(cls, theta: Params) -> Tensor:
        concentration = theta[0] + 1.0
        total = concentration.sum(-1, keepdim=True)
        return trigamma(concentration) - trigamma(total)

    @classmethod
    def _natural_in_domain(cls, *theta: Tensor) -> Tensor:
        inside = (theta[0] > -1).all(-1)
        return inside if theta[0].shape[-1] >= 2 else torch.zeros_like(inside)

    @classmethod
    def _mean_in_domain(cls, *eta: Tensor) -> Tensor:
        inside = torch.exp(eta[0]).sum(-1) < 1
        return inside if eta[0].shape[-1] >= 2 else torch.zeros_like(inside)

    @property
    def concentration(self) -> Tensor:
        """Concentrations ``α`` (as given, else ``θ + 1``), shape ``batch_shape + (K,)``."""
        return self._concentrations()[0]

    @property
    def mean_params(self) -> Params:
        """``η = ψ(α) − ψ(α₀)``, from the concentrations."""
        return (_mean_log(self.concentration),)

    def log_partition(self) -> Tensor:
        """``A = Σ log Γ(α) − log Γ(α₀)``, shape ``batch_shape``."""
        return _log_partition(self.concentration)

    def fisher(self) -> Tensor:
        """``F = diag(ψ′(α)) − ψ′(α₀) 11ᵀ``, shape ``batch_shape + (K, K)``."""
        return _fisher(self.concentration)

    def entropy(self) -> Tensor:
        """Entropy, shape ``batch_shape`` (see :func:`dirichlet_entropy`)."""
        return dirichlet_entropy(self.concentration)

    def _kl_same_family(self, other: ExponentialFamily) -> Tensor:
        """See :func:`dirichlet_kl`."""
        if other.natural_params[0].shape[-1] != self._natural[0].shape[-1]:
            raise ValueError(
                "kl needs two Dirichlet distributions with the same number of classes, got "
                f"{self._natural[0].shape[-1]} and {other.natural_params[0].shape[-1]}"
            )
        (step,) = self._concentration_steps(other)
        return dirichlet_kl(self.concentration, other.concentration, step)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)``, shape ``x``'s leading shape; see the class notes for its two forms.

        :func:`dirichlet_log_prob` is evaluated only at the entries that need it.
        """
        concentration = self.concentration
        total = concentration.detach().sum(-1, keepdim=True)
        large = total[..., 0] >= STIRLING_START
        if not bool(large.any()):
            return super().log_prob(x)
        mean = concentration.detach() / total
        near = ((x.detach() - mean).abs() <= NEAR_MEAN * mean).all(-1)
        return evaluate_where(
            large & near,
            dirichlet_log_prob,
            (concentration, x),
            lambda: super(Dirichlet, self).log_prob(x),
            event_ndims=1,
        )

    def sufficient_statistics(self, x: Tensor) -> Params:
        """``T(x) = log x``, ``x``'s shape (points of the simplex, last dimension ``K``)."""
        return (torch.log(x),)

    def to_torch(self) -> torch.distributions.Dirichlet:
        """``torch.distributions.Dirichlet(concentration)``."""
        return torch.distributions.Dirichlet(self.concentration, validate_args=False)


def _log_partition(concentration: Tensor) -> Tensor:
    return torch.lgamma(concentration).sum(-1) - torch.lgamma(concentration.sum(-1))


def _mean_log(concentration: Tensor) -> Tensor:
    total = concentration.sum(-1, keepdim=True)
    return torch.digamma(concentration) - torch.digamma(total)


def _fisher(concentration: Tensor) -> Tensor:
    diagonal = torch.diag_embed(trigamma(concentration))
    return diagonal - trigamma(concentration.sum(-1))[..., None, None]
