"""Shampoo's fused per-step kernels against NumPy oracles, and its one-synchronisation checks.

The statistics are accumulated with one ``addmm`` on the mode unfolding, the mode products are
matrix products on the unfolding, grafting rescales without a host synchronisation and the
finiteness of all gradients, statistics and directions is decided at once (``all_finite``).
Each is compared with a float64 NumPy reference; a step refused by the joint check leaves
every parameter and all state as they were.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from natgrad.optim import Shampoo
from natgrad.optim.shampoo import (
    accumulate_mode_statistics,
    graft,
    precondition_mode,
    unfold,
)

pytestmark = pytest.mark.usefixtures("float64_default")

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def _numpy_unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    mode_seed=st.integers(0, 10**6),
    beta2=st.sampled_from([1.0, 0.9]),
    diagonal=st.booleans(),
    first=st.booleans(),
)
def test_accumulated_statistics_match_numpy(shape, mode_seed, beta2, diagonal, first) -> None:
    rng = np.random.default_rng(mode_seed)
    mode = mode_seed % len(shape)
    grad = rng.standard_normal(shape)
    gram = _numpy_unfold(grad, mode) @ _numpy_unfold(grad, mode).T
    update = np.diag(gram).copy() if diagonal else gram
    previous = None if first else np.abs(rng.standard_normal(update.shape)) + update
    weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
    expected = weight * update if first else beta2 * previous + weight * update
    before = None if first else torch.tensor(previous)
    result = accumulate_mode_statistics(before, torch.tensor(grad), mode, beta2, diagonal)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12, atol=1e-12)
    if before is not None:
        np.testing.assert_array_equal(before.numpy(), previous)  # read, never modified


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10**6), diagonal=st.booleans())
def test_mode_product_matches_numpy(shape, seed, diagonal) -> None:
    rng = np.random.default_rng(seed)
    mode = seed % len(shape)
    tensor = rng.standard_normal(shape)
    size = shape[mode]
    if diagonal:
        preconditioner = rng.random(size) + 0.1
        matrix = np.diag(preconditioner)
    else:
        half = rng.standard_normal((size, size))
        preconditioner = matrix = half + half.T
    moved = np.moveaxis(tensor, mode, 0)
    expected = np.moveaxis((matrix @ moved.reshape(size, -1)).reshape(moved.shape), 0, mode)
    result = precondition_mode(torch.tensor(tensor), torch.tensor(preconditioner), mode)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(
        unfold(torch.tensor(tensor), mode).numpy(), _numpy_unfold(tensor, mode)
    )


def test_graft_rescales_to_the_grafted_norm_and_keeps_zero_and_nan() -> None:
    direction, grafted = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 10.0])
    torch.testing.assert_close(graft(direction, grafted), torch.tensor([6.0, 8.0]))
    assert torch.equal(graft(torch.zeros(3), torch.ones(3)), torch.zeros(3))
    assert torch.isnan(graft(torch.tensor([1.0, float("nan")]), torch.ones(2))).any()


def _two_layer_optimizer() -> tuple[list[nn.Parameter], Shampoo]:
    params = [nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(2, 2))]
    optimizer = Shampoo(params, lr=0.1, momentum=0.9, grafting="adagrad")
    for param in params:
        param.grad = torch.full_like(param, 0.5)
    optimizer.step()
    return params, optimizer


@pytest.mark.parametrize(
    ("bad_gradient", "match"),
    [(float("nan"), "a gradient is not finite"), (1e200, "statistics overflow")],
)
def test_one_bad_parameter_refuses_the_step_for_all(bad_gradient: float, match: str) -> None:
    """The second parameter's gradient (or statistics) is bad: the first, good one, whose
    update is computed before the joint check, must not move either."""
    params, optimizer = _two_layer_optimizer()
    before = [param.detach().clone() for param in params]
    state_before = copy.deepcopy(optimizer.state_dict())
    params[0].grad = torch.full((3, 2), 0.25)
    params[1].grad = torch.full((2, 2), bad_gradient)
    with pytest.warns(RuntimeWarning, match=match):
        optimizer.step()
    for param, expected in zip(params, before, strict=True):
        assert torch.equal(param.detach(), expected)
    state = optimizer.state_dict()["state"]
    for index in (0, 1):
        assert state[index]["step"] == state_before["state"][index]["step"] == 1
        for now, then in zip(
            state[index]["statistics"], state_before["state"][index]["statistics"], strict=True
        ):
            assert torch.equal(now, then)
