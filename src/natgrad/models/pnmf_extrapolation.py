"""Extrapolation with restarts for the exact (``"lower-bound"``, full-batch) PNMF block updates.

One iteration of natural-gradient PNMF is block-coordinate ascent: a natural step on ``q(F)``,
then multiplicative steps on ``W``. Two such blocks zig-zag along directions that couple ``F``
and ``W``. Following the heuristic extrapolation with restarts of Ang & Gillis (2019,
"Accelerating nonnegative matrix factorization algorithms using extrapolation"), after each
block update ``y_t = (μ_t, P_t, W_t)`` the next iteration is evaluated at

    μ_z = μ_t + β (μ_t − μ_{t−1}),   log W_z = log W_t + β (log W_t − log W_{t−1}),

with the precision ``P_t`` of ``y_t`` (``W`` is moved in log space, so it stays positive). The
lower bound is deterministic, so its value at ``z`` (a by-product of the next iteration) decides:
if it is below the value at the previous evaluated point the iteration restarts from ``y_t`` and
``β`` shrinks by :data:`SHRINK`; otherwise ``β`` grows by :data:`GROWTH` up to :data:`MAX_BETA`.
With ``β = 0`` this is the plain block update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from natgrad.expfam import Gaussian
from natgrad.models.pnmf_updates import LOADINGS_FLOOR

INITIAL_BETA = 0.5
GROWTH = 1.1
SHRINK = 2.0
MAX_BETA = 1.0


@dataclass(frozen=True)
class BlockIterate:
    """A point of the block updates: ``q(F)`` by its moments (``(N, L)``) and ``W`` (``(D, L)``).

    Attributes
    ----------
    mean, precision : Tensor of shape (N, L)
        ``μ`` and ``P = 1/σ²``.
    loadings : Tensor of shape (D, L)
    """

    mean: Tensor
    precision: Tensor
    loadings: Tensor

    @classmethod
    def from_posterior(cls, posterior: Gaussian, loadings: Tensor) -> BlockIterate:
        """The iterate of a ``q(F)`` held in natural parameters."""
        return cls(posterior.loc, posterior.precision, loadings)

    @cached_property
    def variance(self) -> Tensor:
        """``σ² = 1/P``."""
        return 1.0 / self.precision

    @cached_property
    def posterior(self) -> Gaussian:
        """``q(F)`` in natural parameters ``(Pμ, −P/2)``."""
        return Gaussian.from_natural(
            self.precision * self.mean, -0.5 * self.precision, validate=False
        )


class Extrapolation:
    """The extrapolation state: ``β``, the previous block iterate and the last accepted value.

    Parameters
    ----------
    initial_beta, growth, shrink, max_beta : float
        ``β₀``, its growth factor on an accepted point, its shrink factor on a restart, and its
        upper bound.
    """

    def __init__(
        self,
        initial_beta: float = INITIAL_BETA,
        growth: float = GROWTH,
        shrink: float = SHRINK,
        max_beta: float = MAX_BETA,
    ):
        self.beta = initial_beta
        self.growth = growth
        self.shrink = shrink
        self.max_beta = max_beta
        self.previous: BlockIterate | None = None
        self.pending: BlockIterate | None = None
        self.last_value = -math.inf
        self.n_restarts = 0

    def point(self, iterate: BlockIterate) -> BlockIterate:
        """Where to evaluate next: the extrapolated point, or ``iterate`` if there is none."""
        return iterate if self.pending is None else self.pending

    def accepts(self, value: float) -> bool:
        """Whether the value at :meth:`point` keeps the extrapolation (else: restart there).

        A rejected (lower or non-finite) extrapolated point counts a restart, shrinks ``β`` and
        clears the pending point, so that the next :meth:`point` is the block iterate; an
        accepted one grows ``β``.
        """
        if self.pending is None:
            return True
        if not value >= self.last_value:
            self.beta /= self.shrink
            self.n_restarts += 1
            self.pending = None
            return False
        self.beta = min(self.max_beta, self.beta * self.growth)
        return True

    def record(self, value: float) -> None:
        """The value at the point the block update started from."""
        self.last_value = value

    def extrapolate(self, updated: BlockIterate) -> None:
        """Set the next evaluation point from the block iterate ``updated`` and the previous one."""
        previous, self.previous = self.previous, updated
        if previous is None or self.beta <= 0:
            self.pending = None
            return
        self.pending = extrapolated(previous, updated, self.beta)


def extrapolated(previous: BlockIterate, updated: BlockIterate, beta: float) -> BlockIterate:
    """``μ`` and ``log W`` moved ``β`` times the last step past ``updated`` (precision kept)."""
    mean = updated.mean + beta * (updated.mean - previous.mean)
    log_ratio = updated.loadings.log() - previous.loadings.log()
    loadings = (updated.loadings * torch.exp(beta * log_ratio)).clamp_min(LOADINGS_FLOOR)
    return BlockIterate(mean, updated.precision, loadings)
