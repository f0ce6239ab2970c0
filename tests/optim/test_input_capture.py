"""InputCapture, the forward pre-hook through which NaturalGradient and
QuadraticModelOptimizer see the batch that their closure ran the model on."""

import copy
import gc

import pytest
import torch
from torch import nn

from natgrad.optim import NaturalGradient, QuadraticModelOptimizer
from natgrad.optim.input_capture import InputCapture


def same(captured: torch.Tensor | None, inputs: torch.Tensor) -> bool:
    """``captured`` is ``inputs`` detached: the same memory, no gradient."""
    return (
        captured is not None
        and not captured.requires_grad
        and captured.data_ptr() == inputs.data_ptr()
        and torch.equal(captured, inputs.detach())
    )


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_keeps_the_latest_inputs_detached_and_stops_when_removed() -> None:
    net = model()
    capture = InputCapture(net)
    first, second = torch.randn(5, 3, requires_grad=True), torch.randn(7, 3)
    net(first)
    assert same(capture.inputs, first)
    net(second)
    assert same(capture.inputs, second)
    capture.remove()
    net(first)
    assert same(capture.inputs, second)


def test_only_with_grad_ignores_passes_without_gradients() -> None:
    net = model()
    capture = InputCapture(net, only_with_grad=True)
    inputs = torch.randn(5, 3)
    with torch.no_grad():
        net(inputs)
    assert capture.inputs is None
    net(inputs)
    assert same(capture.inputs, inputs)


def _natural_gradient(net: nn.Module):
    return NaturalGradient(net, "categorical", lr=0.1)


def _quadratic_model(net: nn.Module):
    return QuadraticModelOptimizer(net, "categorical")


@pytest.mark.parametrize("build", [_natural_gradient, _quadratic_model])
def test_a_deep_copy_of_the_model_neither_records_nor_copies_the_optimizer(build) -> None:
    """``copy.deepcopy`` copies forward hooks: the copy's passes must not be captured, and the
    copy must not carry a deep copy of the optimizer (as a bound-method hook would)."""
    net = model()
    optimizer = build(net)
    optimizer_type = type(optimizer)
    gc.collect()
    before = sum(type(obj) is optimizer_type for obj in gc.get_objects())
    copied = copy.deepcopy(net)
    gc.collect()
    assert sum(type(obj) is optimizer_type for obj in gc.get_objects()) == before
    inputs = torch.randn(6, 3)
    net(inputs)
    copied(torch.randn(9, 3))
    assert same(optimizer._capture.inputs, inputs)


@pytest.mark.parametrize("build", [_natural_gradient, _quadratic_model])
def test_a_closure_that_skips_the_model_is_refused_after_a_regular_step(build) -> None:
    """The previous step's inputs must not stand in for a batch the closure never ran."""
    net = model()
    optimizer = build(net)
    inputs, labels = torch.randn(8, 3), torch.tensor([0, 1] * 4)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(inputs), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="did not run the model"):
        optimizer.step(lambda: torch.tensor(1.0))
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))


def test_run_returns_the_closure_loss_with_gradients_enabled() -> None:
    net = model()
    capture = InputCapture(net, only_with_grad=True)
    inputs = torch.randn(4, 3)
    with torch.no_grad():
        loss = capture.run(lambda: net(inputs).sum())
    assert loss.requires_grad
    assert same(capture.inputs, inputs)
