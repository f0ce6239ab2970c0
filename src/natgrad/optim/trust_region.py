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


def reduction_ratio(actual_change: float, predicted_change: float) -> float:
    """``actual / predicted`` loss change; ``-inf`` (a failed step) when the model predicts no
    decrease or the actual change is not finite."""
    if not math.isfinite(actual_change) or predicted_change >= 0:
        return -math.inf
    return actual_change / predicted_change


def levenberg_marquardt_damping(
    damping: float,
    actual_change: float,
    predicted_change: float,
    *,
    decay: float = 2.0 / 3.0,
    bounds: tuple[float, float] = (1e-8, 1e8),
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

    Returns
    -------
    float
        The new damping.
    """
    if not 0 < decay < 1:
        raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
    ratio = reduction_ratio(actual_change, predicted_change)
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
) -> dict[str, float]:
    """:func:`levenberg_marquardt_damping` with the record of the update.

    Returns
    -------
    dict of str to float
        ``"actual"`` and ``"predicted"`` change, ``"ratio"`` (:func:`reduction_ratio`),
        ``"damping_before"`` and ``"damping_after"`` (the new damping).
    """
    return {
        "actual": actual_change,
        "predicted": predicted_change,
        "ratio": reduction_ratio(actual_change, predicted_change),
        "damping_before": damping,
        "damping_after": levenberg_marquardt_damping(
            damping, actual_change, predicted_change, decay=decay, bounds=bounds
        ),
    }
