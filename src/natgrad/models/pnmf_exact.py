"""Fused full-batch ``"lower-bound"`` natural training of PNMF for dense counts.

The same iteration as :func:`natgrad.models.pnmf_training.fit_natural` in its exact case
(natural step on ``q(F)``, multiplicative step on ``W``, extrapolation with restarts of
:mod:`natgrad.models.pnmf_extrapolation`), written with few tensor operations: every
quantity of ``q`` (``e^{μ − shift}``, ``E_q[e^F] = exp(μ + σ²/2)``, the KL terms) is computed
once per point and shared by the ELBO, the natural step and the W step; the ``(N, D)`` work
(rates, their log, ``Y / rates``) goes into two preallocated buffers; a restart reuses the
factor terms of the block iterate, computed by its W step. The moments of ``q(F)`` are held
components by samples, ``(L, N)`` (the transpose of the estimator's ``(N, L)``), so that every
matrix product writes a contiguous result and every sum over samples runs along rows. For
counts ``y`` (``(N, D)``), ``W`` (``(D, L)``) and ``q(F)`` with moments ``(μ, P = 1/σ²)``, at a
point

    rate_ij = Σ_l W_jl e^{μ_il},
    ELBO = Σ_ij y_ij log rate_ij − Σ_l (Σ_j W_jl)(Σ_i e^{μ_il + σ²_il/2}) − Σ_ij log y_ij!
           − ½ Σ_il (σ²_il + μ²_il − 1 − log σ²_il).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad.models.pnmf_counts import CountMatrix
from natgrad.models.pnmf_updates import LOADINGS_FLOOR

SCALAR_SHIFT_RANGE = 50.0
"""Largest ``max μ − min μ`` for which one shift ``max μ`` serves all samples: ``e^{μ − shift}``
then stays above ``e^{−50}`` in every entry (no underflow in float32); beyond it each sample is
shifted by its own maximum."""


class FactorTerms:
    """What the lower bound needs of ``q(F)`` at one point ``(μ, P)``.

    Attributes
    ----------
    mean, precision, variance : Tensor of shape (L, N)
        ``μ``, ``P`` and ``σ² = 1/P`` (components by samples).
    half_variance_exp : Tensor of shape (L, N)
        ``e^{σ²/2}`` (shared by the points of one precision).
    variance_part : float
        ``Σ_il (σ²_il − 1 − log σ²_il)``.
    shift : float or Tensor of shape (1, N)
        ``max μ`` (one shift) or ``max_l μ_il`` (per sample, see :data:`SCALAR_SHIFT_RANGE`).
    shifted_exp : Tensor of shape (L, N)
        ``e^{μ − shift}``.
    exp_factors : Tensor of shape (L, N)
        ``E_q[e^F] = e^{μ + σ²/2}``.
    kl : float
        ``KL(q ‖ N(0, 1))`` summed over entries.
    """

    __slots__ = (
        "exp_factors",
        "half_variance_exp",
        "kl",
        "mean",
        "precision",
        "shift",
        "shifted_exp",
        "variance",
        "variance_part",
    )

    def __init__(self, mean: Tensor, precision: Tensor, variance: Tensor):
        self.mean, self.precision, self.variance = mean, precision, variance
        self.half_variance_exp = torch.mul(variance, 0.5).exp_()
        entries = float((variance - variance.log()).sum())
        self.variance_part = entries - variance.numel()
        self._set_mean_terms()

    def moved(self, mean: Tensor) -> FactorTerms:
        """The terms at mean ``mean`` with this point's precision (its variance terms reused)."""
        terms = object.__new__(FactorTerms)
        terms.mean, terms.precision, terms.variance = mean, self.precision, self.variance
        terms.half_variance_exp, terms.variance_part = self.half_variance_exp, self.variance_part
        terms._set_mean_terms()
        return terms

    def _set_mean_terms(self) -> None:
        mean = self.mean
        flat_mean = mean.reshape(-1)
        self.kl = 0.5 * (self.variance_part + float(torch.dot(flat_mean, flat_mean)))
        low, high = (float(bound) for bound in torch.aminmax(mean))
        if high - low <= SCALAR_SHIFT_RANGE:
            self.shift = high
            self.shifted_exp = torch.sub(mean, high).exp_()
            self.exp_factors = torch.mul(self.shifted_exp, self.half_variance_exp)
            self.exp_factors.mul_(math.exp(high))
            return
        self.shift = mean.amax(dim=0, keepdim=True)
        self.shifted_exp = torch.sub(mean, self.shift).exp_()
        self.exp_factors = torch.add(mean, self.variance, alpha=0.5).exp_()


class DenseLowerBound:
    """The lower bound, its natural step and W's multiplicative step for dense counts.

    Parameters
    ----------
    counts : CountMatrix of shape (N, D)
        Dense counts (``counts.dense`` set).
    """

    def __init__(self, counts: CountMatrix):
        if counts.is_sparse:
            raise ValueError("DenseLowerBound needs dense counts")
        self.counts = counts.dense
        self.flat_counts = self.counts.reshape(-1)
        self.row_totals = counts.row_totals
        self.log_factorial = float(counts.log_factorial)
        self.total = float(counts.total())
        self.rates = torch.empty_like(self.counts)
        self.work = torch.empty_like(self.counts)
        self.loadings_total: Tensor | None = None

    def _rates(self, terms: FactorTerms, loadings: Tensor) -> Tensor:
        """``e^{μ − shift} Wᵀ`` into the rates buffer, shape ``(N, D)``."""
        return torch.mm(terms.shifted_exp.T, loadings.T, out=self.rates)

    def value(self, terms: FactorTerms, loadings: Tensor) -> float:
        """The lower bound at ``(terms, loadings)``; leaves the rates in their buffer."""
        rates = self._rates(terms, loadings)
        log_term = torch.dot(self.flat_counts, torch.log(rates, out=self.work).reshape(-1))
        if isinstance(terms.shift, float):
            shift_term = self.total * terms.shift
        else:
            shift_term = float(torch.dot(self.row_totals, terms.shift.reshape(-1)))
        self.loadings_total = loadings.sum(0)
        rate_term = torch.dot(terms.exp_factors.sum(1), self.loadings_total)
        likelihood = float(log_term) + shift_term - float(rate_term) - self.log_factorial
        return likelihood - terms.kl

    def natural_step(
        self, terms: FactorTerms, loadings: Tensor, step_size: float
    ) -> tuple[Tensor, Tensor]:
        """``(μ′, P′)``: the natural step from ``terms`` (rates left by :meth:`value`).

        ``loadings`` must be those of the last :meth:`value` (their column sums are reused).
        ``P′ = P + ρd`` with ``d = 1 + E_q[rate] − P`` (plus ``ρ²d²/(2P)`` where ``d < 0``),
        ``μ′ = μ + clip(ρ ∂ELBO/∂μ / P′, ±1)``. Entries may be non-finite; see
        :func:`refuse_non_finite`.
        """
        ratio = torch.div(self.counts, self.rates, out=self.work)
        expected_rate = terms.exp_factors * self.loadings_total[:, None]
        grad_mean = torch.mm(loadings.T, ratio.T).mul_(terms.shifted_exp)
        grad_mean.sub_(expected_rate).sub_(terms.mean)
        precision = terms.precision
        direction = expected_rate.add_(1.0).sub_(precision)
        new_precision = torch.add(precision, direction, alpha=step_size)
        retraction = direction.clamp_(max=0.0)
        if step_size != 1.0:
            retraction.mul_(step_size)
            grad_mean.mul_(step_size)
        new_precision.add_(retraction.square_().div_(precision), alpha=0.5)
        new_mean = grad_mean.div_(new_precision).clamp_(-1.0, 1.0).add_(terms.mean)
        return new_mean, new_precision

    def loadings_step(self, terms: FactorTerms, loadings: Tensor) -> Tensor:
        """W's multiplicative (EM) step under ``q`` of ``terms``, floored at ``1e-10``.

        Returns the new ``W`` of shape ``(D, L)`` (a transposed view of a contiguous ``(L, D)``).
        """
        ratio = torch.div(self.counts, self._rates(terms, loadings), out=self.work)
        numerator = torch.mm(terms.shifted_exp, ratio).mul_(loadings.T)
        denominator = terms.exp_factors.sum(1, keepdim=True)
        denominator.clamp_min_(torch.finfo(loadings.dtype).tiny)
        return numerator.div_(denominator).clamp_min_(LOADINGS_FLOOR).T


def refuse_non_finite(
    terms: FactorTerms, mean: Tensor, precision: Tensor
) -> tuple[Tensor, Tensor, int]:
    """``(μ′, P′, refused)``: entries of a step whose ``P′μ′`` is not finite or ``P′ ≤ 0`` keep
    the values of ``terms``; ``refused`` counts them."""
    accepted = torch.isfinite(precision * mean) & (precision > 0)
    refused = accepted.numel() - int(accepted.sum())
    mean = torch.where(accepted, mean, terms.mean)
    precision = torch.where(accepted, precision, terms.precision)
    return mean, precision, refused
