"""Exponential natural evolution strategies, xNES (Glasmachers et al. 2010)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad._validation import positive_float, positive_int
from natgrad.es.base import NaturalEvolutionStrategy
from natgrad.es.state_checks import check_invertible


def xnes_natural_gradient(noise: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Natural gradient of ``E[w]`` in xNES's local coordinates ``(δ, M)``.

    With ``x = μ + A z`` and the local parameterisation ``μ' = μ + A δ``,
    ``A' = A exp(M / 2)`` (``M`` symmetric), the Fisher at ``(δ, M) = 0`` makes the plain
    Monte-Carlo gradient natural (Glasmachers et al. 2010, Theorem 1):

        G_δ = Σₖ wₖ zₖ,        G_M = Σₖ wₖ (zₖ zₖᵀ − I).

    In the mean/covariance coordinates this is ``dμ = A G_δ`` and ``dΣ = A G_M Aᵀ``, which
    equals ``F⁻¹ ∇ E[f]`` when ``wₖ = f(xₖ) / λ``.

    Parameters
    ----------
    noise : Tensor of shape (λ, d)
        Standard-normal ``zₖ``.
    weights : Tensor of shape (λ,)
        Utilities (or fitness values divided by ``λ`` for a plain Monte-Carlo estimate).

    Returns
    -------
    grad_delta : Tensor of shape (d,)
    grad_m : Tensor of shape (d, d), symmetric
    """
    identity = torch.eye(noise.shape[1], dtype=noise.dtype, device="cpu")
    grad_delta = weights @ noise
    grad_m = torch.einsum("k,ki,kj->ij", weights, noise, noise) - weights.sum() * identity
    return grad_delta, grad_m


def default_xnes_rates(dim: int) -> tuple[float, float, float]:
    """``(η_μ, η_σ, η_B) = (1, 3(3 + ln d) / (5 d √d), same)`` from Glasmachers et al. 2010."""
    dim = positive_int("dim", dim)
    rate = 3.0 * (3.0 + math.log(dim)) / (5.0 * dim * math.sqrt(dim))
    return 1.0, rate, rate


class XNES(NaturalEvolutionStrategy):
    """xNES with a full covariance ``Σ = σ² B Bᵀ`` (``det B = 1``), for minimisation.

    Parameters
    ----------
    x0, sigma0, population_size, random_state, dtype
        See :class:`~natgrad.es.NaturalEvolutionStrategy`.
    eta_mean, eta_sigma, eta_shape : float, optional
        Learning rates of ``μ``, ``σ`` and ``B``; the paper's defaults
        (:func:`default_xnes_rates`) if omitted.

    Notes
    -----
    With utilities ``uₖ`` (:func:`~natgrad.es.shaped_fitness`) and
    ``(G_δ, G_M) = xnes_natural_gradient(z, u)``, ``G_σ = tr(G_M)/d``, ``G_B = G_M − G_σ I``:

        μ ← μ + η_μ σ B G_δ,   σ ← σ exp(η_σ G_σ / 2),   B ← B exp(η_B G_B / 2).
    """

    _state_floats = ("sigma", "eta_mean", "eta_sigma", "eta_shape")

    def __init__(
        self,
        x0: Tensor | list[float],
        sigma0: float = 1.0,
        *,
        population_size: int | None = None,
        eta_mean: float | None = None,
        eta_sigma: float | None = None,
        eta_shape: float | None = None,
        random_state: int | torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(
            x0, sigma0, population_size=population_size, random_state=random_state, dtype=dtype
        )
        defaults = default_xnes_rates(self.dim)
        given = (eta_mean, eta_sigma, eta_shape)
        names = ("eta_mean", "eta_sigma", "eta_shape")
        self.eta_mean, self.eta_sigma, self.eta_shape = (
            default if value is None else positive_float(name, value)
            for value, default, name in zip(given, defaults, names, strict=True)
        )
        self.sigma = float(sigma0)
        self.shape = torch.eye(self.dim, dtype=dtype, device="cpu")

    def _state_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super()._state_tensor_shapes(), "shape": (self.dim, self.dim)}

    def _check_distribution(self) -> None:
        check_invertible("shape", self.shape)

    @property
    def covariance(self) -> Tensor:
        """``σ² B Bᵀ``, shape ``(d, d)``."""
        return self.sigma**2 * self.shape @ self.shape.T

    def _from_noise(self, noise: Tensor) -> Tensor:
        return self.mean + self.sigma * noise @ self.shape.T

    def _to_noise(self, samples: Tensor) -> Tensor:
        centred = (samples - self.mean) / self.sigma
        return torch.linalg.solve(self.shape, centred.T).T

    def _update(self, noise: Tensor, utilities: Tensor) -> None:
        grad_delta, grad_m = xnes_natural_gradient(noise, utilities)
        grad_sigma = float(torch.trace(grad_m)) / self.dim
        grad_shape = grad_m - grad_sigma * torch.eye(self.dim, dtype=self.dtype, device="cpu")
        self.mean = self.mean + self.eta_mean * self.sigma * self.shape @ grad_delta
        self.sigma *= math.exp(0.5 * self.eta_sigma * grad_sigma)
        self.shape = self.shape @ torch.linalg.matrix_exp(0.5 * self.eta_shape * grad_shape)
