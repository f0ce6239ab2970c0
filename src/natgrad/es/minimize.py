"""``minimize(f, x0, ...)``: run xNES or SNES until a target, budget or step-size floor."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from natgrad._validation import nonnegative_float, one_of, positive_int
from natgrad.es.base import ESResult, NaturalEvolutionStrategy, as_fitness
from natgrad.es.snes import SNES
from natgrad.es.xnes import XNES

METHODS: dict[str, type[NaturalEvolutionStrategy]] = {"xnes": XNES, "snes": SNES}


def _evaluate(f: Callable, samples: Tensor, vectorized: bool) -> Tensor:
    """``f`` at each sample, shape ``(λ,)``: float64, or the floating dtype ``f`` returns."""
    if vectorized:
        values = as_fitness(f(samples))
    else:
        values = torch.tensor(
            [float(f(sample)) for sample in samples], dtype=torch.float64, device="cpu"
        )
    if values.shape != (samples.shape[0],):
        raise ValueError(
            f"f must return one value per sample ({samples.shape[0]}), got {tuple(values.shape)}"
        )
    return values


def _best(samples: Tensor, values: Tensor) -> tuple[Tensor, float]:
    """The first sample with the lowest value, NaN values ignored (``values`` has one that is
    not NaN: an all-NaN generation raises in ``tell``), and that value."""
    ranked = torch.where(torch.isnan(values), torch.inf, values)
    lowest = (ranked == ranked.min()) & ~torch.isnan(values)
    index = int(torch.nonzero(lowest)[0])
    return samples[index], float(values[index])


def minimize(
    f: Callable[[Tensor], float | Tensor],
    x0: Tensor | list[float],
    *,
    method: str = "xnes",
    sigma0: float = 1.0,
    max_evaluations: int = 100_000,
    target: float | None = None,
    min_sigma: float = 1e-12,
    vectorized: bool = False,
    random_state: int | torch.Generator | None = None,
    **options,
) -> ESResult:
    """Minimise ``f`` with a natural evolution strategy.

    Parameters
    ----------
    f : callable
        ``x`` of shape ``(d,)`` to a float, or with ``vectorized=True`` ``(λ, d)`` to ``(λ,)``.
        Where ``f`` is undefined it may return NaN: such samples rank last (as ``+inf``), are
        counted in ``ESResult.nan_evaluations``, and one ``RuntimeWarning`` at the end says
        how many there were. Values are ranked in float64 (or the floating dtype a vectorized
        ``f`` returns), whatever the strategy's ``dtype``.
    x0 : Tensor or sequence of float, shape (d,)
        Initial mean.
    method : {"xnes", "snes"}
    sigma0 : float
        Initial step size.
    max_evaluations : int
        Budget of objective evaluations (whole generations; the last may overshoot by < λ).
    target : float, optional
        Stop once the best value is ``<= target``.
    min_sigma : float
        Stop once every standard deviation of the search distribution is below this.
    vectorized : bool
    random_state : int, torch.Generator or None
    **options
        Passed to the strategy (``population_size``, learning rates, ``dtype``).

    Returns
    -------
    ESResult

    Raises
    ------
    ValueError
        If ``method`` is unknown, ``max_evaluations`` is not positive, ``target`` is NaN,
        ``min_sigma`` is negative or not finite, ``f`` returns the wrong shape, or ``f`` is
        NaN at every sample of a generation (the message names the generation).
    FloatingPointError
        If the search distribution overflows ``dtype`` (``f`` unbounded below; the message
        names the generation).
    """
    one_of("method", method, METHODS)
    positive_int("max_evaluations", max_evaluations)
    nonnegative_float("min_sigma", min_sigma)
    if target is not None and math.isnan(target):
        raise ValueError("target must not be NaN")
    strategy = METHODS[method](x0, sigma0, random_state=random_state, **options)
    best_x, best_value = None, math.inf
    evaluations, nan_evaluations, history = 0, 0, []
    while evaluations < max_evaluations:
        samples = strategy.ask()
        values = _evaluate(f, samples, vectorized)
        evaluations += samples.shape[0]
        nan_evaluations += strategy._tell(samples, values)
        candidate, value = _best(samples, values)
        if best_x is None or value < best_value:
            best_x, best_value = candidate.clone(), value
        history.append(best_value)
        if target is not None and best_value <= target:
            break
        if float(strategy.covariance.diagonal().max()) < min_sigma**2:
            break
    if nan_evaluations:
        warnings.warn(
            f"f returned NaN for {nan_evaluations} of {evaluations} evaluations: those samples "
            "ranked last, as +inf",
            RuntimeWarning,
            stacklevel=2,
        )
    success = target is not None and best_value <= target
    return ESResult(
        best_x,
        best_value,
        evaluations,
        len(history),
        success,
        strategy.mean.clone(),
        history,
        nan_evaluations,
    )
