"""Preconditioned conjugate gradients against dense solves."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.linalg import cg


def random_spd(size: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    """SPD matrix with eigenvalues log-uniform in ``[1, 10**spread]`` and random eigenvectors."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    eigenvalues = 10 ** (spread * torch.rand(size, generator=generator, dtype=torch.float64))
    return basis @ torch.diag(eigenvalues) @ basis.T


@settings(max_examples=20, deadline=None)
@given(size=st.integers(1, 12), seed=st.integers(0, 10_000), spread=st.floats(0.0, 3.0))
def test_cg_matches_dense_solve(size: int, seed: int, spread: float) -> None:
    matrix = random_spd(size, seed, spread)
    rhs = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    solution, info = cg(lambda v: matrix @ v, rhs, rtol=1e-12, max_iter=5 * size)
    assert info.converged
    torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(
        torch.tensor(info.residual_norm, dtype=torch.float64),
        torch.linalg.vector_norm(rhs - matrix @ solution),
        rtol=1e-3,
        atol=1e-12,
    )


def test_jacobi_preconditioner_needs_fewer_iterations_for_the_same_answer() -> None:
    generator = torch.Generator().manual_seed(0)
    scales = 10 ** torch.linspace(0, 4, 30, dtype=torch.float64)
    coupling = 0.01 * torch.randn(30, 30, generator=generator, dtype=torch.float64)
    matrix = torch.diag(scales) + coupling @ coupling.T
    rhs = torch.randn(30, generator=generator, dtype=torch.float64)
    inverse_diagonal = 1.0 / matrix.diagonal()
    plain, plain_info = cg(lambda v: matrix @ v, rhs, rtol=1e-10)
    preconditioned, info = cg(
        lambda v: matrix @ v, rhs, preconditioner=lambda r: inverse_diagonal * r, rtol=1e-10
    )
    assert info.converged and plain_info.converged
    assert info.iterations < plain_info.iterations
    expected = torch.linalg.solve(matrix, rhs)
    torch.testing.assert_close(preconditioned, expected)
    torch.testing.assert_close(plain, expected)


def test_initial_guess_at_the_solution_needs_no_iteration() -> None:
    matrix = random_spd(5, 1)
    rhs = torch.randn(5, dtype=torch.float64)
    exact = torch.linalg.solve(matrix, rhs)
    solution, info = cg(lambda v: matrix @ v, rhs, x0=exact, atol=1e-9)
    assert info.iterations == 0 and info.converged
    torch.testing.assert_close(solution, exact)


def test_zero_right_hand_side_gives_zero() -> None:
    solution, info = cg(lambda v: 2 * v, torch.zeros(4))
    assert torch.equal(solution, torch.zeros(4))
    assert info.converged and info.iterations == 0


def test_iteration_cap_reports_no_convergence() -> None:
    matrix = random_spd(10, 2, spread=3.0)
    solution, info = cg(lambda v: matrix @ v, torch.ones(10, dtype=torch.float64), max_iter=2)
    assert info.iterations == 2 and not info.converged
    assert torch.isfinite(solution).all()


def test_negative_curvature_stops_without_nan() -> None:
    matrix = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    solution, info = cg(lambda v: matrix @ v, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert not info.converged
    assert torch.isfinite(solution).all()


def test_bad_arguments_raise() -> None:
    identity = lambda v: v  # noqa: E731
    with pytest.raises(ValueError, match="1-d"):
        cg(identity, torch.ones(2, 2))
    with pytest.raises(ValueError, match="infs or NaNs"):
        cg(identity, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="x0"):
        cg(identity, torch.ones(3), x0=torch.ones(2))
    with pytest.raises(ValueError, match="rtol"):
        cg(identity, torch.ones(3), rtol=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        cg(identity, torch.ones(3), max_iter=-1)
