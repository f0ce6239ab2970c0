"""Step size and momentum chosen by the damped quadratic model (Martens & Grosse 2015, §7).

A preconditioner such as :class:`~natgrad.optim.KFAC` gives a direction ``Δ = −C⁻¹ g``; instead
of a hand-tuned learning rate and momentum, every step takes ``δ = α Δ + μ δ₀`` (``δ₀`` the
previous step) with ``(α, μ)`` minimising the quadratic model of the loss,

    M(δ) = gᵀδ + ½ δᵀ (F + λI) δ,

where ``F`` is the exact Fisher (generalised Gauss–Newton) of the current batch, applied
through two forward-mode Jacobian-vector products: ``(α, μ)`` solve a 2×2 linear system. The
damping ``λ`` follows the Levenberg–Marquardt rule from the ratio of the actual loss change to
``M(δ)``, and is handed to the preconditioner, so that its own damping tracks it::

    precond = natgrad.optim.KFAC(model, fisher_type="mc", likelihood="bernoulli")
    optimizer = natgrad.optim.QuadraticModelOptimizer(model, "bernoulli", preconditioner=precond)
    for inputs, targets in loader:
        def closure():
            optimizer.zero_grad()
            outputs = model(inputs)
            precond.sample_backward(outputs)   # for fisher_type="mc" or "exact"
            loss = loss_fn(outputs, targets)   # the MEAN negative log-likelihood
            loss.backward()
            return loss
        optimizer.step(closure)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from natgrad._validation import positive_float, positive_int, unit_interval
from natgrad.curvature.evaluation_scope import dropout_off
from natgrad.curvature.jacobians import ModelFunction, check_no_frequency_scaling
from natgrad.curvature.kfac_capture import trainable_parameters
from natgrad.curvature.likelihoods import Likelihood, get_likelihood
from natgrad.distributed.agreement import Agreement
from natgrad.distributed.reduce import all_reduce_sum_, world_size
from natgrad.optim.counted import CountedOptimizer
from natgrad.optim.input_capture import InputCapture
from natgrad.optim.kfac import KFAC
from natgrad.optim.step_parameters import step_parameters
from natgrad.optim.trust_region import damping_update, loss_resolution, trust_region_scale

__all__ = ["QuadraticModelOptimizer", "minimize_quadratic_model"]


def minimize_quadratic_model(curvature: Tensor, linear: Tensor) -> tuple[Tensor, float]:
    """Coefficients ``c`` minimising ``bᵀc + ½ cᵀ A c`` over the span of a few directions.

    Parameters
    ----------
    curvature : Tensor of shape (k, k)
        ``A_ij = d_iᵀ (F + λI) d_j``, symmetric positive semi-definite.
    linear : Tensor of shape (k,)
        ``b_i = gᵀ d_i``.

    Returns
    -------
    coefficients : Tensor of shape (k,), float64
        ``c = −A⁺ b`` (the minimum-norm minimiser where ``A`` is singular, e.g. for parallel
        directions).
    predicted_change : float
        The model's value at ``c``, ``bᵀc + ½ cᵀ A c = ½ bᵀc`` (``≤ 0``).

    Raises
    ------
    ValueError
        If the shapes disagree or an entry is not finite.
    """
    if curvature.ndim != 2 or curvature.shape != (linear.numel(), linear.numel()):
        raise ValueError(
            f"curvature must be ({linear.numel()}, {linear.numel()}) for {linear.numel()} "
            f"directions, got {tuple(curvature.shape)}"
        )
    matrix = curvature.to(torch.float64)
    vector = linear.to(torch.float64).reshape(-1)
    if not (torch.isfinite(matrix).all() and torch.isfinite(vector).all()):
        raise ValueError("the quadratic model has non-finite coefficients")
    coefficients = -torch.linalg.pinv(0.5 * (matrix + matrix.T), hermitian=True) @ vector
    return coefficients, _model_value(matrix, vector, coefficients)


def _model_value(curvature: Tensor, linear: Tensor, coefficients: Tensor) -> float:
    """``bᵀc + ½ cᵀ A c``."""
    return float(linear @ coefficients + 0.5 * coefficients @ curvature @ coefficients)


def _numels(params: list[Tensor]) -> list[int]:
    return [p.numel() for p in params]


def _flat(tensors: list[Tensor | None], params: list[Tensor]) -> Tensor:
    """One flat vector of ``tensors`` (zeros where a tensor is ``None``), in ``params`` order."""
    return torch.cat(
        [
            (p.new_zeros(p.numel()) if t is None else t.reshape(-1))
            for t, p in zip(tensors, params, strict=True)
        ]
    )


class QuadraticModelOptimizer(CountedOptimizer):
    """Martens & Grosse's update ``δ = α Δ + μ δ₀`` with ``(α, μ)`` from the quadratic model.

    Parameters
    ----------
    model : nn.Module
        The model (or its ``DistributedDataParallel`` wrapper) whose trainable parameters are
        optimized. Its first positional forward argument is taken as the inputs ``(N, ...)`` of
        the batch; its outputs are the natural parameters of ``likelihood``.
    likelihood : str or Likelihood
        ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or ``"poisson"``: its ``∇²A`` gives the
        exact Fisher ``F = mean_n J_nᵀ ∇²A(f_n) J_n`` of the model.
    preconditioner : KFAC or EKFAC, optional
        Rewrites the gradients into ``C⁻¹ g`` (its :meth:`~KFAC.step` is called by
        :meth:`step`); without one the direction is ``−g``.
    lr : float, default 1.0
        Multiplies the chosen step: ``δ = lr (α Δ + μ δ₀)`` (1 is Martens & Grosse's update;
        LR schedulers act on it).
    damping : float, default 1e-2
        Initial ``λ`` (a positive number).
    max_kl : float, optional
        Trust region: shrink the step ``δ`` (``lr`` included) so that ``½ δᵀFδ ≤ max_kl`` (the
        second-order KL of the batch's predictive distribution), which keeps early steps with a
        small ``λ`` from overshooting where the Fisher is near zero (e.g. saturated softmax
        outputs).
    adaptive_damping : bool, default True
        Adapt ``λ`` every ``damping_adaptation_interval`` steps by the Levenberg–Marquardt rule
        (one extra evaluation of the closure, with the preconditioner's recording paused; none
        with ``full_batch``).
    damping_adaptation_interval : int, default 5
    damping_decay : float in (0, 1), optional
        ``λ ← ω λ`` when the reduction ratio exceeds 3/4, ``λ ← λ / ω`` when it is below 1/4;
        default ``ω = (19/20)^T`` with ``T`` the interval. ``λ`` is left as it is where the
        ratio is undefined: the model predicts no change beyond the round-off of the loss (a
        zero gradient, ``lr = 0``; :func:`~natgrad.optim.trust_region.loss_resolution`), or a
        rise (``lr > 2``) that did not happen.
    damping_bounds : (float, float), default (1e-3, 1e4)
        The adapted ``λ`` stays within these. The reduction ratio is measured on the batch that
        chose the step, which flatters the step on small batches, so ``λ`` sinks to the floor;
        too low a floor (for the mean-loss Fisher) lets the steps fit each batch and training
        degrades. Digits autoencoder, batch 64, 100 epochs: with a floor of 1e-8 the training
        loss rose from 15.6 to 22; with 1e-4 two of four seeds blew up after 600–1500 steps
        (to 1121 and 34); with 1e-3 all four ended at 14.36–14.38. Lower it for large or full
        batches.
    couple_damping : bool, default True
        Set the preconditioner's damping to ``λ`` before each of its steps that refreshes the
        inverses (with factored damping its factors are then damped by ``π√λ`` and ``√λ/π``,
        Martens & Grosse's ``γ = √λ``); in between it keeps the damping of its last refresh,
        so that a change of ``λ`` never costs an extra factorisation. The preconditioner must
        not adapt its damping itself.
    momentum : bool, default True
        Include the previous step ``δ₀`` (``μ``); ``False`` chooses ``α`` alone.
    curvature_batch_size : int, optional
        Evaluate ``F``'s products on the first this-many samples of the batch only (cheaper);
        default the whole batch.
    full_batch : bool, default False
        Declare that the closure evaluates the same data at every step (full-batch training,
        without dropout or other randomness). The damping rule then takes the loss after a step
        from the next step's call of the closure instead of calling the closure once more: one
        forward and backward pass fewer per adaptation, with the same steps and dampings. The
        last step's assessment waits for the next :meth:`step`.
    reject_steps : bool, default False
        Undo an assessed step after which the loss of its batch rose (Levenberg–Marquardt's
        acceptance test). Off by default, as in Martens & Grosse: with momentum the progress is
        not monotone, and on digits the test cost steps (full batch: 68 instead of 56 to the
        target) without being what kept long runs stable (the damping floor is).

    Attributes
    ----------
    counters : dict of str to int
        ``"steps"`` taken, ``"refused_steps"`` and ``"rejected_steps"``.
    last_step : dict of str to float
        Of the last step taken: ``"alpha"`` and ``"mu"`` (as applied, after ``lr`` and
        ``max_kl``), ``"predicted_change"`` ``M(δ)`` and, where the damping was adapted,
        ``"actual_change"`` and ``"ratio"`` (not with ``full_batch``: the assessment comes
        with the next step).
    last_damping_update : dict of str to float or None
        Of the last adaptation of ``λ``: ``"actual"`` and ``"predicted"`` change of the loss,
        ``"ratio"`` (NaN where undefined, ``-inf`` for a failed step), ``"damping_before"`` and
        ``"damping_after"``.

    Notes
    -----
    One param group (the quadratic model couples all parameters): each step moves the model's
    parameters that require gradients at that step, so one frozen after construction is left
    alone, and one unfrozen after construction (in no group) makes :meth:`step` raise, naming
    it. The closure must return the **mean** negative log-likelihood of the batch under
    ``likelihood`` (the scale ``F`` refers to): the mean over the ``N`` samples, so for
    outputs per position ``(N, T, C)`` the positions' losses summed per sample
    (``cross_entropy(..., reduction="sum") / N``, not the default mean over ``N·T``, which
    would make the quadratic model ``T`` times too curved). Steps whose loss, gradient or
    direction is not finite are refused: the parameters are left as they are, a
    ``RuntimeWarning`` says why and ``counters["refused_steps"]`` counts it.
    ``λ`` lives in the param group (key ``"damping"``, with ``"lr"`` and ``"max_kl"``), the
    previous step in the per-parameter state; both round-trip through :meth:`state_dict` (save
    the preconditioner's state as well). Under ``torch.distributed`` the model is that of the
    objective whose gradient ``DistributedDataParallel`` computes, the mean of the processes'
    mean losses: each process's Fisher products (the mean over its own samples) and the losses
    of the damping rule are averaged over the processes with equal weights. With shares of
    unequal sizes this weights the samples of a smaller share more than one process on the
    global batch would, as DDP's gradient does. A loss that is not finite on one process
    refuses the step on every process.

    An assessed step after which the loss of its batch is not finite is undone and counted as
    refused, with a warning; with ``reject_steps`` so is one after which that loss is higher
    than before (``counters["rejected_steps"]``). The damping rule has then raised ``λ``, the
    momentum direction is dropped and the next step is assessed too, whatever the interval.
    With ``full_batch`` the step is undone at the next call, whose closure then runs once more
    at the restored parameters (with the preconditioner's recording paused).

    The Fisher products re-run the model on the captured inputs, outside the closure: BatchNorm
    layers in training mode are refused (they couple the samples), and dropout layers are
    switched off there (the Fisher of the network that dropout averages; the closure's gradient
    keeps its masks). Embeddings with ``scale_grad_by_freq=True`` and a
    trainable weight are refused when the optimizer is built: their gradient, divided by the
    tokens' counts in the batch, is not the derivative that the quadratic model needs.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood,
        *,
        preconditioner: KFAC | None = None,
        lr: float = 1.0,
        damping: float = 1e-2,
        max_kl: float | None = None,
        adaptive_damping: bool = True,
        damping_adaptation_interval: int = 5,
        damping_decay: float | None = None,
        damping_bounds: tuple[float, float] = (1e-3, 1e4),
        couple_damping: bool = True,
        momentum: bool = True,
        curvature_batch_size: int | None = None,
        full_batch: bool = False,
        reject_steps: bool = False,
    ) -> None:
        damping = positive_float("damping", damping)
        interval = positive_int("damping_adaptation_interval", damping_adaptation_interval)
        low = positive_float("damping_bounds[0]", damping_bounds[0])
        high = positive_float("damping_bounds[1]", damping_bounds[1])
        if not low <= damping <= high:
            raise ValueError(
                f"damping_bounds {damping_bounds!r} must satisfy low <= damping ({damping!r}) "
                "<= high"
            )
        if preconditioner is not None and not isinstance(preconditioner, KFAC):
            raise TypeError(
                f"preconditioner must be a KFAC or EKFAC, got {type(preconditioner).__name__}"
            )
        if couple_damping and preconditioner is not None and preconditioner.adaptive_damping:
            raise ValueError(
                "couple_damping sets the preconditioner's damping: build it with "
                "adaptive_damping=False"
            )
        if curvature_batch_size is not None:
            curvature_batch_size = positive_int("curvature_batch_size", curvature_batch_size)
        self.module = model.module if isinstance(model, DistributedDataParallel) else model
        check_no_frequency_scaling(self.module)
        params = trainable_parameters(model)
        if not params:
            raise ValueError("model has no trainable parameters")
        defaults = {
            "lr": positive_float("lr", lr),
            "damping": damping,
            "max_kl": positive_float("max_kl", max_kl, allow_none=True),
        }
        super().__init__(params, defaults)
        self.likelihood = get_likelihood(likelihood)
        self.preconditioner = preconditioner
        self.adaptive_damping = bool(adaptive_damping)
        self.damping_adaptation_interval = interval
        self.damping_decay = (
            (19 / 20) ** interval
            if damping_decay is None
            else unit_interval("damping_decay", damping_decay, closed_left=False)
        )
        self.damping_bounds = (low, high)
        self.couple_damping = bool(couple_damping)
        self.momentum = bool(momentum)
        self.curvature_batch_size = curvature_batch_size
        self.full_batch = bool(full_batch)
        self.reject_steps = bool(reject_steps)
        self.last_damping_update: dict[str, float] | None = None
        self._pending: tuple[float, float] | None = None
        self._assess_next = False
        self.process_group = None if preconditioner is None else preconditioner.process_group
        self.counters = {"steps": 0, "refused_steps": 0, "rejected_steps": 0}
        self.last_step: dict[str, float] = {}
        self._capture = InputCapture(self.module, only_with_grad=True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only the model's parameters, as one group (the quadratic model couples them all)."""
        if self.param_groups:
            raise ValueError("QuadraticModelOptimizer has exactly one param group: the model's")
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, with the counters, whether the next step is assessed and
        (``full_batch``) the step that awaits its assessment."""
        state = super().state_dict()
        state["pending_assessment"] = self._pending
        state["assess_next"] = self._assess_next
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        state = dict(state_dict)
        pending = state.pop("pending_assessment", None)
        self._assess_next = bool(state.pop("assess_next", False))
        super().load_state_dict(state)
        self._pending = None if pending is None else (float(pending[0]), float(pending[1]))

    @property
    def damping(self) -> float:
        """The current ``λ``."""
        return self.param_groups[0]["damping"]

    def _params(self) -> list[Tensor]:
        """The model's parameters that require gradients now, in ``model.parameters()`` order
        (that of the Fisher products; :func:`~natgrad.optim.step_parameters.step_parameters`):
        one frozen after construction is left alone, one unfrozen since is refused."""
        return step_parameters(
            self.module,
            self.param_groups,
            "they were frozen when this QuadraticModelOptimizer was built; build a new one (the "
            "quadratic model couples all parameters in its one param group) or set "
            "requires_grad=False on them",
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """Take one step.

        Parameters
        ----------
        closure : callable
            Zeroes the gradients, runs the model forward on a batch (and, for a Monte-Carlo or
            exact-Fisher K-FAC, ``precond.sample_backward(outputs)``), computes the mean negative
            log-likelihood, calls ``backward()`` and returns it. Required.

        Returns
        -------
        Tensor
            The loss returned by the closure before the step.
        """
        if closure is None:
            raise ValueError("QuadraticModelOptimizer.step needs a closure that returns the loss")
        params = self._params()
        generator_state = self._generator_state()
        loss = self._capture.run(closure)
        if self._pending is not None:  # full_batch: this loss is the last step's loss after
            loss = self._assess_pending(closure, loss, generator_state)
        if not self._finite_everywhere(loss):
            return self._refuse(loss, "the loss is not finite (on this process or another)")
        gradient = _flat([p.grad for p in params], params)
        directions = [self._direction(params, gradient)]
        previous = [self.state[p].get("previous_update") for p in params]
        if self.momentum and all(value is not None for value in previous):
            directions.append(_flat(previous, params))
        stacked = torch.stack(directions)
        linear = (stacked @ gradient).to(torch.float64)
        euclidean = (stacked @ stacked.T).to(torch.float64)
        if not (torch.isfinite(linear).all() and torch.isfinite(euclidean).all()):
            return self._refuse(loss, "the gradient or the preconditioned direction is not finite")
        fisher = self._fisher_gram(stacked)
        curvature = fisher + self.damping * euclidean
        if not torch.isfinite(curvature).all():
            return self._refuse(loss, "the Fisher products are not finite")
        coefficients, _ = minimize_quadratic_model(curvature, linear)
        coefficients *= self.param_groups[0]["lr"]
        coefficients *= self._kl_scale(fisher, coefficients)
        predicted = _model_value(curvature, linear, coefficients)
        update = coefficients.to(stacked.dtype) @ stacked
        chunks = [
            chunk.view_as(p) for chunk, p in zip(update.split(_numels(params)), params, strict=True)
        ]
        torch._foreach_add_(params, chunks)
        for p in self.param_groups[0]["params"]:  # frozen ones took no part in this step
            self.state[p].pop("previous_update", None)
        for p, chunk in zip(params, chunks, strict=True):  # to undo, and as momentum
            self.state[p]["previous_update"] = chunk
        self.last_step = {"alpha": float(coefficients[0]), "predicted_change": predicted}
        if len(coefficients) > 1:
            self.last_step["mu"] = float(coefficients[1])
        due = self._assess_next or self.counters["steps"] % self.damping_adaptation_interval == 0
        self._assess_next = False
        self.counters["steps"] += 1
        if self.adaptive_damping and due:
            if self.full_batch:
                self._pending = (float(loss), predicted)
            else:
                self._adapt_damping(closure, loss, predicted)
        return loss

    def _kl_scale(self, fisher: Tensor, coefficients: Tensor) -> float:
        """``min(1, sqrt(max_kl / (½ δᵀFδ)))`` for ``δ = Σ c_i d_i`` (1 without ``max_kl``)."""
        max_kl = self.param_groups[0]["max_kl"]
        if max_kl is None:
            return 1.0
        return trust_region_scale(0.5 * float(coefficients @ fisher @ coefficients), max_kl)

    def _direction(self, params: list[Tensor], gradient: Tensor) -> Tensor:
        """Flat ``Δ = −C⁻¹ g`` from the preconditioner (``−g`` without one)."""
        if self.preconditioner is None:
            return -gradient
        if self.couple_damping and self.preconditioner.inverse_update_due:
            self.preconditioner.damping = self.damping
        self.preconditioner.step()
        return -_flat([p.grad for p in params], params)

    def _finite_everywhere(self, loss: Tensor) -> bool:
        """Whether ``loss`` is finite on every process (one all-reduce under
        ``torch.distributed``): the processes refuse a step together, since one that refused
        alone would leave the others waiting in the preconditioner's and the Fisher products'
        all-reduces."""
        flag = torch.tensor(
            [0.0 if bool(torch.isfinite(loss).all()) else 1.0],
            dtype=torch.float64,
            device=loss.device,
        )
        all_reduce_sum_([flag], self.process_group)
        return float(flag) == 0.0

    def _fisher_gram(self, directions: Tensor) -> Tensor:
        """``d_iᵀ F d_j`` (float64) for flat directions ``(k, P)``, with ``F`` the exact Fisher
        of the (sub-)batch, from one forward-mode pass per direction.

        Under ``torch.distributed``, ``F`` is the mean over the processes of their batches'
        Fishers, each the mean over its own samples: the Fisher of the mean of their mean
        losses, whose gradient DDP averages (not the mean over all samples, which differs when
        the shares differ in size). A process whose own products fail (non-finite inputs,
        say) makes every process raise (:class:`~natgrad.distributed.agreement.Agreement`)."""
        agreement = Agreement(self.process_group)
        fisher = None
        with agreement.local():
            fisher = self._local_fisher_gram(directions)
        if fisher is None:  # this process failed: the all-reduce raises everywhere
            fisher = directions.new_zeros(len(directions), len(directions), dtype=torch.float64)
        agreement.all_reduce_sum_([fisher])
        return fisher / world_size(self.process_group)

    def _local_fisher_gram(self, directions: Tensor) -> Tensor:
        """``d_iᵀ F d_j`` (float64) with ``F`` the Fisher of this process's (sub-)batch."""
        inputs = self._capture.inputs
        if self.curvature_batch_size is not None:
            inputs = inputs[: self.curvature_batch_size]
        function = ModelFunction(self.module, inputs)
        with dropout_off(self.module):
            outputs, tangents = function.output_tangents(
                [function.unflatten(d) for d in directions]
            )
        stacked = torch.stack(tangents)
        products = self.likelihood.natural_hessian_product(outputs, stacked)
        count = len(directions)
        fisher = stacked.reshape(count, -1) @ products.reshape(count, -1).T
        return fisher.to(torch.float64) / len(inputs)

    def _adapt_damping(self, closure: Callable[[], Tensor], loss: Tensor, predicted: float) -> None:
        """Levenberg–Marquardt: ``λ`` from the actual change of the batch loss over ``M(δ)``."""
        with torch.enable_grad(), self._recording_paused():
            new_loss = closure()
        self._judge_step(loss, new_loss, predicted)
        self.last_step.update(
            actual_change=self.last_damping_update["actual"],
            ratio=self.last_damping_update["ratio"],
        )

    def _generator_state(self) -> Tensor | None:
        """``full_batch``: the state of the preconditioner's generator before this step's
        closure, to draw its Monte-Carlo targets again if the last step is undone."""
        precond = self.preconditioner
        if self._pending is None or precond is None or precond.generator is None:
            return None
        return precond.generator.get_state()

    def _assess_pending(
        self, closure: Callable[[], Tensor], loss: Tensor, generator_state: Tensor | None
    ) -> Tensor:
        """``full_batch``: judge the last step by ``loss``, the closure's loss after it; if
        the step is undone, the closure's loss (and gradients) at the restored parameters,
        whose passes the preconditioner records instead of those at the undone ones (with the
        same Monte-Carlo draws), as the re-evaluating optimizer's next step would."""
        (loss_before, predicted), self._pending = self._pending, None
        if not self._judge_step(loss.new_tensor(loss_before), loss, predicted):
            return loss
        if self.preconditioner is not None:
            self.preconditioner.discard_statistics()
            if generator_state is not None:
                self.preconditioner.generator.set_state(generator_state)
        with torch.enable_grad():
            return closure()

    def _recording_paused(self) -> contextlib.AbstractContextManager:
        if self.preconditioner is None:
            return contextlib.nullcontext()
        return self.preconditioner.recording_paused()

    def _judge_step(self, loss_before: Tensor, loss_after: Tensor, predicted: float) -> bool:
        """Adapt ``λ``; undo the last step if the loss after it is not finite (or, with
        ``reject_steps``, rose). Whether it was undone."""
        self._update_damping(loss_before, loss_after, predicted)
        actual = self.last_damping_update["actual"]
        if actual <= 0 or (math.isfinite(actual) and not self.reject_steps):
            return False
        stepped = [p for p in self.param_groups[0]["params"] if "previous_update" in self.state[p]]
        torch._foreach_sub_(stepped, [self.state[p].pop("previous_update") for p in stepped])
        self._assess_next = True
        if math.isfinite(actual):
            self.counters["rejected_steps"] += 1
        else:
            self._refuse(loss_after, "the loss after the step is not finite; step undone")
        return True

    def _update_damping(self, loss_before: Tensor, loss_after: Tensor, predicted: float) -> None:
        """The Levenberg–Marquardt update from the batch losses before and after a step
        (averaged over the processes) and the change ``M(δ)`` that the model predicted."""
        losses = torch.stack([loss_before.detach(), loss_after.detach()]).to(torch.float64)
        all_reduce_sum_([losses], self.process_group)
        losses /= world_size(self.process_group)
        actual = float(losses[1] - losses[0])
        self.last_damping_update = damping_update(
            self.damping,
            actual,
            predicted,
            decay=self.damping_decay,
            bounds=self.damping_bounds,
            tolerance=loss_resolution(float(losses[0]), float(losses[1]), loss_before.dtype),
        )
        self.param_groups[0]["damping"] = self.last_damping_update["damping_after"]
