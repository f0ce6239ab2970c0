"""Shampoo checks its param groups' options at every step, not only when they are added."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from natgrad.optim import Shampoo

pytestmark = pytest.mark.usefixtures("float64_default")

BAD_OPTIONS = [
    ("lr", -1.0),
    ("lr", math.nan),
    ("momentum", 1.0),
    ("beta2", 0.0),
    ("epsilon", math.nan),
    ("epsilon", 0.0),
    ("update_freq", 0),
    ("start_preconditioning_step", 0),
    ("max_preconditioner_dim", -1),
    ("weight_decay", -0.5),
    ("grafting", "lion"),
    ("grafting_betas", (0.9, 1.0)),
    ("grafting_eps", math.inf),
]


def _two_groups() -> tuple[nn.Module, Shampoo]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}]
    return model, Shampoo(groups, lr=0.1, momentum=0.5, grafting="adam")


def _backward(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)
    model.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()


def _snapshot(model: nn.Module, optimizer: Shampoo) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())


def _assert_unchanged(model: nn.Module, optimizer: Shampoo, snapshot) -> None:
    params, state = snapshot
    for param, before in zip(model.parameters(), params, strict=True):
        assert torch.equal(param, before)
    after = optimizer.state_dict()
    assert after["counters"] == state["counters"]
    assert after["state"].keys() == state["state"].keys()
    for index, param_state in state["state"].items():
        assert after["state"][index]["step"] == param_state["step"]


def _constructor_message(name: str, value: object) -> str:
    with pytest.raises((TypeError, ValueError)) as caught:
        Shampoo(nn.Linear(2, 2).parameters(), **{name: value})
    return str(caught.value)


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS, ids=[str(o) for o in BAD_OPTIONS])
@pytest.mark.parametrize("steps_before", [0, 2])
def test_an_edited_option_raises_at_step_naming_group_and_option(name, value, steps_before):
    """The constructor's error, prefixed with the group; parameters and state are untouched."""
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


@settings(max_examples=15, deadline=None)
@given(
    lr=st.one_of(
        st.floats(max_value=0.0, exclude_max=True, allow_nan=False),
        st.sampled_from([math.nan, math.inf]),
    )
)
def test_any_invalid_lr_set_by_hand_is_refused(lr: float) -> None:
    model, optimizer = _two_groups()
    _backward(model)
    optimizer.param_groups[0]["lr"] = lr
    snapshot = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr must be"):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)


def test_a_wrong_kind_raises_type_error_naming_the_group() -> None:
    model, optimizer = _two_groups()
    _backward(model)
    optimizer.param_groups[0]["update_freq"] = 1.5
    with pytest.raises(TypeError, match=r"param_groups\[0\]: update_freq"):
        optimizer.step()


def test_a_scheduler_edit_steps_as_the_same_edit_by_hand() -> None:
    """Valid edits pass: ``StepLR`` halving the lr gives the run of a twin halved by hand."""
    model, optimizer = _two_groups()
    twin_model, twin = _two_groups()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        for net, opt in ((model, optimizer), (twin_model, twin)):
            _backward(net)
            opt.step()
        scheduler.step()
        for group in twin.param_groups:
            group["lr"] = group["lr"] / 2
        assert [g["lr"] for g in twin.param_groups] == [g["lr"] for g in optimizer.param_groups]
    for param, expected in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(param, expected)


def test_a_zero_lr_set_by_hand_is_valid_and_leaves_the_parameters() -> None:
    model, optimizer = _two_groups()
    _backward(model)
    for group in optimizer.param_groups:
        group["lr"] = 0
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    for param, expected in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, expected)
