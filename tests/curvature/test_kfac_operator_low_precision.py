"""K-FAC and EKFAC operators of float16/bfloat16 models: eigendecompositions run in float32,
and every method works and returns the model's dtype, against a float64 closed-form oracle."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from natgrad.curvature.ekfac import build_ekfac
from natgrad.curvature.kfac import build_kfac

DTYPE = torch.float64


def exact_gaussian_fisher(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``1/N Σ_n J_nᵀ J_n`` in float64 (the Gaussian likelihood's Fisher) from per-sample
    Jacobians of a float64 copy of ``model``."""
    twin = copy.deepcopy(model).to(DTYPE)
    params = {name: p.detach() for name, p in twin.named_parameters()}

    def output(values: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return functional_call(twin, values, (sample.unsqueeze(0),)).reshape(-1)

    jacobians = vmap(jacrev(output), in_dims=(None, 0))(params, inputs.to(DTYPE))
    flat = torch.cat([jacobians[name].flatten(2) for name in params], dim=2)
    return torch.einsum("nci,ncj->ij", flat, flat) / len(inputs)


@pytest.mark.parametrize("build", [build_kfac, build_ekfac])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_linear_model_operator_equals_exact_fisher(build, dtype) -> None:
    """One Linear layer with the Gaussian likelihood: K-FAC and EKFAC equal the Fisher at any
    batch size. The solve, diagonal and dense matrix of a bfloat16 model used to fail with a
    float32/bfloat16 dtype mismatch (and EKFAC could not be built)."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2).to(dtype)
    inputs = torch.randn(5, 3, generator=generator).to(dtype)
    operator = build(model, inputs, likelihood="gaussian")
    expected = exact_gaussian_fisher(model, inputs)
    vector = torch.randn(expected.shape[0], generator=generator, dtype=DTYPE)
    damped = expected + 0.5 * torch.eye(len(expected), dtype=DTYPE)
    results = {
        "to_dense": (operator.to_dense(), expected),
        "diag": (operator.diag(), expected.diagonal()),
        "mv": (operator.mv(vector.to(dtype)), expected @ vector.to(dtype).to(DTYPE)),
        "solve": (
            operator.solve(vector.to(dtype), 0.5),
            torch.linalg.solve(damped, vector.to(dtype).to(DTYPE)),
        ),
    }
    for name, (actual, reference) in results.items():
        assert actual.dtype == dtype, name
        scale = reference.abs().max()
        torch.testing.assert_close(actual.to(DTYPE), reference, rtol=0, atol=3e-2 * scale, msg=name)
