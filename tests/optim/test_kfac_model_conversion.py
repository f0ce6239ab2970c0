"""A model converted after its preconditioner is built (``model.double()``; ``model.to(device)``
takes the same path) keeps being preconditioned in the parameters' precision: the statistics
follow the weights as ``load_state_dict`` moves a saved state. They stayed in the dtype of the
build (float32 curvature for a float64 model), and on another device they would have failed."""

import pytest
import torch
from torch import nn

from natgrad.optim import EKFAC, KFAC

CONFIGURATIONS = [(KFAC, "eigen"), (KFAC, "factored"), (EKFAC, "eigen")]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _train(model: nn.Module, precond: KFAC, steps: int, start: int = 0) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dtype = next(model.parameters()).dtype
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(16, 4, generator=generator, dtype=torch.float64).to(dtype)
        targets = torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        precond.step()
        optimizer.step()


def _build(preconditioner, model: nn.Module, damping_mode: str) -> KFAC:
    return preconditioner(model, damping=0.1, damping_mode=damping_mode, inv_update_interval=2)


@pytest.mark.parametrize(("preconditioner", "damping_mode"), CONFIGURATIONS)
def test_converted_right_after_building_equals_building_after_converting(
    preconditioner, damping_mode: str
) -> None:
    converted_late = _model()
    precond = _build(preconditioner, converted_late, damping_mode)
    converted_late.double()
    converted_first = _model().double()
    reference = _build(preconditioner, converted_first, damping_mode)
    _train(converted_late, precond, steps=4)
    _train(converted_first, reference, steps=4)
    assert precond.layers[0].input_factor.dtype == torch.float64
    for ours, theirs in zip(converted_late.parameters(), converted_first.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize(("preconditioner", "damping_mode"), CONFIGURATIONS)
def test_converted_mid_training_equals_a_state_loaded_into_a_new_preconditioner(
    preconditioner, damping_mode: str
) -> None:
    """Two float32 steps, then float64: the same as saving the preconditioner's state and
    loading it into one built on the converted model (the documented route)."""
    models, preconds = [], []
    for reload in (False, True):
        model = _model()
        precond = _build(preconditioner, model, damping_mode)
        _train(model, precond, steps=3)
        model.double()
        if reload:
            state = precond.state_dict()
            precond = _build(preconditioner, model, damping_mode)
            precond.load_state_dict(state)
        _train(model, precond, steps=3, start=3)
        models.append(model)
        preconds.append(precond)
    for ours, theirs in zip(preconds[0].layers, preconds[1].layers, strict=True):
        assert ours.output_factor.dtype == torch.float64
        torch.testing.assert_close(ours.output_factor, theirs.output_factor, rtol=0, atol=0)
    for ours, theirs in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
