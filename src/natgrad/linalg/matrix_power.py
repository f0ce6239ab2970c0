"""Real powers of symmetric positive semi-definite matrices, inverse p-th roots in particular.

``(A + εI)^s`` is computed from a float64 eigendecomposition. For a negative ``s`` the
eigenvalues are those of :func:`natgrad.linalg.psd_eigh` (clamped from below at
``eigen_floor × λ_max``), so a singular or slightly indefinite ``A`` (rounding noise in
accumulated statistics) never produces infs or NaNs; for ``s >= 0`` they are only clamped at
zero, so that ``A^1 = A`` and ``(A^{1/2})² = A`` hold for a singular ``A`` too. The inverse
p-th root ``(A + εI)^{-1/p}`` is the preconditioner of Shampoo (Gupta et al., 2018).
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad._validation import finite_float, nonnegative_float, positive_int
from natgrad.linalg.eigh import eigh
from natgrad.linalg.solve import add_damping, psd_eigh


def psd_matrix_power(
    matrix: Tensor, exponent: float, damping: float = 0.0, *, eigen_floor: float | None = None
) -> Tensor:
    """``(matrix + damping · I)^exponent`` for a symmetric positive semi-definite ``matrix``.

    Parameters
    ----------
    matrix : Tensor of shape (..., P, P)
        Real floating point, symmetric PSD, batched over leading dimensions; only its
        symmetric part is used.
    exponent : float
        Any finite real power; negative powers act on the floored eigenvalues, non-negative
        powers on the eigenvalues clamped at zero.
    damping : float, default 0.0
        Non-negative ``ε`` added to the diagonal before the power.
    eigen_floor : float, optional
        Relative eigenvalue floor in ``(0, 1]`` (see :func:`natgrad.linalg.psd_eigh`) of a
        negative power; the square root of the machine epsilon of ``matrix.dtype`` by default.

    Returns
    -------
    Tensor of shape (..., P, P) and the dtype of ``matrix``, symmetric.

    Raises
    ------
    TypeError
        If ``exponent`` or ``damping`` is not a real number, or ``matrix`` is not of a real
        floating point dtype.
    ValueError
        If ``exponent`` or ``damping`` is not finite, ``damping`` is negative, ``eigen_floor``
        is outside ``(0, 1]``, ``matrix`` is not square or contains infs or NaNs, or the
        result overflows ``matrix.dtype``.
    torch.linalg.LinAlgError
        If ``exponent < 0`` and ``matrix + damping · I`` has no positive eigenvalue.
    """
    exponent = finite_float("exponent", exponent)
    damping = nonnegative_float("damping", damping)
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"matrix must have shape (..., P, P), got {tuple(matrix.shape)}")
    if not matrix.dtype.is_floating_point:
        raise TypeError(f"matrix must have a real floating point dtype, got {matrix.dtype}")
    if eigen_floor is None:
        eigen_floor = torch.finfo(matrix.dtype).eps ** 0.5
    if not 0.0 < eigen_floor <= 1.0:
        raise ValueError(f"eigen_floor must lie in (0, 1], got {eigen_floor!r}")
    wide = add_damping(matrix.to(torch.float64), damping)
    if exponent < 0:
        eigenvalues, eigenvectors = psd_eigh(wide, eigen_floor)
    else:
        eigenvalues, eigenvectors = _clamped_eigh(wide)
    powered = (eigenvectors * eigenvalues.pow(exponent).unsqueeze(-2)) @ eigenvectors.mT
    result = (0.5 * (powered + powered.mT)).to(matrix.dtype)
    if not bool(torch.isfinite(result).all()):
        raise ValueError(f"the power overflows {matrix.dtype}: compute it in a wider dtype")
    return result


def _clamped_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of the symmetric part of a finite ``matrix``, eigenvalues ``>= 0``."""
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("matrix must not contain infs or NaNs")
    eigenvalues, eigenvectors = eigh(0.5 * (matrix + matrix.mT))
    return eigenvalues.clamp(min=0.0), eigenvectors


def inverse_pth_root(
    matrix: Tensor, root: int, damping: float = 0.0, *, eigen_floor: float | None = None
) -> Tensor:
    """``(matrix + damping · I)^{-1/root}`` for a symmetric positive semi-definite ``matrix``.

    Parameters
    ----------
    matrix : Tensor of shape (..., P, P)
        Symmetric PSD, batched over leading dimensions.
    root : int
        Positive integer ``p`` (Python or NumPy); Shampoo uses ``p = 2k`` for an order-``k`` tensor.
    damping, eigen_floor
        As in :func:`psd_matrix_power`.

    Returns
    -------
    Tensor of shape (..., P, P) and the dtype of ``matrix``, symmetric positive definite.

    Raises
    ------
    TypeError
        If ``root`` is not an integer, or as in :func:`psd_matrix_power`.
    ValueError
        If ``root < 1``, or as in :func:`psd_matrix_power`.
    """
    root = positive_int("root", root)
    return psd_matrix_power(matrix, -1.0 / root, damping, eigen_floor=eigen_floor)
