"""Special functions accurate to a few ulps on ``x > 0``, for the Gamma, Beta and Dirichlet.

``torch.polygamma(1, x)`` is only accurate to about 5e-10 relative in float64 for
``0 < x < 1000``; :func:`trigamma` replaces it. The KL divergences and entropies of the
Gamma and Dirichlet families cancel terms of size ``α log α``; they are rewritten with
Stirling's formula ``log Γ(x) = (x − ½) log x − x + ½ log 2π + μ(x)``, whose remainder
``μ(x) ≈ 1/(12x)`` (:func:`stirling_remainder`) is small, and with
``φ(x) = x − log(1 + x) ≥ 0`` (:func:`x_minus_log1p`).

Method: below the asymptotic start ``x₀`` (``ASYMPTOTIC_START`` = 10 in float64, 5 in
float32) the argument is shifted up by the recurrences ``ψ′(x) = ψ′(x + 1) + 1/x²`` and
``μ(x) = μ(x + 1) + b(x)`` with ``b(x) = (x + ½) log(1 + 1/x) − 1``; at or above it the
asymptotic series in the Bernoulli numbers ``B₂ … B₂₂`` is summed (truncation error below
1e-17 relative). In float32 every series is cut where its truncation error falls below
``ε/16`` (:class:`SeriesTerms`, which derives each bound): 7 terms instead of 18 for ``φ``, 9
instead of 18 for ``b``, 7 instead of 11 asymptotic terms, 5 quadrature nodes instead of 8.
All functions are compositions of differentiable torch operations and work in any floating
dtype.

Cost: for small batches the time goes into the number of tensor operations, not their size.
The series are summed by Horner's rule with one ``torch.addcmul`` per term on coefficient
tensors cached per dtype and device, and ``μ``, ``μ′`` and ``μ″`` come out of one pass
(:func:`stirling_remainder_derivatives`). Each function evaluates a branch only on the entries
that take it (in batches of ``SPLIT_SIZE`` or more), and none when no entry does
(:func:`_evaluate_split`): the shifted sums below ``x₀`` (up to nine terms of a series each
in float64) only where the argument is below it and only over as many shifts as the
smallest argument needs, the quadrature of :func:`stirling_remainder_bregman` only for nearby
arguments. The entropies
need ``μ`` and ``μ′`` only to an absolute accuracy: :func:`stirling_remainder_coarse_derivatives`
takes them from ``torch.lgamma`` and ``torch.digamma`` below ``x₀``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: Arguments at or above this use the asymptotic series in float64 (float32 starts at 5:
#: :class:`SeriesTerms`).
ASYMPTOTIC_START = 10.0
#: Bernoulli numbers B₂, B₄, …, B₂₂.
_BERNOULLI = (
    1 / 6,
    -1 / 30,
    1 / 42,
    -1 / 30,
    5 / 66,
    -691 / 2730,
    7 / 6,
    -3617 / 510,
    43867 / 798,
    -174611 / 330,
    854513 / 138,
)
#: ``μ(y) − μ(x) − (y − x) μ′(x)`` is integrated numerically when ``|y − x| ≤ 0.25 x``.
_NEARBY = 0.25


@dataclass(frozen=True)
class SeriesTerms:
    """Where the asymptotic series starts and how many terms each series sums (and how many
    quadrature nodes it takes) in one precision.

    In float32 each count is the smallest whose truncation error is below ``ε/16`` relative to
    the result (``ε = 2⁻²³``) over the whole range where the series is used (one term fewer
    breaks it; ``tests/expfam/test_expfam_series_terms.py`` measures both against mpmath).
    The float64 counts are those this module always used: truncation below 1e-17 relative
    (5e-17, ``0.23 ε``, for ``μ″`` at ``x = 10``).

    - ``asymptotic_start``: ``x₀``, the asymptotic series is summed at ``x ≥ x₀``, the shifted
      sums below it (at most ``⌈x₀⌉`` shifts). 10 in float64 (:data:`ASYMPTOTIC_START`), 5 in
      float32: half the shifts, for three more terms of the asymptotic series.
    - ``log_ratio``: terms ``k = 0 … K − 1`` of ``Σₖ u²ᵏ/(2k + 3)`` in
      :func:`x_minus_log1p_small`, ``|u| ≤ ⅓``. All terms are positive, so the tail is at
      most ``2|u|^{2K+3} / ((2K + 3)(1 − u²))``, largest at ``u = −⅓`` (``x = −½``) where
      ``φ(−½) = log 2 − ½``: relative ``2·3^{−(2K+3)} / ((2K + 3)·(8/9)·0.193)``, ``0.045 ε``
      in float32 at ``K = 7`` (``0.45 ε`` at ``K = 6``). In float64 ``K = 18`` (``3e-4 ε``).
    - ``bracket``: terms of ``b = v² Σₖ v²ᵏ/(2k + 3)`` and ``b′ = −4v³ Σₖ (k + 1) v²ᵏ/(2k + 3)``,
      ``v = 1/(2x + 1) ≤ ⅓``. Against the leading terms ``v²/3`` and ``4v³/3`` the tails are at
      most ``3·9^{−K} / ((2K + 3)·(8/9))`` and (``(k + 1)/(2k + 3) < ½``) ``1.5·9^{−K}/(8/9)``:
      ``0.0035 ε`` and ``0.037 ε`` in float32 at ``K = 9`` (``0.33 ε`` at ``K = 8``); in float64
      ``K = 18`` (``0.05 ε``). ``μ = Σⱼ b(x + j) + μ(x + n)`` sums terms of one sign, so the
      relative error of each bounds that of the sum.
    - ``remainder``: Bernoulli terms of the asymptotic series of ``μ``, ``μ′``, ``μ″`` at
      ``x ≥ x₀``; each series envelops its function (the error is below the first omitted
      term), whose size relative to the leading one is ``12|B₂ₖ|/(2k(2k − 1)) x^{2−2k}``,
      ``12|B₂ₖ|/(2k) x^{2−2k}`` and ``6|B₂ₖ| x^{2−2k}``. At ``x₀ = 5`` with ``K = 7`` terms
      (first omitted ``k = 8``): ``0.0005 ε``, ``0.0073 ε`` and ``0.059 ε`` in float32 (with
      ``K = 6``: ``0.24 ε`` for ``μ″``). In float64 ``K = 11`` at ``x₀ = 10``.
    - ``nodes``: Gauss–Legendre nodes of :func:`stirling_remainder_bregman`'s quadrature. The
      integrand is analytic on ``[0, 1]`` (the branch point of ``μ″`` is at
      ``u = −x/(y − x) ≤ −4``), so the error falls geometrically with the number of nodes;
      measured in float64 against 8 nodes over ``x ∈ [1e-8, 1e8]``, ``|y − x| ≤ x/4``, the
      worst relative error is 2.5e-7 with 4 nodes, 2.0e-9 (``0.017 ε`` of float32) with 5 and
      1.5e-11 with 6. In float64 8 nodes (below 1e-17 relative).
    """

    asymptotic_start: float
    log_ratio: int
    bracket: int
    remainder: int
    nodes: int


#: The counts for float64 (and any dtype finer than float32).
DOUBLE_TERMS = SeriesTerms(
    asymptotic_start=ASYMPTOTIC_START, log_ratio=18, bracket=18, remainder=len(_BERNOULLI), nodes=8
)
#: The counts for float32 (and coarser dtypes: float16, bfloat16).
SINGLE_TERMS = SeriesTerms(asymptotic_start=5.0, log_ratio=7, bracket=9, remainder=7, nodes=5)


def series_terms(dtype: torch.dtype) -> SeriesTerms:
    """The :class:`SeriesTerms` used for ``dtype``: :data:`SINGLE_TERMS` where its machine
    epsilon is at least float32's, else :data:`DOUBLE_TERMS`."""
    if torch.finfo(dtype).eps >= torch.finfo(torch.float32).eps:
        return SINGLE_TERMS
    return DOUBLE_TERMS


_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)
#: Batches of at least this size with entries on both sides of a branch evaluate each branch
#: on its own entries only (see :func:`_evaluate_split`).
SPLIT_SIZE = 512
#: KL terms ``p φ(q/p − 1)`` sum the series of ``φ`` where ``log(q/p)`` lies in this range.
NEAR_LOG_RATIO = (math.log(0.5), math.log(1.5))


@dataclass(frozen=True)
class _Coefficients:
    """Constant tensors of one dtype and device.

    Series rows are in increasing powers. The work is laid out with the batch flattened to
    the last dimension ``(n,)`` and everything else (derivative, shift, quadrature node) in
    front of it, as columns ``(m, 1)``: reductions over a short trailing dimension and
    broadcasts into one are several times slower than over a leading one. ``log_ratio`` is
    the row ``(1, K − 1)`` of the coefficients ``1/(2k + 3)``, ``k = 1 … K − 1``, of
    :func:`x_minus_log1p_small`. The series lengths ``K`` depend on the dtype
    (:func:`series_terms`).
    """

    remainder: tuple[Tensor, ...]
    value: tuple[Tensor, ...]
    curvature: tuple[Tensor, ...]
    bracket: tuple[Tensor, ...]
    log_ratio: Tensor
    shifts: Tensor
    start: float
    nodes: Tensor
    weights: Tensor


@functools.lru_cache(maxsize=32)
def _coefficients(dtype: torch.dtype, device: torch.device) -> _Coefficients:
    """The series coefficients as tensors, made once per dtype and device."""

    def column(values) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)[:, None]

    terms = series_terms(dtype)
    bracket_rows = [(1 / (2 * k + 3), (k + 1) / (2 * k + 3)) for k in range(terms.bracket)]
    log_ratio_row = [1 / (2 * k + 3) for k in range(1, terms.log_ratio)]
    remainder_rows = [
        tuple(_series_coefficient(k, d) for d in range(3)) for k in range(1, terms.remainder + 1)
    ]
    nodes, weights = np.polynomial.legendre.leggauss(terms.nodes)
    # Plain tensors even when first called under inference mode (autograd may save them) or
    # inside a torch.func transform (which would wrap them at its level, and the cached
    # tensors would escape it: every later call then fails).
    with torch.inference_mode(False), torch._C._DisableFuncTorch():
        return _Coefficients(
            remainder=tuple(column(row) for row in remainder_rows),
            value=tuple(column(row[:1]) for row in remainder_rows),
            curvature=tuple(column(row[2:]) for row in remainder_rows),
            bracket=tuple(column(row) for row in bracket_rows),
            log_ratio=column(log_ratio_row).T,
            shifts=column(range(math.ceil(terms.asymptotic_start))),
            start=terms.asymptotic_start,
            nodes=column((nodes + 1.0) / 2.0),
            weights=column(weights * (1.0 - nodes) / 4.0)[:, 0],
        )


def trigamma(x: Tensor) -> Tensor:
    """``ψ′(x) = d² log Γ(x) / dx²``, elementwise; accurate to a few ulps for ``x > 0``.

    Parameters
    ----------
    x : Tensor
        Any shape, floating dtype. Entries ``x ≤ 0`` (and NaN) fall back to
        ``torch.polygamma(1, x)``.

    Returns
    -------
    Tensor
        Same shape and dtype as ``x``; differentiable (the derivative is that of the series,
        accurate to about the same relative precision as ``ψ″``).
    """
    constants = _coefficients(x.dtype, x.device)
    flat = x.reshape(-1)
    positive = flat > 0
    safe = torch.where(positive, flat, 1.0)
    shifted = safe + _shifts_below(safe, constants)
    below = shifted < constants.start
    terms = torch.where(below, (shifted * shifted).reciprocal(), 0.0).sum(0)
    start = safe + below.sum(0)
    inverse = start.reciprocal()
    asymptotic = torch.addcmul(inverse, inverse, inverse, value=0.5)
    result = (terms + asymptotic) + _single_series(start, constants.curvature, 3)
    return torch.where(positive, result, torch.polygamma(1, flat)).reshape(x.shape)


def x_minus_log1p(x: Tensor, ratio: Tensor | None = None) -> Tensor:
    """``φ(x) = x − log(1 + x) ≥ 0`` for ``x > −1``, without cancellation.

    :func:`x_minus_log1p_small` for ``|x| ≤ ½``; elsewhere ``(r − 1) − log r`` with
    ``r = 1 + x``.

    Parameters
    ----------
    x : Tensor
        Any shape, entries ``> −1``; accurate near 0 (e.g. a difference of nearby values
        divided by one of them).
    ratio : Tensor, optional
        ``1 + x`` computed as a quotient, broadcastable with ``x``: pass it when ``x`` may
        come close to ``−1`` (where ``1 + x`` formed from ``x`` has lost its digits).

    Returns
    -------
    Tensor
        The broadcast shape of ``x`` and ``ratio``.
    """
    if ratio is None:
        ratio = 1.0 + x
    small = x.abs() <= 0.5
    near_zero = x_minus_log1p_small(torch.where(small, x, 0.0))
    far_ratio = torch.where(small, 2.0, ratio)
    return torch.where(small, near_zero, (far_ratio - 1.0) - torch.log(far_ratio))


def x_minus_log1p_small(x: Tensor) -> Tensor:
    """``φ(x) = x − log(1 + x)`` for ``|x| ≤ ½`` only, to a few ulps relative.

    With ``u = x/(2 + x)`` (so ``log(1 + x) = 2 atanh u``, ``|u| ≤ ⅓``):
    ``φ(x) = x u − 2u³ Σₖ u²ᵏ/(2k + 3)``, all terms positive, 18 of them in float64 and 7 in
    float32 (:class:`SeriesTerms` derives both): the powers ``u²ᵏ``, ``k ≥ 1``, are one
    ``cumprod`` and their sum one product with the coefficient row (a few tensor operations
    instead of one per term).

    Parameters
    ----------
    x : Tensor
        Any shape, entries in ``[−½, ½]``.

    Returns
    -------
    Tensor
        Same shape as ``x``.
    """
    constants = _coefficients(x.dtype, x.device)
    u = x / (2.0 + x)
    u_squared = u * u
    rows = constants.log_ratio.shape[-1]
    powers = u_squared.reshape(1, -1).expand(rows, -1).cumprod(0)
    series = (constants.log_ratio @ powers).reshape(x.shape) + 1.0 / 3.0
    return torch.addcmul(x * u, u * u_squared, series, value=-2.0)


def weighted_log_ratio_divergence(
    probability: Tensor, other_probability: Tensor, log_ratio: Tensor
) -> Tensor:
    """``p (r − 1 − log r) ≥ 0`` with ``r = q/p = e^ℓ``, one term of ``KL(p ‖ q)``.

    Where ``½ ≤ r ≤ 3/2`` it is ``p φ(expm1 ℓ)`` (:func:`x_minus_log1p_small`);
    elsewhere ``(q − p) − p ℓ``, whose terms are at most 10 times the result.

    Parameters
    ----------
    probability, other_probability : Tensor
        ``p`` and ``q`` (probabilities or Poisson rates), broadcastable.
    log_ratio : Tensor
        ``ℓ = log(q/p)``, broadcastable, with an absolute error small next to ``|ℓ|``
        (e.g. formed from differences of natural parameters).

    Returns
    -------
    Tensor
        The broadcast shape.
    """
    near = (log_ratio >= NEAR_LOG_RATIO[0]) & (log_ratio <= NEAR_LOG_RATIO[1])
    change = torch.expm1(torch.where(near, log_ratio, 0.0))
    near_value = probability * x_minus_log1p_small(change)
    far_value = (other_probability - probability) - probability * log_ratio
    return torch.where(near, near_value, far_value)


def stirling_remainder(x: Tensor, derivative: int = 0) -> Tensor:
    """The remainder ``μ(x) = log Γ(x) − (x − ½) log x + x − ½ log 2π`` or a derivative.

    Parameters
    ----------
    x : Tensor
        Any shape, entries ``> 0``.
    derivative : {0, 1, 2}
        Which derivative: ``μ``, ``μ′ = ψ(x) − log x + 1/(2x)`` or
        ``μ″ = ψ′(x) − 1/x − 1/(2x²)``.

    Returns
    -------
    Tensor
        Same shape as ``x``; ``μ ≈ 1/(12x)``, ``μ′ ≈ −1/(12x²)``, ``μ″ ≈ 1/(6x³)`` for large
        ``x``, each accurate to a few ulps relative.
    """
    if derivative not in (0, 1, 2):
        raise ValueError(f"derivative must be 0, 1 or 2, got {derivative!r}")
    return stirling_remainder_derivatives(x)[derivative]


def stirling_remainder_derivatives(x: Tensor) -> Tensor:
    """``μ(x)``, ``μ′(x)`` and ``μ″(x)`` (see :func:`stirling_remainder`) in one pass.

    Parameters
    ----------
    x : Tensor
        Any shape, entries ``> 0``.

    Returns
    -------
    Tensor
        Shape ``(3,) + x.shape``: entry ``d`` is the ``d``-th derivative, accurate to a few
        ulps relative.
    """
    table = _remainder_table(x.reshape(-1), _coefficients(x.dtype, x.device))
    return table.reshape((3, *x.shape))


def stirling_remainder_coarse(x: Tensor) -> Tensor:
    """``μ(x)`` (see :func:`stirling_remainder`) to an absolute, not relative, accuracy.

    At or above ``x₀`` it is the asymptotic series (a few ulps relative);
    below, ``log Γ(x) − (x − ½) log x + x − ½ log 2π`` from ``torch.lgamma``, whose error is a
    few ulps of the largest of these terms (in float64 at most ``4e-15`` on ``[1e-8, 10)``,
    ``1.5e-14`` down to ``x = 1e-300``: ``6ε (1 + |log x|)``).
    It costs a third of :func:`stirling_remainder`, for sums where ``μ`` is added to terms of
    order one (log-densities).

    Parameters
    ----------
    x : Tensor
        Any shape, entries ``> 0``.

    Returns
    -------
    Tensor
        Same shape as ``x``.
    """
    constants = _coefficients(x.dtype, x.device)
    flat = x.reshape(-1)
    large = flat >= constants.start

    def both(values: Tensor) -> Tensor:
        series = _single_series(torch.where(large, values, constants.start), constants.value, 1)
        return torch.where(large, series, _remainder_value(torch.where(large, 1.0, values)))

    remainder = _evaluate_split(
        large,
        lambda big: _single_series(big, constants.value, 1),
        _remainder_value,
        (flat,),
        both,
        split=False,
    )
    return remainder.reshape(x.shape)


def _remainder_value(x: Tensor) -> Tensor:
    """``μ = log Γ(x) − (x − ½) log x + x − ½ log 2π`` from ``torch.lgamma``."""
    return (torch.lgamma(x) - (x - 0.5) * torch.log(x)) + (x - _HALF_LOG_TWO_PI)


def stirling_remainder_coarse_derivatives(x: Tensor) -> Tensor:
    """``μ(x)`` and ``μ′(x)`` (see :func:`stirling_remainder`) to an absolute accuracy, stacked.

    At or above ``x₀`` the asymptotic series (a few ulps relative); below,
    :func:`stirling_remainder_coarse` and ``ψ(x) − log x + 1/(2x)`` from ``torch.digamma``,
    each with the error of a few ulps of its largest term (in float64 about ``1e-14`` for
    ``1 ≤ x < 10``; of ``ψ(x) ≈ −1/x`` below). For sums where they are added to terms of that
    size (entropies). Their derivatives are those of the exact ``μ``, ``μ′``: the derivative of
    ``ψ`` (and the second of ``log Γ``) is :func:`trigamma` (``torch.digamma``'s own,
    ``torch.polygamma(1, ·)``, is off by 5e-10).

    Parameters
    ----------
    x : Tensor
        Any shape, entries ``> 0``.

    Returns
    -------
    Tensor
        Shape ``(2,) + x.shape``.
    """
    constants = _coefficients(x.dtype, x.device)
    flat = x.reshape(-1)
    small = flat < constants.start

    def both(values: Tensor) -> Tensor:
        large = _remainder_series(torch.where(small, constants.start, values), constants)
        return torch.where(small, _remainder_direct(values), large[:2])

    table = _evaluate_split(
        small,
        _remainder_direct,
        lambda large: _remainder_series(large, constants)[:2],
        (flat,),
        both,
        split=False,
    )
    return table.reshape((2, *x.shape))


def _remainder_direct(x: Tensor) -> Tensor:
    """``μ = log Γ(x) − (x − ½) log x + x − ½ log 2π`` and ``μ′ = ψ(x) − log x + 1/(2x)``
    from ``torch.lgamma`` and ``torch.digamma``, stacked to ``(2, n)``."""
    log_x = torch.log(x)
    value = (_LogGamma.apply(x) - (x - 0.5) * log_x) + (x - _HALF_LOG_TWO_PI)
    slope = (_Digamma.apply(x) - log_x) + 0.5 / x
    return torch.stack((value, slope))


class _LogGamma(torch.autograd.Function):
    """``torch.lgamma`` whose derivative is :class:`_Digamma`, its second :func:`trigamma`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.lgamma(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * _Digamma.apply(x)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return tangent * _Digamma.apply(x)


class _Digamma(torch.autograd.Function):
    """``torch.digamma`` whose derivative is :func:`trigamma` (differentiable again)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.digamma(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * trigamma(x)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return tangent * trigamma(x)


def stirling_remainder_bregman(x: Tensor, y: Tensor, difference: Tensor) -> Tensor:
    """``μ(y) − μ(x) − (y − x) μ′(x) ≥ 0``, without cancellation.

    For ``|y − x| ≤ ¼ x`` it is the integral ``(y − x)² ∫₀¹ (1 − u) μ″(x + u(y − x)) du`` by
    8-point Gauss–Legendre in float64 (error below 1e-17 relative there), 5-point in float32
    (:class:`SeriesTerms`); otherwise the difference.

    Parameters
    ----------
    x, y : Tensor
        Entries ``> 0``, broadcastable.
    difference : Tensor
        ``y − x``, broadcastable, computed accurately for nearby ``x`` and ``y`` (e.g. as a
        difference of natural parameters); used where ``|y − x| ≤ ¼ x``.

    Returns
    -------
    Tensor
        The broadcast shape.
    """
    shape = torch.broadcast_shapes(x.shape, y.shape, difference.shape)
    x, y, difference = (t.expand(shape).reshape(-1) for t in (x, y, difference))
    constants = _coefficients(x.dtype, x.device)
    nearby = difference.abs() <= _NEARBY * x

    def both(x: Tensor, y: Tensor, difference: Tensor) -> Tensor:
        step = torch.where(nearby, difference, 0.0)
        far = torch.where(nearby, 2.0 * x, y)
        integral = _bregman_integral(x, step, constants)
        return torch.where(nearby, integral, _bregman_difference(x, far, constants))

    result = _evaluate_split(
        nearby,
        lambda x, y, difference: _bregman_integral(x, difference, constants),
        lambda x, y, difference: _bregman_difference(x, y, constants),
        (x, y, difference),
        both,
    )
    return result.reshape(shape)


def _bregman_integral(x: Tensor, step: Tensor, constants: _Coefficients) -> Tensor:
    """``(y − x)² ∫₀¹ (1 − u) μ″(x + u(y − x)) du`` (``step = y − x``) by Gauss–Legendre,
    shape ``(n,)``."""
    nodes = torch.addcmul(x, constants.nodes, step)
    return (step * step) * (constants.weights @ _remainder_curvature(nodes, constants))


def _bregman_difference(x: Tensor, y: Tensor, constants: _Coefficients) -> Tensor:
    """``μ(y) − μ(x) − (y − x) μ′(x)`` as the difference, shape ``(n,)``."""
    table = _remainder_table(torch.cat((y, x)), constants).reshape(3, 2, x.shape[0])
    remainder_far, remainder, slope = table[0, 0], table[0, 1], table[1, 1]
    return (remainder_far - remainder) - (y - x) * slope


def under_function_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) is running:
    the shortcuts that read tensor values into Python (:func:`_evaluate_split`,
    :func:`_shifts_below`) are then off, and every branch is evaluated on every entry, so that
    the functions stay vmappable."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _evaluate_split(
    mask: Tensor,
    inside: Callable[..., Tensor],
    outside: Callable[..., Tensor],
    operands: tuple[Tensor, ...],
    both: Callable[..., Tensor],
    split: bool = True,
) -> Tensor:
    """``inside`` on the entries of ``mask``, ``outside`` on the others.

    When every entry (or none) is in ``mask`` only one of them is called (outside ``torch.func``
    transforms, :func:`under_function_transform`). With ``split``, a
    batch of ``SPLIT_SIZE`` entries or more on both sides is split: each function called on its
    own entries alone. Other batches are passed whole to ``both``, which gives both results at
    once (selecting the entries costs more than evaluating both everywhere there, and always
    when both are a few elementwise operations: pass ``split=False``).

    Parameters
    ----------
    mask : Tensor
        Boolean, shape ``(n,)``; not differentiated.
    inside, outside, both : callable
        Map operands of shape ``(k,)`` to a result of shape ``lead + (k,)`` (the same ``lead``).
    operands : tuple of Tensor
        Shape ``(n,)`` each.
    split : bool
        Whether large batches are split.

    Returns
    -------
    Tensor
        Shape ``lead + (n,)``; differentiable in the operands.
    """
    if under_function_transform():
        return both(*operands)
    if not bool(mask.any()):
        return outside(*operands)
    if bool(mask.all()):
        return inside(*operands)
    if not split or mask.shape[0] < SPLIT_SIZE:
        return both(*operands)
    chosen = inside(*(operand[mask] for operand in operands))
    others = outside(*(operand[~mask] for operand in operands))
    full = chosen.new_zeros((*chosen.shape[:-1], mask.shape[0]))
    expanded = mask.expand(full.shape)
    return full.masked_scatter(expanded, chosen).masked_scatter(~expanded, others)


def _shifts_below(x: Tensor, constants: _Coefficients) -> Tensor:
    """The shifts ``j = 0, 1, …`` (a column ``(m, 1)``) up to the last that leaves an entry of
    ``x > 0`` (shape ``(n,)``) below ``x₀``; none if every entry is above it."""
    if under_function_transform():
        return constants.shifts
    if x.numel() == 0:
        return constants.shifts[:0]
    count = math.ceil(constants.start - float(x.detach().min()))
    return constants.shifts[: max(count, 0)]


def _remainder_table(x: Tensor, constants: _Coefficients) -> Tensor:
    """``μ``, ``μ′``, ``μ″`` at ``x > 0`` of shape ``(n,)``, stacked to ``(3, n)``: the
    asymptotic series at or above ``x₀``, :func:`_remainder_table_shifted` below.
    """
    return _evaluate_split(
        x < constants.start,
        lambda small: _remainder_table_shifted(small, constants),
        lambda large: _remainder_series(large, constants),
        (x,),
        lambda every: _remainder_table_shifted(every, constants),
    )


def _remainder_table_shifted(x: Tensor, constants: _Coefficients) -> Tensor:
    """``μ``, ``μ′``, ``μ″`` at ``x > 0`` of shape ``(n,)``, stacked.

    ``μ(x) = b(x) + μ(x + 1)`` for ``x < 1`` (closed form), then the bracket series at the
    shifts below ``x₀`` and the asymptotic series at the first one above.
    """
    below_one = x < 1
    direct = torch.where(below_one, _bracket_direct(torch.where(below_one, x, 1.0)), 0.0)
    base = torch.where(below_one, x + 1.0, x)
    shifted = base + _shifts_below(base, constants)
    below = shifted < constants.start
    brackets = _bracket_series(torch.where(below, shifted, constants.start), constants)
    brackets = torch.where(below, brackets, 0.0).sum(1)
    return (direct + brackets) + _remainder_series(base + below.sum(0), constants)


def _remainder_curvature(x: Tensor, constants: _Coefficients) -> Tensor:
    """``μ″(x)`` alone for ``x > 0`` (any shape): the asymptotic series at or above
    ``x₀``, :func:`_remainder_curvature_shifted` below."""
    flat = x.reshape(-1)
    curvature = _evaluate_split(
        flat < constants.start,
        lambda small: _remainder_curvature_shifted(small, constants),
        lambda large: _single_series(large, constants.curvature, 3),
        (flat,),
        lambda every: _remainder_curvature_shifted(every, constants),
    )
    return curvature.reshape(x.shape)


def _remainder_curvature_shifted(x: Tensor, constants: _Coefficients) -> Tensor:
    """``μ″(x) = Σⱼ b″(x + j) + μ″(x + n)`` for ``x > 0`` of shape ``(n,)``, with
    ``b″(x) = 1/(2x²(x + 1)²)`` over the shifts below ``x₀``."""
    shifted = x + _shifts_below(x, constants)
    below = shifted < constants.start
    product = shifted * (shifted + 1.0)
    brackets = torch.where(below, (product * product).reciprocal(), 0.0).sum(0)
    series = _single_series(x + below.sum(0), constants.curvature, 3)
    return torch.add(series, brackets, alpha=0.5)


def _horner(z: Tensor, rows: tuple[Tensor, ...]) -> Tensor:
    """``Σₖ rows[k] zᵏ`` by Horner's rule, one ``addcmul`` per term.

    Rows are columns ``(m, 1)``; ``z`` of any shape gives ``(m,) + z.shape``.
    """
    flat = z.reshape(-1)
    series = torch.addcmul(rows[-2], rows[-1], flat)
    for row in reversed(rows[:-2]):
        series = torch.addcmul(row, series, flat)
    return series.reshape((rows[0].shape[0], *z.shape))


def _remainder_series(x: Tensor, constants: _Coefficients) -> Tensor:
    """The asymptotic series of ``μ``, ``μ′``, ``μ″`` (``x ≥ x₀``), stacked."""
    inverse = x.reciprocal()
    inverse_squared = inverse * inverse
    leading = torch.stack((inverse, inverse_squared, inverse * inverse_squared))
    return leading * _horner(inverse_squared, constants.remainder)


def _single_series(x: Tensor, rows: tuple[Tensor, ...], power: int) -> Tensor:
    """One asymptotic series (``μ``: ``power = 1``, ``μ″``: ``power = 3``), ``x ≥
    x₀``: ``x^{−power} Σₖ rows[k] x^{−2k}``."""
    inverse = x.reciprocal()
    inverse_squared = inverse * inverse
    leading = inverse if power == 1 else inverse * inverse_squared
    return leading * _horner(inverse_squared, rows)[0]


def _series_coefficient(k: int, derivative: int) -> float:
    """Coefficient of ``x^{−(2k−1)}``, ``x^{−2k}`` or ``x^{−(2k+1)}`` in ``μ``, ``μ′``, ``μ″``."""
    bernoulli = _BERNOULLI[k - 1]
    if derivative == 0:
        return bernoulli / (2 * k * (2 * k - 1))
    return -bernoulli / (2 * k) if derivative == 1 else bernoulli


def _bracket_direct(x: Tensor) -> Tensor:
    """``b(x) = (x + ½) log(1 + 1/x) − 1``, ``b′`` and ``b″`` in closed form (for ``x < 1``),
    stacked to ``(3,) + x.shape``.
    """
    log_ratio = torch.log1p(x) - torch.log(x)
    half_up = x + 0.5
    inverse_product = (x * (x + 1.0)).reciprocal()
    value = half_up * log_ratio - 1.0
    slope = log_ratio - half_up * inverse_product
    curvature = 0.5 * (inverse_product * inverse_product)
    return torch.stack((value, slope, curvature))


def _bracket_series(x: Tensor, constants: _Coefficients) -> Tensor:
    """``b(x)``, ``b′(x)``, ``b″(x)`` for ``x ≥ 1`` without cancellation, ``(3,) + x.shape``.

    With ``v = 1/(2x + 1)``: ``b = v² Σₖ v²ᵏ/(2k + 3)``,
    ``b′ = −4v³ Σₖ (k + 1) v²ᵏ/(2k + 3)``, ``b″ = 1/(2x²(x + 1)²)``.
    """
    v = (2.0 * x + 1.0).reciprocal()
    v_squared = v * v
    leading = torch.stack((v_squared, -4.0 * v * v_squared))
    inverse_product = (x * (x + 1.0)).reciprocal()
    curvature = 0.5 * (inverse_product * inverse_product)
    return torch.cat((leading * _horner(v_squared, constants.bracket), curvature[None]))
