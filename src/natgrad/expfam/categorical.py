"""Categorical distribution over ``K`` classes, in the minimal natural parameterisation."""

from __future__ import annotations

import torch
import torch.nn.functional as functional
from torch import Tensor

from natgrad.expfam.base import (
    ExponentialFamily,
    Params,
    as_float_tensor,
    require,
    require_finite,
)


class Categorical(ExponentialFamily):
    """A batch of categorical distributions over classes ``0, ..., K − 1``.

    Parameters
    ----------
    probs : Tensor, optional
        Class probabilities, shape ``batch_shape + (K,)``, all positive, summing to one (to
        within ``√eps`` of the dtype; they are then renormalised).
    logits : Tensor, optional
        Unnormalised log-probabilities (full logits), shape ``batch_shape + (K,)``. Give
        exactly one of ``probs`` and ``logits``.
    validate : bool
        Check the parameters (finite; probabilities positive and normalised).

    Notes
    -----
    Minimal parameterisation relative to the last class ``K − 1``:

    - ``T(x) = (1[x = 0], ..., 1[x = K − 2])`` (one-hot without its last entry);
    - natural parameters ``θ_k = log p_k − log p_{K−1}`` for ``k < K − 1``, shape
      ``batch_shape + (K − 1,)``;
    - mean parameters ``η_k = p_k`` for ``k < K − 1``;
    - ``A(θ) = log(1 + Σ_k e^{θ_k})``, ``F(θ) = diag(η) − ηηᵀ`` (``(K − 1) × (K − 1)``,
      positive definite).
    """

    natural_event_ndims = (1,)
    natural_names = ("theta",)
    mean_names = ("eta",)
    natural_domain = "a finite theta with at least one entry (K >= 2)"
    mean_domain = "eta > 0 and sum(eta) < 1"

    def __init__(
        self,
        probs: Tensor | None = None,
        logits: Tensor | None = None,
        *,
        validate: bool = True,
    ) -> None:
        if (probs is None) == (logits is None):
            raise ValueError("Categorical: give exactly one of probs and logits")
        name, value = ("logits", logits) if logits is not None else ("probs", probs)
        tensor = as_float_tensor(value, name)
        if tensor.ndim < 1 or tensor.shape[-1] < 2:
            raise ValueError(
                f"Categorical: {name} needs a last dimension of at least 2 classes, "
                f"got shape {tuple(tensor.shape)}"
            )
        if validate:
            require_finite("Categorical", {name: tensor})
        if logits is not None:
            self._init_natural((tensor[..., :-1] - tensor[..., -1:],))
            return
        if validate:
            _check_probs(tensor)
        log_probs = torch.log(tensor)
        self._init_natural((log_probs[..., :-1] - log_probs[..., -1:],))

    @classmethod
    def log_partition_fn(cls, *theta: Tensor) -> Tensor:
        return functional.pad(theta[0], (0, 1)).logsumexp(-1)

    @classmethod
    def _mean_from_natural(cls, *theta: Tensor) -> Params:
        return (torch.softmax(functional.pad(theta[0], (0, 1)), -1)[..., :-1],)

    @classmethod
    def _natural_from_mean(cls, *eta: Tensor) -> Params:
        last = 1.0 - eta[0].sum(-1, keepdim=True)
        return (torch.log(eta[0]) - torch.log(last),)

    @classmethod
    def _fisher_from_natural(cls, *theta: Tensor) -> Tensor:
        (probs,) = cls._mean_from_natural(*theta)
        return torch.diag_embed(probs) - probs[..., :, None] * probs[..., None, :]

    @classmethod
    def _natural_in_domain(cls, *theta: Tensor) -> Tensor:
        finite = theta[0].isfinite().all(-1)
        return finite if theta[0].shape[-1] >= 1 else torch.zeros_like(finite)

    @classmethod
    def _mean_in_domain(cls, *eta: Tensor) -> Tensor:
        inside = (eta[0] > 0).all(-1) & (eta[0].sum(-1) < 1)
        return inside if eta[0].shape[-1] >= 1 else torch.zeros_like(inside)

    @property
    def num_categories(self) -> int:
        """Number of classes ``K``."""
        return self._natural[0].shape[-1] + 1

    @property
    def logits(self) -> Tensor:
        """Normalised log-probabilities ``log p``, shape ``batch_shape + (K,)``."""
        return torch.log_softmax(functional.pad(self._natural[0], (0, 1)), -1)

    @property
    def probs(self) -> Tensor:
        """Class probabilities ``p``, shape ``batch_shape + (K,)``."""
        return torch.softmax(functional.pad(self._natural[0], (0, 1)), -1)

    def entropy(self) -> Tensor:
        """``H = −Σ_k p_k log p_k`` from the log-probabilities, shape ``batch_shape``.

        The generic form ``A(θ) − ⟨θ, η⟩`` cancels terms of size ``|θ|`` and was off by 5e-9
        relative for a class of probability ``1 − 10⁻⁹``.
        """
        log_probs = self.logits
        return -(log_probs.exp() * log_probs).sum(-1)

    def sufficient_statistics(self, x: Tensor) -> Params:
        """One-hot of the class indices ``x`` without the last class, ``x.shape + (K − 1,)``."""
        if x.is_floating_point():
            raise TypeError(f"Categorical: x must hold integer class indices, got {x.dtype}")
        one_hot = functional.one_hot(x.long(), self.num_categories).to(self.dtype)
        return (one_hot[..., :-1],)

    def to_torch(self) -> torch.distributions.Categorical:
        """``torch.distributions.Categorical(logits=log p)``."""
        return torch.distributions.Categorical(logits=self.logits, validate_args=False)


def _check_probs(probs: Tensor) -> None:
    values = {"probs": probs}
    require((probs.detach() > 0).all(-1), "Categorical: probs must be positive", values)
    tolerance = torch.finfo(probs.dtype).eps ** 0.5
    total = probs.detach().sum(-1)
    require((total - 1).abs() <= tolerance, "Categorical: probs must sum to one", values)
