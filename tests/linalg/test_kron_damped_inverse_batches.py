"""``damped_factor_inverses`` on batches of equal-sized factors, each with its own damping
(added to the whole stack in one operation), against float64 dense inverses; and its refusal
of non-finite factors, wherever the non-finite entry sits."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.linalg.kron import damped_factor_inverses


def random_psd(dim: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(dim, dim + 2, generator=generator, dtype=torch.float64)
    return (root @ root.T / root.shape[1]).to(dtype)


@settings(max_examples=20, deadline=None)
@given(
    size=st.sampled_from([1, 5, 64, 128]),
    count=st.integers(2, 4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_each_matrix_of_a_batch_gets_its_own_damping(size, count, dtype, seed) -> None:
    """``count`` matrices of one size (one stack; 128 bordered), dampings spread over three
    orders of magnitude: each inverse is the float64 ``inv(M_i + λ_i I)``."""
    matrices = [random_psd(size, seed + index, dtype) for index in range(count)]
    dampings = [10.0 ** (index - 2) for index in range(count)]
    inverses = damped_factor_inverses(matrices, dampings)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    for matrix, damping, inverse in zip(matrices, dampings, inverses, strict=True):
        eye = torch.eye(size, dtype=torch.float64)
        expected = torch.linalg.inv(matrix.double() + damping * eye)
        assert inverse.dtype == dtype and inverse.shape == (size, size)
        assert float((inverse.double() - expected).norm() / expected.norm()) < tolerance


@pytest.mark.parametrize("size", [4, 128])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_non_finite_entry_anywhere_is_refused(size, value, dtype) -> None:
    """A non-finite entry in the upper triangle, which Cholesky never reads, of the second
    matrix of a batch is refused like one on the diagonal."""
    for row, column in ((0, size - 1), (size - 1, size - 1)):
        bad = random_psd(size, 1, dtype)
        bad[row, column] = value
        with pytest.raises(ValueError, match="non-finite"):
            damped_factor_inverses([random_psd(size, 0, dtype), bad], [0.1, 0.1])
