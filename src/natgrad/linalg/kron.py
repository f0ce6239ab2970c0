"""Kronecker-product helpers for K-FAC style curvature blocks.

A layer with weight matrix ``W`` of shape ``(d_out, d_in)`` (a bias folded in as one extra input
column) has a curvature block ``G ⊗ A`` over ``W`` flattened **row-major** (the order of
``W.reshape(-1)``), with ``G`` of shape ``(d_out, d_out)`` (output-gradient factor) and ``A`` of
shape ``(d_in, d_in)`` (input factor). In the column-major notation of Martens & Grosse (2015)
the same block is written ``A ⊗ G``. Because both factors are symmetric,

    (G ⊗ A) vec(V) = vec(G V A)        (vec = row-major flattening, V of shape (d_out, d_in)).

With eigendecompositions ``G = Q_G diag(g) Q_Gᵀ`` and ``A = Q_A diag(a) Q_Aᵀ`` the block is
diagonal in the Kronecker eigenbasis, with eigenvalue matrix ``outer(g, a)`` of shape
``(d_out, d_in)``. EKFAC (George et al., 2018) replaces that matrix by a re-estimated one; all
eigenbasis products and damped solves here take an arbitrary eigenvalue matrix.

An input factor may be **diagonal**, held as the vector ``a`` of its diagonal, shape ``(d_in,)``
(an embedding's token frequencies): ``(G ⊗ diag(a)) vec(V) = vec(G V diag(a))``, its eigenbasis
is ``Q_G`` and the standard basis (:func:`factor_eigh`; ``vectors=None``), and no
``(d_in, d_in)`` matrix is formed but by :func:`block_diagonal_kron`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from natgrad.linalg.eigh import eigh
from natgrad.linalg.finite import all_finite

__all__ = [
    "SymmetricEigen",
    "block_diagonal_kron",
    "damped_factor_inverses",
    "eigenbasis_mv",
    "eigenbasis_project",
    "eigenbasis_solve",
    "factor_eigh",
    "factored_damping",
    "factored_damping_from_factors",
    "factored_solve",
    "grouped_factored_damping",
    "kron_diagonal",
    "kron_mv",
    "symmetric_eigh",
    "symmetric_eigh_batch",
]


class SymmetricEigen:
    """Eigendecomposition ``M = vectors diag(values) vectorsᵀ`` of a symmetric PSD factor.

    Attributes
    ----------
    values : Tensor of shape (d,)
        Eigenvalues, clamped at zero.
    vectors : Tensor of shape (d, d) or None
        Orthonormal eigenvectors as columns; ``None`` for a diagonal factor ``diag(values)``
        (the identity basis, never formed), as for the token factor of an embedding.

    A stack of ``g`` factors (the groups of a grouped convolution) has values ``(g, d)`` and
    vectors ``(g, d, d)``; the products of this module are batched over it.
    """

    def __init__(self, values: Tensor, vectors: Tensor | None) -> None:
        self.values = values
        self.vectors = vectors

    def __repr__(self) -> str:
        return f"SymmetricEigen(dim={self.values.shape[-1]}, dtype={self.values.dtype})"


def _eigh_or_none(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    try:
        values, vectors = eigh(matrix)
    except RuntimeError:
        return None
    if not all_finite(values, vectors):
        return None
    return values, vectors


def symmetric_eigh(matrix: Tensor) -> SymmetricEigen:
    """Eigendecomposition of a symmetric PSD matrix, retried in float64 on failure.

    The matrix is symmetrised (``(M + Mᵀ) / 2``) first; low-precision (float16/bfloat16) and
    integer inputs are decomposed in float32. Negative eigenvalues (round-off of a PSD matrix)
    are clamped to zero. Results are returned in the working dtype (float32 for low-precision
    and integer inputs).

    Parameters
    ----------
    matrix : Tensor of shape (d, d), or (g, d, d) for a stack (decomposed in one batch)

    Returns
    -------
    SymmetricEigen

    Raises
    ------
    ValueError
        If ``matrix`` is not square or contains non-finite entries.
    torch.linalg.LinAlgError
        If the decomposition fails even in float64.
    """
    _check_square_or_stack(matrix)
    if not all_finite(matrix):
        raise ValueError("cannot eigendecompose a matrix with non-finite entries")
    return SymmetricEigen(*_decompose(matrix))


def factor_eigh(factor: Tensor) -> SymmetricEigen:
    """Eigendecomposition of a Kronecker factor: :func:`symmetric_eigh` of a matrix or stack;
    a vector is a diagonal factor, whose eigenbasis is the standard one (``vectors=None``) and
    eigenvalues its entries, clamped at zero, in the working dtype (float32 for low-precision
    and integer inputs).

    Parameters
    ----------
    factor : Tensor of shape (d, d) or (g, d, d), or (d,) for a diagonal factor

    Returns
    -------
    SymmetricEigen

    Raises
    ------
    ValueError
        If ``factor`` is not of those shapes or contains non-finite entries.
    torch.linalg.LinAlgError
        If the decomposition of a matrix fails even in float64.
    """
    if factor.ndim != 1:
        return symmetric_eigh(factor)
    if not all_finite(factor):
        raise ValueError("cannot eigendecompose a factor with non-finite entries")
    return SymmetricEigen(factor.to(_working_dtype(factor.dtype)).clamp_min(0), None)


def symmetric_eigh_batch(matrices: Sequence[Tensor]) -> list[SymmetricEigen]:
    """:func:`symmetric_eigh` of each matrix, with one batched decomposition (and one
    finiteness check) per group of equal size, dtype and device.

    Equal to decomposing the matrices one by one up to round-off (a batched LAPACK call may
    round differently); a group that fails is retried in float64 as a whole.

    Parameters
    ----------
    matrices : sequence of Tensor, each of shape (d_i, d_i)

    Returns
    -------
    list of SymmetricEigen, in the order of ``matrices``

    Raises
    ------
    ValueError
        If a matrix is not square or contains non-finite entries.
    torch.linalg.LinAlgError
        If a decomposition fails even in float64.
    """
    results: list[SymmetricEigen | None] = [None] * len(matrices)
    for indices in _groups_of_equal_kind(matrices, range(len(matrices))):
        stacked = torch.stack([matrices[index] for index in indices])
        if not all_finite(stacked):
            raise ValueError("cannot eigendecompose a matrix with non-finite entries")
        values, vectors = _decompose(stacked)
        for index, value, vector in zip(indices, values.unbind(), vectors.unbind(), strict=True):
            results[index] = SymmetricEigen(value, vector)
    return results


def _groups_of_equal_kind(matrices: Sequence[Tensor], indices: Iterable[int]) -> list[list[int]]:
    """``indices`` of square ``matrices`` grouped by size, dtype and device (one batched LAPACK
    call per group)."""
    groups: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
    for index in indices:
        matrix = matrices[index]
        _check_square(matrix)
        groups.setdefault((matrix.shape[0], matrix.dtype, matrix.device), []).append(index)
    return list(groups.values())


def _check_square_or_stack(matrix: Tensor) -> None:
    """A square matrix ``(d, d)`` or a stack of them ``(g, d, d)``."""
    if matrix.ndim not in (2, 3) or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(
            f"expected a square matrix (d, d) or a stack (g, d, d), got shape {tuple(matrix.shape)}"
        )


def _check_square(matrix: Tensor) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")


def _decompose(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at zero) and eigenvectors of the symmetrised finite matrices
    ``(..., d, d)``, retried in float64 on failure, in the working dtype."""
    working_dtype = _working_dtype(matrices.dtype)
    symmetric = 0.5 * (matrices + matrices.mT).to(working_dtype)
    result = _eigh_or_none(symmetric)
    if result is None and working_dtype != torch.float64:
        result = _eigh_or_none(symmetric.double())
    if result is None:
        raise torch.linalg.LinAlgError("eigendecomposition failed even in float64")
    values, vectors = result
    return values.clamp_min(0).to(working_dtype), _row_major(vectors.to(working_dtype))


def _row_major(matrices: Tensor) -> Tensor:
    """``matrices`` in contiguous (row-major) memory, as a copy where LAPACK returned them
    column-major. Every result of this module has this one layout, so that a process that
    receives it by broadcast into a contiguous buffer multiplies with it exactly as the
    process that computed it: the BLAS rounds differently for other strides."""
    return matrices.contiguous()


def _symmetric_row_major(matrices: Tensor) -> Tensor:
    """:func:`_row_major` for matrices symmetric by construction (inverses of symmetric
    matrices): the transpose of a column-major result is row-major without a copy, and holds
    the same matrices."""
    transposed = matrices.mT
    return transposed if transposed.is_contiguous() else matrices.contiguous()


def kron_mv(output_factor: Tensor, input_factor: Tensor, matrix: Tensor) -> Tensor:
    """``(G ⊗ A) vec(V)`` as the matrix ``G V A``.

    Parameters
    ----------
    output_factor : Tensor of shape (d_out, d_out)
        Symmetric factor ``G``.
    input_factor : Tensor of shape (d_in, d_in), or (d_in,) for a diagonal factor
        Symmetric factor ``A``; a vector ``a`` stands for ``diag(a)`` (``G V diag(a)``, the
        columns of ``G V`` scaled).
    matrix : Tensor of shape (..., d_out, d_in)
        ``V``, the row-major reshaping of the vector; leading batch dimensions broadcast.

    Returns
    -------
    Tensor of shape (..., d_out, d_in)
    """
    if input_factor.ndim == 1:
        return (output_factor @ matrix) * input_factor
    return output_factor @ matrix @ input_factor


def kron_diagonal(output_factor: Tensor, input_factor: Tensor) -> Tensor:
    """The diagonal of ``G ⊗ A`` as the ``(d_out, d_in)`` matrix ``outer(diag G, diag A)``
    (row-major order); for stacks ``(g, d_out, d_out)`` and ``(g, d_in, d_in)`` one per group,
    ``(g, d_out, d_in)``.

    Parameters
    ----------
    output_factor : Tensor of shape (d_out, d_out) or (g, d_out, d_out)
    input_factor : Tensor of shape (d_in, d_in) or (g, d_in, d_in), or (d_in,) for a diagonal
        factor (with a matrix ``G``)
    """
    input_diagonal = input_factor if input_factor.ndim == 1 else input_factor.diagonal(0, -2, -1)
    return output_factor.diagonal(0, -2, -1).unsqueeze(-1) * input_diagonal.unsqueeze(-2)


def block_diagonal_kron(output_factor: Tensor, input_factor: Tensor) -> Tensor:
    """The dense block ``G ⊗ A``, shape ``(d_out d_in, d_out d_in)``; for stacks ``(g, d_out,
    d_out)`` and ``(g, d_in, d_in)`` the block-diagonal matrix of the ``g`` blocks
    ``G_j ⊗ A_j`` (in the row-major order of a ``(g, d_out, d_in)`` matrix stack). A vector
    ``input_factor`` ``(d_in,)`` with a matrix ``G`` is the diagonal factor ``diag(a)``.

    Raises
    ------
    ValueError
        If the factors are not both matrices or both stacks of as many matrices (or a matrix
        and a vector).
    """
    if input_factor.ndim == 1:
        _check_square(output_factor)
        return torch.kron(output_factor, torch.diag(input_factor))
    _check_stacks(output_factor, input_factor)
    if output_factor.ndim == 2:
        return torch.kron(output_factor, input_factor)
    pairs = zip(output_factor, input_factor, strict=True)
    return torch.block_diag(*(torch.kron(output, inputs) for output, inputs in pairs))


def eigenbasis_project(
    output_eigen: SymmetricEigen, input_eigen: SymmetricEigen, matrix: Tensor
) -> Tensor:
    """Coordinates of ``vec(V)`` in the Kronecker eigenbasis: ``Q_Gᵀ V Q_A``, shape (d_out, d_in).

    ``matrix`` may carry leading batch dimensions, ``(..., d_out, d_in)``.
    """
    if output_eigen.vectors is not None:
        matrix = output_eigen.vectors.mT @ matrix
    if input_eigen.vectors is not None:
        matrix = matrix @ input_eigen.vectors
    return matrix


def _eigenbasis_unproject(
    output_eigen: SymmetricEigen, input_eigen: SymmetricEigen, coordinates: Tensor
) -> Tensor:
    if output_eigen.vectors is not None:
        coordinates = output_eigen.vectors @ coordinates
    if input_eigen.vectors is not None:
        coordinates = coordinates @ input_eigen.vectors.mT
    return coordinates


def eigenbasis_mv(
    output_eigen: SymmetricEigen, input_eigen: SymmetricEigen, eigenvalues: Tensor, matrix: Tensor
) -> Tensor:
    """``(Q_G ⊗ Q_A) diag(vec S) (Q_G ⊗ Q_A)ᵀ vec(V)`` as a ``(d_out, d_in)`` matrix.

    Parameters
    ----------
    output_eigen, input_eigen : SymmetricEigen
        Eigenbases of ``G`` (``d_out``) and ``A`` (``d_in``).
    eigenvalues : Tensor of shape (d_out, d_in)
        ``S``; ``outer(g, a)`` gives K-FAC, a re-estimated matrix gives EKFAC.
    matrix : Tensor of shape (..., d_out, d_in)
        Leading batch dimensions broadcast.
    """
    coordinates = eigenbasis_project(output_eigen, input_eigen, matrix)
    return _eigenbasis_unproject(output_eigen, input_eigen, coordinates * eigenvalues)


def _damped_reciprocal(eigenvalues: Tensor, damping: float) -> Tensor:
    """``1 / (S + λ)``; at ``λ = 0`` eigenvalues at round-off level are treated as zero (pinv),
    relative to the largest of each ``(d_out, d_in)`` matrix of a batch ``(..., d_out, d_in)``."""
    shifted = eigenvalues + damping
    if damping > 0:
        return shifted.reciprocal()
    if eigenvalues.numel():
        largest = eigenvalues.abs().amax(dim=(-2, -1), keepdim=True)
    else:
        largest = eigenvalues.new_tensor(0.0)
    tolerance = max(eigenvalues.shape[-2:]) * torch.finfo(eigenvalues.dtype).eps * largest
    keep = shifted > tolerance
    return torch.where(keep, shifted, torch.ones_like(shifted)).reciprocal() * keep


def eigenbasis_solve(
    output_eigen: SymmetricEigen,
    input_eigen: SymmetricEigen,
    eigenvalues: Tensor,
    matrix: Tensor,
    damping: float,
) -> Tensor:
    """Exact eigenbasis damping: ``(C + λI)⁻¹ vec(V)`` with ``C`` as in :func:`eigenbasis_mv`.

    With ``damping == 0`` the Moore–Penrose pseudo-inverse is applied: eigenvalues below
    ``max(d_out, d_in) · eps · max(S)`` are treated as zero instead of dividing by them.

    Returns
    -------
    Tensor of shape (d_out, d_in)

    Raises
    ------
    ValueError
        If ``damping`` is negative or not finite.
    """
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be finite and non-negative, got {damping!r}")
    coordinates = eigenbasis_project(output_eigen, input_eigen, matrix)
    scaled = coordinates * _damped_reciprocal(eigenvalues, damping)
    return _eigenbasis_unproject(output_eigen, input_eigen, scaled)


def factored_damping(
    output_eigen: SymmetricEigen, input_eigen: SymmetricEigen, damping: float
) -> tuple[float, float]:
    """Factored Tikhonov damping with Martens & Grosse's π: ``(λ_G, λ_A) = (√λ / π, π √λ)``.

    ``π = sqrt((tr A / d_in) / (tr G / d_out))``; ``π = 1`` if either trace vanishes.
    ``(G + λ_G I) ⊗ (A + λ_A I)`` then approximates ``G ⊗ A + λ I``.

    Raises
    ------
    ValueError
        If ``damping`` is negative or not finite (also in the functions below that split it).
    """
    return _split_damping(
        float(output_eigen.values.mean()), float(input_eigen.values.mean()), damping
    )


def factored_damping_from_factors(
    output_factor: Tensor, input_factor: Tensor, damping: float
) -> tuple[float, float]:
    """:func:`factored_damping` from the factors themselves (their traces), without
    eigendecompositions.

    Parameters
    ----------
    output_factor : Tensor of shape (d_out, d_out)
        ``G``.
    input_factor : Tensor of shape (d_in, d_in), or (d_in,) for a diagonal factor
        ``A`` (a vector holds the diagonal of a diagonal factor).
    damping : float
        ``λ``.

    Returns
    -------
    (float, float)
        ``(λ_G, λ_A)``.
    """
    means = torch.stack([output_factor.diagonal().mean(), _diagonal_of(input_factor).mean()])
    mean_output, mean_input = means.tolist()
    return _split_damping(mean_output, mean_input, damping)


def _diagonal_of(factor: Tensor) -> Tensor:
    return factor if factor.ndim == 1 else factor.diagonal()


def grouped_factored_damping(
    output_factors: Tensor, input_factors: Tensor, damping: float
) -> list[tuple[float, float]]:
    """:func:`factored_damping_from_factors` of each of ``g`` pairs of factors (the groups of
    a grouped convolution), with one read-back for all.

    Parameters
    ----------
    output_factors : Tensor of shape (g, d_out, d_out)
    input_factors : Tensor of shape (g, d_in, d_in)
    damping : float

    Returns
    -------
    list of (float, float)
        ``(λ_G, λ_A)`` per group.

    Raises
    ------
    ValueError
        If the factors are not stacks of as many matrices.
    """
    _check_stacks(output_factors, input_factors)
    if output_factors.ndim != 3:
        raise ValueError(f"expected stacks (g, d, d), got shape {tuple(output_factors.shape)}")
    return _group_dampings(
        output_factors.diagonal(dim1=-2, dim2=-1).mean(-1),
        input_factors.diagonal(dim1=-2, dim2=-1).mean(-1),
        damping,
    )


def _check_stacks(output_factor: Tensor, input_factor: Tensor) -> None:
    """Both factors square matrices, or both stacks ``(g, d, d)`` of the same ``g``."""
    _check_square_or_stack(output_factor)
    _check_square_or_stack(input_factor)
    if output_factor.shape[:-2] != input_factor.shape[:-2]:
        raise ValueError(
            f"the factors must stack as many matrices, got shapes {tuple(output_factor.shape)} "
            f"and {tuple(input_factor.shape)}"
        )


def _group_dampings(
    mean_outputs: Tensor, mean_inputs: Tensor, damping: float
) -> list[tuple[float, float]]:
    """``(λ_G, λ_A)`` per group from the factors' mean eigenvalues ``(g,)``, one read-back."""
    outputs, inputs = torch.stack([mean_outputs, mean_inputs]).tolist()
    return [
        _split_damping(mean_output, mean_input, damping)
        for mean_output, mean_input in zip(outputs, inputs, strict=True)
    ]


def _split_damping(mean_output: float, mean_input: float, damping: float) -> tuple[float, float]:
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be finite and non-negative, got {damping!r}")
    pi = math.sqrt(mean_input / mean_output) if mean_input > 0 and mean_output > 0 else 1.0
    root = math.sqrt(damping)
    return root / pi, root * pi


def damped_factor_inverses(matrices: Sequence[Tensor], dampings: Sequence[float]) -> list[Tensor]:
    """``(M_i + λ_i I)⁻¹`` of symmetric PSD factors by Cholesky, without eigendecompositions.

    One batched ``torch.linalg.cholesky_ex`` and ``torch.cholesky_inverse`` per group of equal
    size, dtype and device (on the CPU a size that MKL factorises slowly, 128, is factorised
    bordered by a zero row and column; equal to the unbordered inverse up to round-off).
    Matrices whose Cholesky fails (a damped factor that round-off made indefinite, e.g. a
    singular factor with a tiny ``λ_i``) or cannot be trusted (``λ_i`` below 100 · eps ·
    ``tr(M_i)``, where round-off rivals the damping) are damped anew and inverted in float64,
    and if that fails too (or ``λ_i`` is below that bound in float64), inverted in their
    eigenbasis with eigenvalues clamped at zero, ``Q diag(1 / (max(s, 0) + λ_i)) Qᵀ`` (what
    :func:`symmetric_eigh` gives). Low-precision and integer inputs are inverted in float32. A
    1-D tensor is a diagonal factor: its inverse is the vector ``1 / (max(m, 0) + λ_i)``.

    Parameters
    ----------
    matrices : sequence of Tensor, each of shape (d_i, d_i) or (d_i,)
    dampings : sequence of float
        ``λ_i > 0``, one per matrix.

    Returns
    -------
    list of Tensor, in the order and shapes of ``matrices``, in the working dtype

    Raises
    ------
    ValueError
        If the lengths differ, a damping is not positive and finite, a matrix is not square
        or contains non-finite entries.
    """
    if len(matrices) != len(dampings):
        raise ValueError(f"got {len(matrices)} matrices but {len(dampings)} dampings")
    bad = [damping for damping in dampings if not (math.isfinite(damping) and damping > 0)]
    if bad:
        raise ValueError(f"dampings must be positive and finite, got {bad[0]!r}")
    results: list[Tensor | None] = [None] * len(matrices)
    square = []
    for index, matrix in enumerate(matrices):
        if matrix.ndim == 1:
            results[index] = _diagonal_inverse(matrix, dampings[index])
        else:
            square.append(index)
    groups = _groups_of_equal_kind(matrices, square)
    stacks = [_stacked_for_cholesky([matrices[index] for index in group]) for group in groups]
    if stacks and not all_finite(*stacks):  # the matrices, stacked (with zero borders)
        raise ValueError("cannot invert a factor with non-finite entries")
    for group, stacked in zip(groups, stacks, strict=True):
        inverses = _cholesky_inverses(
            stacked, [matrices[index] for index in group], [dampings[index] for index in group]
        )
        for index, inverse in zip(group, inverses.unbind(), strict=True):
            results[index] = inverse
    return results


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _diagonal_inverse(diagonal: Tensor, damping: float) -> Tensor:
    if not all_finite(diagonal):
        raise ValueError("cannot invert a factor with non-finite entries")
    return (diagonal.to(_working_dtype(diagonal.dtype)).clamp_min(0) + damping).reciprocal()


def _cholesky_or_failures(
    damped: Tensor, too_little_damped: list[bool], size: int
) -> tuple[Tensor, list[int]]:
    """Cholesky inverses ``(B, size, size)`` (row-major) of the leading ``size × size`` blocks
    of ``damped`` (``(B, D, D)``, ``D ≥ size``, bordered: :func:`_stacked_for_cholesky`), and
    the batch positions whose factorisation failed or cannot be trusted (their entries are the
    identity or round-off, to be overwritten).

    A factorisation that succeeds is still untrusted where ``too_little_damped``
    (:func:`_below_round_off`): its round-off then rivals the damping, and the inverse of a
    singular factor comes out wrong by orders of magnitude, even indefinite.
    """
    factor, info = torch.linalg.cholesky_ex(damped)
    statuses = zip(info.tolist(), too_little_damped, strict=True)
    failed = [position for position, (code, low) in enumerate(statuses) if code or low]
    if failed:
        factor[failed] = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    if factor.shape[-1] != size:  # bordered: the leading block is the matrices' factor
        factor = factor[..., :size, :size]
    return _symmetric_row_major(torch.cholesky_inverse(factor)), failed


_ROUND_OFF_MARGIN = 100.0
"""How far the damping must exceed ``eps · tr(M)`` (which bounds Cholesky's round-off, of
order ``eps ‖M‖₂``, for a PSD ``M``) for a Cholesky inverse to be trusted: 100 keeps the
float32 inverses of singular factors within about 0.3% of the float64 ones."""


def _below_round_off(diagonals: Tensor, dampings: list[float]) -> list[bool]:
    """Whether each damping of undamped matrices with ``(B, d)`` ``diagonals`` lies below
    ``_ROUND_OFF_MARGIN · eps · tr(M_b)`` in their dtype (a diagonal sum, read back with the
    factorisation's status: the check costs little beside the factorisation)."""
    scale = _ROUND_OFF_MARGIN * torch.finfo(diagonals.dtype).eps
    traces = diagonals.sum(dim=-1).tolist()
    return [damping < scale * trace for damping, trace in zip(dampings, traces, strict=True)]


_BORDERED_SIZES = frozenset({128})
"""Sizes ``d`` whose damped factors are factorised bordered by one zero row and column,
``[[M + λI, 0], [0, λ]]``, whose Cholesky factor is ``[[L, 0], [0, √λ]]`` (the leading block
is ``M + λI``'s factor, inverted alone). MKL's ``potrf`` (torch 2.13, CPU, one thread) takes
2.5 times as long at d = 128 as at 129: measured, the whole inversion at d = 128 bordered takes
0.83–0.96 of the unbordered time (float32 and float64, one matrix or two), at 32, 64, 96, 192
and 256 1.03–1.24 (not bordered)."""


def _stacked_for_cholesky(matrices: list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """``matrices`` (of one size ``d``) stacked in ``dtype`` (default: their working dtype,
    float32 for low-precision and integer ones), a copy to damp in place, bordered
    by a zero row and column (``(B, d + 1, d + 1)``) on the CPU where ``d`` is in
    :data:`_BORDERED_SIZES` (measured with MKL's LAPACK, not on accelerators)."""
    stacked = torch.stack(matrices)
    dtype = _working_dtype(stacked.dtype) if dtype is None else dtype
    if stacked.dtype != dtype:
        stacked = stacked.to(dtype)
    if stacked.shape[-1] in _BORDERED_SIZES and stacked.device.type == "cpu":
        return torch.nn.functional.pad(stacked, (0, 1, 0, 1))
    return stacked


def _cholesky_inverses(stacked: Tensor, matrices: list[Tensor], dampings: list[float]) -> Tensor:
    """``(M_b + λ_b I)⁻¹`` for finite symmetric ``(d, d)`` matrices of one size, dtype and
    device, from their ``stacked`` copy in the working dtype (:func:`_stacked_for_cholesky`,
    damped in place: bordered where :data:`_BORDERED_SIZES` says so); failures (and dampings
    too small for the working dtype's round-off) retried in float64, damped anew there, then by
    clamped eigendecomposition."""
    working_dtype = stacked.dtype
    size = matrices[0].shape[-1]
    inverses, failed = _cholesky_or_failures(*_damped_in_place(stacked, dampings), size)
    if not failed:
        return inverses
    retry_dampings = [dampings[index] for index in failed]
    retry = _stacked_for_cholesky([matrices[index] for index in failed], torch.float64)
    retried, still_failed = _cholesky_or_failures(*_damped_in_place(retry, retry_dampings), size)
    for position, index in enumerate(failed):
        if position not in still_failed:
            inverses[index] = retried[position].to(working_dtype)
            continue
        values, vectors = _decompose(matrices[index].double())
        inverse = (vectors / (values + dampings[index])) @ vectors.mT
        inverses[index] = inverse.to(working_dtype)
    return inverses


def _damped_in_place(matrices: Tensor, dampings: list[float]) -> tuple[Tensor, list[bool]]:
    """``M_b + λ_b I`` of ``(B, d, d)`` matrices, in place (a zero border becomes ``λ_b I``),
    and which dampings lie below their round-off (:func:`_below_round_off`, judged before
    damping). The dampings are added to all diagonals in one operation, in the matrices'
    dtype (as a Python number is)."""
    diagonals = matrices.diagonal(dim1=-2, dim2=-1)
    too_little_damped = _below_round_off(diagonals, dampings)
    if len(dampings) == 1:
        diagonals.add_(dampings[0])
    else:
        diagonals.add_(diagonals.new_tensor([[damping] for damping in dampings]))
    return matrices, too_little_damped


def factored_solve(
    output_eigen: SymmetricEigen, input_eigen: SymmetricEigen, matrix: Tensor, damping: float
) -> Tensor:
    """Factored π-damping: ``(G + λ_G I)⁻¹ V (A + λ_A I)⁻¹`` with ``λ_G, λ_A`` from
    :func:`factored_damping` (for stacked eigendecompositions, one π per group).

    Raises
    ------
    ValueError
        If ``damping`` is not positive and finite (the factored form needs it to be
        invertible).
    """
    if not (math.isfinite(damping) and damping > 0):
        raise ValueError(f"factored damping needs damping > 0, got {damping!r}")
    output_values, input_values = output_eigen.values, input_eigen.values
    means = (values.mean(-1).reshape(-1) for values in (output_values, input_values))
    pairs = _group_dampings(*means, damping)
    shape = (*output_values.shape[:-1], 1)  # one π per group, broadcast over the eigenvalues
    output_damping, input_damping = (
        output_values.new_tensor(side).reshape(shape) for side in zip(*pairs, strict=True)
    )
    eigenvalues = (output_values + output_damping).unsqueeze(-1) * (
        input_values + input_damping
    ).unsqueeze(-2)
    coordinates = eigenbasis_project(output_eigen, input_eigen, matrix)
    return _eigenbasis_unproject(output_eigen, input_eigen, coordinates / eigenvalues)
