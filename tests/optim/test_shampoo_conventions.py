"""Shampoo under torch.optim usage: in-place zero_grad, complex grads, copies, edited options."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from scipy.linalg import fractional_matrix_power
from torch import nn

from natgrad.optim import Shampoo

pytestmark = pytest.mark.usefixtures("float64_default")


def _train_without_set_to_none(model: nn.Module, optimizer, inputs, targets, steps: int) -> None:
    """Gradients zeroed in place (the buffers are reused), as with gradient accumulation."""
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def test_momentum_survives_in_place_zero_grad_and_equals_sgd() -> None:
    """Before preconditioning, Shampoo with momentum is torch.optim.SGD with momentum, also when
    ``zero_grad(set_to_none=False)`` zeroes the gradient tensors in place between steps."""
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    twin = copy.deepcopy(model)
    shampoo = Shampoo(model.parameters(), lr=0.1, momentum=0.9, start_preconditioning_step=100)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    _train_without_set_to_none(model, shampoo, inputs, targets, steps=4)
    _train_without_set_to_none(twin, sgd, inputs, targets, steps=4)
    for param, expected in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(param, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            shampoo.state[param]["momentum_buffer"], sgd.state[expected]["momentum_buffer"]
        )


@pytest.mark.parametrize("max_preconditioner_dim", [1024, 1])  # full and diagonal modes
def test_complex_gradients_are_refused_by_name(max_preconditioner_dim: int) -> None:
    """G_(i) G_(i)ᵀ would need a conjugate: Shampoo refuses complex gradients, before any state."""
    param = nn.Parameter(torch.ones(2, 3, dtype=torch.complex128))
    optimizer = Shampoo([param], max_preconditioner_dim=max_preconditioner_dim)
    param.grad = torch.full((2, 3), 1 + 1j, dtype=torch.complex128)
    with pytest.raises(TypeError, match=r"Shampoo supports real .* got dtype torch\.complex128"):
        optimizer.step()
    assert torch.equal(param.detach(), torch.ones(2, 3, dtype=torch.complex128))
    assert len(optimizer.state[param]) == 0


def test_deepcopy_and_pickle_keep_a_working_optimizer() -> None:
    """A copied optimizer (``copy.deepcopy``, ``pickle``) keeps its refused-step counter and
    can refuse."""
    param = nn.Parameter(torch.ones(2, 3))
    optimizer = Shampoo([param], lr=0.1)
    param.grad = torch.full((2, 3), float("nan"))
    with pytest.warns(RuntimeWarning, match="not finite"):
        optimizer.step()
    for copied in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert copied.counters["refused_steps"] == 1
        copied_param = copied.param_groups[0]["params"][0]
        copied_param.grad = torch.full((2, 3), float("inf"))
        with pytest.warns(RuntimeWarning, match="not finite"):
            copied.step()
        assert copied.counters["refused_steps"] == 2
        assert torch.equal(copied_param.detach(), torch.ones(2, 3))


def test_start_moved_earlier_mid_run_computes_the_missing_preconditioners() -> None:
    """Editing ``start_preconditioning_step`` in a param group (as schedulers edit ``lr``) after
    step 2 makes step 3 a preconditioned step between two refreshes: it computes the roots of
    the current statistics, ``L^{-1/4} G R^{-1/4}`` by SciPy, instead of failing."""
    generator = torch.Generator().manual_seed(2)
    grads = [torch.randn(3, 2, generator=generator) for _ in range(3)]
    param = nn.Parameter(torch.zeros(3, 2))
    optimizer = Shampoo([param], lr=1.0, epsilon=1e-3, start_preconditioning_step=10, update_freq=4)
    for grad in grads[:2]:
        param.grad = grad.clone()
        optimizer.step()
    optimizer.param_groups[0]["start_preconditioning_step"] = 2
    before = param.detach().numpy().copy()
    param.grad = grads[2].clone()
    optimizer.step()
    stacked = [g.numpy() for g in grads]
    left = sum(g @ g.T for g in stacked) + 1e-3 * np.eye(3)
    right = sum(g.T @ g for g in stacked) + 1e-3 * np.eye(2)
    step = fractional_matrix_power(left, -0.25) @ stacked[2] @ fractional_matrix_power(right, -0.25)
    np.testing.assert_allclose(param.detach().numpy(), before - np.real(step), rtol=1e-9)
