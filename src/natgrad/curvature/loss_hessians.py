"""Closed-form per-sample output Hessians of the standard torch losses, for :func:`ggn`.

A loss ``L = s Σₙ ℓ(fₙ, yₙ)`` with ``ℓ(fₙ, yₙ) = loss_fn(fₙ[None], yₙ[None])`` has the per-sample
output Hessians ``∇²ℓ(fₙ)``, which for these losses are known exactly (``D`` the size of one
sample's outputs, ``p = softmax(f)`` over the class dim 1, ``σ`` the logistic function):

- ``nn.CrossEntropyLoss`` without ``weight``: ``tₗ (diag(pₗ) − pₗ pₗᵀ)`` at every location ``l``
  of the outputs ``(N, C, d1, ...)``, no coupling between locations; ``tₗ = 1`` for class-index
  targets (any ``label_smoothing``: the smoothed target weights sum to 1), none of which may be
  ``ignore_index``; ``tₗ = Σ_c y'_c ≥ 0`` for probability targets ``y`` smoothed to
  ``y' = (1 − ε) y + ε / C``;
- ``nn.BCEWithLogitsLoss`` without ``weight`` or ``pos_weight``: ``diag(σ(f) σ(−f))``;
- ``nn.MSELoss``: ``2 I``;
- ``nn.PoissonNLLLoss(log_input=True)``: ``diag(exp f)`` (``full`` and ``eps`` add only
  target terms);

each divided by the number of loss terms of one sample (``D``, or the ``d1 · ...`` locations of
the cross-entropy) for ``reduction="mean"``. They are returned as roots ``Rₙ`` with
``Rₙ Rₙᵀ = ∇²ℓ(fₙ)``, the likelihoods' ``natural_hessian_sqrt``
(:mod:`natgrad.curvature.likelihoods`). Any other loss, a subclass, an instance with its own
``forward`` or forward hooks, other options, or targets of an elementwise loss shaped unlike
the outputs (which torch would broadcast) give ``None``: not known in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from natgrad.curvature.likelihoods import (
    BernoulliLikelihood,
    CategoricalLikelihood,
    GaussianLikelihood,
    PoissonLikelihood,
)

REDUCTIONS = ("mean", "sum")
"""The reductions under which a closed form applies (``"none"`` gives no scalar loss)."""


def output_hessian_roots(loss_fn: object, outputs: Tensor, targets: Tensor) -> Tensor | None:
    """Roots ``Rₙ`` of the per-sample output Hessians, ``Rₙ Rₙᵀ = ∇²ℓ(fₙ)``, in closed form.

    Parameters
    ----------
    loss_fn : object
        The loss; only the exact torch classes and options listed in this module's docstring
        have a closed form.
    outputs : Tensor of shape (N, ...)
        Model outputs; ``D = outputs[0].numel()``.
    targets : Tensor with N entries along dim 0
        The targets ``loss_fn(outputs, targets)`` was evaluated on.

    Returns
    -------
    Tensor of shape (N, D, D), or None
        ``Rₙ`` for every sample in the outputs' dtype, rows in the order of
        ``outputs[n].reshape(-1)``; ``None`` where the loss has no closed form here.
    """
    closed_form = _CLOSED_FORMS.get(type(loss_fn))
    if closed_form is None or not _plain_call(loss_fn) or loss_fn.reduction not in REDUCTIONS:
        return None
    return closed_form(loss_fn, outputs.detach(), targets)


def _plain_call(loss_fn: nn.Module) -> bool:
    """Whether calling ``loss_fn`` runs its class's ``forward`` and nothing else."""
    hooks = loss_fn._forward_hooks or loss_fn._forward_pre_hooks
    return "forward" not in vars(loss_fn) and not hooks


def _per_term(roots: Tensor, loss_fn: nn.Module, terms: int) -> Tensor:
    """``roots`` divided by ``√terms`` where the loss averages a sample's ``terms`` terms."""
    return roots / math.sqrt(terms) if loss_fn.reduction == "mean" and terms > 1 else roots


def _elementwise_roots(
    loss_fn: nn.Module, outputs: Tensor, targets: Tensor, roots_of: Callable[[Tensor], Tensor]
) -> Tensor | None:
    """Diagonal roots ``roots_of`` of the flattened ``(N, D)`` outputs, for a loss of one term
    per output entry; ``None`` for targets that torch would broadcast against the outputs."""
    if targets.shape != outputs.shape:
        return None
    flat = outputs.reshape(len(outputs), -1)
    return _per_term(roots_of(flat), loss_fn, flat.shape[1])


def _mse_roots(loss_fn: nn.MSELoss, outputs: Tensor, targets: Tensor) -> Tensor | None:
    def roots_of(flat: Tensor) -> Tensor:
        return GaussianLikelihood().natural_hessian_sqrt(flat) * math.sqrt(2.0)

    return _elementwise_roots(loss_fn, outputs, targets, roots_of)


def _bce_roots(loss_fn: nn.BCEWithLogitsLoss, outputs: Tensor, targets: Tensor) -> Tensor | None:
    if loss_fn.weight is not None or loss_fn.pos_weight is not None:
        return None
    return _elementwise_roots(loss_fn, outputs, targets, BernoulliLikelihood().natural_hessian_sqrt)


def _poisson_roots(loss_fn: nn.PoissonNLLLoss, outputs: Tensor, targets: Tensor) -> Tensor | None:
    if not loss_fn.log_input:
        return None
    return _elementwise_roots(loss_fn, outputs, targets, PoissonLikelihood().natural_hessian_sqrt)


def _cross_entropy_roots(
    loss_fn: nn.CrossEntropyLoss, outputs: Tensor, targets: Tensor
) -> Tensor | None:
    """Block-diagonal roots, one ``C × C`` block per location, for logits ``(N, C, d1, ...)``."""
    if loss_fn.weight is not None or outputs.ndim < 2 or outputs.shape[1] < 2:
        return None
    probabilities = targets.shape == outputs.shape
    if not probabilities and bool((targets == loss_fn.ignore_index).any()):
        return None
    num, classes = outputs.shape[:2]
    logits = outputs.reshape(num, classes, -1).transpose(1, 2)  # (N, L, C)
    locations = logits.shape[1]
    blocks = CategoricalLikelihood().natural_hessian_sqrt(logits.reshape(-1, classes))
    if probabilities:
        weights = _target_sums(loss_fn, outputs, targets).reshape(-1, 1, 1)
        if bool((weights < 0).any()):  # concave there: left to the general path's refusal
            return None
        blocks = blocks * weights.sqrt()
    if locations == 1:
        return _per_term(blocks, loss_fn, locations)
    eye = torch.eye(locations, dtype=outputs.dtype, device=outputs.device)
    roots = torch.einsum("nlck,lm->nclkm", blocks.reshape(num, locations, classes, classes), eye)
    size = classes * locations  # rows (c, l) as in outputs[n].reshape(-1), columns (k, m)
    return _per_term(roots.reshape(num, size, size), loss_fn, locations)


def _target_sums(loss_fn: nn.CrossEntropyLoss, outputs: Tensor, targets: Tensor) -> Tensor:
    """``tₗ = Σ_c y'_c`` of the probability targets smoothed as torch smooths them,
    ``y' = (1 − ε) y + ε / C``, shape ``(N, d1, ...)``."""
    smoothing = loss_fn.label_smoothing
    smoothed = targets.to(outputs.dtype) * (1.0 - smoothing) + smoothing / outputs.shape[1]
    return smoothed.sum(dim=1)


_CLOSED_FORMS: dict[type, Callable[[nn.Module, Tensor, Tensor], Tensor | None]] = {
    nn.CrossEntropyLoss: _cross_entropy_roots,
    nn.BCEWithLogitsLoss: _bce_roots,
    nn.MSELoss: _mse_roots,
    nn.PoissonNLLLoss: _poisson_roots,
}
