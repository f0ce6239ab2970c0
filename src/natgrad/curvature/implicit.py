"""A matrix-free curvature operator: products only, solves by conjugate gradients."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.func import vmap

from natgrad.curvature.base import CurvatureOperator
from natgrad.linalg import CGInfo, cg

MatVec = Callable[[Tensor], Tensor]
MAX_CG_ITERATIONS = 1000
"""Default cap on conjugate-gradient iterations per solve."""
COLUMN_CHUNK = 64
"""Number of unit vectors pushed through one vmapped product by ``diag`` and ``to_dense``."""


class Implicit(CurvatureOperator):
    """Curvature operator known only through its products ``v ↦ C v``.

    Parameters
    ----------
    matvec : callable
        ``v ↦ C v`` for flat ``(P,)`` vectors, for a symmetric PSD ``C`` (a Fisher: the MEAN over
        data points). The builders make it from ``torch.func`` jvp/vjp; it must be vmappable for
        :meth:`diag` and :meth:`to_dense`.
    param_shapes : sequence of torch.Size
        Parameter shapes, in flat-vector order.
    dtype, device
        Of the vectors ``matvec`` acts on.
    cg_rtol : float, optional
        Relative residual tolerance of the conjugate-gradient solve; the square root of the
        dtype's machine epsilon by default.
    cg_max_iter : int, optional
        Iteration cap of the solve; ``min(10 · P, 1000)`` by default.

    Notes
    -----
    The matrix is never formed by ``mv`` or ``solve``. ``solve`` runs :func:`natgrad.linalg.cg`
    on ``C + λI`` and keeps its :class:`~natgrad.linalg.CGInfo` in :attr:`last_cg_info`; it warns
    (``RuntimeWarning``) if the tolerance is not met. :meth:`diag`, :meth:`trace` and
    :meth:`to_dense` push the ``P`` unit vectors through ``matvec`` (``P`` products; ``to_dense``
    also stores ``P × P`` numbers): use them on small models only.
    """

    def __init__(
        self,
        matvec: MatVec,
        param_shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
        *,
        cg_rtol: float | None = None,
        cg_max_iter: int | None = None,
    ) -> None:
        super().__init__(param_shapes, dtype, device)
        self.matvec = matvec
        self.cg_rtol = torch.finfo(dtype).eps ** 0.5 if cg_rtol is None else cg_rtol
        self.cg_max_iter = (
            min(10 * self.shape[0], MAX_CG_ITERATIONS) if cg_max_iter is None else cg_max_iter
        )
        self.last_cg_info: CGInfo | None = None

    def _mv_flat(self, vector: Tensor) -> Tensor:
        return self.matvec(vector)

    def _solve_flat(self, vector: Tensor, damping: float) -> Tensor:
        def damped_matvec(direction: Tensor) -> Tensor:
            return self.matvec(direction) + damping * direction

        solution, info = cg(damped_matvec, vector, rtol=self.cg_rtol, max_iter=self.cg_max_iter)
        self.last_cg_info = info
        if not info.converged:
            warnings.warn(
                f"conjugate gradients stopped after {info.iterations} iterations with residual "
                f"norm {info.residual_norm:.3g} above the tolerance; increase damping or "
                "cg_max_iter",
                RuntimeWarning,
                stacklevel=3,
            )
        return solution

    def _column_chunks(self) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, rows)``: ``C`` times unit vectors ``start, ...``, shape ``(k, P)``."""
        size = self.shape[0]
        batched = vmap(self.matvec)
        for start in range(0, size, COLUMN_CHUNK):
            stop = min(start + COLUMN_CHUNK, size)
            units = torch.zeros(stop - start, size, dtype=self.dtype, device=self.device)
            units[:, start:stop] = torch.eye(stop - start, dtype=self.dtype, device=self.device)
            yield start, batched(units)

    def _diag_flat(self) -> Tensor:
        return torch.cat(
            [
                rows[:, start : start + rows.shape[0]].diagonal()
                for start, rows in self._column_chunks()
            ]
        )

    def _to_dense(self) -> Tensor:
        return torch.cat([rows for _, rows in self._column_chunks()])
