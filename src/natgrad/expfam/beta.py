"""Beta distribution ``p(x) = x^{a−1} (1 − x)^{b−1} / B(a, b)`` on ``0 < x < 1``."""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.expfam.base import ExponentialFamily, Params, require, require_finite
from natgrad.expfam.concentration import STIRLING_START, ConcentrationFamily, evaluate_where
from natgrad.expfam.dirichlet import (
    NEAR_MEAN,
    dirichlet_entropy,
    dirichlet_kl,
    dirichlet_log_prob,
    initial_concentration,
)
from natgrad.expfam.newton import NewtonMeanInversion
from natgrad.expfam.special import trigamma


class Beta(NewtonMeanInversion, ConcentrationFamily):
    """A batch of Beta distributions with concentrations ``a > 0`` and ``b > 0``.

    Parameters
    ----------
    a : Tensor
        First concentration (of ``x``), any shape.
    b : Tensor
        Second concentration (of ``1 − x``), broadcastable with ``a``.
    validate : bool
        Check that the parameters are finite and positive.

    Notes
    -----
    Scalar events.

    - ``T(x) = (log x, log(1 − x))``; natural parameters ``θ = (a − 1, b − 1)``, both ``> −1``;
      base measure ``h = 1``.
    - ``A(θ) = log Γ(a) + log Γ(b) − log Γ(a + b)``.
    - Mean parameters ``η = (ψ(a) − ψ(a + b), ψ(b) − ψ(a + b))``; the mean space is
      ``exp(η₁) + exp(η₂) < 1``.
    - ``F(θ) = [[ψ′(a) − ψ′(a+b), −ψ′(a+b)], [−ψ′(a+b), ψ′(b) − ψ′(a+b)]]``.
    - ``from_mean`` has no closed form: it uses the guarded Newton iteration of
      :mod:`natgrad.expfam.newton`.
    - ``ψ′`` is :func:`natgrad.expfam.special.trigamma`; ``kl`` and ``entropy`` are those of
      the two-class Dirichlet (:func:`~natgrad.expfam.dirichlet.dirichlet_kl`,
      :func:`~natgrad.expfam.dirichlet.dirichlet_entropy`), free of cancellation; so is
      ``log_prob`` near the mean for ``a + b ≥ STIRLING_START`` (10)
      (:func:`~natgrad.expfam.dirichlet.dirichlet_log_prob` at ``(x, 1 − x)``), where the
      generic form cancels terms of size ``(a + b) log(a + b)``.
    - Built from ``a`` and ``b``, it keeps them and derives everything from them
      (:mod:`natgrad.expfam.concentration`): ``θ = (a − 1, b − 1)`` alone loses ``a < 1`` in
      float32.
    """

    natural_event_ndims = (0, 0)
    natural_names = ("theta1", "theta2")
    mean_names = ("eta1", "eta2")
    natural_domain = "theta1 > -1 and theta2 > -1"
    mean_domain = "exp(eta1) + exp(eta2) < 1"
    concentration_count = 2

    def __init__(self, a: Tensor | float, b: Tensor | float, *, validate: bool = True) -> None:
        a, b = self._prepare((a, b), ("a", "b"))
        if validate:
            values = {"a": a, "b": b}
            require_finite("Beta", values)
            require((a.detach() > 0) & (b.detach() > 0), "Beta: a and b must be positive", values)
        self._init_concentrations((a, b), (a - 1.0, b - 1.0))

    @classmethod
    def log_partition_fn(cls, *theta: Tensor) -> Tensor:
        return _log_partition(theta[0] + 1.0, theta[1] + 1.0)

    @classmethod
    def _mean_from_natural(cls, *theta: Tensor) -> Params:
        return _mean(theta[0] + 1.0, theta[1] + 1.0)

    @classmethod
    def _initial_natural(cls, *eta: Tensor) -> Params:
        concentration = initial_concentration(torch.stack(eta, -1))
        return concentration[..., 0] - 1.0, concentration[..., 1] - 1.0

    @classmethod
    def _fisher_from_natural(cls, *theta: Tensor) -> Tensor:
        return _fisher(theta[0] + 1.0, theta[1] + 1.0)

    @classmethod
    def _natural_in_domain(cls, *theta: Tensor) -> Tensor:
        return (theta[0] > -1) & (theta[1] > -1)

    @classmethod
    def _mean_in_domain(cls, *eta: Tensor) -> Tensor:
        return torch.exp(eta[0]) + torch.exp(eta[1]) < 1

    @property
    def a(self) -> Tensor:
        """First concentration ``a`` (as given, else ``θ₁ + 1``), shape ``batch_shape``."""
        return self._concentrations()[0]

    @property
    def b(self) -> Tensor:
        """Second concentration ``b`` (as given, else ``θ₂ + 1``), shape ``batch_shape``."""
        return self._concentrations()[1]

    @property
    def mean_params(self) -> Params:
        """``η = (ψ(a) − ψ(a + b), ψ(b) − ψ(a + b))``, from the concentrations."""
        return _mean(self.a, self.b)

    def log_partition(self) -> Tensor:
        """``A = log Γ(a) + log Γ(b) − log Γ(a + b)``, shape ``batch_shape``."""
        return _log_partition(self.a, self.b)

    def fisher(self) -> Tensor:
        """``F`` (see the class notes), shape ``batch_shape + (2, 2)``."""
        return _fisher(self.a, self.b)

    def entropy(self) -> Tensor:
        """Entropy, shape ``batch_shape`` (that of ``Dirichlet((a, b))``)."""
        return dirichlet_entropy(torch.stack((self.a, self.b), -1))

    def _kl_same_family(self, other: ExponentialFamily) -> Tensor:
        """``KL(Beta(a, b) ‖ Beta(a′, b′)) = KL(Dir((a, b)) ‖ Dir((a′, b′)))``."""
        concentration = torch.stack((self.a, self.b), -1)
        other_concentration = torch.stack((other.a, other.b), -1)
        step = torch.stack(self._concentration_steps(other), -1)
        return dirichlet_kl(concentration, other_concentration, step)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)``, shape ``x``'s leading shape (see the class notes); Stirling's form is
        evaluated only at the entries that need it."""
        a, b = self.a, self.b
        total = (a + b).detach()
        large = total >= STIRLING_START
        if not bool(large.any()):
            return super().log_prob(x)
        mean, other_mean = a.detach() / total, b.detach() / total
        distance = (x.detach() - mean).abs()
        near = (distance <= NEAR_MEAN * mean) & (distance <= NEAR_MEAN * other_mean)
        return evaluate_where(
            large & near, _log_prob_near_mean, (a, b, x), lambda: super(Beta, self).log_prob(x)
        )

    def sufficient_statistics(self, x: Tensor) -> Params:
        """``T(x) = (log x, log(1 − x))``, each of ``x``'s shape."""
        return torch.log(x), torch.log1p(-x)

    def to_torch(self) -> torch.distributions.Beta:
        """``torch.distributions.Beta(a, b)``."""
        return torch.distributions.Beta(self.a, self.b, validate_args=False)


def _log_prob_near_mean(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """:func:`~natgrad.expfam.dirichlet.dirichlet_log_prob` of ``Dir((a, b))`` at ``(x, 1 − x)``."""
    return dirichlet_log_prob(torch.stack((a, b), -1), torch.stack((x, 1.0 - x), -1))


def _log_partition(a: Tensor, b: Tensor) -> Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def _mean(a: Tensor, b: Tensor) -> Params:
    digamma_total = torch.digamma(a + b)
    return torch.digamma(a) - digamma_total, torch.digamma(b) - digamma_total


def _fisher(a: Tensor, b: Tensor) -> Tensor:
    trigamma_total = trigamma(a + b)
    rows = (
        torch.stack((trigamma(a) - trigamma_total, -trigamma_total), -1),
        torch.stack((-trigamma_total, trigamma(b) - trigamma_total), -1),
    )
    return torch.stack(rows, -2)
