"""Parameterization invariance of natural gradient descent (NaturalGradient, exact dense Fisher).

Oracles: the closed-form logistic-regression Fisher ``Xᵀ diag(p(1 − p)) X / N`` in NumPy and its
transformation rule ``F_v = Aᵀ F_w A`` under ``w = A v``; plain gradient descent as the
non-invariant contrast.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import natgrad
from natgrad.optim import NaturalGradient


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class TransformedLogistic(nn.Module):
    """Logits ``x @ transform(v)``: logistic regression with weights ``w = transform(v)``."""

    def __init__(self, transform: Callable[[Tensor], Tensor], initial: Tensor) -> None:
        super().__init__()
        self.transform = transform
        self.v = nn.Parameter(initial.clone())

    def forward(self, inputs: Tensor) -> Tensor:
        return inputs @ self.transform(self.v)


def _data(seed: int, n: int = 50) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.cat([torch.randn(n, 2, generator=generator), torch.ones(n, 1)], dim=1)
    probs = torch.sigmoid(inputs @ torch.tensor([1.5, -1.0, 0.3]))
    return inputs, torch.bernoulli(probs, generator=generator)


def _mixing(seed: int, spread: float) -> Tensor:
    """``Q diag(spread, 1, 1/spread) Qᵀ`` for a random rotation ``Q``."""
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator))
    return rotation @ torch.diag(torch.tensor([spread, 1.0, 1.0 / spread])) @ rotation.T


def _closed_form_fisher(inputs: Tensor, weight: Tensor) -> np.ndarray:
    design, w = inputs.numpy(), weight.detach().numpy()
    probs = 1 / (1 + np.exp(-design @ w))
    return design.T @ (design * (probs * (1 - probs))[:, None]) / len(design)


def _run(model: nn.Module, method: str, inputs: Tensor, labels: Tensor, lr: float, steps: int):
    """Predicted probabilities after each step, shape ``(steps, N)``."""
    if method == "ngd":
        optimizer = NaturalGradient(model, "bernoulli", lr=lr, damping=0.0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(inputs), labels)
        loss.backward()
        return loss

    predictions = []
    for _ in range(steps):
        optimizer.step(closure)
        with torch.no_grad():
            predictions.append(torch.sigmoid(model(inputs)))
    return torch.stack(predictions)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(1.5, 6.0))
def test_fisher_transforms_as_a_t_f_a_under_linear_reparameterization(seed, spread):
    inputs, _ = _data(seed)
    mixing = _mixing(seed + 1, spread)
    start_v = torch.randn(3, generator=torch.Generator().manual_seed(seed + 2)) * 0.5
    model_v = TransformedLogistic(lambda v: mixing @ v, start_v)
    fisher_v = natgrad.fisher(model_v, inputs, likelihood="bernoulli").to_dense().numpy()
    fisher_w = _closed_form_fisher(inputs, mixing @ start_v)
    a = mixing.numpy()
    np.testing.assert_allclose(fisher_v, a.T @ fisher_w @ a, rtol=1e-10, atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(1.5, 6.0), lr=st.floats(0.1, 1.0))
def test_one_exact_ngd_step_gives_identical_predictions_under_linear_reparameterization(
    seed, spread, lr
):
    inputs, labels = _data(seed)
    mixing = _mixing(seed + 1, spread)
    start_w = torch.randn(3, generator=torch.Generator().manual_seed(seed + 2)) * 0.5
    model_w = TransformedLogistic(lambda w: w, start_w)
    model_v = TransformedLogistic(lambda v: mixing @ v, torch.linalg.solve(mixing, start_w))
    ngd_w = _run(model_w, "ngd", inputs, labels, lr, steps=1)
    ngd_v = _run(model_v, "ngd", inputs, labels, lr, steps=1)
    torch.testing.assert_close(ngd_v, ngd_w, rtol=0, atol=1e-12)


def test_one_gd_step_depends_on_the_linear_reparameterization():
    inputs, labels = _data(0)
    mixing = _mixing(1, spread=4.0)
    start_w = torch.zeros(3)
    gd_w = _run(TransformedLogistic(lambda w: w, start_w), "gd", inputs, labels, 0.5, steps=1)
    model_v = TransformedLogistic(lambda v: mixing @ v, torch.linalg.solve(mixing, start_w))
    gd_v = _run(model_v, "gd", inputs, labels, 0.5, steps=1)
    assert float((gd_w - gd_v).abs().max()) > 1e-2


def _gap(method: str, lr: float, total_time: float) -> float:
    """Largest probability gap between ``w`` and ``w = sinh(v)`` along a run of fixed time."""
    inputs, labels = _data(3)
    steps = round(total_time / lr)
    start = torch.tensor([1.0, -1.5, 0.5])
    plain = _run(TransformedLogistic(lambda w: w, start), method, inputs, labels, lr, steps)
    warped_model = TransformedLogistic(torch.sinh, torch.asinh(start))
    warped = _run(warped_model, method, inputs, labels, lr, steps)
    return float((plain - warped).abs().max())


def test_ngd_gap_under_nonlinear_reparameterization_is_orders_below_gd_and_shrinks_with_lr():
    ngd_gap, gd_gap = _gap("ngd", 0.01, 1.0), _gap("gd", 0.01, 1.0)
    assert gd_gap > 1e-3
    assert ngd_gap < 1e-2 * gd_gap
    halved = _gap("ngd", 0.02, 1.0)
    assert 1.5 < halved / ngd_gap < 2.5
