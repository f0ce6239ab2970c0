"""Shampoo (Gupta, Koren & Singer, 2018): one Kronecker factor of preconditioning per tensor mode.

For a parameter of order ``k`` with gradient ``G``, mode ``i`` keeps the statistics
``Sᵢ = Σ_t G_(i) G_(i)ᵀ`` (``G_(i)`` the mode-``i`` unfolding, shape ``(dᵢ, Π_{j≠i} dⱼ)``) and the
preconditioned gradient is ``G ×₁ P₁ ×₂ … ×_k P_k`` with ``Pᵢ = (Sᵢ + εI)^{-1/(2k)}``. For a
matrix ``W`` this is ``W ← W − lr L^{-1/4} G R^{-1/4}``. A mode longer than
``max_preconditioner_dim`` keeps only the diagonal of ``Sᵢ`` (AdaGrad along that mode). Modes
of size 1 are left out and do not count in ``k`` (:func:`preconditioned_shape`): a ``(1, n)``
parameter is preconditioned as an ``(n,)`` one.

The maths lives in the small pure functions of this module (:func:`mode_statistics`,
:func:`mode_preconditioner`, :func:`precondition`, :func:`graft`, ...); :class:`Shampoo` only
wires them together and keeps their state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from natgrad._validation import (
    nonnegative_float,
    one_of,
    positive_float,
    positive_int,
    unit_interval,
    unit_interval_pair,
)
from natgrad.linalg.finite import all_finite
from natgrad.linalg.matrix_power import inverse_pth_root
from natgrad.optim.counted import CountedOptimizer

_GRAFTINGS = ("sgd", "adagrad", "adam", None)
_GRAFTING_STATE = {
    None: (),
    "sgd": (),
    "adagrad": ("grafting_sum",),
    "adam": ("exp_avg", "exp_avg_sq"),
}


def preconditioned_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The modes Shampoo preconditions: ``shape`` without its size-1 modes (``(1,)`` if none).

    A size-1 mode's "preconditioner" is the scalar ``(‖G‖² + ε)^{-1/(2k)}``, which only
    rescales the step and raises the order ``k`` of the other roots; like the reference
    implementations (Anil et al. 2020, whose ``merge_small_dims`` drops them) such modes are
    left out, so a ``(1, n)`` or ``(n, 1)`` parameter is preconditioned as an ``(n,)`` one and
    an ``(n, 1, 1, m)`` one as ``(n, m)``. Scalars and all-ones shapes are length-1 vectors.

    Parameters
    ----------
    shape : sequence of int
        The parameter's shape ``(d₁, ..., d_k)``, possibly empty.

    Returns
    -------
    tuple of int
        The sizes ``dᵢ > 1`` in order, or ``(1,)``.
    """
    return tuple(size for size in shape if size > 1) or (1,)


def statistics_shapes(shape: Sequence[int], max_preconditioner_dim: int) -> list[tuple[int, ...]]:
    """Shapes of the mode statistics of a parameter of ``shape``: ``(d, d)`` per preconditioned
    mode, ``(d,)`` (the diagonal) for a mode longer than ``max_preconditioner_dim``."""
    return [
        (size,) if size > max_preconditioner_dim else (size, size)
        for size in preconditioned_shape(shape)
    ]


def unfold(tensor: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding ``T_(mode)``, of shape ``(d_mode, Π_{j≠mode} dⱼ)``.

    Parameters
    ----------
    tensor : Tensor of shape (d₁, ..., d_k), k >= 1
    mode : int
        Index of the mode in ``[0, k)``.

    Returns
    -------
    Tensor of shape (d_mode, Π_{j≠mode} dⱼ)
    """
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def mode_statistics(grad: Tensor, mode: int, diagonal: bool = False) -> Tensor:
    """Mode-``mode`` statistics ``G_(mode) G_(mode)ᵀ`` of one gradient (or their diagonal).

    Parameters
    ----------
    grad : Tensor of shape (d₁, ..., d_k), k >= 1
    mode : int
        Index of the mode in ``[0, k)``.
    diagonal : bool, default False
        Return only the diagonal (the sum of squares over all other modes).

    Returns
    -------
    Tensor of shape (d_mode, d_mode), or (d_mode,) if ``diagonal``.
    """
    unfolded = unfold(grad, mode)
    if diagonal:
        return unfolded.square().sum(dim=1)
    return unfolded @ unfolded.T


def accumulate(statistics: Tensor, update: Tensor, beta2: float) -> Tensor:
    """Sum ``S + U`` if ``beta2 == 1``, else the moving average ``β₂ S + (1 − β₂) U``."""
    if beta2 == 1.0:
        return statistics + update
    return beta2 * statistics + (1.0 - beta2) * update


def accumulate_mode_statistics(
    statistics: Tensor | None, grad: Tensor, mode: int, beta2: float, diagonal: bool = False
) -> Tensor:
    """:func:`accumulate` of :func:`mode_statistics`; a full one as one fused ``addmm``.

    Parameters
    ----------
    statistics : Tensor of shape (d_mode, d_mode) or (d_mode,), or None
        The statistics so far (a new tensor is returned, ``statistics`` is not modified);
        ``None`` before the first step, when they are zero.
    grad : Tensor of shape (d₁, ..., d_k), k >= 1
    mode : int
    beta2 : float
        As in :func:`accumulate`.
    diagonal : bool, default False
        Accumulate only the diagonal.

    Returns
    -------
    Tensor of shape (d_mode, d_mode), or (d_mode,) if ``diagonal``.
    """
    weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
    if statistics is None:
        update = mode_statistics(grad, mode, diagonal)
        return update if weight == 1.0 else weight * update
    if diagonal:
        return accumulate(statistics, mode_statistics(grad, mode, diagonal=True), beta2)
    unfolded = unfold(grad, mode)
    return torch.addmm(
        statistics, unfolded, unfolded.T, beta=1.0 if beta2 == 1.0 else beta2, alpha=weight
    )


def mode_preconditioner(statistics: Tensor, order: int, epsilon: float) -> Tensor:
    """``(S + εI)^{-1/(2·order)}``; elementwise ``(s + ε)^{-1/(2·order)}`` for a diagonal ``S``.

    Parameters
    ----------
    statistics : Tensor of shape (d, d) (full) or (d,) (diagonal)
        Accumulated mode statistics, symmetric PSD.
    order : int
        Order ``k`` of the parameter tensor.
    epsilon : float
        Positive damping ``ε``.

    Returns
    -------
    Tensor with the shape of ``statistics``.

    Notes
    -----
    The eigenvalues of ``S + εI`` are floored at ``d · ε_dtype · λ_max`` (``ε_dtype`` the
    machine epsilon of the statistics' dtype), the tolerance below which NumPy's
    ``matrix_rank`` counts an eigenvalue as zero: smaller ones are rounding noise of the
    accumulated statistics. A float32 run thus follows the float64 run up to rounding.
    """
    if statistics.ndim == 1:
        return (statistics + epsilon).pow(-1.0 / (2 * order))
    floor = min(1.0, statistics.shape[-1] * torch.finfo(statistics.dtype).eps)
    return inverse_pth_root(statistics, 2 * order, epsilon, eigen_floor=floor)


def precondition_mode(tensor: Tensor, preconditioner: Tensor, mode: int) -> Tensor:
    """Mode product ``tensor ×_mode P`` for a symmetric ``P`` of shape (d, d) or diagonal (d,)."""
    if preconditioner.ndim == 1:
        shape = [1] * tensor.ndim
        shape[mode] = -1
        return tensor * preconditioner.view(shape)
    if mode == tensor.ndim - 1:
        return tensor @ preconditioner  # T Pᵀ along the last mode, and Pᵀ = P
    moved = tensor.movedim(mode, 0)
    product = preconditioner @ moved.reshape(moved.shape[0], -1)
    return product.reshape(moved.shape).movedim(0, mode)


def precondition(tensor: Tensor, preconditioners: Sequence[Tensor]) -> Tensor:
    """``tensor ×₁ P₁ ×₂ … ×_k P_k``: the Shampoo direction, one preconditioner per mode."""
    for mode, preconditioner in enumerate(preconditioners):
        tensor = precondition_mode(tensor, preconditioner, mode)
    return tensor


def graft(direction: Tensor, grafting_direction: Tensor) -> Tensor:
    """``direction`` rescaled to the Frobenius norm of ``grafting_direction`` (zero stays zero)."""
    norm = torch.linalg.vector_norm(direction)
    scale = torch.where(norm > 0, torch.linalg.vector_norm(grafting_direction) / norm, 0.0)
    return direction * scale


def adagrad_direction(grad: Tensor, sum_squares: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """AdaGrad: ``s ← s + g²`` and the direction ``g / (√s + eps)`` (as ``torch.optim.Adagrad``)."""
    sum_squares = torch.addcmul(sum_squares, grad, grad)
    return grad / (sum_squares.sqrt() + eps), sum_squares


def adam_moments(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, betas: tuple[float, float]
) -> tuple[Tensor, Tensor]:
    """Adam's moving averages ``m ← β₁m + (1−β₁)g`` and ``v ← β₂v + (1−β₂)g²``."""
    beta1, beta2 = betas
    return beta1 * exp_avg + (1.0 - beta1) * grad, beta2 * exp_avg_sq + (
        1.0 - beta2
    ) * grad.square()


def adam_direction(
    exp_avg: Tensor, exp_avg_sq: Tensor, betas: tuple[float, float], step: int, eps: float
) -> Tensor:
    """Adam's bias-corrected direction ``m̂ / (√v̂ + eps)`` at 1-based ``step``."""
    first = exp_avg / (1.0 - betas[0] ** step)
    return first / (exp_avg_sq.sqrt() / math.sqrt(1.0 - betas[1] ** step) + eps)


class Shampoo(CountedOptimizer):
    """Shampoo: Kronecker-factored full-matrix AdaGrad over each parameter's tensor modes.

    One step, per parameter ``θ`` whose ``k`` modes of size > 1 are preconditioned (size-1
    modes are dropped, see :func:`preconditioned_shape`; scalars are vectors of length 1):

    1. ``g ← ∇θ + weight_decay · θ``; mode statistics ``Sᵢ ← Sᵢ + G_(i) G_(i)ᵀ`` (or
       ``β₂ Sᵢ + (1 − β₂) G_(i) G_(i)ᵀ`` when ``beta2 < 1``), accumulated from the first step on.
    2. From ``start_preconditioning_step`` on, every ``update_freq`` steps, recompute
       ``Pᵢ = (Sᵢ + εI)^{-1/(2k)}`` (eigendecomposition in float64, see
       :func:`natgrad.linalg.inverse_pth_root`); the direction is ``d = g ×₁ P₁ … ×_k P_k``.
       With ``grafting`` set, ``d`` is rescaled to the norm of the grafted optimizer's direction
       (layer-wise grafting, Agarwal et al. 2020; Anil et al. 2020); with ``grafting="adam"``
       the preconditioners act on Adam's bias-corrected first moment instead of ``g``.
    3. Before ``start_preconditioning_step`` the direction is the grafted optimizer's own
       direction (``g`` without grafting), so the optimizer is exactly SGD, Adagrad or Adam.
    4. Heavy-ball momentum ``b ← μ b + d`` (``b = d`` on the first step), ``θ ← θ − lr · b``:
       with ``grafting`` ``None``/``"sgd"`` before preconditioning this is ``torch.optim.SGD``.

    Parameters
    ----------
    params : iterable of Tensors or dicts
        Parameters or parameter groups, as for any ``torch.optim.Optimizer``.
    lr : float, default 1e-2
        Step size.
    momentum : float, default 0.0
        Heavy-ball momentum ``μ`` in ``[0, 1)`` on the (grafted) direction.
    beta2 : float, default 1.0
        Statistics decay in ``(0, 1]``: ``1`` sums them (Gupta et al.), ``< 1`` averages them.
    epsilon : float, default 1e-6
        Positive ``ε`` added to every statistics matrix before its root.
    update_freq : int, default 1
        Steps between recomputations of the preconditioners (statistics update every step).
    start_preconditioning_step : int, default 1
        First step (1-based) that uses the preconditioners.
    max_preconditioner_dim : int, default 1024
        Modes longer than this keep a diagonal (AdaGrad) preconditioner.
    weight_decay : float, default 0.0
        L2 penalty coefficient added to the gradient (as in ``torch.optim.SGD``).
    grafting : {"sgd", "adagrad", "adam", None}, default None
        Optimizer whose step norm the Shampoo direction takes, and which is run alone before
        ``start_preconditioning_step``.
    grafting_betas : tuple of float, default (0.9, 0.999)
        Adam's ``(β₁, β₂)`` for ``grafting="adam"``.
    grafting_eps : float, default 1e-8
        ``eps`` of the Adagrad/Adam grafting direction.

    Notes
    -----
    Statistics and preconditioners are stored in the parameter's dtype; the roots are computed
    in float64 with eigenvalues floored at ``d · ε_dtype · λ_max`` (below it they are rounding
    noise of the statistics, see :func:`mode_preconditioner`). A step whose gradient,
    statistics or direction is not finite is refused as a whole: parameters and state are left
    unchanged, a ``RuntimeWarning`` says why and ``counters["refused_steps"]`` counts it.
    Sparse and complex gradients raise ``TypeError``. ``max_preconditioner_dim`` and
    ``grafting`` shape the state: changed in a param group mid-run, the next step raises
    ``ValueError`` (other options, ``lr`` and ``update_freq`` say, may be scheduled). Every
    step first checks the options of every param group as the constructor does, so that a
    value set by hand or by a scheduler (``lr = -1``, ``epsilon = nan``) raises, naming the
    group and the option, before anything changes.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        momentum: float = 0.0,
        beta2: float = 1.0,
        epsilon: float = 1e-6,
        update_freq: int = 1,
        start_preconditioning_step: int = 1,
        max_preconditioner_dim: int = 1024,
        weight_decay: float = 0.0,
        grafting: str | None = None,
        grafting_betas: tuple[float, float] = (0.9, 0.999),
        grafting_eps: float = 1e-8,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "beta2": beta2,
            "epsilon": epsilon,
            "update_freq": update_freq,
            "start_preconditioning_step": start_preconditioning_step,
            "max_preconditioner_dim": max_preconditioner_dim,
            "weight_decay": weight_decay,
            "grafting": grafting,
            "grafting_betas": grafting_betas,
            "grafting_eps": grafting_eps,
        }
        super().__init__(params, _checked_options(defaults))
        self.counters = {"refused_steps": 0}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its options (see the class parameters)."""
        param_group.update(_checked_options({**self.defaults, **param_group}))
        super().add_param_group(param_group)

    def _check_group_options(self, group: dict[str, Any]) -> None:
        """Raise as the constructor does if an option of ``group`` is invalid."""
        _checked_options(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one Shampoo step.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model, calls ``backward()`` and returns the loss.

        Returns
        -------
        Tensor or None
            The closure's loss, if a closure was given.

        Raises
        ------
        TypeError
            If a gradient is sparse or complex, or a group option (set by hand or by a
            scheduler in ``param_groups``) is not a number, an integer or a choice where one
            is needed (nothing is changed).
        ValueError
            If a group option is out of range (the message names the group and the option),
            or a parameter's state was built under another ``max_preconditioner_dim`` or
            ``grafting`` than its group now has (nothing is changed).
        """
        self._check_param_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for group, param in pending:
            self._check_gradient(param.grad)
            _check_structure(param, self.state[param], group)
        grads = [_regularised_gradient(param, group) for group, param in pending]
        statistics = [
            _accumulated_statistics(grad, self.state[param], group)
            for (group, param), grad in zip(pending, grads, strict=True)
        ]
        raw_grads = [param.grad for _, param in pending]
        if not all_finite(*raw_grads, *(s for per_mode in statistics for s in per_mode)):
            if not all_finite(*raw_grads):
                return self._refuse(loss, "a gradient is not finite")
            return self._refuse(
                loss, "a preconditioner could not be computed (the accumulated statistics overflow)"
            )
        updates = []
        for (group, param), grad, new_statistics in zip(pending, grads, statistics, strict=True):
            try:
                new_state, direction = _parameter_update(
                    grad, new_statistics, self.state[param], group
                )
            except (ValueError, torch.linalg.LinAlgError) as error:
                return self._refuse(loss, f"a preconditioner could not be computed ({error})")
            updates.append((group, param, new_state, direction))
        if not all_finite(*(direction for *_, direction in updates)):
            return self._refuse(loss, "the preconditioned direction is not finite")
        for group, param, new_state, direction in updates:
            self.state[param].update(new_state)
            param.add_(direction, alpha=-group["lr"])
        return loss


def _check_structure(param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """Raise ``ValueError`` if ``state`` was built under options that shape it differently:
    ``max_preconditioner_dim`` (full or diagonal statistics) or ``grafting`` (its moments)."""
    if "statistics" not in state:
        return
    where = (
        f"Shampoo's state of a parameter of shape {tuple(param.shape)} (after step {state['step']})"
    )
    remedy = (
        "Changing it mid-run would mix statistics of two structures: build a new Shampoo, or "
        "clear the state (optimizer.state.clear())"
    )
    found = [tuple(statistics.shape) for statistics in state["statistics"]]
    limit = group["max_preconditioner_dim"]
    expected = statistics_shapes(param.shape, limit)
    if found != expected:
        raise ValueError(
            f"{where} holds mode statistics of shapes {found}, but max_preconditioner_dim="
            f"{limit} needs {expected}: the option was changed, or a state_dict of another "
            f"configuration (or one that preconditioned size-1 modes) was loaded. {remedy}."
        )
    held = sorted(key for keys in _GRAFTING_STATE.values() for key in keys if key in state)
    needed = sorted(_GRAFTING_STATE[group["grafting"]])
    if held != needed:
        raise ValueError(
            f"{where} holds the grafting state {held}, but grafting={group['grafting']!r} "
            f"needs {needed}: the option was changed. {remedy}."
        )


def _regularised_gradient(param: Tensor, group: dict[str, Any]) -> Tensor:
    """``∇θ + weight_decay · θ`` (``param.grad`` itself without weight decay)."""
    if group["weight_decay"] == 0.0:
        return param.grad
    return param.grad + group["weight_decay"] * param


def _accumulated_statistics(
    grad: Tensor, state: dict[str, Any], group: dict[str, Any]
) -> list[Tensor]:
    """The mode statistics after this step's gradient; ``state`` is read, never modified."""
    tensor_shape = preconditioned_shape(grad.shape)
    shaped = grad.reshape(tensor_shape)
    previous = state.get("statistics", [None] * len(tensor_shape))
    return [
        accumulate_mode_statistics(
            statistics,
            shaped,
            mode,
            group["beta2"],
            diagonal=size > group["max_preconditioner_dim"],
        )
        for mode, (statistics, size) in enumerate(zip(previous, tensor_shape, strict=True))
    ]


def _parameter_update(
    grad: Tensor, statistics: list[Tensor], state: dict[str, Any], group: dict[str, Any]
) -> tuple[dict[str, Any], Tensor]:
    """New state and direction for one parameter from its (regularised) gradient and new
    statistics; ``state`` is read, never modified."""
    step = state.get("step", 0) + 1
    tensor_shape = preconditioned_shape(grad.shape)
    new_state: dict[str, Any] = {"step": step, "statistics": statistics}
    grafted, source = _grafting_direction(grad, state, group, step, new_state)
    start = group["start_preconditioning_step"]
    if step >= start:
        if (step - start) % group["update_freq"] == 0 or "preconditioners" not in state:
            preconditioners = [
                mode_preconditioner(s, len(tensor_shape), group["epsilon"]) for s in statistics
            ]
        else:
            preconditioners = state["preconditioners"]
        new_state["preconditioners"] = preconditioners
        direction = precondition(source.reshape(tensor_shape), preconditioners).reshape(grad.shape)
        if group["grafting"] is not None:
            direction = graft(direction, grafted)
    else:
        direction = grafted
    if group["momentum"] != 0.0:
        if "momentum_buffer" in state:
            direction = torch.add(direction, state["momentum_buffer"], alpha=group["momentum"])
        else:
            direction = direction.clone()  # may be ``param.grad`` itself, which callers modify
        new_state["momentum_buffer"] = direction
    return new_state, direction


def _grafting_direction(
    grad: Tensor, state: dict[str, Any], group: dict[str, Any], step: int, new_state: dict
) -> tuple[Tensor, Tensor]:
    """Grafted direction and the tensor Shampoo preconditions; fills ``new_state``."""
    grafting = group["grafting"]
    if grafting == "adagrad":
        direction, new_state["grafting_sum"] = adagrad_direction(
            grad, _state_or_zeros(state, "grafting_sum", grad), group["grafting_eps"]
        )
        return direction, grad
    if grafting == "adam":
        betas = group["grafting_betas"]
        exp_avg, exp_avg_sq = adam_moments(
            grad,
            _state_or_zeros(state, "exp_avg", grad),
            _state_or_zeros(state, "exp_avg_sq", grad),
            betas,
        )
        new_state["exp_avg"], new_state["exp_avg_sq"] = exp_avg, exp_avg_sq
        direction = adam_direction(exp_avg, exp_avg_sq, betas, step, group["grafting_eps"])
        return direction, exp_avg / (1.0 - betas[0] ** step)
    return grad, grad


def _state_or_zeros(state: dict[str, Any], key: str, like: Tensor) -> Tensor:
    """``state[key]``, or zeros like ``like`` before the first step (allocated only then)."""
    return state[key] if key in state else torch.zeros_like(like)


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """The Shampoo options of ``options``, converted; raises naming the first invalid one."""
    checked = {
        "lr": nonnegative_float("lr", options["lr"]),
        "momentum": unit_interval("momentum", options["momentum"]),
        "beta2": unit_interval("beta2", options["beta2"], closed_left=False, closed_right=True),
        "epsilon": positive_float("epsilon", options["epsilon"]),
        "weight_decay": nonnegative_float("weight_decay", options["weight_decay"]),
        "grafting_eps": positive_float("grafting_eps", options["grafting_eps"]),
    }
    for name in ("update_freq", "start_preconditioning_step", "max_preconditioner_dim"):
        checked[name] = positive_int(name, options[name])
    checked["grafting"] = one_of("grafting", options["grafting"], _GRAFTINGS)
    checked["grafting_betas"] = unit_interval_pair("grafting_betas", options["grafting_betas"])
    return checked
