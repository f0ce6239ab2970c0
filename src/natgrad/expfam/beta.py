"""Beta distribution ``p(x) = x^{a−1} (1 − x)^{b−1} / B(a, b)`` on ``0 < x < 1``."""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.expfam.base import ExponentialFamily, Params, require, require_finite
from natgrad.expfam.dirichlet import dirichlet_entropy, dirichlet_kl, initial_concentration
from natgrad.expfam.newton import NewtonMeanInversion
from natgrad.expfam.special import trigamma


class Beta(NewtonMeanInversion, ExponentialFamily):
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
      :func:`~natgrad.expfam.dirichlet.dirichlet_entropy`), free of cancellation.
    """

    natural_event_ndims = (0, 0)
    natural_names = ("theta1", "theta2")
    mean_names = ("eta1", "eta2")
    natural_domain = "theta1 > -1 and theta2 > -1"
    mean_domain = "exp(eta1) + exp(eta2) < 1"

    def __init__(self, a: Tensor | float, b: Tensor | float, *, validate: bool = True) -> None:
        a, b = self._prepare((a, b), ("a", "b"))
        if validate:
            values = {"a": a, "b": b}
            require_finite("Beta", values)
            require((a.detach() > 0) & (b.detach() > 0), "Beta: a and b must be positive", values)
        self._init_natural((a - 1.0, b - 1.0))

    @classmethod
    def log_partition_fn(cls, *theta: Tensor) -> Tensor:
        a, b = theta[0] + 1.0, theta[1] + 1.0
        return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)

    @classmethod
    def _mean_from_natural(cls, *theta: Tensor) -> Params:
        a, b = theta[0] + 1.0, theta[1] + 1.0
        digamma_total = torch.digamma(a + b)
        return torch.digamma(a) - digamma_total, torch.digamma(b) - digamma_total

    @classmethod
    def _initial_natural(cls, *eta: Tensor) -> Params:
        concentration = initial_concentration(torch.stack(eta, -1))
        return concentration[..., 0] - 1.0, concentration[..., 1] - 1.0

    @classmethod
    def _fisher_from_natural(cls, *theta: Tensor) -> Tensor:
        a, b = theta[0] + 1.0, theta[1] + 1.0
        trigamma_total = trigamma(a + b)
        rows = (
            torch.stack((trigamma(a) - trigamma_total, -trigamma_total), -1),
            torch.stack((-trigamma_total, trigamma(b) - trigamma_total), -1),
        )
        return torch.stack(rows, -2)

    @classmethod
    def _natural_in_domain(cls, *theta: Tensor) -> Tensor:
        return (theta[0] > -1) & (theta[1] > -1)

    @classmethod
    def _mean_in_domain(cls, *eta: Tensor) -> Tensor:
        return torch.exp(eta[0]) + torch.exp(eta[1]) < 1

    @property
    def a(self) -> Tensor:
        """First concentration ``a = θ₁ + 1``, shape ``batch_shape``."""
        return self._natural[0] + 1.0

    @property
    def b(self) -> Tensor:
        """Second concentration ``b = θ₂ + 1``, shape ``batch_shape``."""
        return self._natural[1] + 1.0

    def entropy(self) -> Tensor:
        """Entropy, shape ``batch_shape`` (that of ``Dirichlet((a, b))``)."""
        return dirichlet_entropy(torch.stack((self.a, self.b), -1))

    def _kl_same_family(self, other: ExponentialFamily) -> Tensor:
        """``KL(Beta(a, b) ‖ Beta(a′, b′)) = KL(Dir((a, b)) ‖ Dir((a′, b′)))``."""
        theta = torch.stack(self._natural, -1)
        other_theta = torch.stack(other.natural_params, -1)
        return dirichlet_kl(theta + 1.0, other_theta + 1.0, other_theta - theta)

    def sufficient_statistics(self, x: Tensor) -> Params:
        """``T(x) = (log x, log(1 − x))``, each of ``x``'s shape."""
        return torch.log(x), torch.log1p(-x)

    def to_torch(self) -> torch.distributions.Beta:
        """``torch.distributions.Beta(a, b)``."""
        return torch.distributions.Beta(self.a, self.b, validate_args=False)
