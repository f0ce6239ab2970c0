"""A curvature operator stored as a dense ``(P, P)`` matrix."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from natgrad.curvature.base import CurvatureOperator
from natgrad.linalg import damped_solve


class Dense(CurvatureOperator):
    """Symmetric PSD matrix over the flat parameter vector, stored in full.

    Parameters
    ----------
    matrix : Tensor of shape (P, P)
        Symmetric positive semi-definite (a Fisher: the MEAN over data points), finite.
    param_shapes : sequence of torch.Size
        Parameter shapes, in flat-vector order; their sizes must add up to ``P``.

    Notes
    -----
    ``solve`` uses :func:`natgrad.linalg.damped_solve` (Cholesky, float64 retry, clamped
    eigendecomposition), so it returns a finite answer even for a singular matrix; a block of
    ``K`` columns is solved with one factorisation.
    """

    def __init__(self, matrix: Tensor, param_shapes: Sequence[torch.Size]) -> None:
        super().__init__(param_shapes, matrix.dtype, matrix.device)
        size = self.shape[0]
        if matrix.shape != (size, size):
            raise ValueError(
                f"matrix must have shape ({size}, {size}) for these parameters, "
                f"got {tuple(matrix.shape)}"
            )
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("matrix must not contain infs or NaNs")
        self.matrix = matrix

    def _mv_flat(self, vector: Tensor) -> Tensor:
        return self.matrix @ vector

    def _solve_flat(self, vector: Tensor, damping: float) -> Tensor:
        return damped_solve(self.matrix, vector, damping)

    # ``@`` and ``damped_solve`` take a block of columns ``(P, K)`` as they take a vector
    # ``(P,)``: the batched products are the same code.
    _mm_flat = _mv_flat
    _solve_block = _solve_flat

    def _diag_flat(self) -> Tensor:
        return self.matrix.diagonal().clone()

    def _to_dense(self) -> Tensor:
        return self.matrix.clone()
