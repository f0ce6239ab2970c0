"""The interface shared by every exponential family.

An exponential family has densities ``p(x) = h(x) exp(⟨θ, T(x)⟩ − A(θ))`` with natural
parameters ``θ``, sufficient statistics ``T(x)``, log-partition ``A(θ)`` and base measure
``h(x)``. Its mean (expectation) parameters are ``η = E[T(x)] = ∇A(θ)`` and its Fisher
information in natural coordinates is ``F(θ) = ∇²A(θ) = Cov[T(x)]``.

Every family stores its natural parameters as a tuple of tensors, batched over leading
dimensions: parameter ``i`` has shape ``batch_shape + event_shape_i``, where the number of
trailing event dimensions of each parameter is the class attribute ``natural_event_ndims``.
The mean parameters have the same shapes as the natural parameters.

Flattening order
----------------
Where one event's parameters are needed as a single vector (``fisher()``, ``flatten_params``),
the natural parameters are taken in the order of ``natural_params``, each one's event
dimensions flattened row-major (C order), and concatenated. ``fisher()`` has shape
``batch_shape + (d, d)`` in that order, with ``d`` = :attr:`ExponentialFamily.natural_dim`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

Params = tuple[Tensor, ...]
_Family = TypeVar("_Family", bound="ExponentialFamily")


def as_float_tensor(value: Tensor | float, name: str, device: torch.device | None = None) -> Tensor:
    """Return ``value`` as a floating-point tensor; integers become the default dtype.

    A value that is not yet a tensor is created on ``device`` (default: the default device).

    Raises
    ------
    TypeError
        If ``value`` is complex, boolean or not convertible to a tensor.
    """
    if isinstance(value, Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(value, device=device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be a tensor or a number, got {value!r}") from error
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


def first_failure(mask: Tensor) -> tuple[int, ...]:
    """Index of the first ``False`` entry of a boolean tensor (``()`` for a 0-d tensor)."""
    flat_index = int(torch.nonzero(~mask.reshape(-1))[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), mask.shape))


def require(mask: Tensor, message: str, values: dict[str, Tensor]) -> None:
    """Raise ``ValueError`` if any entry of ``mask`` is ``False``.

    Parameters
    ----------
    mask : Tensor
        Boolean tensor over a batch shape; ``True`` where the requirement holds.
    message : str
        What was required, e.g. ``"Gaussian: scale must be positive"``.
    values : dict of str to Tensor
        Tensors of shape ``mask.shape + event_shape``; their entries at the first failing batch
        index are quoted in the error.
    """
    if bool(mask.all()):
        return
    index = first_failure(mask)
    quoted = ", ".join(
        f"{name}{list(index) if index else ''} = {value.detach()[index].tolist()}"
        for name, value in values.items()
    )
    raise ValueError(f"{message}; got {quoted}")


def require_finite(family: str, values: dict[str, Tensor]) -> None:
    """Raise ``ValueError`` naming the first NaN or infinite entry of any of ``values``."""
    for name, value in values.items():
        require(value.detach().isfinite(), f"{family}: {name} must be finite", {name: value})


def broadcast_batch(
    tensors: Sequence[Tensor], event_ndims: Sequence[int], names: Sequence[str]
) -> Params:
    """Broadcast the batch dimensions of tensors that have different event dimensions.

    Returns
    -------
    tuple of Tensor
        Each tensor expanded to ``batch_shape + its own event shape``.
    """
    batch_shapes = []
    for tensor, ndims, name in zip(tensors, event_ndims, names, strict=True):
        if tensor.ndim < ndims:
            raise ValueError(
                f"{name} must have at least {ndims} dimension(s), got shape {tuple(tensor.shape)}"
            )
        batch_shapes.append(tensor.shape[: tensor.ndim - ndims])
    try:
        batch_shape = torch.broadcast_shapes(*batch_shapes)
    except RuntimeError as error:
        shapes = ", ".join(f"{n}: {tuple(t.shape)}" for n, t in zip(names, tensors, strict=True))
        raise ValueError(f"batch shapes do not broadcast ({shapes})") from error
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return tuple(
        tensor.to(dtype).expand((*batch_shape, *tensor.shape[tensor.ndim - ndims :]))
        for tensor, ndims in zip(tensors, event_ndims, strict=True)
    )


def flatten_event(params: Sequence[Tensor], event_ndims: Sequence[int]) -> Tensor:
    """Concatenate parameters, each with its event dimensions flattened row-major.

    Parameters
    ----------
    params : sequence of Tensor
        Shapes ``leading_shape + event_shape_i`` (leading shapes broadcast).
    event_ndims : sequence of int
        Number of event dimensions of each parameter.

    Returns
    -------
    Tensor
        Shape ``leading_shape + (d,)`` with ``d = Σ_i prod(event_shape_i)``.
    """
    leading = torch.broadcast_shapes(
        *(p.shape[: p.ndim - n] for p, n in zip(params, event_ndims, strict=True))
    )
    return torch.cat(
        [
            p.expand((*leading, *p.shape[p.ndim - n :])).reshape((*leading, -1))
            for p, n in zip(params, event_ndims, strict=True)
        ],
        dim=-1,
    )


def unflatten_event(flat: Tensor, like: Sequence[Tensor], event_ndims: Sequence[int]) -> Params:
    """Split ``leading_shape + (d,)`` into tensors with the event shapes of ``like``."""
    event_shapes = [p.shape[p.ndim - n :] for p, n in zip(like, event_ndims, strict=True)]
    chunks = torch.split(flat, [math.prod(shape) for shape in event_shapes], dim=-1)
    return tuple(
        chunk.reshape((*flat.shape[:-1], *shape))
        for chunk, shape in zip(chunks, event_shapes, strict=True)
    )


class ExponentialFamily(abc.ABC):
    """A batch of distributions from one exponential family, stored by natural parameters.

    Subclasses provide the usual-parameter constructor and the closed forms below; this base
    class provides the conversions, validation, ``kl``, ``entropy`` and ``log_prob``.

    Notes
    -----
    Instances are immutable views of their natural parameters: every derived quantity
    (mean parameters, usual parameters, Fisher, ...) is recomputed from ``natural_params`` and
    is differentiable with respect to the tensors the instance was built from.
    """

    natural_event_ndims: ClassVar[tuple[int, ...]]
    natural_names: ClassVar[tuple[str, ...]]
    mean_names: ClassVar[tuple[str, ...]]
    natural_domain: ClassVar[str]
    mean_domain: ClassVar[str]

    _natural: Params

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def _from_natural_unchecked(cls: type[_Family], natural: Params) -> _Family:
        instance = cls.__new__(cls)
        instance._natural = tuple(natural)
        return instance

    def _init_natural(self, natural: Params) -> None:
        self._natural = tuple(natural)

    @classmethod
    def _prepare(cls, values: Sequence[Tensor | float], names: Sequence[str]) -> Params:
        if len(values) != len(cls.natural_event_ndims):
            raise TypeError(
                f"{cls.__name__} takes {len(cls.natural_event_ndims)} parameters "
                f"({', '.join(names)}), got {len(values)}"
            )
        device = next((v.device for v in values if isinstance(v, Tensor)), None)
        tensors = [as_float_tensor(v, n, device) for v, n in zip(values, names, strict=True)]
        return broadcast_batch(tensors, cls.natural_event_ndims, names)

    @classmethod
    def from_natural(cls: type[_Family], *theta: Tensor, validate: bool = True) -> _Family:
        """Build the distribution from natural parameters ``θ`` (see the class docstring).

        Parameters
        ----------
        *theta : Tensor
            The natural parameters, shapes ``batch_shape + event_shape_i``; batch dimensions
            broadcast.
        validate : bool
            Check that ``θ`` is finite and inside the natural parameter space.

        Raises
        ------
        ValueError
            If ``θ`` is outside the natural parameter space (the message names the value).
        """
        natural = cls._prepare(theta, cls.natural_names)
        if validate:
            cls._check(natural, cls.natural_names, cls._natural_in_domain, cls.natural_domain)
        return cls._from_natural_unchecked(natural)

    @classmethod
    def from_mean(cls: type[_Family], *eta: Tensor, validate: bool = True) -> _Family:
        """Build the distribution from mean parameters ``η = E[T(x)]``.

        The map ``η → θ`` is differentiable (closed form, or the implicit-function theorem
        for the families that solve it by Newton's method).

        Raises
        ------
        ValueError
            If ``η`` is outside the mean parameter space (the message names the value).
        """
        mean = cls._prepare(eta, cls.mean_names)
        if validate:
            cls._check(mean, cls.mean_names, cls._mean_in_domain, cls.mean_domain)
        return cls._from_natural_unchecked(cls._natural_from_mean(*mean))

    @classmethod
    def _check(cls, params: Params, names: Sequence[str], in_domain, domain: str) -> None:
        values = dict(zip(names, params, strict=True))
        batch_shape = cls._batch_shape_of(params)
        finite = torch.ones(batch_shape, dtype=torch.bool, device=params[0].device)
        for tensor in params:
            flat = tensor.detach().isfinite().reshape((*batch_shape, -1))
            finite = finite & flat.all(-1)
        require(finite, f"{cls.__name__}: parameters must be finite (no NaN or inf)", values)
        detached = tuple(p.detach() for p in params)
        require(in_domain(*detached), f"{cls.__name__}: parameters must satisfy {domain}", values)

    @classmethod
    def _batch_shape_of(cls, params: Params) -> torch.Size:
        first, ndims = params[0], cls.natural_event_ndims[0]
        return first.shape[: first.ndim - ndims]

    # -- closed forms each family provides ---------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def log_partition_fn(cls, *theta: Tensor) -> Tensor:
        """Log-partition ``A(θ)`` as a pure, differentiable function; shape ``batch_shape``."""

    @classmethod
    @abc.abstractmethod
    def _mean_from_natural(cls, *theta: Tensor) -> Params:
        """Closed-form ``η = ∇A(θ)``."""

    @classmethod
    @abc.abstractmethod
    def _natural_from_mean(cls, *eta: Tensor) -> Params:
        """Differentiable ``θ(η)``, the inverse of :meth:`_mean_from_natural`."""

    @classmethod
    @abc.abstractmethod
    def _fisher_from_natural(cls, *theta: Tensor) -> Tensor:
        """Closed-form ``∇²A(θ)``, shape ``batch_shape + (d, d)`` in the flattening order."""

    @classmethod
    def _fisher_solve(cls, theta: Params, rhs: Tensor) -> Tensor:
        """``F(θ)⁻¹ r`` for ``r`` of shape ``batch_shape + (d,)``; rows whose ``F`` is singular
        to working precision are NaN. Families with a structured Fisher override the dense solve.
        """
        solution, info = torch.linalg.solve_ex(cls._fisher_from_natural(*theta), rhs.unsqueeze(-1))
        return torch.where((info == 0)[..., None], solution.squeeze(-1), math.nan)

    @classmethod
    def _fisher_diagonal(cls, theta: Params) -> Tensor:
        """The diagonal of ``F(θ)``, shape ``batch_shape + (d,)``."""
        return cls._fisher_from_natural(*theta).diagonal(dim1=-2, dim2=-1)

    @classmethod
    @abc.abstractmethod
    def _natural_in_domain(cls, *theta: Tensor) -> Tensor:
        """Boolean mask over the batch: ``θ`` lies in the natural parameter space."""

    @classmethod
    @abc.abstractmethod
    def _mean_in_domain(cls, *eta: Tensor) -> Tensor:
        """Boolean mask over the batch: ``η`` lies in the (open) mean parameter space."""

    @abc.abstractmethod
    def sufficient_statistics(self, x: Tensor) -> Params:
        """``T(x)`` as a tuple matching ``natural_params``.

        ``x`` has shape ``sample_shape + batch_shape + event_shape`` (any broadcastable
        leading shape); each returned tensor has shape ``x``'s leading shape plus the
        parameter's event shape.
        """

    @abc.abstractmethod
    def to_torch(self) -> torch.distributions.Distribution:
        """The matching ``torch.distributions`` object (same batch shape)."""

    def log_base_measure(self, x: Tensor) -> Tensor:
        """``log h(x)``; zero (a 0-d tensor that broadcasts) unless the family overrides it."""
        return torch.zeros((), dtype=self.dtype, device=x.device)

    def _expected_log_base_measure(self) -> Tensor:
        """``E[log h(x)]``; zero unless the family overrides it."""
        return torch.zeros(self.batch_shape, dtype=self.dtype, device=self._natural[0].device)

    @classmethod
    def _natural_from_mean_at(cls, eta: Params, theta: Params) -> Params:
        """Differentiable ``θ(η)`` at an ``η`` whose natural parameters ``theta`` are known.

        Families with a closed-form inverse ignore ``theta``; the others use it to skip
        their Newton solve.
        """
        del theta
        return cls._natural_from_mean(*eta)

    # -- derived quantities ------------------------------------------------------------------
    @property
    def natural_params(self) -> Params:
        """Natural parameters ``θ``, shapes ``batch_shape + event_shape_i``."""
        return self._natural

    @property
    def mean_params(self) -> Params:
        """Mean parameters ``η = E[T(x)] = ∇A(θ)``, same shapes as ``natural_params``."""
        return self._mean_from_natural(*self._natural)

    @property
    def batch_shape(self) -> torch.Size:
        """Leading (batch) shape shared by all parameters."""
        return self._batch_shape_of(self._natural)

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the parameters."""
        return self._natural[0].dtype

    @property
    def natural_dim(self) -> int:
        """Number ``d`` of natural parameters of one event (the size of ``fisher()``)."""
        return sum(self._event_numels())

    def _event_numels(self) -> list[int]:
        return [
            math.prod(p.shape[p.ndim - n :])
            for p, n in zip(self._natural, self.natural_event_ndims, strict=True)
        ]

    def log_partition(self) -> Tensor:
        """``A(θ)``, shape ``batch_shape``; differentiable."""
        return self.log_partition_fn(*self._natural)

    def fisher(self) -> Tensor:
        """Fisher information ``F(θ) = ∇²A(θ) = Cov[T(x)]`` in natural coordinates.

        Returns
        -------
        Tensor
            Shape ``batch_shape + (d, d)``, one dense matrix per event, over the natural
            parameters flattened in the order described in :mod:`natgrad.expfam.base`.
        """
        return self._fisher_from_natural(*self._natural)

    def flatten_params(self, params: Sequence[Tensor]) -> Tensor:
        """Flatten a tuple shaped like ``natural_params`` to ``leading_shape + (d,)``."""
        return flatten_event(params, self.natural_event_ndims)

    def unflatten_params(self, flat: Tensor) -> Params:
        """Inverse of :meth:`flatten_params`: split ``leading_shape + (d,)`` into a tuple."""
        if flat.shape[-1] != self.natural_dim:
            raise ValueError(
                f"expected a last dimension of {self.natural_dim}, got {tuple(flat.shape)}"
            )
        return unflatten_event(flat, self._natural, self.natural_event_ndims)

    def inner(self, first: Sequence[Tensor], second: Sequence[Tensor]) -> Tensor:
        """``⟨first, second⟩`` summed over each parameter's event dimensions."""
        total = None
        for a, b, ndims in zip(first, second, self.natural_event_ndims, strict=True):
            product = a * b
            term = product.sum(dim=tuple(range(-ndims, 0))) if ndims else product
            total = term if total is None else total + term
        assert total is not None
        return total

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x) = ⟨θ, T(x)⟩ − A(θ) + log h(x)``, shape ``x``'s leading shape.

        Its rounding error is a few ulps of the sizes of these terms; the Gamma, Beta and
        Dirichlet override it near their mean, where those grow like ``α log α``.
        """
        statistics = self.sufficient_statistics(x)
        return (
            self.inner(self._natural, statistics) - self.log_partition() + self.log_base_measure(x)
        )

    def kl(self, other: ExponentialFamily) -> Tensor:
        """``KL(self ‖ other) = A(θ_q) − A(θ_p) − ⟨θ_q − θ_p, η_p⟩``, shape ``batch_shape``.

        The Bregman form has an absolute rounding error of about ``ε·|A|``, large next to a
        small KL; every family of :mod:`natgrad.expfam` overrides it with a form free of
        cancellation (a sum of non-negative terms formed from differences of natural
        parameters). It remains the default of new families.

        Raises
        ------
        TypeError
            If ``other`` is not the same family.
        """
        if type(other) is not type(self):
            raise TypeError(
                f"kl needs two {type(self).__name__} distributions, got {type(other).__name__}"
            )
        return self._kl_same_family(other)

    def _kl_same_family(self, other: ExponentialFamily) -> Tensor:
        """The Bregman form of :meth:`kl`; ``other`` is of the same family."""
        difference = tuple(q - p for q, p in zip(other._natural, self._natural, strict=True))
        cross_term = self.inner(difference, self.mean_params)
        return other.log_partition() - self.log_partition() - cross_term

    def entropy(self) -> Tensor:
        """``H = A(θ) − ⟨θ, η⟩ − E[log h(x)]``, shape ``batch_shape``."""
        return (
            self.log_partition()
            - self.inner(self._natural, self.mean_params)
            - self._expected_log_base_measure()
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, dtype={self.dtype})"
