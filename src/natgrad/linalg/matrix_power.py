"""Real powers of symmetric positive semi-definite matrices, inverse p-th roots in particular.

``(A + εI)^s`` is computed from the eigendecomposition of :func:`natgrad.linalg.psd_eigh`
(float64, eigenvalues clamped from below at ``eigen_floor × λ_max``), so a singular or slightly
indefinite ``A`` (rounding noise in accumulated statistics) never produces infs or NaNs. The
inverse p-th root ``(A + εI)^{-1/p}`` is the preconditioner of Shampoo (Gupta et al., 2018).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from natgrad.linalg.solve import add_damping, psd_eigh


def psd_matrix_power(
    matrix: Tensor, exponent: float, damping: float = 0.0, *, eigen_floor: float | None = None
) -> Tensor:
    """``(matrix + damping · I)^exponent`` for a symmetric positive semi-definite ``matrix``.

    Parameters
    ----------
    matrix : Tensor of shape (..., P, P)
        Symmetric PSD, batched over leading dimensions; only its symmetric part is used.
    exponent : float
        Any finite real power; negative powers act on the floored eigenvalues.
    damping : float, default 0.0
        Non-negative ``ε`` added to the diagonal before the power.
    eigen_floor : float, optional
        Relative eigenvalue floor in ``(0, 1]`` (see :func:`natgrad.linalg.psd_eigh`); the
        square root of the machine epsilon of ``matrix.dtype`` by default.

    Returns
    -------
    Tensor of shape (..., P, P) and the dtype of ``matrix``, symmetric.

    Raises
    ------
    ValueError
        If ``exponent`` or ``damping`` is not finite, ``damping`` is negative, or ``matrix``
        is not square or contains infs or NaNs.
    torch.linalg.LinAlgError
        If ``matrix + damping · I`` has no positive eigenvalue.
    """
    if not math.isfinite(exponent):
        raise ValueError(f"exponent must be finite, got {exponent!r}")
    if not (damping >= 0.0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite non-negative number, got {damping!r}")
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"matrix must have shape (..., P, P), got {tuple(matrix.shape)}")
    if eigen_floor is None:
        eigen_floor = torch.finfo(matrix.dtype).eps ** 0.5
    wide = add_damping(matrix.to(torch.float64), float(damping))
    eigenvalues, eigenvectors = psd_eigh(wide, eigen_floor)
    powered = (eigenvectors * eigenvalues.pow(exponent).unsqueeze(-2)) @ eigenvectors.mT
    return (0.5 * (powered + powered.mT)).to(matrix.dtype)


def inverse_pth_root(
    matrix: Tensor, root: int, damping: float = 0.0, *, eigen_floor: float | None = None
) -> Tensor:
    """``(matrix + damping · I)^{-1/root}`` for a symmetric positive semi-definite ``matrix``.

    Parameters
    ----------
    matrix : Tensor of shape (..., P, P)
        Symmetric PSD, batched over leading dimensions.
    root : int
        Positive integer ``p``; Shampoo uses ``p = 2k`` for an order-``k`` tensor.
    damping, eigen_floor
        As in :func:`psd_matrix_power`.

    Returns
    -------
    Tensor of shape (..., P, P) and the dtype of ``matrix``, symmetric positive definite.

    Raises
    ------
    ValueError
        If ``root`` is not a positive integer, or as in :func:`psd_matrix_power`.
    """
    if isinstance(root, bool) or not isinstance(root, int) or root < 1:
        raise ValueError(f"root must be a positive integer, got {root!r}")
    return psd_matrix_power(matrix, -1.0 / root, damping, eigen_floor=eigen_floor)
