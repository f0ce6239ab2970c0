"""``factor_decay`` as a schedule ``callable(step) -> float``: each factor update folds with the
schedule's value at its step."""

import io

import pytest
import torch
from torch import nn

from natgrad.optim import EKFAC, KFAC

DTYPE = torch.float64
DECAYS = [0.0, 0.5, 0.9, 0.2, 0.7]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(6, 3, generator=generator, dtype=DTYPE),
            torch.randint(0, 3, (6,), generator=generator),
        )
        for _ in range(count)
    ]


def backward(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()


def batch_factors(model: nn.Module, data) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per batch, each layer's ``(A, G)`` of that batch alone (``factor_decay=0``), at fixed
    parameters."""
    precond = KFAC(model, factor_decay=0.0, damping=0.1)
    found = []
    for inputs, targets in data:
        backward(model, inputs, targets)
        precond.step()
        found.append([(s.input_factor.clone(), s.output_factor.clone()) for s in precond.layers])
    precond.remove()
    return found


def test_each_update_folds_with_the_schedules_value_at_its_step() -> None:
    """Factors after every step equal the moving average of the batches' own factors folded by
    hand with ``DECAYS[step]`` (parameters fixed: no optimizer step)."""
    model, data = mlp(), batches(len(DECAYS))
    expected = batch_factors(model, data)
    seen = []
    precond = KFAC(model, factor_decay=lambda step: seen.append(step) or DECAYS[step], damping=0.1)
    averages = expected[0]  # the first update takes its batch alone
    for step, (inputs, targets) in enumerate(data):
        backward(model, inputs, targets)
        precond.step()
        if step:
            decay = DECAYS[step]
            averages = [
                (decay * a + (1 - decay) * new_a, decay * g + (1 - decay) * new_g)
                for (a, g), (new_a, new_g) in zip(averages, expected[step], strict=True)
            ]
        for state, (input_factor, output_factor) in zip(precond.layers, averages, strict=True):
            torch.testing.assert_close(state.input_factor, input_factor, rtol=1e-13, atol=0)
            torch.testing.assert_close(state.output_factor, output_factor, rtol=1e-13, atol=0)
    assert seen == list(range(len(DECAYS)))


@pytest.mark.parametrize("preconditioner", [KFAC, EKFAC])
def test_a_constant_schedule_trains_exactly_as_the_float(preconditioner) -> None:
    """``lambda step: 0.7`` and ``0.7``: the same parameters, bit for bit, after 12 SGD steps
    (EKFAC's eigenvalue average included)."""
    results = []
    for decay in (0.7, lambda step: 0.7):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        precond = preconditioner(model, factor_decay=decay, inv_update_interval=3, damping=0.1)
        for inputs, targets in batches(12):
            backward(model, inputs, targets)
            precond.step()
            optimizer.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(*results)


def schedule(step: int) -> float:
    return 0.2 if step < 5 else 0.9


def test_a_scheduled_run_resumes_identically_from_its_state() -> None:
    """The schedule reads the step count, which the state round-trips: 5 steps, save, load
    into a fresh preconditioner and model, 7 more equal 12 steps straight."""
    data = batches(12)

    def train(model, precond, optimizer, part) -> None:
        for inputs, targets in part:
            backward(model, inputs, targets)
            precond.step()
            optimizer.step()

    def fresh():
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        return model, KFAC(model, factor_decay=schedule, damping=0.1), optimizer

    straight = fresh()
    train(*straight, data)
    first = fresh()
    train(*first, data[:5])
    buffer = io.BytesIO()
    torch.save([part.state_dict() for part in first], buffer)
    buffer.seek(0)
    resumed = fresh()
    for part, state in zip(resumed, torch.load(buffer), strict=True):
        part.load_state_dict(state)
    train(*resumed, data[5:])
    for a, b in zip(straight[0].parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan")])
def test_a_schedule_value_outside_the_unit_interval_is_refused(value: float) -> None:
    model = mlp()
    precond = KFAC(model, factor_decay=lambda step: value, damping=0.1)
    backward(model, *batches(1)[0])
    with pytest.raises(ValueError, match="factor_decay at step 0"):
        precond.step()


def test_a_float_outside_the_unit_interval_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="factor_decay"):
        KFAC(mlp(), factor_decay=1.5)
