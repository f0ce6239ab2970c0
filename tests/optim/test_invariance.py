"""Parameterization invariance of natural gradient descent (NaturalGradient, exact dense Fisher).

Oracles: the closed-form logistic-regression Fisher ``Xᵀ diag(p(1 − p)) X / N`` in NumPy and its
transformation rule ``F_v = Aᵀ F_w A`` under ``w = A v``; the closed-form Gaussian Fisher in
``(μ, σ)`` (``diag(1/σ², 2/σ²)``) and ``(μ, log σ)`` (``diag(1/σ², 2)``); plain gradient descent
as the non-invariant contrast.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import natgrad
from natgrad.curvature import Likelihood
from natgrad.expfam import Gaussian
from natgrad.optim import NaturalGradient

pytestmark = pytest.mark.usefixtures("float64_default")


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


class NaturalGaussianLikelihood(Likelihood):
    """``x ~ N(μ, σ²)`` with model outputs ``(N, 2)`` = natural parameters ``(μ/σ², −1/(2σ²))``."""

    name = "natural-gaussian"

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        variance = -0.5 / outputs[:, 1]
        mean = outputs[:, 0] * variance
        return 0.5 * (targets - mean).square() / variance + 0.5 * torch.log(2 * math.pi * variance)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        variance = -0.5 / outputs[:, 1].detach()
        noise = torch.randn(variance.shape, generator=generator, dtype=variance.dtype)
        return outputs[:, 0].detach() * variance + variance.sqrt() * noise

    def natural_hessian_sqrt(self, outputs: Tensor) -> Tensor:
        theta = outputs.detach()
        fisher = Gaussian.from_natural(theta[:, 0], theta[:, 1], validate=False).fisher()
        return torch.linalg.cholesky(fisher)


class GaussianFit(nn.Module):
    """``N(μ, σ²)`` with ``σ`` stored as itself or as ``log σ``; outputs natural parameters."""

    def __init__(self, mean: float, scale: float, log_scale: bool) -> None:
        super().__init__()
        self.log_scale = log_scale
        self.mean = nn.Parameter(torch.tensor(mean))
        self.scale_param = nn.Parameter(torch.tensor(math.log(scale) if log_scale else scale))

    def scale(self) -> Tensor:
        return self.scale_param.exp() if self.log_scale else self.scale_param

    def forward(self, inputs: Tensor) -> Tensor:
        variance = self.scale().square()
        natural = torch.stack([self.mean / variance, -0.5 / variance])
        return inputs.new_ones(inputs.shape[0], 1) * natural


def _gaussian_run(log_scale: bool, method: str, lr: float, steps: int, data: Tensor) -> Tensor:
    """``(μ, σ)`` after each step, shape ``(steps, 2)``."""
    model = GaussianFit(0.0, 1.0, log_scale)
    likelihood = NaturalGaussianLikelihood()
    inputs = torch.zeros(len(data), 1)
    if method == "ngd":
        optimizer = NaturalGradient(model, likelihood, lr=lr, damping=0.0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = likelihood.nll(model(inputs), data).mean()
        loss.backward()
        return loss

    path = []
    for _ in range(steps):
        optimizer.step(closure)
        path.append(torch.stack([model.mean, model.scale()]).detach())
    return torch.stack(path)


def _gaussian_data() -> Tensor:
    return 2.0 + 0.5 * torch.randn(100, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("log_scale", [False, True])
def test_gaussian_ngd_step_matches_closed_form_fisher_in_each_parameterization(log_scale):
    data, lr = _gaussian_data(), 0.3
    mean, scale = 0.0, 1.0
    sample_mean, second_moment = float(data.mean()), float((data - mean).square().mean())
    expected_mean = mean + lr * (sample_mean - mean)  # F_μμ = 1/σ²
    if log_scale:  # F_ss = 2, ∂L/∂s = 1 − m₂/σ²
        expected_scale = math.exp(math.log(scale) - lr * 0.5 * (1 - second_moment / scale**2))
    else:  # F_σσ = 2/σ², ∂L/∂σ = 1/σ − m₂/σ³
        expected_scale = scale - lr * 0.5 * scale**2 * (1 / scale - second_moment / scale**3)
    (step,) = _gaussian_run(log_scale, "ngd", lr, 1, data)
    torch.testing.assert_close(step, torch.tensor([expected_mean, expected_scale]))


def test_gaussian_ngd_gap_between_sigma_and_log_sigma_is_orders_below_gd():
    data = _gaussian_data()
    gaps = {}
    for method in ("ngd", "gd"):
        plain = _gaussian_run(False, method, 0.005, 200, data)
        logged = _gaussian_run(True, method, 0.005, 200, data)
        gaps[method] = float((plain - logged).abs().max())
    assert gaps["gd"] > 1e-2
    assert gaps["ngd"] < 1e-2 * gaps["gd"]
