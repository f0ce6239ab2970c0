"""The cheaper paths of a factored K-FAC step, against float64 oracles: a KL-clipped solution
scaled as it is copied into ``.grad`` (directly, through a transposed convolution's weight
layout, into gradients of another dtype), and the factors of the last refresh kept without a
copy while the running factors move on."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from natgrad.curvature.kfac_capture import matrix_as_weight, weight_as_matrix
from natgrad.optim import KFAC

DAMPING = 0.1


def pi_dampings(output_factor: torch.Tensor, input_factor: torch.Tensor) -> tuple[float, float]:
    """Martens & Grosse's π split of ``DAMPING``, in float64."""
    pi = math.sqrt(float(input_factor.diagonal().mean() / output_factor.diagonal().mean()))
    return math.sqrt(DAMPING) / pi, math.sqrt(DAMPING) * pi


def factored_solution(
    output_factor: torch.Tensor, input_factor: torch.Tensor, matrix: torch.Tensor
) -> torch.Tensor:
    """``(G + λ_G I)⁻¹ V (A + λ_A I)⁻¹`` by dense float64 solves."""
    output_factor, input_factor = output_factor.double(), input_factor.double()
    output_damping, input_damping = pi_dampings(output_factor, input_factor)
    eye_out = torch.eye(output_factor.shape[0], dtype=torch.float64)
    eye_in = torch.eye(input_factor.shape[0], dtype=torch.float64)
    left = torch.linalg.solve(output_factor + output_damping * eye_out, matrix.double())
    return torch.linalg.solve(input_factor + input_damping * eye_in, left.T).T


def grad_matrix(module: nn.Module) -> torch.Tensor:
    """``[∇W | ∇b]`` in the layer's matrix layout, float64."""
    matrix = weight_as_matrix(module, module.weight.grad).double()
    if module.bias is None:
        return matrix
    return torch.cat([matrix, module.bias.grad.double().unsqueeze(1)], dim=1)


def expected_gradients(
    precond: KFAC, raw: dict[str, torch.Tensor], lr: float, kl_clip: float
) -> tuple[dict[str, torch.Tensor], float]:
    """The clipped solutions ``ν (block + λ)⁻¹ V`` of every layer and ``ν``, from the layers'
    refreshed factors and their raw gradient matrices."""
    solutions = {
        state.name: factored_solution(*state.inverted_factors, raw[state.name])
        for state in precond.layers
    }
    quadratic = sum(float((raw[name] * solution).sum()) for name, solution in solutions.items())
    nu = min(1.0, math.sqrt(kl_clip / (lr**2 * abs(quadratic))))
    return {name: nu * solution for name, solution in solutions.items()}, nu


def step_and_compare(
    model: nn.Module,
    inputs: torch.Tensor,
    kl_clip: float,
    rtol: float,
    atol: float,
) -> float:
    """One factored, clipped K-FAC step on ``model``; its gradients against the oracle.
    Returns ``ν``."""
    lr = 0.5
    precond = KFAC(
        model,
        damping=DAMPING,
        damping_mode="factored",
        inv_update_interval=1,
        kl_clip=kl_clip,
        lr=lr,
    )
    model(inputs).square().sum().div(len(inputs)).backward()
    modules = dict(model.named_modules())
    raw = {state.name: grad_matrix(modules[state.name]) for state in precond.layers}
    precond.step()
    expected, nu = expected_gradients(precond, raw, lr, kl_clip)
    for name, solution in expected.items():
        module = modules[name]
        weight_part = solution[:, : module.weight.numel() // len(solution)]
        weight_expected = matrix_as_weight(module, weight_part)
        torch.testing.assert_close(
            module.weight.grad.double(), weight_expected, rtol=rtol, atol=atol
        )
        if module.bias is not None:
            torch.testing.assert_close(
                module.bias.grad.double(), solution[:, -1], rtol=rtol, atol=atol
            )
    assert precond.last_kl_scale == pytest.approx(nu, rel=1e-4)
    return nu


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 5)),
    bias=st.booleans(),
    binds=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_clipped_factored_linear_gradients_are_the_float64_ones(sizes, bias, binds, seed) -> None:
    """Linear layers (with or without bias): the gradient written is ``ν`` times the float64
    factored solution, whether the clip binds (``ν < 1``, scaled as copied) or not."""
    torch.manual_seed(seed)
    d_in, hidden, d_out = sizes
    model = nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, d_out))
    kl_clip = 1e-10 if binds else 1e10
    nu = step_and_compare(model, torch.randn(8, d_in), kl_clip, rtol=1e-4, atol=1e-7)
    assert (nu < 1) == binds


@pytest.mark.parametrize("binds", [True, False])
def test_clipped_transposed_convolution_is_scaled_through_its_weight_layout(binds) -> None:
    """A transposed convolution's solution goes back through its weight layout (no view of
    ``.grad`` takes it): still ``ν`` times the float64 solution."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.ConvTranspose1d(2, 3, kernel_size=2), nn.Tanh())
    kl_clip = 1e-10 if binds else 1e10
    nu = step_and_compare(model, torch.randn(8, 2, 5), kl_clip, rtol=1e-4, atol=1e-7)
    assert (nu < 1) == binds


def test_clipped_bfloat16_gradients_take_the_scaled_float32_solution() -> None:
    """bfloat16 parameters (float32 factors): the scaled solution is rounded into the bfloat16
    gradients, equal to the float64 one to bfloat16's precision."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    inputs = torch.randn(16, 4, dtype=torch.bfloat16)
    nu = step_and_compare(model, inputs, 1e-10, rtol=2e-2, atol=1e-6)
    assert nu < 1
    assert all(param.grad.dtype == torch.bfloat16 for param in model.parameters())


def test_refreshed_factors_are_kept_while_the_factors_move_on() -> None:
    """Factors folded every step, inverted every fourth: between refreshes the factors move on
    while ``inverted_factors`` stay those of the refresh (kept, not copied), and a damping
    changed between refreshes re-forms the inverses from them (the float64 solution)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    precond = KFAC(model, damping=1.0, damping_mode="factored", inv_update_interval=4)
    batches = [torch.randn(8, 3) for _ in range(3)]
    kept = None
    for inputs in batches:
        model.zero_grad()
        model(inputs).square().mean().backward()
        precond.step()
        if kept is None:
            kept = [
                tuple(factor.clone() for factor in state.inverted_factors)
                for state in precond.layers
            ]
    for state, (output_factor, input_factor) in zip(precond.layers, kept, strict=True):
        assert torch.equal(state.inverted_factors[0], output_factor)
        assert torch.equal(state.inverted_factors[1], input_factor)
        assert not torch.equal(state.input_factor, input_factor)
    precond.damping = DAMPING
    model.zero_grad()
    model(torch.randn(8, 3)).square().mean().backward()
    modules = dict(model.named_modules())
    raw = {state.name: grad_matrix(modules[state.name]) for state in precond.layers}
    precond.step()
    for state, factors in zip(precond.layers, kept, strict=True):
        module = modules[state.name]
        expected = factored_solution(*factors, raw[state.name])
        torch.testing.assert_close(
            module.weight.grad.double(), expected[:, :-1], rtol=1e-4, atol=1e-7
        )
        torch.testing.assert_close(module.bias.grad.double(), expected[:, -1], rtol=1e-4, atol=1e-7)
