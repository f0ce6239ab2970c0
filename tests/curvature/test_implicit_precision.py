"""The implicit (CG) Fisher solve in float32 matches a float64 dense solve to float32 accuracy."""

import warnings

import pytest
import torch
from torch import nn

import natgrad
from natgrad.curvature import Implicit
from natgrad.curvature.implicit import default_cg_rtol
from natgrad.linalg import cg


def mlp_fisher(dtype: torch.dtype) -> Implicit:
    """Implicit categorical Fisher of a small tanh MLP; the same weights and inputs per dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    inputs = torch.randn(64, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return natgrad.fisher(
        model, inputs.to(dtype), likelihood="categorical", kind="exact", structure="implicit"
    )


@pytest.fixture(scope="module")
def fisher64() -> Implicit:
    return mlp_fisher(torch.float64)


@pytest.fixture(scope="module")
def fisher32() -> Implicit:
    return mlp_fisher(torch.float32)


@pytest.mark.parametrize("damping", [1e-1, 1e-2, 1e-3, 1e-4])
def test_float32_direction_matches_the_float64_dense_solve(fisher64, fisher32, damping) -> None:
    """Before: √ε(float32) tolerance, errors 5e-5 to 1.2e-4. Now within 1e-5 (seen: <1e-6)."""
    dense = fisher64.to_dense()
    gradient = torch.randn(dense.shape[0], generator=torch.Generator().manual_seed(2)).double()
    eye = torch.eye(dense.shape[0], dtype=torch.float64)
    oracle = torch.linalg.solve(dense + damping * eye, gradient)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        direction = fisher32.solve(gradient.float(), damping)
    error = float(torch.linalg.vector_norm(direction.double() - oracle))
    assert error <= 1e-5 * float(torch.linalg.vector_norm(oracle))


def test_default_tolerance_per_dtype() -> None:
    assert default_cg_rtol(torch.float64) == pytest.approx(2.0**-26)
    assert default_cg_rtol(torch.float32) == pytest.approx(16 * 2.0**-23)
    assert default_cg_rtol(torch.bfloat16) == pytest.approx(2.0**-3.5)
    assert mlp_fisher(torch.float32).cg_rtol == default_cg_rtol(torch.float32)


def spd_system(size: int, spread: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    matrix = (basis * 10 ** torch.linspace(0, spread, size, dtype=torch.float64)) @ basis.T
    return matrix, torch.randn(size, generator=generator, dtype=torch.float64)


def test_stagnation_stops_an_unattainable_tolerance_early() -> None:
    """float32 cannot reach rtol 1e-10: with stop_on_stagnation CG stops well before max_iter
    and returns the iterate of smallest true residual (float64 oracle)."""
    matrix, rhs = spd_system(40, 3.0, seed=3)
    matrix32 = matrix.float()
    x, info = cg(lambda v: matrix32 @ v, rhs.float(), rtol=1e-10, stop_on_stagnation=True)
    assert info.stagnated and not info.converged
    assert info.iterations < 400
    true_norm = float(torch.linalg.vector_norm(matrix @ x.double() - rhs))
    assert true_norm <= 1e-4 * float(torch.linalg.vector_norm(rhs))
    error = torch.linalg.vector_norm(x.double() - torch.linalg.solve(matrix, rhs))
    assert float(error) <= 1e-3 * float(torch.linalg.vector_norm(torch.linalg.solve(matrix, rhs)))


def test_stagnation_is_off_by_default_and_never_set_on_convergence() -> None:
    matrix, rhs = spd_system(20, 1.0, seed=4)
    _, info = cg(lambda v: matrix.float() @ v, rhs.float(), rtol=1e-10, max_iter=60)
    assert info.iterations == 60 and not info.stagnated
    _, info = cg(lambda v: matrix @ v, rhs, rtol=1e-10, stop_on_stagnation=True)
    assert info.converged and not info.stagnated


def test_singular_system_stagnating_far_from_the_tolerance_warns() -> None:
    """A right-hand side outside the range of a singular C has no solution: warned, not silent."""
    shapes = [torch.Size([3])]
    matrix = torch.diag(torch.tensor([1.0, 1.0, 0.0]))
    operator = Implicit(lambda v: matrix @ v, shapes, torch.float32, torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match="conjugate gradients"):
        operator.solve(torch.tensor([1.0, 1.0, 1.0]))
