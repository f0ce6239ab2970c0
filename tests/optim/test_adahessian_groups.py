"""AdaHessian checks its param groups' options at every step, not only when they are added."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from natgrad.optim import AdaHessian

pytestmark = [
    pytest.mark.usefixtures("float64_default"),
    # AdaHessian's closure calls backward(create_graph=True), as its contract says
    pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning"),
]

BAD_OPTIONS = [
    ("lr", -1.0),
    ("lr", math.inf),
    ("eps", math.nan),
    ("eps", 0.0),
    ("weight_decay", -0.1),
    ("hessian_power", 1.5),
    ("betas", (0.9, 1.5)),
    ("betas", (math.nan, 0.999)),
]


def _two_groups() -> tuple[nn.Module, AdaHessian]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}]
    generator = torch.Generator().manual_seed(2)
    return model, AdaHessian(groups, lr=0.1, weight_decay=0.01, generator=generator)


def _backward(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)
    model.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward(create_graph=True)


def _snapshot(model: nn.Module, optimizer: AdaHessian) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())


def _assert_unchanged(model: nn.Module, optimizer: AdaHessian, snapshot) -> None:
    """Parameters, per-parameter state, counters and the generator's state are as before."""
    params, state = snapshot
    for param, before in zip(model.parameters(), params, strict=True):
        assert torch.equal(param, before)
    after = optimizer.state_dict()
    assert after["counters"] == state["counters"]
    assert torch.equal(after["generator_state"], state["generator_state"])
    assert after["state"].keys() == state["state"].keys()
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            assert torch.equal(torch.as_tensor(after["state"][index][key]), torch.as_tensor(value))


def _constructor_message(name: str, value: object) -> str:
    with pytest.raises((TypeError, ValueError)) as caught:
        AdaHessian(nn.Linear(2, 2).parameters(), **{name: value})
    return str(caught.value)


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS, ids=[str(o) for o in BAD_OPTIONS])
@pytest.mark.parametrize("steps_before", [0, 2])
def test_an_edited_option_raises_at_step_naming_group_and_option(name, value, steps_before):
    """The constructor's error, prefixed with the group; nothing changes (an ``eps = nan`` set
    by hand used to turn every parameter of its group into NaN, silently)."""
    model, optimizer = _two_groups()
    for _ in range(steps_before):
        _backward(model)
        optimizer.step()
    _backward(model)
    optimizer.param_groups[1][name] = value
    snapshot = _snapshot(model, optimizer)
    with pytest.raises(ValueError) as caught:
        optimizer.step()
    assert str(caught.value) == f"param_groups[1]: {_constructor_message(name, value)}"
    _assert_unchanged(model, optimizer, snapshot)
    model.zero_grad()


@settings(max_examples=15, deadline=None)
@given(eps=st.one_of(st.floats(max_value=0.0, allow_nan=False), st.just(math.nan)))
def test_any_invalid_eps_set_by_hand_is_refused(eps: float) -> None:
    model, optimizer = _two_groups()
    _backward(model)
    optimizer.param_groups[0]["eps"] = eps
    snapshot = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: eps must be"):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)
    model.zero_grad()


def test_a_scheduler_edit_steps_as_the_same_edit_by_hand() -> None:
    """Valid edits pass: ``StepLR`` halving the lr gives the run of a twin halved by hand."""
    model, optimizer = _two_groups()
    twin_model, twin = _two_groups()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        for net, opt in ((model, optimizer), (twin_model, twin)):
            _backward(net)
            opt.step()
            net.zero_grad()
        scheduler.step()
        for group in twin.param_groups:
            group["lr"] = group["lr"] / 2
    for param, expected in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(param, expected)
