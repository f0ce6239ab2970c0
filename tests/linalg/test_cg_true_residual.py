"""What cg reports is checked against the true residual ``b − A x`` computed in float64."""

import pytest
import torch

from natgrad.linalg import cg


def spd_system(size: int, spread: float, seed: int, dtype: torch.dtype):
    """SPD matrix with eigenvalues log-spaced over ``[1, 10**spread]``, and a right-hand side."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    eigenvalues = 10 ** torch.linspace(0, spread, size, dtype=torch.float64)
    matrix = (basis * eigenvalues) @ basis.T
    rhs = torch.randn(size, generator=generator, dtype=torch.float64)
    return matrix.to(dtype), rhs.to(dtype)


@pytest.mark.parametrize(
    ("dtype", "spread", "rtol"),
    [
        (torch.float32, 2.0, 1e-6),
        (torch.float32, 3.0, 1e-6),
        (torch.float32, 1.0, 1e-10),
        (torch.float64, 3.0, 1e-14),
    ],
)
def test_reported_residual_and_convergence_are_those_of_the_returned_x(dtype, spread, rtol):
    """In finite precision the recursive residual drifts below the true one; the report must
    describe ``b − A x`` (float64 oracle), so "converged" is never claimed falsely."""
    matrix, rhs = spd_system(40, spread, seed=int(spread), dtype=dtype)
    solution, info = cg(lambda v: matrix @ v, rhs, rtol=rtol)
    true_norm = float(torch.linalg.vector_norm(matrix.double() @ solution.double() - rhs.double()))
    threshold = rtol * float(torch.linalg.vector_norm(rhs.double()))
    # b − A x evaluated in float32 carries rounding of the size of the residual itself.
    assert info.residual_norm == pytest.approx(
        true_norm, rel=0.5 if dtype == torch.float32 else 0.01
    )
    assert info.converged == (true_norm <= 1.05 * threshold)
    assert info.converged or info.iterations == 10 * 40


def test_unattainable_float32_tolerance_is_not_reported_as_converged() -> None:
    matrix, rhs = spd_system(20, 1.0, seed=3, dtype=torch.float32)
    _, info = cg(lambda v: matrix @ v, rhs, rtol=1e-10, max_iter=60)
    assert not info.converged
    assert info.iterations == 60
    assert info.residual_norm > 1e-10 * float(torch.linalg.vector_norm(rhs))


def test_zero_right_hand_side_with_an_initial_guess_returns_the_exact_zero() -> None:
    matrix, _ = spd_system(30, 3.0, seed=5, dtype=torch.float64)
    x0 = torch.randn(30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    calls = []

    def mv(vector: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return matrix @ vector

    solution, info = cg(mv, torch.zeros(30, dtype=torch.float64), x0=x0)
    assert torch.equal(solution, torch.zeros(30, dtype=torch.float64))
    assert info.converged and info.iterations == 0 and info.residual_norm == 0.0
    assert not calls


def test_preconditioner_that_is_not_positive_definite_stops_cg() -> None:
    matrix, rhs = spd_system(6, 1.0, seed=2, dtype=torch.float64)
    solution, info = cg(lambda v: matrix @ v, rhs, preconditioner=lambda r: -r)
    assert not info.converged and info.iterations == 0
    assert torch.equal(solution, torch.zeros_like(rhs))
    assert info.residual_norm == pytest.approx(float(torch.linalg.vector_norm(rhs)))


@pytest.mark.parametrize(
    ("mv", "message"),
    [
        (lambda v: torch.ones(4, dtype=torch.float64), r"mv must map .* shape \(3,\)"),
        (lambda v: (2 * v).float(), r"mv must map .* dtype torch.float64"),
        (lambda v: (2 * v).tolist(), r"mv must map .* got list"),
    ],
)
def test_operator_changing_shape_or_dtype_is_refused(mv, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cg(mv, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="preconditioner must map"):
        cg(lambda v: v, torch.ones(3, dtype=torch.float64), preconditioner=mv)


def test_bad_right_hand_side_and_iteration_cap_are_refused() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        cg(lambda v: v, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"max_iter must be a non-negative integer, got 2\.5"):
        cg(lambda v: v, torch.ones(3), max_iter=2.5)
