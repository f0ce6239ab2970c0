"""K-FAC with factored damping on layers whose factors have size 128, inverted through the
bordered Cholesky of :func:`natgrad.linalg.kron.damped_factor_inverses`: the preconditioned
gradients against float64 dense solves ``(G + λ_G I)⁻¹ V (A + λ_A I)⁻¹``."""

import pytest
import torch
from torch import nn

from natgrad.optim import KFAC

DTYPE = torch.float64


def dense_factored_solve(output_factor, input_factor, damping: float, gradient):
    """``(G + λ_G I)⁻¹ V (A + λ_A I)⁻¹`` in float64 by ``torch.linalg.solve``, π from the
    traces (Martens & Grosse)."""
    output_factor, input_factor = output_factor.to(DTYPE), input_factor.to(DTYPE)
    mean_output = torch.trace(output_factor) / len(output_factor)
    mean_input = torch.trace(input_factor) / len(input_factor)
    pi = float(torch.sqrt(mean_input / mean_output))
    output_eye = torch.eye(len(output_factor), dtype=DTYPE)
    input_eye = torch.eye(len(input_factor), dtype=DTYPE)
    left = torch.linalg.solve(output_factor + damping**0.5 / pi * output_eye, gradient.to(DTYPE))
    return torch.linalg.solve(input_factor + damping**0.5 * pi * input_eye, left.T).T


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_preconditioned_gradients_of_128_wide_layers_equal_dense_solves(
    cholesky_shapes, dtype, tolerance
) -> None:
    """127 → 128 → 4: the first layer's ``A`` (127 inputs and the bias) and ``G`` (128 outputs)
    are factorised bordered, both in one batch at 129; the gradients equal the dense solves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(127, 128), nn.Tanh(), nn.Linear(128, 4)).to(dtype)
    precond = KFAC(model, damping=0.03, damping_mode="factored", inv_update_interval=1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        inputs = torch.randn(32, 127, generator=generator, dtype=dtype)
        targets = torch.randint(0, 4, (32,), generator=generator)
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        gradients = [state.grad_matrix().clone() for state in precond.layers]
        cholesky_shapes.clear()
        precond.step()
        assert sorted(cholesky_shapes) == [(1, 4, 4), (1, 129, 129), (2, 129, 129)]
        for state, gradient in zip(precond.layers, gradients, strict=True):
            expected = dense_factored_solve(state.output_factor, state.input_factor, 0.03, gradient)
            error = (state.grad_matrix().to(DTYPE) - expected).norm() / expected.norm()
            assert error < tolerance, f"{state.name}: relative error {float(error):.1e}"
