"""AdaHessian twins that must agree: parameter groups split differently, float32 vs float64,
one parameter vs the same coordinates in two parameters (Hutchinson's signs are drawn per
entry in parameter order from one generator, so all three see the same signs)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from natgrad.optim import AdaHessian

# AdaHessian's documented contract: backward(create_graph=True), then zero_grad() to break the
# reference cycle PyTorch warns about.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using backward\\(\\) with create_graph=True:UserWarning"
)


def _train(model: nn.Module, params, dtype: torch.dtype, steps: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(16, 3, generator=generator, dtype=torch.float64).to(dtype)
    targets = torch.randn(16, 1, generator=generator, dtype=torch.float64).to(dtype)
    optimizer = AdaHessian(
        params, lr=0.05, update_each=2, n_samples=2, generator=torch.Generator().manual_seed(1)
    )
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward(create_graph=True)
        optimizer.step()
    optimizer.zero_grad()
    return [param.detach().double() for param in model.parameters()]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def test_groups_split_differently_take_identical_steps() -> None:
    model, twin = _model(), _model()
    params = list(twin.parameters())
    expected = _train(model, model.parameters(), torch.float64)
    split = [{"params": params[:1]}, {"params": params[1:3]}, {"params": params[3:]}]
    for got, want in zip(_train(twin, split, torch.float64), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_float32_follows_float64() -> None:
    """Relative deviation 5e-6 of each tensor's scale (measured)."""
    model = _model()
    single = copy.deepcopy(model).float()
    expected = _train(model, model.parameters(), torch.float64)
    for got, want in zip(_train(single, single.parameters(), torch.float32), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))


def test_one_parameter_equals_its_coordinates_in_two_parameters() -> None:
    matrix = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    whole = nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    head, tail = (nn.Parameter(torch.tensor([v], dtype=torch.float64)) for v in (1.0, -1.0))
    for params, join in (([whole], lambda: whole), ([head, tail], lambda: torch.cat([head, tail]))):
        optimizer = AdaHessian(params, lr=0.1, generator=torch.Generator().manual_seed(0))
        for _ in range(5):
            optimizer.zero_grad()
            point = join()
            (0.5 * point @ matrix @ point).backward(create_graph=True)
            optimizer.step()
        optimizer.zero_grad()
    torch.testing.assert_close(torch.cat([head, tail]), whole, rtol=0, atol=0)
