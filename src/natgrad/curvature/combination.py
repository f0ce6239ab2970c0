"""Non-negative combinations of curvature operators: ``c₁ C₁ + c₂ C₂ + …``.

``F + H_prior`` (a Laplace posterior's precision), ``0.5 * F`` or ``F_a + F_b`` are operators
of the same interface (:class:`~natgrad.curvature.base.CurvatureOperator`): their ``mv``,
``diag``, ``trace`` and ``to_dense`` are the combinations of their terms', computed term by
term, with no matrix formed that the terms do not form. A solve of one scaled term keeps its
structure, ``(c C + λI)⁻¹ v = (C + (λ/c) I)⁻¹ (v / c)``: a scaled K-FAC is still solved through
its Kronecker eigenbasis. A solve of several terms, which have no common structure, runs
conjugate gradients on their products (:class:`~natgrad.curvature.implicit.Implicit`), one
column of a block ``(P, K)`` at a time. The terms share one dtype, the combination's, and its
``mv`` and ``solve`` refuse vectors of another (:mod:`natgrad.curvature.base`).

Coefficients are non-negative, so that a combination of symmetric positive semi-definite
operators is one too, as every curvature operator is.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Sequence

from torch import Tensor

from natgrad._validation import nonnegative_float
from natgrad.curvature.base import CurvatureOperator
from natgrad.curvature.implicit import Implicit

__all__ = ["LinearCombination"]

Terms = Sequence[tuple[float, CurvatureOperator]]


class LinearCombination(CurvatureOperator):
    """``Σᵢ cᵢ Cᵢ`` for operators ``Cᵢ`` over the same parameters and coefficients ``cᵢ ≥ 0``.

    Build it with ``+`` and ``*`` (``F + G``, ``2.0 * F``) or from its terms.

    Parameters
    ----------
    terms : sequence of (float, CurvatureOperator)
        The coefficients and operators; nested combinations are flattened into their terms.

    Raises
    ------
    ValueError
        If there are no terms, a coefficient is negative or not finite, or the operators differ
        in parameter shapes, dtype or device (both named).
    """

    def __init__(self, terms: Terms) -> None:
        flat = _flattened(terms)
        first = flat[0][1]
        for _, term in flat[1:]:
            _check_compatible(first, term)
        super().__init__(first.param_shapes, first.dtype, first.device)
        self.terms = flat

    def _mv_flat(self, vector: Tensor) -> Tensor:
        return _combined(coefficient * term._product(vector) for coefficient, term in self.terms)

    def _diag_flat(self) -> Tensor:
        return _combined(coefficient * term._diag_flat() for coefficient, term in self.terms)

    def _to_dense(self) -> Tensor:
        return _combined(coefficient * term._to_dense() for coefficient, term in self.terms)

    def _solve_flat(self, vector: Tensor, damping: float) -> Tensor:
        scaled = [(coefficient, term) for coefficient, term in self.terms if coefficient > 0]
        if len(scaled) == 1:
            coefficient, term = scaled[0]
            return term._solution(vector / coefficient, damping / coefficient)
        if not scaled:  # the zero matrix
            if damping == 0:
                raise ValueError("solve of a zero operator needs damping > 0")
            return vector / damping
        implicit = Implicit(self._mv_flat, self.param_shapes, self.dtype, self.device)
        return implicit._solution(vector, damping)

    # The terms' ``_product`` and ``_solution`` take a vector ``(P,)`` or a block ``(P, K)``,
    # each to the term's own (batched) method: one code path for both.
    _mm_flat = _mv_flat
    _solve_block = _solve_flat

    def __repr__(self) -> str:
        parts = " + ".join(f"{coefficient:g} * {term!r}" for coefficient, term in self.terms)
        return f"LinearCombination({parts})"


def _flattened(terms: Terms) -> list[tuple[float, CurvatureOperator]]:
    """The terms with nested combinations expanded (their coefficients multiplied)."""
    flat: list[tuple[float, CurvatureOperator]] = []
    for coefficient, term in terms:
        coefficient = nonnegative_float(
            "coefficient (an operator stays positive semi-definite)", coefficient
        )
        if not isinstance(term, CurvatureOperator):
            raise TypeError(f"expected a CurvatureOperator, got {type(term).__name__}")
        if isinstance(term, LinearCombination):
            flat += [(coefficient * inner, part) for inner, part in term.terms]
        else:
            flat.append((coefficient, term))
    if not flat:
        raise ValueError("a linear combination needs at least one term")
    return flat


def _check_compatible(first: CurvatureOperator, other: CurvatureOperator) -> None:
    for name in ("param_shapes", "dtype", "device"):
        mine, theirs = getattr(first, name), getattr(other, name)
        if mine != theirs:
            raise ValueError(
                f"operators over different spaces cannot be combined: {name} {mine} of "
                f"{type(first).__name__} against {theirs} of {type(other).__name__}"
            )


def _combined(parts: Iterable[Tensor]) -> Tensor:
    """The sum of ``parts`` (at least one)."""
    return functools.reduce(operator.add, parts)
