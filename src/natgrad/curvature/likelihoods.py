"""Likelihoods p(y | f) whose model outputs ``f`` are natural parameters.

For an exponential-family likelihood with natural parameter ``f`` the Fisher of ``f`` is
``∇²A(f)``, so the Fisher of a model with outputs ``f(x; θ)`` is ``mean_n J_nᵀ ∇²A(f_n) J_n``.
Every likelihood here exposes, per data point:

- ``nll(outputs, targets)``: negative log-likelihood, shape ``(N,)`` (constants included);
- ``nll_gradient(outputs, targets)``: ``∇_f nll = ∇A(f_n) − T(y_n)``, shape ``(N, C)``;
- ``sample(outputs, generator)``: targets drawn from p(y | f);
- ``natural_hessian(outputs)``: ``∇²A(f_n)``, shape ``(N, C, C)``;
- ``natural_hessian_sqrt(outputs)``: ``S_n`` with ``S_n S_nᵀ = ∇²A(f_n)``, shape ``(N, C, C)``;
- ``natural_hessian_product(outputs, tangents)``: ``∇²A(f_n) t_n`` without forming ``∇²A``.

Outputs have shape ``(N, C)``; ``(N,)`` is read as ``(N, 1)`` for the scalar likelihoods.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as functional
from torch import Tensor

from natgrad._random import drawing_device


def as_matrix(outputs: Tensor) -> Tensor:
    """View model outputs as ``(N, C)``; a 1-d ``(N,)`` tensor becomes ``(N, 1)``."""
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"the model must return one tensor of outputs, (N, C) or (N,), got "
            f"{type(outputs).__name__}"
        )
    if outputs.ndim == 1:
        return outputs.unsqueeze(-1)
    if outputs.ndim != 2:
        raise ValueError(
            f"model outputs must have shape (N, C) or (N,), got {tuple(outputs.shape)}"
        )
    return outputs


class Likelihood(abc.ABC):
    """A likelihood whose outputs are the natural parameters of p(y | f)."""

    name: str

    @abc.abstractmethod
    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sample negative log-likelihood, shape ``(N,)``."""

    @abc.abstractmethod
    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets ``y_n ~ p(y | f_n)``, in the form :meth:`nll` accepts, on the outputs'
        device. The draws happen on the ``generator``'s device (the outputs' without one) and
        are moved: a CPU generator serves outputs on a GPU, with the same draws as on the
        CPU."""

    @abc.abstractmethod
    def natural_hessian_sqrt(self, outputs: Tensor) -> Tensor:
        """``S_n`` with ``S_n S_nᵀ = ∇²A(f_n)``, shape ``(N, C, C)``."""

    def natural_hessian(self, outputs: Tensor) -> Tensor:
        """``∇²A(f_n)`` (the Fisher of the outputs), shape ``(N, C, C)``."""
        root = self.natural_hessian_sqrt(outputs)
        return root @ root.transpose(-1, -2)

    def natural_hessian_product(self, outputs: Tensor, tangents: Tensor) -> Tensor:
        """``∇²A(f_n) t_n`` for every sample, without forming ``∇²A``.

        Parameters
        ----------
        outputs : Tensor of shape (N, C) or (N,)
        tangents : Tensor of shape (..., N, C) or (..., N)
            Output-space vectors ``t_n`` (any leading batch dimensions, e.g. several
            directions).

        Returns
        -------
        Tensor of the shape of ``tangents``
        """
        matrix = as_matrix(outputs)
        columns = tangents.reshape(*tangents.shape[: tangents.ndim - outputs.ndim], *matrix.shape)
        product = (self.natural_hessian(matrix) @ columns.unsqueeze(-1)).squeeze(-1)
        return product.reshape(tangents.shape)

    def nll_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``∇_f nll(f_n, y_n) = ∇A(f_n) − T(y_n)`` for every sample, shape ``(N, C)``.

        By automatic differentiation of :meth:`nll`; the likelihoods here override it in
        closed form. Not differentiable itself (the result is detached).
        """
        with torch.enable_grad():
            leaf = as_matrix(outputs).detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.nll(leaf, targets).sum(), leaf)
        return gradient

    def check_observed(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise unless ``targets`` lie in the support of ``p(y | f)`` for ``outputs``: for
        targets that come from the user (sampled ones always do).

        Raises
        ------
        ValueError
            Naming the likelihood, its support and the offending values.
        """
        problem = self._support_problem(as_matrix(outputs), targets)
        if problem is not None:
            raise ValueError(f"{self.name} likelihood: {problem}")

    def _support_problem(self, outputs: Tensor, targets: Tensor) -> str | None:
        """Why ``targets`` are not observations for ``outputs``, or ``None``."""
        return None

    def _sampling_parameters(self, values: Tensor, what: str) -> Tensor:
        """``values`` (the ``what`` of p(y | f) computed from the outputs), checked to be finite
        before targets are drawn from them."""
        if not bool(torch.isfinite(values).all()):
            raise ValueError(
                f"{self.name} likelihood: cannot sample targets, the {what} computed from the "
                "model's outputs contain infs or NaNs"
            )
        return values

    def check_targets(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Targets reshaped like ``as_matrix(outputs)``; raises on a shape mismatch."""
        matrix = as_matrix(outputs)
        if targets.numel() != matrix.numel():
            raise ValueError(
                f"{self.name} likelihood: targets of shape {tuple(targets.shape)} do not match "
                f"outputs of shape {tuple(outputs.shape)}"
            )
        return targets.reshape(matrix.shape).to(matrix.dtype)


class CategoricalLikelihood(Likelihood):
    """Softmax over logits ``f`` of shape ``(N, C)``, ``C >= 2``; targets are class indices
    ``(N,)``.

    ``∇²A(f) = diag(p) − p pᵀ`` is formed with the diagonal ``p_k (1 − p_k)`` taken as
    ``p_k Σ_{j≠k} p_j``, so it keeps its relative accuracy (and stays PSD) at extreme logits,
    where ``1 − p_k`` would round to zero for the most probable class.
    """

    name = "categorical"

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits = _class_logits(outputs)
        return functional.cross_entropy(logits, self._labels(logits, targets), reduction="none")

    def nll_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits = _class_logits(outputs).detach()
        labels = self._labels(logits, targets)
        gradient = torch.softmax(logits, dim=-1)
        gradient[torch.arange(len(logits), device=logits.device), labels] -= 1.0
        return gradient

    def _support_problem(self, outputs: Tensor, targets: Tensor) -> str | None:
        classes = outputs.shape[-1]
        fractional = targets[targets != targets.round()] if targets.is_floating_point() else None
        if fractional is not None and fractional.numel():
            return f"targets must be class indices, got values such as {float(fractional[0]):g}"
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= classes:
            return f"targets must be class indices in [0, {classes}), got values {low} to {high}"
        return None

    @staticmethod
    def _labels(logits: Tensor, targets: Tensor) -> Tensor:
        if targets.shape != logits.shape[:1]:
            raise ValueError(
                f"categorical likelihood: targets must have shape ({logits.shape[0]},), "
                f"got {tuple(targets.shape)}"
            )
        return targets.long()

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One class index per row, shape ``(N,)``, by inversion of the softmax CDF.

        With ``u ~ U(0, 1]`` the draw is the number of cumulative probabilities below ``u s``,
        ``s`` the last cumulative probability (1 up to rounding): class ``k`` is drawn with
        probability ``p_k``, and never where ``p_k = 0``, even where rounding leaves ``s < 1``.
        Cheaper than ``torch.multinomial`` on small batches (called once per Monte-Carlo Fisher
        step).

        Raises
        ------
        ValueError
            If the probabilities are not finite (NaN or ``+inf`` logits, or a row of ``-inf``).
        """
        probs = torch.softmax(_class_logits(outputs).detach(), dim=-1)
        self._sampling_parameters(probs, "class probabilities")
        draws = torch.rand(
            (probs.shape[0], 1),
            generator=generator,
            dtype=probs.dtype,
            device=drawing_device(generator, probs),
        )
        uniform = 1.0 - draws.to(probs.device)
        below = (probs.cumsum(dim=-1) < uniform).sum(dim=-1)
        classes = probs.shape[-1]
        # u beyond a total that rounding left below 1: the last class with probability > 0
        last_possible = classes - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)
        return torch.where(below < classes, below, last_possible)

    def natural_hessian_sqrt(self, outputs: Tensor) -> Tensor:
        probs, complements = _probabilities_and_complements(_class_logits(outputs))
        root_probs = probs.sqrt()
        return _with_diagonal(
            root_probs * complements, -probs.unsqueeze(-1) * root_probs.unsqueeze(-2)
        )

    def natural_hessian(self, outputs: Tensor) -> Tensor:
        probs, complements = _probabilities_and_complements(_class_logits(outputs))
        return _with_diagonal(probs * complements, -probs.unsqueeze(-1) * probs.unsqueeze(-2))

    def natural_hessian_product(self, outputs: Tensor, tangents: Tensor) -> Tensor:
        probs, complements = _probabilities_and_complements(_class_logits(outputs))
        columns = tangents.reshape(*tangents.shape[: tangents.ndim - outputs.ndim], *probs.shape)
        return (probs * (complements * columns - _sums_of_the_others(probs, columns))).reshape(
            tangents.shape
        )


def _class_logits(outputs: Tensor) -> Tensor:
    """``as_matrix(outputs)``, refusing fewer than two classes (the Fisher would be zero)."""
    logits = as_matrix(outputs)
    if logits.shape[-1] < 2:
        raise ValueError(
            f"categorical likelihood: outputs must hold C >= 2 logits per sample, shape (N, C), "
            f"got shape {tuple(outputs.shape)}; for one logit per sample use "
            "likelihood='bernoulli'"
        )
    return logits


def _most_probable(probs: Tensor) -> Tensor:
    """Boolean mask ``(N, C)`` of each row's most probable class (one per row)."""
    top = probs.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)


def _probabilities_and_complements(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax probabilities ``p`` and ``1 − p_k = Σ_{j≠k} p_j``, both ``(N, C)``.

    ``1 − p_k`` loses its relative accuracy only where ``p_k`` is close to 1, which can happen
    for a row's most probable class alone; its complement is summed from the others.
    """
    probs = torch.softmax(logits, dim=-1)
    top = _most_probable(probs)
    others = torch.where(top, 0.0, probs).sum(dim=-1, keepdim=True)
    return probs, torch.where(top, others, 1.0 - probs)


def _sums_of_the_others(probs: Tensor, columns: Tensor) -> Tensor:
    """``Σ_{j≠k} p_j t_j`` for every class ``k``, shape of ``columns`` ``(..., N, C)``.

    Summed without the most probable class's term for that class itself, so that the sum
    keeps its relative accuracy where that class's probability is close to 1.
    """
    top = _most_probable(probs)
    weighted = probs * columns
    rest = torch.where(top, 0.0, weighted).sum(dim=-1, keepdim=True)
    top_term = torch.where(top, weighted, 0.0).sum(dim=-1, keepdim=True)
    return torch.where(top, rest, rest + top_term - weighted)


def _with_diagonal(diagonal: Tensor, matrices: Tensor) -> Tensor:
    """``matrices`` ``(N, C, C)`` with their diagonals replaced by ``diagonal`` ``(N, C)``."""
    eye = torch.eye(matrices.shape[-1], dtype=torch.bool, device=matrices.device)
    return torch.where(eye, torch.diag_embed(diagonal), matrices)


class GaussianLikelihood(Likelihood):
    """Unit-variance Gaussian regression: ``y ~ N(f, I)``; ``∇²A = I``."""

    name = "gaussian"

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        mean = as_matrix(outputs)
        residual = self.check_targets(outputs, targets) - mean
        return 0.5 * residual.pow(2).sum(-1) + 0.5 * mean.shape[-1] * math.log(2 * math.pi)

    def nll_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return as_matrix(outputs).detach() - self.check_targets(outputs, targets)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean = self._sampling_parameters(outputs.detach(), "means")
        device = drawing_device(generator, mean)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=device)
        return mean + noise.to(mean.device)

    def natural_hessian_sqrt(self, outputs: Tensor) -> Tensor:
        mean = as_matrix(outputs)
        eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
        return eye.expand(mean.shape[0], -1, -1)

    def natural_hessian_product(self, outputs: Tensor, tangents: Tensor) -> Tensor:
        return tangents


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli outputs with logits ``f``; targets in {0, 1}, same shape.

    ``∇²A(f) = diag(σ(f) σ(−f))``: the variance ``p (1 − p)`` with ``1 − p = σ(−f)``, accurate
    at extreme logits where ``1 − σ(f)`` would round to zero.
    """

    name = "bernoulli"

    def _support_problem(self, outputs: Tensor, targets: Tensor) -> str | None:
        low, high = float(targets.min()), float(targets.max())
        if low < 0 or high > 1:
            return f"targets must lie in [0, 1], got values {low:g} to {high:g}"
        return None

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logits = as_matrix(outputs)
        labels = self.check_targets(outputs, targets)
        loss = functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return loss.sum(-1)

    def nll_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        probs = torch.sigmoid(as_matrix(outputs).detach())
        return probs - self.check_targets(outputs, targets)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = self._sampling_parameters(torch.sigmoid(outputs.detach()), "probabilities")
        device = drawing_device(generator, probs)
        return torch.bernoulli(probs.to(device), generator=generator).to(probs.device)

    def natural_hessian_sqrt(self, outputs: Tensor) -> Tensor:
        return torch.diag_embed(_bernoulli_variance(as_matrix(outputs)).sqrt())

    def natural_hessian(self, outputs: Tensor) -> Tensor:
        return torch.diag_embed(_bernoulli_variance(as_matrix(outputs)))

    def natural_hessian_product(self, outputs: Tensor, tangents: Tensor) -> Tensor:
        return _bernoulli_variance(outputs) * tangents


def _bernoulli_variance(logits: Tensor) -> Tensor:
    """``σ(f) (1 − σ(f))`` as ``σ(f) σ(−f)``, without cancellation at extreme logits."""
    return torch.sigmoid(logits) * torch.sigmoid(-logits)


class PoissonLikelihood(Likelihood):
    """Poisson counts with log-rate ``f``: ``y ~ Poisson(exp f)``; ``∇²A = diag(exp f)``."""

    name = "poisson"

    def _support_problem(self, outputs: Tensor, targets: Tensor) -> str | None:
        low = float(targets.min())
        if low < 0:
            return f"targets must be non-negative counts, got a minimum of {low:g}"
        return None

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        log_rate = as_matrix(outputs)
        counts = self.check_targets(outputs, targets)
        return (log_rate.exp() - counts * log_rate + torch.lgamma(counts + 1)).sum(-1)

    def nll_gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        rates = as_matrix(outputs).detach().exp()
        return rates - self.check_targets(outputs, targets)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        rates = self._sampling_parameters(outputs.detach().exp(), "rates")
        device = drawing_device(generator, rates)
        return torch.poisson(rates.to(device), generator=generator).to(rates.device)

    def natural_hessian_sqrt(self, outputs: Tensor) -> Tensor:
        return torch.diag_embed((0.5 * as_matrix(outputs)).exp())

    def natural_hessian(self, outputs: Tensor) -> Tensor:
        return torch.diag_embed(as_matrix(outputs).exp())

    def natural_hessian_product(self, outputs: Tensor, tangents: Tensor) -> Tensor:
        return outputs.exp() * tangents


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls
    for cls in (CategoricalLikelihood, GaussianLikelihood, BernoulliLikelihood, PoissonLikelihood)
}


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """Return the :class:`Likelihood` named ``likelihood`` (or ``likelihood`` itself).

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known ones.
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"unknown likelihood {likelihood!r}; expected one of {sorted(LIKELIHOODS)}"
        )
    return LIKELIHOODS[likelihood]()
