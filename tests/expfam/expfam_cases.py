"""Hypothesis strategies and fixed instances for every exponential family (float64)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from hypothesis import strategies as st

from natgrad.expfam import (
    Bernoulli,
    Beta,
    Categorical,
    Dirichlet,
    ExponentialFamily,
    Gamma,
    Gaussian,
    MultivariateGaussian,
    Poisson,
)

DTYPE = torch.float64
BATCH = 2


def _tensor(values: list, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=DTYPE).reshape(shape)


def _floats(low: float, high: float, count: int) -> st.SearchStrategy[list[float]]:
    element = st.floats(low, high, allow_nan=False, allow_infinity=False)
    return st.lists(element, min_size=count, max_size=count)


def _spd(entries: list[float], dim: int) -> torch.Tensor:
    factor = _tensor(entries, (BATCH, dim, dim))
    return factor @ factor.mT + 0.3 * torch.eye(dim, dtype=DTYPE)


# Each builder maps a shape spec (an int: number of classes or dimension; unused for scalar
# families) to a strategy of usual-parameter lists, and a constructor from those lists.
Builder = tuple[Callable[[int], st.SearchStrategy], Callable[[int, list], ExponentialFamily]]

BUILDERS: dict[str, Builder] = {
    "gaussian": (
        lambda _: st.tuples(_floats(-3, 3, BATCH), _floats(0.2, 3, BATCH)),
        lambda _, p: Gaussian(_tensor(p[0], (BATCH,)), _tensor(p[1], (BATCH,))),
    ),
    "multivariate_gaussian": (
        lambda d: st.tuples(_floats(-2, 2, BATCH * d), _floats(-1, 1, BATCH * d * d)),
        lambda d, p: MultivariateGaussian(_tensor(p[0], (BATCH, d)), _spd(p[1], d)),
    ),
    "bernoulli": (
        lambda _: st.tuples(_floats(-4, 4, BATCH)),
        lambda _, p: Bernoulli(logits=_tensor(p[0], (BATCH,))),
    ),
    "categorical": (
        lambda k: st.tuples(_floats(-3, 3, BATCH * k)),
        lambda k, p: Categorical(logits=_tensor(p[0], (BATCH, k))),
    ),
    "poisson": (
        lambda _: st.tuples(_floats(0.1, 30, BATCH)),
        lambda _, p: Poisson(_tensor(p[0], (BATCH,))),
    ),
    "gamma": (
        lambda _: st.tuples(_floats(0.2, 20, BATCH), _floats(0.1, 5, BATCH)),
        lambda _, p: Gamma(_tensor(p[0], (BATCH,)), _tensor(p[1], (BATCH,))),
    ),
    "beta": (
        lambda _: st.tuples(_floats(0.2, 20, BATCH), _floats(0.2, 20, BATCH)),
        lambda _, p: Beta(_tensor(p[0], (BATCH,)), _tensor(p[1], (BATCH,))),
    ),
    "dirichlet": (
        lambda k: st.tuples(_floats(0.2, 20, BATCH * k)),
        lambda k, p: Dirichlet(_tensor(p[0], (BATCH, k))),
    ),
}

FAMILY_NAMES = sorted(BUILDERS)
_SIZES = {"multivariate_gaussian": (1, 3), "categorical": (2, 4), "dirichlet": (2, 4)}


@st.composite
def distributions(draw: st.DrawFn, name: str, count: int = 1) -> list[ExponentialFamily]:
    """``count`` distributions of family ``name`` with the same batch and event shapes."""
    low, high = _SIZES.get(name, (1, 1))
    size = draw(st.integers(low, high))
    params, build = BUILDERS[name]
    return [build(size, draw(params(size))) for _ in range(count)]


def fixed(name: str) -> ExponentialFamily:
    """One moderate instance per family, for Monte Carlo checks."""
    cases: dict[str, Callable[[], ExponentialFamily]] = {
        "gaussian": lambda: Gaussian(_tensor([0.7, -1.5], (2,)), _tensor([0.5, 2.0], (2,))),
        "multivariate_gaussian": lambda: MultivariateGaussian(
            _tensor([0.5, -1.0], (2,)), _tensor([1.0, 0.4, 0.4, 0.6], (2, 2))
        ),
        "bernoulli": lambda: Bernoulli(probs=_tensor([0.3, 0.85], (2,))),
        "categorical": lambda: Categorical(probs=_tensor([0.2, 0.5, 0.3], (3,))),
        "poisson": lambda: Poisson(_tensor([0.7, 6.0], (2,))),
        "gamma": lambda: Gamma(_tensor([0.8, 4.0], (2,)), _tensor([2.0, 0.5], (2,))),
        "beta": lambda: Beta(_tensor([0.9, 3.0], (2,)), _tensor([2.5, 1.5], (2,))),
        "dirichlet": lambda: Dirichlet(_tensor([1.5, 0.8, 3.0], (3,))),
    }
    return cases[name]()


def flat_hessian(distribution: ExponentialFamily, index: tuple[int, ...]) -> torch.Tensor:
    """``∇²A`` at one batch entry by ``torch.func.hessian`` of ``log_partition_fn``."""
    family = type(distribution)
    flat = distribution.flatten_params(distribution.natural_params)[index]

    def log_partition(vector: torch.Tensor) -> torch.Tensor:
        return family.log_partition_fn(*distribution.unflatten_params(vector))

    return torch.func.hessian(log_partition)(flat)
