"""The Levenberg–Marquardt damping where the reduction ratio is undefined.

The ratio ``actual / predicted`` judges the damping only where the quadratic model predicts a
measurable decrease. The oracle is a one-parameter exact quadratic: a linear model without
bias under the unit-variance Gaussian likelihood, inputs ``x = (1, −1)`` and targets
``y = x w*``, so that the mean loss is ``L(w) = ½ f e²`` with ``e = w − w*`` and the exact
Fisher is ``f = mean x² = 1``. A step ``lr (f + λ)⁻¹ g`` moves ``e`` to ``(1 − s) e`` with
``s = lr f / (f + λ)``, and the model predicts ``lr (lr/2 − 1) f² e² / (f + λ)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from natgrad.optim import NaturalGradient, QuadraticModelOptimizer
from natgrad.optim.trust_region import (
    RESOLUTION_ULPS,
    damping_update,
    levenberg_marquardt_damping,
    loss_resolution,
)

INPUTS = [[1.0], [-1.0]]
OPTIMUM = 0.5
BOUNDS = (1e-6, 1e6)

finite = st.floats(-1e6, 1e6, allow_nan=False)
tolerances = st.floats(0.0, 1e-3)
dampings = st.floats(1e-3, 1e3)


@given(damping=dampings, actual=finite, tolerance=tolerances, fraction=st.floats(-1.0, 1.0))
def test_no_measurable_predicted_change_leaves_the_damping(
    damping: float, actual: float, tolerance: float, fraction: float
) -> None:
    record = damping_update(
        damping, actual, fraction * tolerance, decay=0.5, bounds=BOUNDS, tolerance=tolerance
    )
    assert math.isnan(record["ratio"])
    assert record["damping_after"] == damping


@given(damping=dampings, predicted=st.floats(-1e6, -1e-3), actual=finite)
def test_a_predicted_decrease_follows_the_ratio(
    damping: float, predicted: float, actual: float
) -> None:
    ratio = actual / predicted
    expected = damping / 2 if ratio > 0.75 else 2 * damping if ratio < 0.25 else damping
    record = damping_update(damping, actual, predicted, decay=0.5, bounds=BOUNDS, tolerance=1e-4)
    assert record["ratio"] == ratio
    assert record["damping_after"] == expected


@given(damping=dampings, predicted=st.floats(1e-3, 1e6), actual=finite)
def test_a_predicted_rise_raises_the_damping_only_if_the_loss_rose(
    damping: float, predicted: float, actual: float
) -> None:
    """The damping cannot turn a predicted rise into a decrease (its sign is that of
    ``lr − 2``); it is raised when the step failed, and left as it is when it did not."""
    after = levenberg_marquardt_damping(
        damping, actual, predicted, decay=0.5, bounds=BOUNDS, tolerance=1e-4
    )
    assert after == (2 * damping if actual > 1e-4 else damping)


@given(damping=dampings, predicted=st.floats(allow_nan=True), bad=st.sampled_from([-1, 1, 0]))
def test_a_non_finite_actual_change_is_a_failed_step(
    damping: float, predicted: float, bad: int
) -> None:
    actual = math.nan if bad == 0 else bad * math.inf
    record = damping_update(damping, actual, predicted, decay=0.5, bounds=BOUNDS)
    assert record["ratio"] == -math.inf
    assert record["damping_after"] == 2 * damping


@pytest.mark.parametrize("tolerance", [-1e-9, math.nan])
def test_a_negative_or_nan_tolerance_is_refused(tolerance: float) -> None:
    with pytest.raises(ValueError, match=r"tolerance must be a non-negative number, got"):
        levenberg_marquardt_damping(1.0, -1.0, -1.0, tolerance=tolerance)


def test_loss_resolution_is_round_off_of_the_larger_loss() -> None:
    eps32 = torch.finfo(torch.float32).eps
    assert loss_resolution(-3.0, 2.0, torch.float32) == RESOLUTION_ULPS * eps32 * 3.0
    assert loss_resolution(2.0, math.inf, torch.float64) == (
        RESOLUTION_ULPS * torch.finfo(torch.float64).eps * 2.0
    )
    assert loss_resolution(math.nan, math.inf, torch.float64) == 0.0


def _regression(weight: float, dtype: torch.dtype, offset: float = 0.0):
    """The one-parameter quadratic of the module docstring, plus ``offset`` in the loss."""
    inputs = torch.tensor(INPUTS, dtype=dtype)
    targets = inputs * OPTIMUM
    model = nn.Linear(1, 1, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.fill_(weight)

    def closure_for(optimizer: torch.optim.Optimizer):
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = 0.5 * ((model(inputs) - targets) ** 2).sum(1).mean() + offset
            loss.backward()
            return loss

        return closure

    return model, closure_for


def _optimizer(kind: str, model: nn.Module, lr: float, damping: float) -> torch.optim.Optimizer:
    if kind == "natural_gradient":
        return NaturalGradient(model, "gaussian", lr=lr, damping=damping, adaptive_damping=True)
    return QuadraticModelOptimizer(
        model,
        "gaussian",
        lr=lr,
        damping=damping,
        damping_adaptation_interval=1,
        damping_decay=2 / 3,
        damping_bounds=BOUNDS,
    )


KINDS = ["natural_gradient", "quadratic_model"]


@pytest.mark.parametrize("kind", KINDS)
def test_at_a_zero_gradient_the_damping_stays(kind: str) -> None:
    """``g = 0`` exactly: the model predicts no change (it rose by 1/decay every step)."""
    model, closure_for = _regression(OPTIMUM, torch.float64)
    optimizer = _optimizer(kind, model, lr=1.0, damping=1e-2)
    for _ in range(20):
        optimizer.step(closure_for(optimizer))
    assert optimizer.param_groups[0]["damping"] == 1e-2
    assert model.weight.item() == OPTIMUM


@pytest.mark.parametrize("kind", KINDS)
def test_with_a_zero_learning_rate_the_damping_stays(kind: str) -> None:
    model, closure_for = _regression(2.0, torch.float64)
    optimizer = _optimizer(kind, model, lr=1.0, damping=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)
    for _ in range(10):
        optimizer.step(closure_for(optimizer))
        schedule.step()
    assert optimizer.param_groups[0]["damping"] == 1e-2
    assert model.weight.item() == 2.0


@pytest.mark.parametrize("kind", KINDS)
def test_a_change_below_the_round_off_of_the_loss_is_not_judged(kind: str) -> None:
    """``e = 1e-4`` under a loss offset 1: the predicted change ``−½ e² f s ≈ −5e-9`` is below
    float32's resolution of the loss (the float32 losses are equal, ratio 0, and the damping
    rose), not float64's, where the ratio ``2 − s`` is measured and lowers the damping."""
    damping = 1e-3
    shrink = 1 / (1 + damping)  # s
    predicted = -0.5 * 1e-4**2 * shrink
    assert abs(predicted) < loss_resolution(1.0, 1.0, torch.float32)
    assert abs(predicted) > 1e3 * loss_resolution(1.0, 1.0, torch.float64)
    after = {}
    for dtype in (torch.float32, torch.float64):
        model, closure_for = _regression(OPTIMUM + 1e-4, dtype, offset=1.0)
        optimizer = _optimizer(kind, model, lr=1.0, damping=damping)
        optimizer.step(closure_for(optimizer))
        after[dtype] = optimizer.param_groups[0]["damping"]
        if kind == "quadratic_model" and dtype == torch.float64:
            ratio = optimizer.last_damping_update["ratio"]
            assert ratio == pytest.approx(2 - shrink, rel=1e-6)
    assert after[torch.float32] == damping
    assert after[torch.float64] == pytest.approx(damping * 2 / 3, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_a_predicted_rise_that_did_not_happen_keeps_step_and_damping(kind: str) -> None:
    """``lr = 3``, ``λ = 1``: ``s = 3/2``, so the loss falls (``e → −e/2``) while the model
    predicts a rise ``3/4 e²``; the damping was raised to 1.5 before."""
    model, closure_for = _regression(OPTIMUM + 1.0, torch.float64)
    optimizer = _optimizer(kind, model, lr=3.0, damping=1.0)
    optimizer.step(closure_for(optimizer))
    assert model.weight.item() == pytest.approx(OPTIMUM - 0.5, rel=1e-12)
    assert optimizer.param_groups[0]["damping"] == 1.0
    if kind == "quadratic_model":
        record = optimizer.last_damping_update
        assert record["predicted"] == pytest.approx(0.75, rel=1e-12)
        assert record["actual"] == pytest.approx(0.5 * (0.25 - 1.0), rel=1e-12)


def test_natural_gradient_with_lr_above_two_settles_its_damping() -> None:
    """``lr = 3`` from ``λ = 10⁻³``: steps with ``s > 2`` raise the loss, are undone and raise
    ``λ`` by 3/2, until ``λ₁₆ = 10⁻³ · 1.5¹⁶ > 1/2`` (``s < 2``); the remaining 24 steps
    contract ``e`` by ``|1 − 3/(1 + λ₁₆)|`` each with ``λ`` left there (before, it rose by 3/2
    at every step, to ``10⁻³ · 1.5⁴⁰ ≈ 1.1e4``)."""
    model, closure_for = _regression(OPTIMUM + 1.0, torch.float64)
    optimizer = _optimizer("natural_gradient", model, lr=3.0, damping=1e-3)
    for _ in range(40):
        optimizer.step(closure_for(optimizer))
    settled = 1e-3 * 1.5**16
    assert optimizer.param_groups[0]["damping"] == pytest.approx(settled, rel=1e-12)
    assert optimizer.counters["rejected_steps"] == 16
    error = (1 - 3 / (1 + settled)) ** 24
    assert model.weight.item() - OPTIMUM == pytest.approx(error, rel=1e-9)
