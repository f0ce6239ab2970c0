"""Damped solves with symmetric positive semi-definite matrices.

The solve ``(A + λI)⁻¹ b`` is the numerical core of every natural-gradient step. It is computed
by a Cholesky factorisation of ``A + λI``; when that fails (``A + λI`` singular or indefinite to
working precision) the factorisation is retried in float64, and when that fails too the solve
falls back to an eigendecomposition whose eigenvalues are clamped from below at
``eigen_floor × λ_max`` (``λ_max`` the largest eigenvalue of ``A + λI``). The default floor is
``√ε`` of the input dtype (about ``1.5e-8`` in float64, ``3.5e-4`` in float32): it caps the
condition number at ``1/√ε``, so rounding noise in the matrix is amplified to at most ``√ε``
relative. The result is returned in the input dtype and is always finite: non-finite inputs
raise, and a matrix with no positive eigenvalue raises :class:`torch.linalg.LinAlgError` asking
for damping.
"""

from __future__ import annotations

import torch
from torch import Tensor

from natgrad.linalg.eigh import eigh


def default_eigen_floor(dtype: torch.dtype) -> float:
    """Default relative eigenvalue floor for ``dtype``: the square root of its machine epsilon."""
    return torch.finfo(dtype).eps ** 0.5


def _check_finite(name: str, tensor: Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must not contain infs or NaNs")


def _check_square(matrix: Tensor) -> None:
    if matrix.ndim < 2 or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"matrix must have shape (..., P, P), got {tuple(matrix.shape)}")


def _as_columns(matrix: Tensor, rhs: Tensor) -> tuple[Tensor, bool]:
    """Return ``rhs`` as ``(..., P, K)`` and whether it was a vector ``(..., P)``."""
    size = matrix.shape[-1]
    is_vector = rhs.ndim == matrix.ndim - 1
    columns = rhs.unsqueeze(-1) if is_vector else rhs
    if columns.ndim != matrix.ndim or columns.shape[-2] != size:
        raise ValueError(
            f"rhs must have shape (..., {size}) or (..., {size}, K) to match a matrix of shape "
            f"{tuple(matrix.shape)}, got {tuple(rhs.shape)}"
        )
    return columns, is_vector


def add_damping(matrix: Tensor, damping: float) -> Tensor:
    """Return ``matrix + damping · I`` (a new tensor), batched over leading dimensions."""
    if damping == 0.0:
        return matrix
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return matrix + damping * eye


def _cholesky_solve(matrix: Tensor, columns: Tensor) -> Tensor | None:
    """Solve by Cholesky; ``None`` if the factorisation fails or the result is not finite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if bool((info != 0).any()):
        return None
    solution = torch.cholesky_solve(columns, factor)
    return solution if bool(torch.isfinite(solution).all()) else None


def psd_eigh(matrix: Tensor, eigen_floor: float | None = None) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD matrix with eigenvalues clamped from below.

    The decomposition is computed in float64 (and returned in the input dtype). Each
    eigenvalue below ``eigen_floor × λ_max`` of its matrix is raised to that floor, so the
    result is positive definite.

    Parameters
    ----------
    matrix : Tensor of shape (..., P, P)
        Symmetric; only its symmetric part ``(M + Mᵀ) / 2`` is used.
    eigen_floor : float, optional
        Relative floor in ``(0, 1]``; :func:`default_eigen_floor` of ``matrix.dtype`` by default.

    Returns
    -------
    eigenvalues : Tensor of shape (..., P), ascending, all ``>= eigen_floor × λ_max``
    eigenvectors : Tensor of shape (..., P, P), orthonormal columns

    Raises
    ------
    ValueError
        If ``matrix`` contains infs or NaNs, or ``eigen_floor`` is not in ``(0, 1]``.
    torch.linalg.LinAlgError
        If a matrix has no positive eigenvalue (nothing to scale the floor by: add damping).
    """
    _check_square(matrix)
    _check_finite("matrix", matrix)
    if eigen_floor is None:
        eigen_floor = default_eigen_floor(matrix.dtype)
    if not 0.0 < eigen_floor <= 1.0:
        raise ValueError(f"eigen_floor must lie in (0, 1], got {eigen_floor!r}")
    wide = matrix.to(torch.float64)
    eigenvalues, eigenvectors = eigh(0.5 * (wide + wide.transpose(-1, -2)))
    largest = eigenvalues[..., -1:]
    if bool((largest <= 0).any()):
        raise torch.linalg.LinAlgError(
            "matrix has no positive eigenvalue; add damping > 0 to make the solve well posed"
        )
    clamped = torch.maximum(eigenvalues, eigen_floor * largest)
    return clamped.to(matrix.dtype), eigenvectors.to(matrix.dtype)


def _eigh_solve(matrix: Tensor, columns: Tensor, eigen_floor: float | None) -> Tensor:
    if eigen_floor is None:
        eigen_floor = default_eigen_floor(matrix.dtype)
    eigenvalues, eigenvectors = psd_eigh(matrix.to(torch.float64), eigen_floor)
    projected = eigenvectors.transpose(-1, -2) @ columns.to(torch.float64)
    return eigenvectors @ (projected / eigenvalues.unsqueeze(-1))


def damped_solve(
    matrix: Tensor, rhs: Tensor, damping: float = 0.0, *, eigen_floor: float | None = None
) -> Tensor:
    """Solve ``(matrix + damping · I) x = rhs`` for a symmetric PSD ``matrix``.

    Only the symmetric part ``(M + Mᵀ) / 2`` of ``matrix`` is used, on every path (a
    Cholesky factorisation alone would read just the lower triangle). Tries, in order:
    Cholesky in the input dtype; Cholesky in float64; an eigendecomposition in float64 with
    eigenvalues of ``matrix + damping · I`` clamped from below at ``eigen_floor × λ_max`` (see
    :func:`psd_eigh`). The last step turns a singular system into a well-posed one, so the
    result is always finite.

    Parameters
    ----------
    matrix : Tensor of shape (..., P, P)
        Symmetric positive semi-definite (its symmetric part is used), batched over leading
        dimensions.
    rhs : Tensor of shape (..., P) or (..., P, K)
        Right-hand side(s); a tensor with one dimension fewer than ``matrix`` is a vector.
    damping : float, default 0.0
        Non-negative Tikhonov damping ``λ``.
    eigen_floor : float, optional
        Relative eigenvalue floor of the eigendecomposition fallback;
        :func:`default_eigen_floor` of ``matrix.dtype`` by default.

    Returns
    -------
    Tensor with the shape and dtype of ``rhs``.

    Raises
    ------
    ValueError
        On mismatched shapes, negative or non-finite damping, or infs/NaNs in the inputs.
    torch.linalg.LinAlgError
        If ``matrix + damping · I`` has no positive eigenvalue, or the solution overflows the
        input dtype.
    """
    _check_square(matrix)
    if not (damping >= 0.0 and damping < float("inf")):
        raise ValueError(f"damping must be a finite non-negative number, got {damping!r}")
    columns, is_vector = _as_columns(matrix, rhs)
    _check_finite("matrix", matrix)
    _check_finite("rhs", rhs)
    damped = add_damping(0.5 * (matrix + matrix.transpose(-1, -2)), float(damping))
    solution = _cholesky_solve(damped, columns.to(damped.dtype))
    if solution is None and damped.dtype != torch.float64:
        solution = _cholesky_solve(damped.to(torch.float64), columns.to(torch.float64))
    if solution is None:
        solution = _eigh_solve(damped, columns, eigen_floor)
    result = solution.to(rhs.dtype)
    if not bool(torch.isfinite(result).all()):
        raise torch.linalg.LinAlgError(
            f"the solution overflows {rhs.dtype}; increase damping (currently {damping!r})"
        )
    return result.squeeze(-1) if is_vector else result


def damped_inverse(
    matrix: Tensor, damping: float = 0.0, *, eigen_floor: float | None = None
) -> Tensor:
    """``(matrix + damping · I)⁻¹`` by :func:`damped_solve` against the identity.

    Parameters
    ----------
    matrix : Tensor of shape (..., P, P)
        Symmetric positive semi-definite.
    damping, eigen_floor
        As in :func:`damped_solve`.

    Returns
    -------
    Tensor of shape (..., P, P), symmetrised.
    """
    _check_square(matrix)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    inverse = damped_solve(matrix, eye.expand_as(matrix), damping, eigen_floor=eigen_floor)
    return 0.5 * (inverse + inverse.transpose(-1, -2))
