"""A matrix-free curvature operator: products only, solves by conjugate gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.func import vmap

from natgrad._validation import positive_int, unit_interval
from natgrad._warnings import warn_at_caller
from natgrad.curvature.base import CurvatureOperator
from natgrad.linalg import CGInfo, cg

MatVec = Callable[[Tensor], Tensor]
ProductReduction = Callable[[Sequence[Tensor]], None]
MAX_CG_ITERATIONS = 1000
"""Default cap on conjugate-gradient iterations per solve."""
COLUMN_CHUNK = 64
"""Number of columns pushed through one vmapped product (blocks, ``diag``, ``to_dense``)."""
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


def check_cg_options(cg_rtol: object, cg_max_iter: object) -> tuple[float | None, int | None]:
    """``cg_rtol`` and ``cg_max_iter`` checked, ``None`` passing through (the defaults).

    Raises
    ------
    TypeError
        If ``cg_rtol`` is not a real number or ``cg_max_iter`` not an integer.
    ValueError
        If ``cg_rtol`` is not in ``(0, 1)`` (NaN and infinities included; ``1`` or more is met
        by ``x = 0``) or ``cg_max_iter < 1``; the message names the value.
    """
    rtol = None if cg_rtol is None else unit_interval("cg_rtol", cg_rtol, closed_left=False)
    max_iter = None if cg_max_iter is None else positive_int("cg_max_iter", cg_max_iter)
    return rtol, max_iter


def _falls_short(info: CGInfo, vector: Tensor) -> bool:
    """Whether a CG run deserves a warning: unconverged, unless it stagnated at round-off with a
    relative residual within the square root of the dtype's epsilon."""
    if info.converged:
        return False
    if not info.stagnated:
        return True
    loose = torch.finfo(vector.dtype).eps ** 0.5 * float(torch.linalg.vector_norm(vector))
    return info.residual_norm > loose


def _relative_residual(info: CGInfo, vector: Tensor) -> float:
    norm = float(torch.linalg.vector_norm(vector))
    return info.residual_norm / norm if norm > 0 else 0.0


class Implicit(CurvatureOperator):
    """Curvature operator known only through its products ``v ↦ C v``.

    Parameters
    ----------
    matvec : callable
        ``v ↦ C v`` for flat ``(P,)`` vectors, for a symmetric PSD ``C`` (a Fisher: the MEAN over
        data points). The builders make it from ``torch.func`` jvp/vjp; it must be vmappable for
        products with blocks ``(P, K)``, :meth:`diag` and :meth:`to_dense`.
    param_shapes : sequence of torch.Size
        Parameter shapes, in flat-vector order.
    dtype, device
        Of the vectors ``matvec`` acts on.
    cg_rtol : float, optional
        Relative residual tolerance of the conjugate-gradient solve, in ``(0, 1)``;
        :func:`default_cg_rtol` of ``dtype`` by default (``1.9e-6`` in float32, ``1.5e-8`` in
        float64).
    cg_max_iter : int, optional
        Iteration cap of the solve, at least 1; ``min(10 · P, 1000)`` by default.
    reduce_products : callable, optional
        Applied, in place, to every product ``matvec`` gives (a list holding one flat vector
        or one vmapped chunk of columns) before it is used: e.g.
        :meth:`natgrad.distributed.shards.Shard.sum_`, where ``matvec`` gives one process's
        terms of a Fisher of a batch split over processes. Every product and every
        conjugate-gradient iteration then runs one reduction, so all processes must make the
        same calls (they do when they solve the same right-hand side: the scalars of CG are
        then equal on all of them).

    Attributes
    ----------
    cg_rtol, cg_max_iter
        As above; they may be set (checked as in the constructor, ``None`` restoring the
        default).
    last_cg_info : CGInfo or None
        Of the last solve; of a block's least converged column (largest relative residual).

    Raises
    ------
    TypeError
        If ``cg_rtol`` is not a real number or ``cg_max_iter`` not an integer.
    ValueError
        If ``cg_rtol`` is not in ``(0, 1)`` or ``cg_max_iter < 1`` (:func:`check_cg_options`).

    Notes
    -----
    The matrix is never formed by ``mv`` or ``solve``. A block ``(P, K)`` is multiplied by
    vmapped products, ``COLUMN_CHUNK`` columns at a time. ``solve`` runs
    :func:`natgrad.linalg.cg` on ``C + λI`` (on each column of a block in turn), stopping also
    when the residual stagnates at the round-off floor of the dtype. It warns
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
        reduce_products: ProductReduction | None = None,
    ) -> None:
        super().__init__(param_shapes, dtype, device)
        self.matvec = matvec
        self.reduce_products = reduce_products
        self.cg_rtol = cg_rtol
        self.cg_max_iter = cg_max_iter
        self.last_cg_info: CGInfo | None = None

    @property
    def cg_rtol(self) -> float:
        """Relative residual tolerance of the conjugate-gradient solve."""
        return self._cg_rtol

    @cg_rtol.setter
    def cg_rtol(self, value: float | None) -> None:
        rtol, _ = check_cg_options(value, None)
        self._cg_rtol = default_cg_rtol(self.dtype) if rtol is None else rtol

    @property
    def cg_max_iter(self) -> int:
        """Iteration cap of the conjugate-gradient solve."""
        return self._cg_max_iter

    @cg_max_iter.setter
    def cg_max_iter(self, value: int | None) -> None:
        _, max_iter = check_cg_options(None, value)
        default = min(10 * self.shape[0], MAX_CG_ITERATIONS)
        self._cg_max_iter = default if max_iter is None else max_iter

    def _reduced(self, product: Tensor) -> Tensor:
        """``product`` after :attr:`reduce_products` (unchanged without one)."""
        if self.reduce_products is not None:
            self.reduce_products([product])
        return product

    def _mv_flat(self, vector: Tensor) -> Tensor:
        return self._reduced(self.matvec(vector))

    def _mm_flat(self, block: Tensor) -> Tensor:
        batched = vmap(self.matvec, in_dims=1, out_dims=1)
        return torch.cat(
            [self._reduced(batched(chunk)) for chunk in block.split(COLUMN_CHUNK, dim=1)], dim=1
        )

    def _solve_flat(self, vector: Tensor, damping: float) -> Tensor:
        return self._solve_block(vector.unsqueeze(1), damping).squeeze(1)

    def _solve_block(self, block: Tensor, damping: float) -> Tensor:
        columns = block.unbind(1)
        solved = [self._cg(column, damping) for column in columns]
        infos = [info for _, info in solved]
        pairs = list(zip(infos, columns, strict=True))
        self.last_cg_info = max(pairs, key=lambda pair: _relative_residual(*pair))[0]
        _warn_if_short(pairs)
        return torch.stack([solution for solution, _ in solved], dim=1)

    def _cg(self, vector: Tensor, damping: float) -> tuple[Tensor, CGInfo]:
        def damped_matvec(direction: Tensor) -> Tensor:
            return self._mv_flat(direction) + damping * direction

        return cg(
            damped_matvec,
            vector,
            rtol=self.cg_rtol,
            max_iter=self.cg_max_iter,
            stop_on_stagnation=True,
        )

    def _unit_columns(self) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, columns)``: ``C[:, start:start + k]``, shape ``(P, k)``."""
        size = self.shape[0]
        for start in range(0, size, COLUMN_CHUNK):
            stop = min(start + COLUMN_CHUNK, size)
            units = torch.zeros(size, stop - start, dtype=self.dtype, device=self.device)
            units[start:stop] = torch.eye(stop - start, dtype=self.dtype, device=self.device)
            yield start, self._mm_flat(units)

    def _diag_flat(self) -> Tensor:
        return torch.cat(
            [
                columns[start : start + columns.shape[1]].diagonal()
                for start, columns in self._unit_columns()
            ]
        )

    def _to_dense(self) -> Tensor:
        return torch.cat([columns for _, columns in self._unit_columns()], dim=1)


def _warn_if_short(runs: Sequence[tuple[CGInfo, Tensor]]) -> None:
    """Warn (``RuntimeWarning``) if a CG run ``(info, right-hand side)`` :func:`_falls_short`,
    quoting the one with the largest relative residual."""
    short = [run for run in runs if _falls_short(*run)]
    if not short:
        return
    info, _ = max(short, key=lambda run: _relative_residual(*run))
    reason = "stagnated at the round-off floor" if info.stagnated else "stopped"
    columns = f" ({len(short)} of {len(runs)} columns fell short)" if len(runs) > 1 else ""
    warn_at_caller(
        f"conjugate gradients {reason} after {info.iterations} iterations with residual "
        f"norm {info.residual_norm:.3g} above the tolerance{columns}; increase damping or "
        "cg_max_iter, or solve in float64",
        RuntimeWarning,
    )
