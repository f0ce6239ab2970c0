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
from natgrad.expfam.newton import NewtonMeanInversion

_EULER_GAMMA = 0.5772156649015329
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
        result = result - (torch.digamma(result) - value) / torch.polygamma(1, result)
    return result


def initial_concentration(mean_log: Tensor) -> Tensor:
    """Starting point for ``ψ(α) − ψ(α₀) = η`` (last dimension = the ``K`` classes).

    With ``ψ(a) ≈ log a − 1/(2a)`` the total is ``α₀ ≈ (K − 1) / (2 (1 − Σ exp η))``; each
    ``α_k = ψ⁻¹(ψ(α₀) + η_k)`` (Minka's fixed-point step); Newton's method corrects the rest.
    """
    count = mean_log.shape[-1]
    gap = 1.0 - torch.exp(mean_log).sum(-1, keepdim=True)
    total = (count - 1) / (2.0 * gap)
    return inverse_digamma(torch.digamma(total) + mean_log)


class Dirichlet(NewtonMeanInversion, ExponentialFamily):
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
    """

    natural_event_ndims = (1,)
    natural_names = ("theta",)
    mean_names = ("eta",)
    natural_domain = "theta > -1 with at least 2 entries"
    mean_domain = "sum(exp(eta)) < 1 with at least 2 entries"

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
        self._init_natural((concentration - 1.0,))

    @classmethod
    def log_partition_fn(cls, *theta: Tensor) -> Tensor:
        concentration = theta[0] + 1.0
        return torch.lgamma(concentration).sum(-1) - torch.lgamma(concentration.sum(-1))

    @classmethod
    def _mean_from_natural(cls, *theta: Tensor) -> Params:
        concentration = theta[0] + 1.0
        total = concentration.sum(-1, keepdim=True)
        return (torch.digamma(concentration) - torch.digamma(total),)

    @classmethod
    def _initial_natural(cls, *eta: Tensor) -> Params:
        return (initial_concentration(eta[0]) - 1.0,)

    @classmethod
    def _fisher_from_natural(cls, *theta: Tensor) -> Tensor:
        concentration = theta[0] + 1.0
        total = concentration.sum(-1)
        diagonal = torch.diag_embed(torch.polygamma(1, concentration))
        return diagonal - torch.polygamma(1, total)[..., None, None]

    @classmethod
    def _fisher_solve(cls, theta: Params, rhs: Tensor) -> Tensor:
        """``F⁻¹r`` in ``O(K)`` by Sherman–Morrison on ``F = D − c 11ᵀ``, ``D = diag(ψ′(α))``,
        ``c = ψ′(α₀)``: ``F⁻¹r = D⁻¹r + D⁻¹1 · c 1ᵀD⁻¹r / (1 − c 1ᵀD⁻¹1)``.

        Rows where the denominator is not positive (singular to working precision) are NaN.
        """
        concentration = theta[0] + 1.0
        inverse_diagonal = 1.0 / torch.polygamma(1, concentration)
        total = torch.polygamma(1, concentration.sum(-1, keepdim=True))
        denominator = 1.0 - total * inverse_diagonal.sum(-1, keepdim=True)
        scaled = inverse_diagonal * rhs
        correction = total * scaled.sum(-1, keepdim=True) / denominator
        solution = scaled + inverse_diagonal * correction
        return torch.where(denominator > 0, solution, math.nan)

    @classmethod
    def _fisher_diagonal(cls, theta: Params) -> Tensor:
        concentration = theta[0] + 1.0
        total = concentration.sum(-1, keepdim=True)
        return torch.polygamma(1, concentration) - torch.polygamma(1, total)

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
        """Concentrations ``α = θ + 1``, shape ``batch_shape + (K,)``."""
        return self._natural[0] + 1.0

    def sufficient_statistics(self, x: Tensor) -> Params:
        """``T(x) = log x``, ``x``'s shape (points of the simplex, last dimension ``K``)."""
        return (torch.log(x),)

    def to_torch(self) -> torch.distributions.Dirichlet:
        """``torch.distributions.Dirichlet(concentration)``."""
        return torch.distributions.Dirichlet(self.concentration, validate_args=False)
