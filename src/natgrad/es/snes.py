"""Separable natural evolution strategies, SNES (Schaul et al. 2011)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad._validation import positive_float, positive_int
from natgrad.es.base import NaturalEvolutionStrategy
from natgrad.es.state_checks import check_positive


def snes_natural_gradient(noise: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Natural gradient of ``E[w]`` for ``N(μ, diag σ²)`` in the coordinates ``(μ/σ, log σ)``.

    With ``x = μ + σ ⊙ s`` the estimates are ``∇_μ = Σₖ wₖ sₖ`` and
    ``∇_σ = Σₖ wₖ (sₖ² − 1)`` (Schaul et al. 2011). In the coordinates ``(μ, log σ)`` the
    natural gradient is ``dμ = σ ⊙ ∇_μ`` and ``d log σ = ∇_σ / 2`` (the Fisher of
    ``log σ`` is 2 per coordinate), which equals ``F⁻¹ ∇ E[f]`` when ``wₖ = f(xₖ) / λ``.

    Parameters
    ----------
    noise : Tensor of shape (λ, d)
        Standard-normal ``sₖ``.
    weights : Tensor of shape (λ,)

    Returns
    -------
    grad_mean, grad_sigma : Tensor of shape (d,)
    """
    return weights @ noise, weights @ (noise.square() - 1.0)


def default_snes_rates(dim: int) -> tuple[float, float]:
    """``(η_μ, η_σ) = (1, (3 + ln d) / (5 √d))`` from Schaul et al. 2011."""
    dim = positive_int("dim", dim)
    return 1.0, (3.0 + math.log(dim)) / (5.0 * math.sqrt(dim))


class SNES(NaturalEvolutionStrategy):
    """SNES with a diagonal covariance ``diag σ²``, for minimisation.

    Parameters
    ----------
    x0, sigma0, population_size, random_state, dtype
        See :class:`~natgrad.es.NaturalEvolutionStrategy`.
    eta_mean, eta_sigma : float, optional
        Learning rates of ``μ`` and ``σ``; the paper's defaults (:func:`default_snes_rates`).

    Notes
    -----
    With utilities ``uₖ`` and ``(∇_μ, ∇_σ) = snes_natural_gradient(s, u)``:

        μ ← μ + η_μ σ ⊙ ∇_μ,      σ ← σ ⊙ exp(η_σ ∇_σ / 2).
    """

    _state_floats = ("eta_mean", "eta_sigma")

    def __init__(
        self,
        x0: Tensor | list[float],
        sigma0: float = 1.0,
        *,
        population_size: int | None = None,
        eta_mean: float | None = None,
        eta_sigma: float | None = None,
        random_state: int | torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(
            x0, sigma0, population_size=population_size, random_state=random_state, dtype=dtype
        )
        default_mean, default_sigma = default_snes_rates(self.dim)
        self.eta_mean = default_mean if eta_mean is None else positive_float("eta_mean", eta_mean)
        self.eta_sigma = (
            default_sigma if eta_sigma is None else positive_float("eta_sigma", eta_sigma)
        )
        self.sigma = torch.full((self.dim,), float(sigma0), dtype=dtype, device="cpu")

    def _state_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super()._state_tensor_shapes(), "sigma": (self.dim,)}

    def _check_distribution(self) -> None:
        check_positive("sigma", self.sigma)

    @property
    def covariance(self) -> Tensor:
        """``diag σ²``, shape ``(d, d)``."""
        return torch.diag(self.sigma.square())

    def _from_noise(self, noise: Tensor) -> Tensor:
        return self.mean + self.sigma * noise

    def _to_noise(self, samples: Tensor) -> Tensor:
        return (samples - self.mean) / self.sigma

    def _update(self, noise: Tensor, utilities: Tensor) -> None:
        grad_mean, grad_sigma = snes_natural_gradient(noise, utilities)
        self.mean = self.mean + self.eta_mean * self.sigma * grad_mean
        self.sigma = self.sigma * torch.exp(0.5 * self.eta_sigma * grad_sigma)
