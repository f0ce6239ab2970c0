"""The PNMF evidence lower bound in its three estimators, as pure functions.

Model: counts ``y_ij ~ Poisson(Σ_l W_jl exp(F_il))`` with loadings ``W ≥ 0`` of shape
``(n_features, n_components)``, latent ``F_il ~ N(0, 1)`` and the mean-field posterior
``q(F) = Π N(μ_il, σ²_il)`` (``μ``, ``σ²`` of shape ``(n_samples, n_components)``). With
``rate_ij = Σ_l W_jl e^{F_il}`` the ELBO, summed over all entries, is

    E_q[Σ_ij y_ij log rate_ij] − Σ_ij E_q[rate_ij] − Σ_ij log y_ij! − KL(q(F) ‖ p(F)).

The three modes differ only in how the first two expectations are estimated:

- ``"simple"``: both by Monte Carlo with reparameterised draws ``F = μ + σ ε`` (this is the
  average over draws of ``Σ_ij Poisson(y_ij | rate_ij).log_prob``);
- ``"expanded"``: the first by Monte Carlo, the second in closed form,
  ``E_q[e^{F_il}] = exp(μ_il + σ²_il / 2)``;
- ``"lower-bound"``: no sampling; ``E_q[log Σ_l W_jl e^{F_il}] ≥ log Σ_l W_jl e^{μ_il}``
  (Jensen, log-sum-exp is convex), so this mode is a deterministic lower bound on the ELBO.

The ELBO is evaluated in float64 (where the device has it) whatever the dtype of the
parameters: its terms are each about ``Σ y log y`` while their sum is about ``−½ Σ log(2π y)``
(near the optimum), so float32 sums lose a fifth of it at counts of 1e6 and all of it from 1e8.

The rate sum never needs an ``(n_samples, n_features)`` tensor:
``Σ_ij Σ_l W_jl e^{F_il} = Σ_l (Σ_j W_jl)(Σ_i e^{F_il})``; the log-rate term is evaluated on
the non-zeros only when the counts are sparse.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from natgrad.models.pnmf_counts import CountMatrix, accumulation_dtype

ElboMode = Literal["simple", "expanded", "lower-bound"]
ELBO_MODES: tuple[str, ...] = ("simple", "expanded", "lower-bound")


def draw_factors(
    mean: Tensor,
    variance: Tensor,
    n_draws: int,
    generator: torch.Generator | None,
    noise_dtype: torch.dtype | None = None,
) -> Tensor:
    """Reparameterised draws ``F = μ + σ ε``, shape ``(n_draws, n_samples, n_components)``.

    ``ε`` is drawn in ``noise_dtype`` (default ``mean``'s; float32 and float64 draws of one
    generator differ) and ``F`` is formed in ``mean``'s dtype.
    """
    device = generator.device if generator is not None else mean.device
    noise = torch.randn(
        (n_draws, *mean.shape), generator=generator, dtype=noise_dtype or mean.dtype, device=device
    )
    return mean + variance.sqrt() * noise.to(mean.device, mean.dtype)


def _scaled_rates(counts: CountMatrix, loadings: Tensor, factors: Tensor) -> tuple[Tensor, ...]:
    """``rate / e^{m}`` at the stored entries, with ``m_si = max_l F_sil`` for stability.

    Returns ``(scaled_rate, shifted_exp, shift)``: ``scaled_rate`` is ``(S, N, D)`` (dense) or
    ``(S, nnz)`` (sparse), ``shifted_exp = e^{F − m}`` is ``(S, N, L)`` and ``shift`` is
    ``(S, N, 1)``.
    """
    shift = factors.detach().amax(dim=-1, keepdim=True)
    shifted_exp = torch.exp(factors - shift)
    if counts.is_sparse:
        scaled = (shifted_exp[:, counts.rows, :] * loadings[counts.cols]).sum(-1)
    else:
        scaled = shifted_exp @ loadings.T
    tiny = torch.finfo(scaled.dtype).tiny
    return scaled.clamp_min(tiny), shifted_exp, shift


def log_rate_sum(counts: CountMatrix, loadings: Tensor, factors: Tensor) -> Tensor:
    """Draw-averaged ``Σ_ij y_ij log Σ_l W_jl e^{F_il}``.

    Parameters
    ----------
    counts : CountMatrix of shape (N, D)
    loadings : Tensor of shape (D, L)
        ``W``.
    factors : Tensor of shape (S, N, L)
        ``S`` draws of ``F`` (``S = 1`` with ``F = μ`` gives the lower-bound term).

    Returns
    -------
    Tensor
        Scalar, the mean over the ``S`` draws of the sum over entries.
    """
    scaled, _, shift = _scaled_rates(counts, loadings, factors)
    n_draws = factors.shape[0]
    if counts.is_sparse:
        log_rate = scaled.log() + shift[:, counts.rows, 0]
        return (counts.values * log_rate).sum() / n_draws
    log_rate = scaled.log() + shift
    return (counts.dense * log_rate).sum() / n_draws


def loadings_numerator(counts: CountMatrix, loadings: Tensor, factors: Tensor) -> Tensor:
    """``W_jl · mean_s Σ_i y_ij e^{F_sil} / rate_sij``, shape ``(D, L)``.

    This is ``W ⊙ ∂(log_rate_sum)/∂W`` in closed form: the numerator of the multiplicative
    (EM) update of the loadings, and their sufficient statistic ``Σ_i y_ij E[r_ijl]`` with
    responsibilities ``r_ijl = W_jl e^{F_il} / rate_ij``.
    """
    with torch.no_grad():
        scaled, shifted_exp, _ = _scaled_rates(counts, loadings, factors)
        n_draws = factors.shape[0]
        if counts.is_sparse:
            ratio = counts.values / scaled
            weighted = (ratio.unsqueeze(-1) * shifted_exp[:, counts.rows, :]).sum(0)
            gradient = torch.zeros_like(loadings).index_add_(0, counts.cols, weighted)
        else:
            ratio = counts.dense / scaled
            gradient = torch.einsum("snd,snl->dl", ratio, shifted_exp)
        return loadings * gradient / n_draws


def expected_exp_factors(mean: Tensor, variance: Tensor) -> Tensor:
    """``E_q[e^{F}] = exp(μ + σ²/2)``, elementwise."""
    return torch.exp(mean + 0.5 * variance)


def rate_sum_closed_form(loadings: Tensor, mean: Tensor, variance: Tensor) -> Tensor:
    """``Σ_ij E_q[rate_ij] = Σ_l (Σ_j W_jl)(Σ_i exp(μ_il + σ²_il/2))`` (scalar)."""
    return loadings.sum(0) @ expected_exp_factors(mean, variance).sum(0)


def rate_sum_monte_carlo(loadings: Tensor, factors: Tensor) -> Tensor:
    """Draw-averaged ``Σ_ij rate_ij = Σ_l (Σ_j W_jl)(Σ_i e^{F_il})`` (scalar)."""
    return loadings.sum(0) @ torch.exp(factors).sum((0, 1)) / factors.shape[0]


def kl_to_standard_normal(mean: Tensor, variance: Tensor) -> Tensor:
    """``KL(N(μ, σ²) ‖ N(0, 1))`` summed over all entries (scalar)."""
    return 0.5 * (variance + mean.square() - 1.0 - variance.log()).sum()


def expected_log_likelihood(
    counts: CountMatrix,
    loadings: Tensor,
    mean: Tensor,
    variance: Tensor,
    mode: ElboMode,
    n_draws: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The chosen estimate of ``E_q[log p(y | F)]`` summed over entries, ``−log y!`` included.

    Evaluated in float64 (:func:`~natgrad.models.pnmf_counts.accumulation_dtype`) whatever the
    dtype of the arguments, with ``ε`` drawn in ``mean``'s dtype (the draws of a float32 fit).

    Parameters
    ----------
    counts : CountMatrix of shape (N, D)
    loadings : Tensor of shape (D, L)
    mean, variance : Tensor of shape (N, L)
        ``μ`` and ``σ²`` of ``q(F)``.
    mode : {"simple", "expanded", "lower-bound"}
    n_draws : int
        Monte-Carlo draws ``E`` (ignored by ``"lower-bound"``).
    generator : torch.Generator, optional
        Source of the draws.

    Returns
    -------
    Tensor
        Scalar, of dtype ``accumulation_dtype(mean.device)``.
    """
    noise_dtype = mean.dtype
    wide = accumulation_dtype(mean.device)
    counts, loadings, mean, variance = (
        counts.to(wide),
        loadings.to(wide),
        mean.to(wide),
        variance.to(wide),
    )
    if mode == "lower-bound":
        log_term = log_rate_sum(counts, loadings, mean.unsqueeze(0))
        rate_term = rate_sum_closed_form(loadings, mean, variance)
    elif mode in ("simple", "expanded"):
        factors = draw_factors(mean, variance, n_draws, generator, noise_dtype)
        log_term = log_rate_sum(counts, loadings, factors)
        if mode == "simple":
            rate_term = rate_sum_monte_carlo(loadings, factors)
        else:
            rate_term = rate_sum_closed_form(loadings, mean, variance)
    else:
        raise ValueError(f"mode must be one of {ELBO_MODES}, got {mode!r}")
    return log_term - rate_term - counts.log_factorial


def elbo(
    counts: CountMatrix,
    loadings: Tensor,
    mean: Tensor,
    variance: Tensor,
    mode: ElboMode,
    n_draws: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The ELBO summed over all entries (scalar, differentiable in ``W``, ``μ``, ``σ²``).

    See :func:`expected_log_likelihood` for the arguments and the dtype of the result; the KL
    of ``q(F)`` to the ``N(0, 1)`` prior is subtracted.
    """
    log_likelihood = expected_log_likelihood(
        counts, loadings, mean, variance, mode, n_draws, generator
    )
    wide = log_likelihood.dtype
    return log_likelihood - kl_to_standard_normal(mean.to(wide), variance.to(wide))
