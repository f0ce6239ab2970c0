"""Shampoo twins that must agree: a float32 run follows the float64 run up to rounding (the
eigenvalue floor of the roots is the rounding level of the statistics, not ``√ε_dtype``)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.linalg import fractional_matrix_power
from torch import nn

from natgrad.optim import Shampoo
from natgrad.optim.shampoo import mode_preconditioner


def test_float32_root_keeps_a_small_true_eigenvalue() -> None:
    """``S ≈ Q diag(1, 1e-5) Qᵀ`` stored in float32: the inverse square root of that float32
    matrix (SciPy, float64) weighs the small direction by ≈ 316. A floor at
    ``√ε₃₂ · λ_max = 3.5e-4`` made it 54, six times too small."""
    rotation = np.array([[0.6, -0.8], [0.8, 0.6]])
    statistics = torch.tensor(rotation @ np.diag([1.0, 1e-5]) @ rotation.T, dtype=torch.float32)
    root = mode_preconditioner(statistics, 1, 1e-8)
    exact = statistics.double().numpy() + 1e-8 * np.eye(2)
    expected = np.real(fractional_matrix_power(exact, -0.5))
    np.testing.assert_allclose(root.numpy(), expected, rtol=1e-5)


def _train(model: nn.Module, dtype: torch.dtype, steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(16, 3, generator=generator, dtype=torch.float64).to(dtype)
    targets = torch.randn(16, 1, generator=generator, dtype=torch.float64).to(dtype)
    optimizer = Shampoo(
        model.parameters(), lr=0.05, momentum=0.5, update_freq=3, grafting="adagrad"
    )
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    return [param.detach().double() for param in model.parameters()]


def test_float32_model_follows_the_float64_model() -> None:
    """30 steps on a small MLP. The map from gradient to direction is ill-conditioned where the
    statistics are nearly singular (a rank-1 ``G Gᵀ`` against ``ε = 1e-6``), so float32 rounding
    grows to a deviation of 4e-3 of each tensor's scale (measured; seeds 1-3: 1e-3 to 2e-5). With
    the ``√ε₃₂`` floor, which damped the small eigen-directions of float32 statistics only, the
    deviation was 1.3 (seeds 1-3: 0.17 to 0.73)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Linear(2, 1)).double()
    single = _train(copy.deepcopy(model).float(), torch.float32, steps=30)
    reference = _train(model, torch.float64, steps=30)
    for got, expected in zip(single, reference, strict=True):
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * scale)
