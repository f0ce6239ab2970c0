"""Bernoulli distribution ``p(x) = pˣ (1 − p)¹⁻ˣ`` on ``x ∈ {0, 1}``."""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.expfam.base import (
    ExponentialFamily,
    Params,
    as_float_tensor,
    require,
    require_finite,
)


class Bernoulli(ExponentialFamily):
    """A batch of Bernoulli distributions, given by ``probs`` or by ``logits``.

    Parameters
    ----------
    probs : Tensor, optional
        Success probabilities ``p ∈ (0, 1)``, any shape.
    logits : Tensor, optional
        Log-odds ``log p − log(1 − p)``, any shape. Give exactly one of ``probs``, ``logits``.
    validate : bool
        Check that the parameters are finite and ``0 < p < 1``.

    Notes
    -----
    Scalar events. ``T(x) = x``, natural parameter ``θ = logit p``, mean parameter ``η = p``,
    ``A(θ) = log(1 + eᶿ)``, ``F(θ) = p(1 − p)`` (shape ``batch_shape + (1, 1)``). The
    probabilities 0 and 1 have infinite natural parameters and are rejected.
    ``A`` is evaluated as ``θ + log(1 + e⁻ᶿ)`` for ``θ > 0`` (``softplus`` returns ``θ`` above
    20, which made ``log_prob(1)`` exactly 0 and the entropy 5 % low at ``p = 1 − 10⁻⁹``);
    ``entropy`` is ``log(1 + e⁻|θ|) + |θ| σ(−|θ|)``, free of cancellation.
    """

    natural_event_ndims = (0,)
    natural_names = ("theta",)
    mean_names = ("eta",)
    natural_domain = "a finite theta"
    mean_domain = "0 < eta < 1"

    def __init__(
        self,
        probs: Tensor | float | None = None,
        logits: Tensor | float | None = None,
        *,
        validate: bool = True,
    ) -> None:
        if (probs is None) == (logits is None):
            raise ValueError("Bernoulli: give exactly one of probs and logits")
        if logits is not None:
            logits = as_float_tensor(logits, "logits")
            if validate:
                require_finite("Bernoulli", {"logits": logits})
            self._init_natural((logits,))
            return
        probs = as_float_tensor(probs, "probs")
        if validate:
            require_finite("Bernoulli", {"probs": probs})
            inside = (probs.detach() > 0) & (probs.detach() < 1)
            require(inside, "Bernoulli: probs must lie strictly between 0 and 1", {"probs": probs})
        self._init_natural(self._natural_from_mean(probs))

    @classmethod
    def log_partition_fn(cls, *theta: Tensor) -> Tensor:
        return log1p_exp(theta[0])

    @classmethod
    def _mean_from_natural(cls, *theta: Tensor) -> Params:
        return (torch.sigmoid(theta[0]),)

    @classmethod
    def _natural_from_mean(cls, *eta: Tensor) -> Params:
        return (torch.log(eta[0]) - torch.log1p(-eta[0]),)

    @classmethod
    def _fisher_from_natural(cls, *theta: Tensor) -> Tensor:
        probs = torch.sigmoid(theta[0])
        return (probs * (1.0 - probs))[..., None, None]

    @classmethod
    def _natural_in_domain(cls, *theta: Tensor) -> Tensor:
        return theta[0].isfinite()

    @classmethod
    def _mean_in_domain(cls, *eta: Tensor) -> Tensor:
        return (eta[0] > 0) & (eta[0] < 1)

    @property
    def logits(self) -> Tensor:
        """Log-odds ``θ``, shape ``batch_shape``."""
        return self._natural[0]

    @property
    def probs(self) -> Tensor:
        """Success probabilities ``p = σ(θ)``, shape ``batch_shape``."""
        return torch.sigmoid(self._natural[0])

    def entropy(self) -> Tensor:
        """``H = log(1 + e⁻|θ|) + |θ| σ(−|θ|)``, shape ``batch_shape``."""
        magnitude = self._natural[0].abs()
        return log1p_exp(-magnitude) + magnitude * torch.sigmoid(-magnitude)

    def sufficient_statistics(self, x: Tensor) -> Params:
        """``T(x) = x`` (as floating point), ``x``'s shape."""
        return (x.to(self.dtype),)

    def to_torch(self) -> torch.distributions.Bernoulli:
        """``torch.distributions.Bernoulli(logits=θ)``."""
        return torch.distributions.Bernoulli(logits=self.logits, validate_args=False)


def log1p_exp(theta: Tensor) -> Tensor:
    """``log(1 + eᶿ)`` to full precision for every finite ``θ``, twice differentiable.

    ``θ + log(1 + e⁻ᶿ)`` for ``θ > 0``, ``log(1 + eᶿ)`` otherwise; each branch sees only
    arguments where it cannot overflow.
    """
    positive = theta > 0
    upper = torch.where(positive, theta, torch.zeros_like(theta))
    lower = torch.where(positive, torch.zeros_like(theta), theta)
    return torch.where(
        positive, upper + torch.log1p(torch.exp(-upper)), torch.log1p(torch.exp(lower))
    )
