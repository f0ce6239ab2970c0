"""Natural-gradient descent on the natural parameters of exponential families (NGVI).

A variational distribution ``q`` from an exponential family is stored by its natural parameters
``θ``; a step is

    θ ← θ − lr · F(θ)⁻¹ ∇_θ L,

with ``F(θ) = ∇²A(θ)`` the Fisher of ``q`` (one ``d × d`` matrix per distribution in the batch,
never formed here). Because ``η = ∇A(θ)``, the Jacobian ``∂η/∂θ`` is ``F(θ)`` and the Jacobian of
the inverse map ``η ↦ θ(η)`` is ``F(θ)⁻¹`` (symmetric), so

    F(θ)⁻¹ ∇_θ L = vector-Jacobian product of ``η ↦ θ(η)`` at ``η = ∇A(θ)`` with ``∇_θ L``,

which the family provides differentiably: closed form for Gaussian, MultivariateGaussian,
Bernoulli, Categorical and Poisson, one small ``F``-solve per distribution (implicit-function
theorem) for Gamma, Beta and Dirichlet. For conjugate models, one step with ``lr = 1`` on the
negative ELBO lands on the exact posterior.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from natgrad._validation import nonnegative_int, positive_float
from natgrad.expfam.base import ExponentialFamily, Params
from natgrad.optim.counted import CountedOptimizer


def natural_gradient_direction(
    family: type[ExponentialFamily], theta: Sequence[Tensor], grads: Sequence[Tensor]
) -> Params:
    """``F(θ)⁻¹ g`` as the vector-Jacobian product of ``η ↦ θ(η)`` at ``η = ∇A(θ)``.

    Parameters
    ----------
    family : type of ExponentialFamily
        The family of ``θ``.
    theta : sequence of Tensor
        Natural parameters in ``family.natural_names`` order, shapes ``batch_shape + event_i``,
        inside the natural parameter space.
    grads : sequence of Tensor
        ``g = ∇_θ L``, same shapes as ``theta``.

    Returns
    -------
    tuple of Tensor
        ``F(θ)⁻¹ g`` per distribution of the batch, shapes of ``theta``. For
        :class:`~natgrad.expfam.MultivariateGaussian` (whose Fisher is singular along
        antisymmetric changes of ``θ₂``) the ``θ₂`` part is the symmetric solution, i.e. the
        pseudo-inverse solution ``F⁺ g``.

    Raises
    ------
    ValueError
        If ``θ`` is not finite or outside the natural parameter space.
    torch.linalg.LinAlgError
        If a Cholesky factorisation or ``F``-solve inside ``θ(η)`` fails numerically.
    """
    point = family.from_natural(*(t.detach() for t in theta))
    eta = tuple(e.detach().requires_grad_(True) for e in point.mean_params)
    with torch.enable_grad():
        theta_of_eta = family._natural_from_mean_at(eta, point.natural_params)
        used = [(t, g) for t, g in zip(theta_of_eta, grads, strict=True) if t.requires_grad]
        if not used:
            return tuple(torch.zeros_like(e) for e in eta)
        outputs, cotangents = zip(*used, strict=True)
        direction = torch.autograd.grad(outputs, eta, grad_outputs=cotangents, allow_unused=True)
    return tuple(
        torch.zeros_like(e) if d is None else d.detach()
        for d, e in zip(direction, eta, strict=True)
    )


class NaturalGradientDescent(CountedOptimizer):
    """Natural-gradient descent ``θ ← θ − lr · F(θ)⁻¹ ∇_θ L`` on exponential-family parameters.

    Parameters
    ----------
    params : iterable of Tensor or iterable of dict
        Either the natural-parameter tensors of ONE family instance, in ``family.natural_names``
        order (leaf tensors with ``requires_grad``, shapes ``batch_shape + event_i``), with
        ``family`` given; or param-group dicts, each with ``"params"`` (one family's natural
        tensors in that order), ``"family"`` (an :class:`~natgrad.expfam.ExponentialFamily`
        subclass; defaults to ``family``) and optionally ``"lr"`` and ``"max_halvings"``.
        Groups may mix families.
    family : type of ExponentialFamily, optional
        The family of the parameters (default for groups that name none).
    lr : float
        Step size (``1`` is the exact posterior update for conjugate models).
    max_halvings : int
        How many times a distribution's step that leaves the natural parameter space (or is
        not finite) is halved before it is refused. Each distribution of a batched group is
        halved on its own, so that a batch steps as its distributions would in groups of their
        own.

    Attributes
    ----------
    counters : dict of str to int
        ``"steps"`` (calls of :meth:`step`), ``"domain_halvings"`` (halvings made to stay inside
        the natural parameter space, summed over distributions, groups and steps) and
        ``"refused_steps"`` (group steps refused, wholly or for some distributions of the batch:
        non-finite gradient or direction, failed solve, or no step inside the domain after
        ``max_halvings`` halvings). Saved by :meth:`state_dict`.

    Notes
    -----
    ``F(θ)`` is the Fisher of the distribution ``q`` itself (per distribution of the batch, not
    a mean over data). A refused step leaves that group's parameters untouched (only the
    distributions without a step inside the domain, where others have one) and issues a
    ``RuntimeWarning`` saying why; no NaN is ever written. Parameters without ``.grad`` are
    treated as having zero gradient; a group where no parameter has ``.grad`` is skipped.

    Examples
    --------
    Gaussian mean with known noise variance: one step of size 1 gives the exact posterior.

    >>> import torch
    >>> from natgrad.expfam import Gaussian
    >>> from natgrad.optim import NaturalGradientDescent
    >>> x = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)
    >>> start = Gaussian(torch.tensor(0.0, dtype=torch.float64), 3.0)
    >>> theta = [t.clone().requires_grad_(True) for t in start.natural_params]
    >>> optimizer = NaturalGradientDescent(theta, family=Gaussian, lr=1.0)
    >>> def negative_elbo():
    ...     optimizer.zero_grad()
    ...     q = Gaussian.from_natural(*theta)
    ...     prior = Gaussian(torch.tensor(0.0, dtype=torch.float64), 1.0)
    ...     fit = -0.5 * ((x - q.loc) ** 2 + q.variance).sum()  # noise variance 1
    ...     loss = q.kl(prior) - fit
    ...     loss.backward()
    ...     return loss
    >>> _ = optimizer.step(negative_elbo)
    >>> round(Gaussian.from_natural(*theta).loc.item(), 6)  # posterior mean 3 / 4
    0.75
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        family: type[ExponentialFamily] | None = None,
        lr: float = 0.1,
        *,
        max_halvings: int = 20,
    ) -> None:
        defaults = {
            "lr": positive_float("lr", lr),
            "family": family,
            "max_halvings": nonnegative_int("max_halvings", max_halvings),
        }
        self.counters = {"steps": 0, "domain_halvings": 0, "refused_steps": 0}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its family, tensors, ``lr`` and ``max_halvings``.

        Raises
        ------
        TypeError
            If the family is not an ``ExponentialFamily`` subclass, a tensor is not floating
            point, ``lr`` is not a real number or ``max_halvings`` not an integer.
        ValueError
            If the number of tensors is not the family's, their shapes do not fit together,
            ``lr`` is not positive and finite or ``max_halvings`` is negative.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one natural-gradient step on every group.

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
        ValueError
            If a group's current ``θ`` is not finite or outside its natural parameter space;
            then no group is updated.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.counters["steps"] += 1
        updates = [self._propose(index, group) for index, group in enumerate(self.param_groups)]
        for group, proposal in zip(self.param_groups, updates, strict=True):
            if proposal is not None:
                for param, value in zip(group["params"], proposal, strict=True):
                    param.copy_(value)
        return loss

    def _propose(self, index: int, group: dict[str, Any]) -> Params | None:
        """The group's new ``θ``, or ``None`` if it has no gradient or its step is refused."""
        params: list[Tensor] = group["params"]
        if all(p.grad is None for p in params):
            return None
        grads = tuple(torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params)
        if not all(bool(g.isfinite().all()) for g in grads):
            return self._refuse_group(index, "the gradient is not finite")
        theta = tuple(p.detach() for p in params)
        try:
            direction = natural_gradient_direction(group["family"], theta, grads)
        except torch.linalg.LinAlgError as error:
            return self._refuse_group(index, f"the Fisher solve failed ({error})")
        if not all(bool(d.isfinite().all()) for d in direction):
            return self._refuse_group(index, "the natural-gradient direction is not finite")
        proposal, outside = self._backtrack(group, theta, direction)
        if not bool(outside.any()):
            return proposal
        why = (
            f"no step inside the natural parameter space ({group['family'].natural_domain}) "
            f"after {group['max_halvings']} halvings of lr = {group['lr']}"
        )
        if bool(outside.all()):
            return self._refuse_group(index, why)
        count = f"{int(outside.sum())} of its {outside.numel()} distributions"
        self._refuse_group(index, f"{why}, for {count}", f"those {count} are unchanged")
        return proposal

    def _backtrack(
        self, group: dict[str, Any], theta: Params, direction: Params
    ) -> tuple[Params, Tensor]:
        """Per distribution of the batch, ``θ − lr 2⁻ᵏ d`` for the smallest ``k ≤ max_halvings``
        that is finite and in the domain (each distribution's Fisher block, and so its step, is
        its own); ``θ`` and ``True`` in the returned mask (batch shape) where there is none."""
        family: type[ExponentialFamily] = group["family"]
        sizes = theta[0].new_full(_batch_shape(family, theta), float(group["lr"]))
        for halvings in range(group["max_halvings"] + 1):
            proposal = _moved(family, theta, direction, sizes)
            outside = ~_valid(family, theta, proposal)
            if halvings == group["max_halvings"] or not bool(outside.any()):
                break
            self.counters["domain_halvings"] += int(outside.sum())
            sizes = torch.where(outside, 0.5 * sizes, sizes)
        kept = tuple(
            torch.where(_per_event(family, outside, index), t, p)
            for index, (t, p) in enumerate(zip(theta, proposal, strict=True))
        )
        return kept, outside

    def _refuse_group(
        self, index: int, why: str, unchanged: str = "its parameters are unchanged"
    ) -> None:
        """Count and warn about a refused group step (returns ``None``: no proposal)."""
        self.counters["refused_steps"] += 1
        warnings.warn(
            f"NaturalGradientDescent refused the step of param group {index}: {why}; {unchanged}",
            RuntimeWarning,
            stacklevel=4,
        )

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state with the counters; families are stored by qualified name.

        Holding only strings and numbers, it loads with ``torch.load(weights_only=True)``.
        """
        state = super().state_dict()
        for saved in state["param_groups"]:
            saved["family"] = _qualified_name(saved["family"])
        state["counters"] = dict(self.counters)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; each saved group's family must match this group's.

        Raises
        ------
        ValueError
            If the counters are missing, or the group count or a group's family differ.
        """
        state = dict(state_dict)
        if "counters" not in state:
            raise ValueError(
                "state_dict has no 'counters'; was it saved by NaturalGradientDescent?"
            )
        counters = dict(state.pop("counters"))
        saved_groups = state["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, the optimizer "
                f"{len(self.param_groups)}"
            )
        restored = []
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            expected = _qualified_name(group["family"])
            if saved.get("family") != expected:
                raise ValueError(
                    f"param group {index}: state_dict family {saved.get('family')!r} does not "
                    f"match the optimizer's {expected!r}"
                )
            restored.append({**saved, "family": group["family"]})
        state["param_groups"] = restored
        super().load_state_dict(state)
        self.counters = counters


def _batch_shape(family: type[ExponentialFamily], theta: Params) -> torch.Size:
    return theta[0].shape[: theta[0].ndim - family.natural_event_ndims[0]]


def _per_event(family: type[ExponentialFamily], mask: Tensor, index: int) -> Tensor:
    """``mask`` (batch shape) with trailing singleton dimensions for parameter ``index``'s
    event dimensions, to broadcast against it."""
    return mask.reshape(mask.shape + (1,) * family.natural_event_ndims[index])


def _moved(
    family: type[ExponentialFamily], theta: Params, direction: Params, sizes: Tensor
) -> Params:
    """``θ − size · d`` with one step size per distribution (``sizes`` of batch shape)."""
    return tuple(
        t - _per_event(family, sizes, index) * d
        for index, (t, d) in enumerate(zip(theta, direction, strict=True))
    )


def _valid(family: type[ExponentialFamily], theta: Params, proposal: Params) -> Tensor:
    """Mask over the batch: the distribution's proposal is finite and in the domain (checked
    with ``θ`` in place of a non-finite proposal)."""
    batch_shape = _batch_shape(family, theta)
    finite = torch.stack([p.isfinite().reshape(*batch_shape, -1).all(-1) for p in proposal]).all(0)
    checked = tuple(
        torch.where(_per_event(family, finite, index), p, t)
        for index, (t, p) in enumerate(zip(theta, proposal, strict=True))
    )
    return finite & family._natural_in_domain(*checked)


def _qualified_name(family: type) -> str:
    return f"{family.__module__}.{family.__qualname__}"


def _check_group(group: dict[str, Any]) -> None:
    family = group["family"]
    if not (isinstance(family, type) and issubclass(family, ExponentialFamily)):
        raise TypeError(
            f"family must be a subclass of natgrad.expfam.ExponentialFamily, got {family!r}"
        )
    group["lr"] = positive_float("lr", group["lr"])
    group["max_halvings"] = nonnegative_int("max_halvings", group["max_halvings"])
    params: list[Tensor] = group["params"]
    names = family.natural_names
    if len(params) != len(names):
        raise ValueError(
            f"{family.__name__} has {len(names)} natural parameter(s) ({', '.join(names)}), "
            f"got {len(params)} tensor(s)"
        )
    for param, name in zip(params, names, strict=True):
        if not param.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {param.dtype}")
    _check_shapes(family, params)


def _check_shapes(family: type[ExponentialFamily], params: Sequence[Tensor]) -> None:
    """The tensors must share one batch shape and dtype (no broadcasting between them)."""
    names = family.natural_names
    described = ", ".join(
        f"{n}: {tuple(p.shape)} {p.dtype}" for n, p in zip(names, params, strict=True)
    )
    batch_shapes = set()
    for param, ndims in zip(params, family.natural_event_ndims, strict=True):
        if param.ndim < ndims:
            raise ValueError(f"{family.__name__}: too few dimensions ({described})")
        batch_shapes.add(tuple(param.shape[: param.ndim - ndims]))
    if len(batch_shapes) != 1 or len({p.dtype for p in params}) != 1:
        raise ValueError(
            f"{family.__name__}: natural parameters must share one batch shape and dtype "
            f"({described})"
        )
