"""A block-diagonal curvature operator with one dense block per parameter tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from natgrad.curvature.base import CurvatureOperator
from natgrad.linalg import damped_solve


class BlockDiagonal(CurvatureOperator):
    """Block-diagonal PSD matrix, one dense block per parameter tensor.

    Parameters
    ----------
    blocks : sequence of Tensor
        ``blocks[i]`` has shape ``(p_i, p_i)`` with ``p_i`` the size of parameter ``i``; each is
        symmetric positive semi-definite (a Fisher block: the MEAN over data points), finite.
    param_shapes : sequence of torch.Size
        Parameter shapes, in flat-vector order.

    Notes
    -----
    Each block is solved on its own with :func:`natgrad.linalg.damped_solve`.
    """

    def __init__(self, blocks: Sequence[Tensor], param_shapes: Sequence[torch.Size]) -> None:
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks must not be empty")
        super().__init__(param_shapes, blocks[0].dtype, blocks[0].device)
        if len(blocks) != len(self.param_shapes):
            raise ValueError(
                f"expected one block per parameter ({len(self.param_shapes)}), got {len(blocks)}"
            )
        for index, (block, size) in enumerate(zip(blocks, self.param_numels, strict=True)):
            if block.shape != (size, size):
                raise ValueError(
                    f"block {index} must have shape ({size}, {size}), got {tuple(block.shape)}"
                )
            if not bool(torch.isfinite(block).all()):
                raise ValueError(f"block {index} must not contain infs or NaNs")
        self.blocks = blocks

    def _split(self, vector: Tensor) -> tuple[Tensor, ...]:
        """``vector`` ``(P,)`` or ``(P, K)`` split into the blocks' rows."""
        return torch.split(vector, self.param_numels)

    def _mv_flat(self, vector: Tensor) -> Tensor:
        parts = self._split(vector)
        return torch.cat([block @ part for block, part in zip(self.blocks, parts, strict=True)])

    def _solve_flat(self, vector: Tensor, damping: float) -> Tensor:
        parts = self._split(vector)
        return torch.cat(
            [
                damped_solve(block, part, damping)
                for block, part in zip(self.blocks, parts, strict=True)
            ]
        )

    # ``block @ part`` and ``damped_solve`` take a block of columns ``(p_i, K)`` as they take a
    # vector ``(p_i,)``: the batched products are the same code.
    _mm_flat = _mv_flat
    _solve_block = _solve_flat

    def _diag_flat(self) -> Tensor:
        return torch.cat([block.diagonal() for block in self.blocks])

    def _to_dense(self) -> Tensor:
        return torch.block_diag(*self.blocks)
