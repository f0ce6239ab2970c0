"""damped_solve, damped_inverse and psd_eigh against NumPy/SciPy references."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.linalg import damped_inverse, damped_solve, default_eigen_floor, psd_eigh


def random_psd(size: int, rank: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(size, rank, generator=generator, dtype=torch.float64)
    return (factor @ factor.T).to(dtype)


def clamped_eigh_solve(matrix: np.ndarray, rhs: np.ndarray, damping: float) -> np.ndarray:
    """The documented fallback for float64 (floor √ε ≈ 1.5e-8), written with NumPy."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix + damping * np.eye(len(matrix)))
    clamped = np.maximum(eigenvalues, np.sqrt(np.finfo(np.float64).eps) * eigenvalues[-1])
    return eigenvectors @ ((eigenvectors.T @ rhs) / clamped)


@settings(max_examples=15, deadline=None)
@given(
    size=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    damping=st.sampled_from([0.0, 1e-3, 1.0]),
    columns=st.sampled_from([None, 1, 3]),
)
def test_matches_scipy_on_positive_definite_systems(size, seed, damping, columns) -> None:
    matrix = random_psd(size, size + 2, seed)
    shape = (size,) if columns is None else (size, columns)
    rhs = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = scipy.linalg.solve(
        matrix.numpy() + damping * np.eye(size), rhs.numpy(), assume_a="pos"
    )
    solution = damped_solve(matrix, rhs, damping)
    assert solution.shape == rhs.shape
    np.testing.assert_allclose(solution.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_batched_matrices_and_right_hand_sides() -> None:
    matrices = torch.stack([random_psd(4, 6, seed) for seed in range(3)])
    vectors = torch.randn(3, 4, dtype=torch.float64)
    solution = damped_solve(matrices, vectors, 0.1)
    for index in range(3):
        expected = torch.linalg.solve(matrices[index] + 0.1 * torch.eye(4), vectors[index])
        torch.testing.assert_close(solution[index], expected)
    columns = torch.randn(3, 4, 2, dtype=torch.float64)
    torch.testing.assert_close(
        damped_solve(matrices, columns, 0.1),
        torch.linalg.solve(matrices + 0.1 * torch.eye(4), columns),
    )


def test_singular_matrix_falls_back_to_clamped_eigendecomposition() -> None:
    matrix = random_psd(6, 2, seed=4)
    rhs = torch.randn(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.linalg.cholesky_ex(matrix).info != 0
    solution = damped_solve(matrix, rhs)
    assert torch.isfinite(solution).all()
    expected = clamped_eigh_solve(matrix.numpy(), rhs.numpy(), 0.0)
    np.testing.assert_allclose(solution.numpy(), expected, rtol=1e-6)


def test_float32_failure_is_retried_in_float64(monkeypatch) -> None:
    """A float32 Cholesky failure is answered by a float64 Cholesky solve, cast back."""
    matrix = random_psd(5, 7, seed=1, dtype=torch.float32)
    rhs = torch.randn(5, generator=torch.Generator().manual_seed(1))
    real_cholesky = torch.linalg.cholesky_ex
    seen = []

    def failing_in_float32(tensor):
        seen.append(tensor.dtype)
        factor, info = real_cholesky(tensor)
        return factor, info + int(tensor.dtype == torch.float32)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_in_float32)
    solution = damped_solve(matrix, rhs, 0.01)
    assert seen == [torch.float32, torch.float64]
    assert solution.dtype == torch.float32
    expected = torch.linalg.solve(matrix.double() + 0.01 * torch.eye(5), rhs.double())
    torch.testing.assert_close(solution, expected.float())


def test_singular_float32_matrix_gives_finite_results_with_and_without_damping() -> None:
    matrix = random_psd(30, 3, seed=2, dtype=torch.float32)
    rhs = torch.randn(30, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(damped_solve(matrix, rhs)).all()
    damped = damped_solve(matrix, rhs, 1e-2)
    expected = torch.linalg.solve(matrix.double() + 1e-2 * torch.eye(30), rhs.double())
    torch.testing.assert_close(damped.double(), expected, rtol=1e-3, atol=1e-3)


def test_default_floor_is_the_square_root_of_epsilon() -> None:
    assert default_eigen_floor(torch.float64) == pytest.approx(1.4901161193847656e-08)
    assert default_eigen_floor(torch.float32) == pytest.approx(3.4526698300124393e-04)


def test_damped_inverse_inverts() -> None:
    matrix = random_psd(4, 4, seed=3)
    inverse = damped_inverse(matrix, 0.5)
    torch.testing.assert_close(inverse @ (matrix + 0.5 * torch.eye(4)), torch.eye(4).double())
    torch.testing.assert_close(inverse, inverse.T)


def test_psd_eigh_clamps_relative_to_the_largest_eigenvalue() -> None:
    matrix = torch.diag(torch.tensor([-1.0, 0.0, 2.0, 4.0], dtype=torch.float64))
    eigenvalues, eigenvectors = psd_eigh(matrix, eigen_floor=0.25)
    torch.testing.assert_close(eigenvalues, torch.tensor([1.0, 1.0, 2.0, 4.0]).double())
    torch.testing.assert_close(eigenvectors.T @ eigenvectors, torch.eye(4).double())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise(bad: float) -> None:
    matrix = torch.eye(3)
    rhs = torch.ones(3)
    with pytest.raises(ValueError, match="matrix must not contain infs or NaNs"):
        damped_solve(matrix * bad, rhs)
    with pytest.raises(ValueError, match="rhs must not contain infs or NaNs"):
        damped_solve(matrix, rhs * bad)
    with pytest.raises(ValueError, match="damping"):
        damped_solve(matrix, rhs, bad)


def test_bad_shapes_and_damping_raise() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., P, P\)"):
        damped_solve(torch.ones(3, 2), torch.ones(3))
    with pytest.raises(ValueError, match="rhs must have shape"):
        damped_solve(torch.eye(3), torch.ones(4))
    with pytest.raises(ValueError, match="damping"):
        damped_solve(torch.eye(3), torch.ones(3), -1.0)
    with pytest.raises(ValueError, match="eigen_floor"):
        psd_eigh(torch.eye(3), eigen_floor=0.0)


def test_matrix_without_positive_eigenvalue_asks_for_damping() -> None:
    with pytest.raises(torch.linalg.LinAlgError, match="damping"):
        damped_solve(torch.zeros(3, 3), torch.ones(3))
    torch.testing.assert_close(
        damped_solve(torch.zeros(3, 3), torch.ones(3), 2.0), torch.full((3,), 0.5)
    )


def test_only_the_symmetric_part_is_used_on_every_path() -> None:
    """Cholesky alone would read the lower triangle; the eigendecomposition the symmetric part."""
    matrix = torch.tensor([[2.0, 5.0], [0.0, 2.0]], dtype=torch.float64)
    rhs = torch.tensor([1.0, -0.5], dtype=torch.float64)
    symmetric = 0.5 * (matrix.numpy() + matrix.numpy().T)
    for damping in (0.0, 2.0):
        # damping 0: the symmetric part is indefinite, so the clamped eigendecomposition answers.
        expected = clamped_eigh_solve(symmetric, rhs.numpy(), damping)
        np.testing.assert_allclose(damped_solve(matrix, rhs, damping).numpy(), expected)
    expected = scipy.linalg.solve(symmetric + 3.0 * np.eye(2), rhs.numpy(), assume_a="pos")
    np.testing.assert_allclose(damped_solve(matrix, rhs, 3.0).numpy(), expected)
