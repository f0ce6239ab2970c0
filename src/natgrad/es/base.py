"""The ask/tell loop shared by the natural evolution strategies, and its input checks."""

from __future__ import annotations

import abc
import copy
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from natgrad._validation import int_at_least, integer, nonnegative_int, positive_float
from natgrad.es.state_checks import (
    check_asked_samples,
    checked_generator_state,
    checked_tensor,
)
from natgrad.es.utilities import default_population_size, shaped_fitness


def as_generator(random_state: int | torch.Generator | None) -> torch.Generator:
    """A ``torch.Generator`` from a seed, an existing generator (used as is) or ``None``."""
    if isinstance(random_state, torch.Generator):
        if random_state.device.type != "cpu":
            raise ValueError(
                "random_state must be a CPU generator (natural evolution strategies sample on "
                f"the CPU), got a generator on {random_state.device}"
            )
        return random_state
    if random_state is None:
        return torch.Generator().manual_seed(int(torch.randint(2**62, (), device="cpu").item()))
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise TypeError(
            f"random_state must be an int, a torch.Generator or None, got {random_state!r}"
        )
    return torch.Generator().manual_seed(int(random_state))


def as_fitness(fitness: Tensor | list[float]) -> Tensor:
    """``fitness`` as a detached CPU tensor: a floating-point tensor keeps its dtype (a vectorized
    objective may return it on a GPU), anything else (lists, NumPy arrays, integer tensors)
    becomes float64, so that no rounding merges ranks."""
    if not isinstance(fitness, Tensor) or not fitness.dtype.is_floating_point:
        fitness = torch.as_tensor(fitness, dtype=torch.float64, device="cpu")
    return fitness.detach().cpu()


def as_start_point(x0: Tensor | list[float], dtype: torch.dtype) -> Tensor:
    """``x0`` as a finite 1-d tensor of ``dtype`` (a floating-point type), detached, copied."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if isinstance(x0, Tensor) and x0.device.type != "cpu":
        raise ValueError(
            f"x0 must be on the CPU (natural evolution strategies sample and update their "
            f"search distribution there), got a tensor on {x0.device}; pass x0.cpu()"
        )
    point = torch.as_tensor(x0, dtype=dtype, device="cpu").detach().clone()
    if point.ndim != 1 or point.numel() < 1:
        raise ValueError(f"x0 must be a non-empty 1-d vector, got shape {tuple(point.shape)}")
    if not bool(torch.isfinite(point).all()):
        raise ValueError(f"x0 must be finite, got {x0!r}")
    return point


@dataclass(frozen=True)
class ESResult:
    """Outcome of :func:`natgrad.es.minimize`.

    Attributes
    ----------
    x : Tensor of shape (d,)
        Best sample evaluated (the first one with the lowest value; never a NaN-valued sample,
        and never ``x0``, which is not evaluated). If every value was ``+inf`` (or NaN), the
        first ``+inf``-valued sample, with ``fun = inf``.
    fun : float
        Its objective value.
    evaluations, iterations : int
        Objective evaluations and generations used.
    success : bool
        Whether ``fun <= target`` was reached (``False`` when no target was given).
    mean : Tensor of shape (d,)
        Final mean of the search distribution.
    history : list of float
        Best objective value seen after each generation.
    nan_evaluations : int
        Evaluations that returned NaN (ranked last, as ``+inf``).
    """

    x: Tensor
    fun: float
    evaluations: int
    iterations: int
    success: bool
    mean: Tensor
    history: list[float]
    nan_evaluations: int = 0


class NaturalEvolutionStrategy(abc.ABC):
    """Gaussian search distribution updated by natural-gradient ascent on shaped fitness.

    Parameters
    ----------
    x0 : Tensor or sequence of float, shape (d,)
        Initial mean.
    sigma0 : float, default 1.0
        Initial step size (standard deviation of every coordinate).
    population_size : int, optional
        ``λ``; ``4 + ⌊3 ln d⌋`` by default.
    random_state : int, torch.Generator or None
        Source of the samples (a generator is used, and advanced, as is).
    dtype : torch.dtype, default torch.float64
        A floating-point type, of the samples and the distribution's parameters.

    Attributes
    ----------
    generation : int
        Number of generations told so far.

    Notes
    -----
    Minimisation: :meth:`ask` returns ``λ`` samples, :meth:`tell` takes them with their
    objective values, ranks them (lowest value best), and moves the distribution.
    :meth:`state_dict` and :meth:`load_state_dict` save and restore a run exactly: a strategy
    restored from the state after ``k`` generations continues bit for bit as the original.
    """

    #: Float attributes (positive, finite) that :meth:`state_dict` saves, besides the tensors
    #: of :meth:`_state_tensor_shapes`.
    _state_floats: tuple[str, ...] = ()

    def __init__(
        self,
        x0: Tensor | list[float],
        sigma0: float = 1.0,
        *,
        population_size: int | None = None,
        random_state: int | torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.mean = as_start_point(x0, dtype)
        self.dim = self.mean.numel()
        positive_float("sigma0", sigma0)
        if population_size is None:
            population_size = max(default_population_size(self.dim), 2)
        self.population_size = int_at_least("population_size", population_size, 2)
        self.generator = as_generator(random_state)
        self.dtype = dtype
        self.generation = 0
        self._asked: tuple[Tensor, Tensor] | None = None

    def ask(self) -> Tensor:
        """``λ`` samples of shape ``(λ, d)`` from the current search distribution.

        Raises
        ------
        FloatingPointError
            If a sample overflows ``dtype`` (a run diverging on an objective unbounded
            below); nothing changes but the generator's state.
        """
        noise = torch.randn(
            self.population_size, self.dim, generator=self.generator, dtype=self.dtype, device="cpu"
        )
        samples = self._from_noise(noise)
        if not bool(torch.isfinite(samples).all()):
            raise FloatingPointError(
                f"the samples of generation {self.generation + 1} overflow {self.dtype}: the "
                f"search distribution has grown to mean {self.mean!r} and variances "
                f"{self.covariance.diagonal()!r} (is the objective bounded below?)"
            )
        self._asked = (samples.clone(), noise)
        return samples

    def tell(self, samples: Tensor, fitness: Tensor) -> None:
        """Update the distribution from ``samples`` (``(λ, d)``) and their values (``(λ,)``).

        Samples not drawn by the last :meth:`ask` are allowed (their noise is recomputed);
        so are samples told before, whose noise is recomputed under the moved distribution.
        The values are ranked in their own precision (float64 unless given as a floating-point
        tensor), not in ``dtype``. A NaN value (an objective undefined there) ranks last, as
        ``+inf`` does, with a ``RuntimeWarning``.

        Raises
        ------
        ValueError
            If the shapes do not match ``(λ, d)`` and ``(λ,)``, a sample is not finite, or
            every fitness value is NaN (the message names the generation).
        FloatingPointError
            If the update would make the mean or a step size overflow (a run diverging on
            an objective unbounded below); the distribution is left unchanged.
        """
        nan_count = self._tell(samples, fitness)
        if nan_count:
            warnings.warn(
                f"{nan_count} of {self.population_size} fitness values of generation "
                f"{self.generation} are NaN: those samples rank last, as +inf",
                RuntimeWarning,
                stacklevel=2,
            )

    def _tell(self, samples: Tensor, fitness: Tensor) -> int:
        """:meth:`tell` without its warning; returns the number of NaN fitness values."""
        samples = torch.as_tensor(samples, dtype=self.dtype, device="cpu").detach()
        fitness = as_fitness(fitness)
        expected = (self.population_size, self.dim)
        if samples.shape != expected:
            raise ValueError(f"samples must have shape {expected}, got {tuple(samples.shape)}")
        if fitness.shape != (self.population_size,):
            raise ValueError(
                f"fitness must have shape ({self.population_size},), got {tuple(fitness.shape)}"
            )
        if not bool(torch.isfinite(samples).all()):
            raise ValueError("samples must be finite")
        nan_count = int(torch.isnan(fitness).sum())
        if nan_count == self.population_size:
            raise ValueError(
                f"all {nan_count} fitness values of generation {self.generation + 1} are NaN: "
                "no sample can be ranked (is the objective defined near the mean?)"
            )
        noise = self._noise_of(samples)
        self._checked_update(noise, shaped_fitness(fitness).to(self.dtype))
        self._asked = None
        self.generation += 1
        return nan_count

    def _checked_update(self, noise: Tensor, utilities: Tensor) -> None:
        """:meth:`_update`, undone with a ``FloatingPointError`` if a parameter of the search
        distribution (``mean``, ``sigma``, xNES's ``shape``) overflows to a non-finite value."""
        names = ("sigma", *self._state_tensor_shapes())
        previous = {name: getattr(self, name) for name in names}
        self._update(noise, utilities)
        for name in names:
            value = getattr(self, name)
            finite = bool(
                torch.isfinite(torch.as_tensor(value, dtype=torch.float64, device="cpu")).all()
            )
            if not finite:
                for key, kept in previous.items():
                    setattr(self, key, kept)
                raise FloatingPointError(
                    f"the update of generation {self.generation + 1} overflowed: {name} would "
                    f"be {value!r}; it is refused and the distribution unchanged (is the "
                    "objective bounded below? a float64 dtype overflows later)"
                )

    def _noise_of(self, samples: Tensor) -> Tensor:
        """Noise of ``samples``: kept from an untold :meth:`ask` if they match, else recomputed.

        Recomputing ``z = A⁻¹(x − μ)`` loses precision once ``σ ≪ |μ|``, so the exact noise of
        :meth:`ask` is reused whenever possible.
        """
        if self._asked is not None and torch.equal(samples, self._asked[0]):
            return self._asked[1]
        return self._to_noise(samples)

    def state_dict(self) -> dict[str, Any]:
        """The state of the run, as a plain dict of tensors, numbers, strings and ``None``.

        Loadable with ``torch.load(..., weights_only=True)``. Keys: ``"strategy"`` (the class
        name), ``"dim"``, ``"population_size"``, ``"dtype"`` (e.g. ``"torch.float64"``),
        ``"generation"``, ``"generator_state"`` (a uint8 tensor), ``"mean"`` (shape ``(d,)``),
        the strategy's own parameters (learning rates, ``"sigma"``, xNES's ``"shape"``), and
        ``"asked_samples"``/``"asked_noise"`` (shape ``(λ, d)``): the samples of an
        :meth:`ask` not yet told, and their exact noise, or ``None``. Tensors are copies.

        Returns
        -------
        dict
        """
        samples, noise = self._asked if self._asked is not None else (None, None)
        return {
            "strategy": type(self).__name__,
            "dim": self.dim,
            "population_size": self.population_size,
            "dtype": str(self.dtype),
            "generation": self.generation,
            "generator_state": self.generator.get_state(),
            "asked_samples": None if samples is None else samples.clone(),
            "asked_noise": None if noise is None else noise.clone(),
            **{name: getattr(self, name).clone() for name in self._state_tensor_shapes()},
            **{name: getattr(self, name) for name in self._state_floats},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (every key; the generator's state too).

        The strategy must be of the same class, ``dim``, ``population_size`` and ``dtype``;
        its other initial values (``x0``, ``sigma0``, learning rates, seed) are replaced.
        Told the pending samples of ``"asked_samples"``, it reuses their exact noise.

        Raises
        ------
        ValueError
            If the class, dimension, population size or dtype differ (the message names
            which), a key is missing, or a value is invalid: a tensor of the wrong shape or
            dtype or not finite, a step size not positive, xNES's ``shape`` not invertible,
            a negative ``generation``, an invalid ``generator_state``, or pending samples
            that are not those of ``asked_noise``. The message names the key and the value;
            nothing is changed then.
        TypeError
            If ``state_dict`` is not a mapping, or a number in it is not a number (or, for
            ``dim``, ``population_size`` and ``generation``, not an integer).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        self._check_configuration(state_dict)
        candidate = copy.copy(self)
        for name, shape in self._state_tensor_shapes().items():
            setattr(candidate, name, checked_tensor(state_dict, name, shape, self.dtype))
        for name in self._state_floats:
            setattr(candidate, name, positive_float(f"state_dict[{name!r}]", state_dict[name]))
        candidate._check_distribution()
        generation = nonnegative_int("state_dict['generation']", state_dict["generation"])
        asked = candidate._checked_asked(state_dict)
        generator_state = checked_generator_state(
            state_dict["generator_state"], self.generator.device
        )
        self.generator.set_state(generator_state)
        for name in (*self._state_tensor_shapes(), *self._state_floats):
            setattr(self, name, getattr(candidate, name))
        self.generation = generation
        self._asked = asked

    def _state_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the tensor attributes that :meth:`state_dict` saves, by name."""
        return {"mean": (self.dim,)}

    @abc.abstractmethod
    def _check_distribution(self) -> None:
        """Raise ``ValueError`` naming the ``state_dict`` key if a loaded parameter of the
        search distribution is invalid (checked on a copy before anything is loaded)."""

    def _check_configuration(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if keys are missing or the state is of another configuration."""
        name = type(self).__name__
        if state_dict.get("strategy") != name:
            raise ValueError(
                f"state_dict is of strategy {state_dict.get('strategy')!r}, cannot load it "
                f"into {name}"
            )
        required = {"dim", "population_size", "dtype", "generation"}
        required |= {"generator_state", "asked_samples", "asked_noise"}
        required |= set(self._state_tensor_shapes()) | set(self._state_floats)
        missing = sorted(required - set(state_dict))
        if missing:
            raise ValueError(f"state_dict lacks the keys {missing}")
        saved = {
            "dim": integer("state_dict['dim']", state_dict["dim"]),
            "population_size": integer(
                "state_dict['population_size']", state_dict["population_size"]
            ),
            "dtype": state_dict["dtype"],
        }
        mine = {"dim": self.dim, "population_size": self.population_size}
        mine["dtype"] = str(self.dtype)
        for key, value in mine.items():
            if saved[key] != value:
                raise ValueError(
                    f"state_dict has {key}={state_dict[key]!r}, but this {name} has "
                    f"{key}={value!r}: build it with the same {key}"
                )

    def _checked_asked(self, state_dict: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
        """The pending ``(samples, noise)`` of ``state_dict``: both ``None``, or both tensors
        with ``samples`` those of ``noise`` under this strategy's distribution."""
        pending = [state_dict[key] is not None for key in ("asked_samples", "asked_noise")]
        if not any(pending):
            return None
        if not all(pending):
            raise ValueError(
                "state_dict['asked_samples'] and state_dict['asked_noise'] must both be None "
                "(no pending ask) or both tensors"
            )
        shape = (self.population_size, self.dim)
        samples = checked_tensor(state_dict, "asked_samples", shape, self.dtype)
        noise = checked_tensor(state_dict, "asked_noise", shape, self.dtype)
        check_asked_samples(samples, self._from_noise(noise))
        return samples, noise

    @abc.abstractmethod
    def _from_noise(self, noise: Tensor) -> Tensor:
        """Samples ``x = μ + A z`` from standard-normal ``z`` of shape ``(λ, d)``."""

    @abc.abstractmethod
    def _to_noise(self, samples: Tensor) -> Tensor:
        """The ``z`` with ``x = μ + A z``, shape ``(λ, d)``."""

    @abc.abstractmethod
    def _update(self, noise: Tensor, utilities: Tensor) -> None:
        """Natural-gradient step from the samples' noise ``(λ, d)`` and utilities ``(λ,)``."""

    @property
    @abc.abstractmethod
    def covariance(self) -> Tensor:
        """Covariance of the search distribution, shape ``(d, d)``."""
