"""Log-densities at 60 significant digits with Python's ``decimal`` (no mpmath, no SciPy).

``log Γ(x)`` is ``log Γ(x + n) − Σ log(x + j)`` with ``x + n ≥ 30`` and Stirling's series to
``B₂₀`` there (truncation below 1e-28). SciPy's ``gamma``/``beta``/``dirichlet.logpdf`` are
not usable as oracles for large concentrations: they cancel terms of size ``α log α`` and are
off by 1e-9 at ``α = 1e6`` and 1e-2 at ``α = 1e12``.
"""

from __future__ import annotations

import decimal
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction

PRECISION = 60
_PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459230781640628")
_BERNOULLI = (
    Fraction(1, 6),
    Fraction(-1, 30),
    Fraction(1, 42),
    Fraction(-1, 30),
    Fraction(5, 66),
    Fraction(-691, 2730),
    Fraction(7, 6),
    Fraction(-3617, 510),
    Fraction(43867, 798),
    Fraction(-174611, 330),
)


def log_gamma(x: Decimal) -> Decimal:
    """``log Γ(x)`` for ``x > 0`` (call inside a context of ``PRECISION`` digits)."""
    shift = Decimal(0)
    while x < 30:
        shift += x.ln()
        x += 1
    value = (x - Decimal("0.5")) * x.ln() - x + (2 * _PI).ln() / 2
    for k, bernoulli in enumerate(_BERNOULLI, 1):
        coefficient = Decimal(bernoulli.numerator) / Decimal(bernoulli.denominator)
        value += coefficient / (2 * k * (2 * k - 1) * x ** (2 * k - 1))
    return value - shift


def gamma_log_density(x: float, concentration: float, rate: float) -> float:
    """``(α − 1) log x + α log β − βx − log Γ(α)`` at the exact values of the floats."""
    with decimal.localcontext() as context:
        context.prec = PRECISION
        x_, a, b = Decimal(x), Decimal(concentration), Decimal(rate)
        return float((a - 1) * x_.ln() + a * b.ln() - b * x_ - log_gamma(a))


def dirichlet_log_density(x: Sequence[float], concentration: Sequence[float]) -> float:
    """``Σ (α − 1) log x − Σ log Γ(α) + log Γ(α₀)``; for Beta pass ``x = (x, 1 − x)``."""
    with decimal.localcontext() as context:
        context.prec = PRECISION
        points = [Decimal(v) for v in x]
        alphas = [Decimal(v) for v in concentration]
        value = log_gamma(sum(alphas))
        for point, alpha in zip(points, alphas, strict=True):
            value += (alpha - 1) * point.ln() - log_gamma(alpha)
        return float(value)


def beta_log_density(x: float, a: float, b: float) -> float:
    """The Beta log-density at ``(x, 1 − x)`` with ``1 − x`` exact."""
    with decimal.localcontext() as context:
        context.prec = PRECISION
        complement = 1 - Decimal(x)
        return dirichlet_log_density([x, complement], [a, b])
