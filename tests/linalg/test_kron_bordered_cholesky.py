"""Bordered Cholesky inverses of ``damped_factor_inverses`` (size 128, factorised at 129)
against float64 dense inverses and against the unbordered path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from natgrad.linalg import kron
from natgrad.linalg.kron import damped_factor_inverses

DTYPE = torch.float64
SIZES = st.sampled_from([1, 2, 8, 9, 32, 33, 127, 128, 129])


def random_psd(dim: int, seed: int, dtype: torch.dtype = DTYPE, rank: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(dim, rank or dim + 1, generator=generator, dtype=DTYPE)
    return (root @ root.T / root.shape[1]).to(dtype)


def dense_inverse(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(matrix.shape[0], dtype=DTYPE)
    return torch.linalg.inv(matrix.double() + damping * eye)


def relative_error(inverse: torch.Tensor, expected: torch.Tensor) -> float:
    return float((inverse.double() - expected).norm() / expected.norm())


def one_by_one(matrices, dampings):
    """The inverses with every matrix alone in its call (no batch)."""
    return [damped_factor_inverses([m], [d])[0] for m, d in zip(matrices, dampings, strict=True)]


def test_size_128_is_factorised_bordered(cholesky_shapes) -> None:
    """The digits MLP's factors (sizes 128, 65, 10, 129): the 128 is factorised at 129, its
    stack holding it in the leading block and zeros in the border; every inverse is the float64
    dense one."""
    matrices = [random_psd(size, seed) for seed, size in enumerate([128, 65, 10, 129])]
    stacked = kron._stacked_for_cholesky(matrices[:1], DTYPE)
    assert stacked.shape == (1, 129, 129)
    assert torch.equal(stacked[0, :128, :128], matrices[0])
    assert not stacked[0, 128].any() and not stacked[0, :, 128].any()
    dampings = [0.03, 0.1, 0.2, 0.05]
    inverses = damped_factor_inverses(matrices, dampings)
    assert sorted(cholesky_shapes) == [(1, 10, 10), (1, 65, 65), (1, 129, 129), (1, 129, 129)]
    for matrix, damping, inverse in zip(matrices, dampings, inverses, strict=True):
        assert inverse.shape == matrix.shape and inverse.is_contiguous()
        assert relative_error(inverse, dense_inverse(matrix, damping)) < 1e-13


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(SIZES, min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_inverses_equal_float64_dense_and_unbordered_ones(sizes, dtype, seed) -> None:
    """Whatever the mix of sizes (bordered or not, batched or alone), each inverse equals the
    float64 ``inv(M + λI)`` and, to round-off, the inverse of the matrix inverted alone."""
    matrices = [random_psd(size, seed + index, dtype) for index, size in enumerate(sizes)]
    dampings = [0.01 * (index + 1) for index in range(len(sizes))]
    inverses = damped_factor_inverses(matrices, dampings)
    alone = one_by_one(matrices, dampings)
    tolerance = 1e-10 if dtype == DTYPE else 2e-4
    for matrix, damping, inverse, single in zip(matrices, dampings, inverses, alone, strict=True):
        assert inverse.dtype == dtype and inverse.shape == matrix.shape
        expected = dense_inverse(matrix, damping)
        assert relative_error(inverse, expected) < tolerance
        assert relative_error(inverse, single.double()) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_border_off_gives_the_same_inverses(monkeypatch, dtype) -> None:
    """With no bordering the inverses (of the digits autoencoder's factor sizes, two of 128)
    agree with the bordered ones to round-off."""
    sizes = [128, 65, 64, 129, 32, 65, 8, 33, 32, 9, 64, 33, 128, 65, 64, 129]
    matrices = [random_psd(size, seed, dtype) for seed, size in enumerate(sizes)]
    dampings = [0.03] * len(sizes)
    bordered = damped_factor_inverses(matrices, dampings)
    monkeypatch.setattr(kron, "_BORDERED_SIZES", frozenset())
    plain = damped_factor_inverses(matrices, dampings)
    tolerance = 1e-12 if dtype == DTYPE else 1e-5
    for new, old in zip(bordered, plain, strict=True):
        assert (new - old).norm() / old.norm() < tolerance


def test_singular_bordered_factor_is_retried_bordered_in_float64() -> None:
    """A singular 128 × 128 factor (rank 4, integer entries: exact in float32) with a damping
    below its float32 round-off, batched with a well-damped 128: it is redone in float64
    (bordered again) and equals the float64 dense inverse; its neighbour keeps its float32
    inverse."""
    generator = torch.Generator().manual_seed(3)
    root = torch.randint(-3, 4, (128, 4), generator=generator, dtype=DTYPE)
    singular = root @ root.T
    neighbour = random_psd(128, 4)
    damping = 1e-3  # below 100 · eps · tr(M) in float32, far above it in float64
    assert damping < 100 * torch.finfo(torch.float32).eps * float(singular.trace())
    inverse, other = damped_factor_inverses([singular.float(), neighbour.float()], [damping, 0.1])
    assert relative_error(inverse, dense_inverse(singular, damping)) < 1e-6
    assert relative_error(other, dense_inverse(neighbour, 0.1)) < 1e-5


def test_failed_bordered_factorisation_falls_back(monkeypatch) -> None:
    """Every Cholesky reported failed: two bordered 128s still get their float64 dense inverses
    (through the clamped eigendecomposition)."""
    original = torch.linalg.cholesky_ex

    def failing(matrix, **kwargs):
        factor, info = original(matrix, **kwargs)
        return factor, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    matrices = [random_psd(128, 5), random_psd(128, 6)]
    inverses = damped_factor_inverses(matrices, [0.1, 0.2])
    for matrix, damping, inverse in zip(matrices, [0.1, 0.2], inverses, strict=True):
        assert relative_error(inverse, dense_inverse(matrix, damping)) < 1e-12
