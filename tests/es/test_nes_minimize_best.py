"""``minimize`` returns the best *evaluated* sample, also when no value is finite."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from natgrad.es import minimize


class Recorded:
    """An objective that is ``+inf`` where ``x₁ > inf_above``, NaN where ``x₀ > nan_above``,
    else ``‖x‖²``; it records every ``(sample, value)`` it is asked, in order."""

    def __init__(self, inf_above: float, nan_above: float) -> None:
        self.inf_above, self.nan_above = inf_above, nan_above
        self.calls: list[tuple[torch.Tensor, float]] = []

    def __call__(self, x: torch.Tensor) -> float:
        value = float((x**2).sum())
        if x[1] > self.inf_above:
            value = math.inf
        if x[0] > self.nan_above:
            value = math.nan
        self.calls.append((x.clone(), value))
        return value


def _brute_force_best(calls: list[tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, float]:
    """The first recorded sample with the lowest value that is not NaN."""
    defined = [(value, order) for order, (_, value) in enumerate(calls) if not math.isnan(value)]
    value, order = min(defined)
    return calls[order][0], value


def _minimize(f: Recorded, method: str, seed: int, max_evaluations: int = 40):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return minimize(
            f, [1.0, 2.0], method=method, max_evaluations=max_evaluations, random_state=seed
        )


@pytest.mark.parametrize("method", ["xnes", "snes"])
def test_when_every_value_is_inf_x_is_an_evaluated_sample_not_x0(method):
    """It used to be ``x0`` (never evaluated) with ``fun = inf``."""
    f = Recorded(inf_above=-math.inf, nan_above=math.inf)
    result = _minimize(f, method, seed=0)
    assert result.fun == math.inf
    assert torch.equal(result.x, f.calls[0][0])
    assert not torch.equal(result.x, torch.tensor([1.0, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("method", ["xnes", "snes"])
def test_with_inf_and_nan_only_x_is_an_inf_sample_never_a_nan_one(method):
    """Two generations of six samples, of which some are NaN (seed 1, measured)."""
    f = Recorded(inf_above=-math.inf, nan_above=1.0)
    result = _minimize(f, method, seed=1, max_evaluations=12)
    assert result.nan_evaluations > 0 and result.fun == math.inf
    values = [value for sample, value in f.calls if torch.equal(sample, result.x)]
    assert values == [math.inf]


@settings(max_examples=25, deadline=None)
@given(
    method=st.sampled_from(["xnes", "snes"]),
    seed=st.integers(0, 2**31 - 1),
    inf_above=st.floats(-3.0, 5.0) | st.just(-math.inf),
    nan_above=st.floats(-1.0, 5.0) | st.just(math.inf),
)
def test_x_and_fun_are_the_brute_force_best_of_every_evaluation(method, seed, inf_above, nan_above):
    f = Recorded(inf_above, nan_above)
    try:
        result = _minimize(f, method, seed)
    except ValueError as error:
        assume("are NaN" not in str(error))
        raise
    x, value = _brute_force_best(f.calls)
    assert torch.equal(result.x, x) and result.fun == value
    assert result.evaluations == len(f.calls)
