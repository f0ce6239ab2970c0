"""Shampoo's preconditioned structure: size-1 modes are dropped (a ``(1, n)`` parameter steps as an
``(n,)`` one, as in the reference ``merge_small_dims``), and options that shape the state
(``max_preconditioner_dim``, ``grafting``) cannot be changed mid-run without a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import fractional_matrix_power
from torch import nn

from natgrad.optim import Shampoo
from natgrad.optim.shampoo import preconditioned_shape

pytestmark = pytest.mark.usefixtures("float64_default")


def _run(shape: tuple[int, ...], grads: list[torch.Tensor], **options) -> list[torch.Tensor]:
    """Parameters after each step, from zeros, with ``grads`` reshaped to ``shape``."""
    param = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    optimizer = Shampoo([param], **options)
    trajectory = []
    for grad in grads:
        param.grad = grad.reshape(shape).clone()
        optimizer.step()
        trajectory.append(param.detach().flatten().clone())
    return trajectory


def _with_ones(draw, sizes: list[int]) -> tuple[int, ...]:
    """``sizes`` with size-1 modes inserted at drawn places."""
    shape = list(sizes)
    for _ in range(draw(st.integers(1, 3))):
        shape.insert(draw(st.integers(0, len(shape))), 1)
    return tuple(shape)


@st.composite
def _twin_shapes(draw) -> tuple[tuple[int, ...], tuple[int, ...]]:
    sizes = draw(st.lists(st.integers(2, 4), min_size=0, max_size=3))
    return _with_ones(draw, sizes), tuple(sizes)


@settings(max_examples=25, deadline=None)
@given(
    shapes=_twin_shapes(),
    options=st.sampled_from(
        [
            {},
            {"max_preconditioner_dim": 3},
            {"grafting": "adam", "momentum": 0.5},
            {"grafting": "adagrad", "update_freq": 2, "weight_decay": 0.1},
        ]
    ),
)
def test_size_one_modes_take_the_same_steps_as_the_squeezed_parameter(shapes, options) -> None:
    with_ones, squeezed = shapes
    generator = torch.Generator().manual_seed(len(with_ones))
    grads = [torch.randn(squeezed, generator=generator) for _ in range(4)]
    expected = _run(squeezed, grads, lr=0.1, epsilon=1e-3, **options)
    got = _run(with_ones, grads, lr=0.1, epsilon=1e-3, **options)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=0, atol=0)


def test_a_row_vector_is_full_matrix_adagrad_and_an_n11m_tensor_a_matrix() -> None:
    """SciPy oracles: ``(1, n)`` steps by ``(Σ g gᵀ + εI)^{-1/2} g`` and ``(n, 1, 1, m)`` by
    ``L^{-1/4} G R^{-1/4}``, the exponents of a vector and a matrix."""
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(5) for _ in range(3)]
    row = _run((1, 5), [torch.from_numpy(g) for g in grads], lr=1.0, epsilon=1e-3)
    gram = sum(np.outer(g, g) for g in grads) + 1e-3 * np.eye(5)
    step = np.real(fractional_matrix_power(gram, -0.5)) @ grads[2]
    np.testing.assert_allclose((row[1] - row[2]).numpy(), step, rtol=1e-9)

    grads = [rng.standard_normal((3, 4)) for _ in range(2)]
    tensor = _run((3, 1, 1, 4), [torch.from_numpy(g) for g in grads], lr=1.0, epsilon=1e-3)
    left = sum(g @ g.T for g in grads) + 1e-3 * np.eye(3)
    right = sum(g.T @ g for g in grads) + 1e-3 * np.eye(4)
    step = fractional_matrix_power(left, -0.25) @ grads[1] @ fractional_matrix_power(right, -0.25)
    np.testing.assert_allclose((tensor[0] - tensor[1]).numpy(), np.real(step).ravel(), rtol=1e-9)


def test_preconditioned_shape() -> None:
    assert preconditioned_shape((1, 7)) == (7,)
    assert preconditioned_shape((4, 1, 1, 6)) == (4, 6)
    assert preconditioned_shape(()) == preconditioned_shape((1, 1)) == (1,)


def _two_steps(options: dict, changed: dict) -> tuple[nn.Parameter, Shampoo]:
    param = nn.Parameter(torch.ones(3, 4))
    optimizer = Shampoo([param], lr=0.1, **options)
    param.grad = torch.arange(12.0).reshape(3, 4)
    optimizer.step()
    optimizer.param_groups[0].update(changed)
    return param, optimizer


@pytest.mark.parametrize(
    ("options", "changed", "match"),
    [
        ({}, {"max_preconditioner_dim": 3}, r"max_preconditioner_dim=3 needs \[\(3, 3\), \(4,\)\]"),
        ({"max_preconditioner_dim": 3}, {"max_preconditioner_dim": 8}, "max_preconditioner_dim=8"),
        ({"grafting": "adam"}, {"grafting": "adagrad"}, "grafting='adagrad' needs"),
        ({}, {"grafting": "adam"}, "grafting='adam' needs"),
    ],
)
def test_changing_a_structural_option_mid_run_is_refused(options, changed, match) -> None:
    """Without the check a full (3, 3) statistic silently absorbed a diagonal one by
    broadcasting, and Adam grafting started with bias corrections of step 2 on zero moments."""
    param, optimizer = _two_steps(options, changed)
    before = param.detach().clone()
    param.grad = torch.ones(3, 4)
    with pytest.raises(ValueError, match=match):
        optimizer.step()
    assert torch.equal(param.detach(), before)
    assert optimizer.state[param]["step"] == 1
    optimizer.state.clear()
    optimizer.step()
    assert optimizer.state[param]["step"] == 1


def test_schedulable_options_may_still_change_mid_run() -> None:
    param, optimizer = _two_steps({"grafting": None}, {"grafting": "sgd", "lr": 0.01})
    param.grad = torch.ones(3, 4)
    optimizer.step()
    assert optimizer.state[param]["step"] == 2
