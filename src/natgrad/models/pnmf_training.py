"""Training loops of PNMF: natural-gradient VI (full batch or SVI) and Adam, with a stopping rule.

Both loops maximise the ELBO of :mod:`natgrad.models.pnmf_elbo` for counts ``y`` of shape
``(N, D)``, loadings ``W`` of shape ``(D, L)`` and ``q(F)`` of batch shape ``(N, L)``.

Stopping rule. The Monte-Carlo ELBO is noisy, so consecutive values are not compared; the
loop stops when the means of the last two windows of ``window`` recorded ELBO values differ
by less than ``tol`` relative to the newer one: ``|m_new − m_old| ≤ tol · |m_new|``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as functional
from torch import Tensor

from natgrad._warnings import warn_at_caller
from natgrad.expfam import Gaussian
from natgrad.models.pnmf_counts import CountMatrix
from natgrad.models.pnmf_elbo import ElboMode
from natgrad.models.pnmf_exact import DenseLowerBound, FactorTerms, refuse_non_finite
from natgrad.models.pnmf_extrapolation import (
    GROWTH,
    INITIAL_BETA,
    MAX_BETA,
    SHRINK,
    BlockIterate,
    Extrapolation,
)
from natgrad.models.pnmf_gradients import ElboGradients, elbo_gradients
from natgrad.models.pnmf_updates import (
    LOADINGS_FLOOR,
    gaussian_from_moments,
    moment_gradient_step,
    multiplicative_loadings,
    robbins_monro_rate,
    robbins_monro_update,
)

WARMUP_STEPS = 3
CONVERGENCE_WINDOW = 20
LOADINGS_UPDATES = ("multiplicative", "adam")
LOADINGS_ADAM_LEARNING_RATE = 0.01


class RefusedStepWarning(RuntimeWarning):
    """Natural steps of some entries of ``q(F)`` were refused as non-finite during a fit.

    Those entries kept their previous mean and precision, so the fitted ``q(F)`` (and ``W``)
    may be far from the optimum. Issued once per fit, naming how many steps were refused.
    """


class ConvergenceMonitor:
    """Windowed relative-change stopping rule for a noisy ELBO (see the module docstring)."""

    def __init__(self, tol: float, window: int = CONVERGENCE_WINDOW):
        self.tol = tol
        self.window = window
        self.history: list[float] = []

    def record(self, value: float) -> bool:
        """Record one ELBO value; return whether the stopping rule now holds."""
        self.history.append(value)
        if len(self.history) < 2 * self.window:
            return False
        newer = math.fsum(self.history[-self.window :]) / self.window
        older = math.fsum(self.history[-2 * self.window : -self.window]) / self.window
        return abs(newer - older) <= self.tol * abs(newer)


@dataclass
class FitState:
    """Parameters being fitted and the record of the fit.

    Attributes
    ----------
    loadings : Tensor of shape (D, L)
    posterior : Gaussian of batch shape (N, L)
    history : list of float
        One ELBO value per iteration (per epoch with minibatches).
    n_iter : int
    converged : bool
    n_refused : int
        Entries whose natural step was refused as non-finite, over the whole fit.
    n_restarts : int
        Extrapolated points rejected (full-batch ``"lower-bound"`` natural training only).
    """

    loadings: Tensor
    posterior: Gaussian
    history: list[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    n_refused: int = 0
    n_restarts: int = 0


def warn_if_refused(state: FitState, what: str) -> None:
    """Issue one :class:`RefusedStepWarning` for ``state.n_refused`` refused steps, if any.

    ``what`` names the fit in the message (e.g. ``"PNMF fitting W and q(F)"``).
    """
    if not state.n_refused:
        return
    warn_at_caller(
        f"{what} refused {state.n_refused} natural-gradient steps of single entries of q(F) "
        f"over {state.n_iter} iterations: the new mean or precision was not finite (or the "
        "precision not positive), so those entries kept their previous values and the fit may "
        "be far from the optimum. This is floating-point overflow, typically of float32 input "
        "with very large counts: try float64 input or a smaller learning_rate",
        RefusedStepWarning,
    )


@dataclass(frozen=True)
class FitSettings:
    """Settings shared by the training loops (see :class:`natgrad.models.PNMF`).

    ``all_reduce``, when set, sums a tensor over the processes that each hold a shard of the
    samples (see :mod:`natgrad.models.pnmf_distributed`); the natural loop applies it to W's
    sufficient statistics (or W's gradient with ``loadings_update="adam"``) and to the ELBO,
    the only quantities that couple samples.

    ``loadings_update`` is the natural loop's W update, one of :data:`LOADINGS_UPDATES`; the
    standard loop always uses Adam.
    """

    mode: ElboMode
    n_draws: int
    step_size: float
    max_iter: int
    tol: float
    batch_size: int | None
    update_loadings: bool
    generator: torch.Generator
    callback: Callable[[int, float, FitState], None] | None = None
    all_reduce: Callable[[Tensor], Tensor] | None = None
    loadings_update: str = "multiplicative"


LoadingsUpdater = Callable[[Tensor, ElboGradients, float | None], Tensor]
"""A W update ``(W, gradients at the new q, N/B or None for the full batch) ↦ W′``."""


def _batches(n_samples: int, settings: FitSettings, device: torch.device) -> list[Tensor | None]:
    """A shuffled split of the samples into minibatches, or ``[None]`` for the full batch."""
    if settings.batch_size is None or settings.batch_size >= n_samples:
        return [None]
    generator = settings.generator
    order = torch.randperm(n_samples, generator=generator, device=generator.device).to(device)
    return list(torch.split(order, settings.batch_size))


def _take(posterior: Gaussian, index: Tensor | None) -> Gaussian:
    if index is None:
        return posterior
    theta1, theta2 = posterior.natural_params
    return Gaussian.from_natural(theta1[index], theta2[index], validate=False)


def _put(posterior: Gaussian, index: Tensor | None, part: Gaussian) -> Gaussian:
    if index is None:
        return part
    theta1, theta2 = (t.clone() for t in posterior.natural_params)
    theta1[index], theta2[index] = part.natural_params
    return Gaussian.from_natural(theta1, theta2, validate=False)


def _ramped_step(settings: FitSettings, iteration: int) -> float:
    """``ρ_t``, ramped up linearly over the first ``WARMUP_STEPS`` iterations."""
    return settings.step_size * min(1.0, (iteration + 1) / WARMUP_STEPS)


def fit_natural(counts: CountMatrix, state: FitState, settings: FitSettings) -> FitState:
    """Natural-gradient VI: VON steps on ``q(F)``, W by its multiplicative (EM) update or Adam.

    Each iteration takes one natural step on ``q(F)`` with ``W`` fixed, then updates ``W``
    under the new ``q`` (fresh draws): by default ``W`` takes its multiplicative (EM) step;
    with ``settings.loadings_update == "adam"`` it takes one Adam step (learning rate
    :data:`LOADINGS_ADAM_LEARNING_RATE`, projected onto ``W ≥ 1e-10``) along ``∂ELBO/∂W``.
    Full-batch ``"lower-bound"`` training with multiplicative W steps is deterministic and
    exact, and evaluates each iteration at an extrapolated point with restarts
    (:mod:`natgrad.models.pnmf_extrapolation`; ``state.n_restarts`` counts the restarts).
    With ``batch_size`` set this is stochastic VI: each minibatch's local ``q(F)`` takes one
    step, then W's sufficient statistics ``(Σ_i y_ij E[r_ijl], Σ_i E[e^{F_il}])`` estimated
    from the minibatch and scaled by ``N/B`` (the only quantities scaled) take a
    Robbins–Monro step ``ρ_t = (t + 1)^(−0.6)`` (with Adam: W's minibatch gradient, scaled by
    ``N/B``, is Adam's gradient); one iteration is one epoch and its recorded ELBO is the sum
    of the minibatch ELBOs. The exact case on dense counts in one process runs the fused loop
    :func:`fit_exact_dense` (the same iterates).
    """
    if _is_exact(counts, settings) and not counts.is_sparse and settings.all_reduce is None:
        return fit_exact_dense(counts, state, settings)
    monitor = ConvergenceMonitor(settings.tol)
    update_loadings = _loadings_updater(state, settings)
    extrapolation = Extrapolation() if _is_exact(counts, settings) else None
    for iteration in range(settings.max_iter):
        step_size = _ramped_step(settings, iteration)
        if extrapolation is None:
            epoch_elbo = _natural_epoch(counts, state, settings, update_loadings, step_size)
        else:
            epoch_elbo = _extrapolated_iteration(
                counts, state, settings, update_loadings, step_size, extrapolation
            )
            state.n_restarts = extrapolation.n_restarts
        if _record(state, monitor, settings, iteration, epoch_elbo):
            break
    return state


def fit_exact_dense(counts: CountMatrix, state: FitState, settings: FitSettings) -> FitState:
    """Full-batch ``"lower-bound"`` natural training with multiplicative W steps, dense counts.

    The iterates of :func:`fit_natural`'s exact case (extrapolation with restarts as in
    :mod:`natgrad.models.pnmf_extrapolation`), computed by
    :class:`natgrad.models.pnmf_exact.DenseLowerBound` (moments held as ``(L, N)``): each
    iteration evaluates the bound at the extrapolated point (or at the block iterate on a
    restart, reusing the iterate's factor terms), takes the natural step on ``q(F)`` from
    there and W's multiplicative step.
    ``state.posterior`` is rebuilt every iteration only when a callback is set.
    """
    bound = DenseLowerBound(counts)
    monitor = ConvergenceMonitor(settings.tol)
    precision = state.posterior.precision.T.contiguous()
    iterate = FactorTerms(state.posterior.loc.T.contiguous(), precision, 1.0 / precision)
    loadings = state.loadings
    beta, last_value = INITIAL_BETA, -math.inf
    previous: tuple[Tensor, Tensor] | None = None
    pending: tuple[FactorTerms, Tensor] | None = None
    for iteration in range(settings.max_iter):
        if pending is not None:
            value = bound.value(*pending)
            if value >= last_value:
                beta = min(MAX_BETA, beta * GROWTH)
            else:
                beta /= SHRINK
                state.n_restarts += 1
                pending = None
        if pending is None:
            pending = (iterate, loadings)
            value = bound.value(*pending)
        last_value = value
        point, point_loadings = pending
        mean, precision = bound.natural_step(
            point, point_loadings, _ramped_step(settings, iteration)
        )
        iterate = FactorTerms(mean, precision, precision.reciprocal())
        if not math.isfinite(iterate.kl):  # a non-finite or zero P′ or a non-finite μ′
            mean, precision, refused = refuse_non_finite(point, mean, precision)
            state.n_refused += refused
            iterate = FactorTerms(mean, precision, precision.reciprocal())
        loadings = bound.loadings_step(iterate, point_loadings)
        log_loadings = loadings.log()
        pending = None
        if previous is not None and beta > 0:
            moved_log_loadings = torch.lerp(previous[1], log_loadings, 1.0 + beta)
            pending = (
                iterate.moved(torch.lerp(previous[0], mean, 1.0 + beta)),
                moved_log_loadings.exp_().clamp_min_(LOADINGS_FLOOR),
            )
        previous = (mean, log_loadings)
        state.loadings = loadings
        if settings.callback is not None:
            state.posterior = BlockIterate(mean.T, precision.T, loadings).posterior
        if _record(state, monitor, settings, iteration, value):
            break
    state.posterior = BlockIterate(
        iterate.mean.T.contiguous(), iterate.precision.T.contiguous(), loadings
    ).posterior
    return state


def _is_exact(counts: CountMatrix, settings: FitSettings) -> bool:
    """Full-batch ``"lower-bound"`` training of ``q`` and ``W`` with multiplicative W steps."""
    full_batch = settings.batch_size is None or settings.batch_size >= counts.n_samples
    return (
        full_batch
        and settings.update_loadings
        and settings.mode == "lower-bound"
        and settings.loadings_update == "multiplicative"
    )


def _natural_epoch(
    counts: CountMatrix,
    state: FitState,
    settings: FitSettings,
    update_loadings: LoadingsUpdater,
    step_size: float,
) -> float:
    """One pass over the minibatches (or the full batch); returns the summed ELBO estimate."""
    epoch_elbo = 0.0
    for index in _batches(counts.n_samples, settings, counts.device):
        batch_counts = counts if index is None else counts.take_rows(index)
        point = BlockIterate.from_posterior(_take(state.posterior, index), state.loadings)
        gradients = _gradients(batch_counts, point, settings, loadings_grads=False)
        epoch_elbo += float(gradients.value)
        scale = None if index is None else counts.n_samples / len(index)
        updated = _block_update(
            batch_counts, point, gradients, state, settings, update_loadings, step_size, scale
        )
        state.posterior = _put(state.posterior, index, updated.posterior)
        state.loadings = updated.loadings
    if settings.all_reduce is not None:
        epoch_elbo = float(settings.all_reduce(torch.tensor(epoch_elbo, dtype=torch.float64)))
    return epoch_elbo


def _extrapolated_iteration(
    counts: CountMatrix,
    state: FitState,
    settings: FitSettings,
    update_loadings: LoadingsUpdater,
    step_size: float,
    extrapolation: Extrapolation,
) -> float:
    """One full-batch block update from the extrapolated point, or from the last block
    iterate on a restart.

    ``state`` holds the block iterates (never an extrapolated point); returns the ELBO at the
    point the update started from.
    """
    current = extrapolation.previous
    if current is None:
        current = BlockIterate.from_posterior(state.posterior, state.loadings)
    point = extrapolation.point(current)
    gradients = _gradients(counts, point, settings, loadings_grads=False)
    value = _summed(settings, gradients.value)
    if not extrapolation.accepts(value):
        point = current
        gradients = _gradients(counts, point, settings, loadings_grads=False)
        value = _summed(settings, gradients.value)
    extrapolation.record(value)
    updated = _block_update(
        counts, point, gradients, state, settings, update_loadings, step_size, None
    )
    state.posterior, state.loadings = updated.posterior, updated.loadings
    extrapolation.extrapolate(updated)
    return value


def _summed(settings: FitSettings, value: Tensor) -> float:
    """``value`` summed over the processes holding shards of the samples (if any)."""
    if settings.all_reduce is None:
        return float(value)
    return float(settings.all_reduce(value.to(torch.float64)))


def _block_update(
    counts: CountMatrix,
    point: BlockIterate,
    gradients: ElboGradients,
    state: FitState,
    settings: FitSettings,
    update_loadings: LoadingsUpdater,
    step_size: float,
    scale: float | None,
) -> BlockIterate:
    """A natural step on ``q(F)`` from ``point`` (gradients there), then W's update.

    Counts refused entries in ``state.n_refused``.
    """
    step = moment_gradient_step(
        point.mean, point.precision, -gradients.grad_mean, -gradients.grad_variance, step_size
    )
    state.n_refused += step.n_refused
    updated = BlockIterate(step.mean, step.precision, point.loadings)
    if not settings.update_loadings:
        return updated
    at_new = _gradients(counts, updated, settings, posterior_grads=False)
    return BlockIterate(step.mean, step.precision, update_loadings(point.loadings, at_new, scale))


def _loadings_updater(state: FitState, settings: FitSettings) -> LoadingsUpdater:
    """The natural loop's W update ``(W, gradients at the new q, N/B or None) ↦ W′``.

    The scale ``N/B`` is ``None`` for the full batch.
    """
    if settings.loadings_update == "multiplicative":
        return _multiplicative_updater(settings)
    if settings.loadings_update == "adam":
        return _adam_updater(state, settings)
    raise ValueError(
        f"loadings_update must be one of {LOADINGS_UPDATES}, got {settings.loadings_update!r}"
    )


def _multiplicative_updater(settings: FitSettings) -> LoadingsUpdater:
    """Multiplicative (EM) update of W; with minibatches its statistics take Robbins–Monro steps."""
    statistics: tuple[Tensor, Tensor] | None = None
    global_step = 0

    def update(loadings: Tensor, gradients: ElboGradients, scale: float | None) -> Tensor:
        nonlocal statistics, global_step
        numerator = loadings * gradients.log_term_loadings_grad
        denominator = gradients.rate_term_loadings_grad
        if settings.all_reduce is not None:
            numerator = settings.all_reduce(numerator)
            denominator = settings.all_reduce(denominator)
        if scale is not None:
            numerator, denominator = scale * numerator, scale * denominator
            if statistics is not None:
                rate = robbins_monro_rate(global_step)
                numerator = robbins_monro_update(statistics[0], numerator, rate)
                denominator = robbins_monro_update(statistics[1], denominator, rate)
            statistics = (numerator, denominator)
            global_step += 1
        return multiplicative_loadings(numerator, denominator)

    return update


def _adam_updater(state: FitState, settings: FitSettings) -> LoadingsUpdater:
    """One Adam step on W along ``scale · ∂ELBO/∂W`` (summed over processes), then ``W ≥ floor``."""
    parameter = state.loadings.clone()
    optimizer = torch.optim.Adam([parameter], lr=LOADINGS_ADAM_LEARNING_RATE)

    def update(loadings: Tensor, gradients: ElboGradients, scale: float | None) -> Tensor:
        loadings_grad = gradients.loadings_grad
        if settings.all_reduce is not None:
            loadings_grad = settings.all_reduce(loadings_grad)
        _adam_loadings_step(optimizer, parameter, loadings_grad, 1.0 if scale is None else scale)
        return parameter

    return update


def _adam_loadings_step(
    optimizer: torch.optim.Optimizer, loadings: Tensor, loadings_grad: Tensor, scale: float
) -> None:
    """Adam ascent step on the ELBO in ``W`` along ``scale · loadings_grad``, then clamp."""
    loadings.grad = -loadings_grad * scale
    optimizer.step()
    loadings.clamp_(min=LOADINGS_FLOOR)


def fit_standard(counts: CountMatrix, state: FitState, settings: FitSettings) -> FitState:
    """Adam on ``(μ, softplus⁻¹ σ)`` and on ``W`` (projected onto ``W ≥ 1e-10``), as in the seed.

    The gradients are those of :func:`natgrad.models.pnmf_gradients.elbo_gradients` (the same
    estimator the natural mode uses). With ``batch_size`` set the local parameters get sparse
    gradients (SparseAdam: rows outside the minibatch are untouched) and W's gradient is
    scaled by ``N/B``.
    """
    mean = state.posterior.loc.clone()
    raw_scale = _inverse_softplus(state.posterior.scale)
    loadings = state.loadings.clone()
    minibatched = settings.batch_size is not None and settings.batch_size < counts.n_samples
    local_optimizer = (torch.optim.SparseAdam if minibatched else torch.optim.Adam)(
        [mean, raw_scale], lr=settings.step_size
    )
    global_optimizer = torch.optim.Adam([loadings], lr=settings.step_size)
    monitor = ConvergenceMonitor(settings.tol)
    for iteration in range(settings.max_iter):
        epoch_elbo = 0.0
        for index in _batches(counts.n_samples, settings, counts.device):
            batch_counts = counts if index is None else counts.take_rows(index)
            rows = slice(None) if index is None else index
            scale = functional.softplus(raw_scale[rows])
            local = gaussian_from_moments(mean[rows], scale.square())
            point = BlockIterate.from_posterior(local, loadings)
            gradients = _gradients(batch_counts, point, settings)
            grad_raw_scale = gradients.grad_variance * 2.0 * scale * torch.sigmoid(raw_scale[rows])
            _set_local_gradient(mean, index, -gradients.grad_mean, minibatched)
            _set_local_gradient(raw_scale, index, -grad_raw_scale, minibatched)
            local_optimizer.step()
            if settings.update_loadings:
                scale = counts.n_samples / batch_counts.n_samples
                _adam_loadings_step(global_optimizer, loadings, gradients.loadings_grad, scale)
            epoch_elbo += float(gradients.value)
        state.loadings = loadings
        if settings.callback is not None:
            state.posterior = gaussian_from_moments(mean, functional.softplus(raw_scale).square())
        if _record(state, monitor, settings, iteration, epoch_elbo):
            break
    state.posterior = gaussian_from_moments(mean, functional.softplus(raw_scale).square())
    state.loadings = loadings
    return state


def _gradients(
    counts: CountMatrix,
    point: BlockIterate,
    settings: FitSettings,
    posterior_grads: bool = True,
    loadings_grads: bool = True,
) -> ElboGradients:
    return elbo_gradients(
        counts,
        point.loadings,
        point.mean,
        point.variance,
        settings.mode,
        settings.n_draws,
        settings.generator,
        need_value=posterior_grads,
        need_posterior_grads=posterior_grads,
        need_loadings_grads=loadings_grads,
    )


def _set_local_gradient(parameter: Tensor, index: Tensor | None, grad: Tensor, sparse: bool):
    if not sparse:
        parameter.grad = grad
        return
    parameter.grad = torch.sparse_coo_tensor(  # the batch's own sorted, unique rows
        index.unsqueeze(0), grad, parameter.shape, check_invariants=False
    )


def _record(
    state: FitState,
    monitor: ConvergenceMonitor,
    settings: FitSettings,
    iteration: int,
    value: float,
) -> bool:
    """Record an iteration's ELBO; raise on a non-finite value; return whether to stop."""
    if not math.isfinite(value):
        raise FloatingPointError(
            f"PNMF: the ELBO estimate became {value} at iteration {iteration}; "
            "try float64 input or a smaller learning_rate"
        )
    state.history.append(value)
    state.n_iter = iteration + 1
    if settings.callback is not None:
        settings.callback(iteration, value, state)
    state.converged = monitor.record(value)
    return state.converged


def _inverse_softplus(value: Tensor) -> Tensor:
    return value + torch.log(-torch.expm1(-value))
