"""AdaHessian (Yao et al., 2021): Adam with the squared gradient replaced by a Hessian diagonal.

The Hessian diagonal is estimated by Hutchinson's method, ``diag(H) = E[z ⊙ (H z)]`` for
Rademacher ``z`` (entries ±1), with one Hessian-vector product per sample through the graph of
the gradient; so the loss must be back-propagated with ``loss.backward(create_graph=True)``.
The maths lives in the pure functions :func:`rademacher_like`, :func:`hutchinson_diagonal`,
:func:`spatial_average` and :func:`adahessian_direction`; :class:`AdaHessian` wires them.

Under ``torch.distributed`` (data parallelism) the gradients and the Hessian-diagonal estimates
are averaged over the processes, with the same Rademacher signs everywhere, so that the
replicas stay equal and take the steps of one process on the mean of their losses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from natgrad._random import drawing_device
from natgrad._validation import (
    nonnegative_float,
    positive_float,
    positive_int,
    unit_interval,
    unit_interval_pair,
)
from natgrad.distributed.agreement import Agreement
from natgrad.distributed.reduce import all_reduce_sum_, broadcast_from_, is_distributed, world_size
from natgrad.linalg.finite import all_finite
from natgrad.optim.counted import CountedOptimizer


def rademacher_like(tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Independent ±1 entries (probability ½ each) with the shape, dtype and device of ``tensor``.

    The signs are drawn on the generator's device (CPU by default) and moved to ``tensor``'s.
    """
    device = drawing_device(generator, tensor)
    bits = torch.randint(0, 2, tensor.shape, generator=generator, device=device, dtype=tensor.dtype)
    return bits.mul_(2).sub_(1).to(device=tensor.device)


def hutchinson_diagonal(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    n_samples: int = 1,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Hutchinson estimate ``(1/S) Σ_s z_s ⊙ (H z_s)`` of the Hessian diagonal over ``params``.

    Parameters
    ----------
    grads : sequence of Tensors
        Gradients of the loss w.r.t. ``params`` (same shapes), computed with
        ``create_graph=True`` so that they can be differentiated again. A gradient without a
        graph is constant: its rows of the Hessian are zero.
    params : sequence of Tensors
        The parameters ``θ``; ``H = ∇²_θ L`` is their joint Hessian.
    n_samples : int, default 1
        Number ``S`` of Rademacher vectors; the estimate is unbiased with per-entry variance
        ``Σ_{j≠i} H_ij² / S``, and exact for a diagonal ``H``.
    generator : torch.Generator, optional
        Source of the signs; the global generator if ``None``.

    Returns
    -------
    list of Tensors, one per parameter, of its shape.

    Raises
    ------
    ValueError
        If ``grads`` and ``params`` differ in length, or ``n_samples < 1``.
    TypeError
        If ``n_samples`` is not an integer.
    RuntimeError
        If no gradient carries a graph (``backward`` was called without ``create_graph=True``).
    """
    n_samples = positive_int("n_samples", n_samples)
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    differentiable = [i for i, grad in enumerate(grads) if grad.requires_grad]
    if not differentiable:
        raise RuntimeError(
            "no gradient carries a graph: call loss.backward(create_graph=True) so that "
            "Hessian-vector products can be taken"
        )
    totals: list[Tensor | None] = [None] * len(params)
    with torch.enable_grad():
        for sample in range(n_samples):
            signs = [rademacher_like(param, generator) for param in params]
            products = torch.autograd.grad(
                [grads[i] for i in differentiable],
                list(params),
                grad_outputs=[signs[i] for i in differentiable],
                retain_graph=sample < n_samples - 1,
                allow_unused=True,
            )
            for index, (sign, product) in enumerate(zip(signs, products, strict=True)):
                if product is None:
                    continue
                term = sign * product.detach()
                totals[index] = term if totals[index] is None else totals[index].add_(term)
    return [
        torch.zeros_like(param) if total is None else total / n_samples
        for param, total in zip(params, totals, strict=True)
    ]


def spatial_average(hessian_diag: Tensor) -> Tensor:
    """Conv2d-kernel smoothing: for a 4-d ``(out, in, kh, kw)`` tensor, ``|D|`` averaged over the
    ``kh × kw`` window (and broadcast back); other tensors are returned unchanged."""
    if hessian_diag.ndim != 4:
        return hessian_diag
    return hessian_diag.abs().mean(dim=(2, 3), keepdim=True).expand_as(hessian_diag).clone()


def adahessian_direction(
    exp_avg: Tensor,
    exp_hessian_diag_sq: Tensor,
    betas: tuple[float, float],
    step: int,
    hessian_power: float,
    eps: float,
) -> Tensor:
    """``m̂ / (v̂^{k/2} + eps)`` with bias-corrected moments at 1-based ``step``, ``k`` the power.

    ``m`` averages gradients and ``v`` squared Hessian diagonals (Yao et al., 2021, eq. 8).
    """
    first = exp_avg / (1.0 - betas[0] ** step)
    second = exp_hessian_diag_sq / (1.0 - betas[1] ** step)
    return first / (second.pow(hessian_power / 2.0) + eps)


class AdaHessian(CountedOptimizer):
    """AdaHessian: ``θ ← θ − lr · m̂ / (v̂^{k/2} + eps)`` with ``v`` the EMA of ``D²``.

    Per parameter, with ``D`` the Hutchinson estimate of the Hessian diagonal (spatially
    averaged for 4-d conv kernels):

    ``m ← β₁ m + (1 − β₁) g``, ``v ← β₂ v + (1 − β₂) D ⊙ D``, and decoupled weight decay
    ``θ ← θ (1 − lr · weight_decay)`` (as in AdamW and the authors' code).

    **The gradient must carry its graph**: call ``loss.backward(create_graph=True)`` (in the
    closure, or before :meth:`step`), then ``zero_grad()`` (``set_to_none=True``, the default)
    after the step to release the graph.

    Parameters
    ----------
    params : iterable of Tensors or dicts
        Parameters or parameter groups.
    lr : float, default 0.1
        Step size.
    betas : tuple of float, default (0.9, 0.999)
        Decay rates of the gradient and Hessian-diagonal moments, each in ``[0, 1)``.
    eps : float, default 1e-4
        Positive term added to the denominator.
    weight_decay : float, default 0.0
        Decoupled weight decay.
    hessian_power : float, default 1.0
        Power ``k`` in ``[0, 1]`` of the Hessian diagonal (1: Newton-like, 0.5: Adam-like).
    n_samples : int, default 1
        Rademacher vectors per Hessian estimate.
    update_each : int, default 1
        Steps between Hessian estimates; in between, the latest estimate is reused.
    generator : torch.Generator, optional
        Source of the Rademacher signs; its state is saved in :meth:`state_dict`. Needed under
        ``torch.distributed``, where rank 0's generator state is broadcast before each
        estimate so that every process draws the same signs.
    process_group : ProcessGroup, optional
        Group over which gradients and Hessian-diagonal estimates are averaged (default: the
        world); nothing is communicated in a single process.

    Notes
    -----
    **Data parallelism.** ``DistributedDataParallel`` cannot back-propagate with
    ``create_graph=True`` (its gradient hooks write into leaves that require grad, and torch
    raises "a leaf Variable that requires grad is being used in an in-place operation"), nor
    would it all-reduce the Hessian-vector products. So compute the loss with the wrapped
    module, ``ddp.module(inputs)`` (or inside ``with ddp.no_sync():``), and call
    ``loss.backward(create_graph=True)``: each process then holds its local gradient, and
    :meth:`step` averages the gradients and the Hessian-diagonal estimates ``z ⊙ (H_w z)``
    over the processes, with the same ``z`` everywhere (rank 0's generator state is
    broadcast first). The processes are weighted equally, as ``DistributedDataParallel``
    weights its gradients: the objective is the mean of the processes' mean losses, which is
    the mean loss of the global batch when the local batches have equal sizes, and then the
    steps are those of one process on the global batch. Every process must hold gradients
    for the same parameters. ``.grad`` keeps the local gradient.

    The Hessian diagonal is estimated for all parameters (of all groups) jointly. PyTorch warns
    that ``backward(create_graph=True)`` makes a reference cycle between a parameter and its
    gradient; ``zero_grad()`` after each step breaks it. A step whose
    gradient or Hessian estimate is not finite is refused: parameters and state are left
    unchanged, a ``RuntimeWarning`` says why and ``counters["refused_steps"]`` counts it.
    Every step first checks the options of every param group as the constructor does, so that
    a value set by hand or by a scheduler (``lr = -1``, ``eps = nan``) raises, naming the
    group and the option, before anything changes.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        n_samples: int = 1,
        update_each: int = 1,
        generator: torch.Generator | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        n_samples = positive_int("n_samples", n_samples)
        update_each = positive_int("update_each", update_each)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed.ProcessGroup or None, got "
                f"{type(process_group).__name__}"
            )
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "hessian_power": hessian_power,
        }
        super().__init__(params, _checked_options(defaults))
        self.n_samples = n_samples
        self.update_each = update_each
        self.generator = generator
        self.process_group = process_group
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
        """Take one AdaHessian step.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model, calls ``loss.backward(create_graph=True)`` and returns the
            loss.

        Returns
        -------
        Tensor or None
            The closure's loss, if a closure was given.

        Raises
        ------
        TypeError
            If a gradient is sparse (``nn.Embedding(sparse=True)``) or complex, or a group
            option (set by hand or by a scheduler in ``param_groups``) is not a number.
        ValueError
            If a group option is out of range or NaN (the message names the group and the
            option), or under ``torch.distributed`` without a ``generator``; nothing is
            changed.
        """
        self._check_param_groups()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for _, param in pending:
            self._check_gradient(param.grad)
        grads = [param.grad.detach() for _, param in pending]
        if is_distributed(self.process_group):
            grads = _mean_over_processes(grads, self.process_group)
        if not all_finite(*grads):
            return self._refuse(loss, "a gradient is not finite")
        estimates = self._hessian_estimates([param for _, param in pending])
        if not all_finite(*estimates.values()):
            return self._refuse(loss, "a Hessian-diagonal estimate is not finite")
        for (group, param), grad in zip(pending, grads, strict=True):
            state = self.state[param]
            if param in estimates:
                state["hessian_diag"] = estimates[param]
            _apply_update(param, grad, state, group)
        return loss

    def _hessian_estimates(self, params: list[Tensor]) -> dict[Tensor, Tensor]:
        """Fresh (spatially averaged) estimates for the parameters due for one, averaged over
        the processes under ``torch.distributed``."""
        due = [p for p in params if self.state[p].get("step", 0) % self.update_each == 0]
        if not due:
            return {}
        distributed = is_distributed(self.process_group)
        if distributed:
            self._synchronise_generator(due[0].device)
        agreement = Agreement(self.process_group)
        diagonals = None
        with agreement.local():  # a failure on one process is raised on all, in the mean
            diagonals = hutchinson_diagonal(
                [p.grad for p in due], due, self.n_samples, self.generator
            )
        if diagonals is None:
            diagonals = [torch.zeros_like(p) for p in due]
        if distributed:
            diagonals = _mean_over_processes(diagonals, self.process_group, agreement)
        return {p: spatial_average(d) for p, d in zip(due, diagonals, strict=True)}

    def _synchronise_generator(self, device: torch.device) -> None:
        """Give every process rank 0's generator state, so that all draw the same signs.

        Raises
        ------
        ValueError
            If there is no generator: each process's global generator would draw its own.
        """
        if self.generator is None:
            raise ValueError(
                f"AdaHessian under torch.distributed ({world_size(self.process_group)} "
                "processes) needs generator=torch.Generator() (seeded alike on every process, "
                "or not: rank 0's state is broadcast), got generator=None: each process would "
                "draw its own Rademacher signs from its global generator"
            )
        state = self.generator.get_state().to(device)
        broadcast_from_([state], 0, self.process_group)
        self.generator.set_state(state.cpu())


def _mean_over_processes(
    tensors: Sequence[Tensor], group: dist.ProcessGroup | None, agreement: Agreement | None = None
) -> list[Tensor]:
    """Copies of ``tensors`` averaged over the processes of ``group``, with equal weights (one
    all-reduce per dtype and device, in the order of their first appearance), carrying
    ``agreement``'s failure flag if given."""
    sums = [tensor.detach().clone() for tensor in tensors]
    if agreement is None:
        all_reduce_sum_(sums, group)
    else:
        agreement.all_reduce_sum_(sums)
    size = world_size(group)
    return [total.div_(size) for total in sums]


def _apply_update(
    param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]
) -> None:
    """Moments, decoupled weight decay and the step for one parameter, in place (the moments
    are new tensors, the ones held before are not modified)."""
    beta1, beta2 = group["betas"]
    hessian_diag = state["hessian_diag"]
    state["step"] = state.get("step", 0) + 1
    if "exp_avg" in state:
        state["exp_avg"] = torch.add(beta1 * state["exp_avg"], grad, alpha=1 - beta1)
        state["exp_hessian_diag_sq"] = torch.addcmul(
            beta2 * state["exp_hessian_diag_sq"], hessian_diag, hessian_diag, value=1 - beta2
        )
    else:
        state["exp_avg"] = (1 - beta1) * grad
        state["exp_hessian_diag_sq"] = (1 - beta2) * hessian_diag.square()
    direction = adahessian_direction(
        state["exp_avg"],
        state["exp_hessian_diag_sq"],
        group["betas"],
        state["step"],
        group["hessian_power"],
        group["eps"],
    )
    if group["weight_decay"] != 0.0:
        param.mul_(1.0 - group["lr"] * group["weight_decay"])
    param.add_(direction, alpha=-group["lr"])


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """The AdaHessian group options of ``options``, converted; raises naming the first bad one."""
    return {
        "lr": nonnegative_float("lr", options["lr"]),
        "eps": positive_float("eps", options["eps"]),
        "weight_decay": nonnegative_float("weight_decay", options["weight_decay"]),
        "hessian_power": unit_interval(
            "hessian_power", options["hessian_power"], closed_right=True
        ),
        "betas": unit_interval_pair("betas", options["betas"]),
    }
