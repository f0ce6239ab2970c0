"""Kronecker helpers against dense float64 Kronecker products (row-major vectorisation)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.linalg.kron import (
    block_diagonal_kron,
    damped_factor_inverses,
    eigenbasis_mv,
    eigenbasis_solve,
    factored_damping,
    factored_damping_from_factors,
    factored_solve,
    grouped_factored_damping,
    kron_mv,
    symmetric_eigh,
    symmetric_eigh_batch,
)

DIMS = st.integers(min_value=1, max_value=5)


def random_psd(dim: int, generator: torch.Generator, rank: int | None = None) -> torch.Tensor:
    root = torch.randn(dim, rank or dim + 1, generator=generator, dtype=torch.float64)
    return root @ root.T


@settings(max_examples=15, deadline=None)
@given(d_out=DIMS, d_in=DIMS, seed=st.integers(0, 2**16))
def test_kron_mv_matches_dense_row_major_kron(d_out: int, d_in: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    output_factor, input_factor = random_psd(d_out, generator), random_psd(d_in, generator)
    matrix = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    dense = torch.kron(output_factor, input_factor)
    expected = (dense @ matrix.reshape(-1)).reshape(d_out, d_in)
    torch.testing.assert_close(kron_mv(output_factor, input_factor, matrix), expected)


@settings(max_examples=15, deadline=None)
@given(d_out=DIMS, d_in=DIMS, seed=st.integers(0, 2**16), damping=st.floats(1e-3, 10.0))
def test_eigenbasis_solve_with_kfac_eigenvalues_is_damped_kron_inverse(
    d_out: int, d_in: int, seed: int, damping: float
) -> None:
    generator = torch.Generator().manual_seed(seed)
    output_factor, input_factor = random_psd(d_out, generator), random_psd(d_in, generator)
    matrix = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    output_eigen, input_eigen = symmetric_eigh(output_factor), symmetric_eigh(input_factor)
    eigenvalues = torch.outer(output_eigen.values, input_eigen.values)
    solution = eigenbasis_solve(output_eigen, input_eigen, eigenvalues, matrix, damping)
    dense = torch.kron(output_factor, input_factor) + damping * torch.eye(d_out * d_in)
    expected = torch.linalg.solve(dense, matrix.reshape(-1)).reshape(d_out, d_in)
    torch.testing.assert_close(solution, expected)


def test_eigenbasis_mv_with_arbitrary_eigenvalues_matches_dense() -> None:
    generator = torch.Generator().manual_seed(0)
    output_eigen = symmetric_eigh(random_psd(3, generator))
    input_eigen = symmetric_eigh(random_psd(4, generator))
    eigenvalues = torch.rand(3, 4, generator=generator, dtype=torch.float64)
    matrix = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    basis = torch.kron(output_eigen.vectors, input_eigen.vectors)
    dense = basis @ torch.diag(eigenvalues.reshape(-1)) @ basis.T
    expected = (dense @ matrix.reshape(-1)).reshape(3, 4)
    torch.testing.assert_close(
        eigenbasis_mv(output_eigen, input_eigen, eigenvalues, matrix), expected
    )
    solved = eigenbasis_solve(output_eigen, input_eigen, eigenvalues, expected, 0.0)
    torch.testing.assert_close(solved, matrix)


def test_undamped_solve_of_singular_block_is_pseudo_inverse() -> None:
    generator = torch.Generator().manual_seed(1)
    output_factor = random_psd(3, generator, rank=1)
    input_factor = random_psd(4, generator, rank=2)
    matrix = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    output_eigen, input_eigen = symmetric_eigh(output_factor), symmetric_eigh(input_factor)
    eigenvalues = torch.outer(output_eigen.values, input_eigen.values)
    solution = eigenbasis_solve(output_eigen, input_eigen, eigenvalues, matrix, 0.0)
    pinv = torch.linalg.pinv(torch.kron(output_factor, input_factor), hermitian=True)
    expected = (pinv @ matrix.reshape(-1)).reshape(3, 4)
    assert torch.isfinite(solution).all()
    torch.testing.assert_close(solution, expected)


def test_factored_solve_matches_dense_factored_damping() -> None:
    generator = torch.Generator().manual_seed(2)
    output_factor, input_factor = random_psd(3, generator), random_psd(5, generator)
    matrix = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    damping = 0.3
    output_eigen, input_eigen = symmetric_eigh(output_factor), symmetric_eigh(input_factor)
    output_damping, input_damping = factored_damping(output_eigen, input_eigen, damping)
    pi = math.sqrt((input_factor.trace() / 5) / (output_factor.trace() / 3))
    assert output_damping == pytest.approx(math.sqrt(damping) / pi)
    assert input_damping == pytest.approx(math.sqrt(damping) * pi)
    dense = torch.kron(
        output_factor + output_damping * torch.eye(3), input_factor + input_damping * torch.eye(5)
    )
    expected = torch.linalg.solve(dense, matrix.reshape(-1)).reshape(3, 5)
    torch.testing.assert_close(factored_solve(output_eigen, input_eigen, matrix, damping), expected)
    with pytest.raises(ValueError, match="damping > 0"):
        factored_solve(output_eigen, input_eigen, matrix, 0.0)


def test_symmetric_eigh_reconstructs_and_clamps() -> None:
    generator = torch.Generator().manual_seed(3)
    matrix = random_psd(4, generator, rank=2)
    eigen = symmetric_eigh(matrix)
    assert (eigen.values >= 0).all()
    reconstructed = eigen.vectors @ torch.diag(eigen.values) @ eigen.vectors.T
    torch.testing.assert_close(reconstructed, matrix)
    half = symmetric_eigh(matrix.to(torch.float16))
    assert half.values.dtype == torch.float32


def test_symmetric_eigh_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        symmetric_eigh(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"square matrix \(d, d\) or a stack .* got shape \(3,\)"):
        symmetric_eigh(torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        symmetric_eigh(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_stacked_factors_are_their_groups_one_by_one() -> None:
    """A stack of ``g`` factor pairs (a grouped convolution's): the block-diagonal dense
    matrix, the eigendecomposition, the factored solve (one π per group) and the per-group
    dampings equal the single-pair functions applied group by group."""
    generator = torch.Generator().manual_seed(4)
    outputs = torch.stack([random_psd(2, generator) for _ in range(3)])
    inputs = torch.stack([random_psd(4, generator, rank=2) for _ in range(3)])
    inputs[1] *= 10.0  # a different π in each group
    matrices = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)
    dense = block_diagonal_kron(outputs, inputs)
    torch.testing.assert_close(
        dense, torch.block_diag(*(torch.kron(g, a) for g, a in zip(outputs, inputs, strict=True)))
    )
    torch.testing.assert_close(
        dense @ matrices.reshape(-1),
        torch.stack(
            [kron_mv(g, a, v) for g, a, v in zip(outputs, inputs, matrices, strict=True)]
        ).reshape(-1),
    )
    stacked_output, stacked_input = symmetric_eigh(outputs), symmetric_eigh(inputs)
    solved = factored_solve(stacked_output, stacked_input, matrices, 0.3)
    for group in range(3):
        output_eigen, input_eigen = symmetric_eigh(outputs[group]), symmetric_eigh(inputs[group])
        torch.testing.assert_close(stacked_output.values[group], output_eigen.values)
        expected = factored_solve(output_eigen, input_eigen, matrices[group], 0.3)
        torch.testing.assert_close(solved[group], expected)
    pairs = grouped_factored_damping(outputs, inputs, 0.3)
    for pair, output, inputs_group in zip(pairs, outputs, inputs, strict=True):
        assert pair == pytest.approx(factored_damping_from_factors(output, inputs_group, 0.3))


def test_stacked_factor_helpers_reject_mismatched_stacks() -> None:
    mismatched = r"as many matrices, got shapes \(2, 3, 3\) and \(3, 2, 2\)"
    with pytest.raises(ValueError, match=mismatched):
        block_diagonal_kron(torch.eye(3).expand(2, 3, 3), torch.eye(2).expand(3, 2, 2))
    with pytest.raises(ValueError, match=r"square matrix .* got shape \(2, 3\)"):
        block_diagonal_kron(torch.ones(2, 3), torch.eye(2))
    with pytest.raises(ValueError, match=r"stacks \(g, d, d\), got shape \(3, 3\)"):
        grouped_factored_damping(torch.eye(3), torch.eye(2), 0.1)


@pytest.mark.parametrize("damping", [1e-4, 1e-5, 1e-6])
def test_damped_inverse_of_singular_float32_factor_equals_float64_inverse(damping: float) -> None:
    """A rank-2 factor of size 6, exact in float32, with a damping near float32 round-off of
    the factor: Cholesky succeeds in float32 but its inverse is off by up to 15%; the inverse
    must be the float64 ``inv(M + λI)`` (the factorisation is redone in float64, damped there)."""
    root = torch.tensor([[1.0, 2, 0, -1, 3, 1], [2, -1, 1, 0, 1, -2]], dtype=torch.float64).T
    matrix = root @ root.T
    expected = torch.linalg.inv(matrix + damping * torch.eye(6, dtype=torch.float64))
    (inverse,) = damped_factor_inverses([matrix.float()], [damping])
    assert inverse.dtype == torch.float32
    error = (inverse.double() - expected).norm() / expected.norm()
    assert error < 1e-6, f"relative error {float(error):.2e}"


@pytest.mark.parametrize("damping", [float("nan"), float("inf"), -1.0])
def test_damping_helpers_reject_non_finite_or_negative_damping(damping: float) -> None:
    """A NaN damping used to give a zero solve, an infinite one zero dampings or solves."""
    generator = torch.Generator().manual_seed(7)
    output_eigen = symmetric_eigh(random_psd(2, generator))
    input_eigen = symmetric_eigh(random_psd(3, generator))
    eigenvalues = output_eigen.values.unsqueeze(-1) * input_eigen.values.unsqueeze(-2)
    matrix = torch.ones(2, 3, dtype=torch.float64)
    text = f"got {damping!r}"
    with pytest.raises(ValueError, match=text):
        eigenbasis_solve(output_eigen, input_eigen, eigenvalues, matrix, damping)
    with pytest.raises(ValueError, match=text):
        factored_solve(output_eigen, input_eigen, matrix, damping)
    with pytest.raises(ValueError, match=text):
        factored_damping(output_eigen, input_eigen, damping)
    with pytest.raises(ValueError, match=text):
        factored_damping_from_factors(torch.eye(2), torch.eye(3), damping)


def test_integer_factors_are_decomposed_and_inverted_in_float32() -> None:
    """Integer matrices used to crash in the finiteness check (no norm for integers)."""
    matrix = torch.tensor([[2, 1], [1, 2]])
    for eigen in (symmetric_eigh(matrix), symmetric_eigh_batch([matrix])[0]):
        assert eigen.values.dtype == torch.float32
        torch.testing.assert_close(eigen.values, torch.tensor([1.0, 3.0]))
    inverse, diagonal = damped_factor_inverses([matrix, torch.tensor([1, 3])], [1.0, 1.0])
    expected = torch.linalg.inv(torch.tensor([[3.0, 1.0], [1.0, 3.0]]))
    torch.testing.assert_close(inverse, expected)
    torch.testing.assert_close(diagonal, torch.tensor([0.5, 0.25]))
