"""K-FAC's Levenberg–Marquardt damping is left as it is where the reduction ratio is undefined:
at a zero gradient, or with a zero learning rate, the quadratic model predicts no change and
the loss does not change, so there is nothing to assess (it used to rise every assessment)."""

import pytest
import torch
from torch import nn

from natgrad.optim import EKFAC, KFAC


def fitted_problem(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear model and targets equal to its outputs: the squared error and its gradient
    are exactly zero."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(dtype)
    inputs = torch.randn(8, 3, dtype=dtype)
    with torch.no_grad():
        targets = model(inputs)
    return model, inputs, targets


def assessed_step(model, precond, optimizer, inputs, targets) -> dict:
    """One step of the squared error, assessed by ``update_damping``; its record."""
    optimizer.zero_grad()
    loss = (model(inputs) - targets).square().mean()
    loss.backward()
    precond.step()
    optimizer.step()
    with torch.no_grad():
        precond.update_damping(loss, (model(inputs) - targets).square().mean())
    return precond.last_damping_update


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["zero gradient", "zero learning rate"])
def test_damping_is_unchanged_where_the_model_predicts_no_change(
    case: str, dtype: torch.dtype, preconditioner
) -> None:
    model, inputs, targets = fitted_problem(dtype)
    if case == "zero learning rate":
        targets = targets + 1.0
    lr = 0.0 if case == "zero learning rate" else 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    precond = preconditioner(
        model, damping=1e-3, adaptive_damping=True, damping_adaptation_interval=1
    )
    for _ in range(10):
        update = assessed_step(model, precond, optimizer, inputs, targets)
        assert update["predicted"] == 0.0
        assert update["actual"] == 0.0
        assert update["ratio"] != update["ratio"]
    assert precond.damping == 1e-3


def test_a_measured_decrease_still_adapts_the_damping() -> None:
    """Away from those cases the rule is unchanged: a good step on a quadratic lowers ``λ``."""
    model, inputs, targets = fitted_problem(torch.float64)
    targets = targets + torch.randn(targets.shape, dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    precond = KFAC(model, damping=1e-3, adaptive_damping=True, damping_adaptation_interval=1)
    update = assessed_step(model, precond, optimizer, inputs, targets)
    assert update["predicted"] < 0
    assert update["ratio"] == pytest.approx(update["actual"] / update["predicted"])
    assert update["ratio"] > 0.75
    assert precond.damping < 1e-3
