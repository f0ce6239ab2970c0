"""Natural gradient descent as a ``torch.optim.Optimizer``.

One step is ``g = ∇L(θ)``, ``d = (F(θ) + λI)⁻¹ g``, ``θ ← θ − α d`` with ``F`` built by
:func:`natgrad.fisher` on the inputs of the model's latest forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from natgrad._validation import nonnegative_float, one_of, positive_float, positive_int
from natgrad.curvature import fisher
from natgrad.curvature.base import CurvatureOperator
from natgrad.curvature.builders import checked_cg_options
from natgrad.curvature.evaluation_scope import dropout_off
from natgrad.curvature.kfac_capture import trainable_parameters
from natgrad.curvature.likelihoods import Likelihood, get_likelihood
from natgrad.distributed import GlobalBatch, mean_over_processes, true_everywhere
from natgrad.optim.counted import CountedOptimizer
from natgrad.optim.input_capture import InputCapture
from natgrad.optim.step_parameters import step_parameters
from natgrad.optim.trust_region import (
    kl_clip_scale,
    levenberg_marquardt_damping,
    loss_resolution,
)

_KINDS = ("exact", "mc", "empirical")
_STRUCTURES = ("dense", "diag", "block", "kfac", "ekfac", "implicit")


class NaturalGradient(CountedOptimizer):
    """Natural gradient descent ``θ ← θ − lr (F + λI)⁻¹ ∇L`` over a model's parameters.

    The Fisher ``F`` is the **mean** over the data points of the latest forward pass of
    ``model`` (captured by a forward pre-hook), so ``lr=1`` is a Fisher-scoring (Gauss-Newton)
    step when the loss is the **mean** negative log-likelihood.

    Parameters
    ----------
    model : torch.nn.Module
        The model (or its ``DistributedDataParallel`` wrapper) whose trainable parameters are
        optimized. Its first positional forward argument is taken as the inputs ``(N, ...)``
        of the Fisher.
    likelihood : str or Likelihood
        ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or ``"poisson"``: the model outputs are
        the natural parameters of ``p(y | f)``.
    lr : float, default 1.0
        Step size ``α``.
    kind : {"exact", "mc", "empirical"}, default "exact"
        Fisher estimator; ``"empirical"`` needs ``targets`` in :meth:`step`.
    structure : {"dense", "diag", "block", "kfac", "ekfac", "implicit"}, default "dense"
        Structure of the Fisher approximation.
    damping : float, default 1e-3
        Tikhonov damping ``λ`` added to ``F``.
    adaptive_damping : bool, default False
        Adapt ``λ`` by the Levenberg–Marquardt rule from the ratio of actual to predicted loss
        reduction (re-evaluates the closure once per step).
    max_kl : float, optional
        If given, shrink the step so that ``½ lr² dᵀ F d ≤ max_kl`` (KL clipping).
    mc_samples : int, default 1
        Sampled targets per input for ``kind="mc"``.
    generator : torch.Generator, optional
        Random source for ``kind="mc"``; its state round-trips through ``state_dict()``.
    process_group : ProcessGroup, optional
        Under ``torch.distributed``, the processes whose batches form one global batch
        (default: the world); see the notes.
    cg_rtol : float, optional
        For ``structure="implicit"``: the relative residual tolerance of the conjugate
        gradients, in ``(0, 1)`` (default and meaning as in :func:`fisher`).
    cg_max_iter : int, optional
        For ``structure="implicit"``: the conjugate gradients' iteration cap, at least 1.

    Notes
    -----
    Each step updates the model's parameters that require gradients at that step, in
    ``model.parameters()`` order (the order of the Fisher): a parameter frozen after
    construction is left alone, and one unfrozen later must be added with
    :meth:`add_param_group` (a step raises otherwise). ``lr`` may differ between param groups.
    ``damping`` and ``max_kl`` belong to the whole step (the Fisher couples all groups): they
    are stored in every param group, so that they round-trip through ``state_dict()`` and can
    be changed by a scheduler, and the first group's values are used.

    A step whose loss, gradient or direction is non-finite is refused: the parameters are left
    unchanged, a ``RuntimeWarning`` says why and ``counters["refused_steps"]`` counts it. With
    ``adaptive_damping`` a step that raises the loss of the closure's batch is
    undone (``counters["rejected_steps"]``) and the damping raised, as in Levenberg–Marquardt;
    the damping is left as it is where the quadratic model predicts no change beyond the loss's
    round-off (a zero gradient, ``lr = 0``), or a rise (``lr > 2``) that did not happen.

    The Fisher is that of one deterministic function of independent samples: it is built with
    the model's dropout layers in eval mode (the network that dropout averages; the closure's
    gradient keeps its dropout), and :func:`fisher` refuses BatchNorm layers in training mode
    (train such a model in eval mode) and embeddings with ``scale_grad_by_freq=True``.

    Under ``torch.distributed`` (data parallelism: every process steps its replica, usually
    wrapped in ``DistributedDataParallel``, on its shard of each global batch, with the same
    options) the steps are those of one process on the global batch, and the replicas stay
    equal. The gradient must be the processes' average, as DDP's is; the Fisher is that of the
    global batch, the mean over all its samples (:func:`fisher` with a
    :class:`~natgrad.distributed.GlobalBatch`: the processes' statistics and sample counts
    are all-reduced; ``"implicit"`` all-reduces every Fisher-vector product of its conjugate
    gradients). ``kind="mc"`` draws the targets of the whole global batch on every process and
    keeps each process's own: with a ``generator`` seeded alike on every process they are
    the draws of one process on the global batch (with differently seeded ones, draws from the
    same distribution). The losses of the damping rule are averaged over the processes (DDP's
    objective), a step refused on one process (a loss or gradient not finite) is refused on
    all, and a step undone on one is undone on all. With shares of unequal sizes, the global
    batch's mean loss is the processes' average when each closure returns the sum of its
    samples' losses times ``world_size / global_batch_size``; a closure returning its own mean
    loss weights the samples of a smaller share more in the gradient, not in the Fisher.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        lr: float = 1.0,
        *,
        kind: str = "exact",
        structure: str = "dense",
        damping: float = 1e-3,
        adaptive_damping: bool = False,
        max_kl: float | None = None,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        process_group: dist.ProcessGroup | None = None,
        cg_rtol: float | None = None,
        cg_max_iter: int | None = None,
    ) -> None:
        defaults = _checked_options({"lr": lr, "damping": damping, "max_kl": max_kl})
        kind = one_of("kind", kind, _KINDS)
        structure = one_of("structure", structure, _STRUCTURES)
        mc_samples = positive_int("mc_samples", mc_samples)
        solver_options = checked_cg_options(structure, cg_rtol, cg_max_iter)
        _check_types(model, adaptive_damping, generator, process_group)
        params = trainable_parameters(model)
        if not params:
            raise ValueError("model has no trainable parameters")
        self.model = model  # before the base class adds the first group (add_param_group)
        self.module = model.module if isinstance(model, DistributedDataParallel) else model
        super().__init__(params, defaults)
        self.likelihood = get_likelihood(likelihood)
        self.kind = kind
        self.structure = structure
        self.adaptive_damping = adaptive_damping
        self.mc_samples = mc_samples
        self.generator = generator
        self.process_group = process_group
        self.cg_options = solver_options
        self.counters = {"steps": 0, "refused_steps": 0, "rejected_steps": 0}
        self._capture = InputCapture(self.module)

    @torch.no_grad()
    def step(
        self, closure: Callable[[], Tensor] | None = None, *, targets: Tensor | None = None
    ) -> Tensor | None:
        """Take one natural-gradient step.

        Parameters
        ----------
        closure : callable
            Zeroes the gradients, runs the model forward on a batch, computes the loss, calls
            ``backward()`` and returns the loss. Required.
        targets : Tensor, optional
            Observed targets of that batch, needed by ``kind="empirical"``.

        Returns
        -------
        Tensor
            The loss returned by the closure before the step.
        """
        if closure is None:
            raise ValueError("NaturalGradient.step needs a closure that returns the loss")
        if self.kind == "empirical" and targets is None:
            raise ValueError(
                "kind='empirical' needs the observed targets: step(closure, targets=...)"
            )
        loss = self._capture.run(closure)
        params, lrs = self._step_parameters()
        gradient = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
        finite = bool(torch.isfinite(loss).all() and torch.isfinite(gradient).all())
        if not true_everywhere(finite, self.process_group):  # refused together, or not at all
            return self._refuse(loss, "the loss or its gradient is not finite")
        with dropout_off(self.module):  # the Fisher of the network that dropout averages
            curvature = self._curvature(targets)
            group_damping = self.param_groups[0]["damping"]
            direction = curvature.solve(gradient.to(curvature.dtype), damping=group_damping)
            if not torch.isfinite(direction).all():
                return self._refuse(loss, "the natural-gradient direction is not finite")
            update = self._scaled_update(curvature, direction, lrs)
            curved = float(update @ curvature.mv(update)) if self.adaptive_damping else 0.0
        previous = [p.detach().clone() for p in params] if self.adaptive_damping else []
        self._subtract(params, update)
        if self.adaptive_damping:
            self._adapt_damping(closure, loss, gradient, curved, update, params, previous)
        self.counters["steps"] += 1
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group of parameters of the model (e.g. ones unfrozen after construction).

        Parameters
        ----------
        param_group : dict
            ``"params"`` (a tensor or an iterable of tensors) and optionally ``"lr"``,
            ``"damping"``, ``"max_kl"``; missing options take the constructor's values.

        Raises
        ------
        ValueError
            If a parameter is not one of the model's, or an option is out of range.
        TypeError
            If an option is not a real number (``max_kl``: nor ``None``).
        """
        super().add_param_group({**param_group, **_checked_options(param_group)})
        own = {id(p) for p in self.model.parameters()}
        foreign = [tuple(p.shape) for p in self.param_groups[-1]["params"] if id(p) not in own]
        if foreign:
            self.param_groups.pop()
            raise ValueError(
                f"NaturalGradient optimizes parameters of its model only; got parameters of "
                f"shapes {foreign} that are not in model.parameters()"
            )

    def _step_parameters(self) -> tuple[list[Tensor], list[float]]:
        """The model's trainable parameters, in the Fisher's order
        (:func:`~natgrad.optim.step_parameters.step_parameters`), and each one's group ``lr``."""
        params = step_parameters(
            self.module,
            self.param_groups,
            "add them with add_param_group or set requires_grad=False",
        )
        lr_of = {id(p): group["lr"] for group in self.param_groups for p in group["params"]}
        return params, [lr_of[id(p)] for p in params]

    def _curvature(self, targets: Tensor | None) -> CurvatureOperator:
        with torch.enable_grad():
            return fisher(
                self.module,
                self._capture.inputs,
                likelihood=self.likelihood,
                kind=self.kind,
                structure=self.structure,
                targets=targets,
                mc_samples=self.mc_samples,
                generator=self.generator,
                global_batch=GlobalBatch(self.process_group),
                **self.cg_options,
            )

    def _scaled_update(
        self, curvature: CurvatureOperator, direction: Tensor, lrs: list[float]
    ) -> Tensor:
        """Per-parameter ``lr · d``, shrunk as a whole by KL clipping where ``max_kl`` is set."""
        scales = torch.cat(
            [
                direction.new_full((count,), lr)
                for count, lr in zip(curvature.param_numels, lrs, strict=True)
            ]
        )
        update = scales * direction
        max_kl = self.param_groups[0]["max_kl"]
        if max_kl is not None:
            update = update * kl_clip_scale(update, curvature.mv(update), max_kl)
        return update

    @staticmethod
    def _subtract(params: list[Tensor], update: Tensor) -> None:
        offset = 0
        for p in params:
            count = p.numel()
            p.sub_(update[offset : offset + count].view_as(p).to(p.dtype))
            offset += count

    def _adapt_damping(
        self,
        closure: Callable[[], Tensor],
        loss: Tensor,
        gradient: Tensor,
        curved: float,
        update: Tensor,
        params: list[Tensor],
        previous: list[Tensor],
    ) -> None:
        """Levenberg–Marquardt: compare the actual loss change with the quadratic model's
        (``curved = δᵀFδ``, formed with dropout off: an implicit ``F`` runs the model).

        A step that does not decrease the loss is undone by restoring ``previous`` exactly.
        ``λ`` is left as it is where the model predicts no change beyond the loss's round-off
        (:func:`~natgrad.optim.trust_region.loss_resolution`), e.g. at a zero gradient. Under
        ``torch.distributed`` both losses are averaged over the processes first
        (:func:`~natgrad.distributed.mean_over_processes`), so that all judge the step alike.
        """
        with torch.enable_grad():
            new_loss = closure()
        dtype = loss.dtype
        loss, new_loss = mean_over_processes([loss, new_loss], self.process_group)
        damping = self.param_groups[0]["damping"]
        quadratic = curved + damping * float(update @ update)
        predicted = float(-(gradient.to(update.dtype) @ update) + 0.5 * quadratic)
        actual = float(new_loss - loss)
        if not math.isfinite(actual):
            _restore(params, previous)
            self._refuse(loss, "the loss after the step is not finite; step undone")
        elif actual > 0:
            _restore(params, previous)
            self.counters["rejected_steps"] += 1
        tolerance = loss_resolution(float(loss), float(new_loss), dtype)
        new_damping = levenberg_marquardt_damping(damping, actual, predicted, tolerance=tolerance)
        for group in self.param_groups:
            group["damping"] = new_damping


_OPTION_CHECKS: dict[str, Callable[[object], float | None]] = {
    "lr": lambda value: positive_float("lr", value),
    "damping": lambda value: nonnegative_float("damping", value),
    "max_kl": lambda value: positive_float("max_kl", value, allow_none=True),
}
"""Validation of the per-group step options (see :class:`NaturalGradient`)."""


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """The step options among ``options``, validated; other entries are left out."""
    return {
        name: _OPTION_CHECKS[name](value)
        for name, value in options.items()
        if name in _OPTION_CHECKS
    }


def _check_types(
    model: object, adaptive_damping: object, generator: object, process_group: object
) -> None:
    """Raise ``TypeError`` for a ``model`` that is not a module, an ``adaptive_damping`` that is
    not a bool, a ``generator`` that is neither ``None`` nor a ``torch.Generator``, or a
    ``process_group`` that is neither ``None`` nor a ``ProcessGroup``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(adaptive_damping, bool):
        raise TypeError(f"adaptive_damping must be a bool, got {adaptive_damping!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup or None, got "
            f"{type(process_group).__name__}"
        )


def _restore(params: list[Tensor], previous: list[Tensor]) -> None:
    for param, value in zip(params, previous, strict=True):
        param.copy_(value)
