"""The curvature-operator interface shared by every structure.

A curvature operator is a symmetric positive semi-definite matrix ``C`` over the flat parameter
vector of a model, in the order of ``torch.nn.utils.parameters_to_vector(model.parameters())``.
Vectors may be given flat, shape ``(P,)``, or as a list of per-parameter tensors with the
parameters' shapes; every method returns the same form it was given. Operators over the same
parameters add, and scale by non-negative numbers
(:class:`~natgrad.curvature.combination.LinearCombination`); ``to_scipy`` exports one to SciPy.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
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
    :meth:`_to_dense`; the public methods handle the flat/list conversion and validation.
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
        """Return ``vector`` as a flat tensor of shape ``(P,)`` and whether it was a list.

        Raises
        ------
        ValueError
            If the length or the per-parameter shapes do not match the operator.
        """
        if isinstance(vector, Tensor):
            if vector.shape != (self.shape[0],):
                raise ValueError(
                    f"expected a flat vector of shape ({self.shape[0]},), got {tuple(vector.shape)}"
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
        return torch.cat([part.reshape(-1) for part in parts]), True

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split a flat ``(P,)`` vector into per-parameter tensors."""
        chunks = torch.split(flat, self.param_numels)
        return [
            chunk.reshape(shape) for chunk, shape in zip(chunks, self.param_shapes, strict=True)
        ]

    def _finite_in_dtype(self, flat: Tensor) -> Tensor:
        """``flat`` in the operator's dtype, refused (``ValueError``) if it has infs or NaNs,
        or overflows that dtype."""
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("vector must not contain infs or NaNs")
        converted = flat.to(self.dtype)
        if not bool(torch.isfinite(converted).all()):
            raise ValueError(f"vector overflows the operator's dtype {self.dtype}")
        return converted

    def _as_input_form(self, flat: Tensor, was_list: bool) -> VectorLike:
        return self.unflatten(flat) if was_list else flat

    # -- public interface --------------------------------------------------------------------
    def mv(self, vector: VectorLike) -> VectorLike:
        """Matrix-vector product ``C v``.

        Parameters
        ----------
        vector : Tensor of shape (P,) or list of per-parameter tensors

        Returns
        -------
        Tensor of shape (P,) or list of tensors, matching the input form.

        Raises
        ------
        ValueError
            If ``vector`` has the wrong shape, contains infs or NaNs, or overflows the
            operator's dtype.
        """
        flat, was_list = self.flatten(vector)
        return self._as_input_form(self._mv_flat(self._finite_in_dtype(flat)), was_list)

    def solve(self, vector: VectorLike, damping: float = 0.0) -> VectorLike:
        """Solve ``(C + damping I) x = vector``.

        Parameters
        ----------
        vector : Tensor of shape (P,) or list of per-parameter tensors
        damping : float, default 0.0
            Non-negative Tikhonov damping ``λ``.

        Returns
        -------
        The solution, in the input form.

        Raises
        ------
        ValueError
            If ``damping`` is negative or not finite, or ``vector`` has the wrong shape, contains
            infs or NaNs, or overflows the operator's dtype.
        """
        if not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite non-negative number, got {damping!r}")
        flat, was_list = self.flatten(vector)
        converted = self._finite_in_dtype(flat)
        return self._as_input_form(self._solve_flat(converted, float(damping)), was_list)

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
        ``lobpcg``). NumPy vectors ``(P,)`` or blocks ``(P, K)`` are converted to tensors on the
        operator's device for each product, and back."""
        from scipy.sparse.linalg import LinearOperator  # SciPy's import is slow: on demand

        dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def matvec(vector: np.ndarray) -> np.ndarray:
            flat = torch.as_tensor(np.asarray(vector).reshape(-1), dtype=self.dtype)
            return self._mv_flat(flat.to(self.device)).cpu().numpy()

        def matmat(block: np.ndarray) -> np.ndarray:
            return np.stack([matvec(column) for column in np.asarray(block).T], axis=1)

        return LinearOperator(self.shape, matvec=matvec, rmatvec=matvec, matmat=matmat, dtype=dtype)

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
