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
CG_RTOL_EPS_MULTIPLE = 16
"""The default CG tolerance aims at this many machine epsilons of the operator's dtype."""


def default_cg_rtol(dtype: torch.dtype) -> float:
    """Default relative CG tolerance for operators of ``dtype``.

    ``CG_RTOL_EPS_MULTIPLE · ε`` (``1.9e-6`` in float32), but no finer than ``1.5e-8`` (the
    square root of float64's epsilon, the float64 default) and no coarser than ``√ε``. In float32
    the square root of ``ε`` (``3.5e-4``) left directions about ``1e-4`` off the float64 ones
    on a small MLP Fisher; this default brings them within about ``1e-6``, the accuracy of a
    dense float32 solve, for 1.3 to 1.8 times the iterations.
    """
    eps = torch.finfo(dtype).eps
    floor = torch.finfo(torch.float64).eps ** 0.5
    return min(eps**0.5, max(CG_RTOL_EPS_MULTIPLE * eps, floor))


def _falls_short(info: CGInfo, vector: Tensor) -> bool:
    """Whether a CG run deserves a warning: unconverged, unless it stagnated at round-off with a
    relative residual within the square root of the dtype's epsilon."""
    if info.converged:
        return False
    if not info.stagnated:
        return True
    loose = torch.finfo(vector.dtype).eps ** 0.5 * float(torch.linalg.vector_norm(vector))
    return info.residual_norm > loose


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
        Relative residual tolerance of the conjugate-gradient solve; :func:`default_cg_rtol`
        of ``dtype`` by default (``1.9e-6`` in float32, ``1.5e-8`` in float64).
    cg_max_iter : int, optional
        Iteration cap of the solve; ``min(10 · P, 1000)`` by default.

    Notes
    -----
    The matrix is never formed by ``mv`` or ``solve``. ``solve`` runs :func:`natgrad.linalg.cg`
    on ``C + λI``, stopping also when the residual stagnates at the round-off floor of the dtype,
    and keeps its :class:`~natgrad.linalg.CGInfo` in :attr:`last_cg_info`. It warns
    (``RuntimeWarning``) if CG stops short of ``cg_rtol`` for any other reason, or stagnates
    with a relative residual above ``√ε`` of the dtype. :meth:`diag`, :meth:`trace` and
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
        self.cg_rtol = default_cg_rtol(dtype) if cg_rtol is None else cg_rtol
        self.cg_max_iter = (
            min(10 * self.shape[0], MAX_CG_ITERATIONS) if cg_max_iter is None else cg_max_iter
        )
        self.last_cg_info: CGInfo | None = None

    def _mv_flat(self, vector: Tensor) -> Tensor:
        return self.matvec(vector)

    def _solve_flat(self, vector: Tensor, damping: float) -> Tensor:
        def damped_matvec(direction: Tensor) -> Tensor:
            return self.matvec(direction) + damping * direction

        solution, info = cg(
            damped_matvec,
            vector,
            rtol=self.cg_rtol,
            max_iter=self.cg_max_iter,
            stop_on_stagnation=True,
        )
        self.last_cg_info = info
        if _falls_short(info, vector):
            reason = "stagnated at the round-off floor" if info.stagnated else "stopped"
            warnings.warn(
                f"conjugate gradients {reason} after {info.iterations} iterations with residual "
                f"norm {info.residual_norm:.3g} above the tolerance; increase damping or "
                "cg_max_iter, or solve in float64",
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
