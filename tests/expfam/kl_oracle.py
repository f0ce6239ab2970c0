"""KL divergences at the exact values of the stored natural parameters, to 400 digits.

Python's ``decimal`` (exponentials and logarithms) and ``fractions`` (the matrix algebra of the
multivariate normal), no mpmath, no SciPy: the float64 forms the families replace lose up to
all digits for nearby distributions, and so would a float64 oracle.
"""

from __future__ import annotations

import decimal
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction

PRECISION = 400


def _decimal(value: Fraction) -> Decimal:
    return Decimal(value.numerator) / Decimal(value.denominator)


def categorical_kl(theta: Sequence[float], other_theta: Sequence[float]) -> tuple[float, float]:
    """``Σ p log(p/q)`` from minimal logits (last class 0), and the conditioning
    ``Σ_k p_k φ(q_k/p_k − 1) (|log p_k| + |log q_k|)`` of computing it from rounded
    log-probabilities."""
    with decimal.localcontext() as context:
        context.prec = PRECISION
        logits = [Decimal(v) for v in theta] + [Decimal(0)]
        other_logits = [Decimal(v) for v in other_theta] + [Decimal(0)]
        log_total = sum(v.exp() for v in logits).ln()
        other_log_total = sum(v.exp() for v in other_logits).ln()
        value, conditioning = Decimal(0), Decimal(0)
        for logit, other_logit in zip(logits, other_logits, strict=True):
            log_p, log_q = logit - log_total, other_logit - other_log_total
            p, q = log_p.exp(), log_q.exp()
            term = q - p - p * (log_q - log_p)
            value += term
            conditioning += term * (abs(log_p) + abs(log_q))
        return float(value), float(conditioning)


def poisson_kl(theta: float, other_theta: float) -> float:
    """``λ_q − λ_p − λ_p (θ_q − θ_p)`` with ``λ = eᶿ``."""
    with decimal.localcontext() as context:
        context.prec = PRECISION
        first, second = Decimal(theta), Decimal(other_theta)
        return float(second.exp() - first.exp() - first.exp() * (second - first))


def gaussian_kl(natural: Sequence[float], other_natural: Sequence[float]) -> float:
    """``½ (r − 1 − log r) + τ_q (μ_p − μ_q)²/2`` from ``θ = (μτ, −τ/2)``, ``r = τ_q/τ_p``."""
    with decimal.localcontext() as context:
        context.prec = PRECISION
        theta1, theta2 = (Decimal(v) for v in natural)
        other_theta1, other_theta2 = (Decimal(v) for v in other_natural)
        precision, other_precision = -2 * theta2, -2 * other_theta2
        ratio = other_precision / precision
        shift = theta1 / precision - other_theta1 / other_precision
        return float((ratio - 1 - ratio.ln() + other_precision * shift**2) / 2)


def _inverse(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
    size = len(matrix)
    rows = [row[:] + [Fraction(int(i == j)) for j in range(size)] for i, row in enumerate(matrix)]
    for column in range(size):
        pivot = next(r for r in range(column, size) if rows[r][column] != 0)
        rows[column], rows[pivot] = rows[pivot], rows[column]
        rows[column] = [v / rows[column][column] for v in rows[column]]
        for r in range(size):
            if r != column and rows[r][column] != 0:
                factor = rows[r][column]
                rows[r] = [a - factor * b for a, b in zip(rows[r], rows[column], strict=True)]
    return [row[size:] for row in rows]


def _determinant(matrix: list[list[Fraction]]) -> Fraction:
    size = len(matrix)
    rows = [row[:] for row in matrix]
    determinant = Fraction(1)
    for column in range(size):
        pivot = next(r for r in range(column, size) if rows[r][column] != 0)
        if pivot != column:
            rows[column], rows[pivot] = rows[pivot], rows[column]
            determinant = -determinant
        determinant *= rows[column][column]
        for r in range(column + 1, size):
            factor = rows[r][column] / rows[column][column]
            rows[r] = [a - factor * b for a, b in zip(rows[r], rows[column], strict=True)]
    return determinant


def multivariate_gaussian_kl(
    theta1: Sequence[float],
    theta2: Sequence[Sequence[float]],
    other_theta1: Sequence[float],
    other_theta2: Sequence[Sequence[float]],
) -> float:
    """``½ [tr(Λ_q Σ_p) − d − log det(Λ_q Σ_p) + (μ_p − μ_q)ᵀ Λ_q (μ_p − μ_q)]`` with
    ``Λ = −(θ₂ + θ₂ᵀ)``, ``μ = Λ⁻¹θ₁``: exact rationals, the logarithm in ``decimal``."""
    dim = len(theta1)

    def precision(matrix: Sequence[Sequence[float]]) -> list[list[Fraction]]:
        return [
            [-(Fraction(matrix[i][j]) + Fraction(matrix[j][i])) for j in range(dim)]
            for i in range(dim)
        ]

    def solve(inverse: list[list[Fraction]], vector: Sequence[float]) -> list[Fraction]:
        return [sum(inverse[i][j] * Fraction(vector[j]) for j in range(dim)) for i in range(dim)]

    other_precision = precision(other_theta2)
    covariance = _inverse(precision(theta2))
    loc, other_loc = solve(covariance, theta1), solve(_inverse(other_precision), other_theta1)
    product = [
        [sum(other_precision[i][k] * covariance[k][j] for k in range(dim)) for j in range(dim)]
        for i in range(dim)
    ]
    shift = [a - b for a, b in zip(loc, other_loc, strict=True)]
    linear = sum(product[i][i] for i in range(dim)) - dim
    linear += sum(
        shift[i] * other_precision[i][j] * shift[j] for i in range(dim) for j in range(dim)
    )
    with decimal.localcontext() as context:
        context.prec = PRECISION
        return float((_decimal(linear) - _decimal(_determinant(product)).ln()) / 2)
