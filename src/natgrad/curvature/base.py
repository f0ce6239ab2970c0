"""The curvature-operator interface shared by every structure.

A curvature operator is a symmetric positive semi-definite matrix ``C`` over the flat parameter
vector of a model, in the order of ``torch.nn.utils.parameters_to_vector(model.parameters())``.
Vectors may be given flat, shape ``(P,)``, as a list of per-parameter tensors with the
parameters' shapes, or as a block of ``K`` column vectors, shape ``(P, K)``; every method returns
the same form it was given. Operators over the same parameters add, and scale by non-negative
numbers (:class:`~natgrad.curvature.combination.LinearCombination`); ``to_scipy`` exports one to
SciPy.

An operator computes in its own :attr:`~CurvatureOperator.dtype`. Like ``torch.matmul``,
``mv``, ``solve`` and ``@`` refuse a vector of another dtype (``TypeError`` naming both) rather
than cast it: a float64 vector cast to a float32 operator would come back in float32, its
precision lost without a word. The SciPy export follows NumPy's promotion where it loses
nothing: it accepts arrays that cast safely to the operator's dtype (float32 arrays for a
float64 operator) and refuses wider ones.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from natgrad._validation import is_real

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

VectorLike = Tensor | Sequence[Tensor]


class CurvatureOperator(abc.ABC):
    """Abstract symmetric PSD matrix over a model's flattened parameters.

    Parameters
    ----------
    param_shapes : sequence of torch.Size
        Shapes of the parameters, in ``model.parameters()`` order.
    dtype, device
        Dtype and device of the vectors the operator acts on.

    Notes
    -----
    Subclasses implement :meth:`_mv_flat`, :meth:`_solve_flat`, :meth:`_diag_flat` and
    :meth:`_to_dense`, and may override :meth:`_mm_flat` and :meth:`_solve_block` (blocks of
    ``K`` columns, one column at a time by default) with batched versions; the public methods
    handle the flat/list/block conversion and validation.
    """

    def __init__(
        self, param_shapes: Sequence[torch.Size], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.param_shapes = [torch.Size(s) for s in param_shapes]
        self.param_numels = [math.prod(s) for s in self.param_shapes]
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)`` with ``P`` the total number of parameters."""
        total = sum(self.param_numels)
        return (total, total)

    # -- conversions -------------------------------------------------------------------------
    def flatten(self, vector: VectorLike) -> tuple[Tensor, bool]:
        """Return ``vector`` as a flat tensor and whether it was a list.

        A tensor of shape ``(P,)`` or a block ``(P, K)`` is returned as it is; a list of
        per-parameter tensors is concatenated to shape ``(P,)``.

        Raises
        ------
        ValueError
            If the length or the per-parameter shapes do not match the operator.
        """
        size = self.shape[0]
        if isinstance(vector, Tensor):
            if vector.ndim not in (1, 2) or vector.shape[0] != size:
                raise ValueError(
                    f"expected a flat vector of shape ({size},) or a block of column vectors "
                    f"({size}, K), got {tuple(vector.shape)}"
                )
            return vector, False
        parts = list(vector)
        if len(parts) != len(self.param_shapes):
            raise ValueError(
                f"expected {len(self.param_shapes)} per-parameter tensors, got {len(parts)}"
            )
        for index, (part, shape) in enumerate(zip(parts, self.param_shapes, strict=True)):
            if part.shape != shape:
                raise ValueError(
                    f"parameter {index}: expected shape {tuple(shape)}, got {tuple(part.shape)}"
                )
            self._check_dtype(part, f"parameter {index}")
        return torch.cat([part.reshape(-1) for part in parts]), True

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split a flat ``(P,)`` vector into per-parameter tensors."""
        chunks = torch.split(flat, self.param_numels)
        return [
            chunk.reshape(shape) for chunk, shape in zip(chunks, self.param_shapes, strict=True)
        ]

    def _check_dtype(self, tensor: Tensor, name: str = "vector") -> None:
        """Refuse (``TypeError``) a tensor whose dtype is not the operator's."""
        if tensor.dtype != self.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but the operator computes in {self.dtype}; "
                f"convert it (.to({self.dtype})) or build the operator in {tensor.dtype}"
            )

    def _checked(self, vector: VectorLike) -> tuple[Tensor, bool]:
        """``vector`` flat, ``(P,)`` or ``(P, K)``, and whether it was a list; refused if its
        shape or dtype does not match the operator, or it holds infs or NaNs."""
        flat, was_list = self.flatten(vector)
        self._check_dtype(flat)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("vector must not contain infs or NaNs")
        return flat, was_list

    def _as_input_form(self, flat: Tensor, was_list: bool) -> VectorLike:
        return self.unflatten(flat) if was_list else flat

    def _product(self, flat: Tensor) -> Tensor:
        """``C v`` or ``C V`` for a checked vector ``(P,)`` or block ``(P, K)``."""
        if flat.ndim == 1:
            return self._mv_flat(flat)
        return self._mm_flat(flat) if flat.shape[1] else flat.clone()

    def _solution(self, flat: Tensor, damping: float) -> Tensor:
        """``(C + λI)⁻¹ v`` or ``(C + λI)⁻¹ V`` for a checked vector or block."""
        if flat.ndim == 1:
            return self._solve_flat(flat, damping)
        return self._solve_block(flat, damping) if flat.shape[1] else flat.clone()

    # -- public interface --------------------------------------------------------------------
    def mv(self, vector: VectorLike) -> VectorLike:
        """Matrix-vector product ``C v``, or ``C V`` for a block of column vectors.

        Parameters
        ----------
        vector : Tensor of shape (P,) or (P, K), or list of per-parameter tensors
            In the operator's dtype.

        Returns
        -------
        Tensor of shape (P,) or (P, K) or list of tensors, matching the input form.

        Raises
        ------
        TypeError
            If ``vector`` is not in the operator's dtype (both named).
        ValueError
            If ``vector`` has the wrong shape or contains infs or NaNs.
        """
        flat, was_list = self._checked(vector)
        return self._as_input_form(self._product(flat), was_list)

    def solve(self, vector: VectorLike, damping: float = 0.0) -> VectorLike:
        """Solve ``(C + damping I) x = vector``, for each column of a block ``(P, K)``.

        Parameters
        ----------
        vector : Tensor of shape (P,) or (P, K), or list of per-parameter tensors
            In the operator's dtype.
        damping : float, default 0.0
            Non-negative Tikhonov damping ``λ``.

        Returns
        -------
        The solution, in the input form.

        Raises
        ------
        TypeError
            If ``vector`` is not in the operator's dtype (both named).
        ValueError
            If ``damping`` is negative or not finite, or ``vector`` has the wrong shape or
            contains infs or NaNs.
        """
        if not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite non-negative number, got {damping!r}")
        flat, was_list = self._checked(vector)
        return self._as_input_form(self._solution(flat, float(damping)), was_list)

    def diag(self) -> Tensor:
        """Diagonal of ``C``, shape ``(P,)``."""
        return self._diag_flat()

    def to_dense(self) -> Tensor:
        """The matrix ``C`` as a dense ``(P, P)`` tensor."""
        return self._to_dense()

    def trace(self) -> Tensor:
        """Trace of ``C`` (a 0-d tensor)."""
        return self.diag().sum()

    def __matmul__(self, vector: VectorLike) -> VectorLike:
        """``C @ v``: :meth:`mv`, for a vector ``(P,)``, a block ``(P, K)`` or a list."""
        return self.mv(vector)

    def __add__(self, other: object) -> CurvatureOperator:
        """``C + D`` for an operator ``D`` over the same parameters
        (:class:`~natgrad.curvature.combination.LinearCombination`)."""
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        from natgrad.curvature.combination import LinearCombination  # it subclasses this one

        return LinearCombination([(1.0, self), (1.0, other)])

    def __mul__(self, coefficient: object) -> CurvatureOperator:
        """``c C`` for a real ``c ≥ 0``
        (:class:`~natgrad.curvature.combination.LinearCombination`)."""
        if not is_real(coefficient):
            return NotImplemented
        from natgrad.curvature.combination import LinearCombination  # it subclasses this one

        return LinearCombination([(coefficient, self)])

    __rmul__ = __mul__

    @property
    def T(self) -> CurvatureOperator:
        """The transpose: the operator itself (every curvature operator is symmetric)."""
        return self

    def to_scipy(self) -> LinearOperator:
        """The operator as a ``scipy.sparse.linalg.LinearOperator`` of shape ``(P, P)`` and the
        operator's dtype, for SciPy's iterative solvers and eigensolvers (``eigsh``, ``cg``,
        ``lobpcg``).

        NumPy vectors ``(P,)`` or blocks ``(P, K)`` are converted to tensors on the operator's
        device for each product (a block in one batched product), and back. Arrays that cast
        safely to the operator's dtype (NumPy's ``can_cast``: a float32 array for a float64
        operator) are converted; a wider one (a float64 array for a float32 operator) raises
        ``TypeError`` naming both dtypes, as its precision would be lost, and an array with
        infs or NaNs raises ``ValueError``. The products come back in the operator's dtype.

        Raises
        ------
        TypeError
            For a ``torch.bfloat16`` operator: NumPy has no such dtype, and no NumPy array
            casts to it without loss. Build the operator in float32 instead.
        """
        from scipy.sparse.linalg import LinearOperator  # SciPy's import is slow: on demand

        if self.dtype == torch.bfloat16:
            raise TypeError(
                "to_scipy: the operator computes in torch.bfloat16, which NumPy has no dtype "
                "for (no array converts to it without loss); build the operator in float32 "
                "(e.g. from model.float() and float32 inputs)"
            )
        dtype = torch.empty((), dtype=self.dtype, device="cpu").numpy().dtype

        def as_tensor(array: np.ndarray) -> Tensor:
            array = np.asarray(array)
            if not np.can_cast(array.dtype, dtype, casting="safe"):
                raise TypeError(
                    f"array has dtype {array.dtype} but the operator computes in {dtype}; "
                    f"pass {dtype} arrays or build the operator in {array.dtype}"
                )
            tensor = torch.as_tensor(array.astype(dtype, copy=False), device=self.device)
            flat, _ = self._checked(tensor)
            return flat

        def matvec(vector: np.ndarray) -> np.ndarray:
            return self._product(as_tensor(np.asarray(vector).reshape(-1))).cpu().numpy()

        def matmat(block: np.ndarray) -> np.ndarray:
            return self._product(as_tensor(block)).cpu().numpy()

        return LinearOperator(
            self.shape,
            matvec=matvec,
            rmatvec=matvec,
            matmat=matmat,
            rmatmat=matmat,
            dtype=dtype,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"

    # -- for subclasses ------------------------------------------------------------------------
    @abc.abstractmethod
    def _mv_flat(self, vector: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def _solve_flat(self, vector: Tensor, damping: float) -> Tensor: ...

    @abc.abstractmethod
    def _diag_flat(self) -> Tensor: ...

    @abc.abstractmethod
    def _to_dense(self) -> Tensor: ...

    def _mm_flat(self, block: Tensor) -> Tensor:
        """``C V`` for a block ``(P, K)``, ``K ≥ 1``; one :meth:`_mv_flat` per column unless
        overridden."""
        return _column_by_column(self._mv_flat, block)

    def _solve_block(self, block: Tensor, damping: float) -> Tensor:
        """``(C + λI)⁻¹ V`` for a block ``(P, K)``, ``K ≥ 1``; one :meth:`_solve_flat` per
        column unless overridden."""
        return _column_by_column(lambda column: self._solve_flat(column, damping), block)


def _column_by_column(function: Callable[[Tensor], Tensor], block: Tensor) -> Tensor:
    """``function`` applied to each column of ``block`` ``(P, K)``, ``K ≥ 1``, as columns."""
    return torch.stack([function(column) for column in block.unbind(1)], dim=1)
