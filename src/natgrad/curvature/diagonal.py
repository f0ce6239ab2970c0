"""A diagonal curvature operator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from natgrad.curvature.base import CurvatureOperator
from natgrad.linalg import default_eigen_floor


class Diagonal(CurvatureOperator):
    """Diagonal PSD matrix ``diag(d)`` over the flat parameter vector.

    Parameters
    ----------
    diagonal : Tensor of shape (P,)
        Non-negative entries (a Fisher diagonal: the MEAN over data points).
    param_shapes : sequence of torch.Size
        Parameter shapes, in flat-vector order; their sizes must add up to ``P``.

    Notes
    -----
    ``solve`` divides by ``d + λ`` with entries below ``default_eigen_floor(dtype) × max(d + λ)``
    raised to that floor, the rule of :func:`natgrad.linalg.damped_solve`'s eigenvalue clamping;
    it raises :class:`torch.linalg.LinAlgError` if ``d + λ`` has no positive entry.
    """

    def __init__(self, diagonal: Tensor, param_shapes: Sequence[torch.Size]) -> None:
        super().__init__(param_shapes, diagonal.dtype, diagonal.device)
        if diagonal.shape != (self.shape[0],):
            raise ValueError(
                f"diagonal must have shape ({self.shape[0]},) for these parameters, "
                f"got {tuple(diagonal.shape)}"
            )
        if not bool(torch.isfinite(diagonal).all()):
            raise ValueError("diagonal must not contain infs or NaNs")
        self.diagonal = diagonal

    def _mv_flat(self, vector: Tensor) -> Tensor:
        return self.diagonal * vector

    def _mm_flat(self, block: Tensor) -> Tensor:
        return self.diagonal.unsqueeze(1) * block

    def _solve_flat(self, vector: Tensor, damping: float) -> Tensor:
        return vector / self._damped_diagonal(damping)

    def _solve_block(self, block: Tensor, damping: float) -> Tensor:
        return block / self._damped_diagonal(damping).unsqueeze(1)

    def _damped_diagonal(self, damping: float) -> Tensor:
        """``d + λ``, its entries raised to ``default_eigen_floor(dtype) × max(d + λ)``."""
        damped = self.diagonal + damping
        largest = damped.max()
        if not bool(largest > 0):
            raise torch.linalg.LinAlgError(
                "diagonal has no positive entry; add damping > 0 to make the solve well posed"
            )
        return torch.clamp(damped, min=default_eigen_floor(self.dtype) * largest)

    def _diag_flat(self) -> Tensor:
        return self.diagonal.clone()

    def _to_dense(self) -> Tensor:
        return torch.diag(self.diagonal)
