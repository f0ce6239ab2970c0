"""PSD matrix powers and inverse p-th roots against SciPy's fractional_matrix_power (float64)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import fractional_matrix_power

from natgrad.linalg import inverse_pth_root, psd_matrix_power


def _random_psd(size: int, rank: int, seed: int) -> np.ndarray:
    factor = np.random.default_rng(seed).standard_normal((size, rank))
    return factor @ factor.T


@settings(max_examples=15, deadline=None)
@given(
    size=st.integers(1, 6),
    rank=st.integers(1, 6),
    root=st.integers(1, 8),
    damping=st.sampled_from([1e-3, 0.1, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_inverse_root_matches_scipy(size: int, rank: int, root: int, damping: float, seed: int):
    matrix = _random_psd(size, rank, seed)
    expected = fractional_matrix_power(matrix + damping * np.eye(size), -1.0 / root)
    result = inverse_pth_root(torch.from_numpy(matrix), root, damping).numpy()
    np.testing.assert_allclose(result, np.real(expected), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("exponent", [0.5, 2.0, -0.25, -1.0])
def test_power_matches_scipy_and_is_batched(exponent: float) -> None:
    batch = np.stack([_random_psd(4, 4, seed) + 0.5 * np.eye(4) for seed in range(3)])
    result = psd_matrix_power(torch.from_numpy(batch), exponent).numpy()
    for matrix, power in zip(batch, result, strict=True):
        expected = np.real(fractional_matrix_power(matrix, exponent))
        np.testing.assert_allclose(power, expected, rtol=1e-9, atol=1e-12)


def test_inverse_root_is_the_inverse_of_the_root_power() -> None:
    matrix = torch.from_numpy(_random_psd(5, 5, 7)) + 0.1 * torch.eye(5, dtype=torch.float64)
    inverse_fourth = inverse_pth_root(matrix, 4)
    np.testing.assert_allclose(
        torch.linalg.matrix_power(inverse_fourth, 4).numpy(),
        torch.linalg.inv(matrix).numpy(),
        rtol=1e-9,
        atol=1e-10,
    )


def test_singular_matrix_is_floored_not_infinite() -> None:
    singular = torch.from_numpy(_random_psd(5, 2, 3))
    root = inverse_pth_root(singular, 2)
    assert torch.isfinite(root).all()
    eigenvalues = torch.linalg.eigvalsh(singular)
    floor = torch.finfo(torch.float64).eps ** 0.5 * eigenvalues[-1]
    np.testing.assert_allclose(
        torch.linalg.eigvalsh(root)[-1].item(), floor.item() ** -0.5, rtol=1e-6
    )


def test_float32_input_returns_float32_and_matches_float64() -> None:
    matrix = torch.from_numpy(_random_psd(4, 4, 11)) + torch.eye(4, dtype=torch.float64)
    result = inverse_pth_root(matrix.float(), 4, 1e-3)
    assert result.dtype == torch.float32
    reference = inverse_pth_root(matrix, 4, 1e-3)
    np.testing.assert_allclose(result.double().numpy(), reference.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"root": 0}, ValueError, "root"),
        ({"root": 1.5}, TypeError, "root"),
        ({"root": True}, TypeError, "root"),
        ({"root": 2, "damping": -1.0}, ValueError, "damping"),
        ({"root": 2, "damping": float("nan")}, ValueError, "damping"),
        ({"root": 2, "damping": "small"}, TypeError, "damping"),
        ({"root": 2, "eigen_floor": 0.0}, ValueError, "eigen_floor"),
    ],
)
def test_bad_options_raise(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        inverse_pth_root(torch.eye(3, dtype=torch.float64), **kwargs)


def test_numpy_integer_root_is_accepted() -> None:
    matrix = _random_psd(4, 4, 5) + 0.1 * np.eye(4)
    result = inverse_pth_root(torch.from_numpy(matrix), np.int64(4)).numpy()
    expected = np.real(fractional_matrix_power(matrix, -0.25))
    np.testing.assert_allclose(result, expected, rtol=1e-9, atol=1e-12)


def test_nonnegative_powers_of_a_singular_matrix_are_not_floored() -> None:
    """A¹ = A, (A^½)² = A and 0^½ = 0 for a rank-2 PSD A; a floor would add √ε·λ_max."""
    singular = _random_psd(5, 2, 3)
    matrix = torch.from_numpy(singular)
    np.testing.assert_allclose(psd_matrix_power(matrix, 1.0).numpy(), singular, atol=1e-13)
    root = psd_matrix_power(matrix, 0.5).numpy()
    np.testing.assert_allclose(root @ root, singular, atol=1e-12)
    eigenvalues, eigenvectors = np.linalg.eigh(singular)
    expected = (eigenvectors * np.sqrt(eigenvalues.clip(min=0.0))) @ eigenvectors.T
    np.testing.assert_allclose(root, expected, atol=1e-6)
    zero = torch.zeros(3, 3, dtype=torch.float64)
    assert torch.equal(psd_matrix_power(zero, 0.5), zero)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.int64])
def test_non_real_floating_matrices_raise(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=re.escape(str(dtype))):
        psd_matrix_power(torch.eye(3, dtype=dtype), -0.5)


@pytest.mark.parametrize(("scale", "exponent"), [(1e-40, -1.0), (1e30, 2.0)])
def test_overflowing_float32_power_raises(scale: float, exponent: float) -> None:
    """(s I)^e overflows float32 (s^e > 3.4e38): raise, never return infs."""
    assert abs(exponent * np.log10(scale)) > 38.6
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        psd_matrix_power(scale * torch.eye(2, dtype=torch.float32), exponent)


def test_bad_matrices_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        psd_matrix_power(torch.ones(3, 2), 0.5)
    with pytest.raises(ValueError, match="infs or NaNs"):
        psd_matrix_power(torch.tensor([[1.0, 0.0], [0.0, float("inf")]]), 0.5)
    with pytest.raises(ValueError, match="exponent"):
        psd_matrix_power(torch.eye(2), float("inf"))
    with pytest.raises(torch.linalg.LinAlgError, match="damping"):
        inverse_pth_root(torch.zeros(3, 3), 2)
