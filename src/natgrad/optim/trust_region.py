"""Trust-region pieces shared by the natural-gradient optimizers (pure functions)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def kl_clip_scale(update: Tensor, curvature_times_update: Tensor, max_kl: float) -> float:
    """Factor ``s ≤ 1`` such that ``½ (s u)ᵀ F (s u) ≤ max_kl``.

    Parameters
    ----------
    update : Tensor of shape (P,)
        The step ``u`` (already multiplied by the learning rate).
    curvature_times_update : Tensor of shape (P,)
        ``F u``.
    max_kl : float
        Bound on the second-order KL ``½ uᵀ F u``.

    Returns
    -------
    float
        ``min(1, sqrt(max_kl / (½ uᵀ F u)))``; 1 when ``uᵀ F u`` is zero or not positive.
    """
    return trust_region_scale(0.5 * float(torch.dot(update, curvature_times_update)), max_kl)


def trust_region_scale(predicted_kl: float, max_kl: float) -> float:
    """``min(1, sqrt(max_kl / predicted_kl))``: the factor ``s`` with ``s² predicted_kl ≤ max_kl``
    for a quadratic ``predicted_kl``; 1 when it is within the bound (or zero or NaN)."""
    if not predicted_kl > max_kl:
        return 1.0
    return math.sqrt(max_kl / predicted_kl)


RESOLUTION_ULPS = 64
"""Loss changes within this many units of round-off of the losses are not measured (see
:func:`loss_resolution`)."""


def loss_resolution(loss_before: float, loss_after: float, dtype: torch.dtype) -> float:
    """The smallest change of a loss of ``dtype`` that the difference of two evaluations
    resolves: ``RESOLUTION_ULPS · eps(dtype) · max(|loss_before|, |loss_after|)`` (non-finite
    losses left out).

    A predicted change within it cannot be checked against the actual one, whose round-off
    (and that of the sums inside the loss) is of this order.
    """
    finite = [abs(loss) for loss in (loss_before, loss_after) if math.isfinite(loss)]
    return RESOLUTION_ULPS * torch.finfo(dtype).eps * max(finite, default=0.0)


def reduction_ratio(actual_change: float, predicted_change: float, tolerance: float = 0.0) -> float:
    """``actual / predicted`` loss change, where the quadratic model predicts a decrease.

    Parameters
    ----------
    actual_change : float
        ``L(θ_new) − L(θ)``.
    predicted_change : float
        The quadratic model's change.
    tolerance : float, default 0.0
        Changes no larger than this in magnitude are not resolved (:func:`loss_resolution`).

    Returns
    -------
    float
        ``actual / predicted`` if ``predicted < −tolerance``; ``-inf`` (a failed step) if the
        actual change is not finite, or if the model predicts a rise beyond ``tolerance`` and
        the loss rose beyond it; NaN (undefined) otherwise: the model predicts no measurable
        change (a zero gradient, ``lr = 0``, round-off) or a rise that did not happen.
    """
    if not math.isfinite(actual_change):
        return -math.inf
    if predicted_change < -tolerance:
        return actual_change / predicted_change
    if predicted_change > tolerance and actual_change > tolerance:
        return -math.inf
    return math.nan


def levenberg_marquardt_damping(
    damping: float,
    actual_change: float,
    predicted_change: float,
    *,
    decay: float = 2.0 / 3.0,
    bounds: tuple[float, float] = (1e-8, 1e8),
    tolerance: float = 0.0,
) -> float:
    """Levenberg–Marquardt damping update from the reduction ratio (Martens 2010).

    Parameters
    ----------
    damping : float
        Current damping ``λ``.
    actual_change : float
        ``L(θ_new) − L(θ)``; non-finite counts as a failed step.
    predicted_change : float
        The quadratic model's change ``−gᵀu + ½ uᵀ(F + λI)u`` (negative for a descent step).
    decay : float, default 2/3
        ``λ ← decay·λ`` when the ratio exceeds 3/4, ``λ ← λ/decay`` when it is below 1/4.
    bounds : (float, float)
        The damping is kept within these.
    tolerance : float, default 0.0
        Changes no larger than this in magnitude are not resolved (:func:`loss_resolution`).

    Returns
    -------
    float
        The new damping. It is unchanged (but for ``bounds``) where :func:`reduction_ratio` is
        undefined: where the model predicts no change beyond ``tolerance`` (there is nothing to
        compare, e.g. at a zero gradient or with ``lr = 0``), or a rise that did not happen.
    """
    if not 0 < decay < 1:
        raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
    ratio = reduction_ratio(actual_change, predicted_change, tolerance)
    if ratio > 0.75:
        damping *= decay
    elif ratio < 0.25:
        damping /= decay
    low, high = bounds
    return min(max(damping, low), high)


def damping_update(
    damping: float,
    actual_change: float,
    predicted_change: float,
    *,
    decay: float,
    bounds: tuple[float, float],
    tolerance: float = 0.0,
) -> dict[str, float]:
    """:func:`levenberg_marquardt_damping` with the record of the update.

    Returns
    -------
    dict of str to float
        ``"actual"`` and ``"predicted"`` change, ``"ratio"`` (:func:`reduction_ratio`; NaN
        where undefined and the damping unchanged), ``"damping_before"`` and
        ``"damping_after"`` (the new damping).
    """
    return {
        "actual": actual_change,
        "predicted": predicted_change,
        "ratio": reduction_ratio(actual_change, predicted_change, tolerance),
        "damping_before": damping,
        "damping_after": levenberg_marquardt_damping(
            damping,
            actual_change,
            predicted_change,
            decay=decay,
            bounds=bounds,
            tolerance=tolerance,
        ),
    }
