"""Rank-based fitness shaping and default NES hyper-parameters (Wierstra et al. 2014)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad._validation import int_at_least, positive_int


def default_population_size(dim: int) -> int:
    """``λ = 4 + ⌊3 ln d⌋`` (Glasmachers et al. 2010; Schaul et al. 2011) for ``d ≥ 1``."""
    return 4 + math.floor(3.0 * math.log(positive_int("dim", dim)))


def rank_utilities(population_size: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Utilities ``u₁ ≥ … ≥ u_λ`` assigned to the samples ranked best to worst.

    ``uₖ = max(0, ln(λ/2 + 1) − ln k) / Σⱼ max(0, ln(λ/2 + 1) − ln j) − 1/λ``: they sum to zero,
    so the estimated gradient is invariant to monotone transformations of the fitness.

    Parameters
    ----------
    population_size : int
        ``λ ≥ 2``.

    Returns
    -------
    Tensor of shape (λ,)
    """
    population_size = int_at_least("population_size", population_size, 2)
    ranks = torch.arange(1, population_size + 1, dtype=dtype, device="cpu")
    raw = (math.log(population_size / 2 + 1) - torch.log(ranks)).clamp(min=0)
    return raw / raw.sum() - 1.0 / population_size


def shaped_fitness(fitness: Tensor) -> Tensor:
    """Utilities of the samples for MINIMISATION: the lowest fitness gets ``u₁``.

    Parameters
    ----------
    fitness : Tensor of shape (λ,)
        Objective values. ``+inf`` ranks last; NaN ranks as ``+inf`` does (a sample where the
        objective is undefined counts as the worst); ties are broken by sample order.

    Returns
    -------
    Tensor of shape (λ,)
        The utility of each sample, in the samples' order, in the dtype of ``fitness``.
    """
    ranked = torch.where(torch.isnan(fitness), torch.inf, fitness)
    order = torch.argsort(ranked, stable=True)
    utilities = torch.empty_like(fitness)
    utilities[order] = rank_utilities(fitness.shape[0], fitness.dtype)
    return utilities
